"""Pass: linear uses of 2-D weight Parameters -> ``mxpass::linear``.

Matches, in the graph Dynamo captured (torch-level ops):
  F.linear(x, W[N,K], b)                       layout NK
  torch.addmm(b, x, W[K,N])  (GPT-2 Conv1D)    layout KN
  torch.matmul(x, W[K,N]) / x @ W              layout KN
  and the last two with W.t() / W.T             layout NK
where W is a placeholder whose example input is an ``nn.Parameter`` (Dynamo passes the
real Parameter objects, which gives identity for the weight cache and the module path).

Each quantized weight enters the graph as two new placeholders (data, scale) marked as
static inputs, so Inductor and CUDA graphs treat them like parameters: no per-call copies.
Every candidate ends in the report, rewritten or kept with its reason. Layers that read the
same input are then merged into one GEMM (``mxpass/passes/merge.py``).
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from mxpass.config import QuantConfig
from mxpass.formats import ACTIVATION_DTYPES, Format, get_format
from mxpass.passes import target_name
from mxpass.passes.inputs import StaticInputs, by_name
from mxpass.passes.merge import Layer, merge_siblings
from mxpass.report import Kept, Report, Rewritten
from mxpass.weights import (kept_reason, prequantized_input_scale, prequantized_scheme,
                            quantized_weight, record_input_scale)

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {torch.matmul, operator.matmul}
_ROUTER_NAMES = {"gate", "router"}

# chooser(fmt, device, k, n, activation dtype, m=static rows or None) -> description of the kernel picked
KernelChooser = Callable[..., str]


@dataclass
class LinearMatch:
    node: fx.Node
    x: fx.Node
    weight: fx.Node           # the placeholder
    bias: fx.Node | None
    param: torch.nn.Parameter
    transposed: bool          # param is stored [K, N]
    form: str                 # linear / addmm / matmul
    w_arg: fx.Node            # the weight operand as the node used it (W, or a W.t() view)

    @property
    def n_k(self) -> tuple[int, int]:
        n, k = self.param.shape
        return (k, n) if self.transposed else (n, k)


def _dotted(name: str) -> str:
    """"L['self']._modules['model'].layers[0]" -> "model.layers.0"."""
    body = name[name.find("]") + 1:] if name.startswith(("L[", "G[")) else name
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.(\w+)|\[(\d+)\]|\['([^']*)'\]", body)
    path = [a or b or c or d for a, b, c, d in parts]
    if path:
        return ".".join(path)
    return "" if re.fullmatch(r"[LG]\['\w+'\]", name) else name  # the compiled module itself


def source_fqn(node: fx.Node) -> str:
    """Dotted path of a placeholder from its Dynamo source ("model.layers.0.q_proj.weight")."""
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        return node.name
    name = source.name
    return _dotted(name() if callable(name) else name)


def layer_fqn(m: "LinearMatch") -> str:
    """Module path of the layer: the innermost module that made the call (nn_module_stack),
    else the weight's path without ``.weight`` (a tied lm_head reports as ``lm_head``)."""
    stack = m.node.meta.get("nn_module_stack")
    if stack:
        path, _cls = list(stack.values())[-1]
        return _dotted(path)
    fqn = source_fqn(m.weight)
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def _weight_operand(arg) -> tuple[fx.Node | None, bool]:
    """(placeholder, is_transposed_view) for W or W.t()/W.T/W.transpose(0, 1)."""
    if not isinstance(arg, fx.Node):
        return None, False
    if arg.op == "placeholder":
        return arg, False
    t_method = arg.op == "call_method" and arg.target in ("t", "transpose")
    t_fn = arg.op == "call_function" and arg.target in (torch.t, torch.transpose)
    t_attr = arg.op == "call_function" and arg.target is getattr and arg.args[1:] == ("T",)
    if (t_method or t_fn or t_attr) and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "placeholder":
        dims = tuple(arg.args[1:]) if not t_attr else ()
        if dims in ((), (0, 1), (1, 0), (-1, -2), (-2, -1)):
            return arg.args[0], True
    return None, False


