"""The CUDA W8A8 GEMV against fp32 math on the same quantized operands, and through the backend."""

import pytest
import torch

from mxpass import quant
from mxpass.formats import get_format
from tests.conftest import rel_err, small_m_backend_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The kernel's products are exact and it sums in fp32 (another order than the reference):
# what is left is the output rounding, 2**-9 (bf16) / 2**-11 (fp16) relative per element.
TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _exact(f, xq, xs, wq, ws, bias):
    y = quant.dequantize_activation(f, xq, xs).double() @ quant.dequantize_weight(f, wq, ws).double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "fp8", "fp8-block", "int8", "int8-static", "mxfp8"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_fp32_math(scheme, m, dtype):
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a8_gemv

    f = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(m)
    k, n = 1280, 200  # N not a multiple of the 16-row tile; several warps split K
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(dtype) if m % 2 else None
    act = torch.tensor([0.03], device="cuda") if f.static_activation else None
    xq, xs = quant.quantize_activation(f, x, act)
    wq, ws = quant.quantize_weight(f, w, "w")
    y = w8a8_gemv(xq, xs, wq, ws, bias, group_of(f), dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, _exact(f, xq, xs, wq, ws, bias)) < TOL[dtype]


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "fp8", "fp8-block", "int8", "mxfp8"])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
@pytest.mark.parametrize("warps, per", [(1, 1280), (2, 768), (3, 512)])
def test_eight_steps_per_iteration(scheme, m, warps, per):
    """512 k loaded per iteration (the plan's choice for long K or multi-wave grids), with
    partial iterations (768 = 1.5 x 512; 1280 = 2.5 x 512) and a warp whose last pass is empty."""
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a8_gemv_into

    f = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(100 * m + warps)
    k, n = 1280, 72
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    act = torch.tensor([0.03], device="cuda") if f.static_activation else None
    xq, xs = quant.quantize_activation(f, x, act)
    wq, ws = quant.quantize_weight(f, w, "w")
    y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w8a8_gemv_into(y, xq, xs, wq, ws, None, group_of(f), warps=warps, k_per_warp=per, steps=8)
    assert rel_err(y, _exact(f, xq, xs, wq, ws, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("scheme", ["fp8-block", "mxfp8"])
def test_large_shape_and_blocks_of_nan(scheme):
    """Llama-8B-sized layer; a NaN activation group makes only its own rows NaN."""
    from mxpass.kernels.cuda.w8a8_gemv import group_of, w8a8_gemv

    f = get_format(scheme)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    x[2, 300] = float("nan")
    w = torch.randn(12288, 4096, device="cuda") * 0.02
    xq, xs = quant.quantize_activation(f, x, None)
    wq, ws = quant.quantize_weight(f, w, "w")
    y = w8a8_gemv(xq, xs, wq, ws, None, group_of(f), torch.bfloat16)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3]]).any()
    keep = [0, 1, 3]
    assert rel_err(y[keep], _exact(f, xq[keep], xs[keep], wq, ws, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("k", [256, 4096])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("fast_e8m0", [False, True])
def test_mxfp8_few_rows_block_scales(k, m, fast_e8m0):
    """M <= 4 MXFP8 (row and block dots in the mma's columns): every 32-k block of w and x
    gets its own magnitude (2**-12 .. 2**12), so a block or row paired with another's scale
    is far off; an all-zero block, and a NaN in x, which makes its own row NaN and no other.
    Both E8M0 decodes: the fast one must hand the passes holding a 0 or 255 byte to the exact one."""
    from mxpass.kernels.cuda.w8a8_gemv import plan, w8a8_gemv_into

    def mx_gemv(xq, xs, wq, ws):  # the planned launch with the decode under test
        y = torch.full((xq.shape[0], wq.shape[0]), float("nan"), device="cuda", dtype=torch.bfloat16)
        warps, per, steps, _ = plan(wq.shape[0], k, 32, m=xq.shape[0])
        w8a8_gemv_into(y, xq, xs, wq, ws, None, 32, warps=warps, k_per_warp=per, steps=steps,
                       fast_e8m0=fast_e8m0)
        return y

    f = get_format("mxfp8")
    g = torch.Generator(device="cuda").manual_seed(k + m)
    n = 72
    wmag = torch.exp2(torch.randint(-12, 13, (n, k // 32, 1), device="cuda", generator=g).float())
    xmag = torch.exp2(torch.randint(-12, 13, (m, k // 32, 1), device="cuda", generator=g).float())
    w = (torch.randn(n, k // 32, 32, device="cuda", generator=g) * wmag).reshape(n, k)
    x = (torch.randn(m, k // 32, 32, device="cuda", generator=g) * xmag).reshape(m, k).bfloat16()
    w[5, 64:96] = 0
    wq, ws = quant.quantize_weight(f, w, "w")
    assert (ws.view(torch.uint8)[5, 2] == 0).item()  # the zero block's E8M0 byte is 0
    xq, xs = quant.quantize_activation(f, x, None)
    y = mx_gemv(xq, xs, wq, ws)
    exact = _exact(f, xq, xs, wq, ws, None)
    for r in range(m):  # per row: rows of x have very different magnitudes
        assert rel_err(y[r], exact[r]) < TOL[torch.bfloat16], r
    x[m - 1, k - 1] = float("nan")
    xq, xs = quant.quantize_activation(f, x, None)
    y = mx_gemv(xq, xs, wq, ws)
    assert torch.isnan(y[m - 1]).all() and not torch.isnan(y[:m - 1]).any()


@pytest.mark.parametrize("scheme, tokens", [("fp8-dynamic", 1), ("int8", 1), ("mxfp8", 4)])
def test_backend_picks_it_for_static_small_m_and_captures(monkeypatch, scheme, tokens):
    entry, err, dynamic = small_m_backend_case(monkeypatch, scheme, tokens, bias=False)
    assert entry.kernel.startswith("cuda_w8a8_gemv"), entry.kernel
    # only MXFP8's input is quantized by act_quant_triton here; the reference quantizes
    # the activation as the kernel's input was, and rounds the fake-quantized activation
    # to bf16 (2**-9) before its matmul
    assert "quantized by act_quant_triton" not in entry.input_quant or scheme == "mxfp8", entry.input_quant
    assert err < 2.0**-7
    # a dynamic-M graph keeps the kernel that serves every M, and says why
    dynamic_kernel = {"int8": "triton_int8_mm", "mxfp8": "triton_mxfp8"}.get(scheme, "cublas_")
    assert dynamic.startswith(dynamic_kernel), dynamic
    assert "cuda_w8a8_gemv: M is dynamic" in dynamic
