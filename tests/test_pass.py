"""The linear pass: what it matches, what it keeps (and says why), bad input.

Most tests compile with ``compiler="eager"`` (the rewritten graph runs the reference ops,
no Inductor): the pass is the same, the test takes a fraction of a second.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mxpass
from mxpass import weights
from mxpass.quant import linear_reference
from tests.conftest import CountingBackend


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], applied with addmm."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.randn(nf) * 0.05)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


class TMatmul(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) * 0.05)

    def forward(self, x):
        return x @ self.weight.T


class Toy(nn.Module):
    def __init__(self, odd_k=48):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.q_proj = nn.Linear(64, 96)
        self.conv = Conv1D(96, 64)
        self.tmm = TMatmul(64, 64)
        self.odd = nn.Linear(64, odd_k)
        self.odd_in = nn.Linear(odd_k, 64, bias=False)
        self.gate = nn.Linear(64, 4, bias=False)  # a router
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = F.silu(self.q_proj(h))
        h = self.conv(h)
        h = self.tmm(h) + self.odd_in(self.odd(h))
        return self.lm_head(h), self.gate(h)


def _compile(model, **kw):
    return torch.compile(model, backend=mxpass.backend(compiler="eager", **kw), fullgraph=True)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy().eval()


def test_forms_rewritten_and_kept_with_reasons(toy):
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        logits, router = _compile(toy)(ids)
    rep = mxpass.last_report()
    assert {r.fqn: r.kind for r in rep.rewritten} == {
        "q_proj": "linear", "conv": "addmm", "tmm": "matmul", "odd": "linear"}
    assert {r.fqn: r.shape for r in rep.rewritten}["conv"] == (64, 96)  # (N, K) of the [K, N] param
    kept = {k.fqn: k.reason for k in rep.kept}
    assert kept == {
        "odd_in": "K=48 is not a multiple of 32 (mxfp8 block size)",
        "gate": "router gate stays in the model dtype",
        "lm_head": "output embedding (lm_head) stays in the model dtype",
    }
    assert all(r.kernel.startswith("reference") for r in rep.rewritten)
    assert "odd_in" in rep.table() and "kept: router gate" in rep.table()


def test_rewritten_layers_compute_the_reference(toy):
    """Each rewritten layer equals the reference linear on its own input; the rest is untouched."""
    ids = torch.randint(0, 10, (3, 4))
    with torch.no_grad():
        logits, router = _compile(toy)(ids)
        fmt = mxpass.get_format("mxfp8")
        q = lambda mod, x, w, b: linear_reference(x, *weights.quantized_weight(w, fmt, mod, "t"), b, None, fmt)  # noqa: E731
        h = toy.embed(ids)
        h = F.silu(q(False, h, toy.q_proj.weight, toy.q_proj.bias))
        h = q(True, h, toy.conv.weight, toy.conv.bias)
        h = q(False, h, toy.tmm.weight, None) + toy.odd_in(q(False, h, toy.odd.weight, toy.odd.bias))
    torch.testing.assert_close(logits, toy.lm_head(h), atol=0, rtol=0)
    torch.testing.assert_close(router, toy.gate(h), atol=0, rtol=0)


def test_ignore_patterns_and_unused_pattern_warns(toy):
    ids = torch.randint(0, 10, (1, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            _compile(toy, ignore=["q_proj", "re:.*conv", "re:nothing_matches_this"])(ids)
    rep = mxpass.last_report()
    kept = {k.fqn: k.reason for k in rep.kept}
    assert kept["q_proj"] == "ignored by 'q_proj'" and kept["conv"] == "ignored by 're:.*conv'"
    assert {r.fqn for r in rep.rewritten} == {"tmm", "odd"}
    assert any("'re:nothing_matches_this' matched no linear layer" in str(w.message) for w in caught)


def test_weights_quantized_once_across_recompiles(toy):
    be = CountingBackend(mxpass.backend(compiler="eager"))
    f = torch.compile(toy, backend=be, dynamic=False)
    fmt = mxpass.get_format("mxfp8")
    with torch.no_grad():
        f(torch.randint(0, 10, (1, 3)))
        q1 = weights.quantized_weight(toy.q_proj.weight, fmt, False, "q")
        computed = []
        real = weights.quant.quantize_weight
        weights.quant.quantize_weight = lambda *a: computed.append(a[2]) or real(*a)
        try:
            f(torch.randint(0, 10, (2, 7)))  # new static shape: a second graph
        finally:
            weights.quant.quantize_weight = real
    assert be.graphs == 2
    assert computed == []  # the second graph quantized nothing again
    assert weights.quantized_weight(toy.q_proj.weight, fmt, False, "q") is q1


def test_zero_tokens(toy):
    with torch.no_grad():
        logits, _ = _compile(toy)(torch.zeros(0, 3, dtype=torch.long))
    assert logits.shape == (0, 3, 10)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown mxpass scheme 'fp3'; known schemes: mxfp8, mxfp8-w, fp8-dynamic"):
        mxpass.backend(scheme="fp3")


def test_unsupported_dtype_names_the_layer():
    lin = nn.Linear(64, 32).double()
    with pytest.raises(Exception, match=r"layer .*: weight dtype torch.float64 is not supported"):
        _compile(lin)(torch.randn(2, 64, dtype=torch.float64))


def test_nan_weight_names_the_layer(toy):
    with torch.no_grad():
        toy.tmm.weight[3, 5] = float("nan")
    with pytest.raises(Exception, match=r"weight 'tmm' has 1 non-finite values"):
        _compile(toy)(torch.randint(0, 10, (1, 3)))


def test_nan_activation_propagates_without_crash():
    lin = nn.Linear(64, 8)
    x = torch.randn(3, 64)
    x[1, 40] = float("inf")
    with torch.no_grad():
        y = _compile(lin)(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_registered_name_and_decorator():
    lin = nn.Linear(64, 16)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y1 = torch.compile(lin, backend="mxpass")(x)
        assert len(mxpass.last_report().rewritten) == 1
        torch._dynamo.reset()

        @mxpass.compile(scheme="mxfp8-w")
        def fwd(x):
            return lin(x)

        y2 = fwd(x)
        assert mxpass.last_report().scheme == "mxfp8-w"
    for y, name in ((y1, "mxfp8"), (y2, "mxfp8-w")):
        fmt = mxpass.get_format(name)
        expected = linear_reference(x, *weights.quantized_weight(lin.weight, fmt, False, "l"), lin.bias, None, fmt)
        torch.testing.assert_close(y, expected)


def test_chained_linears():
    """A linear feeding a linear directly (no op between): both rewritten, in order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 16))
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = _compile(model)(x)
        fmt = mxpass.get_format("mxfp8")
        h = linear_reference(x, *weights.quantized_weight(model[0].weight, fmt, False, "0"), model[0].bias, None, fmt)
        h = linear_reference(h, *weights.quantized_weight(model[1].weight, fmt, False, "1"), model[1].bias, None, fmt)
    rep = mxpass.last_report()
    assert [r.fqn for r in rep.rewritten] == ["0", "1"] and [k.fqn for k in rep.kept] == ["2"]  # K=48
    torch.testing.assert_close(y, model[2](h), atol=0, rtol=0)
