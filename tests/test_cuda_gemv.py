"""The CUDA W8A8 and W8A16 GEMVs on the CPU machine: registry decision by static M, the ops'
fakes, their argument checks and scale layouts, and (where nvcc exists) that the kernels
compile. Their numerics are checked on the GPU (tests/gpu/test_cuda_w8a8_gemv.py,
tests/gpu/test_cuda_w8a16_gemv.py)."""

import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mxpass.formats import get_format
from mxpass.kernels.cuda import w8a8_gemv as G
from mxpass.lowering.kernels import CudaW8A8Gemv, CudaW8A16Gemv
from mxpass.lowering.registry import Problem, choose


def _problem(scheme="fp8-dynamic", m=1, k=4096, n=4096, dtype=torch.bfloat16, device="cuda"):
    return Problem("linear", get_format(scheme), torch.device(device), k, n, dtype, m)


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "fp8", "fp8-block", "int8", "int8-static"])
def test_taken_for_static_small_m(scheme):
    assert CudaW8A8Gemv().can_implement(_problem(scheme, m=1)) == (True, "")
    assert CudaW8A8Gemv().can_implement(_problem(scheme, m=16)) == (True, "")


def test_mxfp8_small_m():
    """MXFP8 takes the GEMV for a static M in 2..16, and at M = 1 from N = 4096 (below it
    triton_mxfp8 measured faster)."""
    from mxpass.lowering.kernels import MX_GEMV_M1_MIN_N

    for m in (1, 2, 4, 16):
        assert CudaW8A8Gemv().can_implement(_problem("mxfp8", m=m, n=MX_GEMV_M1_MIN_N)) == (True, "")
    assert CudaW8A8Gemv().can_implement(_problem("mxfp8", m=2, n=1024)) == (True, "")
    ok, why = CudaW8A8Gemv().can_implement(_problem("mxfp8", m=1, n=1024))
    assert not ok and f"triton_mxfp8 is faster below N={MX_GEMV_M1_MIN_N}" in why
    ok, why = CudaW8A8Gemv().can_implement(_problem("mxfp8-w", m=4))
    assert not ok and "not a W8A8" in why


@pytest.mark.parametrize("problem, why", [
    (_problem(m=None), "M is dynamic"),
    (_problem(m=17), "M=17 > 16"),
    (_problem(k=4160), "K=4160 must be a multiple of 128"),
    (_problem(dtype=torch.float32), "bf16 or fp16"),
    (_problem("fp8-w"), "not a W8A8"),
    (_problem("mxfp8-w"), "not a W8A8"),
    (_problem("mxfp8", m=4, k=4224), "K=4224 must be a multiple of 256"),
])
def test_declined_with_reason(problem, why):
    ok, reason = CudaW8A8Gemv().can_implement(problem)
    assert not ok and why in reason


def test_not_offered_without_cuda_and_reason_in_choice():
    ok, reason = CudaW8A8Gemv().is_supported(torch.device("cpu"))
    assert not ok and "CUDA" in reason
    choice = choose(_problem(m=1, device="cpu"))
    assert choice.kernel.name == "reference"
    assert "cuda_w8a8_gemv: needs a CUDA device" in choice.describe()


def _quantized(scheme, m, k, n):
    from mxpass import quant

    f = get_format(scheme)
    act = torch.tensor([0.05]) if f.static_activation else None
    xq, xs = quant.quantize_activation(f, torch.randn(m, k), act)
    wq, ws = quant.quantize_weight(f, torch.randn(n, k) * 0.02, "w")
    return xq, xs, wq, ws


@pytest.mark.parametrize("scheme, group", [("fp8-dynamic", 0), ("fp8", 0), ("fp8-block", 128), ("int8", 0),
                                           ("mxfp8", 32)])
def test_fake_shapes(scheme, group):
    xq, xs, wq, ws = _quantized(scheme, 3, 256, 40)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (xq, xs, wq, ws)]
        y = G.w8a8_gemv(*args, None, group, torch.float16)
    assert y.shape == (3, 40) and y.dtype == torch.float16


def test_bad_arguments_are_errors():
    xq, xs, wq, ws = _quantized("fp8-dynamic", 17, 256, 40)
    with pytest.raises(ValueError, match="at most 16"):
        G._check(xq, xs, wq, ws, None, 0, torch.bfloat16)
    xq, xs, wq, ws = _quantized("fp8-dynamic", 2, 256, 40)
    with pytest.raises(TypeError, match="float8_e4m3fn or int8"):
        G._check(xq.view(torch.uint8), xs, wq, ws, None, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="bias must be"):
        G._check(xq, xs, wq, ws, torch.zeros(3, dtype=torch.bfloat16), 0, torch.bfloat16)
    with pytest.raises(ValueError, match="needs CUDA"):
        G.w8a8_gemv(xq, xs, wq, ws, None, 0, torch.bfloat16)


