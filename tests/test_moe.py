"""MoE experts -> ``mxpass::moe``: tiny Qwen3-MoE, Mixtral and Qwen2-MoE through Inductor on
CPU, the reference MoE against Hugging Face's experts modules, and what the pass keeps.

Shape legend: T tokens, E experts, A active experts per token, H hidden, I expert intermediate.

Tolerances. Compiled vs the same rewritten graph run op by op (``compiler="eager"``): both use
the same quantized weights and fp32 math, but Inductor reorders fp32 reductions, so an
activation can cross an e4m3 rounding boundary (one step is 6-12% of the element), and a
near-tie in a router's top-k could route a token differently. Measured relative error of the
logits: under 1e-7 on these models (torch 2.13 CPU); allowed 1e-2, as in test_models.py. A
broken op (wrong expert, unscaled weight) gives ~1. Against the unquantized model, MXFP8 W8A8
moves the logits by 3.3-3.8% and a lone experts module's output by 4-7% (measured); allowed
1e-4 to 0.1.
"""

import gc

import pytest
import torch
import torch.nn as nn
import transformers
from transformers.activations import GELUActivation
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import mxpass
from mxpass import weights
from mxpass.ops import experts_reference
from tests.conftest import CountingBackend, rel_err

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**TINY, **MOE, head_dim=16),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=None),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**TINY, **MOE, shared_expert_intermediate_size=64),
}
EXPERTS = {"qwen3_moe": Qwen3MoeExperts, "mixtral": MixtralExperts, "qwen2_moe": Qwen2MoeExperts}


def _graph_of(compiled):
    """The GraphModule a ``compiler="eager"`` mxpass backend returned."""
    return getattr(compiled, "__wrapped__", compiled).graph


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    """Compiled HF models sit in reference cycles: collect them (and, with them, their cached
    quantized weights) when this module ends, not in the middle of a later test that counts
    cache entries."""
    yield
    gc.collect()


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_run(request):
    """One tiny model per architecture, compiled once (Inductor, and op by op) and run.

    Qwen3-MoE keeps transformers' default experts implementation (grouped_mm) and goes
    through ``torch.compile(..., backend=mxpass.backend)``; Mixtral and Qwen2-MoE are built
    with the eager experts loop, which does not trace, and go through ``mxpass.compile``,
    which switches them to grouped_mm.
    """
    name = request.param
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_loop = name != "qwen3_moe"
    kw = {"experts_implementation": "eager"} if eager_loop else {}
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), **kw).eval()
    ids = torch.randint(0, 256, (2, 9))
    graphs = []
    eager_be = mxpass.backend(compiler="eager")

    def snapshot(gm, example_inputs):
        out = eager_be(gm, example_inputs)
        graphs.append(_graph_of(out))
        return out

    with torch.no_grad():
        if eager_loop:
            fast = mxpass.compile(model, fullgraph=True)
        else:
            fast = torch.compile(model, backend=mxpass.backend, fullgraph=True)
        got = fast(ids).logits
        fast_report = mxpass.last_report()
        torch._dynamo.reset()
        ref = torch.compile(model, backend=snapshot, fullgraph=True)(ids).logits
        ref_report = mxpass.last_report()
        plain = model(ids).logits
    torch._dynamo.reset()
    return dict(name=name, model=model, got=got, ref=ref, plain=plain, report=fast_report,
                ref_report=ref_report, graphs=graphs, eager_loop=eager_loop)


