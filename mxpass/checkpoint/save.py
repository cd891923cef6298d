"""``mxpass.save``: write a model quantized by mxpass as a compressed-tensors checkpoint.

    fast = torch.compile(model, backend=mxpass.backend)
    fast(example)                      # compiling quantizes (and caches) the weights
    mxpass.save(fast, "out/")          # or mxpass.save(model, "out/", scheme="mxfp8") without compiling

Which Linears are written quantized, and in which format:
  - ``scheme`` given: every Linear that the linear pass would quantize with that scheme (the
    same rules: lm_head, router gates, ``ignore``, K not a multiple of the block; a layer
    loaded quantized keeps its data and must be in that scheme), quantized now where mxpass's
    weight cache has no entry yet;
  - no scheme: the Linears mxpass's weight cache holds quantized (a compile, or a load),
    each in its format; a weight quantized in several formats is an error (pass ``scheme``).
MoE experts (3-D ``gate_up_proj`` / ``down_proj``) follow the same choice (the MoE pass's
rules with ``scheme``, else what the experts cache holds) and are written per expert as 2-D
Linears, the layout compressed-tensors and vLLM checkpoints use. Every name is the one
transformers' ``save_pretrained`` writes (its ``revert_weight_conversion``: renamings
reverted, experts split per expert, e.g. Qwen3-MoE ``mlp.experts.N.gate_proj``, Mixtral
``block_sparse_moe.experts.N.w1``), and the config refers to modules by those names.
Everything else is written as it is in the model; 2-D weights left in the model dtype
(kept Linears, router modules) are listed in ``ignore``. The files: ``config.json`` (the
model's config plus a ``quantization_config`` that compressed-tensors validates: one config
group per format), safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n`` with an
index past ``max_shard_bytes``). Stored layouts are the ones the compressed-tensors reader
reads (compressed_tensors.py); MXFP8 E8M0 scales as uint8, other scales and static input
scales in the model dtype when that holds them exactly (it does for scales mxpass computes
from weights in that dtype), else float32.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from mxpass.checkpoint.compressed_tensors import (CompressedTensorsReader, read_quantization_config,
                                                  scheme_args, stored_format)
from mxpass.checkpoint.experts import conversions, rename, saved_experts, split_experts, stored_experts
from mxpass.checkpoint.loader import _tied_weights
from mxpass.checkpoint.tensors import INDEX, SINGLE, SafetensorsIndex
from mxpass.config import QuantConfig
from mxpass.formats import Format, get_format
from mxpass.passes.linear import layer_format
from mxpass.weights import (cache_keys, cached_weights, input_scale, prequantized_scheme, quantized_experts,
                            quantized_weight)

DEFAULT_SHARD_BYTES = 5 * 2**30


def _exact_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` if that represents every value exactly, else in float32."""
    low = t.to(dtype)
    return low if torch.equal(low.float(), t.float()) else t.float()