def find_linears(gm: fx.GraphModule, inputs: dict[fx.Node, object]) -> list[LinearMatch]:
    matches = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _LINEAR:
            x, w_arg = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            form, base_t = "linear", False
        elif node.target is torch.addmm and not node.kwargs:
            bias, x, w_arg = node.args[:3]
            form, base_t = "addmm", True
            if len(node.args) > 3:
                continue  # beta/alpha given: not a plain linear
        elif node.target in _MATMUL:
            x, w_arg = node.args[:2]
            bias, form, base_t = None, "matmul", True
        else:
            continue
        w, t_view = _weight_operand(w_arg)
        if w is None or not isinstance(x, fx.Node):
            continue
        param = inputs.get(w)
        if not isinstance(param, torch.nn.Parameter) or param.dim() != 2:
            continue
        if bias is not None and not isinstance(bias, fx.Node):
            continue
        matches.append(LinearMatch(node, x, w, bias, param, base_t != t_view, form, w_arg))
    return matches


def keep_reason(fqn: str, n: int, k: int, fmt: Format, config: QuantConfig, tied: bool) -> str | None:
    """Why an ordinary [N, K] weight at module path ``fqn`` stays in the model dtype under
    ``fmt``, or None to quantize it (``tied``: it is also an embedding's weight).

    The rules every quantizer of mxpass applies (the pass, ``mxpass.load(..., scheme=)``,
    ``mxpass.save(..., scheme=)``): ignore patterns, lm_head, router gates, K not a
    multiple of the format's block."""
    leaf = fqn.rsplit(".", 1)[-1]
    pattern = config.ignored_by(fqn)
    if pattern is not None:
        return f"ignored by {pattern!r}"
    if (leaf == "lm_head" or tied) and not config.quantize_lm_head:
        return "output embedding (lm_head) stays in the model dtype"
    if leaf in _ROUTER_NAMES or "router" in fqn.split("."):  # DBRX: ffn.router.layer
        return "router gate stays in the model dtype"
    multiple = fmt.k_multiple()
    if k % multiple:
        what = "block size" if fmt.family == "mxfp8" else "activation group size"
        return f"K={k} is not a multiple of {multiple} ({fmt.name} {what})"
    return None


def layer_format(param: torch.Tensor, fqn: str, n: int, k: int, config: QuantConfig,
                 tied: bool) -> tuple[Format | None, str | None]:
    """(format, None) to quantize the layer, or (None, why it is kept).

    A weight loaded quantized (a stand-in) uses the format it was stored in; it cannot be
    kept (it has no data in the model dtype) nor requantized, so either is an error. With
    no scheme asked for, a Linear the load left in the model dtype is kept with the load's
    reason; everything else follows :func:`keep_reason` under ``config.format``.
    """
    stored = prequantized_scheme(param)
    if stored is not None:
        if config.explicit and config.scheme != stored:
            raise ValueError(
                f"mxpass: layer {fqn} was loaded quantized from a checkpoint as {stored!r} and has "
                f"no data of its own; compile with scheme={stored!r} or with no scheme "
                f"(asked for {config.scheme!r})")
        fmt = get_format(stored)
        pattern = config.ignored_by(fqn)
        reason = f"ignored by {pattern!r}" if pattern else None
        if reason is None and k % fmt.k_multiple():
            reason = f"K={k} is not a multiple of {fmt.k_multiple()} ({fmt.name})"
        if reason is not None:
            raise ValueError(
                f"mxpass: layer {fqn} was loaded quantized from a checkpoint ({stored}) but would be "
                f"kept unquantized ({reason}); its weight is a stand-in with no data, so it cannot "
                "run in the model dtype")
        return fmt, None
    if not config.explicit and kept_reason(param) is not None:
        return None, kept_reason(param)
    reason = keep_reason(fqn, n, k, config.format, config, tied)
    return (None, reason) if reason is not None else (config.format, None)


