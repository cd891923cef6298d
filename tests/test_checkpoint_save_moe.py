"""mxpass.save of MoE models whose experts are quantized: written per expert as 2-D tensors
under the names transformers' save_pretrained gives them (Qwen3-MoE
``mlp.experts.N.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.N.w1.weight``, each with
its ``weight_scale``), the layout compressed-tensors and vLLM read; mxpass loads them back
bit-identically and compiles to identical logits; compressed-tensors decompresses them to
mxpass's dequantized weights.
"""

import json
import os

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mxpass
from mxpass import checkpoint, quant
from mxpass.formats import get_format
from mxpass.weights import quantized_experts
from tests.test_checkpoint_moe import CONFIGS, _as_linears, _experts, _logits, _plain_checkpoint

# arch -> (scheme quantized while loading, saved-name pattern of expert 0's gate / up / down)
CASES = {"qwen3_moe": ("mxfp8", "model.layers.{}.mlp.experts.0.{}_proj", ("gate", "up", "down")),
         "mixtral": ("fp8-dynamic", "model.layers.{}.block_sparse_moe.experts.0.{}", ("w1", "w3", "w2"))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (original bf16 model, plain checkpoint, online-loaded model, its logits, saved path,
    what save returned): the plain checkpoint quantized while loading, compiled, saved."""
    root = tmp_path_factory.mktemp("save_moe")
    out = {}
    for arch in CONFIGS:
        plain = str(root / arch)
        original = _plain_checkpoint(arch, plain)
        online = mxpass.load(plain, scheme=CASES[arch][0])
        logits = _logits(online, mxpass.backend(compiler="eager"))
        path = str(root / f"{arch}-saved")
        out[arch] = (original, plain, online, logits, path, mxpass.save(online, path))
    return out


def _assert_same_experts(a, b, fmt):
    for fqn, experts in _experts(a).items():
        for leaf in ("gate_up_proj", "down_proj"):
            got = quantized_experts(getattr(experts, leaf), fmt, leaf)
            want = quantized_experts(getattr(b.get_submodule(fqn), leaf), fmt, leaf)
            assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(got, want)), (fqn, leaf)


@pytest.mark.parametrize("arch", list(CASES))
def test_online_quantize_save_load_compile_is_bit_identical(saved, arch):
    original, _, online, logits, path, written = saved[arch]
    scheme = CASES[arch][0]
    assert {f: written[f] for f in _experts(original)} == {f: scheme for f in _experts(original)}
    loaded = mxpass.load(path)
    info = checkpoint.info(loaded)
    assert info.experts == {f: scheme for f in _experts(original)} and not info.online
    assert {**info.formats, **info.experts} == written
    _assert_same_experts(loaded, online, get_format(scheme))
    got = _logits(loaded, mxpass.backend(compiler="eager"))
    assert torch.isfinite(got).all() and torch.equal(got, logits)


@pytest.mark.parametrize("arch", list(CASES))
def test_experts_are_stored_per_expert_as_transformers_names_them(saved, arch):
    original, plain, _, _, path, _ = saved[arch]
    scheme, name, roles = CASES[arch]
    fmt = get_format(scheme)
    with safe_open(os.path.join(plain, "model.safetensors"), "pt") as f:
        plain_keys = set(f.keys())
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {k for k in keys if not k.endswith("_scale")} == plain_keys  # save_pretrained's names
        inter, hidden = CONFIGS[arch].moe_intermediate_size if arch == "qwen3_moe" else 32, 64
        for role, (n, k) in zip(roles, ((inter, hidden), (inter, hidden), (hidden, inter))):
            module = name.format(0, role)
            assert f.get_tensor(f"{module}.weight").dtype == torch.float8_e4m3fn
            scale = f.get_tensor(f"{module}.weight_scale")
            assert (scale.dtype, tuple(scale.shape)) == (
                (torch.uint8, (n, k // 32)) if fmt.family == "mxfp8" else (torch.bfloat16, (n, 1))), module
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    # router modules (Linears in vLLM and in the per-expert layout) by their saved names
    router = "mlp.gate" if arch == "qwen3_moe" else "block_sparse_moe.gate"
    assert sorted(qc["ignore"]) == sorted(["lm_head", *(f"model.layers.{i}.{router}"
                                                          for i in range(CONFIGS[arch].num_hidden_layers))])


@pytest.mark.parametrize("arch", list(CASES))
def test_compressed_tensors_decompresses_saved_experts(saved, arch):
    """compressed-tensors' lifecycle on the per-expert Linears (as test_checkpoint_moe writes
    them): apply the saved config, compress, load the saved tensors strictly, decompress;
    every expert weight equals mxpass's dequantized one, gate and up the halves of gate_up."""
    original, plain, online, _, path, _ = saved[arch]
    fmt = get_format(CASES[arch][0])
    shadow = _as_linears(load_file(os.path.join(plain, "model.safetensors")))
    with open(os.path.join(path, "config.json")) as f:
        qconfig = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    apply_quantization_config(shadow, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(shadow)
    expected = shadow.state_dict()
    stored = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if k in expected}
    for key, t in stored.items():
        assert (t.dtype, t.shape) == (expected[key].dtype, expected[key].shape), key
    shadow.load_state_dict(stored, strict=True)
    compressor.decompress_model(shadow)
    _, name, roles = CASES[arch]
    inter = CONFIGS[arch].moe_intermediate_size if arch == "qwen3_moe" else 32
    for layer in range(CONFIGS[arch].num_hidden_layers):
        experts = online.get_submodule(f"model.layers.{layer}.mlp.experts")
        d13, s13 = quantized_experts(experts.gate_up_proj, fmt, "gate_up")
        d2, s2 = quantized_experts(experts.down_proj, fmt, "down")
        for e in range(d13.shape[0]):
            w13 = quant.dequantize_weight(fmt, d13[e], s13[e]).to(torch.bfloat16)
            want = (w13[:inter], w13[inter:], quant.dequantize_weight(fmt, d2[e], s2[e]).to(torch.bfloat16))
            for role, w in zip(roles, want):
                module = name.format(layer, role).replace(".experts.0.", f".experts.{e}.")
                got = shadow.get_submodule(module).weight
                assert got.dtype == torch.bfloat16 and torch.equal(got, w), module


