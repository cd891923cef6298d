"""Quantization formats: small frozen descriptions, looked up by name.

Ops carry the format as its ``name`` (custom-op schemas take strings); everything else
uses the :class:`Format` object returned by :func:`get_format`. ``mxpass/quant.py`` maps a
format to its numerics in ``mxpass/schemes/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    """What a quantized linear layer stores and computes.

    name        -- the scheme name a user passes (``mxpass.backend(scheme=name)``)
    family      -- "mxfp8", "fp8" or "int8": which module of mxpass/schemes defines it
    weight      -- element dtype of the stored weight
    scale       -- dtype of the stored weight scale
    weight_granularity -- "mx32" (one E8M0 scale per 32 along K), "channel" (per output
                   row), "tensor", or "block" (128 x 128)
    activation  -- granularity of the activation quantization: "mx32", "token", "group"
                   (1 x 128), "tensor" (static, needs a scale), or None (weight-only)
    """

    name: str
    family: str
    weight: torch.dtype
    scale: torch.dtype
    weight_granularity: str
    activation: str | None
    description: str

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    @property
    def static_activation(self) -> bool:
        return self.activation == "tensor"

    @property
    def block(self) -> int:
        """Elements along K that one weight scale covers (1 when the scale spans all of K)."""
        return {"mx32": 32, "block": 128}.get(self.weight_granularity, 1)

    def k_multiple(self) -> int:
        """K must be a multiple of this (MX blocks; 1 x 128 activation groups)."""
        return 128 if self.activation == "group" else (32 if self.family == "mxfp8" else 1)


def _build_formats() -> dict[str, Format]:
    # OCP Microscaling Formats (MX) v1.0, section 5.3 (MXFP8): e4m3 elements, one E8M0
    # scale per block of 32 consecutive elements along the reduction dimension.
    mx = dict(family="mxfp8", weight=torch.float8_e4m3fn, scale=torch.float8_e8m0fnu, weight_granularity="mx32")
    fp8 = dict(family="fp8", weight=torch.float8_e4m3fn, scale=torch.float32)
    i8 = dict(family="int8", weight=torch.int8, scale=torch.float32)
    formats = [
        Format("mxfp8", activation="mx32", **mx,
               description="MXFP8 weights, dynamic MXFP8 activations (W8A8)"),
        Format("mxfp8-w", activation=None, **mx,
               description="MXFP8 weights, activations in the model dtype (MXFP8A16)"),
        Format("fp8-dynamic", weight_granularity="channel", activation="token", **fp8,
               description="FP8 per-channel weights, dynamic per-token FP8 activations (FP8_DYNAMIC)"),
        Format("fp8", weight_granularity="tensor", activation="tensor", **fp8,
               description="FP8 per-tensor weights, static per-tensor FP8 activations (FP8)"),
        Format("fp8-block", weight_granularity="block", activation="group", **fp8,
               description="FP8 128x128-block weights, dynamic 1x128-group activations (FP8_BLOCK)"),
        Format("fp8-w", weight_granularity="channel", activation=None, **fp8,
               description="FP8 per-channel weights, activations in the model dtype (W8A16)"),
        Format("fp8-w-tensor", weight_granularity="tensor", activation=None, **fp8,
               description="FP8 per-tensor weights, activations in the model dtype (W8A16)"),
        Format("fp8-w-block", weight_granularity="block", activation=None, **fp8,
               description="FP8 128x128-block weights, activations in the model dtype (W8A16)"),
        Format("int8", weight_granularity="channel", activation="token", **i8,
               description="INT8 per-channel weights, dynamic per-token INT8 activations (W8A8)"),
        Format("int8-static", weight_granularity="tensor", activation="tensor", **i8,
               description="INT8 per-tensor weights, static per-tensor INT8 activations"),
    ]
    return {f.name: f for f in formats}


_FORMATS = _build_formats()

#: Activation dtypes the linear path accepts.
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def get_format(name: str) -> Format:
    """The format called ``name``; a ValueError lists the known names otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(format_names())
        raise ValueError(f"unknown mxpass scheme {name!r}; known schemes: {known}") from None


def format_names() -> list[str]:
    return list(_FORMATS)
