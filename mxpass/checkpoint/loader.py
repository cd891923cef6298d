"""``mxpass.load``: an unmodified Hugging Face model whose quantized layers hold no data.

    model = mxpass.load("path/to/checkpoint", device="cuda")
    fast = torch.compile(model, backend=mxpass.backend)    # each layer in its stored format

Steps (the reader interface is in ``plan.py``):
  1. the model class of ``config.json`` is built on ``meta``;
  2. the reader of the ``quantization_config`` (none: a plain checkpoint) plans every
     quantized Linear: format and stored tensor names; with ``scheme=``, every other Linear
     that mxpass's rules would quantize is planned too, to be quantized while reading;
  3. every planned and every unquantized tensor is checked against the safetensors headers
     (present, shape, dtype) and every quantization tensor must be used: all errors come
     before any data is read or allocated;
  4. tensors are read one at a time: a quantized Linear gets a stand-in weight (one NaN
     element expanded to [N, K]) and mxpass's weight cache is seeded with (data, scale) in
     mxpass's layout, plus its static input scale; everything else is materialized in
     ``dtype`` on ``device``. Linears left in the model dtype are marked with the reason;
     modules holding stand-ins refuse to run outside ``torch.compile``.

Peak device memory is the quantized weights, the unquantized tensors and one tensor in
flight (online: one weight in the model dtype and its quantization temporaries).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch

from mxpass.checkpoint.experts import (conversions, plan_online_experts, read_quantized_experts,
                                       read_unquantized_experts, rename, stored_experts)
from mxpass.checkpoint.plan import FLOATS, UNQUANTIZED, LayerPlan, Plan, mxpass_scale, reader_for
from mxpass.checkpoint.tensors import SafetensorsIndex
from mxpass.config import QuantConfig
from mxpass.formats import Format, get_format
from mxpass.passes.linear import keep_reason
from mxpass.weights import mark_kept, seed_quantized_weight

# names of the quantization tensors a checkpoint stores beside a layer's weight
QUANT_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale", "weight_zero_point",
                  "input_zero_point", "weight_global_scale", "input_global_scale", "output_scale")


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load` did (``mxpass.checkpoint.info(model)``).

    path, reader      -- the checkpoint and the reader of its quantization_config
                         ("none" for a plain checkpoint)
    formats           -- mxpass format of every Linear loaded quantized, by module path
    experts           -- mxpass format of every experts module loaded quantized
    online            -- those (Linears, experts) quantized while loading (``scheme=``)
    activation_scales -- static per-tensor input scales stored in the checkpoint
    kept              -- every Linear (and experts module stored per expert) left in the model
                         dtype, with the reason
    unused_tensors    -- stored tensors no module took
    seconds           -- wall time of the load
    quantized_bytes, unquantized_bytes -- bytes placed on the device
    """

    path: str
    reader: str
    formats: dict[str, str] = field(default_factory=dict)
    experts: dict[str, str] = field(default_factory=dict)
    online: tuple[str, ...] = ()
    activation_scales: dict[str, float] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    unused_tensors: tuple[str, ...] = ()
    seconds: float = 0.0
    quantized_bytes: int = 0
    unquantized_bytes: int = 0

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(self.formats)

    @property
    def ignore(self) -> tuple[str, ...]:
        return tuple(self.kept)

    @property
    def scheme(self) -> str | None:
        """The one format of every quantized layer (None: none, or several)."""
        names = set(self.formats.values())
        return names.pop() if len(names) == 1 else None

    @property
    def quantize_lm_head(self) -> bool:
        return any(p.rsplit(".", 1)[-1] == "lm_head" for p in self.formats)

    def backend_kwargs(self) -> dict:
        """Arguments for ``mxpass.backend`` that state the checkpoint's choices explicitly
        (the default backend already follows them)."""
        return dict(scheme=self.scheme, activation_scales=dict(self.activation_scales),
                    ignore=list(self.kept), quantize_lm_head=self.quantize_lm_head)


_INFOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def info(model: torch.nn.Module) -> LoadInfo:
    """The :class:`LoadInfo` of a model returned by ``mxpass.load`` (or its ``torch.compile``)."""
    found = _INFOS.get(getattr(model, "_orig_mod", model))
    if found is None:
        raise ValueError(f"{type(model).__name__} was not loaded by mxpass.load")
    return found


# --- model ---


def _build_meta_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # mxpass, not transformers, handles the quantized layers
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(hf_config, dtype=dtype)
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _set(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


def _init_non_persistent_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers not stored in checkpoints (rotary inv_freq): allocate, then let the model's
    own ``_init_weights`` compute them, as transformers' loader does."""
    owners = {}
    for name, module in model.named_modules():
        for leaf in module._non_persistent_buffers_set:
            buf = module._buffers.get(leaf)
            if buf is not None and buf.device.type == "meta":
                module._buffers[leaf] = torch.empty_like(buf, device=device)
                owners[name] = module
    with torch.no_grad():
        for module in owners.values():
            model._init_weights(module)


def stand_in(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    """An [n, k] weight with one element of storage, all NaN.

    On the model's device, not ``meta``: Dynamo's fake tensors refuse a meta weight beside
    real activations ("Tensor device mismatch"). Never computed with: its module refuses to
    run outside ``torch.compile`` (:func:`refuse_eager`) and the backend refuses a stand-in
    no rewrite consumed (:func:`check_stand_ins_consumed`); NaN rather than zero all the same,
    and mxpass refuses to quantize it (non-finite weights).
    """
    t = torch.full((), float("nan"), dtype=dtype, device=device).expand(n, k)
    return torch.nn.Parameter(t, requires_grad=False)


class EagerCallError(RuntimeError):
    """A module whose weights are stand-ins (no data) was run outside ``torch.compile``."""


def _refuse_eager(name: str, fmt: str, module: torch.nn.Module, args) -> None:
    """Forward pre-hook of a module holding stand-ins: an error unless Dynamo is tracing it.

    While tracing, ``is_compiling()`` is a constant: the hook adds no op and no graph break,
    and the mxpass passes replace the stand-ins. Run in Python (eagerly, or in a frame
    Dynamo skipped) the stand-ins would compute NaN."""
    if not torch.compiler.is_compiling():
        raise EagerCallError(
            f"mxpass.load: {name} was loaded quantized ({fmt}) and its weights are stand-ins without "
            "data, so it cannot run eagerly; run the model through "
            "torch.compile(model, backend=mxpass.backend)")


def refuse_eager(module: torch.nn.Module, name: str, fmt: str) -> None:
    """Make calling ``module`` outside ``torch.compile`` an :class:`EagerCallError` naming it."""
    module.register_forward_pre_hook(functools.partial(_refuse_eager, name, fmt))


def check_stand_ins_consumed(gm, example_inputs) -> None:
    """After the mxpass passes: a graph input that is a loaded stand-in (no data) must have
    no users left, since whatever still reads it would compute with NaN. An error names the
    weight and the operations that read it. ``example_inputs``: one per placeholder, in order
    (the passes' new inputs appended)."""
    from mxpass.passes import target_name
    from mxpass.passes.linear import source_fqn
    from mxpass.weights import prequantized_scheme

    left = []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if not isinstance(value, torch.Tensor) or not node.users:
            continue
        fmt = prequantized_scheme(value)
        if fmt is not None:
            users = ", ".join(sorted({target_name(u) for u in node.users}))
            left.append(f"{source_fqn(node)} ({fmt}; read by {users})")
    if left:
        raise ValueError(
            "mxpass: weights loaded quantized from a checkpoint (stand-ins without data) are still read "
            f"after the mxpass passes, which rewrite only Linear and experts calls: {'; '.join(left)}")


def _tied_weights(model: torch.nn.Module) -> set[str]:
    """Names of the weights tied to another (both ends)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values()) if isinstance(tied, dict) else set(tied)


# --- checks (headers only) ---


def _check(name: str, what: str, shape: tuple[int, ...], dtype: torch.dtype,
           shapes: tuple[tuple[int, ...], ...] | None, dtypes: tuple[torch.dtype, ...]) -> None:
    if shapes is not None and tuple(shape) not in [tuple(s) for s in shapes]:
        want = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"mxpass.checkpoint: tensor {name!r} ({what}) has shape {tuple(shape)}; "
                         f"expected {want}")
    if dtype not in dtypes:
        raise TypeError(f"mxpass.checkpoint: tensor {name!r} ({what}) has dtype {dtype}; expected "
                        f"{' or '.join(str(d) for d in dtypes)}")


def _require(tensors: SafetensorsIndex, name: str | None, what: str) -> str:
    if name is None or name not in tensors:
        raise KeyError(f"mxpass.checkpoint: tensor {name!r} ({what}) is missing from the checkpoint")
    return name


def _check_layer(tensors: SafetensorsIndex, fqn: str, lp: LayerPlan, n: int, k: int) -> None:
    fmt, src = lp.fmt, f" ({lp.origin})" if lp.origin else ""
    what = f"{fmt.name} weight of {fqn}{src}"
    _require(tensors, lp.weight, what)
    wdtypes = (fmt.weight,) if lp.weight_scale is not None else FLOATS
    _check(lp.weight, what, tensors.shape(lp.weight), tensors.dtype(lp.weight), ((n, k),), wdtypes)
    if lp.weight_scale is not None:
        layout = lp.scale or mxpass_scale(fmt, n, k)
        what = f"{fmt.name} weight scale of {fqn}{src}"
        _require(tensors, lp.weight_scale, what)
        _check(lp.weight_scale, what, tensors.shape(lp.weight_scale), tensors.dtype(lp.weight_scale),
               layout.shapes, layout.dtypes)
    if fmt.static_activation:
        what = f"static input scale of {fqn}, {fmt.name}{src}"
        _require(tensors, lp.input_scale, what)
        _check(lp.input_scale, what, tensors.shape(lp.input_scale), tensors.dtype(lp.input_scale),
               ((), (1,), (1, 1)), FLOATS)


def _check_converted(name: str, fmt: Format, n: int, k: int, scale: torch.Tensor) -> None:
    """A reader's converted scale must be mxpass's layout (plan.py)."""
    want = mxpass_scale(fmt, n, k)
    shape, dtype = want.shapes[0] if fmt.weight_granularity != "tensor" else (1,), fmt.scale
    if tuple(scale.shape) != tuple(shape) or scale.dtype != dtype:
        raise ValueError(f"mxpass.checkpoint: the scale converted from {name!r} is {scale.dtype} "
                         f"{tuple(scale.shape)}; mxpass's {fmt.name} layout is {dtype} {tuple(shape)}")


# --- load ---


def _progress_bar(total: int, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="mxpass.load")


def _online_plan(plan: Plan, linears: dict, fmt: Format, config: QuantConfig, tied: set[str],
                 kept: dict[str, str]) -> None:
    """Plan every Linear the reader left that mxpass's rules quantize, in ``fmt`` (online)."""
    for fqn, module in linears.items():
        if fqn in plan.layers:
            continue
        n, k = module.weight.shape
        reason = keep_reason(fqn, n, k, fmt, config, tied=f"{fqn}.weight" in tied)
        if reason is None:
            plan.layers[fqn] = LayerPlan(fmt, f"{fqn}.weight", None, origin=f"online {fmt.name}")
            kept.pop(fqn, None)
        else:
            kept[fqn] = reason


def _read_layer(tensors: SafetensorsIndex, fqn: str, lp: LayerPlan, n: int, k: int,
                dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) in mxpass's layout of one planned 2-D weight, on ``device``."""
    if lp.weight_scale is None:  # online: quantize the model-dtype weight on the device
        w = tensors.get(lp.weight).to(dtype).to(device)
        return _quantize(lp.fmt, w, fqn)
    data = tensors.get(lp.weight).to(device)
    stored = tensors.get(lp.weight_scale).to(device)
    scale = (lp.scale or mxpass_scale(lp.fmt, n, k)).convert(stored).contiguous()
    _check_converted(lp.weight_scale, lp.fmt, n, k, scale)
    return data.contiguous(), scale


def _plan_names(lp: LayerPlan) -> list[str]:
    return [t for t in (lp.weight, lp.weight_scale, lp.input_scale, *lp.skip) if t is not None]


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
         scheme: str | None = None, progress: bool | None = None,
         ignore=()) -> torch.nn.Module:
    """The Hugging Face model in directory ``path`` (module docstring).

    A quantized checkpoint (``quantization_config`` in ``config.json``) keeps its quantized
    layers as stored. ``scheme="mxfp8"`` (any dynamic mxpass scheme) quantizes, while reading,
    every other Linear (and experts module) that mxpass's rules would (not lm_head, router
    gates, ``ignore``, K not a multiple of the format's block): a plain bf16 checkpoint is
    never held in the model dtype. ``progress``: a progress bar (None: on a terminal).
    Details: ``info(model)``.
    """
    start = time.perf_counter()
    device = torch.device(device)
    if dtype not in FLOATS:
        raise TypeError(f"mxpass.load: dtype must be one of {FLOATS}, got {dtype}")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    fmt = None
    if scheme is not None:
        fmt = get_format(scheme)
        if fmt.static_activation:
            raise ValueError(
                f"mxpass.load: scheme {scheme!r} needs static activation scales, which loading cannot "
                "measure; load without a scheme, then mxpass.calibrate and compile with the scales")
    tensors = SafetensorsIndex(path)
    model = _build_meta_model(path, dtype)
    renamings, _ = conversions(model)
    if renamings:
        tensors.rename(lambda key: rename(key, renamings))
    tensors.experts = stored_experts(model, tensors.names())
    linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    qconfig = config.get("quantization_config")
    plan = reader_for(qconfig).plan(qconfig, model, tensors) if qconfig else Plan(reader="none")
    for fqn in plan.layers:
        if fqn not in linears:
            raise ValueError(f"mxpass.checkpoint: the {plan.reader} reader planned {fqn}, which is not "
                             "a Linear of the model")
    for fqn in plan.experts:
        if fqn not in tensors.experts:
            raise ValueError(f"mxpass.checkpoint: the {plan.reader} reader planned experts {fqn}, which "
                             "the checkpoint does not store per expert")
    unplanned = [f for f in tensors.experts if f not in plan.experts]
    kept = {fqn: plan.kept_reason for fqn in [*linears, *unplanned]
            if fqn not in plan.layers} if qconfig else {}
    tied = _tied_weights(model)
    if fmt is not None:
        online_config = QuantConfig(scheme=scheme, ignore=ignore)
        _online_plan(plan, linears, fmt, online_config, tied, kept)
        plan_online_experts(plan, tensors.experts, fmt, online_config, kept)

    # every check before any data is read
    planned: dict[str, str] = {}
    for fqn, lp in plan.layers.items():
        n, k = linears[fqn].weight.shape
        _check_layer(tensors, fqn, lp, n, k)
        planned.update(dict.fromkeys(_plan_names(lp), fqn))
    for fqn, stored in tensors.experts.items():
        ep = plan.experts.get(fqn)
        for expert, modules in zip(ep.experts if ep else [None] * len(stored.modules), stored.modules):
            for role, module in enumerate(modules):
                n, k = stored.expected(role)
                if ep is not None:
                    _check_layer(tensors, module, expert[role], n, k)
                    planned.update(dict.fromkeys(_plan_names(expert[role]), module))
                else:
                    name = f"{module}.weight"
                    _check(name, f"unquantized expert weight of {fqn}", tensors.shape(name), tensors.dtype(name),
                           ((n, k),), FLOATS)
                    planned[name] = module
        planned[f"{fqn}.{stored.gate_up}"] = planned[f"{fqn}.{stored.down}"] = fqn  # built from the above
    unquantized = {}
    for key, meta in model.state_dict().items():
        if key in planned:
            continue
        if key in tied and key not in tensors:
            continue  # the other end of the tie is stored
        _require(tensors, key, "unquantized tensor")
        want = FLOATS if meta.is_floating_point() else (meta.dtype,)
        _check(key, "unquantized tensor", tensors.shape(key), tensors.dtype(key), (tuple(meta.shape),), want)
        unquantized[key] = meta
    unused = [t for t in tensors.names() if t not in planned and t not in unquantized]
    for name in unused:
        owner, _, leaf = name.rpartition(".")
        if leaf in QUANT_SUFFIXES:
            lp = plan.layers.get(owner)
            state = f"loaded as {lp.fmt.name} ({lp.origin})" if lp else "left unquantized by the config"
            raise ValueError(f"mxpass.checkpoint: tensor {name!r} is a quantization parameter of "
                             f"{owner}, which is {state}: the config and the tensors disagree")

    # read
    total = sum(tensors.nbytes(t) for t in [*planned, *unquantized] if t in tensors)
    bar = _progress_bar(total, progress)
    step = (lambda names: bar.update(sum(tensors.nbytes(t) for t in names))) if bar else (lambda names: None)
    formats, activation_scales, online, experts, bases = {}, {}, [], {}, {}
    quantized_bytes = unquantized_bytes = 0
    try:
        for fqn, lp in plan.layers.items():
            module = linears[fqn]
            n, k = module.weight.shape
            data, scale = _read_layer(tensors, fqn, lp, n, k, dtype, device)
            if lp.weight_scale is None:
                online.append(fqn)
            input_scale = None
            if lp.fmt.static_activation:
                input_scale = float(tensors.get(lp.input_scale).float().reshape(()))
                activation_scales[fqn] = input_scale
            module.weight = stand_in(n, k, dtype, device)
            seed_quantized_weight(module.weight, lp.fmt, False, data, scale, input_scale)
            formats[fqn] = lp.fmt.name
            quantized_bytes += data.nbytes + scale.nbytes
            step(_plan_names(lp))
        for fqn, stored in tensors.experts.items():
            owner = model.get_submodule(fqn)
            ep = plan.experts.get(fqn)
            if ep is None:
                unquantized_bytes += read_unquantized_experts(tensors, stored, owner, dtype, device, step)
                continue
            read = lambda name, lp, n, k: _read_layer(tensors, name, lp, n, k, dtype, device)  # noqa: E731
            quantized_bytes += read_quantized_experts(tensors, read, ep, stored, owner, dtype, device, step, bases)
            experts[fqn] = ep.fmt.name
            if ep.experts[0][0].weight_scale is None:
                online.append(fqn)
        for key, meta in unquantized.items():
            t = tensors.get(key)
            if meta.is_floating_point():
                t = t.to(dtype)
            t = t.to(device)
            _set(model, key, t)
            unquantized_bytes += t.nbytes
            step([key])
    finally:
        if bar is not None:
            bar.close()
    model.tie_weights()
    _init_non_persistent_buffers(model, device)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if left:
        raise ValueError(f"mxpass.checkpoint: no data for {', '.join(left)} after loading")
    for fqn, reason in kept.items():
        if fqn in linears:
            mark_kept(linears[fqn].weight, reason)
        else:  # experts
            stored = tensors.experts[fqn]
            for leaf in (stored.gate_up, stored.down):
                mark_kept(getattr(model.get_submodule(fqn), leaf), reason)
    for fqn, name in [*formats.items(), *experts.items()]:
        refuse_eager(model.get_submodule(fqn), fqn, name)
    model.eval()
    _INFOS[model] = LoadInfo(
        path=path, reader=plan.reader if plan.reader != "none" or not online else "online",
        formats=formats, experts=experts, online=tuple(online), activation_scales=activation_scales,
        kept=kept, unused_tensors=tuple(sorted(unused)), seconds=time.perf_counter() - start,
        quantized_bytes=quantized_bytes, unquantized_bytes=unquantized_bytes)
    return model


def _quantize(fmt: Format, w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from mxpass import quant

    with torch.no_grad():
        return quant.quantize_weight(fmt, w, name)


__all__ = ["EagerCallError", "LoadInfo", "info", "load", "stand_in", "UNQUANTIZED"]