def _stored_scale(fmt: Format, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if fmt.family == "mxfp8":
        return scale.view(torch.uint8)  # E8M0 bytes, as compressed-tensors stores them
    return _exact_in(scale, dtype)


def _choose(model, config: QuantConfig, explicit: bool) -> tuple[dict, list[str]]:
    """({fqn: (fmt, data, scale, input scale)}, [Linears written unquantized])."""
    tied = _tied_weights(model)
    layers, kept = {}, []
    for fqn, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        param = module.weight
        n, k = param.shape
        if explicit:
            fmt, reason = layer_format(param, fqn, n, k, config, tied=f"{fqn}.weight" in tied)
            if fmt is None:
                kept.append(fqn)
                continue
        else:
            stored = prequantized_scheme(param)
            cached = cached_weights(param)
            if stored is None and len(cached) > 1:
                raise ValueError(f"mxpass.save: {fqn} is quantized in several formats ({', '.join(cached)}); "
                                 "pass scheme= to choose one")
            if stored is None and not cached:
                kept.append(fqn)
                continue
            fmt = get_format(stored or next(iter(cached)))
        if f"{fqn}.weight" in tied:
            raise NotImplementedError(f"mxpass.save: {fqn} shares its weight with another module (tied "
                                      "embeddings); a quantized tied weight cannot be written")
        data, scale = quantized_weight(param, fmt, False, fqn)
        act = None
        if fmt.static_activation:
            act = config.activation_scale(fqn)
            act = act if act is not None else input_scale(param, fmt)
            if act is None:
                raise ValueError(f"mxpass.save: {fqn} ({fmt.name}) needs a static input scale and none is "
                                 "known (pass activation_scales=, or compile with them first)")
        layers[fqn] = (fmt, data, scale, act)
    return layers, kept


def _choose_experts(model, config: QuantConfig, explicit: bool, experts: dict) -> tuple[dict, list[str]]:
    """({experts module: (fmt, (data, scale) of gate_up, of down)}, [experts written unquantized]),
    the experts' counterpart of :func:`_choose` (the MoE pass's rules with ``scheme``)."""
    from mxpass.passes.moe import _experts_format

    chosen, kept = {}, []
    for fqn, stored in experts.items():
        module = model.get_submodule(fqn)
        w13, w2 = getattr(module, stored.gate_up), getattr(module, stored.down)
        _, inter, hidden = stored.shape
        if explicit:
            fmt, _reason = _experts_format(fqn, w13, config, hidden, inter)
        else:
            names = list(dict.fromkeys(k[0] for k in cache_keys(w13) if len(k) == 3))
            stored_fmt = prequantized_scheme(w13)
            if stored_fmt is None and len(names) > 1:
                raise ValueError(f"mxpass.save: experts {fqn} are quantized in several formats "
                                 f"({', '.join(names)}); pass scheme= to choose one")
            fmt = get_format(stored_fmt or names[0]) if stored_fmt or names else None
        if fmt is None:
            kept.append(fqn)
            continue
        # rows [gate; up]: the layout transformers' conversion (Concatenate gate, up) gives the model
        chosen[fqn] = (fmt, quantized_experts(w13, fmt, f"{fqn}.{stored.gate_up}"),
                       quantized_experts(w2, fmt, f"{fqn}.{stored.down}"))
    return chosen, kept


def _experts_pattern(saved: dict[str, str], stored) -> str:
    """A ``re:`` target matching exactly the saved per-expert modules of ``stored``."""
    names = [saved[m] for modules in stored.modules for m in modules]
    heads = {re.sub(r"\.\d+\.[^.]+$", "", n) for n in names}
    leaves = sorted({n.rsplit(".", 1)[1] for n in names})
    if len(heads) != 1:
        raise NotImplementedError(f"mxpass.save: the experts of {stored.fqn} are saved under several "
                                  f"prefixes {sorted(heads)}")
    pattern = f"re:^{re.escape(heads.pop())}\\.\\d+\\.({'|'.join(map(re.escape, leaves))})$"
    regex = re.compile(pattern[3:])
    if not all(regex.match(n) for n in names):
        raise RuntimeError(f"mxpass.save: {pattern} does not match the experts of {stored.fqn}")
    return pattern


def _quantization_config(targets: dict[str, list[str]], ignore: list[str]) -> dict:
    """``targets``: {format name: module names as saved (exact, or ``re:`` patterns)}."""
    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups = {}
    for i, (name, names) in enumerate(targets.items()):
        fmt = get_format(name)
        names = ["Linear"] if len(targets) == 1 else names  # exact names and patterns beat the class
        groups[f"group_{i}"] = QuantizationScheme(targets=names, format=stored_format(fmt), **scheme_args(fmt))
    formats = {s.format for s in groups.values()}
    qconfig = QuantizationConfig(config_groups=groups, ignore=list(ignore), quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")
    # the fields compressed-tensors' ModelCompressor.update_config writes
    return {"version": __version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **qconfig.model_dump(mode="json", exclude=["quant_method"])}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save(model: torch.nn.Module, out_dir: str, scheme: str | None = None, *, ignore=(),
         quantize_lm_head: bool = False, activation_scales: dict[str, float] | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """Write ``model`` (or its ``torch.compile`` wrapper) to ``out_dir`` as a compressed-tensors
    checkpoint (module docstring). Returns {module path: mxpass format} of the Linears and
    experts modules written quantized."""
    from transformers.core_model_loading import revert_weight_conversion

    model = getattr(model, "_orig_mod", model)
    config = QuantConfig(scheme=scheme, ignore=ignore, quantize_lm_head=quantize_lm_head,
                         activation_scales=activation_scales or {})
    layers, kept = _choose(model, config, explicit=scheme is not None)
    experts, saved_names = saved_experts(model)
    quantized_experts_, kept_experts = _choose_experts(model, config, scheme is not None, experts)
    if not layers and not quantized_experts_:
        raise ValueError("mxpass.save: no layer of the model is quantized (compile it with the mxpass "
                         "backend first, or pass scheme=)")
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    experts_weights = {id(getattr(model.get_submodule(f), leaf)) for f, e in experts.items()
                       for leaf in (e.gate_up, e.down)}
    for name, p in model.named_parameters():
        if id(p) not in linear_weights | experts_weights and prequantized_scheme(p) is not None:
            raise NotImplementedError(f"mxpass.save: {name} was loaded quantized and is neither a Linear "
                                      "weight nor experts stored per expert; it cannot be written")

    tensors: dict[str, torch.Tensor] = {}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # the copies, not the source
    written_apart = {f"{fqn}.weight" for fqn in layers} | {
        f"{fqn}.{leaf}" for fqn in quantized_experts_ for leaf in (experts[fqn].gate_up, experts[fqn].down)}
    state = model.state_dict()
    for key, value in state.items():
        if key in written_apart or key in tied:
            continue
        if prequantized_scheme(value) is not None:
            raise ValueError(f"mxpass.save: {key} is a loaded stand-in without data that is not written quantized")
        tensors[key] = value
    linear_tensors = {}
    for fqn, (fmt, data, scale, act) in layers.items():
        dtype = model.get_submodule(fqn).weight.dtype
        own = {"weight": data, "weight_scale": _stored_scale(fmt, scale, dtype)}
        if act is not None:
            own["input_scale"] = _exact_in(torch.tensor([act], dtype=torch.float32), dtype)
        linear_tensors[fqn] = own
        tensors.update({f"{fqn}.{k}": t for k, t in own.items()})

    # names and layout as transformers' save_pretrained writes them (its reverse conversion:
    # renamings, 3-D experts split per expert); a quantized Linear may only be renamed
    saved = revert_weight_conversion(model, tensors)
    saved_as = {id(t): k for k, t in saved.items()}
    stored_name = {}
    for fqn, own in linear_tensors.items():
        new = saved_as.get(id(own["weight"]), "")[: -len(".weight")]
        if not new or any(saved.get(f"{new}.{k}") is not t for k, t in own.items()):
            raise NotImplementedError(f"mxpass.save: transformers' conversion for {type(model).__name__} changes "
                                      f"{fqn}'s weight beyond a renaming; it cannot be written quantized")
        stored_name[fqn] = new
    for fqn in kept:
        weight = state.get(f"{fqn}.weight")
        stored_name[fqn] = saved_as.get(id(weight), f"{fqn}.weight")[: -len(".weight")]
    for fqn, (fmt, w13, w2) in quantized_experts_.items():
        dtype = getattr(model.get_submodule(fqn), experts[fqn].gate_up).dtype
        saved.update(split_experts(model, fqn, experts[fqn], fmt, w13, w2, dtype))
    tensors = saved

    targets: dict[str, list[str]] = {}
    for fqn, (fmt, *_rest) in layers.items():
        targets.setdefault(fmt.name, []).append(stored_name[fqn])
    for fqn, (fmt, *_rest) in quantized_experts_.items():
        targets.setdefault(fmt.name, []).append(_experts_pattern(saved_names, experts[fqn]))
    ignore_names = [stored_name[f] for f in kept] + [_experts_pattern(saved_names, experts[f]) for f in kept_experts]
    # other 2-D weights written in the model dtype (router modules: Linears in vLLM and in the
    # per-expert checkpoints compressed-tensors quantizes), so that targets ["Linear"] skips them
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    for key, value in state.items():
        name = saved_as.get(id(value))
        if (name is not None and value.dim() == 2 and value.is_floating_point() and key not in embeddings
                and key.endswith(".weight") and name[: -len(".weight")] not in ignore_names
                and key[: -len(".weight")] not in layers):
            ignore_names.append(name[: -len(".weight")])

    os.makedirs(out_dir, exist_ok=True)
    model.config.save_pretrained(out_dir)
    file = os.path.join(out_dir, "config.json")
    with open(file) as f:
        hf_config = json.load(f)
    hf_config["quantization_config"] = _quantization_config(targets, ignore_names)
    read_quantization_config(hf_config)  # compressed-tensors validates it
    with open(file, "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)

    shards = _shards(tensors, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for stale in os.listdir(out_dir):  # a previous save's weights
        if stale in (INDEX, SINGLE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
            os.remove(os.path.join(out_dir, stale))
    for name, keys in zip(names, shards):
        save_file({k: _own_storage(tensors[k].detach().to("cpu").contiguous()) for k in keys},
                  os.path.join(out_dir, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)

    # what was written reads back as planned
    index = SafetensorsIndex(out_dir)
    renamings, _ = conversions(model)
    if renamings:
        index.rename(lambda key: rename(key, renamings))
    index.experts = stored_experts(model, index.names())
    plan = CompressedTensorsReader().plan(hf_config["quantization_config"], model, index)
    written = {**{fqn: lp.fmt.name for fqn, lp in plan.layers.items()},
               **{fqn: ep.fmt.name for fqn, ep in plan.experts.items()}}
    expected = {**{fqn: fmt.name for fqn, (fmt, *_rest) in layers.items()},
                **{fqn: fmt.name for fqn, (fmt, *_rest) in quantized_experts_.items()}}
    if written != expected:
        raise RuntimeError(f"mxpass.save: the written config plans {written}, not {expected}")
    return expected


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view (merged layers' weights are row slices of one tensor,
    and safetensors refuses tensors that share memory)."""
    return t.clone() if t._base is not None else t