def test_scale_layouts():
    xq, xs, wq, ws = _quantized("fp8-dynamic", 3, 256, 40)
    _, xstride, _, wstride = G._scale_args(xs, ws, 3, 40, 256, 0)
    assert (xstride, wstride) == (1, 1)  # per token x per channel
    xq, xs, wq, ws = _quantized("fp8", 3, 256, 40)
    _, xstride, _, wstride = G._scale_args(xs, ws, 3, 40, 256, 0)
    assert (xstride, wstride) == (0, 0)  # per tensor x per tensor
    xq, xs, wq, ws = _quantized("fp8-block", 3, 256, 200)
    xs_, xstride, ws_, wstride = G._scale_args(xs, ws, 3, 200, 256, 128)
    assert (xstride, wstride, tuple(ws_.shape)) == (2, 2, (2, 2))
    with pytest.raises(ValueError, match="neither"):
        G._scale_args(torch.ones(2), torch.ones(40), 3, 40, 256, 0)
    # MXFP8: E8M0 bytes, read 8 at a time: a view off an 8-byte boundary is copied, values kept
    xq, xs, wq, ws = _quantized("mxfp8", 3, 256, 40)
    buf = torch.zeros(1 + xs.numel(), dtype=torch.uint8)
    buf[1:] = xs.view(torch.uint8).reshape(-1)
    shifted = buf[1:].view(3, 8).view(torch.float8_e8m0fnu)  # contiguous, one byte off
    assert shifted.is_contiguous() and shifted.data_ptr() % 8
    assert torch.equal(shifted.view(torch.uint8), xs.view(torch.uint8))
    xs_, _, ws_, _ = G._scale_args(shifted, ws, 3, 40, 256, 32)
    assert xs_.dtype == ws_.dtype == torch.uint8 and xs_.data_ptr() % 8 == 0 and ws_.data_ptr() % 8 == 0
    assert torch.equal(xs_, xs.view(torch.uint8)) and torch.equal(ws_, ws.view(torch.uint8))


@pytest.mark.parametrize("n, k, group", [(12288, 4096, 0), (4096, 14336, 128), (48, 256, 0), (1, 128, 128)])
def test_plan_covers_k(n, k, group):
    warps, per, steps, fe8 = G.plan(n, k, group)
    assert 1 <= warps <= 8 and per % G._step(group) == 0 and warps * per >= k > (warps - 1) * per
    assert steps in (4, 8) and fe8 is False  # no MXFP8 case here


@pytest.mark.parametrize("n, k, group, steps", [
    (12288, 4096, 0, 4),    # one wave at 4 steps; 8 would add one
    (28672, 4096, 0, 8),    # more than one wave either way
    (4096, 14336, 0, 8),    # long K per warp
    (4096, 4096, 0, 4),
    (2048, 4096, 0, 8),     # at most one block per SM
    (5120, 2048, 0, 4),
    (2048, 768, 0, 4),      # a warp holds less than one 8-step iteration
    (9216, 2560, 0, 4),     # 7 warps launched (not the 8 planned): one wave
    (9216, 3584, 0, 4),
    (28672, 4096, 32, 4),   # MXFP8 and fp8-block always load 4 steps
    (4096, 14336, 128, 4),
])
def test_plan_steps(n, k, group, steps):
    assert G.plan(n, k, group, num_sms=132)[2] == steps


@pytest.mark.parametrize("n, k, group, m, warps", [
    (12288, 4096, 0, 1, 4),     # ~23 warps per SM at 4: per-channel scales keep 4
    (12288, 4096, 128, 1, 8),   # fp8-block at M <= 8: 8 warps of 512 k
    (28672, 4096, 128, 8, 8),
    (13824, 5120, 128, 1, 8),   # 8 x 640
    (12288, 4096, 128, 16, 4),  # two n8 tiles of x: 4
    (12288, 2048, 128, 1, 4),   # 8 warps would hold 256 k each
    (12288, 4096, 32, 1, 4),    # MXFP8 keeps the general rule
])
def test_plan_warps(n, k, group, m, warps):
    got, per, _, _ = G.plan(n, k, group, num_sms=132, m=m)
    assert got == warps and got * per >= k > (got - 1) * per


