"""The torch.compile backend: run the mxpass passes on Dynamo's graph, then Inductor.

    torch.compile(model, backend=mxpass.backend)                       # MXFP8, defaults
    torch.compile(mxpass.load(path), backend=mxpass.backend)           # the checkpoint's formats
    torch.compile(model, backend=mxpass.backend(scheme="mxfp8", ignore=["re:.*o_proj"]))
    torch.compile(model, backend="mxpass")                             # entry-point name
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from mxpass.config import DEFAULT_SCHEME, QuantConfig
from mxpass.formats import Format
from mxpass.passes.inputs import bind_inputs
from mxpass.passes.linear import rewrite_linears
from mxpass.passes.moe import report_other_weights, report_unread_weights, rewrite_moes, use_grouped_mm
from mxpass.report import Report, record


class MxpassBackend:
    """A configured backend; one instance may compile many graphs (one report each)."""

    def __init__(self, config: QuantConfig, cudagraphs: bool = False,
                 inductor_options: dict[str, Any] | None = None, compiler: str = "inductor"):
        if compiler not in ("inductor", "eager"):
            raise ValueError(f"mxpass: compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.config = config
        self.compiler = compiler
        self.cudagraphs = cudagraphs
        self.inductor_options = dict(inductor_options or {})
        if cudagraphs:
            self.inductor_options["triton.cudagraphs"] = True
        self.notes: list[str] = []  # changes made to the model before tracing, for every report

    def __repr__(self) -> str:
        return f"mxpass.backend(scheme={self.config.scheme!r}, ignore={list(self.config.ignore)!r})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        from mxpass.checkpoint.loader import check_stand_ins_consumed
        from mxpass.lowering.choices import quantizing_reductions
        from mxpass.lowering.cse import MergeIdenticalNodes
        from mxpass.lowering.linear import decompositions
        from mxpass.lowering.nodes import lower_mxpass_nodes
        from mxpass.lowering.producers import fuse_input_quantization

        import mxpass.ops  # noqa: F401  (defines the mxpass ops before the passes emit them)

        report = Report(scheme=self.config.scheme or DEFAULT_SCHEME)
        gm = _private_copy(gm)
        report.frame, owner = _frame()
        linears = rewrite_linears(gm, list(example_inputs), self.config, report, _choose_kernel)
        moes = rewrite_moes(gm, [*example_inputs, *linears.tensors], self.config, report,
                            functools.partial(_choose_kernel, op="moe"))
        extra = [*linears.tensors, *moes.tensors]
        report_other_weights(gm, [*example_inputs, *extra], report)
        report_unread_weights(owner, example_inputs, report)
        del owner
        check_stand_ins_consumed(gm, [*example_inputs, *extra])  # loaded weights without data
        if self.compiler == "inductor":
            fuse_input_quantization(gm, report)
        report.warnings.extend(self.notes)
        if not self.config.explicit and report.rewritten:
            # no scheme given: loaded layers keep their checkpoint's formats
            report.scheme = ", ".join(dict.fromkeys(r.scheme for r in report.rewritten))
        record(report)
        for w in report.warnings:
            warnings.warn(f"mxpass: {w}", stacklevel=2)
        if self.compiler == "eager":
            # the rewritten graph run op by op: every mxpass op runs its reference body
            return bind_inputs(gm, list(example_inputs), [linears, moes], report)
        lower_mxpass_nodes(gm)
        decomps = {**select_decomp_table(), **decompositions()}
        options = {"post_grad_custom_pre_pass": MergeIdenticalNodes(), **self.inductor_options}
        with quantizing_reductions():
            compiled = compile_fx(gm, [*example_inputs, *extra], config_patches=options,
                                  decompositions=decomps)
        return bind_inputs(compiled, list(example_inputs), [linears, moes], report)


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's GraphModule that the passes may change.

    Dynamo keeps using its own graph after the backend returns (it reads every
    placeholder's ``grapharg``), so new placeholders must not appear there. The copy keeps
    what AOTAutograd reads to mark parameters as static inputs: ``meta`` (the compile id),
    ``_param_name_to_source`` and each placeholder's ``_dynamo_source``.
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def _frame() -> tuple[str, torch.nn.Module | None]:
    """The function Dynamo is compiling ("LlamaForCausalLM.forward": layer names in the report
    are relative to its ``self``) and that module (None for a function). ("", None) when
    Dynamo does not say."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        owner = tx.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
    except Exception:  # not inside Dynamo (a direct call), or its internals moved
        return "", None
    if isinstance(owner, torch.nn.Module):
        return f"{type(owner).__name__}.{code.co_name}", owner
    return code.co_name, None


