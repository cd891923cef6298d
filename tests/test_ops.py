"""mxpass:: ops: schemas, fakes (opcheck) and eager bodies against the reference."""

import pytest
import torch

import mxpass.ops  # noqa: F401
from mxpass.schemes import mxfp8
from mxpass.formats import get_format
from mxpass.quant import linear_reference


def _weight(n, k, dtype=torch.bfloat16):
    q = mxfp8.quantize_weight(torch.randn(n, k, dtype=dtype), "w")
    return q.data, q.scale


@pytest.mark.parametrize("shape", [(4, 64), (0, 32), (2, 3, 96), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_quantize(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.mxpass.quantize.default, (x, "mxfp8"))
    q, s = torch.ops.mxpass.quantize(x, "mxfp8")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (*shape[:-1], shape[-1] // 32)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp8-w"])
@pytest.mark.parametrize("x_shape,n,bias", [((5, 64), 48, True), ((0, 64), 16, False),
                                            ((2, 3, 128), 33, False), ((1, 32), 1, True)])
def test_opcheck_linear(fmt, x_shape, n, bias):
    k = x_shape[-1]
    qw, ws = _weight(n, k)
    x = torch.randn(x_shape, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    args = (x, qw, ws, b, None, fmt)
    # opcheck's test_schema compares inputs with torch.allclose, which has no CPU kernel for
    # float8 ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn', torch 2.13): run
    # the other checks, and check "mutates nothing" ourselves on the raw bytes.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mxpass.linear.default, args, test_utils=utils)
    before = [t.view(torch.uint8).clone() if t.dtype.itemsize == 1 else t.clone()
              for t in (x, qw, ws) + ((b,) if bias else ())]
    y = torch.ops.mxpass.linear(*args)
    after = [t.view(torch.uint8) if t.dtype.itemsize == 1 else t for t in (x, qw, ws) + ((b,) if bias else ())]
    assert all(torch.equal(a, b_) for a, b_ in zip(before, after))
    assert y.shape == (*x_shape[:-1], n) and y.dtype == x.dtype


def test_linear_matches_dequantized_math():
    """The op is fq(x) @ dequant(W)^T + b; check against an independent spelling of it."""
    qw, ws = _weight(40, 96)
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    b = torch.randn(40, dtype=torch.bfloat16)
    y = torch.ops.mxpass.linear(x, qw, ws, b, None, "mxfp8")
    w = qw.float() * (2.0 ** (ws.view(torch.uint8).float() - 127)).repeat_interleave(32, dim=1)
    xq = mxfp8.dequantize(*mxfp8.quantize(x))
    expected = (xq @ w.t() + b.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    # weight-only keeps x as is
    y_w = torch.ops.mxpass.linear(x, qw, ws, b, None, "mxfp8-w")
    torch.testing.assert_close(y_w, linear_reference(x, qw, ws, b, None, get_format("mxfp8-w")), atol=0, rtol=0)
    assert not torch.equal(y, y_w)


def test_unknown_format_is_an_error():
    qw, ws = _weight(8, 32)
    with pytest.raises(ValueError, match="unknown mxpass scheme 'mxfp4'; known schemes: mxfp8, mxfp8-w, fp8-dynamic"):
        torch.ops.mxpass.linear(torch.randn(2, 32), qw, ws, None, None, "mxfp4")
