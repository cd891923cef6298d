"""mxpass.load on checkpoints written by compressed-tensors itself.

A tiny bf16 Llama is quantized with compressed-tensors (apply_quantization_config, weight
qparams from its own calculate_qparams / compute_dynamic_scales_and_zp, as a min-max
observer gives them), compressed with ModelCompressor and saved with save_pretrained.
The loaded model must hold exactly the bytes mxpass computes online from the original
weights (the schemes are bit-identical to compressed-tensors) and compile to exactly the
outputs of the online-quantized original.
"""

import copy
import json
import os
import shutil

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
    apply_quantization_config,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    maybe_pad_tensor_for_block_quant,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import mxpass
from mxpass import checkpoint, quant
from mxpass.checkpoint import compressed_tensors as compressed_tensors_reader
from mxpass.formats import get_format
from mxpass.weights import quantized_weight

# compressed-tensors preset -> mxpass scheme; hidden 128 so that FP8_BLOCK's 1 x 128
# activation groups fit. Schemes without a preset (FP8 W8A16, static INT8) are written from
# mxpass's compressed-tensors args for them (checkpoint.compressed_tensors.scheme_args),
# which test_scheme_args_map_back checks against the presets' meaning.
PRESETS = {"FP8_DYNAMIC": "fp8-dynamic", "MXFP8": "mxfp8", "MXFP8A16": "mxfp8-w",
           "FP8_BLOCK": "fp8-block", "FP8": "fp8", "W8A8": "int8", "fp8-w": "fp8-w",
           "fp8-w-tensor": "fp8-w-tensor", "fp8-w-block": "fp8-w-block", "int8-static": "int8-static"}
IGNORE = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]



def edited_copy(src: str, dst, tensors=None, config=None) -> str:
    """A copy of checkpoint ``src`` at ``dst`` with ``tensors(dict)`` applied to its
    model.safetensors and ``config(quantization_config dict)`` to its config.json."""
    shutil.copytree(src, dst)
    if tensors is not None:
        file = os.path.join(dst, "model.safetensors")
        t = load_file(file)
        tensors(t)
        save_file(t, file, metadata={"format": "pt"})
    if config is not None:
        file = os.path.join(dst, "config.json")
        with open(file) as f:
            c = json.load(f)
        config(c["quantization_config"])
        with open(file, "w") as f:
            json.dump(c, f)
    return str(dst)

def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def _qparams(x: torch.Tensor, args):
    """compressed-tensors' scale and zero point for x under args (min-max over each group)."""
    if args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(x)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    elif args.strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(x, (bh, bw))
        blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
        blocks = blocks.transpose(1, 2).flatten(-2)
        lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    else:  # GROUP (MX)
        return compute_dynamic_scales_and_zp(x, args, module=None)
    return calculate_qparams(lo, hi, args)


def _scheme_kwargs(key: str) -> dict:
    if key in PRESET_SCHEMES:
        return PRESET_SCHEMES[key]
    return compressed_tensors_reader.scheme_args(get_format(key))


def write_compressed_tensors(model: torch.nn.Module, groups: dict, ignore: list, path: str) -> None:
    """Quantize ``model`` in place with compressed-tensors (``groups``: name -> (targets,
    preset)), give its weights and static input scales min-max qparams, compress and save."""
    config_groups = {name: QuantizationScheme(targets=targets, **_scheme_kwargs(preset))
                     for name, (targets, preset) in groups.items()}
    apply_quantization_config(model, QuantizationConfig(config_groups=config_groups, ignore=ignore),
                              show_progress=False)
    gen = torch.Generator().manual_seed(1)
    for _, m in model.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None:
            continue
        scale, zp = _qparams(m.weight.data, s.weights)
        update_offload_parameter(m, "weight_scale", scale)
        if hasattr(m, "weight_zero_point"):
            update_offload_parameter(m, "weight_zero_point", zp)
        if s.input_activations is not None and not s.input_activations.dynamic:
            x = torch.randn(8, m.in_features, generator=gen).to(torch.bfloat16)
            update_offload_parameter(m, "input_scale", _qparams(x, s.input_activations)[0])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


