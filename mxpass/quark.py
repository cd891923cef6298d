"""AMD Quark checkpoints (``quantization_config.quant_method == "quark"``) for mxpass.

    model = mxpass.load("path/to/quark-checkpoint")     # QuarkReader, registered in checkpoint/plan.py
    plan = quark.read_plan(config["quantization_config"], model)   # model: built on meta
    plan.layers["model.layers.0.mlp.down_proj"]  # -> QuarkLayer(format int8, tensor names, ...)

The config is a serialized Quark ``QConfig`` (quark/torch/quantization/config/config.py,
``QConfig.to_dict``; docs/checkpoints-quark.md lists every field with its source). Each Linear
gets the Quark layer config that Quark and vLLM pick for it (:meth:`QuarkConfig.resolve`),
which maps to one mxpass format (:func:`format_for`), or is excluded and stays in the model
dtype. Anything else is an error naming the layer, where its config came from, and the config.

Quark schemes -> mxpass (N = out features; "token" = per_channel dynamic activations, ch_axis 1)

    weight                  input_tensors                mxpass        stored weight_scale -> mxpass
    int8 per_channel (ax 0) int8 per-token dynamic       int8          [N] -> [N, 1]
    int8 per_tensor         int8 per-token dynamic       int8          [] -> [N, 1] (broadcast, exact)
    int8 per_tensor         int8 per_tensor static       int8-static   [] -> [1]
    fp8_e4m3 per_tensor     fp8_e4m3 per_tensor static   fp8           [] -> [1]
    fp8_e4m3 per_channel    fp8_e4m3 per-token dynamic   fp8-dynamic   [N] -> [N, 1]
    fp8_e4m3 per_tensor     fp8_e4m3 per-token dynamic   fp8-dynamic   [] -> [N, 1] (broadcast, exact)
    fp8_e4m3 per_channel    none (weight-only)           fp8-w         [N] -> [N, 1]
    fp8_e4m3 per_tensor     none (weight-only)           fp8-w-tensor  [] -> [1]

A per-tensor scale s written into every row of a per-channel scale dequantizes to the same
values (data * s, one product per element either way), so a per-tensor weight runs exactly
on mxpass's per-channel formats; vLLM does the same for fused per-tensor modules
(``convert_to_channelwise`` in vllm/model_executor/layers/quantization/kernels/scaled_mm/).
INT8 zero points (``weight_zero_point``, ``input_zero_point``) of these symmetric schemes
must be zero and are dropped (vLLM's QuarkW8A8Int8.process_weights_after_loading deletes
them); a nonzero one is an error naming the tensor.

MoE experts stored per expert as 2-D Linears: :class:`QuarkReader` plans them for the
loader's merge into [gate; up] (docs/checkpoints-quark.md, "MoE experts").
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

from mxpass.formats import Format, get_format

QUANT_METHOD = "quark"

# Quark Dtype names (quark/torch/quantization/config/type.py, serialized by ``Dtype.name``)
# of the 8-bit element types mxpass stores, and their torch dtypes.
_ELEMENT = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_FAMILY = {"int8": "int8", "fp8_e4m3": "fp8"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ZERO_POINT_DTYPES = (torch.int8, torch.uint8, torch.int32)
# Quark ScaleType values (quark/torch/quantization/config/type.py) whose scales are stored
# as plain floats; "float8_e5m3" and "float8_e8m0fnu" store encoded bytes.
_FLOAT_SCALE_TYPES = (None, "float", "float32", "float16", "bfloat16", "pof2")
# Quark's per-token activation spec is per_channel along ch_axis 1 (PTPCFP8Scheme in
# quark/torch/quantization/config/template.py); vLLM checks only qscheme and is_dynamic.
_TOKEN_AXES = (None, 0, 1)


class QuarkConfigError(ValueError):
    """A Quark config or tensor mxpass cannot load (the message names the layer or tensor)."""


def _err(msg: str) -> QuarkConfigError:
    return QuarkConfigError(f"mxpass.quark: {msg}")


# --- config ---


@dataclass(frozen=True)
class TensorSpec:
    """One Quark ``QTensorConfig`` dict (weight, input_tensors, output_tensors or bias)."""

    dtype: str
    qscheme: str | None
    ch_axis: int | None
    group_size: int | None
    is_dynamic: bool | None
    symmetric: bool | None
    scale_format: str | None
    scale_type: str | None
    raw: dict = field(compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, where: str) -> "TensorSpec | None":
        if d is None:
            return None
        if isinstance(d, list):
            raise _err(f"{where}: a list of {len(d)} specs (two-stage / scale quantization) is "
                       f"not supported; mxpass reads one 8-bit spec. Got {d}")
        if not isinstance(d, dict) or "dtype" not in d:
            raise _err(f"{where}: expected a Quark QTensorConfig dict with a 'dtype'; got {d!r}")
        return cls(dtype=d["dtype"], qscheme=d.get("qscheme"), ch_axis=d.get("ch_axis"),
                   group_size=d.get("group_size"), is_dynamic=d.get("is_dynamic"),
                   symmetric=d.get("symmetric"), scale_format=d.get("scale_format"),
                   scale_type=d.get("scale_type"), raw=d)


@dataclass(frozen=True)
class LayerSpec:
    """One Quark ``QLayerConfig`` dict: how a layer's tensors are quantized."""

    weight: TensorSpec | None
    input_tensors: TensorSpec | None
    output_tensors: TensorSpec | None
    bias: TensorSpec | None
    raw: dict = field(compare=False, repr=False)

    @classmethod
    def from_dict(cls, d, where: str) -> "LayerSpec":
        if not isinstance(d, dict):
            raise _err(f"{where}: expected a Quark QLayerConfig dict; got {d!r}")
        return cls(**{k: TensorSpec.from_dict(d.get(k), f"{where}.{k}")
                      for k in ("weight", "input_tensors", "output_tensors", "bias")}, raw=d)


