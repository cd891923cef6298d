"""INT8 reference numerics with float32 scales: compressed-tensors' W8A8 / INT8 preset.

Scheme "int8" (shapes: N = output features, K = input features, ... = leading dims)

    weight      "channel" scale [N, 1]  (preset)     or "tensor" scale [1]
    activation  "token"   scale [..., 1], dynamic (preset) or "tensor" scale [1], static (given)

    compressed-tensors presets W8A8 and INT8 (the same args): QuantizationArgs(num_bits=8,
    type="int", symmetric=True), weights strategy "channel", activations "token", dynamic.

    data  torch.int8, same shape as the input, in [-128, 127]
    scale torch.float32, holding a value of the input dtype T
    value = data * scale                     (dequantize: in float32)

Scale rule (bit-identical to compressed-tensors' ``calculate_qparams``, computed in T)
    amax  = max |x| over the row (or the tensor)    exact; NaN if it has a NaN
    s     = rnd_T(amax / 127.5)                     127.5 = (q_max - q_min) / 2 = (127 + 128) / 2
    s     = eps_T if s == 0                         torch.finfo(T).eps: bf16 2**-7, fp16 2**-10,
                                                    fp32 2**-23 (all-zero rows)

Elements (compressed-tensors' ``quantize``: divide in T, clamp, torch.round)
    q     = rnd_T(x / s)                            float32 quotient, rounded to T
    data  = int8(round_half_even(clamp(q, -128, 127)))

    The range is the full [-128, 127] with scale amax / 127.5, not vLLM's kernel rule
    (scale amax / 127, x * (127 / amax)). +amax lands on 127.5 +/- rounding and is clamped
    to 127; -amax lands on -127.5 +/- rounding, so -128 occurs. rnd_T is a real second
    rounding for bf16: 194 / 3 = 64.67 is first rounded to 64.5 (8 significant bits), then
    to the even 64, where a single rounding gives 65; it is done with integer bit math because
    Inductor elides a float32 -> bf16 -> float32 round trip in a fused kernel (torch 2.13,
    unless ``config.emulate_precision_casts``).

"token": one scale per row of the last dim. compressed-tensors' TOKEN strategy reduces
over dims 2.. of a [batch, seq, hidden] tensor and over everything for a 2-D input; mxpass
always reduces over the last dim. "tensor": the given scale is used as is, the quotient
still rounded to T (as compressed-tensors with an ``input_scale`` stored in T).

NaN / Inf (int8 has no NaN)
    Weights: a non-finite value is a ValueError naming the tensor.
    Dynamic activations ("token"): a row holding NaN or +/-Inf gets a NaN scale and data 0,
    so it dequantizes to NaN; other rows are unaffected and nothing raises.
    compressed-tensors gives the row a NaN / Inf scale and casts NaN quotients to int8,
    which is platform-defined; its fake-quantized row is all-NaN, as here.
    Static activations ("tensor"): +/-Inf -> 127 / -128 (clamp, as compressed-tensors);
    NaN -> 0 (compressed-tensors' NaN -> int8 cast is platform-defined).

``quantize_activation``, ``dequantize`` and ``fake_quantize_activation`` are ATen math with
no ``.item()`` and no branches on values; compiled with Inductor's C++ backend they are
bit-identical to eager (tested).
"""

from typing import NamedTuple

import torch

from mxpass.schemes._common import check_dtype, check_granularity, check_weight, round_to

INT8_MIN, INT8_MAX = -128.0, 127.0
HALF_RANGE = (INT8_MAX - INT8_MIN) / 2  # 127.5: compressed-tensors' symmetric divisor

_WEIGHT_GRANULARITIES = ("channel", "tensor")
_ACT_GRANULARITIES = ("token", "tensor")


class QTensor(NamedTuple):
    data: torch.Tensor  # int8, the input's shape
    scale: torch.Tensor  # float32: [N, 1] / [..., 1] per row, [1] per tensor


def _scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rnd_T(amax / 127.5), 0 -> eps_T, in float32."""
    s = round_to(amax / HALF_RANGE, dtype)
    return torch.where(s == 0, torch.finfo(dtype).eps, s)


def _elements(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8(round(clamp(rnd_T(x / scale), -128, 127))); NaN -> 0."""
    t = x / scale
    q = round_to(t, dtype).clamp(INT8_MIN, INT8_MAX).round()
    return torch.where(t.isnan(), 0.0, q).to(torch.int8)


def quantize_weight(w: torch.Tensor, name: str, granularity: str) -> QTensor:
    """Weight [N, K] -> QTensor; granularity "channel" (scale [N, 1]) or "tensor" ([1])."""
    what = f"weight {name!r}"
    check_granularity(granularity, _WEIGHT_GRANULARITIES, what, "INT8")
    check_weight(w, what, "INT8")
    x = w.float()
    if granularity == "channel":
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x.abs().amax().reshape(1)
    scale = _scale(amax, w.dtype)
    return QTensor(_elements(x, scale, w.dtype), scale)


def _quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None
) -> QTensor:
    check_dtype(x, "activation", "INT8")
    check_granularity(granularity, _ACT_GRANULARITIES, "activation", "INT8")
    xf = x.float()
    if granularity == "tensor":
        if scale is None:
            raise ValueError(
                "INT8: granularity 'tensor' is static, and a static scheme needs an "
                "activation scale (the checkpoint's input_scale); got scale=None"
            )
        if scale.numel() != 1:
            raise ValueError(
                f"INT8: a per-tensor scale has one element; got shape {tuple(scale.shape)}"
            )
        s = scale.float().reshape(1)
        return QTensor(_elements(xf, s, x.dtype), s)
    if scale is not None:
        raise ValueError(
            "INT8: granularity 'token' is dynamic and computes its own scale; a scale was given"
        )
    amax = xf.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax.isfinite(), _scale(amax, x.dtype), float("nan"))
    return QTensor(_elements(xf, s, x.dtype), s)


def quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None
) -> QTensor:
    """Activation [..., K] -> QTensor; "token" dynamic ([..., 1]), "tensor" static (given, [1]).

    A "token" row holding NaN/Inf gets a NaN scale and data 0; other rows are unaffected.
    """
    return _quantize_activation(x, granularity, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """data * scale in float32 (exact for a bf16/fp16 scale); granularity as quantized with."""
    if q.dtype != torch.int8:
        raise TypeError(f"INT8: data has dtype {q.dtype}; expected int8")
    check_granularity(granularity, ("channel", "token", "tensor"), "dequantize", "INT8")
    shape, sshape = tuple(q.shape), tuple(scale.shape)
    if granularity == "tensor":
        ok, expected = scale.numel() == 1, "one element"
    else:
        expected = (*shape[:-1], 1)
        ok = sshape == expected
    if not ok:
        raise ValueError(
            f"INT8: data {shape} and scale {sshape} do not match granularity "
            f"{granularity!r} (scale shape {expected})"
        )
    s = scale.float()
    return q.float() * (s.reshape(()) if granularity == "tensor" else s)


def fake_quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize in x.dtype: ``dequantize(...).to(x.dtype)`` bit for bit."""
    data, s = _quantize_activation(x, granularity, scale)
    return (data.float() * s).to(x.dtype)