def _save_with_compressed_tensors(preset: str, path: str):
    """Original bf16 model, written to ``path`` as a compressed-tensors checkpoint."""
    model = _tiny_llama()
    original = copy.deepcopy(model)
    write_compressed_tensors(model, {"group_0": (["Linear"], preset)}, IGNORE, path)
    return original


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """preset -> (path, original bf16 model); written once per module."""
    root = tmp_path_factory.mktemp("ct")
    return {p: (str(root / p), _save_with_compressed_tensors(p, str(root / p))) for p in PRESETS}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _logits(model, backend, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(ids).logits  # no graph break


@pytest.mark.parametrize("preset", [p for p in PRESETS if p in PRESET_SCHEMES])
def test_scheme_maps_to_mxpass_format(preset):
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    assert checkpoint.format_for_scheme(scheme).name == PRESETS[preset]


def test_scheme_args_map_back():
    """mxpass's compressed-tensors args: a preset's where one exists, and the same args as
    the presets' for the weight-only and static-INT8 variants."""
    for name in mxpass.format_names():
        kwargs = compressed_tensors_reader.scheme_args(get_format(name))
        assert checkpoint.format_for_scheme(QuantizationScheme(targets=["Linear"], **kwargs)).name == name
        preset = {v: k for k, v in PRESETS.items() if k in PRESET_SCHEMES}.get(name)
        if preset is not None:
            assert kwargs["weights"] == PRESET_SCHEMES[preset]["weights"], name
    weights = {n: compressed_tensors_reader.scheme_args(get_format(n))["weights"] for n in PRESETS.values()}
    assert weights["fp8-w"] == PRESET_SCHEMES["FP8_DYNAMIC"]["weights"]
    assert weights["fp8-w-tensor"] == PRESET_SCHEMES["FP8"]["weights"]
    assert weights["fp8-w-block"] == PRESET_SCHEMES["FP8_BLOCK"]["weights"]
    static = compressed_tensors_reader.scheme_args(get_format("int8-static"))
    assert static["weights"].strategy == static["input_activations"].strategy == QuantizationStrategy.TENSOR
    assert static["input_activations"].dynamic is False


@pytest.mark.parametrize("preset, what", [("W4A16", "num_bits=4"), ("NVFP4", "num_bits=4"),
                                          ("W8A16", "type=int")])
def test_unknown_scheme_is_a_clear_error(preset, what):
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    with pytest.raises(ValueError, match=f"no mxpass scheme matches.*{what}"):
        checkpoint.format_for_scheme(scheme)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_loaded_weights_and_outputs_equal_online_quantization(checkpoints, preset):
    path, original = checkpoints[preset]
    model = mxpass.load(path)
    info = checkpoint.info(model)
    fmt = get_format(PRESETS[preset])
    assert info.scheme == fmt.name
    assert set(info.ignore) == {"lm_head", "model.layers.1.mlp.down_proj"}
    assert len(info.quantized) == 13 and info.unused_tensors == ()

    modules = dict(model.named_modules())
    for fqn in info.quantized:
        data, scale = quantized_weight(modules[fqn].weight, fmt, False, fqn)  # the seeded entry
        ref_data, ref_scale = quant.quantize_weight(fmt, original.get_submodule(fqn).weight.detach(), fqn)
        assert data.dtype == ref_data.dtype and scale.dtype == ref_scale.dtype, fqn
        assert scale.shape == ref_scale.shape, fqn
        assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8)), fqn
        assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8)), fqn
    # unquantized tensors are the original ones
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.norm.weight", "model.rotary_emb.inv_freq"):
        assert torch.equal(model.get_parameter(name) if "inv_freq" not in name else model.get_buffer(name),
                           original.get_parameter(name) if "inv_freq" not in name
                           else original.get_buffer(name)), name

    if fmt.static_activation:
        assert set(info.activation_scales) == set(info.quantized)
        for fqn, value in info.activation_scales.items():
            assert value > 0 and value == float(torch.tensor(value).bfloat16()), fqn  # stored in bf16
    else:
        assert info.activation_scales == {}

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    kwargs = info.backend_kwargs()
    # no arguments: each layer in its stored format, with its stored input scale
    loaded = _logits(model, mxpass.backend(compiler="eager"), ids)
    report = mxpass.last_report()
    assert len(report.rewritten) == 13 and {r.scheme for r in report.rewritten} == {fmt.name}
    assert {(k.fqn, k.reason) for k in report.kept} == {(f, "unquantized in the checkpoint") for f in info.ignore}
    assert report.scheme == fmt.name
    online = _logits(original, mxpass.backend(**kwargs, compiler="eager"), ids)
    assert torch.isfinite(loaded).all()
    assert torch.equal(loaded, online)
    if preset == "FP8":  # the checkpoint's choices stated explicitly give the same
        assert torch.equal(_logits(model, mxpass.backend(**kwargs, compiler="eager"), ids), online)


def test_inductor_runs_the_loaded_model(checkpoints):
    path, original = checkpoints["FP8_DYNAMIC"]
    model = mxpass.load(path)
    info = checkpoint.info(torch.compile(model))
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    loaded = _logits(model, mxpass.backend, ids)
    online = _logits(original, mxpass.backend(**info.backend_kwargs()), ids)
    assert torch.equal(loaded, online)