@dataclass(frozen=True)
class Resolved:
    """The config a layer gets: ``spec`` None when ``exclude`` matches (``source`` says which)."""

    source: str
    spec: LayerSpec | None


@dataclass(frozen=True)
class QuarkConfig:
    """A checkpoint's ``quantization_config`` with ``quant_method: "quark"``.

    global_quant_config     -- LayerSpec for every layer nothing more specific matches
    layer_quant_config      -- (name pattern, LayerSpec), in the file's order
    layer_type_quant_config -- {module class name ("Linear"): LayerSpec}
    exclude                 -- layers Quark left unquantized (patterns, :meth:`excluded_by`)
    """

    global_quant_config: LayerSpec
    layer_quant_config: tuple[tuple[str, LayerSpec], ...] = ()
    layer_type_quant_config: tuple[tuple[str, LayerSpec], ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, qc: dict) -> "QuarkConfig":
        """Parse ``config.json``'s ``quantization_config`` (checked for what mxpass reads)."""
        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            raise _err(f"quant_method is {method!r}; expected {QUANT_METHOD!r}")
        if "global_quant_config" not in qc:
            raise _err("quantization_config has no 'global_quant_config'")
        export = qc.get("export") or {}
        if export.get("weight_format", "real_quantized") != "real_quantized":
            raise _err(f"export.weight_format is {export['weight_format']!r}: the checkpoint stores "
                       "float weights; mxpass loads 'real_quantized' Quark checkpoints")
        kv = export.get("kv_cache_group") or []
        if kv or qc.get("kv_cache_quant_config"):
            raise _err(f"KV-cache quantization (export.kv_cache_group {kv}, kv_cache_quant_config "
                       f"{qc.get('kv_cache_quant_config')}) is not supported")
        if qc.get("softmax_quant_spec") is not None:
            raise _err(f"softmax_quant_spec is not supported: {qc['softmax_quant_spec']}")
        algos = qc.get("algo_config") or []
        for algo in algos if isinstance(algos, list) else [algos]:
            name = str((algo or {}).get("name", ""))
            if "rotation" in name or "quarot" in name:
                raise _err(f"algo_config {name!r} stores rotations the model must apply at run "
                           "time; not supported")
        layers = qc.get("layer_quant_config") or {}
        types = qc.get("layer_type_quant_config") or {}
        exclude = qc.get("exclude") or []
        for pattern in exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise _err(f"exclude pattern {pattern!r} is not a valid regex: {e}") from None
        return cls(
            global_quant_config=LayerSpec.from_dict(qc["global_quant_config"], "global_quant_config"),
            layer_quant_config=tuple((k, LayerSpec.from_dict(v, f"layer_quant_config[{k!r}]"))
                                     for k, v in layers.items()),
            layer_type_quant_config=tuple((k, LayerSpec.from_dict(v, f"layer_type_quant_config[{k!r}]"))
                                          for k, v in types.items()),
            exclude=tuple(exclude))

    def excluded_by(self, name: str) -> str | None:
        """The ``exclude`` entry that matches module path ``name``, if any.

        An entry matches as vLLM reads it (should_ignore_layer in
        vllm/model_executor/layers/quantization/quark/utils.py: equal, or ``re:``-prefixed
        regex matched from the start) or as Quark applies it when quantizing
        (get_layer_quant_config in quark/torch/export/main_export/quant_config_parser.py:
        ``fnmatch``; QConfig.__post_init__ adds ``entry + ".*"``, so a module's children are
        excluded with it).
        """
        for pattern in self.exclude:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return pattern
            elif (name == pattern or fnmatch.fnmatchcase(name, pattern)
                  or fnmatch.fnmatchcase(name, pattern + ".*")):
                return pattern
        return None

    def resolve(self, name: str, module_type: str) -> Resolved:
        """The config of layer ``name`` (a module of class ``module_type``).

        Precedence as in vLLM's QuarkConfig._find_matched_config and Quark's
        get_layer_quant_config: ``exclude``, then the first ``layer_quant_config`` pattern
        that matches (fnmatch), then ``layer_type_quant_config`` by class name, then
        ``global_quant_config``.
        """
        hit = self.excluded_by(name)
        if hit is not None:
            return Resolved(f"exclude[{hit!r}]", None)
        for pattern, spec in self.layer_quant_config:
            if fnmatch.fnmatchcase(name, pattern):
                return Resolved(f"layer_quant_config[{pattern!r}]", spec)
        for type_name, spec in self.layer_type_quant_config:
            if type_name == module_type:
                return Resolved(f"layer_type_quant_config[{type_name!r}]", spec)
        return Resolved("global_quant_config", self.global_quant_config)


