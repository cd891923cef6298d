"""mxpass:: ops: schemas, fakes (opcheck) and eager bodies against the reference."""

import pytest
import torch

import mxpass.ops  # noqa: F401
from mxpass import weights
from mxpass.ops import experts_reference
from mxpass.schemes import mxfp8
from mxpass.formats import get_format
from mxpass.quant import linear_reference
from tests.conftest import opcheck_float8


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
    y = opcheck_float8(torch.ops.mxpass.linear.default, (x, qw, ws, b, None, fmt))
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


# --- mxpass::moe. T tokens, E experts, A active per token, H hidden, I intermediate ---

def _experts(e, n, k, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g, dtype=torch.bfloat16) * 0.1
    return weights.quantized_experts(w, get_format(fmt), "w")


def _moe_args(t, h, i, e, a, fmt, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.randint(0, e, (t, a), generator=g)
    w = torch.rand(t, a, generator=g).to(dtype)
    return (x, ids, w, *_experts(e, 2 * i, h, fmt), *_experts(e, h, i, fmt, seed=2), fmt, "silu")


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp8-w", "fp8-dynamic", "fp8-w-block", "int8"])
@pytest.mark.parametrize("t,h,i,e,a", [(5, 64, 32, 4, 2), (0, 32, 32, 3, 1), (1, 32, 64, 1, 1)])
def test_opcheck_moe(fmt, t, h, i, e, a):
    y = opcheck_float8(torch.ops.mxpass.moe.default, _moe_args(t, h, i, e, a, fmt))
    assert y.shape == (t, h) and y.dtype == torch.bfloat16


def _moe_by_token(x, ids, w, q13, s13, q2, s2, fmt):
    """An independent spelling: per token and routed expert, two reference linears."""
    f = get_format(fmt)
    out = torch.zeros(x.shape, dtype=torch.float32)
    i = q2.shape[-1]
    for t in range(x.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[t, a])
            gate_up = linear_reference(x[t:t + 1], q13[e], s13[e], None, None, f)
            h = torch.nn.functional.silu(gate_up[:, :i]) * gate_up[:, i:]
            out[t] += w[t, a].float() * linear_reference(h, q2[e], s2[e], None, None, f)[0]
    return out


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp8-w", "fp8-dynamic", "int8"])
def test_moe_matches_per_token_reference_linears(fmt):
    """In fp32 the op is, token by token, fq(x) -> gate/up -> SiLU*up -> fq -> down, weighted, summed."""
    args = _moe_args(9, 64, 32, 4, 2, fmt, dtype=torch.float32)
    y = torch.ops.mxpass.moe(*args)
    torch.testing.assert_close(y, _moe_by_token(*args[:8]), atol=1e-5, rtol=1e-5)  # fp32 sum order only


def test_moe_weight_only_is_the_float_moe_on_dequantized_weights():
    x, ids, w, q13, s13, q2, s2, fmt, act = _moe_args(7, 64, 32, 4, 2, "mxfp8-w")
    deq = lambda q, s: mxfp8.dequantize(q, s)  # noqa: E731  (MX dequantization broadcasts over E)
    expected = experts_reference(x, ids, w, deq(q13, s13), deq(q2, s2), "silu")
    y = torch.ops.mxpass.moe(x, ids, w, q13, s13, q2, s2, fmt, act)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.parametrize("bad", [4, -1])
def test_moe_routing_id_out_of_range_is_an_error(bad):
    args = list(_moe_args(3, 32, 32, 4, 2, "mxfp8"))
    args[1] = args[1].clone()
    args[1][1, 0] = bad
    with pytest.raises(ValueError, match=r"routing ids must be in \[0, 4\)"):
        torch.ops.mxpass.moe(*args)


def test_moe_bad_activation_and_static_scheme():
    args = list(_moe_args(3, 32, 32, 2, 1, "mxfp8"))
    with pytest.raises(ValueError, match="activation 'gelu' is not supported"):
        torch.ops.mxpass.moe(*args[:8], "gelu")
    with pytest.raises(ValueError, match="static per-tensor"):
        torch.ops.mxpass.moe(*_moe_args(3, 32, 32, 2, 1, "fp8"))
