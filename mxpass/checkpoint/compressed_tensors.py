"""compressed-tensors checkpoints: config -> :class:`~mxpass.checkpoint.plan.Plan`, and back.

The ``quantization_config`` is read with compressed-tensors' own classes
(``QuantizationConfig``), modules are matched to config groups with its own matcher, by
their names as stored in the checkpoint (``is_match`` for ``ignore``, ``match_targets``: an
exact name beats a ``re:`` pattern beats a class name, as ``apply_quantization_config``
resolves a module that several groups target); MoE experts stored per expert are matched
as the Linears they were when quantized. Each group's scheme maps to
one mxpass format (:func:`format_for_scheme`); a group with no mxpass equivalent is an
error naming the group and its args.

Stored formats: "float-quantized", "int-quantized", "naive-quantized" (weights stored in
the quantized dtype) and "mxfp8-quantized". Stored layouts (N = out features, K = in):

    mxpass format       weight          weight_scale                        -> mxpass scale
    mxfp8, mxfp8-w      [N, K] e4m3     [N, K // 32] uint8 (E8M0 bytes)     view float8_e8m0fnu
    fp8-dynamic, fp8-w  [N, K] e4m3     [N, 1] float                        float32 [N, 1]
    fp8, fp8-w-tensor   [N, K] e4m3     [1] float                           float32 [1]
    fp8-block,          [N, K] e4m3     [ceil(N/128), ceil(K/128)] float    float32, same shape
      fp8-w-block                       (named weight_scale or weight_scale_inv)
    int8                [N, K] int8     [N, 1] float                        float32 [N, 1]
    int8-static         [N, K] int8     [1] float                           float32 [1]

Static formats ("fp8", "int8-static") store ``input_scale`` ([1], float) per layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from mxpass.checkpoint.plan import (FLOATS, MX_SCALE_DTYPES, ExpertsPlan, LayerPlan, Plan, TensorIndex,
                                    mxpass_scale)
from mxpass.formats import Format, format_names, get_format

STORED_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "mxfp8-quantized")


# --- config -> format ---


def _describe(args) -> str:
    if args is None:
        return "none"
    keys = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size",
            "block_structure", "scale_dtype")
    return ", ".join(f"{k}={getattr(args, k, None)!s}" for k in keys)


def _strategy(args) -> str:
    return str(getattr(args.strategy, "value", args.strategy))


def _weight_kind(w) -> tuple[str, str] | None:
    """(family, weight granularity) of compressed-tensors weight args, or None."""
    if w is None or w.num_bits != 8 or not w.symmetric or w.dynamic:
        return None
    strategy = _strategy(w)
    if w.type == "float":
        if strategy == "group" and w.group_size == 32 and w.scale_dtype in MX_SCALE_DTYPES:
            return "mxfp8", "mx32"
        if w.scale_dtype is not None and w.scale_dtype not in FLOATS:
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
    strategy = _strategy(a)
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


def format_for_scheme(scheme, group: str | None = None) -> Format:
    """The mxpass format equal to a compressed-tensors ``QuantizationScheme``.

    Weights: 8-bit symmetric, static; float group 32 with uint8 (E8M0) scales -> MXFP8,
    float channel / tensor / 128x128 block -> FP8, int channel / tensor -> INT8.
    Activations: none (weight-only), MX group 32, token (dynamic), tensor (static), 1x128
    group (dynamic). A combination with no mxpass format is a ValueError naming the group
    and the args.
    """
    where = f"config group {group!r}: " if group is not None else ""
    found = f"weights: {_describe(scheme.weights)}; input_activations: {_describe(scheme.input_activations)}"
    if scheme.output_activations is not None:
        raise NotImplementedError(
            f"mxpass.checkpoint: {where}output activation quantization is not supported ({found}; "
            f"output_activations: {_describe(scheme.output_activations)})")
    kind = _weight_kind(scheme.weights)
    act = _activation_kind(scheme.input_activations, kind[0]) if kind else False
    if kind is not None and act is not False:
        for name in format_names():
            fmt = get_format(name)
            if (fmt.family, fmt.weight_granularity, fmt.activation) == (*kind, act):
                return fmt
    raise ValueError(f"mxpass.checkpoint: {where}no mxpass scheme matches the checkpoint's scheme "
                     f"({found}); known mxpass schemes: {', '.join(format_names())}")


def read_quantization_config(config: dict):
    """compressed-tensors ``QuantizationConfig`` of an HF config dict (or of its
    ``quantization_config``), checked for what mxpass supports."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = config.get("quantization_config", config if "config_groups" in config else None)
    if raw is None:
        raise ValueError("mxpass.checkpoint: config.json has no quantization_config")
    if raw.get("quant_method", "compressed-tensors") != "compressed-tensors":
        raise NotImplementedError(
            f"mxpass.checkpoint: quant_method {raw.get('quant_method')!r} is not compressed-tensors")
    try:
        qconfig = QuantizationConfig.model_validate(raw)
    except Exception as e:  # pydantic's ValidationError: an unknown strategy, type, ...
        raise ValueError(f"mxpass.checkpoint: compressed-tensors rejects the quantization_config: {e}") from None
    for what in ("sparsity_config", "transform_config"):
        if raw.get(what):
            raise NotImplementedError(f"mxpass.checkpoint: a non-empty {what} is not supported")
    if qconfig.kv_cache_scheme is not None:
        raise NotImplementedError("mxpass.checkpoint: kv_cache_scheme is not supported")
    if not qconfig.config_groups:
        raise ValueError("mxpass.checkpoint: quantization_config has no config_groups")
    return qconfig


# --- reader ---


