"""The ``mxpass::`` custom ops: schemas from type hints, exact fakes, reference bodies.

- ``mxpass::quantize(x, fmt) -> (q, scale)``: dynamic activation quantization along the
  last dim (MXFP8: e4m3 values, one ``float8_e8m0fnu`` scale per 32; FP8/INT8: float32
  per-token or per-1x128-group scales).
- ``mxpass::linear(x, qweight, wscale, bias, act_scale, fmt) -> y``: quantized linear, y in
  x's dtype; ``act_scale`` is the static per-tensor activation scale of static formats.
- ``mxpass::moe(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt, activation) -> y``:
  the experts of one Mixture-of-Experts layer with per-expert quantized weights, y in x's dtype.

The eager body of every op is the pure-PyTorch reference. Compiled graphs never call these
bodies: the backend lowers each ``mxpass::linear`` (``mxpass.lowering``) to activation
quantization in ATen math, which fuses into its producer, plus one kernel chosen by the
kernel registry, and each ``mxpass::moe`` to the MoE kernel the registry picks (the fused
Triton MoE on CUDA, its reference math elsewhere).
"""

from __future__ import annotations

import torch

from mxpass import quant
from mxpass.formats import get_format

__all__ = ["quantize", "linear", "moe", "moe_reference", "experts_reference"]


def _dynamic_format(fmt: str):
    f = get_format(fmt)
    if f.activation is None or f.static_activation:
        raise ValueError(f"mxpass::quantize: scheme {fmt!r} has no dynamic activation quantization")
    return f


@torch.library.custom_op("mxpass::quantize", mutates_args=())
def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x`` [..., K] in format ``fmt``."""
    return quant.quantize_activation(_dynamic_format(fmt), x, None)


@quantize.register_fake
def _quantize_fake(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = _dynamic_format(fmt)
    k = x.shape[-1]
    torch._check(k % f.k_multiple() == 0,
                 lambda: f"mxpass::quantize: last dim {k} is not a multiple of {f.k_multiple()}")
    q = x.new_empty(x.shape, dtype=f.weight)
    groups = {"mx32": k // 32, "group": k // 128, "token": 1}[f.activation]
    scale_dtype = torch.float8_e8m0fnu if f.family == "mxfp8" else torch.float32
    return q, x.new_empty((*x.shape[:-1], groups), dtype=scale_dtype)


@torch.library.custom_op("mxpass::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """Quantized linear: x [..., K] @ dequant(qweight [N, K], wscale)^T + bias -> [..., N]."""
    return quant.linear_reference(x, qweight, wscale, bias, act_scale, get_format(fmt))


@linear.register_fake
def _linear_fake(x, qweight, wscale, bias, act_scale, fmt):
    f = get_format(fmt)
    n, k = qweight.shape
    torch._check(x.shape[-1] == k, lambda: f"mxpass::linear: x has K={x.shape[-1]}, weight has K={k}")
    torch._check(qweight.dtype == f.weight, lambda: f"mxpass::linear: weight dtype {qweight.dtype}, {fmt} stores {f.weight}")
    return x.new_empty((*x.shape[:-1], n))


# ----------------------------------------------------------------------------------------
# Mixture of Experts. Shape legend:
#   T tokens, E experts, A active experts per token (top-k), H hidden size,
#   I intermediate size of one expert.
#   x [T, H]; topk_ids [T, A] (integer, each in [0, E)); topk_weights [T, A];
#   w13 [E, 2I, H]: per expert, the gate projection (rows 0..I) then the up projection;
#   w2 [E, H, I]: per expert, the down projection.
#   y[t] = sum_a topk_weights[t, a] * w2[e] @ (act(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),
#   e = topk_ids[t, a].

MOE_ACTIVATIONS = ("silu",)
_ACTIVATION_FNS = {"silu": torch.nn.functional.silu}


def _check_activation(activation: str) -> None:
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"mxpass::moe: activation {activation!r} is not supported "
                         f"(supported: {', '.join(MOE_ACTIVATIONS)})")


def experts_reference(x, topk_ids, topk_weights, w13, w2, activation: str, fmt=None) -> torch.Tensor:
    """The MoE experts on float weights (w13 [E, 2I, H], w2 [E, H, I]) in fp32 -> [T, H] in x's dtype.

    ``fmt`` (a :class:`Format`) emulates its activation quantization on both expert inputs:
    x, and the SiLU(gate) * up product after rounding it to x's dtype (what the model would
    hand a quantized down projection). ``fmt=None`` is the unquantized MoE.

    Every expert runs on every token, then each token gathers its A results: E / A times
    the routed FLOPs, but no data-dependent shapes, so this compiles with dynamic T as one
    graph. Out-of-range ids fail in the gather (eager: RuntimeError; Inductor: its bounds
    check on indirect indexing).
    """
    _check_activation(activation)
    hidden = x.shape[-1]
    inter = w2.shape[-1]
    fq = (lambda t: t) if fmt is None else (lambda t: quant.fake_quantize_activation(fmt, t, None))
    xq = fq(x).float()                                              # [T, H]
    gate_up = torch.matmul(xq, w13.float().transpose(1, 2))         # [E, T, 2I]
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    h = (_ACTIVATION_FNS[activation](gate) * up).to(x.dtype)        # [E, T, I]
    y = torch.matmul(fq(h).float(), w2.float().transpose(1, 2))     # [E, T, H]
    index = topk_ids.long().unsqueeze(-1).expand(-1, -1, hidden)    # [T, A, H]
    routed = torch.gather(y.transpose(0, 1), 1, index)              # [T, A, H]
    return (routed * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(x.dtype)


def _dequantize_experts(f, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-expert quantized [E, N, K] -> float32 [E, N, K]."""
    if f.weight_granularity in ("mx32", "channel"):
        # one scale per row (and per 32 along K): the 2-D dequantization broadcasts over E
        return quant.dequantize_weight(f, data, scale)
    return torch.stack([quant.dequantize_weight(f, data[e], scale[e]) for e in range(data.shape[0])])


