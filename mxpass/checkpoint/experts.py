"""MoE experts stored per expert as 2-D Linears, mapped to transformers v5's 3-D layout.

Shape legend: E experts, I expert intermediate size, H hidden size.

transformers v5 keeps a MoE layer's experts as two 3-D Parameters, ``gate_up_proj [E, 2I, H]``
and ``down_proj [E, H, I]``; checkpoints store them per expert (Qwen2/3-MoE:
``mlp.experts.N.gate_proj.weight``, ``up_proj``, ``down_proj``; Mixtral:
``block_sparse_moe.experts.N.w1`` (gate), ``w3`` (up), ``w2`` (down)). transformers' own
conversion mapping for the model (``conversion_mapping.get_model_conversion_mapping``) says
how: ``WeightRenaming``s first (Mixtral's ``block_sparse_moe`` -> ``mlp``), then one
``WeightConverter`` per 3-D Parameter: ``MergeModulelist(dim=0)`` stacks the experts, and for
gate_up ``Concatenate(dim=1)`` puts gate before up. This module reads that mapping (never a
list of names of its own) to find, for every experts module, each expert's stored modules.

Names here are the checkpoint's after the renamings (``RenamedIndex``), so a module's
``.weight`` and its ``.weight_scale`` are found under the same prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StoredExperts:
    """One experts module whose weights are stored per expert.

    fqn      -- the experts module ("model.layers.0.mlp.experts")
    gate_up  -- its [E, 2I, H] Parameter's name ("gate_up_proj"); rows [gate; up] per expert
    down     -- its [E, H, I] Parameter's name ("down_proj")
    shape    -- (E, I, H)
    modules  -- per expert: the stored (gate, up, down) module names, e.g.
                "model.layers.0.mlp.experts.7.gate_proj" (tensors: + ".weight", ".weight_scale")
    """

    fqn: str
    gate_up: str
    down: str
    shape: tuple[int, int, int]
    modules: tuple[tuple[str, str, str], ...]

    def expected(self, role: int) -> tuple[int, int]:
        """[N, K] of the stored 2-D weight of role 0 (gate), 1 (up) or 2 (down)."""
        _, inter, hidden = self.shape
        return (hidden, inter) if role == 2 else (inter, hidden)


def conversions(model: torch.nn.Module):
    """(renamings, converters) of transformers' conversion mapping for ``model``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model)
    return ([t for t in mapping if isinstance(t, WeightRenaming)],
            [t for t in mapping if isinstance(t, WeightConverter)])


def rename(key: str, renamings) -> str:
    """The checkpoint key after transformers' renamings (not its converters)."""
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(key, renamings, [])[0]


def _role(converter, pattern: str) -> tuple[int, str] | None:
    """(role, why not) of a converter's source pattern: 0 gate, 1 up, 2 down."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    sources = list(converter.source_patterns)
    if ops == [("MergeModulelist", 0), ("Concatenate", 1)] and len(sources) == 2:
        return sources.index(pattern)
    if ops == [("MergeModulelist", 0)] and len(sources) == 1:
        return 2
    return None


def stored_experts(model: torch.nn.Module, names: list[str]) -> dict[str, StoredExperts]:
    """Experts modules of ``model`` whose weights ``names`` (renamed checkpoint keys) hold per
    expert, by module path. Incomplete or unknown layouts are errors naming the tensors."""
    from transformers.core_model_loading import rename_source_key

    _, converters = conversions(model)
    if not converters:
        return {}
    params = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    found: dict[str, dict[int, dict[int, str]]] = {}
    leaves: dict[str, dict[int, str]] = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        target, pattern = rename_source_key(name, [], converters)
        if pattern is None or target not in params:
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        role = _role(converter, pattern)
        if role is None:
            raise NotImplementedError(
                f"mxpass.checkpoint: {name} becomes part of {target} through transformers' conversion "
                f"{[type(op).__name__ for op in converter.operations]}, which mxpass does not implement")
        regex = re.escape(pattern.lstrip(".")).replace(r"\*", r"(\d+)")
        expert = int(re.search(regex, name).group(1))
        owner, _, leaf = target.rpartition(".")
        leaves.setdefault(owner, {})[2 if role == 2 else 0] = leaf
        found.setdefault(owner, {}).setdefault(expert, {})[role] = name[: -len(".weight")]
    out = {}
    for owner, experts in found.items():
        roles = leaves[owner]
        if set(roles) != {0, 2}:
            raise ValueError(f"mxpass.checkpoint: experts of {owner} are stored per expert for "
                             f"{list(roles.values())} only")
        gate_up = params[f"{owner}.{roles[0]}"]
        e, two_i, hidden = gate_up.shape
        missing = [f"expert {i} {('gate', 'up', 'down')[r]}" for i in range(e) for r in range(3)
                   if r not in experts.get(i, {})]
        extra = sorted(set(experts) - set(range(e)))
        if missing or extra:
            what = f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else \
                f"experts {extra} beyond the model's {e}"
            raise ValueError(f"mxpass.checkpoint: the per-expert weights of {owner} ({e} experts) are "
                             f"incomplete: {what}")
        out[owner] = StoredExperts(owner, roles[0], roles[2], (e, two_i // 2, hidden),
                                   tuple((experts[i][0], experts[i][1], experts[i][2]) for i in range(e)))
    return out


# --- loading (called by loader.py) ---


def plan_online_experts(plan, experts: dict[str, StoredExperts], fmt, config, kept: dict[str, str]) -> None:
    """Plan the stored experts the reader left to be quantized in ``fmt`` while reading, where
    the MoE pass's rules allow it (ignore, static activations, H and I multiples)."""
    from mxpass.checkpoint.plan import ExpertsPlan, LayerPlan
    from mxpass.passes.moe import _keep_reason as experts_keep_reason

    for fqn, stored in experts.items():
        if fqn in plan.experts:
            continue
        _, inter, hidden = stored.shape
        reason = experts_keep_reason(fqn, fmt, config, hidden, inter)
        if reason is not None:
            kept[fqn] = reason
            continue
        kept.pop(fqn, None)
        origin = f"online {fmt.name}"
        plan.experts[fqn] = ExpertsPlan(fmt, stored.gate_up, stored.down, tuple(
            tuple(LayerPlan(fmt, f"{m}.weight", None, origin=origin) for m in modules)
            for modules in stored.modules))


