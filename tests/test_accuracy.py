"""Accuracy of every scheme on the real all-MiniLM-L6-v2, and calibration of static scales.

Cosine similarity of mean-pooled sentence embeddings to the unquantized fp32 model, 16
built-in sentences, run op by op on the reference (``compiler="eager"``; Inductor's
equivalence with it is tested in test_models/test_schemes). Static schemes are calibrated
on the same sentences (in-sample). Measured (torch 2.13 CPU), min over sentences:
mxfp8 0.9959, mxfp8-w 0.9978, fp8-dynamic 0.9970, fp8 0.9971, fp8-block 0.9970,
fp8-w 0.9981, fp8-w-tensor 0.9978, fp8-w-block 0.9982, int8 0.9961, int8-static 0.9430
(per-tensor INT8 weights and activations lose BERT's outlier channels).
"""

import pytest
import torch

import mxpass
from mxpass.demo import SENTENCES, embed, load_minilm

FLOOR = {name: 0.99 for name in mxpass.format_names()} | {"int8-static": 0.93}


@pytest.fixture(scope="module")
def minilm():
    tok, model = load_minilm("cpu", torch.float32)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = embed(model, batch)
    return model, batch, ref


@pytest.mark.parametrize("scheme", mxpass.format_names())
def test_minilm_accuracy(minilm, scheme):
    model, batch, ref = minilm
    kw = {}
    if mxpass.get_format(scheme).static_activation:
        kw["activation_scales"] = mxpass.calibrate(model, [batch], scheme)
    with torch.no_grad():
        got = embed(torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager", **kw)), batch)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert len(mxpass.last_report().rewritten) == 37
    assert FLOOR[scheme] < cos.min() < 1.0 - 1e-5, cos  # close, and really quantized


def test_calibrate_records_input_amax():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    xs = [torch.randn(4, 64), 3 * torch.randn(2, 64)]
    scales = mxpass.calibrate(model, xs, "fp8")
    assert scales["0"] == pytest.approx(max(x.abs().max().item() for x in xs) / 448)
    hidden = [model[1](model[0](x)).abs().max().item() for x in xs]
    assert scales["2"] == pytest.approx(max(hidden) / 448)
    assert mxpass.calibrate(model, xs, "int8-static")["0"] == pytest.approx(scales["0"] * 448 / 127.5)
    with pytest.raises(ValueError, match="no static activation scale"):
        mxpass.calibrate(model, xs, "fp8-dynamic")
