"""The reference quantized linear: dequantize, emulate activation quantization, fp32 matmul.

This is the definition every kernel is compared with, and what runs on CPU. It is written
as plain ATen math so that, inside a compiled graph, Inductor compiles it like any other
code (no Python dispatch per call).
"""

from __future__ import annotations

import torch

from mxpass.schemes import mxfp8


def mxfp8_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    quantize_activation: bool,
) -> torch.Tensor:
    """y = fq(x) @ dequant(W)^T + b in fp32, returned in x's dtype.

    x [..., K]; qweight [N, K] e4m3; wscale [N, K/32] e8m0; bias [N] or None.
    fq is MXFP8 fake quantization (quantize then dequantize) when ``quantize_activation``.
    """
    if quantize_activation:
        x = mxfp8.fake_quantize(x)
    w = mxfp8.dequantize(qweight, wscale, torch.float32)
    y = torch.matmul(x.float(), w.t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
