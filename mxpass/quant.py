"""Numerics of a Format: weight quantization, activation fake-quantization, dequantization.

Dispatches to the scheme modules (``mxpass/schemes/``), which define the bits. Everything
the lowering calls here is ATen math that Inductor traces and fuses.
"""

from __future__ import annotations

import torch

from mxpass.formats import Format
from mxpass.schemes import fp8, int8, mxfp8

_FAMILY = {"fp8": fp8, "int8": int8}


def quantize_weight(fmt: Format, w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (data [N, K], scale); errors name ``name``."""
    if fmt.family == "mxfp8":
        q = mxfp8.quantize_weight(w, name)
    else:
        q = _FAMILY[fmt.family].quantize_weight(w, name, fmt.weight_granularity)
    return q.data, q.scale


def dequantize_weight(fmt: Format, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(data, scale) -> float32 [N, K]. An MX scale may be given as its uint8 storage."""
    if fmt.family == "mxfp8":
        return mxfp8.dequantize(data, scale, torch.float32)
    return _FAMILY[fmt.family].dequantize(data, scale, fmt.weight_granularity)


def dequantize_activation(fmt: Format, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An activation quantized by :func:`quantize_activation` -> float32 [..., K]."""
    if fmt.family == "mxfp8":
        return mxfp8.dequantize(data, scale, torch.float32)
    return _FAMILY[fmt.family].dequantize(data, scale, fmt.activation)


def fake_quantize_activation(fmt: Format, x: torch.Tensor, act_scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize x [..., K] as the format's activation, in x's dtype (identity if weight-only)."""
    if fmt.activation is None:
        return x
    if fmt.family == "mxfp8":
        return mxfp8.fake_quantize(x)
    return _FAMILY[fmt.family].fake_quantize_activation(x, fmt.activation, act_scale)


def quantize_activation(fmt: Format, x: torch.Tensor, act_scale: torch.Tensor | None):
    """x [..., K] -> (data, scale) in the format's activation encoding."""
    if fmt.family == "mxfp8":
        q = mxfp8.quantize(x)
    else:
        q = _FAMILY[fmt.family].quantize_activation(x, fmt.activation, act_scale)
    return q.data, q.scale


def linear_reference(x, qweight, wscale, bias, act_scale, fmt: Format) -> torch.Tensor:
    """y = fq(x) @ dequant(W)^T + b in fp32, returned in x's dtype: the definition."""
    xq = fake_quantize_activation(fmt, x, act_scale)
    y = torch.matmul(xq.float(), dequantize_weight(fmt, qweight, wscale).t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
