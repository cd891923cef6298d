"""Every scheme through the backend: numerics, report, registry, bad input."""

import pytest
import torch

import mxpass
from mxpass import quant, weights
from mxpass.formats import format_names, get_format
from tests.conftest import opcheck_float8
from tests.test_models import MLPStack, rel_err

STATIC = {"fp8", "int8-static"}


def _scales(model, value=0.05):
    return {f"layers.{i}.mlp.{p}": value for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("name", format_names())
def test_opcheck_linear_every_format(name):
    fmt = get_format(name)
    w = torch.randn(48, 256, dtype=torch.bfloat16)
    qw, ws = quant.quantize_weight(fmt, w, "w")
    act = torch.tensor([0.05]) if fmt.static_activation else None
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = opcheck_float8(torch.ops.mxpass.linear.default, (x, qw, ws, None, act, name))
    # the definition, spelled out: fake-quantized x times the dequantized weight, fp32
    expected = (quant.fake_quantize_activation(fmt, x, act).float()
                @ quant.dequantize_weight(fmt, qw, ws).t()).to(x.dtype)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    assert rel_err(y, x @ w.t()) < 0.1  # and it is a quantized version of the real layer


@pytest.mark.parametrize("name", format_names())
def test_scheme_compiles_and_matches_reference(name):
    """Inductor (CPU) vs the op-by-op reference on the same rewritten graph.

    Same fp32 math, reordered by Inductor; an activation on an e4m3/int8 rounding boundary
    may round the other way (one step is up to 12% of an element). Measured: <= 3e-3.
    """
    torch.manual_seed(0)
    model = MLPStack(h=256, i=512).eval()
    kw = {"scheme": name, "activation_scales": _scales(model)} if name in STATIC else {"scheme": name}
    x = torch.randn(5, 256)
    with torch.no_grad():
        ref = torch.compile(model, backend=mxpass.backend(compiler="eager", **kw), fullgraph=True)(x)
        torch._dynamo.reset()
        got = torch.compile(model, backend=mxpass.backend(**kw), fullgraph=True)(x)
        plain = model(x)
    rep = mxpass.last_report()
    assert len(rep.rewritten) == 6 and not rep.kept and rep.scheme == name
    assert rel_err(got, ref) < 1e-2
    assert 0 < rel_err(got, plain) < 0.1


def test_static_scheme_without_scale_names_the_layer():
    model = MLPStack().eval()
    with pytest.raises(Exception, match=r"layer layers\.0\.mlp\.gate_proj: scheme 'fp8' quantizes activations "
                                        r"with a static per-tensor scale and none was given"):
        torch.compile(model, backend=mxpass.backend(scheme="fp8", compiler="eager"))(torch.randn(2, 64))


def test_block_scheme_keeps_k_not_multiple_of_128_and_pads_partial_n():
    lin_k = torch.nn.Linear(96, 256)    # K = 96: 1x128 activation groups impossible
    lin_n = torch.nn.Linear(256, 200)   # N = 200: partial 128-row weight block, fine
    model = torch.nn.Sequential(lin_k, lin_n)
    with torch.no_grad():
        torch.compile(model, backend=mxpass.backend(scheme="fp8-block", compiler="eager"))(torch.randn(2, 96))
    rep = mxpass.last_report()
    assert [(k.fqn, k.reason) for k in rep.kept] == [
        ("0", "K=96 is not a multiple of 128 (fp8-block activation group size)")]
    assert [r.fqn for r in rep.rewritten] == ["1"]
    _, scale = weights.quantized_weight(lin_n.weight, get_format("fp8-block"), False, "1")
    assert scale.shape == (2, 2)


def test_registry_lists_cublas_and_falls_back_visibly_on_cpu():
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        torch.compile(lin, backend=mxpass.backend(scheme="fp8-dynamic", compiler="eager"))(torch.randn(2, 64))
    (entry,) = mxpass.last_report().rewritten
    assert entry.kernel == ("reference (not picked: cuda_w8a8_gemv: needs a CUDA device, got cpu; "
                            "cublas_scaled_mm_rowwise: needs a CUDA device, got cpu; "
                            "dequant_cublas_mm: needs a CUDA device, got cpu)")


@pytest.mark.parametrize("scheme", ["mxfp8", "fp8-dynamic", "fp8", "fp8-block", "int8", "int8-static"])
def test_dequantize_activation_is_the_fake_quantization(scheme):
    from mxpass import quant

    f = mxpass.get_format(scheme)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    act = torch.tensor([0.05]) if f.static_activation else None
    q, s = quant.quantize_activation(f, x, act)
    assert torch.equal(quant.dequantize_activation(f, q, s).to(x.dtype), quant.fake_quantize_activation(f, x, act))
