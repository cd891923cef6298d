"""Quantization formats: small frozen descriptions, looked up by name.

Ops carry the format as its ``name`` (custom-op schemas take strings); everything else
uses the :class:`Format` object returned by :func:`get_format`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    """What a quantized linear layer stores and computes.

    name        -- the scheme name a user passes (``mxpass.backend(scheme=name)``)
    weight      -- element dtype of the stored weight
    scale       -- dtype of the stored weight scale
    block       -- elements along K that share one scale
    activation  -- element format of the dynamically quantized activation, or None when
                   activations stay in the model dtype (weight-only schemes)
    """

    name: str
    weight: torch.dtype
    scale: torch.dtype
    block: int
    activation: str | None
    description: str

    @property
    def weight_only(self) -> bool:
        return self.activation is None


def _build_formats() -> dict[str, Format]:
    # OCP Microscaling Formats (MX) v1.0, section 5.3 (MXFP8): e4m3 elements, one E8M0
    # scale per block of 32 consecutive elements along the reduction dimension.
    mx = dict(weight=torch.float8_e4m3fn, scale=torch.float8_e8m0fnu, block=32)
    formats = [
        Format(name="mxfp8", activation="mxfp8", **mx,
               description="MXFP8 weights, dynamic MXFP8 activations (W8A8)"),
        Format(name="mxfp8-w", activation=None, **mx,
               description="MXFP8 weights, activations in the model dtype (MXFP8A16)"),
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
        known = ", ".join(sorted(_FORMATS))
        raise ValueError(f"unknown mxpass scheme {name!r}; known schemes: {known}") from None


def format_names() -> list[str]:
    return sorted(_FORMATS)