def _check_dtypes(fqn: str, m: LinearMatch) -> torch.dtype:
    x_val = m.x.meta.get("example_value")
    x_dtype = x_val.dtype if x_val is not None else m.param.dtype
    for what, dtype in (("weight", m.param.dtype), ("activation", x_dtype)):
        if dtype not in ACTIVATION_DTYPES:
            raise TypeError(
                f"mxpass: layer {fqn}: {what} dtype {dtype} is not supported "
                f"(expected one of {', '.join(str(d) for d in ACTIVATION_DTYPES)})"
            )
    return x_dtype


def _static_rows(x: fx.Node, k: int) -> int | None:
    """Rows of the layer's activation seen as [M, K] when the graph fixed them, else None."""
    val = x.meta.get("example_value")
    if val is None:
        return None
    numel = val.numel()
    return numel // k if isinstance(numel, int) and k else None


def _stored_input_scale(param: torch.Tensor, fmt: Format, what: str) -> torch.Tensor:
    """The static activation scale a checkpoint stored with ``param``, as the op takes it
    (recorded for ``mxpass.save``)."""
    value = prequantized_input_scale(param)
    if value is None:
        raise ValueError(f"mxpass: {what}: the weights of this call were loaded with none")
    record_input_scale(param, fmt, value)
    return torch.tensor([value], dtype=torch.float32, device=param.device)


# a router has one output per expert; an lm_head whose logits a compiled sampler feeds to topk
# has one per vocabulary entry and is not a router
_ROUTER_MAX_N = 1024
# what a router's logits pass through on their way to topk (casts, views, softmax / sigmoid,
# a bias or a scale)
_ROUTE_STEPS = {"softmax", "sigmoid", "log_softmax", "float", "to", "type", "view", "reshape", "flatten",
                "squeeze", "unsqueeze", "contiguous", "add", "mul", "div", "sub", "__add__", "__mul__",
                "__truediv__", "__sub__", "add_", "mul_", "div_", "_softmax", "type_as"}