def _choose_kernel(fmt: Format, device: torch.device, k: int, n: int, dtype: torch.dtype, op: str = "linear",
                   m: int | None = None) -> str:
    from mxpass.lowering.registry import Problem, choose

    return choose(Problem(op, fmt, device, k, n, dtype, m)).describe()


def backend(gm: fx.GraphModule | None = None, example_inputs: Sequence[Any] | None = None, *,
            scheme: str | None = None, ignore: Sequence[str] | str = (), quantize_lm_head: bool = False,
            cudagraphs: bool = False, inductor_options: dict[str, Any] | None = None,
            compiler: str = "inductor", activation_scales: dict[str, float] | None = None,
            merge: bool = True):
    """The mxpass backend, usable directly or configured.

    ``backend=mxpass.backend`` compiles with the defaults: MXFP8 on every eligible linear of an
    ordinary model; a model from ``mxpass.load`` runs each quantized layer in the format its
    checkpoint stored and keeps the Linears the checkpoint left unquantized (``scheme=None``;
    an explicit scheme quantizes those too, and must equal the stored format of every
    loaded layer). Static input scales stored in the checkpoint are used unless
    ``activation_scales`` names the layer.
    ``backend=mxpass.backend(scheme=..., ignore=[...], cudagraphs=True)`` returns a configured
    backend. ``activation_scales={"model.layers.0.mlp.down_proj": 0.02, ...}`` gives the static
    per-tensor activation scales that the static schemes (``fp8``, ``int8-static``) need.
    ``compiler="eager"`` runs the rewritten graph without Inductor (every mxpass op
    runs its pure-PyTorch reference): the numerical definition compiled code is tested against.
    ``cudagraphs=True`` is the equivalent of ``mode="reduce-overhead"`` (torch.compile
    does not accept a mode together with a custom backend). ``merge=False`` keeps every
    layer its own GEMM (by default layers reading the same input, such as q/k/v, run as one).
    """
    config = QuantConfig(scheme=scheme, ignore=ignore, quantize_lm_head=quantize_lm_head,
                         activation_scales=activation_scales or {}, merge=merge)
    be = MxpassBackend(config, cudagraphs=cudagraphs, inductor_options=inductor_options,
                       compiler=compiler)
    if gm is None:
        return be
    if example_inputs is None:
        raise TypeError("mxpass.backend(gm, example_inputs): example_inputs missing")
    return be(gm, example_inputs)


def compile(fn: Callable | None = None, *, scheme: str | None = None, ignore: Sequence[str] | str = (),
            quantize_lm_head: bool = False, cudagraphs: bool = False, dynamic: bool | None = None,
            fullgraph: bool = False, activation_scales: dict[str, float] | None = None, merge: bool = True):
    """Decorator form: ``@mxpass.compile(scheme="mxfp8")`` on a model's forward (or any function).

    Given a model (or a bound method of one) whose MoE experts run transformers' eager loop,
    it first selects the grouped_mm experts implementation through transformers' switch
    (the eager loop graph-breaks); the change is noted in the report.
    """
    be = backend(scheme=scheme, ignore=ignore, quantize_lm_head=quantize_lm_head, cudagraphs=cudagraphs,
                 activation_scales=activation_scales, merge=merge)

    def wrap(f: Callable) -> Callable:
        model = f if isinstance(f, torch.nn.Module) else getattr(f, "__self__", None)
        if isinstance(model, torch.nn.Module):
            be.notes.extend(use_grouped_mm(model))
        return torch.compile(f, backend=be, dynamic=dynamic, fullgraph=fullgraph)

    return wrap(fn) if fn is not None else wrap