@pytest.mark.parametrize("n, k, m, fe8", [
    (4096, 14336, 1, True),     # 256 blocks of 8 warps: fits 16 warps per SM
    (12288, 4096, 1, False),    # 92 registers would add a wave
    (28672, 4096, 2, False),
    (12288, 4096, 4, True),     # M = 3, 4 always
    (6144, 4096, 3, True),
    (12288, 4096, 8, False),    # M >= 5: the one-MMA-per-block path
])
def test_plan_fast_e8m0(n, k, m, fe8):
    assert G.plan(n, k, 32, num_sms=132, m=m)[3] is fe8
    assert G.plan(n, k, 0, num_sms=132, m=m)[3] is False


@pytest.mark.skipif(shutil.which("nvcc") is None and G.nvcc_path() is None, reason="no CUDA toolkit")
def test_kernel_source_compiles(tmp_path):
    nvcc = G.nvcc_path() or shutil.which("nvcc")
    proc = subprocess.run([nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "k.cubin"),
                           G._SOURCE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("scheme", ["fp8-w", "fp8-w-tensor", "fp8-w-block", "mxfp8-w"])
def test_a16_taken_for_static_small_m(scheme):
    for m in (1, 2, 16):
        assert CudaW8A16Gemv().can_implement(_problem(scheme, m=m)) == (True, "")
    ok, why = CudaW8A16Gemv(at_m1=False, m1_peer="triton_w8").can_implement(_problem(scheme, m=1))
    assert not ok and why.startswith("M=1: triton_w8's GEMV measured as fast or faster")
    assert CudaW8A16Gemv(at_m1=False).can_implement(_problem(scheme, m=2)) == (True, "")


@pytest.mark.parametrize("problem, why", [
    (_problem("fp8-w", m=None), "M is dynamic"),
    (_problem("fp8-w", m=17), "M=17 > 16"),
    (_problem("fp8-w", k=4160), "K=4160 must be a multiple of 128"),
    (_problem("mxfp8-w", k=4224), "K=4224 must be a multiple of 256"),
    (_problem("fp8-w", dtype=torch.float32), "bf16 or fp16"),
    (_problem("fp8-dynamic"), "not an e4m3 weight-only scheme"),
    (_problem("mxfp8"), "not an e4m3 weight-only scheme"),
])
def test_a16_declined_with_reason(problem, why):
    ok, reason = CudaW8A16Gemv().can_implement(problem)
    assert not ok and why in reason


def test_registry_a16_order():
    """Where the W8A16 GEMV stands per format, and what the report says at M = 1."""
    from mxpass.lowering.kernels import candidates
    from mxpass.lowering.registry import RegistryKey

    table = candidates()
    for scheme, peer in (("fp8-w", "triton_w8"), ("fp8-w-tensor", "triton_w8"), ("fp8-w-block", None),
                         ("mxfp8-w", "triton_mxfp8")):
        names = [k.name for k in table[RegistryKey("linear", scheme)]]
        assert names[1] == "cuda_w8a16_gemv" and names[2] == (peer or "triton_w8"), names
        gemv = table[RegistryKey("linear", scheme)][1]
        assert gemv.can_implement(_problem(scheme, m=1))[0] == (peer is None)


@pytest.mark.parametrize("scheme, group", [("fp8-w", 0), ("fp8-w-tensor", 0), ("fp8-w-block", 128), ("mxfp8-w", 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a16_fake_shapes(scheme, group, dtype):
    from mxpass import quant

    wq, ws = quant.quantize_weight(get_format(scheme), torch.randn(40, 256) * 0.02, "w")
    x = torch.randn(3, 256, dtype=dtype)
    with FakeTensorMode() as mode:
        y = G.w8a16_gemv(mode.from_tensor(x), mode.from_tensor(wq), mode.from_tensor(ws), None, group)
    assert y.shape == (3, 40) and y.dtype == dtype


def test_a16_bad_arguments_are_errors():
    from mxpass import quant

    wq, ws = quant.quantize_weight(get_format("fp8-w"), torch.randn(40, 256) * 0.02, "w")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 16"):
        G._check_a16(torch.randn(17, 256, dtype=torch.bfloat16), wq, ws, None, 0)
    with pytest.raises(TypeError, match="x must be bf16 or fp16"):
        G._check_a16(x.float(), wq, ws, None, 0)
    with pytest.raises(TypeError, match="weight must be float8_e4m3fn"):
        G._check_a16(x, wq.view(torch.int8), ws, None, 0)
    with pytest.raises(ValueError, match="x has K=128"):
        G._check_a16(x[:, :128], wq, ws, None, 0)
    with pytest.raises(ValueError, match="bias must be"):
        G._check_a16(x, wq, ws, torch.zeros(40, dtype=torch.float16), 0)
    with pytest.raises(ValueError, match="needs CUDA"):
        G.w8a16_gemv(x, wq, ws, None, 0)
