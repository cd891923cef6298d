"""Pass: quantized linears that read the same input become one wider linear.

q/k/v and gate/up (and any other layers that read one activation) each stream their own
weight; in decode, where a linear costs its weight bytes plus a fixed per-kernel term, one
GEMM over the stacked weight pays that term once and gives the kernel more rows to spread
over the GPU. After :func:`mxpass.passes.linear.rewrite_linears`, the ``mxpass::linear``
nodes with the same input, format and no static activation scale are replaced by one
``mxpass::linear`` on the stacked weight (``mxpass.weights.merged_weight``: the quantized
bytes exist once) and a ``narrow`` of its output per layer. The numbers do not change: every
output row keeps its own scales (the activation's scales do not depend on the weight).

Not merged, with the reason in the report: formats with one weight scale per tensor
(stacking would need a common scale), 128 x 128 blocks that a layer does not fill, biases
that are not parameters, and outputs that a ``view`` could not reshape as a slice of a
wider row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from mxpass.formats import get_format
from mxpass.passes import node_value
from mxpass.passes.inputs import StaticInputs
from mxpass.report import Report
from mxpass.weights import merged_bias, merged_weight


@dataclass
class Layer:
    """An ``mxpass::linear`` node the linear pass created, and what it was made from."""

    node: fx.Node
    param: torch.nn.Parameter
    transposed: bool
    fqn: str
    index: int                      # its entry in report.rewritten
    bias: torch.Tensor | None       # the bias Parameter, if the layer has one
    dtype: torch.dtype              # the activation's
    m: int | None                   # the activation's rows when the graph fixed them

    @property
    def n(self) -> int:
        return self.param.shape[1] if self.transposed else self.param.shape[0]


def _why_not(layers: list[Layer], fmt) -> str | None:
    """Why these layers (same input, same format) cannot run as one GEMM, or None."""
    if fmt.static_activation:
        return "static activation scales are per layer"
    if fmt.weight_granularity == "tensor":
        return "per-tensor weight scales"
    rows = [lay.n for lay in layers]
    if fmt.weight_granularity == "block" and any(n % 128 for n in rows[:-1]):
        return f"N={rows} does not fill the 128-row weight blocks"
    if len({(lay.param.dtype, lay.param.device) for lay in layers}) != 1:
        return "weights differ in dtype or device"
    for lay in layers:
        b = lay.node.args[3]
        if b is not None and lay.bias is None:
            return f"{lay.fqn}: bias is computed in the graph, not a parameter"
    for lay in layers:
        problem = _view_problem(lay.node)
        if problem:
            return f"{lay.fqn}: {problem}"
    return None


def _view_problem(node: fx.Node) -> str | None:
    """Why a ``view`` of this layer's output would fail on a slice of a wider output."""
    val = node_value(node)
    for user in node.users:
        if not (user.op == "call_method" and user.target == "view"):
            continue
        out = node_value(user)
        if val is None or out is None:
            return "output viewed with unknown shapes"
        # compared as text: sizes may be symbolic, and comparing SymInts would add guards
        lead = tuple(map(str, val.shape[:-1]))
        if tuple(map(str, out.shape[:len(lead)])) != lead:
            return f"output viewed as {tuple(out.shape)} (merges its last dimension with others)"
    return None


def merge_siblings(gm: fx.GraphModule, static: StaticInputs, layers: list[Layer], report: Report,
                   choose_kernel, enabled: bool = True) -> int:
    """Merge the layers of ``layers`` that share an input (module docstring); returns the
    number of merged groups. ``enabled=False`` only records why nothing was merged."""
    groups: dict[tuple, list[Layer]] = {}
    for lay in layers:
        x, _qw, _ws, _b, act, fmt_name = lay.node.args
        groups.setdefault((x, fmt_name, act is not None), []).append(lay)
    merged = 0
    for (x, fmt_name, _), group in groups.items():
        if len(group) < 2:
            continue
        names = "+".join(lay.fqn.rsplit(".", 1)[-1] for lay in group)
        fmt = get_format(fmt_name)
        why = "disabled (merge=False)" if not enabled else _why_not(group, fmt)
        if why is not None:
            for lay in group:
                entry = report.rewritten[lay.index]
                report.rewritten[lay.index] = dataclasses.replace(entry, merged=f"not merged with {names}: {why}")
            continue
        _merge(gm, static, x, fmt, group, report, choose_kernel, names)
        merged += 1
    static.remove_unused()
    return merged


def _merge(gm: fx.GraphModule, static: StaticInputs, x: fx.Node, fmt, group: list[Layer], report: Report,
           choose_kernel, names: str) -> None:
    graph = gm.graph
    first = group[0].node
    data, scale = merged_weight([lay.param for lay in group], fmt, [lay.transposed for lay in group],
                                [lay.fqn for lay in group])
    rows = [lay.n for lay in group]
    n, k = data.shape
    transposed, fqns = [lay.transposed for lay in group], [lay.fqn for lay in group]
    qw, ws = static.weight(f"mxpass_merged_{first.name}", data, scale, first, tuple(lay.param for lay in group),
                           lambda *ps: merged_weight(list(ps), fmt, transposed, fqns), f"layers {names}")
    bias = None
    if any(lay.bias is not None for lay in group):
        has = [lay.bias is not None for lay in group]

        def biases(*bs):
            it = iter(bs)
            given = [next(it) if h else None for h in has]
            return merged_bias(given, rows, next(b for b in given if b is not None))

        sources = tuple(lay.bias for lay in group if lay.bias is not None)
        bias = static.add(f"mxpass_merged_{first.name}_bias", biases(*sources), sources, biases,
                          f"the biases of layers {names}")
    with graph.inserting_before(first):
        wide = graph.call_function(torch.ops.mxpass.linear.default, (x, qw, ws, bias, None, fmt.name))
    wide.meta.update({key: v for key, v in first.meta.items() if key not in ("example_value", "val")})
    val = node_value(first)
    if val is not None:
        wide.meta["example_value"] = val.new_empty((*val.shape[:-1], n))
    wide.meta["mxpass_report_index"] = [lay.index for lay in group]
    kernel = choose_kernel(fmt, data.device, k, n, group[0].dtype, m=group[0].m)
    own = [a for lay in group for a in lay.node.args[1:3]]  # the layers' weight placeholders (or E8M0 views)
    start = 0
    for lay, rows_i in zip(group, rows):
        with graph.inserting_after(wide):
            part = graph.call_function(torch.narrow, (wide, -1, start, rows_i))
        if "example_value" in wide.meta:
            part.meta["example_value"] = wide.meta["example_value"].narrow(-1, start, rows_i)
        lay.node.replace_all_uses_with(part)
        graph.erase_node(lay.node)
        entry = report.rewritten[lay.index]
        report.rewritten[lay.index] = dataclasses.replace(
            entry, kernel=kernel, merged=f"merged: {names} as one {n} x {k} GEMM (rows {start}:{start + rows_i})")
        start += rows_i
    for node in dict.fromkeys(own):  # placeholders go in static.remove_unused()
        if node.op != "placeholder" and not node.users:
            graph.erase_node(node)
