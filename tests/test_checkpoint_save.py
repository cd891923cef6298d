"""mxpass.save: compressed-tensors checkpoints that compressed-tensors itself reads, and that
mxpass loads back bit-identically.

The decompression reference is compressed-tensors' own lifecycle (ModelCompressor's
docstring): apply_quantization_config, compress_model (compressed parameters), the
checkpoint's tensors loaded strictly into them, decompress_model. (transformers'
from_pretrained with CompressedTensorsConfig(dequantize=True) cannot decompress a
mixed-precision checkpoint with name targets, even one compressed-tensors wrote itself:
transformers 5.23.)
"""

import copy
import json
import os

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import mxpass
from mxpass import checkpoint, quant
from mxpass.formats import get_format
from mxpass.weights import quantized_weight
from tests.test_checkpoint import _tiny_llama

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(11))


def _logits(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(IDS).logits  # no graph break


def _decompressed(path: str) -> torch.nn.Module:
    """The checkpoint as compressed-tensors decompresses it (bf16 weights)."""
    hf_config = AutoConfig.from_pretrained(path)
    qconfig = QuantizationConfig.model_validate(hf_config.quantization_config)
    del hf_config.quantization_config
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    apply_quantization_config(model, qconfig, show_progress=False)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    expected = model.state_dict()
    stored = load_file(os.path.join(path, "model.safetensors"))
    for key, t in stored.items():  # load_state_dict would convert dtypes silently
        assert (t.dtype, t.shape) == (expected[key].dtype, expected[key].shape), key
    model.load_state_dict(stored, strict=True)
    compressor.decompress_model(model)
    return model


@pytest.fixture(scope="module")
def compiled_and_saved(tmp_path_factory):
    """A tiny bf16 Llama compiled with the default backend (MXFP8), then saved."""
    model = _tiny_llama()
    fast = torch.compile(model, backend=mxpass.backend(compiler="eager"))
    torch._dynamo.reset()
    with torch.no_grad():
        logits = fast(IDS).logits
    path = str(tmp_path_factory.mktemp("save") / "mxfp8")
    written = mxpass.save(fast, path)
    return model, logits, path, written


def test_online_quantize_save_load_compile_is_bit_identical(compiled_and_saved):
    model, logits, path, written = compiled_and_saved
    assert written == {f: "mxfp8" for f in written} and len(written) == 14  # every Linear but lm_head
    loaded = mxpass.load(path)
    info = checkpoint.info(loaded)
    assert info.formats == written and info.kept == {"lm_head": "unquantized in the checkpoint"}
    fmt = get_format("mxfp8")
    for fqn in written:
        got = quantized_weight(loaded.get_submodule(fqn).weight, fmt, False, fqn)
        want = quantized_weight(model.get_submodule(fqn).weight, fmt, False, fqn)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)), fqn
    assert torch.equal(_logits(loaded, mxpass.backend(compiler="eager")), logits)


def test_stored_layout(compiled_and_saved):
    _, _, path, written = compiled_and_saved
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["format"] == "mxfp8-quantized" and qc["ignore"] == ["lm_head"]
    assert list(qc["config_groups"]) == ["group_0"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    checkpoint.read_quantization_config(qc)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        assert scale.dtype == torch.uint8 and scale.shape == (128, 256 // 32)  # E8M0 bytes
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


def _check_decompressed(path: str, model: torch.nn.Module, written: dict) -> None:
    """compressed-tensors' decompressed weights equal mxpass's dequantized ones (in the model
    dtype: both round the exact product data * scale once), the rest equals the model."""
    ref = _decompressed(path)
    params = dict(ref.named_parameters())
    for fqn, name in written.items():
        assert params[f"{fqn}.weight"].dtype == torch.bfloat16, fqn
        fmt = get_format(name)
        data, scale = quantized_weight(model.get_submodule(fqn).weight, fmt, False, fqn)
        want = quant.dequantize_weight(fmt, data, scale).to(torch.bfloat16)
        assert torch.equal(params[f"{fqn}.weight"], want), fqn
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in written:
            assert torch.equal(params[name], p), name


def test_compressed_tensors_decompresses_to_the_same_values(compiled_and_saved):
    model, _, path, written = compiled_and_saved
    _check_decompressed(path, model, written)


@pytest.mark.parametrize("scheme, scale_dtype", [("int8", None), ("fp8", torch.bfloat16), ("fp8", torch.float32)])
def test_save_with_a_scheme_quantizes_without_compiling(tmp_path, scheme, scale_dtype):
    """No compile: save(scheme=) applies the pass's rules (lm_head kept) and quantizes now.

    Static input scales are written in the model dtype when it holds them exactly (as
    compressed-tensors stores them), else in float32 (mxpass.calibrate's float32 values)."""
    model = _tiny_llama()
    scales = None
    if scale_dtype is not None:
        scales = {k: float(torch.tensor(v, dtype=scale_dtype))
                  for k, v in mxpass.calibrate(model, [IDS], scheme="fp8").items()}
    path = str(tmp_path / scheme)
    written = mxpass.save(model, path, scheme=scheme, activation_scales=scales)
    assert set(written.values()) == {scheme} and len(written) == 14
    loaded = mxpass.load(path)
    assert checkpoint.info(loaded).formats == written
    if scales is not None:
        assert checkpoint.info(loaded).activation_scales == {f: scales[f] for f in written}
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            stored = {fqn: f.get_tensor(f"{fqn}.input_scale").dtype for fqn in written}
        exact = {fqn: float(torch.tensor(scales[fqn]).bfloat16()) == scales[fqn] for fqn in written}
        assert stored == {fqn: torch.bfloat16 if exact[fqn] else torch.float32 for fqn in written}
        assert torch.float32 in stored.values() or scale_dtype == torch.bfloat16
    if scale_dtype == torch.float32:
        return  # not compressed-tensors' dtype for input scales; the loaded values are checked above
    online = _logits(model, mxpass.backend(scheme=scheme, activation_scales=scales, compiler="eager"))
    assert torch.equal(_logits(loaded, mxpass.backend(compiler="eager")), online)
    _check_decompressed(path, model, written)


def test_sharded_save_loads_back(compiled_and_saved, tmp_path):
    model, logits, _, written = compiled_and_saved
    path = str(tmp_path / "sharded")
    mxpass.save(model, path, max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    loaded = mxpass.load(path)
    assert checkpoint.info(loaded).formats == written
    assert torch.equal(_logits(loaded, mxpass.backend(compiler="eager")), logits)


def test_nothing_to_save_and_ambiguous_formats_are_errors(compiled_and_saved, tmp_path):
    with pytest.raises(ValueError, match="no layer of the model is quantized"):
        mxpass.save(_tiny_llama(), str(tmp_path / "none"))
    model = copy.deepcopy(compiled_and_saved[0])  # new Parameters: empty cache
    q = model.model.layers[0].self_attn.q_proj.weight
    quantized_weight(q, get_format("mxfp8"), False, "q")
    quantized_weight(q, get_format("int8"), False, "q")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is quantized in several formats "
                                         r"\(mxfp8, int8\); pass scheme="):
        mxpass.save(model, str(tmp_path / "two"))
