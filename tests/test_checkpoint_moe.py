"""MoE checkpoints whose experts are stored per expert as 2-D Linears (Qwen3-MoE's
``mlp.experts.N.gate_proj``, Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2``), merged into
transformers v5's 3-D ``gate_up_proj`` / ``down_proj`` as its conversion mapping does.

Fixtures: the tiny bf16 model saved by transformers (which writes experts per expert), and
that checkpoint quantized by compressed-tensors: every stored 2-D weight becomes an
``nn.Linear`` of the same name (the per-expert layout compressed-tensors quantizes), then
apply_quantization_config, min-max qparams and ModelCompressor, as in test_checkpoint.
"""

import os
import shutil

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import mxpass
from mxpass import checkpoint
from mxpass.formats import get_format
from mxpass.weights import quantized_experts
from tests.test_checkpoint import _qparams, _scheme_kwargs

CONFIGS = {
    "qwen3_moe": Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=2, head_dim=16, max_position_embeddings=64),
    "mixtral": MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=64),
}
ROUTER = {"qwen3_moe": "re:.*mlp\\.gate$", "mixtral": "re:.*block_sparse_moe\\.gate$"}
IDS = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(31))


def _plain_checkpoint(arch: str, path: str):
    """The seeded bf16 model of ``CONFIGS[arch]`` and its save_pretrained checkpoint at ``path``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch], dtype=torch.bfloat16).eval()
    model.save_pretrained(path)
    return model


def _logits(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():  # fullgraph: a graph break would be an error
        return torch.compile(model, backend=backend, fullgraph=True)(IDS).logits


def _experts(model):
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


def _as_linears(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree holding every stored 2-D weight but the embedding as an nn.Linear."""
    root = torch.nn.Module()
    for key, t in state.items():
        path, _, leaf = key.rpartition(".")
        if leaf != "weight" or t.dim() != 2 or "embed_tokens" in key:
            continue
        owner = root
        for part in path.split(".")[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        linear = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=t.dtype)
        linear.weight.data.copy_(t)
        owner.add_module(path.split(".")[-1], linear)
    return root


