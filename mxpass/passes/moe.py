"""Pass: the experts of each Mixture-of-Experts layer -> one ``mxpass::moe``.

Shape legend: T tokens, E experts, A active experts per token, H hidden, I expert intermediate.

transformers v5 keeps a MoE layer's experts in one module holding 3-D Parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), called as
``experts(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A]) -> [T, H]``; its
forward dispatches to the implementation that ``config._experts_implementation`` names
(transformers' switch: ``model.set_experts_implementation(...)``). The "eager" loop does not
trace (``nonzero``, then a loop over its data-dependent length); "grouped_mm", transformers'
default, and "batched_mm" trace into one graph. Without fullgraph, Dynamo leaves the eager
loop to Python: the experts' weights then reach no graph and no backend sees them. Hence
:func:`use_grouped_mm`, which selects grouped_mm through that switch (``mxpass.compile(model)``
calls it; with ``torch.compile(model, backend=mxpass.backend)`` call it first, or rely on
transformers' default).

Per experts module in Dynamo's graph:
  1. region: the call nodes whose ``nn_module_stack`` holds the module that owns the 3-D
     Parameters (Dynamo tags each node with the modules active when it was traced);
  2. interface: it reads hidden states [T, H], integer ids [T, A], weights [T, A], two 3-D
     Parameters shaped [E, 2I, H] and [E, H, I] (plus symbolic sizes), and one node of it,
     [T, H] in the hidden states' dtype, is read outside;
  3. meaning: the region, copied into its own graph, runs on random inputs with the real
     expert weights and is compared with the reference MoE (``mxpass.ops.experts_reference``)
     for every activation and gate/up layout mxpass implements; one must match;
  4. rewrite: per-expert quantized weights enter as static placeholders (as in the linear
     pass) and the region becomes one ``mxpass::moe`` node.
A module that fails a step is left as it is and reported as kept, with what failed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from mxpass.config import QuantConfig
from mxpass.formats import ACTIVATION_DTYPES, Format, get_format
from mxpass.ops import MOE_ACTIVATIONS, experts_reference
from mxpass.passes import target_name
from mxpass.passes.inputs import StaticInputs
from mxpass.passes.linear import _dotted, source_fqn
from mxpass.report import Kept, Report, Rewritten
from mxpass.weights import kept_reason, prequantized_scheme, quantized_experts

log = logging.getLogger("mxpass.passes.moe")

# Largest per-token relative error (L2 over H) at which the region and the reference are the
# same MoE. Both use the same unquantized weights: in fp32 they differ in summation order only
# (measured 3e-7, tiny Qwen3-MoE, torch 2.13 CPU); a bf16/fp16 region rounds gate/up, SiLU*up
# and the down output to the model dtype (measured 6e-3 in bf16). A wrong activation (GELU for
# SiLU) measured 0.2, a wrong gate/up layout 1.6 to 1.8, on the probe inputs below.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def _gate_up_rows(layout: str, inter: int) -> tuple[int, ...] | None:
    """Row order that brings a stored gate_up [2I, H] to [gate; up] (None: already so)."""
    if layout == "gate_up":  # transformers' default: chunk(2) -> gate, up
        return None
    if layout == "up_gate":
        return (*range(inter, 2 * inter), *range(inter))
    if layout == "interleaved":  # gate0, up0, gate1, up1, ... (is_concatenated=False)
        return (*range(0, 2 * inter, 2), *range(1, 2 * inter, 2))
    raise ValueError(f"unknown gate/up layout {layout!r}")


#: (activation, gate/up layout) pairs the op implements, tried in this order.
VARIANTS = tuple((act, layout) for act in MOE_ACTIVATIONS for layout in ("gate_up", "up_gate", "interleaved"))


@dataclass
class ExpertsRegion:
    fqn: str                      # module path of the experts module
    nodes: list[fx.Node]          # the region, in graph order
    inputs: list[fx.Node]         # nodes outside the region that it reads, in first-use order
    outputs: list[fx.Node]        # region nodes read outside it
    params: dict[fx.Node, torch.nn.Parameter]   # the module's 3-D Parameters, and every Parameter it reads


@dataclass
class Interface:
    x: fx.Node
    ids: fx.Node
    weights: fx.Node
    w13: fx.Node
    w2: fx.Node
    out: fx.Node


def _in_module(node: fx.Node, fqn: str) -> bool:
    if not fqn:  # the compiled module is the experts module: every node is in it
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(_dotted(path) == fqn for path, _cls in stack.values())


def find_experts_regions(gm: fx.GraphModule, inputs: dict[fx.Node, object]) -> list[ExpertsRegion]:
    """One region per experts module: a module owning two or more 3-D Parameters with the
    same E (a Conv1d, one 3-D weight, is not one) that this graph reads."""
    owners: dict[str, dict[fx.Node, torch.nn.Parameter]] = {}
    for ph, value in inputs.items():
        if isinstance(value, torch.nn.Parameter) and value.dim() == 3:
            fqn = source_fqn(ph)
            owners.setdefault(fqn.rpartition(".")[0], {})[ph] = value
    regions = []
    for fqn, params in owners.items():
        if len(params) < 2 or len({p.shape[0] for p in params.values()}) != 1:
            continue
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and _in_module(n, fqn)]
        members = set(nodes)
        ins: dict[fx.Node, None] = {}
        outs = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members:
                    ins.setdefault(a, None)
            if any(u not in members for u in n.users):
                outs.append(n)
        read = {a: inputs[a] for a in ins if isinstance(inputs.get(a), torch.nn.Parameter)}
        regions.append(ExpertsRegion(fqn, nodes, list(ins), outs, {**params, **read}))
    return regions


def _value(node: fx.Node):
    return node.meta.get("example_value")


def _is_float_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _weight_roles(region: ExpertsRegion, params: list[fx.Node]):
    """(w13, w2) for each order of the two weights, or None where the shapes do not fit."""
    for w13, w2 in (params, params[::-1]):
        e, two_i, h = region.params[w13].shape
        fits = two_i % 2 == 0 and tuple(region.params[w2].shape) == (e, h, two_i // 2)
        yield (w13, w2) if fits else None


def _interface(region: ExpertsRegion) -> tuple[Interface | None, str]:
    """The region's inputs and output by role, or None and why it is not an experts call."""
    if not region.nodes:
        return None, "no computation of the experts module in this graph"

    def named(nodes, sep=", "):
        return sep.join(f"{source_fqn(p).rpartition('.')[2]} {list(region.params[p].shape)}" for p in nodes)

    params = [ph for ph in region.inputs if ph in region.params and region.params[ph].dim() == 3]
    extra = [ph for ph in region.inputs if ph in region.params and region.params[ph].dim() != 3]
    others = [a for a in region.inputs if a not in region.params and isinstance(_value(a), torch.Tensor)]
    problems = []
    if extra:
        problems.append(f"reads Parameters besides the expert weights ({named(extra)}); "
                        "mxpass::moe has no expert biases")
    if len(params) != 2:
        problems.append(f"reads {len(params)} 3-D expert weights ({named(params) or 'none'}); "
                        "mxpass::moe takes gate_up [E, 2I, H] and down [E, H, I]")
    elif not any(_weight_roles(region, params)):
        problems.append(f"expert weights {named(params, ' and ')} are not gate_up "
                        "[E, 2I, H] and down [E, H, I]")
    if problems:
        return None, "; ".join(problems)
    w13, w2 = next(r for r in _weight_roles(region, params) if r)
    e, two_i, h = region.params[w13].shape
    ids = [a for a in others if not _value(a).is_floating_point() and _value(a).dim() == 2]
    floats = [a for a in others if _is_float_tensor(_value(a)) and _value(a).dim() == 2]
    if len(ids) != 1 or len(others) != 3 or len(floats) != 2:
        shapes = ", ".join(f"{a.name} {_value(a).dtype} {list(_value(a).shape)}" for a in others)
        return None, (f"reads tensors {shapes}; expected hidden states [T, H], integer top-k ids [T, A] "
                      "and top-k weights [T, A]")
    ids = ids[0]
    a_dim = _value(ids).shape[1]
    roles = [(xa, wa) for xa, wa in (floats, floats[::-1])
             if _value(xa).shape[1] == h and _value(wa).shape[1] == a_dim]
    if len(roles) != 1:
        return None, f"cannot tell the hidden states [T, {h}] from the top-k weights [T, {a_dim}]"
    if len(region.outputs) != 1:
        return None, f"{len(region.outputs)} of its values are read outside the experts module (expected 1)"
    written = [n.name for n in region.nodes if n.args and n.args[0] in region.inputs and (
        n.op == "call_method" and n.target.endswith("_") or n.target is operator.setitem)]
    if written:
        return None, f"writes into one of its inputs in place ({', '.join(written)})"
    (x, weights), out = roles[0], region.outputs[0]
    xv, ov = _value(x), _value(out)
    if not isinstance(ov, torch.Tensor) or ov.dtype != xv.dtype or ov.dim() != 2 or ov.shape[1] != h:
        return None, f"its output is not [T, {h}] in the hidden states' dtype {xv.dtype}"
    return Interface(x, ids, weights, w13, w2, out), ""


