"""Pure-PyTorch references for the kernels in ``mxpass.kernels.triton``.

Shapes: M = tokens, K = in features, N = out features, G = K // 32 scale blocks.

Each reference is plain ATen math: no ``.item()``, no Python branch on a tensor value
or on M, so on CPU it is what torch.compile / Inductor compiles into the model, and on
GPU it is what the Triton kernels are tested against. This module never imports triton.
"""

from __future__ import annotations

import torch

from mxpass.schemes.mxfp8 import dequantize

__all__ = ["mxfp8_linear_reference"]


def mxfp8_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T (+ bias), fp32 math, cast to x.dtype.

    W[n, k] = float(qweight[n, k]) * 2**(byte(wscale[n, k // 32]) - 127): qweight is
    [N, K] float8_e4m3fn, wscale [N, G] float8_e8m0fnu (byte 255 is NaN, OCP MX §5.4.1).
    bias is [N] in x.dtype or None.
    """
    w = dequantize(qweight, wscale, torch.float32)  # [N, K]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
