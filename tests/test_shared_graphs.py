"""One compiled graph, several sets of weights.

Dynamo does not guard on a Parameter's identity: every module running the same code reuses a
graph compiled for the first one (the layers of a model with a graph break inside a layer; a
second model compiled with the same backend), and a weight changed in place after the compile
reaches the graph unnoticed. The quantized weights mxpass adds to a graph must follow the
weights of each call, or the layers would silently compute with another layer's weights (as
they did before ``mxpass.passes.inputs.BoundInputs``: 110% error on the model below).

Weight-only schemes on fp32 models, so the expected output is the same model with every
rewritten weight replaced by its quantize-dequantized value (only the order of the sums
differs: measured 0 to 3e-7 relative; allowed 1e-5). Against the unquantized model the
outputs move by 1-6%, so a layer computing with another layer's weights (or stale ones) shows.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import mxpass
from mxpass import quant
from mxpass.formats import get_format
from mxpass.passes.moe import use_grouped_mm
from tests.conftest import rel_err


class Block(nn.Module):
    """q/k/v read one input (merged into one GEMM), a graph break, then o."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d // 2, bias=False), nn.Linear(d, d // 2)
        self.o = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        if (h.abs().sum() < 0).item():  # never true; Dynamo breaks the graph here
            h = -h
        return x + self.o(torch.relu(h))