def moe_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, f, activation: str) -> torch.Tensor:
    """Dequantize every expert, then :func:`experts_reference` with ``f``'s activation quantization."""
    return experts_reference(x, topk_ids, topk_weights, _dequantize_experts(f, w13, w13_scale),
                             _dequantize_experts(f, w2, w2_scale), activation, f)


def _moe_format(fmt: str):
    f = get_format(fmt)
    if f.static_activation:
        raise ValueError(f"mxpass::moe: scheme {fmt!r} quantizes activations with a static per-tensor "
                         "scale, which the experts op does not take")
    return f


@torch.library.custom_op("mxpass::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    fmt: str,
    activation: str,
) -> torch.Tensor:
    """MoE experts with quantized weights: x [T, H], ids/weights [T, A] -> [T, H] in x's dtype.

    Routing ids outside [0, E) are a ValueError here (no sentinel ids: an expert-parallel
    "not mine" id must be masked before this op).
    """
    f = _moe_format(fmt)
    n_experts = w13.shape[0]
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"mxpass::moe: routing ids must be in [0, {n_experts}), got values "
                             f"from {lo} to {hi}")
    return moe_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, f, activation)


@moe.register_fake
def _moe_fake(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt, activation):
    f = _moe_format(fmt)
    _check_activation(activation)
    torch._check(x.dim() == 2, lambda: f"mxpass::moe: x must be [T, H], got {x.dim()}-D")
    torch._check(w13.dim() == 3 and w2.dim() == 3, lambda: "mxpass::moe: w13 and w2 must be 3-D")
    n_experts, two_inter, hidden = w13.shape
    torch._check(x.shape[1] == hidden, lambda: f"mxpass::moe: x has H={x.shape[1]}, w13 has H={hidden}")
    torch._check(tuple(w2.shape) == (n_experts, hidden, two_inter // 2) and two_inter % 2 == 0,
                 lambda: f"mxpass::moe: w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)} "
                         "([E, H, I] for w13 [E, 2I, H])")
    torch._check(w13.dtype == f.weight and w2.dtype == f.weight,
                 lambda: f"mxpass::moe: weight dtypes {w13.dtype}/{w2.dtype}, {fmt} stores {f.weight}")
    torch._check(not topk_ids.is_floating_point() and not topk_ids.is_complex(),
                 lambda: f"mxpass::moe: topk_ids must be integer, got {topk_ids.dtype}")
    torch._check(topk_ids.dim() == 2 and topk_ids.shape == topk_weights.shape
                 and topk_ids.shape[0] == x.shape[0],
                 lambda: f"mxpass::moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, A] with T={x.shape[0]}")
    return x.new_empty(x.shape)