def test_experts_rewritten_router_kept(model_run):
    rep, name = model_run["report"], model_run["name"]
    moe = [r for r in rep.rewritten if r.kind == "moe"]
    assert [r.fqn for r in moe] == ["model.layers.0.mlp.experts"]
    assert "silu, gate/up layout gate_up; traced from transformers' grouped_mm experts" in moe[0].kernel
    i = 128 if name == "mixtral" else 32
    assert moe[0].shape == (2 * i, 64)  # (2I, H) of one expert's gate_up
    kept = {k.fqn: k.reason for k in rep.kept}
    assert kept == {"model.layers.0.mlp.gate": "router gate stays in the model dtype",
                    "lm_head": "output embedding (lm_head) stays in the model dtype"}
    linears = {r.fqn for r in rep.rewritten if r.kind == "linear"}
    if name == "qwen2_moe":  # the shared expert and its sigmoid gate are ordinary linears
        assert {"model.layers.0.mlp.shared_expert.down_proj", "model.layers.0.mlp.shared_expert_gate"} <= linears
    assert {(r.fqn, r.kind) for r in model_run["ref_report"].rewritten} == {(r.fqn, r.kind) for r in rep.rewritten}
    switched = [w for w in rep.warnings if "set_experts_implementation" in w]
    assert len(switched) == model_run["eager_loop"]
    assert all("'eager'} -> {'': 'grouped_mm'}" in w for w in switched)
    # the rewritten graph: one mxpass::moe, nothing left of transformers' grouped_mm
    (graph,) = model_run["graphs"]
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    assert targets.count("mxpass.moe.default") == 1
    assert not any("grouped_mm" in t for t in targets)


def test_compiled_matches_op_by_op_and_unquantized(model_run):
    got, ref, plain = model_run["got"], model_run["ref"], model_run["plain"]
    assert rel_err(got, ref) < 1e-2
    assert 1e-4 < rel_err(got, plain) < 0.1


# --- the experts module on its own (fast: no attention, tiny graphs) ---

class Block(nn.Module):
    """Calls an experts module the way a sparse MoE block does."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, ids, w):
        return self.experts(x, ids, w)


def _experts(name="qwen3_moe", impl="grouped_mm", seed=0, **overrides):
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    experts = EXPERTS[name](cfg)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    return experts.eval()


def _routing(t, e, case, seed=1):
    g = torch.Generator().manual_seed(seed)
    if case == "idle_expert":  # two distinct experts of 0..E-2 per token: expert E-1 gets nothing
        ids = torch.stack([torch.randperm(e - 1, generator=g)[:2] for _ in range(t)])
    elif case == "all_to_one":  # every token's first choice is expert 1
        ids = torch.stack([torch.tensor([1, 0]), *[torch.tensor([1, 2 + k % (e - 2)]) for k in range(t - 1)]])
    elif case == "one_expert_top1":
        ids = torch.full((t, 1), e - 1)
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(t)])
    w = torch.rand(ids.shape, generator=g)
    return ids, w


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("case", ["random", "idle_expert", "all_to_one", "one_expert_top1"])
@pytest.mark.parametrize("name", list(EXPERTS))
def test_reference_matches_hf_experts(name, case, impl):
    """The unquantized reference MoE equals transformers' experts module, every implementation."""
    experts = _experts(name, impl)
    ids, w = _routing(11, 4, case)
    x = torch.randn(11, 64)
    with torch.no_grad():
        expected = experts(x, ids, w)
        got = experts_reference(x, ids, w, experts.gate_up_proj, experts.down_proj, "silu")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # fp32: summation order only


def _compile_eager(module, **kw):
    return torch.compile(module, backend=mxpass.backend(compiler="eager", **kw), fullgraph=True)


def test_experts_module_inductor_dynamic_tokens():
    """One graph serves T in {3, 17, 64}; each T equals the op's eager reference; an
    out-of-range routing id is an error in compiled code too."""
    block = Block(_experts())
    be = CountingBackend(mxpass.backend)
    fast = torch.compile(block, backend=be, fullgraph=True)
    fmt = mxpass.get_format("mxfp8")
    q13 = weights.quantized_experts(block.experts.gate_up_proj, fmt, "w13")
    q2 = weights.quantized_experts(block.experts.down_proj, fmt, "w2")
    with torch.no_grad():
        for t in (3, 17, 64):
            x = torch.randn(t, 64)
            ids, w = _routing(t, 4, "random", seed=t)
            for a in (x, ids, w):
                torch._dynamo.mark_dynamic(a, 0)
            got = fast(x, ids, w)
            expected = torch.ops.mxpass.moe(x, ids, w, *q13, *q2, "mxfp8", "silu")
            assert rel_err(got, expected) < 1e-2, t  # measured 0 (bit-identical); see the module docstring
            assert 1e-4 < rel_err(got, block(x, ids, w)) < 0.1, t
        bad = ids.clone()
        bad[5, 1] = 4  # no expert 4: the compiled gather's bounds check fires
        with pytest.raises(RuntimeError, match="index out of bounds"):
            fast(x, bad, w)
    assert be.graphs == 1
    assert [r.kind for r in mxpass.last_report().rewritten] == ["moe"]