def _hint(v):
    """A concrete int for a (possibly symbolic) size: the size seen while tracing. No guard."""
    if isinstance(v, torch.SymInt):
        hint = getattr(torch.fx.experimental.symbolic_shapes, "optimization_hint", None)
        return hint(v) if hint is not None else v.node.hint  # torch 2.11 has no optimization_hint
    return v


def _extract(gm: fx.GraphModule, region: ExpertsRegion, out: fx.Node) -> fx.GraphModule:
    """The region as a GraphModule taking ``region.inputs`` and returning ``out``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(a.name) for a in region.inputs}
    for n in region.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    return fx.GraphModule(torch.nn.Module(), graph)


def _probe_inputs(region: ExpertsRegion, itf: Interface) -> tuple[list, tuple[torch.Tensor, ...], list[int]]:
    """Random routing over a few experts (first, middle, last), hidden states scaled so the
    gate pre-activations of token t have a standard deviation of 2, 0.5, 8, 1, 4, 2, ... (the
    bend of the activation and any clamp both show), the real expert weights; symbolic sizes
    take their hints."""
    w13 = region.params[itf.w13]
    e, _, h = w13.shape
    t, a = (_hint(s) for s in _value(itf.ids).shape)
    gen = torch.Generator().manual_seed(0)
    used = sorted({0, e // 2, e - 1})
    ids = torch.tensor(used)[torch.randint(len(used), (t, a), generator=gen)].to(_value(itf.ids).dtype)
    weights = (torch.rand(t, a, generator=gen) + 0.1).to(_value(itf.weights).dtype)
    row_rms = max(float(w13[used].detach().float().norm(dim=-1).pow(2).mean().sqrt()), 1e-30)
    token_scale = 2.0 ** torch.tensor([1.0, -1.0, 3.0, 0.0, 2.0]).repeat(t // 5 + 1)[:t, None]
    x = (torch.randn(t, h, generator=gen) * token_scale / row_rms).to(_value(itf.x).dtype)
    probe = {itf.x: x, itf.ids: ids, itf.weights: weights}
    args = []
    for node in region.inputs:
        if node in probe:
            args.append(probe[node].to(w13.device))
        elif node in region.params:
            args.append(region.params[node])
        else:
            args.append(_hint(_value(node)))
    return args, (x.to(w13.device), ids.to(w13.device), weights.to(w13.device)), used


def _with_random_weights(region: ExpertsRegion) -> ExpertsRegion:
    """The region with each loaded stand-in (no data: ``mxpass.load``) replaced by random
    weights of its shape, dtype and device: the region's meaning does not depend on them."""
    gen = torch.Generator().manual_seed(0)

    def fill(p):
        if prequantized_scheme(p) is None:
            return p
        return (torch.randn(p.shape, generator=gen) * 0.02).to(dtype=p.dtype, device=p.device)

    return dataclasses.replace(region, params={k: fill(v) for k, v in region.params.items()})


