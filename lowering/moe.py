"""Lowering of ``mxpass::moe`` for Inductor: the reference math, traced into the graph.

Each ``mxpass::moe`` node becomes a call of :func:`moe_lowered` before AOTAutograd traces
the graph (as ``lowering/linear.py`` does for linears): per-expert dequantization, the
activation quantization of both expert inputs, two batched fp32 matmuls over all experts
and a gather of each token's A results, all ATen ops that Inductor compiles and fuses. No
kernel registry entry yet: this is the CPU path; GPU MoE kernels will be registry candidates.
Routing ids outside [0, E) hit the bounds check Inductor generates for the gather.
"""

from __future__ import annotations

from typing import Callable

import torch

from mxpass.formats import get_format
from mxpass.ops import moe_reference


def moe_lowered(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: str, activation: str):
    """What an ``mxpass::moe`` node becomes; an MX scale may be its uint8 storage."""
    return moe_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, get_format(fmt), activation)


def lower_moe_nodes(gm: torch.fx.GraphModule) -> int:
    """Replace every ``mxpass::moe`` node by a call of :func:`moe_lowered`."""
    n = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.mxpass.moe.default):
        node.target = moe_lowered
        args = list(node.args)
        views = []
        for i in (4, 6):  # the scales: hand over an E8M0 scale's uint8 storage, not a view
            s = args[i]
            if isinstance(s, torch.fx.Node) and s.op == "call_function" and s.target is torch.ops.aten.view.dtype:
                args[i] = s.args[0]
                views.append(s)
        node.args = tuple(args)
        for v in views:
            if not v.users:
                gm.graph.erase_node(v)
        n += 1
    # (not eliminate_dead_code: FX counts every call_method as pure, in-place ones included)
    gm.recompile()
    return n


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """``mxpass::moe`` -> its lowering, for graphs that still hold the op."""
    import mxpass.ops  # noqa: F401  (defines the op)

    return {torch.ops.mxpass.moe.default: moe_lowered}