# --- spec -> mxpass format ---


def _describe(t: TensorSpec | None) -> str:
    if t is None:
        return "none"
    keys = ("dtype", "qscheme", "ch_axis", "group_size", "is_dynamic", "symmetric", "scale_type",
            "scale_format")
    return "{" + ", ".join(f"{k}={t.raw.get(k)!r}" for k in keys if k in t.raw) + "}"


def _weight_kind(w: TensorSpec, fail) -> str:
    """"tensor" or "channel" for a weight spec mxpass reads; ``fail(reason)`` raises otherwise."""
    if w.dtype not in _ELEMENT:
        fail(f"weight dtype {w.dtype!r} is not supported (mxpass reads {', '.join(_ELEMENT)})")
    if w.is_dynamic:
        fail("dynamic weight quantization (is_dynamic true) is not supported")
    if w.scale_format is not None or w.scale_type not in _FLOAT_SCALE_TYPES:
        fail(f"weight scale_format {w.scale_format!r} / scale_type {w.scale_type!r} is not "
             "supported (plain float scales only)")
    if w.dtype == "int8" and w.symmetric is not True:
        fail(f"asymmetric int8 weights (symmetric={w.symmetric!r}) are not supported")
    if w.dtype == "fp8_e4m3" and w.symmetric is False:
        fail("asymmetric fp8_e4m3 weights (symmetric=False) are not supported")
    if w.qscheme == "per_tensor":
        return "tensor"
    if w.qscheme == "per_channel":
        if w.ch_axis != 0:
            fail(f"per_channel weights along ch_axis {w.ch_axis!r} are not supported "
                 "(expected 0: one scale per output row)")
        return "channel"
    fail(f"weight qscheme {w.qscheme!r} is not supported (per_tensor or per_channel)")


def _activation_kind(a: TensorSpec | None, w: TensorSpec, fail) -> str | None:
    """mxpass activation granularity: "token", "tensor", or None (weight-only)."""
    if a is None:
        return None
    if a.dtype != w.dtype:
        fail(f"input dtype {a.dtype!r} differs from weight dtype {w.dtype!r}")
    if a.scale_format is not None or a.scale_type not in _FLOAT_SCALE_TYPES:
        fail(f"input scale_format {a.scale_format!r} / scale_type {a.scale_type!r} is not "
             "supported (plain float scales only)")
    if a.dtype == "int8" and a.symmetric is not True:
        fail(f"asymmetric int8 activations (symmetric={a.symmetric!r}) are not supported")
    if a.dtype == "fp8_e4m3" and a.symmetric is False:
        fail("asymmetric fp8_e4m3 activations (symmetric=False) are not supported")
    if a.qscheme == "per_channel" and a.is_dynamic is True:
        if a.ch_axis not in _TOKEN_AXES:
            fail(f"dynamic per_channel activations along ch_axis {a.ch_axis!r} are not per-token "
                 f"(expected ch_axis in {_TOKEN_AXES})")
        return "token"
    if a.qscheme == "per_tensor" and not a.is_dynamic:
        return "tensor"
    fail(f"input qscheme {a.qscheme!r} with is_dynamic={a.is_dynamic!r} is not supported "
         "(dynamic per-token: per_channel + is_dynamic true; static: per_tensor + is_dynamic false)")


