"""Bad checkpoints: each a clear error naming the tensor (or group) and what was expected,
raised before any tensor data is read (nothing half-loaded)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mxpass
from mxpass.checkpoint.tensors import SafetensorsIndex
from tests.test_checkpoint import IGNORE, _tiny_llama, edited_copy, write_compressed_tensors


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Checkpoints written by compressed-tensors: a dynamic and a static scheme."""
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for preset in ("FP8_DYNAMIC", "FP8"):
        out[preset] = str(root / preset)
        write_compressed_tensors(_tiny_llama(), {"group_0": (["Linear"], preset)}, IGNORE, out[preset])
    return out


@pytest.fixture
def reads(monkeypatch):
    """Names of the tensors whose data the loader read."""
    names = []
    get = SafetensorsIndex.get
    monkeypatch.setattr(SafetensorsIndex, "get", lambda self, name: names.append(name) or get(self, name))
    return names


L0 = "model.layers.0.self_attn.q_proj"

CASES = {
    # missing tensors
    "missing unquantized": ("FP8_DYNAMIC", lambda t: t.pop("model.norm.weight"), None,
                            KeyError, r"'model.norm.weight' \(unquantized tensor\) is missing"),
    "missing input_scale": ("FP8", lambda t: t.pop(f"{L0}.input_scale"), None,
                            KeyError, rf"'{L0}.input_scale' \(static input scale of {L0}, fp8 \(config group "
                                      r"'group_0'\)\) is missing"),
    "missing weight": ("FP8_DYNAMIC", lambda t: t.pop(f"{L0}.weight"), None,
                       KeyError, rf"'{L0}.weight' \(fp8-dynamic weight of {L0}.*\) is missing"),
    # wrong shapes / dtypes
    "weight shape": ("FP8_DYNAMIC", lambda t: t.update({f"{L0}.weight": t[f"{L0}.weight"][:, :64].contiguous()}), None,
                     ValueError, rf"'{L0}.weight' \(fp8-dynamic weight of {L0}.*\) has shape \(128, 64\); "
                                 r"expected \(128, 128\)"),
    "scale dtype": ("FP8_DYNAMIC", lambda t: t.update({f"{L0}.weight_scale": t[f"{L0}.weight_scale"].to(torch.int32)}),
                    None, TypeError, rf"'{L0}.weight_scale' .* has dtype torch.int32; expected torch.bfloat16 or"),
    "input_scale shape": ("FP8", lambda t: t.update({f"{L0}.input_scale": t[f"{L0}.input_scale"].repeat(4)}), None,
                          ValueError, rf"'{L0}.input_scale' .* has shape \(4,\); expected \(\) or \(1,\) or \(1, 1\)"),
    "unquantized shape": ("FP8_DYNAMIC", lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:100]}), None,
                          ValueError, r"'model.norm.weight' \(unquantized tensor\) has shape \(100,\); expected \(128,\)"),
    "unquantized dtype": ("FP8_DYNAMIC", lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.int8)}),
                          None, TypeError, r"'lm_head.weight' \(unquantized tensor\) has dtype torch.int8"),
    # unknown format / strategy / method
    "unknown strategy": ("FP8_DYNAMIC", None, lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="rows"),
                         ValueError, r"(?s)compressed-tensors rejects the quantization_config.*group_0.*'rows' is not a valid"),
    "unknown format": ("FP8_DYNAMIC", None, lambda q: q["config_groups"]["group_0"].update(format="zip-quantized"),
                       ValueError, r"(?s)compressed-tensors rejects the quantization_config.*group_0.*zip-quantized"),
    "unknown method": ("FP8_DYNAMIC", None, lambda q: q.update(quant_method="gptq"),
                       NotImplementedError, r"quant_method 'gptq' is not supported \(readers: compressed-tensors"),
    # config disagreeing with the tensors
    "per-tensor config, per-channel tensors": ("FP8_DYNAMIC", None, lambda q: q["config_groups"]["group_0"].update(
        weights=dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True),
        input_activations=dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)),
        ValueError, r"'model.layers.0.self_attn.q_proj.weight_scale' \(fp8 weight scale of .*\) has shape "
                    r"\(128, 1\); expected \(\) or \(1,\) or \(1, 1\)"),
    "config ignores a stored-quantized layer": ("FP8_DYNAMIC", None, lambda q: q.update(ignore=[*q["ignore"], L0]),
                                                TypeError, rf"'{L0}.weight' \(unquantized tensor\) has dtype "
                                                           r"torch.float8_e4m3fn"),
    "stray scale on an unquantized layer": ("FP8_DYNAMIC", lambda t: t.update(
        {"lm_head.weight_scale": torch.ones(96, 1, dtype=torch.bfloat16)}), None,
        ValueError, r"'lm_head.weight_scale' is a quantization parameter of lm_head, which is left unquantized"),
    "input_scale under a dynamic scheme": ("FP8_DYNAMIC", lambda t: t.update(
        {f"{L0}.input_scale": torch.ones(1, dtype=torch.bfloat16)}), None,
        ValueError, rf"'{L0}.input_scale' is a quantization parameter of {L0}, which is loaded as fp8-dynamic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_clear_error_before_reading(sources, tmp_path, reads, case):
    src, tensors, config, error, match = CASES[case]
    path = edited_copy(sources[src], tmp_path / "bad", tensors, config)
    reads.clear()
    with pytest.raises(error, match=match):
        mxpass.load(path)
    assert reads == []  # checked against the headers: no data read, nothing allocated


@pytest.mark.parametrize("cut", [3, "half"])
def test_truncated_file_is_a_clear_error(sources, tmp_path, cut):
    path = edited_copy(sources["FP8_DYNAMIC"], tmp_path / "trunc")
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    os.truncate(file, size // 2 if cut == "half" else size - cut)
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors \(truncated or not a safetensors file\?\)"):
        mxpass.load(path)


def test_index_naming_a_missing_shard_is_a_clear_error(sources, tmp_path):
    path = edited_copy(sources["FP8_DYNAMIC"], tmp_path / "index")
    keys = list(load_file(os.path.join(path, "model.safetensors")))
    index = {"metadata": {}, "weight_map": {**{k: "model.safetensors" for k in keys},
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(FileNotFoundError, match="names model-00002-of-00002.safetensors, which is not in"):
        mxpass.load(path)
