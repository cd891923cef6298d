"""Lowering of ``mxpass::linear`` for Inductor.

Each ``mxpass::linear`` node becomes a call of :func:`linear_lowered` before AOTAutograd
traces the graph: the activation quantization written as ATen math (so it fuses into the
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
    choice = choose(Problem("linear", f, x.device, k, n, x.dtype))
    y = choice.kernel.run(x.reshape(-1, k), qweight, wscale, bias, act_scale, f)
    return y.reshape(*x.shape[:-1], n)


def lower_linear_nodes(gm: torch.fx.GraphModule) -> int:
    """Replace every ``mxpass::linear`` node by a call of :func:`linear_lowered`.

    AOTAutograd then traces that Python function like model code: the activation
    quantization becomes ATen ops, and a Triton kernel's ``triton_op`` is met by
    functionalization, which turns it into kernel launches in Inductor's generated code. (As
    an entry of the decomposition table it would run below functionalization, and the
    triton_op would stay an opaque op called from Python at every step.)
    """
    n = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.mxpass.linear.default):
        node.target = linear_lowered
        x, qweight, wscale, *rest = node.args
        if wscale.op == "call_function" and wscale.target is torch.ops.aten.view.dtype:
            # hand the kernel the scale's uint8 storage: Inductor realises a dtype view of a
            # graph input as a copy kernel, one per call and layer
            node.args = (x, qweight, wscale.args[0], *rest)
            if not wscale.users:
                gm.graph.erase_node(wscale)
        n += 1
    gm.recompile()
    return n


def _quantize_decomposition(x, fmt: str):
    return quant.quantize_activation(get_format(fmt), x, None)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """mxpass ops -> decompositions, for graphs that still hold them (merged into Inductor's table)."""
    import mxpass.ops  # noqa: F401  (defines the ops)

    return {
        torch.ops.mxpass.linear.default: linear_lowered,
        torch.ops.mxpass.quantize.default: _quantize_decomposition,
    }