def test_config_is_read_with_compressed_tensors_classes(checkpoints):
    path, _ = checkpoints["MXFP8"]
    with open(os.path.join(path, "config.json")) as f:
        qconfig = checkpoint.read_quantization_config(json.load(f))
    assert isinstance(qconfig, QuantizationConfig)
    assert qconfig.config_groups["group_0"].weights.scale_dtype == torch.uint8


def test_truncated_file_is_a_clear_error(checkpoints, tmp_path):
    path = _copy(checkpoints["FP8_DYNAMIC"][0], tmp_path / "trunc")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        mxpass.load(path)


def _rewrite_tensors(path: str, change) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_scale_is_a_clear_error(checkpoints, tmp_path):
    path = _copy(checkpoints["MXFP8"][0], tmp_path / "missing")
    key = "model.layers.0.mlp.up_proj.weight_scale"
    _rewrite_tensors(path, lambda t: t.pop(key))
    with pytest.raises(KeyError, match=f"{key}.*weight scale of model.layers.0.mlp.up_proj.*missing"):
        mxpass.load(path)


def test_wrong_shape_and_dtype_are_clear_errors(checkpoints, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight_scale"
    path = _copy(checkpoints["FP8_DYNAMIC"][0], tmp_path / "shape")
    _rewrite_tensors(path, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(ValueError, match=rf"{key}.*shape \(63, 1\); expected \(64, 1\)"):
        mxpass.load(path)

    key = "model.layers.0.self_attn.q_proj.weight"
    path = _copy(checkpoints["MXFP8"][0], tmp_path / "dtype")
    _rewrite_tensors(path, lambda t: t.update({key: t[key].to(torch.bfloat16)}))
    with pytest.raises(TypeError, match=f"{key}.*bfloat16; expected torch.float8_e4m3fn"):
        mxpass.load(path)


def test_standins_are_never_used_silently(checkpoints):
    """A checkpoint layer the pass would keep (ignored here) or a different scheme: clear errors."""
    import mxpass

    model = mxpass.load(checkpoints["FP8_DYNAMIC"][0])
    info = checkpoint.info(model)
    layer = info.quantized[0]
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(Exception, match=rf"layer {layer} was loaded quantized from a checkpoint "
                                        r"\(fp8-dynamic\) but would be kept unquantized \(ignored by"):
        _logits(model, mxpass.backend(scheme=info.scheme, ignore=[*info.ignore, layer], compiler="eager"), ids)
    with pytest.raises(Exception, match=rf"layer {layer} was loaded quantized from a checkpoint as "
                                        r"'fp8-dynamic'.*compile with scheme='fp8-dynamic' or with no "
                                        r"scheme \(asked for 'mxfp8'\)"):
        _logits(model, mxpass.backend(scheme="mxfp8", ignore=list(info.ignore), compiler="eager"), ids)


def test_block_scale_may_be_named_weight_scale_inv(checkpoints, tmp_path):
    """DeepSeek-style block checkpoints call the same multiplier ``weight_scale_inv``."""
    path = _copy(checkpoints["FP8_BLOCK"][0], tmp_path / "inv")
    _rewrite_tensors(path, lambda t: t.update(
        {k + "_inv": t.pop(k) for k in [k for k in t if k.endswith(".weight_scale")]}))
    model, ref = mxpass.load(path), mxpass.load(checkpoints["FP8_BLOCK"][0])
    fmt = get_format("fp8-block")
    assert checkpoint.info(model).formats == checkpoint.info(ref).formats
    for fqn in checkpoint.info(model).formats:
        got = quantized_weight(model.get_submodule(fqn).weight, fmt, False, fqn)
        want = quantized_weight(ref.get_submodule(fqn).weight, fmt, False, fqn)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)), fqn


def test_scheme_at_load_quantizes_what_the_checkpoint_left(checkpoints):
    """load(quantized, scheme=) keeps the stored layers and quantizes the rest while reading
    (mxpass's rules: lm_head stays)."""
    path, original = checkpoints["MXFP8"]
    model = mxpass.load(path, scheme="mxfp8")
    info = checkpoint.info(model)
    assert info.online == ("model.layers.1.mlp.down_proj",) and len(info.formats) == 14
    assert info.kept == {"lm_head": "output embedding (lm_head) stays in the model dtype"}
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    got = _logits(model, mxpass.backend(compiler="eager"), ids)
    assert torch.equal(got, _logits(original, mxpass.backend(scheme="mxfp8", compiler="eager"), ids))
