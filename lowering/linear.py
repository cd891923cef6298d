"""Lowering of ``mxpass::linear`` for Inductor.

Inductor receives a decomposition: the activation quantization written as ATen math (so
it fuses into the kernel that produced the activation: an RMSNorm, a SiLU*mul) followed by
one call of the kernel the registry picked. A Triton kernel is a ``torch.library.triton_op``,
which Inductor traces into and launches from its generated code.
"""

from __future__ import annotations

from typing import Callable

import torch

from mxpass.formats import get_format
from mxpass.lowering.registry import Problem, choose
from mxpass.schemes import mxfp8


def _linear_decomposition(x, qweight, wscale, bias, fmt: str):
    f = get_format(fmt)
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if not f.weight_only:
        x2 = mxfp8.fake_quantize(x2)
    choice = choose(Problem("linear", f, x.device, k, n, x.dtype))
    y = choice.kernel.run(x2, qweight, wscale, bias, f)
    return y.reshape(*x.shape[:-1], n)


def _quantize_decomposition(x, fmt: str):
    get_format(fmt)
    q = mxfp8.quantize(x)
    return q.data, q.scale


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """mxpass ops -> their Inductor decompositions (merged into Inductor's own table)."""
    import mxpass.ops  # noqa: F401  (defines the ops)

    return {
        torch.ops.mxpass.linear.default: _linear_decomposition,
        torch.ops.mxpass.quantize.default: _quantize_decomposition,
    }
