"""Load a compressed-tensors checkpoint for mxpass, keeping its quantized weights as stored.

    model, info = mxpass.checkpoint.load(path)
    fast = torch.compile(model, backend=mxpass.backend(
        scheme=info.scheme, activation_scales=info.activation_scales, ignore=info.ignore))
    # or: mxpass.backend(**info.backend_kwargs())

The model is built from ``config.json`` on the ``meta`` device. Tensors of unquantized
modules (embeddings, norms, lm_head, layers in the config's ``ignore``) are read from the
safetensors files and assigned. A quantized Linear gets a stand-in weight Parameter (one
NaN element expanded to [N, K]) and mxpass's weight cache is seeded with the checkpoint's
(weight, weight_scale) for it, so the linear pass uses the stored bytes and quantizes
nothing. The model therefore runs only through ``torch.compile`` with the mxpass backend
and ``info.scheme``; anything else meets the NaN stand-ins.

``info.ignore`` names every Linear the checkpoint left unquantized: pass it to the backend,
or mxpass would quantize those layers online.

Supported: one config group (one scheme) whose args map to an mxpass format (the table
in :func:`format_for_scheme`), stored as "float-quantized", "int-quantized",
"naive-quantized" or "mxfp8-quantized". Stored layouts (N = out features, K = in):

    format          weight            weight_scale                       -> mxpass scale
    mxfp8, mxfp8-w  [N, K] e4m3       [N, K // 32] uint8 (E8M0 bytes)    view float8_e8m0fnu
    fp8-dynamic,    [N, K] e4m3       [N, 1] model dtype                 float32 [N, 1]
      fp8-w
    fp8, fp8-w-tensor [N, K] e4m3     [1] model dtype                    float32 [1]
    fp8-block, ...  [N, K] e4m3       [ceil(N/128), ceil(K/128)]         float32, same shape
    int8            [N, K] int8       [N, 1]                             float32 [N, 1]
    int8-static     [N, K] int8       [1]                                float32 [1]

Static schemes ("fp8", "int8-static") also store ``input_scale`` per layer; they are
returned as ``info.activation_scales`` ({module path: float}).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from mxpass.formats import Format, format_names, get_format
from mxpass.weights import seed_quantized_weight

_STORED_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "mxfp8-quantized")
_MX_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LoadInfo:
    """What :func:`load` found.

    scheme            -- the mxpass format name of the checkpoint's scheme
    activation_scales -- static per-tensor input scales by module path (static schemes)
    ignore            -- Linear modules the checkpoint keeps unquantized (exact paths)
    quantized         -- module paths whose weights were seeded from the checkpoint
    unused_tensors    -- checkpoint tensors that no module took (e.g. zero points)
    """

    scheme: str
    activation_scales: dict[str, float] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    quantized: tuple[str, ...] = ()
    unused_tensors: tuple[str, ...] = ()

    @property
    def quantize_lm_head(self) -> bool:
        return any(p.rsplit(".", 1)[-1] == "lm_head" for p in self.quantized)

    def backend_kwargs(self) -> dict:
        """Arguments for ``mxpass.backend`` that reproduce the checkpoint's choices."""
        return dict(scheme=self.scheme, activation_scales=dict(self.activation_scales),
                    ignore=list(self.ignore), quantize_lm_head=self.quantize_lm_head)


# --- config -> format ---


def _describe(args) -> str:
    if args is None:
        return "none"
    keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size",
            "block_structure", "scale_dtype")
    return ", ".join(f"{k}={getattr(args, k, None)!s}" for k in keys)


def _weight_kind(w) -> tuple[str, str] | None:
    """(family, weight granularity) of compressed-tensors weight args, or None."""
    if w is None or w.num_bits != 8 or not w.symmetric or w.dynamic:
        return None
    strategy = str(getattr(w.strategy, "value", w.strategy))
    if w.type == "float":
        if strategy == "group" and w.group_size == 32 and w.scale_dtype in _MX_SCALE_DTYPES:
            return "mxfp8", "mx32"
        if w.scale_dtype is not None and w.scale_dtype not in _FLOATS:
            return None
        if strategy == "block" and list(w.block_structure or ()) == [128, 128]:
            return "fp8", "block"
        if strategy in ("channel", "tensor"):
            return "fp8", strategy
    if w.type == "int" and strategy in ("channel", "tensor"):
        return "int8", strategy
    return None


