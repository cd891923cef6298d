"""A compressed-tensors checkpoint with several config groups (one scheme each), written by
compressed-tensors itself: exact-name, ``re:`` and class targets, ``ignore``, and the most
specific target winning where several groups match a layer (as compressed-tensors resolves it).
"""

import copy

import pytest
import torch

import mxpass
from mxpass import checkpoint, quant
from mxpass.formats import get_format
from mxpass.weights import quantized_weight
from tests.test_checkpoint import _tiny_llama, edited_copy, write_compressed_tensors

# compressed-tensors saves the groups as group_0, group_1, ... in this order
GROUPS = {
    "attn": (["re:.*self_attn\\..*_proj$"], "FP8"),                        # static input scales
    "rest": (["Linear"], "MXFP8"),
    "down0": (["model.layers.0.mlp.down_proj"], "W8A8"),                    # exact name beats class
    "mlp1": (["re:.*layers\\.1\\.mlp\\.(gate|up)_proj$"], "FP8_BLOCK"),      # regex beats class
}
IGNORE = ["lm_head", "re:.*layers\\.1\\.self_attn\\.o_proj$"]
EXPECTED = {
    **{f"model.layers.{i}.self_attn.{p}_proj": "fp8" for i in (0, 1) for p in "qkvo"},
    "model.layers.0.mlp.gate_proj": "mxfp8", "model.layers.0.mlp.up_proj": "mxfp8",
    "model.layers.0.mlp.down_proj": "int8",
    "model.layers.1.mlp.gate_proj": "fp8-block", "model.layers.1.mlp.up_proj": "fp8-block",
    "model.layers.1.mlp.down_proj": "mxfp8",
}
del EXPECTED["model.layers.1.self_attn.o_proj"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("groups") / "mixed")
    original = _tiny_llama()
    write_compressed_tensors(copy.deepcopy(original), GROUPS, IGNORE, path)
    return path, original, mxpass.load(path)


def _reference(original: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """The original model with every quantized Linear replaced by mxpass's reference math
    (dequantized weight, fake-quantized activation, fp32 matmul) on weights quantized online."""
    ref = copy.deepcopy(original)
    info = checkpoint.info(model)
    for fqn, name in info.formats.items():
        fmt, layer = get_format(name), ref.get_submodule(fqn)
        data, scale = quant.quantize_weight(fmt, layer.weight.detach(), fqn)
        act = info.activation_scales.get(fqn)
        act = torch.tensor([act]) if act is not None else None
        layer.forward = (lambda x, d=data, s=scale, b=layer.bias, a=act, f=fmt:
                         quant.linear_reference(x, d, s, b, a, f))
    return ref


def test_each_layer_has_its_groups_format(mixed):
    path, original, model = mixed
    info = checkpoint.info(model)
    assert info.reader == "compressed-tensors"
    assert info.formats == EXPECTED
    assert info.kept == {"lm_head": "unquantized in the checkpoint",
                         "model.layers.1.self_attn.o_proj": "unquantized in the checkpoint"}
    assert info.scheme is None  # several
    assert set(info.activation_scales) == {f for f, s in EXPECTED.items() if s == "fp8"}
    for fqn, name in EXPECTED.items():
        fmt = get_format(name)
        data, scale = quantized_weight(model.get_submodule(fqn).weight, fmt, False, fqn)
        ref_data, ref_scale = quant.quantize_weight(fmt, original.get_submodule(fqn).weight.detach(), fqn)
        assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8)), fqn
        assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8)), fqn


def test_compile_without_arguments_runs_every_format(mixed):
    path, original, model = mixed
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=mxpass.backend(compiler="eager"))(ids).logits
        want = _reference(original, model)(ids).logits
    report = mxpass.last_report()
    assert {r.fqn: r.scheme for r in report.rewritten} == EXPECTED
    assert {k.fqn: k.reason for k in report.kept} == checkpoint.info(model).kept
    assert report.scheme == ", ".join(dict.fromkeys(EXPECTED[r.fqn] for r in report.rewritten))
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_explicit_scheme_must_match_every_loaded_layer(mixed):
    _, _, model = mixed
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"model.layers.0.self_attn.q_proj was loaded quantized from a "
                                        r"checkpoint as 'fp8'.*asked for 'mxfp8'"):
        torch.compile(model, backend=mxpass.backend(scheme="mxfp8", compiler="eager"))(
            torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("change, error, match", [
    (lambda q: q["config_groups"]["group_2"]["weights"].update(num_bits=4),
     ValueError, r"config group 'group_2': no mxpass scheme matches .*num_bits=4"),
    (lambda q: q["config_groups"]["group_3"]["weights"].update(strategy="group", group_size=128, block_structure=None),
     ValueError, r"config group 'group_3': no mxpass scheme matches .*strategy=group.*group_size=128"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="token", dynamic=True),
     ValueError, r"config group 'group_0': no mxpass scheme matches .*input_activations: .*strategy=token"),
    (lambda q: q["config_groups"]["group_1"].update(format="pack-quantized"),
     NotImplementedError, r"config group 'group_1' is stored as 'pack-quantized'"),
    (lambda q: q["config_groups"]["group_1"].update(targets=["Linear", "Embedding"]),
     NotImplementedError, r"model.embed_tokens \(Embedding\) matches config group 'group_1'.*only Linear"),
])
def test_a_group_mxpass_cannot_run_is_a_clear_error(mixed, tmp_path, change, error, match):
    path = edited_copy(mixed[0], tmp_path / "bad", config=change)
    with pytest.raises(error, match=match):
        mxpass.load(path)


def test_saving_the_loaded_model_round_trips_every_group(mixed, tmp_path):
    """A loaded model saves without compiling (the cache holds its stored tensors): one config
    group per format, exact-name targets; compressed-tensors decompresses it."""
    import json
    import os

    from tests.test_checkpoint_save import _check_decompressed

    path, original, model = mixed
    out = str(tmp_path / "resaved")
    assert mxpass.save(model, out) == EXPECTED
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 4
    assert sorted(qc["ignore"]) == sorted(checkpoint.info(model).kept)
    again = mxpass.load(out)
    for what in ("formats", "activation_scales", "kept"):
        assert getattr(checkpoint.info(again), what) == getattr(checkpoint.info(model), what), what
    for fqn, name in EXPECTED.items():
        fmt = get_format(name)
        got = quantized_weight(again.get_submodule(fqn).weight, fmt, False, fqn)
        want = quantized_weight(model.get_submodule(fqn).weight, fmt, False, fqn)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)), fqn
    _check_decompressed(out, model, EXPECTED)
