"""FP8 (E4M3) reference numerics with float32 scales: compressed-tensors' FP8 presets.

Schemes (shapes: N = output features, K = input features, ... = leading activation dims)

    scheme       weight, scale shape                  activation, scale shape
    fp8-dynamic  "channel" [N, 1]                     "token" (dynamic)         [..., 1]
    fp8          "tensor"  [1]                        "tensor" (static, given)  [1]
    fp8-block    "block"   [ceil(N/128), ceil(K/128)] "group" (dynamic, 1x128)  [..., K // 128]
    fp8-w        any of the three                     none (activations stay bf16)

    compressed-tensors presets: FP8_DYNAMIC, FP8, FP8_BLOCK; all QuantizationArgs(num_bits=8,
    type="float", symmetric=True), q_min/q_max = -448/448.

    data  torch.float8_e4m3fn, same shape as the input
    scale torch.float32, holding a value of the input dtype T (see "Scale rule")
    value = data * scale                     (dequantize: in float32)

Scale rule, one scale per group of elements (a row, a 128 x 128 block, 1 x 128 group, or
all of the tensor); bit-identical to compressed-tensors' ``calculate_qparams``, which
computes in the observed tensor's dtype T (bf16, fp16 or fp32) and stores the scale in T
    amax  = max |x| over the group                   exact; NaN if the group has a NaN
    s     = rnd_T(amax / 448)                        float32 quotient, rounded to T
    s     = eps_T if s == 0                          torch.finfo(T).eps: bf16 2**-7,
                                                     fp16 2**-10, fp32 2**-23
    An all-zero group (or one so small that amax / 448 underflows in T) gets eps_T.
    Padding a partial block with zeros leaves amax unchanged.

Elements (compressed-tensors' ``quantize``: it divides in T, adds its zero point 0.0,
clamps to +/-448 and casts, round-to-nearest-even)
    q     = rnd_T(x / s)                             float32 quotient, rounded to T
    data  = e4m3(clamp(q, -448, 448)), with q == -0 stored as +0 (the zero point add)

    rnd_T is a real second rounding: for bf16, x / s is first rounded to 8 significant
    bits, then to e4m3's 4 (1.1953125 / 1.0078125 = 1.18605 -> bf16 1.1875, the midpoint
    of 1.125 and 1.25 -> 1.25; rounded once it gives 1.125). For bf16 x and s in [1, 2)
    and x in [1, 512), 3.3% of the pairs differ. The rounding to T is ``round_to`` (the bf16
    conversion and a 16-bit shift back; integer math for fp16), not ``.to(T).float()``:
    Inductor elides a float32 -> bf16/fp16 -> float32 round trip inside a fused kernel
    (``pointless_convert`` and the C++ backend's convert cache, unless
    ``config.emulate_precision_casts``; torch 2.13).

128 x 128 weight blocks when N or K is not a multiple of 128 (compressed-tensors'
``maybe_pad_tensor_for_block_quant``, llm-compressor's block observer): the weight is
zero-padded to whole blocks, so the last block row/column is partial; its scale is the
rule above over its real elements; data keeps the weight's shape [N, K]. 1 x 128
activation groups need K % 128 == 0 (compressed-tensors raises too); weights that are
not 2-D are an error naming the tensor.

Activation granularities
    "token"   dynamic, one scale per row of the last dim: scale [..., 1]. compressed-tensors'
              TOKEN strategy reduces over dims 2.. of a [batch, seq, hidden] tensor; for a
              2-D input it reduces over everything (one scale). mxpass always reduces over
              the last dim only, so [M, K] and [1, M, K] give the same scales.
    "group"   dynamic, one scale per 1 x 128 group: scale [..., K // 128].
    "tensor"  static: the given scale (numel 1) is used as is (no eps replacement), the
              quotient is still rounded to T, as compressed-tensors does with an
              ``input_scale`` stored in T. A float32 ``input_scale`` makes its division
              float32 (type promotion), which equals this only for fp32 inputs.

NaN / Inf
    Weights (``quantize_weight``): a non-finite value is a ValueError naming the tensor.
    Dynamic activations ("token", "group"): a row / group holding NaN or +/-Inf gets a NaN
    scale and all-NaN data (0x7F), so it dequantizes to NaN; other rows / groups are
    unaffected and nothing raises. compressed-tensors gives the same NaN scale for NaN, an
    Inf scale and data x / inf (+0, NaN at the Inf) for Inf; its fake-quantized row is
    all-NaN in both cases, as here.
    Static activations ("tensor"): per element, as compressed-tensors: NaN -> NaN (0x7F),
    +/-Inf -> +/-448.

Everything in ``quantize_activation``, ``dequantize`` and ``fake_quantize_activation`` is
ATen math: no ``.item()``, no branches on values, no data-dependent shapes. Compiled with
Inductor's C++ backend the results are bit-identical to eager (tested). Inductor's Triton
backend divides approximately unless ``config.eager_numerics.division_rounding`` and turns
a division by a constant into a reciprocal multiply (``div_prim``, torch 2.13), so GPU
kernels are compared against this module, not assumed equal to it.
"""

