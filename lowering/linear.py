"""Lowering of ``mxpass::linear`` for Inductor.

Each ``mxpass::linear`` node becomes a call of :func:`linear_lowered` before AOTAutograd
traces the graph (``lowering/nodes.py``): the activation quantization written as ATen math (so it fuses into the
kernel that produced the activation: an RMSNorm, a SiLU*mul) followed by one call of the
kernel the registry picked. A Triton kernel is a ``torch.library.triton_op``, which
Inductor traces into and launches from its generated code.
"""

from __future__ import annotations

from typing import Callable

import torch

from mxpass import quant
from mxpass.formats import get_format
from mxpass.lowering.registry import Problem, choose


def linear_lowered(x, qweight, wscale, bias, act_scale, fmt: str):
    """What an ``mxpass::linear`` node becomes before AOTAutograd traces the graph.

    ``wscale`` of an MX format is the E8M0 scale or its uint8 storage (both decode the same way)."""
    f = get_format(fmt)
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    choice = choose(Problem("linear", f, x.device, k, n, x.dtype, static_rows(x2)))
    y = choice.kernel.run(x2, qweight, wscale, bias, act_scale, f)
    return y.reshape(*x.shape[:-1], n)


def static_rows(x2) -> int | None:
    """M of an [M, K] activation when the graph fixed it (an int), None when it is symbolic."""
    m = x2.shape[0]
    return m if isinstance(m, int) else None


def _quantize_decomposition(x, fmt: str):
    return quant.quantize_activation(get_format(fmt), x, None)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """``mxpass::quantize`` (a user's graph may call it) -> ATen math, merged into Inductor's table.

    ``mxpass::linear`` and ``mxpass::moe`` are not here: ``lowering/nodes.py`` replaces their
    nodes before AOTAutograd runs."""
    import mxpass.ops  # noqa: F401  (defines the ops)

    return {torch.ops.mxpass.quantize.default: _quantize_decomposition}
