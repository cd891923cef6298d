"""The ``mxpass::`` custom ops: schemas from type hints, exact fakes, reference bodies.

- ``mxpass::quantize(x, fmt) -> (q, scale)``: dynamic activation quantization along the
  last dim (MXFP8: e4m3 values, one ``float8_e8m0fnu`` scale per 32; FP8/INT8: float32
  per-token or per-1x128-group scales).
- ``mxpass::linear(x, qweight, wscale, bias, act_scale, fmt) -> y``: quantized linear, y in
  x's dtype; ``act_scale`` is the static per-tensor activation scale of static formats.

The eager body of every op is the pure-PyTorch reference. Compiled graphs never call these
bodies: the backend lowers each ``mxpass::linear`` (``mxpass.lowering``) to activation
quantization in ATen math, which fuses into its producer, plus one kernel chosen by the
kernel registry.
"""

from __future__ import annotations

import torch

from mxpass import quant
from mxpass.formats import get_format

__all__ = ["quantize", "linear"]


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
