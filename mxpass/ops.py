"""The ``mxpass::`` custom ops: schemas from type hints, exact fakes, reference bodies.

- ``mxpass::quantize(x, fmt) -> (q, scale)``: dynamic activation quantization along the
  last dim (MXFP8: e4m3 values, one ``float8_e8m0fnu`` scale per 32).
- ``mxpass::linear(x, qweight, wscale, bias, fmt) -> y``: quantized linear, y in x's dtype.

The eager body of every op is the pure-PyTorch reference. Compiled graphs never call these
bodies: the backend hands Inductor a decomposition (``mxpass.lowering``) that expresses
activation quantization as ATen math, which fuses into its producer, plus one kernel call
chosen by the kernel registry.
"""

from __future__ import annotations

import torch

from mxpass.formats import get_format
from mxpass.schemes import mxfp8
from mxpass.schemes.linear import mxfp8_linear_reference

__all__ = ["quantize", "linear"]


@torch.library.custom_op("mxpass::quantize", mutates_args=())
def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x`` [..., K] in format ``fmt``."""
    f = get_format(fmt)
    q = mxfp8.quantize(x)
    assert q.data.dtype == f.weight and q.scale.dtype == f.scale
    return q.data, q.scale


@quantize.register_fake
def _quantize_fake(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = get_format(fmt)
    torch._check(
        x.shape[-1] % f.block == 0,
        lambda: f"mxpass::quantize: last dim {x.shape[-1]} is not a multiple of {f.block}",
    )
    q = x.new_empty(x.shape, dtype=f.weight)
    scale = x.new_empty((*x.shape[:-1], x.shape[-1] // f.block), dtype=f.scale)
    return q, scale


@torch.library.custom_op("mxpass::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """Quantized linear: x [..., K] @ dequant(qweight [N, K], wscale)^T + bias -> [..., N]."""
    f = get_format(fmt)
    return mxfp8_linear_reference(x, qweight, wscale, bias, not f.weight_only)


@linear.register_fake
def _linear_fake(x, qweight, wscale, bias, fmt):
    f = get_format(fmt)
    n, k = qweight.shape
    torch._check(x.shape[-1] == k, lambda: f"mxpass::linear: x has K={x.shape[-1]}, weight has K={k}")
    torch._check(wscale.shape == (n, k // f.block), lambda: "mxpass::linear: bad weight scale shape")
    return x.new_empty((*x.shape[:-1], n))
