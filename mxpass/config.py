"""User-facing quantization configuration."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mxpass.formats import Format, get_format

#: The scheme for ordinary weights when none is given.
DEFAULT_SCHEME = "mxfp8"


@dataclass(frozen=True)
class QuantConfig:
    """Which scheme to apply and which layers to leave alone.

    scheme   -- format name (see ``mxpass.formats.format_names()``), or None (the default):
                MXFP8 for ordinary weights; a weight loaded quantized by ``mxpass.load`` keeps
                the format it was stored in, and a Linear the load left in the model dtype
                is kept ("unquantized in the checkpoint"). Given a scheme, ordinary weights and
                the ones the load left unquantized are quantized with it, and a weight loaded in
                another format is an error
    ignore   -- module paths to keep in the model dtype: exact names
                ("model.layers.0.mlp.down_proj") or ``re:``-prefixed regular expressions
                matched from the start of the name (compressed-tensors' convention)
    quantize_lm_head -- quantize the output embedding too (off by default)
    activation_scales -- static per-tensor activation scales by module path, for the static
                schemes ("fp8", "int8-static"); a layer without one is an error
    merge    -- run quantized layers that read the same input (q/k/v, gate/up) as one GEMM on
                their stacked weights (on by default; the report says which were merged)
    """

    scheme: str | None = None
    ignore: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    activation_scales: tuple[tuple[str, float], ...] = ()
    merge: bool = True

    def __post_init__(self):
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        else:
            object.__setattr__(self, "ignore", tuple(self.ignore))
        scales = self.activation_scales
        object.__setattr__(self, "activation_scales",
                           tuple(sorted((scales.items() if isinstance(scales, dict) else scales))))
        if self.scheme is not None:
            get_format(self.scheme)  # fail early on an unknown scheme
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"ignore pattern {pattern!r} is not a valid regex: {e}") from None

    @property
    def format(self) -> Format:
        """The format for ordinary weights (the scheme given, else the default)."""
        return get_format(self.scheme or DEFAULT_SCHEME)

    @property
    def explicit(self) -> bool:
        """A scheme was asked for (rather than defaulted)."""
        return self.scheme is not None

    def activation_scale(self, fqn: str) -> float | None:
        return dict(self.activation_scales).get(fqn)

    def ignored_by(self, fqn: str) -> str | None:
        """The ignore pattern that matches module path ``fqn``, if any."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], fqn):
                    return pattern
            elif pattern == fqn:
                return pattern
        return None