from typing import NamedTuple

import torch

from mxpass.schemes._common import check_dtype, check_granularity, check_weight, round_to

E4M3_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2**8
BLOCK = 128  # FP8_BLOCK: block_structure [128, 128] for weights, group_size 128 for activations

_WEIGHT_GRANULARITIES = ("channel", "tensor", "block")
_ACT_GRANULARITIES = ("token", "tensor", "group")


class QTensor(NamedTuple):
    data: torch.Tensor  # float8_e4m3fn, the input's shape
    scale: torch.Tensor  # float32; shape by granularity (module docstring)


def _scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rnd_T(amax / 448), 0 -> eps_T, in float32."""
    s = round_to(amax / E4M3_MAX, dtype)
    return torch.where(s == 0, torch.finfo(dtype).eps, s)


def _dynamic_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_scale``, NaN where the group held NaN/Inf (amax not finite)."""
    return torch.where(amax.isfinite(), _scale(amax, dtype), float("nan"))


def _elements(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3(clamp(rnd_T(x / scale), +/-448)) for float32 x and a broadcastable scale."""
    t = x / scale
    q = round_to(t, dtype)
    q = torch.where(q == 0, 0.0, q)  # compressed-tensors' "+ zero_point": -0 -> +0
    q = q.clamp(-E4M3_MAX, E4M3_MAX)
    # One NaN (0x7F) for every NaN: Inductor's AVX-512 clamp sets a NaN's sign bit.
    q = torch.where(t.isnan(), float("nan"), q)
    return q.to(torch.float8_e4m3fn)


def _check_group(x: torch.Tensor) -> None:
    if x.dim() == 0 or x.shape[-1] % BLOCK != 0:
        k = x.shape[-1] if x.dim() else None
        raise ValueError(
            f"FP8: activation of shape {tuple(x.shape)}: K (last dim) = {k} is not a "
            f"multiple of {BLOCK}, needed for 1x{BLOCK} groups (compressed-tensors too)"
        )


def _static_scale(scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        raise ValueError(
            "FP8: granularity 'tensor' is static, and a static scheme needs an activation "
            "scale (the checkpoint's input_scale); got scale=None"
        )
    if scale.numel() != 1:
        raise ValueError(f"FP8: a per-tensor scale has one element; got shape {tuple(scale.shape)}")
    return scale.float().reshape(1)


def quantize_weight(w: torch.Tensor, name: str, granularity: str) -> QTensor:
    """Weight [N, K] -> QTensor; granularity "channel" ([N, 1]), "tensor" ([1]) or "block".

    "block": 128 x 128 blocks, scale [ceil(N/128), ceil(K/128)], partial blocks at the
    end as compressed-tensors pads them (module docstring). NaN/Inf is a ValueError.
    """
    what = f"weight {name!r}"
    check_granularity(granularity, _WEIGHT_GRANULARITIES, what, "FP8")
    check_weight(w, what, "FP8")
    x = w.float()
    if granularity == "channel":
        scale = _scale(x.abs().amax(dim=-1, keepdim=True), w.dtype)
        return QTensor(_elements(x, scale, w.dtype), scale)
    if granularity == "tensor":
        scale = _scale(x.abs().amax().reshape(1), w.dtype)
        return QTensor(_elements(x, scale, w.dtype), scale)
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.nn.functional.pad(x, (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    blocks = padded.reshape(nb, BLOCK, kb, BLOCK)  # [nb, 128, kb, 128]
    scale = _scale(blocks.abs().amax(dim=(1, 3)), w.dtype)  # [nb, kb]
    data = _elements(blocks, scale[:, None, :, None], w.dtype)
    return QTensor(data.reshape(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), scale)


def _quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, float32 scale broadcastable to data's float32 view, grouped for "group")."""
    check_dtype(x, "activation", "FP8")
    check_granularity(granularity, _ACT_GRANULARITIES, "activation", "FP8")
    if granularity != "tensor" and scale is not None:
        raise ValueError(
            f"FP8: granularity {granularity!r} is dynamic and computes its own scale; "
            "a scale was given"
        )
    xf = x.float()
    if granularity == "tensor":
        s = _static_scale(scale)
        return _elements(xf, s, x.dtype), s
    if granularity == "group":
        _check_group(x)
        xf = xf.unflatten(-1, (-1, BLOCK))  # [..., G, 128]
    s = _dynamic_scale(xf.abs().amax(dim=-1, keepdim=True), x.dtype)
    return _elements(xf, s, x.dtype), s


def quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None
) -> QTensor:
    """Activation [..., K] -> QTensor; "token" / "group" dynamic, "tensor" static (scale given).

    Scale shapes: "token" [..., 1], "group" [..., K // 128], "tensor" [1]. A dynamic row or
    group holding NaN/Inf gets a NaN scale and NaN data; other rows are unaffected.
    """
    data, s = _quantize_activation(x, granularity, scale)
    if granularity == "group":
        return QTensor(data.flatten(-2), s.squeeze(-1))
    return QTensor(data, s)