def _activation_kind(a, family: str) -> str | None | bool:
    """mxpass activation granularity of compressed-tensors input args (None: weight-only);
    False when there is no mxpass equivalent."""
    if a is None:
        return None
    if a.num_bits != 8 or not a.symmetric or a.type != ("int" if family == "int8" else "float"):
        return False
    strategy = str(getattr(a.strategy, "value", a.strategy))
    if family == "mxfp8":
        ok = strategy == "group" and a.group_size == 32 and a.dynamic is True
        return "mx32" if ok else False
    if strategy == "token" and a.dynamic is True:
        return "token"
    if strategy == "tensor" and a.dynamic is False:
        return "tensor"
    if strategy == "group" and a.group_size == 128 and a.dynamic is True and family == "fp8":
        return "group"
    return False


def format_for_scheme(scheme) -> Format:
    """The mxpass format equal to a compressed-tensors ``QuantizationScheme``.

    Weights: 8-bit symmetric, static; float group 32 with uint8 (E8M0) scales -> MXFP8,
    float channel / tensor / 128x128 block -> FP8, int channel / tensor -> INT8.
    Activations: none (weight-only), MX group 32, token (dynamic), tensor (static), 1x128
    group (dynamic). A combination with no mxpass format is a ValueError naming the args.
    """
    found = f"weights: {_describe(scheme.weights)}; input_activations: {_describe(scheme.input_activations)}"
    if scheme.output_activations is not None:
        raise NotImplementedError(
            f"mxpass.checkpoint: output activation quantization is not supported ({found}; "
            f"output_activations: {_describe(scheme.output_activations)})")
    kind = _weight_kind(scheme.weights)
    act = _activation_kind(scheme.input_activations, kind[0]) if kind else False
    if kind is not None and act is not False:
        for name in format_names():
            fmt = get_format(name)
            if (fmt.family, fmt.weight_granularity, fmt.activation) == (*kind, act):
                return fmt
    raise ValueError(f"mxpass.checkpoint: no mxpass scheme matches the checkpoint's scheme ({found}); "
                     f"known mxpass schemes: {', '.join(format_names())}")


def read_quantization_config(config: dict):
    """compressed-tensors ``QuantizationConfig`` of an HF config dict, checked for what load supports."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = config.get("quantization_config")
    if raw is None:
        raise ValueError("mxpass.checkpoint: config.json has no quantization_config")
    if raw.get("quant_method", "compressed-tensors") != "compressed-tensors":
        raise NotImplementedError(
            f"mxpass.checkpoint: quant_method {raw.get('quant_method')!r} is not supported "
            "(only compressed-tensors)")
    qconfig = QuantizationConfig.model_validate(raw)
    for what in ("sparsity_config", "transform_config"):
        if raw.get(what):
            raise NotImplementedError(f"mxpass.checkpoint: a non-empty {what} is not supported")
    if qconfig.kv_cache_scheme is not None:
        raise NotImplementedError("mxpass.checkpoint: kv_cache_scheme is not supported")
    if len(qconfig.config_groups) != 1:
        raise NotImplementedError(
            f"mxpass.checkpoint: {len(qconfig.config_groups)} config groups "
            f"({', '.join(qconfig.config_groups)}); only one scheme per checkpoint is supported")
    return qconfig


# --- tensors ---


class _Tensors:
    """Lazy access to a checkpoint's safetensors files (single file or sharded with an index)."""

    def __init__(self, path: str, device: torch.device):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"mxpass.checkpoint: no model.safetensors(.index.json) in {path}")
            weight_map = None
        self.files: dict[str, object] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in names:
            file = os.path.join(path, name)
            try:
                self.files[name] = safe_open(file, framework="pt", device=str(device))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"mxpass.checkpoint: cannot read {file} (truncated or not a "
                                 f"safetensors file?): {e}") from None
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.files["model.safetensors"].keys()}
        self.where = weight_map
        self.unused = set(weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, what: str) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(f"mxpass.checkpoint: tensor {key!r} ({what}) is missing from the checkpoint")
        self.unused.discard(key)
        try:
            return self.files[self.where[key]].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"mxpass.checkpoint: cannot read tensor {key!r} from "
                             f"{self.where[key]} (truncated file?): {e}") from None


def _check(key: str, t: torch.Tensor, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...]):
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"mxpass.checkpoint: tensor {key!r} has shape {tuple(t.shape)}; "
                         f"expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"mxpass.checkpoint: tensor {key!r} has dtype {t.dtype}; expected "
                        f"{' or '.join(str(d) for d in dtypes)}")