def feeds_topk(node: fx.Node, depth: int = 8) -> bool:
    """Whether ``node``'s value reaches a ``topk`` through the steps a router takes (whatever
    the layer is called: a router is found by what its output does)."""
    todo, seen = [(node, 0)], set()
    while todo:
        cur, d = todo.pop()
        for user in cur.users:
            name = target_name(user)
            if name == "topk":
                return True
            if user not in seen and d < depth and user.op in ("call_function", "call_method") and name in _ROUTE_STEPS:
                seen.add(user)
                todo.append((user, d + 1))
    return False


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase these (pure view) nodes if nothing uses them any more.

    Not ``graph.eliminate_dead_code()``: FX treats every call_method as pure, so it would
    also delete an in-place ``out.add_(bias)`` whose result is unused (seen: GPT-OSS's
    expert biases vanished)."""
    for node in dict.fromkeys(nodes):
        if node.op != "placeholder" and not node.users:
            graph.erase_node(node)


def rewrite_linears(
    gm: fx.GraphModule,
    example_inputs: list,
    config: QuantConfig,
    report: Report,
    choose_kernel: KernelChooser,
) -> StaticInputs:
    """Rewrite matched linears in place; returns the new placeholders and their tensors."""
    inputs = dict(zip(gm.graph.find_nodes(op="placeholder"), example_inputs))
    matches = find_linears(gm, inputs)
    embedded = {n.args[1] for n in gm.graph.nodes
                if n.op == "call_function" and n.target is torch.nn.functional.embedding}
    used_patterns: set[str] = set()
    new_nodes: dict[tuple[int, bool, str], tuple[fx.Node, fx.Node]] = {}
    static = StaticInputs(gm, example_inputs)

    dead_candidates: list[fx.Node] = []  # W.t() views the rewrite may leave unused
    replaced: dict[fx.Node, fx.Node] = {}
    layers: list[Layer] = []
    for m in matches:
        fqn = layer_fqn(m)
        n, k = m.n_k
        if config.ignored_by(fqn):
            used_patterns.add(config.ignored_by(fqn))
        fmt, reason = layer_format(m.param, fqn, n, k, config, tied=m.weight in embedded)
        if (reason is None and n <= _ROUTER_MAX_N and fqn.rsplit(".", 1)[-1] != "lm_head"
                and prequantized_scheme(m.param) is None and feeds_topk(m.node)):
            reason = "router gate (its output selects experts through topk) stays in the model dtype"
        if reason is not None:
            report.kept.append(Kept(fqn, reason))
            continue
        x_dtype = _check_dtypes(fqn, m)
        rows = _static_rows(m.x, k)
        kernel = choose_kernel(fmt, m.param.device, k, n, x_dtype, m=rows)
        key = (id(m.param), m.transposed, fmt.name)
        if key not in new_nodes:
            derive = functools.partial(quantized_weight, fmt=fmt, transposed=m.transposed, name=fqn)
            data, scale = derive(m.param)
            new_nodes[key] = static.weight(f"mxpass_{m.weight.name}", data, scale, m.node, (m.param,), derive,
                                           f"layer {fqn}")
        act = None
        if fmt.static_activation:
            value = config.activation_scale(fqn)
            what = f"layer {fqn}: the static activation scale"
            if value is not None:  # given by name
                record_input_scale(m.param, fmt, value)  # for mxpass.save
                scale_t = torch.tensor([value], dtype=torch.float32, device=m.param.device)
                derive_scale = by_name(scale_t, m.param, what)
            elif prequantized_input_scale(m.param) is not None:  # stored with a loaded weight
                derive_scale = functools.partial(_stored_input_scale, fmt=fmt, what=what)
                scale_t = derive_scale(m.param)
            else:
                raise ValueError(
                    f"mxpass: layer {fqn}: scheme {fmt.name!r} quantizes activations with a static "
                    f"per-tensor scale and none was given (pass activation_scales={{{fqn!r}: s}} "
                    f"to mxpass.backend, or use a dynamic scheme)")
            act = static.add(f"mxpass_{m.weight.name}_act_scale", scale_t, (m.param,), derive_scale, what)
        qw, ws = new_nodes[key]
        # an earlier rewrite may have replaced this layer's input (linear -> linear)
        x, bias = replaced.get(m.x, m.x), replaced.get(m.bias, m.bias)
        with gm.graph.inserting_before(m.node):
            new = gm.graph.call_function(
                torch.ops.mxpass.linear.default, (x, qw, ws, bias, act, fmt.name))
        new.meta.update({k_: v for k_, v in m.node.meta.items() if k_ != "source_fn_stack"})
        new.meta["mxpass_report_index"] = [len(report.rewritten)]  # a merged node has several
        m.node.replace_all_uses_with(new)
        gm.graph.erase_node(m.node)
        replaced[m.node] = new
        dead_candidates.append(m.w_arg)
        b_val = inputs.get(bias) if isinstance(bias, fx.Node) and bias.op == "placeholder" else None
        layers.append(Layer(new, m.param, m.transposed, fqn, len(report.rewritten),
                            b_val if isinstance(b_val, torch.Tensor) else None, x_dtype, rows))
        report.rewritten.append(Rewritten(fqn, m.form, fmt.name, kernel, (n, k)))

    for pattern in config.ignore:
        if pattern not in used_patterns:
            report.warnings.append(f"ignore pattern {pattern!r} matched no linear layer in this graph")
    _erase_unused(gm.graph, dead_candidates)
    merge_siblings(gm, static, layers, report, choose_kernel, enabled=config.merge)
    gm.graph.lint()
    gm.recompile()
    return static