# (family, weight granularity in the checkpoint, activation) -> mxpass format name
_FORMATS = {
    ("int8", "channel", "token"): "int8",
    ("int8", "tensor", "token"): "int8",
    ("int8", "tensor", "tensor"): "int8-static",
    ("fp8", "tensor", "tensor"): "fp8",
    ("fp8", "channel", "token"): "fp8-dynamic",
    ("fp8", "tensor", "token"): "fp8-dynamic",
    ("fp8", "channel", None): "fp8-w",
    ("fp8", "tensor", None): "fp8-w-tensor",
}


@dataclass(frozen=True)
class Scheme:
    """What one Quark layer config means for mxpass."""

    format: Format
    weight_qscheme: str  # "per_tensor" or "per_channel": the stored weight_scale's layout
    dtype: str           # Quark element dtype name


def format_for(spec: LayerSpec, where: str = "layer") -> Scheme:
    """The mxpass format of a Quark layer config (module docstring table); a config with no
    mxpass equivalent is an error naming ``where`` and the config."""
    def fail(reason: str):
        raise _err(f"{where}: {reason}. weight: {_describe(spec.weight)}; "
                   f"input_tensors: {_describe(spec.input_tensors)}")

    if spec.output_tensors is not None:
        fail(f"output_tensors quantization is not supported (got {_describe(spec.output_tensors)})")
    if spec.bias is not None:
        fail(f"bias quantization is not supported (got {_describe(spec.bias)})")
    if spec.weight is None:
        fail("no weight quantization (an input-only config has no mxpass format)")
    kind = _weight_kind(spec.weight, fail)
    act = _activation_kind(spec.input_tensors, spec.weight, fail)
    name = _FORMATS.get((_FAMILY[spec.weight.dtype], kind, act))
    if name is None:
        fail(f"{spec.weight.dtype} weights per {kind} with "
             f"{'no' if act is None else act} activation quantization have no mxpass format")
    return Scheme(get_format(name), "per_" + kind, spec.weight.dtype)


# --- per-layer plan ---


@dataclass(frozen=True)
class QuarkLayer:
    """How to load one quantized Linear ``fqn`` from a Quark checkpoint.

    Tensor names as Quark exports them (QParamsLinear state dict with transformers'
    CHECKPOINT_KEYS renames, src/transformers/quantizers/quantizer_quark.py) and vLLM's
    QuarkW8A8Int8 / QuarkW8A8Fp8 ``create_weights`` register them.
    """

    fqn: str
    format: Format
    source: str             # the config entry it came from, e.g. "layer_quant_config['*down_proj']"
    weight_qscheme: str     # "per_tensor" or "per_channel"
    weight: str
    weight_scale: str
    input_scale: str | None  # static formats only
    zero_points: tuple[str, ...]  # int8 only; must be zero when present, then dropped

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every checkpoint tensor this layer reads (zero points may be absent)."""
        return (self.weight, self.weight_scale, *([self.input_scale] if self.input_scale else ()),
                *self.zero_points)

    def weight_scale_to_mxpass(self, scale: torch.Tensor, n: int) -> torch.Tensor:
        """Stored weight_scale -> float32 in mxpass's layout ([N, 1] channel, [1] tensor)."""
        return convert_weight_scale(self.weight_scale, scale, self.weight_qscheme, self.format, n)

    def input_scale_to_mxpass(self, scale: torch.Tensor) -> float:
        """Stored static input_scale -> the float mxpass takes (``activation_scales``)."""
        return float(_per_tensor(self.input_scale, scale).float())


@dataclass(frozen=True)
class QuarkPlan:
    """Every Linear of a model: quantized (``layers``) or left in the model dtype (``kept``)."""

    config: QuarkConfig
    layers: dict[str, QuarkLayer]
    kept: dict[str, str]  # fqn -> reason ("excluded by exclude['lm_head']")