def verify(gm: fx.GraphModule, region: ExpertsRegion, itf: Interface) -> tuple[tuple[str, str] | None, str]:
    """Run the region against the reference MoE; the matching (activation, layout), or why none."""
    region = _with_random_weights(region)
    w13, w2 = region.params[itf.w13], region.params[itf.w2]
    if w13.device.type == "meta" or w2.device.type == "meta":
        return None, "expert weights are on the meta device (nothing to verify against)"
    if any(n.op == "get_attr" for n in region.nodes):
        return None, "the region reads graph attributes (not a plain experts call)"
    if _hint(_value(itf.x).shape[0]) == 0:
        return None, "no tokens in this graph (T=0): nothing to verify the experts with"
    sub = _extract(gm, region, itf.out)
    args, (x, ids, weights), used = _probe_inputs(region, itf)
    inter = w2.shape[-1]
    with torch.no_grad(), torch._subclasses.fake_tensor.unset_fake_temporarily():
        try:
            got = sub(*args)
        except Exception as e:  # noqa: BLE001  (any failure means: not verifiable)
            return None, f"running the region on probe inputs failed: {type(e).__name__}: {e}"
        remap = torch.full((w13.shape[0],), -1, dtype=torch.long, device=ids.device)
        remap[used] = torch.arange(len(used), device=ids.device)
        errors = []
        for act, layout in VARIANTS:
            rows = _gate_up_rows(layout, inter)
            g13 = w13[used].detach()
            if rows is not None:
                g13 = g13[:, list(rows)]
            ref = experts_reference(x, remap[ids.long()], weights, g13, w2[used].detach(), act)
            norm = ref.float().norm(dim=-1)
            if not torch.isfinite(norm).all() or not (norm > 0).all():
                return None, "the reference gives a zero or non-finite output on the probe inputs"
            err = ((got.float() - ref.float()).norm(dim=-1) / norm).max().item()
            if err <= _TOLERANCE.get(x.dtype, 3e-2):
                return (act, layout), ""
            errors.append(f"{act}/{layout} {err:.2g}")
    return None, ("its output matches no MoE that mxpass implements (relative error of "
                  f"activation/gate-up layout: {', '.join(errors)})")