@pytest.mark.parametrize("layout", ["up_gate", "interleaved"])
def test_other_gate_up_layouts_are_found(monkeypatch, layout):
    """A module storing [up; gate] or gate/up interleaved rows is verified as such and rewritten."""
    def apply_gate(self, gate_up):
        if layout == "up_gate":
            up, gate = gate_up.chunk(2, dim=-1)
        else:
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return self.act_fn(gate) * up

    monkeypatch.setattr(Qwen3MoeExperts, "_apply_gate", apply_gate)
    block = Block(_experts())
    x = torch.randn(6, 64)
    ids, w = _routing(6, 4, "random")
    with torch.no_grad():
        got = _compile_eager(block)(x, ids, w)
        plain = block(x, ids, w)
    (r,) = mxpass.last_report().rewritten
    assert r.fqn == "experts" and f"gate/up layout {layout}" in r.kernel
    assert 1e-4 < rel_err(got, plain) < 0.1


def test_unsupported_activation_is_kept():
    block = Block(_experts())
    block.experts.act_fn = GELUActivation()
    x = torch.randn(6, 64)
    ids, w = _routing(6, 4, "random")
    with torch.no_grad():
        got = _compile_eager(block)(x, ids, w)
        plain = block(x, ids, w)
    rep = mxpass.last_report()
    assert not rep.rewritten
    (k,) = rep.kept
    assert k.fqn == "experts"
    assert k.reason.startswith("its output matches no MoE that mxpass implements (relative error of "
                               "activation/gate-up layout: silu/gate_up ")
    torch.testing.assert_close(got, plain, atol=0, rtol=0)  # left as it was


def test_gpt_oss_experts_are_kept():
    """GPT-OSS: biased experts, [E, H, 2I] storage, clamped SwiGLU: nothing mxpass::moe computes."""
    cfg = transformers.GptOssConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        _compile_eager(model)(torch.randint(0, 256, (1, 5)))
    kept = {k.fqn: k.reason for k in mxpass.last_report().kept}
    assert ("expert weights gate_up_proj [4, 64, 256] and down_proj [4, 128, 64] are not gate_up "
            "[E, 2I, H] and down [E, H, I]") in kept["model.layers.0.mlp.experts"]
    assert kept["model.layers.0.mlp.router"] == "router gate stays in the model dtype"
    assert not [r for r in mxpass.last_report().rewritten if r.kind == "moe"]