def test_compiled_bf16_model_saves_its_quantized_experts(saved, tmp_path):
    """Compiling the bf16 model quantizes (and caches) its experts; saving writes them."""
    original = saved["qwen3_moe"][0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen3_moe"], dtype=torch.bfloat16).eval()
    model.load_state_dict(original.state_dict())
    logits = _logits(model, mxpass.backend(scheme="fp8-dynamic", compiler="eager"))
    written = mxpass.save(model, str(tmp_path / "fp8"))
    assert set(written.values()) == {"fp8-dynamic"} and set(_experts(model)) <= set(written)
    loaded = mxpass.load(str(tmp_path / "fp8"))
    _assert_same_experts(loaded, model, get_format("fp8-dynamic"))
    assert torch.equal(_logits(loaded, mxpass.backend(compiler="eager")), logits)


def test_save_with_a_per_tensor_scheme_writes_one_scale_per_expert(saved, tmp_path):
    """save(scheme=) quantizes the experts now; a per-tensor format has one scale for
    [gate; up], written for gate and up alike (equal scales load back merged)."""
    original = saved["mixtral"][0]
    path = str(tmp_path / "tensor")
    written = mxpass.save(original, path, scheme="fp8-w-tensor")
    assert written["model.layers.0.mlp.experts"] == "fp8-w-tensor"
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        w1 = f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w1.weight_scale")
        w3 = f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w3.weight_scale")
        assert w1.shape == (1,) and torch.equal(w1, w3)
    loaded = mxpass.load(path)
    assert checkpoint.info(loaded).experts == {"model.layers.0.mlp.experts": "fp8-w-tensor"}
    online = _logits(original, mxpass.backend(scheme="fp8-w-tensor", compiler="eager"))
    assert torch.equal(_logits(loaded, mxpass.backend(compiler="eager")), online)