def layer_plan(config: QuarkConfig, fqn: str, module_type: str = "Linear",
               stored_name: str | None = None) -> QuarkLayer | str:
    """The :class:`QuarkLayer` of Linear ``fqn``, or why it stays unquantized (a str).

    ``stored_name``: the module's name in the checkpoint, when the loader renamed it (the
    config's patterns refer to it); tensor names stay under ``fqn``."""
    where = stored_name or fqn
    r = config.resolve(where, module_type)
    if r.spec is None:
        return f"excluded by {r.source} in the Quark config"
    scheme = format_for(r.spec, f"layer {where} ({r.source})")
    zps = ((f"{fqn}.weight_zero_point",) if scheme.dtype == "int8" else ())
    if scheme.dtype == "int8" and scheme.format.static_activation:
        zps += (f"{fqn}.input_zero_point",)
    return QuarkLayer(
        fqn=fqn, format=scheme.format, source=r.source, weight_qscheme=scheme.weight_qscheme,
        weight=f"{fqn}.weight", weight_scale=f"{fqn}.weight_scale",
        input_scale=f"{fqn}.input_scale" if scheme.format.static_activation else None,
        zero_points=zps)


def read_plan(quantization_config: dict | QuarkConfig,
              modules: torch.nn.Module | Iterable[tuple[str, torch.nn.Module]],
              stored_name=lambda fqn: None) -> QuarkPlan:
    """Plan for every ``torch.nn.Linear`` of ``modules`` (a model, or (fqn, module) pairs);
    ``stored_name(fqn)``: its name in the checkpoint where that differs (:func:`layer_plan`)."""
    config = (quantization_config if isinstance(quantization_config, QuarkConfig)
              else QuarkConfig.from_dict(quantization_config))
    named = modules.named_modules() if isinstance(modules, torch.nn.Module) else modules
    layers, kept = {}, {}
    for fqn, module in named:
        if not isinstance(module, torch.nn.Linear):
            continue
        p = layer_plan(config, fqn, type(module).__name__, stored_name(fqn))
        if isinstance(p, str):
            kept[fqn] = p
        else:
            layers[fqn] = p
    return QuarkPlan(config, layers, kept)


# --- stored tensors -> mxpass layout ---


def _per_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in _FLOATS:
        raise _err(f"tensor {key!r} has dtype {t.dtype}; expected a float scale "
                   f"({', '.join(str(d) for d in _FLOATS)})")
    if t.numel() != 1 or t.dim() > 1:
        raise _err(f"tensor {key!r} has shape {tuple(t.shape)}; expected a per-tensor scale "
                   "(shape () as Quark exports it, or (1,))")
    return t.reshape(1)


def convert_weight_scale(key: str, scale: torch.Tensor, weight_qscheme: str, fmt: Format,
                         n: int) -> torch.Tensor:
    """Quark ``weight_scale`` (per_tensor: shape (); per_channel: [N]) -> float32 in ``fmt``'s
    layout: [N, 1] for per-channel formats (a per-tensor scale repeated in every row), [1]
    for per-tensor formats. Shape and dtype are checked; errors name ``key``."""
    if weight_qscheme == "per_tensor":
        s = _per_tensor(key, scale).float()
    else:
        if scale.dtype not in _FLOATS:
            raise _err(f"tensor {key!r} has dtype {scale.dtype}; expected a float scale")
        if tuple(scale.shape) not in ((n,), (n, 1)):
            raise _err(f"tensor {key!r} has shape {tuple(scale.shape)}; expected ({n},) "
                       "(per_channel, one scale per output row)")
        s = scale.float().reshape(n, 1)
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        raise _err(f"tensor {key!r}: scales must be finite and > 0")
    if fmt.weight_granularity == "channel":
        return s.expand(n, 1).contiguous()
    if s.shape != (1,):
        raise _err(f"tensor {key!r}: {fmt.name} needs one weight scale; got shape {tuple(scale.shape)}")
    return s.contiguous()


def check_zero_point(key: str, t: torch.Tensor) -> None:
    """A symmetric scheme's zero point: an integer tensor of zeros (dropped after this)."""
    if t.dtype not in _ZERO_POINT_DTYPES:
        raise _err(f"tensor {key!r} has dtype {t.dtype}; expected an integer zero point")
    nonzero = int((t != 0).sum())
    if nonzero:
        raise _err(f"tensor {key!r} has {nonzero} nonzero values (e.g. {t[t != 0].flatten()[0].item()}); "
                   "the scheme is symmetric and mxpass supports only zero points of 0")