def _scale_layout(fmt: Format, n: int, k: int) -> tuple[tuple[int, ...] | None, tuple[torch.dtype, ...]]:
    """Expected stored weight_scale (shape, dtypes); shape None: any with one element."""
    if fmt.weight_granularity == "mx32":
        return (n, k // 32), _MX_SCALE_DTYPES
    if fmt.weight_granularity == "channel":
        return (n, 1), _FLOATS
    if fmt.weight_granularity == "block":
        return (-(-n // 128), -(-k // 128)), _FLOATS
    return None, _FLOATS


def _quantized_layer(tensors: _Tensors, fqn: str, fmt: Format, n: int, k: int, device):
    """(data, scale) of layer ``fqn`` in mxpass's layout, checked."""
    wkey, skey = f"{fqn}.weight", f"{fqn}.weight_scale"
    data = tensors.get(wkey, f"{fmt.name} weight of {fqn}")
    _check(wkey, data, (n, k), (fmt.weight,))
    scale = tensors.get(skey, f"{fmt.name} weight scale of {fqn}")
    shape, dtypes = _scale_layout(fmt, n, k)
    _check(skey, scale, shape, dtypes)
    if shape is None and scale.numel() != 1:
        raise ValueError(f"mxpass.checkpoint: tensor {skey!r} has shape {tuple(scale.shape)}; "
                         "expected one element (per-tensor scale)")
    if fmt.family == "mxfp8":
        scale = scale.view(torch.float8_e8m0fnu)  # E8M0 bytes, OCP MX v1.0 section 5.4.1
    else:
        scale = scale.float().reshape(shape if shape is not None else (1,))
    return data.to(device).contiguous(), scale.to(device).contiguous()


# --- model ---


def _build_meta_model(path: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # mxpass, not transformers, handles the quantized layers
    with torch.device("meta"):
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


def _stand_in(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An [n, k] weight with one element of storage, all NaN.

    On the model's device, not ``meta``: Dynamo's fake tensors refuse a meta weight beside
    real activations ("Tensor device mismatch"). NaN rather than zero: a model run without
    the mxpass backend, or a backend asked for another scheme (no seeded entry, so mxpass
    would quantize the stand-in), fails loudly (mxpass refuses non-finite weights).
    """
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(n, k)


def load(path: str, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.bfloat16) -> tuple[torch.nn.Module, LoadInfo]:
    """(model, info) of the compressed-tensors checkpoint in directory ``path`` (module docstring)."""
    from compressed_tensors.utils import match_named_modules

    device = torch.device(device)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    qconfig = read_quantization_config(config)
    (group_name, scheme), = qconfig.config_groups.items()
    stored = scheme.format or qconfig.format
    if stored not in _STORED_FORMATS:
        raise NotImplementedError(
            f"mxpass.checkpoint: config group {group_name!r} is stored as {stored!r}; "
            f"supported: {', '.join(_STORED_FORMATS)}")
    fmt = format_for_scheme(scheme)

    model = _build_meta_model(path, dtype)
    quantized = dict(match_named_modules(model, scheme.targets, qconfig.ignore))
    for fqn, module in quantized.items():
        if not isinstance(module, torch.nn.Linear):
            raise NotImplementedError(
                f"mxpass.checkpoint: {fqn} ({type(module).__name__}) matches the scheme's targets "
                f"{scheme.targets}; only Linear layers are supported")

    tensors = _Tensors(path, device)
    activation_scales: dict[str, float] = {}
    for fqn, module in quantized.items():
        n, k = module.weight.shape
        data, scale = _quantized_layer(tensors, fqn, fmt, n, k, device)
        stand_in = torch.nn.Parameter(_stand_in(n, k, dtype, device), requires_grad=False)
        module.weight = stand_in
        seed_quantized_weight(stand_in, fmt, False, data, scale)
        if fmt.static_activation:
            key = f"{fqn}.input_scale"
            s = tensors.get(key, f"static input scale of {fqn} ({fmt.name})")
            _check(key, s, None, _FLOATS)
            if s.numel() != 1:
                raise ValueError(f"mxpass.checkpoint: tensor {key!r} has shape {tuple(s.shape)}; "
                                 "expected one element (per-tensor scale)")
            activation_scales[fqn] = float(s.float())

    skip = {f"{fqn}.weight" for fqn in quantized}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for key, meta in model.state_dict().items():
        if key in skip or (key in tied and key not in tensors):
            continue
        t = tensors.get(key, "unquantized tensor")
        want = (dtype,) + _FLOATS if meta.is_floating_point() else (meta.dtype,)
        _check(key, t, meta.shape, want)
        _set(model, key, t.to(device=device, dtype=dtype if meta.is_floating_point() else t.dtype))
    model.tie_weights()
    _init_non_persistent_buffers(model, device)

    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
            if p.device.type == "meta" and n not in skip]
    if left:
        raise ValueError(f"mxpass.checkpoint: no data for {', '.join(left)} after loading")
    model.eval()
    ignore = tuple(n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n not in quantized)
    info = LoadInfo(scheme=fmt.name, activation_scales=activation_scales, ignore=ignore,
                    quantized=tuple(quantized), unused_tensors=tuple(sorted(tensors.unused)))
    return model, info