def _implementation(nodes: list[fx.Node]) -> str:
    """transformers' experts implementation this region was traced from, by its matmul."""
    names = " ".join(str(getattr(n.target, "__name__", n.target)) for n in nodes)
    if "grouped_mm" in names:
        return "grouped_mm"
    return "batched_mm" if "bmm" in names else "unknown"


def _keep_reason(fqn: str, fmt: Format, config: QuantConfig, hidden: int, inter: int) -> str | None:
    pattern = config.ignored_by(fqn)
    if pattern is not None:
        return f"ignored by {pattern!r}"
    if fmt.static_activation:
        return f"{fmt.name} needs static per-tensor activation scales, which mxpass::moe does not take"
    multiple = fmt.k_multiple()
    what = "block size" if fmt.family == "mxfp8" else "activation group size"
    for name, k in (("H", hidden), ("I", inter)):
        if k % multiple:
            return f"{name}={k} is not a multiple of {multiple} ({fmt.name} {what})"
    return None


def _experts_format(fqn: str, w13: torch.Tensor, config: QuantConfig, hidden: int,
                    inter: int) -> tuple[Format | None, str | None]:
    """(format, None) to rewrite the experts, or (None, why they are kept); as the linear
    pass's ``layer_format``: experts loaded quantized keep their stored format."""
    stored = prequantized_scheme(w13)
    if stored is None:
        if not config.explicit and kept_reason(w13) is not None:
            return None, kept_reason(w13)
        return config.format, _keep_reason(fqn, config.format, config, hidden, inter)
    if config.explicit and config.scheme != stored:
        raise ValueError(f"mxpass: experts {fqn} were loaded quantized from a checkpoint as {stored!r} and "
                         f"have no data of their own; compile with scheme={stored!r} or with no scheme "
                         f"(asked for {config.scheme!r})")
    reason = _keep_reason(fqn, get_format(stored), config, hidden, inter)
    return (get_format(stored), None) if reason is None else (None, reason)