def _scale_name(fqn: str, fmt: Format, tensors: TensorIndex) -> str:
    """``weight_scale``; a block checkpoint may call it ``weight_scale_inv`` (DeepSeek's name
    for the same multiplier: weight = stored * weight_scale_inv)."""
    name = f"{fqn}.weight_scale"
    if name not in tensors and fmt.weight_granularity == "block" and f"{fqn}.weight_scale_inv" in tensors:
        return f"{fqn}.weight_scale_inv"
    return name


class CompressedTensorsReader:
    name = "compressed-tensors"

    def accepts(self, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method", "compressed-tensors") == "compressed-tensors"

    def plan(self, quantization_config: dict, model: torch.nn.Module, tensors: TensorIndex) -> Plan:
        from compressed_tensors.utils import is_match, match_targets

        qconfig = read_quantization_config(quantization_config)
        formats: dict[str, Format] = {}
        target_group: OrderedDict[str, str] = OrderedDict()  # later groups win a shared target, as in CT
        for group, scheme in qconfig.config_groups.items():
            stored = scheme.format or qconfig.format
            if stored not in STORED_FORMATS:
                raise NotImplementedError(
                    f"mxpass.checkpoint: config group {group!r} is stored as {stored!r}; "
                    f"supported: {', '.join(STORED_FORMATS)}")
            formats[group] = format_for_scheme(scheme, group)
            for target in scheme.targets:
                target_group[target] = group

        def group_of(fqn: str, module: torch.nn.Module) -> str | None:
            """The config group of a Linear, matched by its name in the checkpoint."""
            weight = f"{fqn}.weight"
            name = tensors.source_name(weight)[: -len(".weight")] if weight in tensors else fqn
            if is_match(name, module, qconfig.ignore or []):
                return None
            matched = match_targets(name, module, list(target_group))
            return target_group[matched[0]] if matched else None

        def layer(fqn: str, group: str, n: int, k: int) -> LayerPlan:
            fmt = formats[group]
            zero_points = tuple(f"{fqn}.{z}" for z in ("weight_zero_point", "input_zero_point")
                                if f"{fqn}.{z}" in tensors)  # symmetric: zero by definition
            return LayerPlan(fmt, f"{fqn}.weight", _scale_name(fqn, fmt, tensors), mxpass_scale(fmt, n, k),
                             input_scale=f"{fqn}.input_scale" if fmt.static_activation else None,
                             skip=zero_points, origin=f"config group {group!r}")

        plan = Plan(reader=self.name)
        for fqn, module in model.named_modules():
            group = group_of(fqn, module)
            if group is None:
                continue
            if not isinstance(module, torch.nn.Linear):
                raise NotImplementedError(
                    f"mxpass.checkpoint: {fqn} ({type(module).__name__}) matches config group "
                    f"{group!r} (targets {qconfig.config_groups[group].targets}); only Linear "
                    "layers are supported")
            plan.layers[fqn] = layer(fqn, group, *module.weight.shape)

        # experts stored per expert were Linears when quantized: match them as such
        linear = torch.nn.Linear(1, 1, device="meta")
        for fqn, stored in getattr(tensors, "experts", {}).items():
            groups = [[group_of(m, linear) for m in expert] for expert in stored.modules]
            found = {g for expert in groups for g in expert}
            if found == {None}:
                continue
            if len(found) != 1:
                raise NotImplementedError(
                    f"mxpass.checkpoint: the experts of {fqn} fall in several config groups or are partly "
                    f"ignored ({sorted(str(g) for g in found)}); mxpass runs one format per experts module")
            group = found.pop()
            plan.experts[fqn] = ExpertsPlan(formats[group], stored.gate_up, stored.down, tuple(
                tuple(layer(m, group, *stored.expected(role)) for role, m in enumerate(expert))
                for expert in stored.modules))
        return plan


# --- format -> config (for writing) ---

# mxpass format -> (compressed-tensors preset, keep its input activations); int8-static has
# no preset (static per-tensor INT8 weights and activations)
_PRESETS = {"mxfp8": ("MXFP8", True), "mxfp8-w": ("MXFP8A16", True), "fp8-dynamic": ("FP8_DYNAMIC", True),
            "fp8": ("FP8", True), "fp8-block": ("FP8_BLOCK", True), "fp8-w": ("FP8_DYNAMIC", False),
            "fp8-w-tensor": ("FP8", False), "fp8-w-block": ("FP8_BLOCK", False), "int8": ("W8A8", True)}


def scheme_args(fmt: Format) -> dict:
    """``QuantizationScheme`` keyword arguments (weights, input_activations) of an mxpass
    format: the compressed-tensors preset of the same meaning; checked to map back to ``fmt``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if fmt.name == "int8-static":
        args = dict(num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False)
        kwargs = dict(weights=QuantizationArgs(**args), input_activations=QuantizationArgs(**args))
    else:
        preset, keep = _PRESETS[fmt.name]
        act = PRESET_SCHEMES[preset].get("input_activations") if keep else None
        kwargs = dict(weights=PRESET_SCHEMES[preset]["weights"].model_copy(deep=True),
                      input_activations=act.model_copy(deep=True) if act is not None else None)
    if format_for_scheme(QuantizationScheme(targets=["Linear"], **kwargs)) != fmt:
        raise RuntimeError(f"mxpass.checkpoint: the compressed-tensors scheme of {fmt.name} does not map back")
    return kwargs


def stored_format(fmt: Format) -> str:
    """The compressed-tensors format name a checkpoint of ``fmt`` is stored as."""
    return {"mxfp8": "mxfp8-quantized", "fp8": "float-quantized", "int8": "int-quantized"}[fmt.family]