class Stack(nn.Module):
    def __init__(self, layers=3, d=64):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _dequantized(model, fmt, names=None):
    """A copy of ``model`` whose 2-D weights (those in ``names``, default all) hold their
    quantize-dequantized values."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and (names is None or name in names):
                p.copy_(quant.dequantize_weight(fmt, *quant.quantize_weight(fmt, p, name)).to(p.dtype))
    return model


@pytest.mark.parametrize("scheme", ["mxfp8-w", "fp8-w"])
def test_layers_sharing_a_graph_each_use_their_own_weights(scheme):
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(5, 64)
    fmt = get_format(scheme)
    n_reports = len(mxpass.reports())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager"))(x)
        expected, plain = _dequantized(model, fmt)(x), model(x)
    reports = mxpass.reports()[n_reports:]
    # one graph per half of Block.forward, run for all three blocks
    halves = [r for r in reports if r.rewritten]
    assert [sorted(e.fqn for e in r.rewritten) for r in halves] == [["k", "q", "v"], ["o"]], reports
    assert halves[0].frame == "Block.forward"
    assert all("merged: q+k+v" in e.merged for e in halves[0].rewritten)
    for r in halves:
        assert any("also ran with other weights" in w for w in r.warnings), r.warnings
    assert any("also ran with other weights" in str(w.message) for w in caught)
    assert rel_err(got, plain) > 1e-3  # the layers were quantized
    assert rel_err(got, expected) < 1e-5


def test_second_model_compiled_with_the_same_backend():
    torch.manual_seed(0)
    m1, m2, x = Block().eval(), Block().eval(), torch.randn(4, 64)
    del m1.o, m2.o  # one graph per model: forward up to the graph break is all that is compiled
    fmt = get_format("mxfp8-w")
    be = mxpass.backend(scheme=fmt.name, compiler="eager")

    def head(m):
        return torch.cat([m.q(x), m.k(x), m.v(x)], dim=-1)

    with torch.no_grad():
        got1 = torch.compile(head, backend=be)(m1)
        got2 = torch.compile(head, backend=be)(m2)
        assert rel_err(got1, head(_dequantized(m1, fmt))) < 1e-5
        assert rel_err(got2, head(_dequantized(m2, fmt))) < 1e-5
        assert rel_err(got2, got1) > 0.5


def test_weights_changed_in_place_after_compile():
    torch.manual_seed(0)
    model, other, x = Stack(1).eval(), Stack(1).eval(), torch.randn(4, 64)
    fmt = get_format("fp8-w")
    fast = torch.compile(model, backend=mxpass.backend(scheme=fmt.name, compiler="eager"))
    with torch.no_grad():
        before = fast(x)
        assert rel_err(before, _dequantized(model, fmt)(x)) < 1e-5
        model.load_state_dict(other.state_dict())  # copy_ into the same Parameters
        after = fast(x)
    assert rel_err(after, _dequantized(other, fmt)(x)) < 1e-5
    assert rel_err(after, before) > 0.1  # a residual block: x itself is unchanged


def test_weight_data_replaced_after_compile():
    """``p.data = ...`` (what ``module.to()`` does) counts no version: the data's address and
    dtype tell. Same dtype: the graph is reused; another dtype: Dynamo recompiles and the weight
    cache must not hand back the copy quantized from the old data (67% error before)."""
    torch.manual_seed(0)
    lin, x = nn.Linear(64, 64, bias=False).eval(), torch.randn(4, 64)
    fmt = get_format("mxfp8-w")
    fast = torch.compile(lin, backend=mxpass.backend(scheme=fmt.name, compiler="eager"))
    with torch.no_grad():
        fast(x)
        for dtype in (torch.float32, torch.bfloat16):
            lin.weight.data = lin.weight.data * 3 if dtype == torch.float32 else (lin.weight.data * 3).to(dtype)
            got = fast(x.to(dtype))
            # bf16: the op and the dequantized model round their outputs to bf16 apart
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert rel_err(got, _dequantized(lin, fmt)(x.to(dtype))) < tol, dtype


def test_inductor_graph_shared_by_two_models():
    """The same through Inductor: the compiled code takes the quantized weights as inputs."""
    torch.manual_seed(0)
    lin1, lin2, x = nn.Linear(64, 96).eval(), nn.Linear(64, 96).eval(), torch.randn(8, 64)
    fmt = get_format("mxfp8-w")
    be = mxpass.backend(scheme=fmt.name)

    def f(lin):
        return torch.relu(lin(x))

    with torch.no_grad():
        got1 = torch.compile(f, backend=be)(lin1)
        got2 = torch.compile(f, backend=be)(lin2)
        assert rel_err(got1, f(_dequantized(lin1, fmt))) < 1e-5
        assert rel_err(got2, f(_dequantized(lin2, fmt))) < 1e-5


def _tiny_qwen3_moe(seed):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    model = AutoModelForCausalLM.from_config(cfg).eval()
    use_grouped_mm(model)
    return model


def test_second_moe_model_uses_its_own_experts():
    m1, m2 = _tiny_qwen3_moe(0), _tiny_qwen3_moe(1)
    ids = torch.randint(0, 128, (1, 6))
    fmt = get_format("mxfp8-w")
    be = mxpass.backend(scheme=fmt.name, compiler="eager", ignore=["re:^(?!.*experts$).*"])
    with torch.no_grad():
        got = [torch.compile(m, backend=be, fullgraph=True)(ids, use_cache=False).logits for m in (m1, m2)]
    assert [e.kind for e in mxpass.reports()[-1].rewritten] == ["moe"]
    for m, g in zip((m1, m2), got):
        expected = copy.deepcopy(m)
        with torch.no_grad():
            for mod in expected.modules():
                if type(mod).__name__.endswith("Experts"):
                    for p in mod.parameters(recurse=False):
                        p.copy_(torch.stack([quant.dequantize_weight(fmt, *quant.quantize_weight(fmt, w, "e"))
                                             for w in p]))
            want = expected(ids, use_cache=False).logits
        assert rel_err(g, want) < 1e-5
    assert rel_err(got[0], got[1]) > 0.1


def test_static_scale_given_by_name_cannot_follow_other_weights():
    torch.manual_seed(0)
    model, x = Stack(2).eval(), torch.randn(4, 64)
    scales = {"q": 0.02, "k": 0.02, "v": 0.02, "o": 0.02}
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer (q|o): the static activation scale cannot follow"):
        torch.compile(model, backend=mxpass.backend(scheme="fp8", compiler="eager", activation_scales=scales))(x)


def test_static_scales_by_name_stay_when_weights_change_in_place():
    """The same layers with new values (``load_state_dict``): their scales given by name still
    apply, and the output follows the new weights."""
    torch.manual_seed(0)
    model, other, x = Stack(1).eval(), Stack(1).eval(), torch.randn(4, 64)
    scales = {"q": 0.02, "k": 0.02, "v": 0.02, "o": 0.05}
    fast = torch.compile(model, backend=mxpass.backend(scheme="fp8", compiler="eager", activation_scales=scales))
    with torch.no_grad():
        before = fast(x)
        model.load_state_dict(other.state_dict())
        after = fast(x)
        torch._dynamo.reset()
        want = torch.compile(other, backend=mxpass.backend(scheme="fp8", compiler="eager",
                                                           activation_scales=scales))(x)
    assert torch.equal(after, want)
    assert rel_err(after, before) > 0.1


def test_router_found_by_what_its_output_does():
    """A router named neither gate nor router (its logits go through softmax to topk) stays in the
    model dtype; so does DBRX's ``router.layer``. A 2048-wide head whose logits reach topk (a
    compiled sampler) is not a router."""

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.selector = nn.Linear(64, 8, bias=False)
            self.router = nn.Module()
            self.router.layer = nn.Linear(64, 8, bias=False)
            self.proj = nn.Linear(64, 64, bias=False)
            self.head = nn.Linear(64, 2048, bias=False)  # a vocabulary, sampled with topk: not a router

        def forward(self, x):
            w, i = torch.topk(torch.softmax(self.selector(x).float(), dim=-1), 2)
            w2, i2 = torch.topk(self.router.layer(x), 2)
            w3, _ = torch.topk(self.head(x), 5)
            return (self.proj(x) * w.sum(-1, keepdim=True) + i.float().sum() + w2.sum() + i2.float().sum()
                    + w3.sum())

    with torch.no_grad():
        torch.compile(Moe().eval(), backend=mxpass.backend(scheme="mxfp8-w", compiler="eager"))(torch.randn(3, 64))
    report = mxpass.last_report()
    assert sorted(e.fqn for e in report.rewritten) == ["head", "proj"]
    kept = {k.fqn: k.reason for k in report.kept}
    assert "selects experts through topk" in kept["selector"]
    assert kept["router.layer"] == "router gate stays in the model dtype"


def test_weight_view_made_outside_the_graph_is_reported():
    """DBRX slices its flattened experts in an eager loop and passes the slices into a graph."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4 * 32, 64))
    x = torch.randn(3, 64)

    def glu(x, expert_w):
        return torch.relu(x.matmul(expert_w.T))

    with torch.no_grad():
        out = torch.compile(glu, backend=mxpass.backend(scheme="mxfp8-w", compiler="eager"))(x, w.view(4, 32, 64)[1])
    assert torch.equal(out, glu(x, w.view(4, 32, 64)[1]))  # left in the model dtype
    kept = {k.fqn: k.reason for k in mxpass.last_report().kept}
    assert "a [32, 64] view of a [128, 64] weight" in kept["expert_w"], kept


def test_experts_left_to_the_eager_loop_are_reported():
    """Under plain torch.compile (no ``mxpass.compile`` to switch the implementation) transformers'
    eager experts loop breaks the graph on ``nonzero`` and applies the 3-D weights in Python:
    the graph compiled from the experts module's forward says so."""
    model = _tiny_qwen3_moe(0)
    model.set_experts_implementation("eager")
    n = len(mxpass.reports())
    with torch.no_grad():
        torch.compile(model, backend=mxpass.backend(scheme="mxfp8-w", compiler="eager"))(
            torch.randint(0, 128, (1, 6)), use_cache=False)
    reports = mxpass.reports()[n:]
    assert not any(e.kind == "moe" for r in reports for e in r.rewritten)
    frames = [r for r in reports if r.frame == "Qwen3MoeExperts.forward"]
    assert frames, [r.frame for r in reports]
    (entry,) = frames[0].kept
    assert entry.reason.startswith("Qwen3MoeExperts: gate_up_proj [4, 64, 64], down_proj [4, 64, 32] are not read "
                                   "by this graph"), entry.reason
    assert "set_experts_implementation('grouped_mm')" in entry.reason
