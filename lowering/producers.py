"""Activation quantization in one pass for the inputs Inductor serves worst.

- The SiLU*mul of a SwiGLU down projection: Inductor fuses a per-token quantization into
  the SiLU*mul kernel, but that kernel reads gate and up twice when the row is longer than
  its persistent reductions (amax pass, then quantize pass) and spends its time on
  instructions: on an H200 at 4096 x 14336 it took 186 us against 86 us for SiLU*mul alone.
  ``mxpass::act_quant_triton`` does SiLU*mul and the quantization in one read.
- An attention output (cuDNN / flash SDPA, reached through views, transposes and contiguous
  copies): no Inductor kernel to fuse into, so its quantization was a kernel of its own
  (34 us for 4096 x 4096, where moving the bytes takes ~12).
- Every input of a format with 1 x 128 activation groups (fp8-block): Inductor splits an
  RMSNorm (a row reduction) from the group reductions after it and re-reads the row.
- Every MXFP8 input: Inductor's code for the block exponents, the e8m0 scales (an ATen cast:
  its Triton backend has no e8m0 type) and the elements is three launches after the
  producer's kernel (an HF Llama decode step on H200: 17 inputs, ~3.6 us each).

``fuse_input_quantization`` runs on the graph after the mxpass passes, before lowering: such
an ``mxpass::linear`` node becomes a call of :func:`linear_on_input` on the output of one
:func:`quantize_input` per distinct input (shared by q/k/v, by gate/up), when the format's
activation is one act_quant_triton encodes and the registry's kernel for the layer takes
the activation quantized (``run_quantized``: codes and scales) or, for MXFP8,
fake-quantized (``run_fake``: the dequantized values in the model dtype, by
``mxpass::mx_fake_quant_triton``, the same kernel storing what it would dequantize to;
MXFP8 at large M runs on dequantized weights). Every other input keeps the ATen math that
Inductor fuses into its producer (an RMSNorm with per-token scales: one kernel). The
report says which layers take this path and, for the other such inputs, why not.
Measurements: docs/performance.md.
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
from mxpass.passes import node_value
from mxpass.report import Report

KERNEL = "act_quant_triton"
_SILU = (torch.nn.functional.silu, torch.ops.aten.silu.default)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
_ATTENTION = (torch.nn.functional.scaled_dot_product_attention,)
_VIEW_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "flatten")
_VIEW_FUNCTIONS = (torch.reshape, torch.transpose, torch.permute, torch.flatten)


def fusion_problem(problem: Problem, choice: Choice) -> str | None:
    """None when act_quant_triton quantizes the input of ``problem``, else why not."""
    if problem.fmt.activation is None:
        return f"{problem.fmt.name} keeps activations unquantized"
    if problem.device.type != "cuda":
        return f"runs on CUDA, device is {problem.device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    mode = input_mode(problem, choice)
    if mode is None:
        if hasattr(choice.kernel, "run_fake"):
            return f"{choice.kernel.name} takes the activation fake-quantized (act_quant_triton fake-quantizes MXFP8 only)"
        return f"{choice.kernel.name} quantizes its activation itself"
    if problem.m is None and mode == "quantized":
        # torch 2.11's Inductor fails to decompose act_quant_triton's call when its buffers
        # have symbolic sizes (an assertion in decompose_triton_kernel_wrapper_functional,
        # seen on an HF Llama compiled with dynamic=True): a dynamic M keeps Inductor's
        # quantization. mx_fake_quant_triton (one output, x's shape) compiles with a
        # symbolic M (tests/gpu/test_act_quant.py, the MoE tests).
        return "M is dynamic in this graph (Inductor cannot yet decompose the kernel call with symbolic sizes)"
    from mxpass.kernels.triton.act_quant import supports

    ok, reason = supports(problem.fmt, problem.k, problem.dtype)
    return None if ok else reason


def input_mode(problem: Problem, choice: Choice) -> str | None:
    """"quantized" when the layer's kernel takes codes and scales (``run_quantized``), "fake"
    when it takes an MXFP8 activation quantize-dequantized (``run_fake``), else None."""
    if hasattr(choice.kernel, "run_quantized"):
        return "quantized"
    if hasattr(choice.kernel, "run_fake") and problem.fmt.family == "mxfp8":
        return "fake"
    return None


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


def _from_attention(x: fx.Node) -> bool:
    """``x`` is an attention output, seen through views, transposes and contiguous copies."""
    while True:
        if x.op == "call_function" and x.target in _ATTENTION:
            return True
        if (x.op == "call_method" and x.target in _VIEW_METHODS) or (
                x.op == "call_function" and x.target in _VIEW_FUNCTIONS):
            if not isinstance(x.args[0], fx.Node):
                return False
            x = x.args[0]
            continue
        return False


def _source(x: fx.Node, fmt) -> tuple[fx.Node, fx.Node | None, str] | None:
    """(x or gate, up or None, what) when the input ``x`` of a ``fmt`` linear goes to act_quant_triton."""
    pair = _silu_mul(x)
    if pair is not None and len(x.users) == 1:
        return pair[0], pair[1], "silu*mul"
    if _from_attention(x):
        return x, None, "attention output"
    if fmt.activation == "group":
        # 1 x 128 groups: Inductor splits an RMSNorm (row reduction) from the group
        # reductions after it, and its group kernels ran at a third of copy speed
        return x, None, "activation"
    if fmt.family == "mxfp8":
        # MX blocks: Inductor's code is three launches per input (block exponents, an ATen
        # cast of the scales to e8m0, the elements) after the producer's kernel
        return x, None, "activation"
    return None


def fuse_input_quantization(gm: fx.GraphModule, report: Report) -> int:
    """Rewrite the ``mxpass::linear`` nodes whose inputs act_quant_triton quantizes (module
    docstring): one quantization per distinct input, shared by the linears that read it
    (q/k/v, gate/up). Returns how many linears were rewritten."""
    n_fused = 0
    shared: dict[tuple, tuple[fx.Node, fx.Node]] = {}
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.mxpass.linear.default]:
        x, qweight, wscale, bias, act_scale, fmt_name = node.args
        fmt = get_format(fmt_name)
        found = _source(x, fmt) if isinstance(x, fx.Node) else None
        if found is None:
            continue
        src, up, what = found
        g, w, u = node_value(src), node_value(qweight), None if up is None else node_value(up)
        if g is None or w is None or (up is not None and (u is None or u.shape != g.shape or u.dtype != g.dtype)):
            continue
        k = w.shape[1]
        rows = g.shape[:-1]
        m = math.prod(rows) if all(isinstance(r, int) for r in rows) else None
        problem = Problem("linear", fmt, g.device, k, w.shape[0], g.dtype, m)
        choice = choose(problem)
        why_not = fusion_problem(problem, choice)
        mode = input_mode(problem, choice)
        done = "fake-quantized" if mode == "fake" else "quantized"
        note = f"input {what} {done} by {KERNEL}" if why_not is None else (
            f"input {what} quantized in Inductor's kernel ({KERNEL}: {why_not})")
        for i in node.meta.get("mxpass_report_index", []):  # the layers this node computes
            report.rewritten[i] = dataclasses.replace(report.rewritten[i], input_quant=note)
        if why_not is not None:
            continue
        key = (src, up, fmt_name, mode)
        if key not in shared:
            with gm.graph.inserting_before(node):
                q = gm.graph.call_function(quantize_input, (src, up, k, fmt_name, mode))
                shared[key] = (gm.graph.call_function(operator.getitem, (q, 0)),
                               gm.graph.call_function(operator.getitem, (q, 1)))
        node.target = linear_on_input
        node.args = (*shared[key], src, qweight, wscale, bias, fmt_name, mode)
        if up is not None:
            silu = x.args[0] if x.args[1] is up else x.args[1]
            gm.graph.erase_node(x)
            if not silu.users:
                gm.graph.erase_node(silu)
        n_fused += 1
    gm.recompile()
    return n_fused


def quantize_input(x, up, k: int, fmt: str, mode: str = "quantized"):
    """(data [M, K], scale) of ``x`` [..., K], or of ``silu(x) * up``, by act_quant_triton;
    mode "fake": (the MXFP8 quantize-dequantized values [M, K] in x's dtype, None)."""
    from mxpass.kernels.triton import act_quant  # noqa: F401  (registers the ops)

    x2 = x.reshape(-1, k)
    u2 = None if up is None else up.reshape(-1, k)
    x2, u2 = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x2, u2))
    if mode == "fake":
        return torch.ops.mxpass.mx_fake_quant_triton(x2, u2), None
    return torch.ops.mxpass.act_quant_triton(x2, u2, fmt)


def linear_on_input(xq, xs, x, qweight, wscale, bias, fmt: str, mode: str = "quantized"):
    """``mxpass::linear(x, ...)`` on the input ``quantize_input`` gave in ``mode`` (``x``: for
    the output's leading dimensions and dtype)."""
    f = get_format(fmt)
    n, k = qweight.shape
    problem = Problem("linear", f, x.device, k, n, x.dtype, static_rows(xq))
    choice = choose(problem)
    why_not = fusion_problem(problem, choice)
    if why_not is None and input_mode(problem, choice) != mode:
        why_not = f"{choice.kernel.name} does not take it {mode}"
    if why_not is not None:  # the pass checked the same problem
        raise RuntimeError(f"mxpass: the input of a {fmt} linear cannot be quantized by {KERNEL}: {why_not}")
    if mode == "fake":
        y = choice.kernel.run_fake(xq, qweight, wscale, bias, f)
    else:
        y = choice.kernel.run_quantized(xq, xs, qweight, wscale, bias, f, x.dtype)
    return y.reshape(*x.shape[:-1], n)