def test_biased_experts_are_kept():
    """The GPT-OSS experts module on its own: kept, biases named, output untouched."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = transformers.GptOssConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "grouped_mm"
    block = Block(GptOssExperts(cfg))
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    ids, w = _routing(4, 4, "random")
    x = torch.randn(4, 64)
    with torch.no_grad():
        got = _compile_eager(block)(x, ids, w)
        plain = block(x, ids, w)
    (k,) = mxpass.last_report().kept
    assert k.fqn == "experts" and k.reason.startswith(
        "reads Parameters besides the expert weights (gate_up_proj_bias [4, 256], down_proj_bias [4, 64]); "
        "mxpass::moe has no expert biases; expert weights gate_up_proj [4, 64, 256]")
    torch.testing.assert_close(got, plain, atol=0, rtol=0)  # left as it was, biases included


@pytest.mark.parametrize("kw,overrides,reason", [
    ({}, {"moe_intermediate_size": 48}, "I=48 is not a multiple of 32 (mxfp8 block size)"),
    ({"scheme": "fp8-block"}, {}, "H=64 is not a multiple of 128 (fp8-block activation group size)"),
    ({"scheme": "fp8"}, {}, "fp8 needs static per-tensor activation scales, which mxpass::moe does not take"),
    ({"ignore": ["re:.*experts"]}, {}, "ignored by 're:.*experts'"),
])
def test_kept_with_reason(kw, overrides, reason):
    block = Block(_experts(**overrides))
    ids, w = _routing(4, 4, "random")
    with torch.no_grad():
        _compile_eager(block, **kw)(torch.randn(4, 64), ids, w)
    rep = mxpass.last_report()
    assert [(k.fqn, k.reason) for k in rep.kept] == [("experts", reason)] and not rep.rewritten
    assert not rep.warnings  # an ignore pattern that matched the experts is not "unused"


def test_weights_quantized_once_across_recompiles():
    block = Block(_experts())
    be = CountingBackend(mxpass.backend(compiler="eager"))
    f = torch.compile(block, backend=be, dynamic=False)
    with torch.no_grad():
        for t in (3, 5):
            ids, w = _routing(t, 4, "random")
            f(torch.randn(t, 64), ids, w)
            if t == 3:
                n_cached = weights.cache_size()
    assert be.graphs == 2 and weights.cache_size() == n_cached


def test_use_grouped_mm_goes_through_transformers_switch():
    cfg = CONFIGS["qwen3_moe"]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    assert model.get_experts_implementation() == {"": "eager"}
    (note,) = mxpass.passes.moe.use_grouped_mm(model)
    assert "Qwen3MoeForCausalLM" in note and model.get_experts_implementation() == {"": "grouped_mm"}
    assert mxpass.passes.moe.use_grouped_mm(model) == []  # nothing left to switch


class _BmmExperts(nn.Module):
    """Experts outside the v5 convention: one module per 3-D weight, applied with bmm (as
    JetMoE's parallel experts), a 1-D convolution beside them, and a 3-D position embedding
    that is only added (not a layer's weight); then experts flattened into a 2-D weight
    [E * I, H], viewed and sliced per expert (as DBRX's), and a 2-D position table sliced and
    added (not a layer's weight either)."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(4, 64, 32) * 0.1)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 5, 32))
        self.mlp = nn.Module()
        self.mlp.w1 = nn.Parameter(torch.randn(4 * 32, 32) * 0.1)
        self.pos2 = nn.Parameter(torch.randn(8, 32))

    def forward(self, x):  # x [4, T, 64]
        h = self.conv(torch.bmm(x, self.w_in).transpose(0, 1)).transpose(0, 1) + self.pos
        return h.matmul(self.mlp.w1.view(4, 32, 32)[1].T) + self.pos2[: h.shape[1]]


def test_other_multidimensional_weights_are_reported_as_kept():
    """No stacked weight (three or more dims, or two sliced per expert) stays in the model dtype
    without a report entry."""
    model = _BmmExperts()
    x = torch.randn(4, 5, 64)
    with torch.no_grad():
        got = _compile_eager(model)(x)
        plain = model(x)
    rep = mxpass.last_report()
    assert not rep.rewritten
    kept = {k.fqn: k.reason for k in rep.kept}
    assert kept == {
        "w_in": "w_in [4, 64, 32]: 3-D weights outside any experts module mxpass recognizes (transformers v5 "
                "experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] in one module); they stay in the model "
                "dtype",
        "conv": "convolution (weight [4, 4, 3]): mxpass quantizes linear layers and MoE experts",
        "mlp": "w1 [128, 32]: viewed or sliced before a matmul (grouped or flattened weights); mxpass quantizes "
               "the 2-D weights a linear or matmul reads whole; it stays in the model dtype",
    }
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