# --- MoE experts ---


def requantize_to_max_scale(shards: list[tuple[torch.Tensor, torch.Tensor]], name: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor shards (data [N_i, K], scale) -> ([sum N_i, K], [1]) with the largest scale.

    vLLM's rule for one weight scale per fused gate/up of an expert
    (QuarkW8A8Int8MoEMethod and QuarkW8A8Fp8MoEMethod.process_weights_after_loading in
    vllm/model_executor/layers/quantization/quark/quark_moe.py): s = max(s_i); each shard
    is dequantized in float16 (``per_tensor_dequantize``: data.to(float16) * s_i) and
    quantized again with s:
        int8: cvt_rni_sat(dq / s)   (ops.scaled_int8_quant, static_scaled_int8_quant_kernel)
        fp8 : e4m3(clamp(dq * (1 / s), +/-448))   (ops.scaled_fp8_quant, inverted scale)
    The shard that owns s comes back bit for bit; the others lose the low bits of the
    values their smaller scale resolved.
    """
    if not shards:
        raise _err(f"{name}: no shards to requantize")
    dtype = shards[0][0].dtype
    for i, (d, s) in enumerate(shards):
        if d.dtype != dtype or d.dtype not in (torch.int8, torch.float8_e4m3fn) or d.dim() != 2:
            raise _err(f"{name}: shard {i} is {d.dtype} {tuple(d.shape)}; expected 2-D int8 or "
                       f"float8_e4m3fn like shard 0 ({dtype})")
        if d.shape[1] != shards[0][0].shape[1]:
            raise _err(f"{name}: shard {i} has K={d.shape[1]}; shard 0 has K={shards[0][0].shape[1]}")
    scales = torch.cat([_per_tensor(f"{name} shard {i} scale", s).float() for i, (_, s) in enumerate(shards)])
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise _err(f"{name}: shard scales must be finite and > 0; got {scales.tolist()}")
    s_max = scales.max()
    parts = []
    for (d, _), s in zip(shards, scales):
        dq = (d.to(torch.float16) * s).float()  # float16 product, as per_tensor_dequantize
        if dtype == torch.int8:
            parts.append((dq / s_max).round().clamp(-128, 127).to(torch.int8))
        else:
            parts.append((dq * (1.0 / s_max)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn))
    return torch.cat(parts), s_max.reshape(1)


# --- the checkpoint reader (mxpass/checkpoint/plan.py) ---


def _stored_experts(model: torch.nn.Module, tensors) -> list[tuple[str, str, str, tuple, tuple]]:
    """(fqn, gate_up, down, (E, I, H), per expert (gate, up, down) module names) of every
    experts module stored per expert: the loader's index when it lists them
    (``tensors.experts``, from transformers' conversion mapping), else found here: a
    transformers v5 experts module (3-D ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
    with ``<experts>.<e>.gate_proj.weight`` (QuarkExperts, which splits the fused parameters:
    quark/torch/utils/llm/module_replacement/quark_experts.py) or ``w1`` / ``w3`` / ``w2``."""
    listed = getattr(tensors, "experts", None)
    if listed is not None:
        return [(f, st.gate_up, st.down, st.shape, st.modules) for f, st in listed.items()]
    found = []
    for fqn, m in model.named_modules():
        gu, dn = m._parameters.get("gate_up_proj"), m._parameters.get("down_proj")
        if gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3:
            continue
        for names in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            if f"{fqn}.0.{names[0]}.weight" in tensors:
                e, two_i, h = gu.shape
                found.append((fqn, "gate_up_proj", "down_proj", (e, two_i // 2, h),
                              tuple(tuple(f"{fqn}.{x}.{p}" for p in names) for x in range(e))))
                break
    return found


class QuarkReader:
    """:class:`~mxpass.checkpoint.plan.Reader` for ``quant_method: "quark"``.

    Plans every ``nn.Linear`` as :func:`read_plan` does (matching the config against the
    names as stored), and every experts module stored per expert as 2-D Linears
    (``<experts>.<e>.gate_proj``, ...): per-channel formats take per-tensor scales repeated per row (every byte kept), a
    per-tensor format merges gate and up with :func:`requantize_to_max_scale`. Zero points are checked (headers, then their values: they are small) while
    planning, so a nonzero one fails before any weight is read, and are then skipped.
    """

    name = "quark"

    def accepts(self, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == QUANT_METHOD

    def plan(self, quantization_config: dict, model: torch.nn.Module, tensors):
        from mxpass.checkpoint.plan import Plan

        qp = read_plan(quantization_config, model, lambda fqn: _stored_name(tensors, fqn))
        plan = Plan(reader=self.name, kept_reason="unquantized in the checkpoint (Quark exclude)")
        for fqn, layer in qp.layers.items():
            plan.layers[fqn] = self._layer_plan(layer, *model.get_submodule(fqn).weight.shape, tensors)
        for fqn, gate_up, down, shape, modules in _stored_experts(model, tensors):
            ep = self._experts_plan(qp.config, fqn, gate_up, down, shape, modules, tensors)
            if ep is not None:
                plan.experts[fqn] = ep
        return plan

    @staticmethod
    def _layer_plan(layer: QuarkLayer, n: int, k: int, tensors):
        from mxpass.checkpoint.plan import LayerPlan, ScaleLayout

        if layer.weight_qscheme == "per_tensor":
            shapes = ((), (1,))
        else:
            shapes = ((n,), (n, 1))
        layout = ScaleLayout(shapes, _FLOATS, lambda s: layer.weight_scale_to_mxpass(s, n))
        zero_points = tuple(z for z in layer.zero_points if z in tensors)
        for z in zero_points:
            shape = tuple(tensors.shape(z))
            if shape not in ((), (1,)) + (shapes if z.endswith("weight_zero_point") else ()):
                raise _err(f"tensor {z!r} has shape {shape}; expected the shape of its scale")
            if tensors.dtype(z) not in _ZERO_POINT_DTYPES:
                raise _err(f"tensor {z!r} has dtype {tensors.dtype(z)}; expected an integer zero point")
            check_zero_point(z, tensors.get(z))
        return LayerPlan(layer.format, layer.weight, layer.weight_scale, layout,
                         input_scale=layer.input_scale, skip=zero_points,
                         origin=f"Quark {layer.source}")

    def _experts_plan(self, config: QuarkConfig, fqn: str, gate_up: str, down: str, shape, modules,
                      tensors):
        from mxpass.checkpoint.plan import ExpertsPlan

        _, inter, h = shape
        shapes = ((inter, h), (inter, h), (h, inter))
        plans = [[layer_plan(config, m, "Linear", _stored_name(tensors, m)) for m in trio] for trio in modules]
        flat = [(m, p) for trio, ps in zip(modules, plans) for m, p in zip(trio, ps)]
        if all(isinstance(p, str) for _, p in flat):
            return None  # excluded: stored in the model dtype
        formats = {p.format.name: (name, p.source) for name, p in flat if not isinstance(p, str)}
        excluded = [(name, p) for name, p in flat if isinstance(p, str)]
        if excluded or len(formats) > 1:
            found = [f"{name}: {why}" for name, why in excluded[:1]]
            found += [f"{name}: {f} ({src})" for f, (name, src) in formats.items()]
            raise _err(f"experts of {fqn} resolve differently ({'; '.join(found)}); mxpass runs "
                       "a MoE layer's experts in one format, all quantized or all excluded")
        fmt = flat[0][1].format
        sources = sorted({p.source for _, p in flat})
        per_expert = tuple(tuple(self._layer_plan(p, n, k, tensors) for p, (n, k) in zip(trio, shapes))
                           for trio in plans)
        if fmt.static_activation:
            raise _err(f"experts of {fqn}: {fmt.name} ({', '.join(sources)}) has static activation "
                       "scales, which mxpass::moe does not take")
        merge = None
        if fmt.weight_granularity == "tensor":  # one scale for [gate; up]: vLLM's max rule
            def merge(gd, gs, ud, us, name=f"experts of {fqn}"):
                return requantize_to_max_scale([(gd, gs), (ud, us)], name)
        return ExpertsPlan(fmt, gate_up, down, per_expert, merge_gate_up=merge)


def _stored_name(tensors, fqn: str) -> str | None:
    """The module's name as stored, where the loader's index renamed it (``source_name``)."""
    weight = f"{fqn}.weight"
    if hasattr(tensors, "source_name") and weight in tensors:
        return tensors.source_name(weight)[: -len(".weight")]
    return None