def use_grouped_mm(model: torch.nn.Module) -> list[str]:
    """Select transformers' grouped_mm experts implementation where ``model`` runs the eager loop.

    Uses transformers' own switch (``set_experts_implementation``); returns one note per change.
    """
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if not hasattr(model, "get_experts_implementation") or can_set is None or not can_set():
        return []
    before = model.get_experts_implementation()
    if not any(v in (None, "eager") for v in before.values()):
        return []
    model.set_experts_implementation({k: "grouped_mm" if v in (None, "eager") else v for k, v in before.items()})
    after = model.get_experts_implementation()
    return [f"{type(model).__name__}: experts implementation {before} -> {after} through transformers' "
            "set_experts_implementation (the eager experts loop graph-breaks on nonzero)"]


def rewrite_moes(gm: fx.GraphModule, example_inputs: list, config: QuantConfig,
                 report: Report, choose_kernel=None) -> StaticInputs:
    """Rewrite verified experts regions in place; returns the new placeholders and their tensors.

    ``choose_kernel(fmt, device, H, I, dtype)`` describes the registry's choice for the report
    (``None``: "reference")."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    inputs = dict(zip(placeholders, example_inputs))
    used_patterns: set[str] = set()
    static = StaticInputs(gm, example_inputs)

    for region in find_experts_regions(gm, inputs):
        fqn = region.fqn
        if config.ignored_by(fqn):
            used_patterns.add(config.ignored_by(fqn))
        itf, reason = _interface(region)
        if itf is not None:
            w13, w2 = region.params[itf.w13], region.params[itf.w2]
            e, two_i, h = w13.shape
            fmt, reason = _experts_format(fqn, w13, config, h, two_i // 2)
        if itf is not None and reason is None:
            for what, dtype in (("weight", w13.dtype), ("activation", _value(itf.x).dtype)):
                if dtype not in ACTIVATION_DTYPES:
                    raise TypeError(f"mxpass: experts {fqn}: {what} dtype {dtype} is not supported (expected "
                                    f"one of {', '.join(str(d) for d in ACTIVATION_DTYPES)})")
            variant, reason = verify(gm, region, itf)
        if reason and any(prequantized_scheme(p) is not None for p in region.params.values()):
            raise ValueError(f"mxpass: experts {fqn} were loaded quantized from a checkpoint but cannot be "
                             f"rewritten ({reason}); their weights are stand-ins with no data")
        if reason:
            report.kept.append(Kept(fqn, reason))
            continue
        act, layout = variant
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        if max(position[a] for a in region.inputs) > position[itf.out]:
            report.kept.append(Kept(fqn, "the region reads a value computed after its output"))
            continue
        rows = _gate_up_rows(layout, two_i // 2)
        derive13 = functools.partial(quantized_experts, fmt=fmt, rows=rows,
                                     name=f"{fqn}.{source_fqn(itf.w13).rpartition('.')[2]}")
        derive2 = functools.partial(quantized_experts, fmt=fmt, name=f"{fqn}.{source_fqn(itf.w2).rpartition('.')[2]}")
        q13, s13 = derive13(w13)
        q2, s2 = derive2(w2)
        qw13, ws13 = static.weight(f"mxpass_{itf.w13.name}", q13, s13, itf.out, (w13,), derive13,
                                   f"experts {fqn} (gate/up)")
        qw2, ws2 = static.weight(f"mxpass_{itf.w2.name}", q2, s2, itf.out, (w2,), derive2, f"experts {fqn} (down)")
        with gm.graph.inserting_before(itf.out):
            new = gm.graph.call_function(
                torch.ops.mxpass.moe.default,
                (itf.x, itf.ids, itf.weights, qw13, ws13, qw2, ws2, fmt.name, act))
        new.meta.update({k: v for k, v in itf.out.meta.items() if k != "source_fn_stack"})
        itf.out.replace_all_uses_with(new)
        impl = _implementation(region.nodes)
        for n in reversed(region.nodes):
            gm.graph.erase_node(n)
        top_k = _value(itf.ids).shape[1]
        chosen = "reference" if choose_kernel is None else choose_kernel(fmt, w13.device, h, two_i // 2,
                                                                         _value(itf.x).dtype)
        name, _, why = chosen.partition(" (")  # why: "not picked: ...)"
        report.rewritten.append(Rewritten(
            fqn, "moe", fmt.name,
            f"{name} (E={e}, top-{top_k}, {act}, gate/up layout {layout}; traced from transformers' "
            f"{impl} experts" + (f"; {why}" if why else ")"), (two_i, h)))
        log.info("mxpass: experts %s -> mxpass::moe (%s, %s, %s)", fqn, fmt.name, act, layout)

    # the linear pass warned about ignore patterns that matched no linear; one that matched
    # experts was used after all
    unused = {f"ignore pattern {p!r} matched no linear layer in this graph" for p in used_patterns}
    report.warnings[:] = [w for w in report.warnings if w not in unused]
    # no eliminate_dead_code here: FX counts every call_method as pure, so it would drop an
    # in-place method whose result is unused (GPT-OSS experts' ``out.add_(bias)``)
    gm.graph.lint()
    gm.recompile()
    return static


# calls that pass a weight's data on (views, an expert's slice) and calls that multiply by it
_VIEWS = {"view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "t", "contiguous", "to", "flatten",
          "getitem", "__getitem__", "select", "narrow", "index_select", "chunk", "split", "unbind"}
_MATMULS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum", "_grouped_mm",
            "grouped_mm"}


# views that keep a weight whole (its layout or dtype only)
_WHOLE = {"t", "transpose", "contiguous", "to"}
_SLICES = _VIEWS - _WHOLE


def _transposed(node: fx.Node) -> bool:
    """``W.T`` / ``W.mT``, which Dynamo records as a ``getattr`` call."""
    return target_name(node) == "getattr" and node.args[1:] in (("T",), ("mT",))


def _readers(node: fx.Node) -> list[str]:
    """Names of the calls that read ``node``'s data, looking through views and slices."""
    found, todo, seen = [], list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        name = target_name(u)
        if name in _VIEWS or _transposed(u):
            todo.extend(u.users)
        else:
            found.append(name)
    return found


