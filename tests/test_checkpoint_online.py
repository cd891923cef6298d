"""mxpass.load(plain_checkpoint, scheme=...): quantization while reading, tensor by tensor."""

import weakref

import pytest
import torch

import mxpass
from mxpass import checkpoint
from mxpass.checkpoint.tensors import SafetensorsIndex
from mxpass.formats import get_format
from mxpass.weights import quantized_weight
from tests.test_checkpoint import _tiny_llama

IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(21))


def _logits(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(IDS).logits  # no graph break


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny bf16 Llama saved by transformers (no quantization_config)."""
    model = _tiny_llama()
    path = str(tmp_path_factory.mktemp("plain") / "bf16")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("scheme", ["mxfp8"])
def test_online_load_equals_compiling_the_bf16_model(plain, monkeypatch, scheme):
    path, original = plain
    alive, most = [], [0]
    read = SafetensorsIndex.get

    def tracked(self, name):  # how many weights of quantized layers are held at once
        t = read(self, name)
        alive[:] = [r for r in alive if r() is not None]
        if name.endswith("proj.weight"):
            alive.append(weakref.ref(t))
        most[0] = max(most[0], len(alive))
        return t

    monkeypatch.setattr(SafetensorsIndex, "get", tracked)
    model = mxpass.load(path, scheme=scheme)
    assert most[0] == 1  # one bf16 weight in flight, never the model

    info = checkpoint.info(model)
    assert info.reader == "online" and len(info.online) == 14 and set(info.formats.values()) == {scheme}
    assert info.kept == {"lm_head": "output embedding (lm_head) stays in the model dtype"}
    fmt = get_format(scheme)
    for fqn in info.online:
        w = model.get_submodule(fqn).weight
        assert w.untyped_storage().nbytes() == 2 and torch.isnan(w).all()  # a stand-in
        got = quantized_weight(w, fmt, False, fqn)
        want = quantized_weight(original.get_submodule(fqn).weight, fmt, False, fqn)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)), fqn
    got = _logits(model, mxpass.backend(compiler="eager"))
    report = mxpass.last_report()
    assert {k.fqn: k.reason for k in report.kept} == info.kept
    assert torch.equal(got, _logits(original, mxpass.backend(scheme=scheme, compiler="eager")))


def test_ignored_at_load_stays_unquantized_at_compile(plain):
    path, original = plain
    model = mxpass.load(path, scheme="int8", ignore=["re:.*layers\\.0\\.mlp\\..*"])
    info = checkpoint.info(model)
    assert len(info.online) == 11
    for p in ("gate", "up", "down"):
        assert info.kept[f"model.layers.0.mlp.{p}_proj"] == "ignored by 're:.*layers\\\\.0\\\\.mlp\\\\..*'"
        assert torch.equal(model.get_submodule(f"model.layers.0.mlp.{p}_proj").weight,
                           original.get_submodule(f"model.layers.0.mlp.{p}_proj").weight)
    got = _logits(model, mxpass.backend(compiler="eager"))
    assert {k.fqn: k.reason for k in mxpass.last_report().kept} == info.kept
    want = _logits(original, mxpass.backend(scheme="int8", ignore=["re:.*layers\\.0\\.mlp\\..*"], compiler="eager"))
    assert torch.equal(got, want)


def test_plain_load_without_scheme_is_the_bf16_model(plain):
    path, original = plain
    model = mxpass.load(path)
    info = checkpoint.info(model)
    assert info.reader == "none" and info.formats == {} and info.kept == {}
    for name, p in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, original(IDS).logits)


def test_static_scheme_cannot_be_loaded_online(plain):
    with pytest.raises(ValueError, match="scheme 'fp8' needs static activation scales"):
        mxpass.load(plain[0], scheme="fp8")


def test_progress_bar_on_request_or_on_a_terminal(plain, capsys):
    mxpass.load(plain[0], scheme="mxfp8", progress=True)
    err = capsys.readouterr().err
    assert "mxpass.load" in err and "100%" in err
    for progress in (False, None):  # None: only on a terminal, and pytest's stderr is not one
        mxpass.load(plain[0], progress=progress)
        assert capsys.readouterr().err == ""
