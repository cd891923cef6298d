"""Inductor heuristics for the kernels that quantize activations.

Inductor keeps a row reduction in registers ("persistent") only up to 1024 elements per
row; longer rows are reduced in a loop, and a kernel that reduces a row (amax) and then
writes it quantized reads the row twice. The rows that mxpass quantizes per token are a
model's hidden size (2048-8192) or intermediate size. mxpass compiles its graphs with a
handler that also makes persistent every row reduction (Inductor's INNER or DEFAULT hint)
of at most ``MAX_ROW`` elements whose kernel stores e4m3 or int8 (the quantizing ones; no other kernel changes): on an
H200, RMSNorm + per-token e4m3 of 4096 x 4096 took 48.9 us looped and 33.7 us
persistent, the stand-alone quantization 37.8 against 31.2 us (docs/performance.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch._inductor.choices import InductorChoices

MAX_ROW = 16384
_QUANTIZED = (torch.float8_e4m3fn, torch.int8)


def _stores_quantized(features) -> bool:
    for node in features.scheduler_nodes():
        buf = getattr(node, "node", None)
        if buf is not None and buf.get_dtype() in _QUANTIZED:
            return True
    return False


class QuantizingReductions(InductorChoices):
    """Persistent reductions for quantizing kernels with rows up to ``MAX_ROW`` (module docstring)."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        from torch._inductor import config
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V

        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        if not config.triton.persistent_reductions or cooperative_reduction:
            return False
        # INNER: rows contiguous; DEFAULT: e.g. an RMSNorm fused with the embedding gather before it
        if features.get_reduction_hint() not in (ReductionHint.INNER, ReductionHint.DEFAULT):
            return False
        if not _stores_quantized(features):
            return False
        return V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ROW)


def quantizing_reductions() -> contextlib.AbstractContextManager:
    """Install :class:`QuantizingReductions` as Inductor's heuristics for one compilation.

    A handler the user installed (``V.set_choices_handler``, ``config.inductor_choices_class``)
    is kept as it is, and then so are Inductor's persistent-reduction limits."""
    from torch._inductor.virtualized import V

    if type(V.choices) is not InductorChoices:
        return contextlib.nullcontext()
    return V.set_choices_handler(QuantizingReductions())