def _local_name(node: fx.Node) -> str:
    """"expert_w1" for a placeholder whose Dynamo source is the frame's local L['expert_w1']."""
    source = getattr(node, "_dynamo_source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", node.name)
    match = re.fullmatch(r"[LG]\['(\w+)'\]", name or "")
    return match.group(1) if match else node.name


def _sliced_then_multiplied(node: fx.Node) -> bool:
    """Whether ``node`` (a 2-D weight) is viewed or sliced (not only transposed) on its way to a
    matmul: DBRX's flattened experts [E * I, H], viewed [E, I, H] and indexed per expert."""
    for u in node.users:
        name = target_name(u)
        if name in _WHOLE or _transposed(u):
            if _sliced_then_multiplied(u):
                return True
        elif name in _SLICES and any(r in _MATMULS for r in _readers(u)):
            return True
    return False


def _weight_view(value) -> bool:
    """A tensor (not a Parameter) that is a view of a floating-point Parameter of two or more
    dims: a weight sliced by eager code and passed into the graph (DBRX's experts)."""
    base = getattr(value, "_base", None)
    return (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
            and isinstance(base, torch.nn.Parameter) and base.is_floating_point()
            and value.dim() >= 2 and sum(d > 1 for d in value.shape) >= 2)


def report_other_weights(gm: fx.GraphModule, example_inputs: list, report: Report) -> None:
    """After both passes: every Parameter of three or more dims (two of them larger than 1, not a
    vector such as a per-head decay), or of two dims that the graph slices before it multiplies
    by it (flattened experts), that the graph still multiplies by (matmul, bmm, einsum,
    grouped_mm, linear, directly or through views and slices) or convolves with, and that no
    report entry covers (a rewritten or kept layer whose path it lies under), is reported as
    kept, one entry per module, so that experts outside the v5 convention (one module per 3-D
    weight, or another layout) never stay in the model dtype unreported. Parameters only added
    or multiplied elementwise (position embeddings, scales) are not layers and are not listed.
    A view of a Parameter that eager code made and passed in (DBRX slices its flattened
    experts in a loop that runs outside the graph) and that the graph multiplies by is
    reported under its name in the frame.
    ``example_inputs``: the values of every placeholder, in order."""
    covered = {e.fqn for e in report.rewritten} | {e.fqn for e in report.kept}
    found: dict[str, list[tuple[str, list[int], bool]]] = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if _weight_view(value) and node.users and any(r in _MATMULS for r in _readers(node)):
            base = value._base
            report.kept.append(Kept(source_fqn(node) or _local_name(node), (
                f"a {list(value.shape)} view of a {list(base.shape)} weight, made by code outside this graph (code "
                f"that ran without torch.compile, e.g. after a graph break) and multiplied by here: mxpass "
                f"quantizes the weights a graph reads as Parameters; it stays in the model dtype")))
            continue
        if not (isinstance(value, torch.nn.Parameter) and value.dim() >= 2 and value.is_floating_point()):
            continue
        if sum(d > 1 for d in value.shape) < 2:  # a vector in more dims (a per-head decay [1, 1, heads, 1])
            continue
        if not node.users:
            continue
        path = source_fqn(node)
        if any(path == f or path.startswith(f + ".") for f in covered):
            continue
        if value.dim() == 2:
            # a 2-D weight read whole is a linear the linear pass rewrote or kept (or a tied
            # embedding, reported under lm_head); one sliced before a matmul is not
            if _sliced_then_multiplied(node):
                found.setdefault(path.rpartition(".")[0] or path, []).append(
                    (path.rpartition(".")[2], list(value.shape), "sliced"))
            continue
        readers = _readers(node)
        if any(r in _MATMULS for r in readers):
            kind = "stacked"
        elif readers and all("conv" in r for r in readers):
            kind = "conv"
        else:
            continue  # added or multiplied elementwise (a position embedding, a scale): not a layer's weight
        module, _, name = path.rpartition(".")
        found.setdefault(module or path, []).append((name, list(value.shape), kind))
    for module, weights in found.items():
        kinds = {kind for _, _, kind in weights}
        what = ", ".join(f"{name} {shape}" for name, shape, _ in weights)
        if kinds == {"conv"}:
            reason = f"convolution ({what}): mxpass quantizes linear layers and MoE experts"
        elif kinds == {"sliced"}:
            reason = (f"{what}: viewed or sliced before a matmul (grouped or flattened weights); mxpass "
                      f"quantizes the 2-D weights a linear or matmul reads whole; it stays in the model dtype")
        else:
            dims = "/".join(sorted({f"{len(shape)}-D" for _, shape, _ in weights}))
            reason = (f"{what}: {dims} weights outside any experts module mxpass recognizes (transformers v5 "
                      f"experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] in one module); they stay "
                      f"in the model dtype")
        report.kept.append(Kept(module, reason))