def _write_compressed_tensors(plain: str, path: str, arch: str, preset: str) -> None:
    shutil.copytree(plain, path)
    state = load_file(os.path.join(plain, "model.safetensors"))
    shadow = _as_linears(state)
    scheme = QuantizationScheme(targets=["Linear"], **_scheme_kwargs(preset))
    apply_quantization_config(shadow, QuantizationConfig(config_groups={"group_0": scheme},
                                                         ignore=["lm_head", ROUTER[arch]]), show_progress=False)
    for _, m in shadow.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is not None:
            scale, zp = _qparams(m.weight.data, s.weights)
            update_offload_parameter(m, "weight_scale", scale)
            if hasattr(m, "weight_zero_point"):
                update_offload_parameter(m, "weight_zero_point", zp)
    compressor = ModelCompressor.from_pretrained_model(shadow)
    compressor.compress_model(shadow)
    compressed = {k: v for k, v in shadow.state_dict().items()}
    rest = {k: v for k, v in state.items() if k not in compressed and k.rpartition(".")[0] not in
            {n for n, _ in shadow.named_modules()}}
    save_file({**rest, **compressed}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(path)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """arch -> (original bf16 model, plain checkpoint, {preset: compressed-tensors checkpoint})."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in CONFIGS:
        plain = str(root / arch)
        out[arch] = (_plain_checkpoint(arch, plain), plain, {})
        for preset in ("MXFP8", "FP8_DYNAMIC") if arch == "qwen3_moe" else ("FP8_DYNAMIC",):
            out[arch][2][preset] = str(root / f"{arch}-{preset}")
            _write_compressed_tensors(plain, out[arch][2][preset], arch, preset)
    return out


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_plain_experts_are_merged_like_transformers(moe, arch):
    original, plain, _ = moe[arch]
    model = mxpass.load(plain)
    reference = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)  # transformers' own merge
    for name, p in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    assert set(_experts(model)) == set(_experts(original))


@pytest.mark.parametrize("arch, preset", [("qwen3_moe", "MXFP8"), ("mixtral", "FP8_DYNAMIC")])
def test_quantized_experts_load_as_stored_and_compile(moe, arch, preset):
    original, _, stored = moe[arch]
    model = mxpass.load(stored[preset])
    info = checkpoint.info(model)
    fmt = get_format({"MXFP8": "mxfp8", "FP8_DYNAMIC": "fp8-dynamic"}[preset])
    assert info.experts == {e: fmt.name for e in _experts(original)}
    routers = [n for n, m in model.named_modules() if n.endswith("mlp.gate") and isinstance(m, torch.nn.Linear)]
    assert info.kept == {f: "unquantized in the checkpoint" for f in ["lm_head", *routers]}
    for fqn, experts in _experts(model).items():
        reference = original.get_submodule(fqn)
        for leaf in ("gate_up_proj", "down_proj"):
            got = quantized_experts(getattr(experts, leaf), fmt, leaf)
            want = quantized_experts(getattr(reference, leaf), fmt, leaf)
            assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)), leaf
    got = _logits(model, mxpass.backend(compiler="eager"))
    report = mxpass.last_report()
    assert [(r.fqn, r.scheme) for r in report.rewritten if r.kind == "moe"] == [(e, fmt.name) for e in _experts(original)]
    assert torch.isfinite(got).all()
    assert torch.equal(got, _logits(original, mxpass.backend(scheme=fmt.name, compiler="eager")))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_online_experts_equal_compiling_the_bf16_model(moe, arch):
    original, plain, _ = moe[arch]
    model = mxpass.load(plain, scheme="mxfp8")
    info = checkpoint.info(model)
    assert info.experts == {e: "mxfp8" for e in _experts(original)}
    assert set(_experts(original)) <= set(info.online)
    for leaf in ("gate_up_proj", "down_proj"):  # stand-ins: one NaN expert, expanded
        w = getattr(model.get_submodule("model.layers.0.mlp.experts"), leaf)
        assert w.stride(0) == 0 and w.untyped_storage().nbytes() == w[0].numel() * 2 and torch.isnan(w).all()
    got = _logits(model, mxpass.backend(compiler="eager"))
    assert torch.equal(got, _logits(original, mxpass.backend(scheme="mxfp8", compiler="eager")))


def test_incomplete_experts_are_a_clear_error(moe, tmp_path):
    _, _, stored = moe["qwen3_moe"]
    path = str(tmp_path / "missing")
    shutil.copytree(stored["MXFP8"], path)
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    for k in [k for k in t if ".experts.2.up_proj." in k]:
        t.pop(k)
    save_file(t, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"per-expert weights of model.layers.0.mlp.experts \(4 experts\) "
                                         r"are incomplete: missing expert 2 up"):
        mxpass.load(path)


def test_experts_loaded_in_another_format_are_an_error(moe):
    model = mxpass.load(moe["qwen3_moe"][2]["FP8_DYNAMIC"])
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"(loaded quantized from a checkpoint as 'fp8-dynamic').*"
                                        r"asked for 'mxfp8'"):
        _logits(model, mxpass.backend(scheme="mxfp8", compiler="eager"))



def test_eager_call_of_a_loaded_model_is_an_error_naming_the_layer(moe):
    """Stand-ins have no data: run outside torch.compile, the first layer holding them
    raises (a pre-hook that is a no-op while Dynamo traces: the compiles above use fullgraph)."""
    model = mxpass.load(moe["qwen3_moe"][2]["MXFP8"])
    with pytest.raises(checkpoint.EagerCallError, match=r"model.layers.0.self_attn.q_proj was loaded quantized "
                                                        r"\(mxfp8\).*torch.compile\(model, backend=mxpass.backend\)"):
        model(IDS)
    experts = model.get_submodule("model.layers.1.mlp.experts")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with pytest.raises(checkpoint.EagerCallError, match=r"model.layers.1.mlp.experts was loaded quantized"):
        experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.bfloat16))
    model.get_submodule("lm_head")(x)  # a layer left unquantized runs


def test_a_stand_in_no_rewrite_consumed_is_an_error(moe):
    """A loaded quantized weight read by something other than a Linear call (here o_proj's
    weight scaled before F.linear, which the linear pass does not match) is an error naming
    it, not NaN."""
    model = mxpass.load(moe["qwen3_moe"][2]["MXFP8"])
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    o_proj.forward = lambda x: torch.nn.functional.linear(x, o_proj.weight * 1.0)
    with pytest.raises(Exception, match=r"stand-ins without data\) are still read after the mxpass passes.*"
                                        r"model.layers.0.self_attn.o_proj.weight \(mxfp8; read by mul\)"):
        _logits(model, mxpass.backend(compiler="eager"))