def _expand_scale(data: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """float32 scale broadcastable to data [..., K] (checked), one value per element group."""
    check_granularity(granularity, _WEIGHT_GRANULARITIES + ("token", "group"), "dequantize", "FP8")
    shape, sshape = tuple(data.shape), tuple(scale.shape)
    if granularity == "tensor":
        ok, expected = scale.numel() == 1, "one element"
    elif granularity in ("token", "channel"):
        expected = (*shape[:-1], 1)
        ok = bool(shape) and sshape == expected
    elif granularity == "group":
        expected = (*shape[:-1], shape[-1] // BLOCK) if shape else None
        ok = bool(shape) and shape[-1] % BLOCK == 0 and sshape == expected
    else:  # block
        expected = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)) if len(shape) == 2 else None
        ok = sshape == expected
    if not ok:
        raise ValueError(
            f"FP8: data {shape} and scale {sshape} do not match granularity "
            f"{granularity!r} (scale shape {expected})"
        )
    s = scale.float()
    if granularity == "tensor":
        return s.reshape(())
    if granularity == "group":
        return s.repeat_interleave(BLOCK, dim=-1)
    if granularity == "block":
        rows = s.repeat_interleave(BLOCK, dim=0)[: shape[0]]
        return rows.repeat_interleave(BLOCK, dim=1)[:, : shape[1]]
    return s


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """data * scale in float32; granularity: the one (weight or activation) data was made with."""
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8: data has dtype {q.dtype}; expected float8_e4m3fn")
    return q.float() * _expand_scale(q, scale, granularity)


def fake_quantize_activation(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize in x.dtype: ``dequantize(...).to(x.dtype)`` bit for bit.

    data * scale is exact in float32 (above its subnormals) when the scale is a bf16/fp16
    value (at most 4 + 11 significant bits), so the one rounding is the final cast, as in
    compressed-tensors' multiply in T; for fp32 both round the float32 product once.
    """
    data, s = _quantize_activation(x, granularity, scale)
    out = data.float() * s
    if granularity == "group":
        out = out.flatten(-2)
    return out.to(x.dtype)


def requantize_fused_per_tensor(qs: list[QTensor]) -> QTensor:
    """Per-tensor-quantized shards [N_i, K] (q/k/v, gate/up) -> one [sum N_i, K] tensor.

    vLLM's rule (``requantize_with_max_scale`` in its w8a8 utils): the fused tensor keeps
    the largest shard scale s_max; each shard is dequantized with its own scale and
    requantized with s_max:
        data = e4m3(clamp(data_i * s_i / s_max, -448, 448))     float32, nearest-even
    The shard that owns s_max comes back bit for bit (its quotient is within an ulp of
    an e4m3 value); the others lose low bits where s_i < s_max. vLLM dequantizes through
    float16 (``per_tensor_dequantize``) and multiplies by 1 / s_max in its CUDA kernel, so
    its bytes can differ where the float16 product or the reciprocal rounds.
    """
    if not qs:
        raise ValueError("FP8: requantize_fused_per_tensor needs at least one tensor")
    for i, q in enumerate(qs):
        if q.data.dtype != torch.float8_e4m3fn or q.data.dim() != 2 or q.scale.numel() != 1:
            raise ValueError(
                f"FP8: fused shard {i}: expected 2-D float8_e4m3fn data with a per-tensor "
                f"scale; got {q.data.dtype} {tuple(q.data.shape)}, scale {tuple(q.scale.shape)}"
            )
        if q.data.shape[1] != qs[0].data.shape[1]:
            raise ValueError(
                f"FP8: fused shards have different K: {qs[0].data.shape[1]} and "
                f"{q.data.shape[1]} (shard {i})"
            )
    scales = torch.cat([q.scale.float().reshape(1) for q in qs])
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError(f"FP8: fused shard scales must be finite and > 0; got {scales.tolist()}")
    s_max = scales.max()
    parts = [
        (q.data.float() * s / s_max).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        for q, s in zip(qs, scales)
    ]
    return QTensor(torch.cat(parts), s_max.reshape(1))
