"""Activation quantization fused with the SiLU*mul that produces it (SwiGLU down projections).

Inductor fuses the ATen math of a per-token quantization into the SiLU*mul kernel before it,
but that kernel reads gate and up twice when the row is longer than its persistent
reductions (amax pass, then quantize pass) and emulates the dtype roundings with ~25 integer
instructions per element: on an H200 at 4096 x 14336 it took 186 us against 86 us for
SiLU*mul alone (docs/performance.md). ``mxpass::act_quant_triton`` does both in one pass at
the rate of SiLU*mul alone.

``fuse_silu_mul_inputs`` runs on the graph after the mxpass passes, before lowering: an
``mxpass::linear`` node whose input is ``silu(gate) * up`` (either operand order; the
product used only by that linear) becomes a call of :func:`linear_silu_mul_lowered`, when the
format's activation is one act_quant_triton encodes and the registry's kernel for the
layer takes a quantized activation (``run_quantized``). The report says which layers take
this path and, for the other SiLU*mul inputs, why not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import operator

import torch
import torch.fx as fx

from mxpass.formats import get_format
from mxpass.lowering.linear import static_rows
from mxpass.lowering.registry import Choice, Problem, choose
from mxpass.report import Report

KERNEL = "act_quant_triton"
_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def fusion_problem(problem: Problem, choice: Choice) -> str | None:
    """None when the input of ``problem`` (a SiLU*mul) is quantized by act_quant_triton, else why not."""
    if problem.fmt.activation is None:
        return f"{problem.fmt.name} keeps activations unquantized"
    if problem.device.type != "cuda":
        return f"runs on CUDA, device is {problem.device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not hasattr(choice.kernel, "run_quantized"):
        return f"{choice.kernel.name} takes the activation unquantized or fake-quantized"
    from mxpass.kernels.triton.act_quant import supports

    ok, reason = supports(problem.fmt, problem.k, problem.dtype)
    return None if ok else reason


def _silu_mul(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(gate, up) when ``x`` is ``silu(gate) * up`` or ``up * silu(gate)``."""
    if x.op == "call_method" and x.target == "mul":
        pass
    elif not (x.op == "call_function" and x.target in _MUL):
        return None
    if len(x.args) != 2 or x.kwargs:
        return None
    for a, b in (x.args, x.args[::-1]):
        if (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == "call_function" and a.target in _SILU
                and len(a.args) == 1 and not a.kwargs.get("inplace", False)):
            return a.args[0], b
    return None


def _value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def fuse_silu_mul_inputs(gm: fx.GraphModule, report: Report) -> int:
    """Rewrite the ``mxpass::linear`` nodes fed by a SiLU*mul (module docstring); returns how many."""
    n_fused = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.mxpass.linear.default)):
        x, qweight, wscale, bias, act_scale, fmt_name = node.args
        pair = _silu_mul(x) if isinstance(x, fx.Node) else None
        if pair is None or len(x.users) != 1:
            continue
        gate, up = pair
        g, u, w = _value(gate), _value(up), _value(qweight)
        if g is None or u is None or w is None or g.shape != u.shape or g.dtype != u.dtype:
            continue
        fmt = get_format(fmt_name)
        k = w.shape[1]
        rows = g.shape[:-1]
        m = math.prod(rows) if all(isinstance(r, int) for r in rows) else None
        problem = Problem("linear", fmt, g.device, k, w.shape[0], g.dtype, m)
        why_not = fusion_problem(problem, choose(problem))
        index = node.meta.get("mxpass_report_index")
        if index is not None:
            entry = report.rewritten[index]
            note = f"input silu*mul quantized by {KERNEL}" if why_not is None else (
                f"input silu*mul quantized in Inductor's kernel ({KERNEL}: {why_not})")
            report.rewritten[index] = dataclasses.replace(entry, input_quant=note)
        if why_not is not None:
            continue
        node.target = linear_silu_mul_lowered
        node.args = (gate, up, qweight, wscale, bias, act_scale, fmt_name)
        silu = x.args[0] if x.args[1] is up else x.args[1]
        gm.graph.erase_node(x)
        if not silu.users:
            gm.graph.erase_node(silu)
        n_fused += 1
    gm.recompile()
    return n_fused


def linear_silu_mul_lowered(gate, up, qweight, wscale, bias, act_scale, fmt: str):
    """``mxpass::linear(silu(gate) * up, ...)`` with the input quantized by act_quant_triton."""
    from mxpass.kernels.triton import act_quant  # noqa: F401  (registers the op)

    f = get_format(fmt)
    n, k = qweight.shape
    g2, u2 = gate.reshape(-1, k), up.reshape(-1, k)
    problem = Problem("linear", f, gate.device, k, n, gate.dtype, static_rows(g2))
    choice = choose(problem)
    why_not = fusion_problem(problem, choice)
    if why_not is not None:  # the pass checked the same problem
        raise RuntimeError(f"mxpass: SiLU*mul input of a {fmt} linear cannot be fused: {why_not}")
    xq, xs = torch.ops.mxpass.act_quant_triton(g2, u2, f.name)
    y = choice.kernel.run_quantized(xq, xs, qweight, wscale, bias, f, gate.dtype)
    return y.reshape(*gate.shape[:-1], n)