def concat_gate_up(fmt, name: str, gate: tuple[torch.Tensor, torch.Tensor],
                   up: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[gate; up] of two quantized [I, H] weights, scales in mxpass's layout: what quantizing
    the [2I, H] weight gives, where the scale groups do not straddle the two."""
    (gd, gs), (ud, us) = gate, up
    inter = gd.shape[0]
    if fmt.weight_granularity == "tensor" and not torch.equal(gs, us):
        raise ValueError(f"mxpass.checkpoint: {name}: gate and up have different per-tensor scales "
                         f"({float(gs):g}, {float(us):g}); mxpass's experts take one scale for [gate; up]")
    if fmt.weight_granularity == "block" and inter % 128:
        raise ValueError(f"mxpass.checkpoint: {name}: I={inter} is not a multiple of 128, so a 128 x 128 "
                         "scale block would hold rows of both gate and up")
    scale = gs if fmt.weight_granularity == "tensor" else torch.cat([gs, us])
    return torch.cat([gd, ud]), scale


def read_quantized_experts(tensors, read, plan, stored: StoredExperts, module: torch.nn.Module,
                           dtype: torch.dtype, device: torch.device, step, bases: dict) -> int:
    """Read (or quantize) every expert, merge into [E, 2I, H] / [E, H, I] on ``device``, give
    ``module`` stand-in 3-D Parameters and seed mxpass's experts cache. Returns bytes placed.

    ``read(name, layer_plan, n, k) -> (data, scale)`` in mxpass's layout. One expert at a
    time: the merged tensors are allocated once, then filled.

    A stand-in is one NaN [N, K] expert expanded over E (strides (0, K, 1)), shared by every
    experts module of that shape through ``bases``: Dynamo traces transformers' experts
    before mxpass rewrites them, and the fake ``_grouped_mm`` accepts only a row- or
    column-major expert (an all-zero-stride tensor is "Invalid strides/sizes", torch 2.13)."""
    from mxpass.checkpoint.loader import _quantize
    from mxpass.weights import seed_quantized_experts

    e_count, inter, hidden = stored.shape
    fmt = plan.fmt
    out: dict[str, list[torch.Tensor]] = {}
    for e, (layers, modules) in enumerate(zip(plan.experts, stored.modules)):
        name = f"{stored.fqn}.{stored.gate_up}[{e}]"
        if layers[0].weight_scale is None:  # online: quantize [gate; up] as the MoE pass would
            w = torch.cat([tensors.get(layers[0].weight), tensors.get(layers[1].weight)]).to(dtype).to(device)
            w13 = _quantize(fmt, w, name)
            del w
            w = tensors.get(layers[2].weight).to(dtype).to(device)
            w2 = _quantize(fmt, w, f"{stored.fqn}.{stored.down}[{e}]")
            del w
        else:
            gate = read(modules[0], layers[0], inter, hidden)
            up = read(modules[1], layers[1], inter, hidden)
            merge = plan.merge_gate_up or (lambda gd, gs, ud, us: concat_gate_up(fmt, name, (gd, gs), (ud, us)))
            w13 = merge(gate[0], gate[1], up[0], up[1])
            w2 = read(modules[2], layers[2], hidden, inter)
        for key, (data, scale) in (("w13", w13), ("w2", w2)):
            if key not in out:
                out[key] = [torch.empty((e_count, *data.shape), dtype=data.dtype, device=device),
                            torch.empty((e_count, *scale.shape), dtype=scale.dtype, device=device)]
            for buf, t in zip(out[key], (data, scale)):
                if buf.shape[1:] != t.shape or buf.dtype != t.dtype:
                    raise ValueError(f"mxpass.checkpoint: expert {e} of {stored.fqn} ({key}) is {t.dtype} "
                                     f"{tuple(t.shape)}; expert 0 was {buf.dtype} {tuple(buf.shape[1:])}")
                buf[e] = t
        step([n for lp in layers for n in (lp.weight, lp.weight_scale, lp.input_scale, *lp.skip) if n])
    placed = 0
    for leaf, key in ((stored.gate_up, "w13"), (stored.down, "w2")):
        n, k = out[key][0].shape[1:]
        base = bases.setdefault((n, k, dtype, device), torch.full((n, k), float("nan"), dtype=dtype, device=device))
        param = torch.nn.Parameter(base.expand(e_count, n, k), requires_grad=False)
        setattr(module, leaf, param)
        seed_quantized_experts(param, fmt, None, *out[key])
        placed += sum(t.nbytes for t in out[key])
    return placed


def read_unquantized_experts(tensors, stored: StoredExperts, module: torch.nn.Module,
                             dtype: torch.dtype, device: torch.device, step) -> int:
    """Merge per-expert weights into the module's 3-D Parameters in ``dtype`` on ``device``."""
    e_count, inter, hidden = stored.shape
    gate_up = torch.empty((e_count, 2 * inter, hidden), dtype=dtype, device=device)
    down = torch.empty((e_count, hidden, inter), dtype=dtype, device=device)
    for e, (g, u, d) in enumerate(stored.modules):
        gate_up[e, :inter].copy_(tensors.get(f"{g}.weight"))
        gate_up[e, inter:].copy_(tensors.get(f"{u}.weight"))
        down[e].copy_(tensors.get(f"{d}.weight"))
        step([f"{m}.weight" for m in (g, u, d)])
    for leaf, t in ((stored.gate_up, gate_up), (stored.down, down)):
        setattr(module, leaf, torch.nn.Parameter(t, requires_grad=getattr(module, leaf).requires_grad))
    return gate_up.nbytes + down.nbytes


# --- saving (called by save.py) ---


def saved_experts(model: torch.nn.Module) -> tuple[dict[str, StoredExperts], dict[str, str]]:
    """The experts modules of ``model`` as transformers saves them per expert, and the module
    names they are saved under.

    transformers' own ``revert_weight_conversion`` (what ``save_pretrained`` writes) is run on
    the model's 3-D Parameters (on ``meta``): ({experts module: StoredExperts with renamed
    per-expert module names}, {renamed per-expert module: its name as saved}), e.g. Mixtral's
    ``model.layers.0.mlp.experts.3.w1`` is saved as ``model.layers.0.block_sparse_moe.experts.3.w1``.
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in model.named_parameters()
              if p.dim() == 3}
    if not params:
        return {}, {}
    saved = [k for k in revert_weight_conversion(model, params) if k.endswith(".weight")]
    renamings, _ = conversions(model)
    source = {rename(k, renamings)[: -len(".weight")]: k[: -len(".weight")] for k in saved}
    return stored_experts(model, [f"{m}.weight" for m in source]), source


def split_experts(model: torch.nn.Module, fqn: str, stored: StoredExperts, fmt, w13, w2,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Quantized experts (``w13 = (data [E, 2I, H], scale)`` with rows [gate; up], ``w2`` for
    down, mxpass's layouts) as the per-expert 2-D tensors transformers' reverse conversion
    names: ``<expert module>.weight`` and ``.weight_scale`` in compressed-tensors' layout
    (plan.py), keyed by the names as saved."""
    from transformers.core_model_loading import revert_weight_conversion

    from mxpass.checkpoint.save import _stored_scale

    e_count, inter, hidden = stored.shape
    if fmt.weight_granularity == "block" and inter % 128:
        raise NotImplementedError(f"mxpass.save: {fqn}: I={inter} is not a multiple of 128, so gate and up "
                                  f"share {fmt.name} scale blocks and cannot be written per expert")
    out = {}
    for leaf, (data, scale) in ((stored.gate_up, w13), (stored.down, w2)):
        if fmt.weight_granularity == "tensor":  # one scale per expert, for gate and up alike
            scale = scale.reshape(e_count, 1, 1).expand(e_count, 2 if leaf == stored.gate_up else 1, 1)
            if leaf == stored.down:
                scale = scale.reshape(e_count, 1)
        key = f"{fqn}.{leaf}"
        out.update(revert_weight_conversion(model, {key: data}))
        for name, s in revert_weight_conversion(model, {key: _stored_scale(fmt, scale, dtype)}).items():
            out[f"{name[: -len('.weight')]}.weight_scale"] = s.reshape(1) if fmt.weight_granularity == "tensor" else s
    return out
