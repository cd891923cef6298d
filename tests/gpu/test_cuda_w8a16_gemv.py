"""The CUDA W8A16 GEMV (e4m3 weights, bf16 / fp16 activations) against fp64 math on the
same weights, every e4m3 code, and through the backend."""

import pytest
import torch

from mxpass import quant
from mxpass.formats import get_format
from tests.conftest import opcheck_float8, rel_err, small_m_backend_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The weight is converted exactly, the products are exact and summed in fp32 (another order
# than the reference): what is left is the output rounding, 2**-9 (bf16) / 2**-11 (fp16).
TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
SCHEMES = ["fp8-w", "fp8-w-tensor", "fp8-w-block", "mxfp8-w"]


def _exact(f, x, wq, ws, bias):
    y = x.double() @ quant.dequantize_weight(f, wq, ws).double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_fp64_math(scheme, m, dtype):
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a16_gemv

    f = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(m)
    k, n = 1280, 200  # N not a multiple of the 16-row tile; several warps split K
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype) if m % 2 else None
    wq, ws = quant.quantize_weight(f, w, "w")
    y = w8a16_gemv(x, wq, ws, bias, group_of(f))
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, _exact(f, x, wq, ws, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_e4m3_code_converts_exactly(dtype):
    """One-hot rows of x read single weights: every finite e4m3 code (subnormals, -0 and the
    largest included) comes out bit-identical to its value, at every position of a 64-k step."""
    from mxpass.kernels.cuda.w8a8_gemv import w8a16_gemv

    k, n = 256, 256
    codes = (torch.arange(n, device="cuda")[:, None] + torch.arange(k, device="cuda")[None, :]) % 256
    codes[(codes & 0x7F) == 0x7F] = 0  # the NaN codes
    wq = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    ws = torch.ones(n, 1, device="cuda")
    for k0 in range(0, k, 16):
        x = torch.zeros(16, k, device="cuda", dtype=dtype)
        x[torch.arange(16), k0 + torch.arange(16)] = 1
        y = w8a16_gemv(x, wq, ws, None, 0)
        assert torch.equal(y, wq.float()[:, k0:k0 + 16].t().to(dtype)), k0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 7, 12])
@pytest.mark.parametrize("warps, per", [(1, 1280), (2, 768), (3, 512)])
def test_split_k_plans(scheme, m, warps, per):
    """Other K splits than the plan's, with partial iterations (768 = 3 x 256; 1280 = 5 x 256)."""
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a16_gemv_into

    f = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(100 * m + warps)
    k, n = 1280, 72
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    wq, ws = quant.quantize_weight(f, w, "w")
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w8a16_gemv_into(y, x, wq, ws, None, group_of(f), warps=warps, k_per_warp=per)
    assert rel_err(y, _exact(f, x, wq, ws, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("scheme", ["fp8-w-block", "mxfp8-w"])
@pytest.mark.parametrize("m", [1, 16])
def test_block_scales_and_nan(scheme, m):
    """Every weight block gets its own magnitude (2**-12 .. 2**12), so a block paired with
    another's scale is far off; an all-zero block; MX: a row with E8M0 bytes 0..2 and a NaN
    scale (255), which makes its own output column NaN only; a NaN in x makes its own row NaN
    only."""
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a16_gemv

    f = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(m)
    k, n = 1024, 256
    b = f.block
    wmag = torch.exp2(torch.randint(-12, 13, (n // 128 if b == 128 else n, k // b, 1), device="cuda",
                                    generator=g).float())
    if b == 128:
        wmag = wmag.repeat_interleave(128, 0)
    w = (torch.randn(n, k // b, b, device="cuda", generator=g) * wmag).reshape(n, k)
    w[5, 64:96] = 0
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    wq, ws = quant.quantize_weight(f, w, "w")
    if b == 32:  # E8M0 bytes the bf16 conversion cannot fold (exact per-block path): tiny, NaN
        ws.view(torch.uint8)[9] = torch.arange(k // 32, device="cuda", dtype=torch.uint8) % 3
        ws.view(torch.uint8)[40, 7] = 255
    y = w8a16_gemv(x, wq, ws, None, group_of(f))
    exact = _exact(f, x, wq, ws, None)
    rows = [r for r in range(n) if r != 40]
    assert torch.isnan(y[:, 40]).all() == (b == 32) and not torch.isnan(y[:, rows]).any()
    for r in rows:  # per row: rows of w have very different magnitudes
        assert rel_err(y[:, r], exact[:, r]) < TOL[torch.bfloat16], r
    x[m - 1, k - 1] = float("nan")
    y = w8a16_gemv(x, wq, ws, None, group_of(f))
    assert torch.isnan(y[m - 1]).all() and not torch.isnan(y[:m - 1, rows]).any()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a16_gemv  # noqa: F401  (registers the op)

    f = get_format(scheme)
    wq, ws = quant.quantize_weight(f, torch.randn(128, 512, device="cuda") * 0.05, "w")
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    y = opcheck_float8(torch.ops.mxpass.w8a16_gemv.default, (x, wq, ws, None, group_of(f)))
    assert rel_err(y, _exact(f, x, wq, ws, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("scheme, tokens", [("fp8-w", 2), ("mxfp8-w", 16), ("fp8-w-block", 1), ("fp8-w", 1)])
def test_backend_picks_it_for_static_small_m_and_captures(monkeypatch, scheme, tokens):
    """A static M <= 16 takes the GEMV (fp8-w and mxfp8-w from M = 2: at M = 1 the Triton
    GEMV, and the report says why), under CUDA-graph capture; a dynamic M keeps Triton."""
    entry, err, dynamic = small_m_backend_case(monkeypatch, scheme, tokens, bias=True)
    if tokens == 1 and scheme != "fp8-w-block":
        assert entry.kernel.startswith("triton_w8"), entry.kernel
        assert "cuda_w8a16_gemv: M=1: triton_w8's GEMV measured as fast or faster" in entry.kernel
    else:
        assert entry.kernel.startswith("cuda_w8a16_gemv"), entry.kernel
    assert err < 2.0**-7
    # a dynamic-M graph keeps the kernel that serves every M, and says why
    assert dynamic.startswith("triton_mxfp8" if scheme == "mxfp8-w" else "triton_w8"), dynamic
    assert "cuda_w8a16_gemv: M is dynamic" in dynamic