def report_unread_weights(owner: torch.nn.Module | None, example_inputs: list, report: Report) -> None:
    """The module whose method this graph was compiled from (``owner``) holds stacked weights
    (three or more dims, two of them larger than 1) that the graph does not read: code that
    runs outside any graph applies them (transformers' eager experts loop breaks the graph on
    ``nonzero`` and loops in Python). They stay in the model dtype; reported as kept under the
    frame's own path, once per graph."""
    if owner is None:
        return
    read = {id(v) for v in example_inputs}
    unread = [(name, list(p.shape)) for name, p in owner.named_parameters(recurse=False)
              if p.dim() >= 3 and sum(d > 1 for d in p.shape) >= 2 and p.is_floating_point() and id(p) not in read]
    if not unread:
        return
    what = ", ".join(f"{name} {shape}" for name, shape in unread)
    hint = ("; mxpass.compile(model) or model.set_experts_implementation('grouped_mm') lets mxpass rewrite "
            "them" if hasattr(owner, "gate_up_proj") or hasattr(type(owner), "_experts_implementation") else "")
    report.kept.append(Kept("", (
        f"{type(owner).__name__}: {what} are not read by this graph; code outside any graph applies them "
        f"(this frame breaks, e.g. transformers' eager experts loop on nonzero), in the model dtype{hint}")))
