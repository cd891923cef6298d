"""Lowering mxpass op nodes before AOTAutograd: each becomes a call of a Python function.

AOTAutograd then traces that function like model code: activation quantization becomes
ATen ops, and a Triton kernel's ``triton_op`` is met by functionalization, which turns it
into kernel launches in Inductor's generated code. (As an entry of the decomposition table
the function would run below functionalization, and the triton_op would stay an opaque
op called from Python at every step — seen on the GPU.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx


def lower_op_nodes(gm: fx.GraphModule, op: torch._ops.OpOverload, fn: Callable,
                   scale_args: tuple[int, ...] = ()) -> int:
    """Replace every node calling ``op`` by a call of ``fn`` with the same arguments.

    Arguments at ``scale_args`` that are dtype views (an E8M0 scale viewed from its uint8
    graph input) are handed over as the uint8 storage itself: Inductor realises a dtype view
    of a graph input as a copy kernel, one per call and layer. Views left unused are erased
    (not ``eliminate_dead_code``: FX counts every call_method as pure, in-place ones included).
    """
    views: list[fx.Node] = []
    n = 0
    for node in gm.graph.find_nodes(op="call_function", target=op):
        node.target = fn
        args = list(node.args)
        for i in scale_args:
            s = args[i]
            if isinstance(s, fx.Node) and s.op == "call_function" and s.target is torch.ops.aten.view.dtype:
                args[i] = s.args[0]
                views.append(s)
        node.args = tuple(args)
        n += 1
    for v in dict.fromkeys(views):
        if not v.users:
            gm.graph.erase_node(v)
    gm.recompile()
    return n


def lower_mxpass_nodes(gm: fx.GraphModule) -> int:
    """Lower every ``mxpass::linear`` and ``mxpass::moe`` node of ``gm``."""
    from mxpass.lowering.linear import linear_lowered
    from mxpass.lowering.moe import moe_lowered

    return (lower_op_nodes(gm, torch.ops.mxpass.linear.default, linear_lowered, scale_args=(2,))
            + lower_op_nodes(gm, torch.ops.mxpass.moe.default, moe_lowered, scale_args=(4, 6)))
