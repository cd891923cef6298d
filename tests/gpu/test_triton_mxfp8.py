"""GPU tests of ``mxpass::mxfp8_linear_triton`` (kernels/triton/mxfp8_linear.py).

Shapes: M = tokens, K = in features, N = out features. Every test compares with
``mxfp8_linear_reference`` (dequantize to fp32, fp32 matmul) on fresh random inputs.
Run on the GPU machine: ``pytest -m gpu tests/gpu/test_triton_mxfp8.py``.
"""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from tests.conftest import CountingBackend, opcheck_float8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import mxpass.kernels.triton.mxfp8_linear as mk
    from mxpass.benchmarks.linear import TOLERANCE, make_inputs, rel_error
    from mxpass.kernels.reference import mxfp8_linear_reference

# Every threshold of the default plan and its neighbours, plus odd sizes.
MS = [0, 1, 2, 3, 15, 16, 17, 64, 65, 100, 255, 256, 1023, 1024, 1100]
SHAPES = [(4096, 1000), (1056, 4100), (288, 96)]  # (K, N): tails in N and in K's BLOCK_K steps


def _close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.numel():
        err = rel_error(y, ref)
        assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.2e}"


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
def test_op_matches_reference(M, K, N):
    x, q, s, b = make_inputs(M, K, N, seed=M * 7 + K, bias=M % 2 == 1)
    y = torch.ops.mxpass.mxfp8_linear_triton(x, q, s, b)
    _close(y, mxfp8_linear_reference(x, q, s, b), x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 64, 2048])
def test_dtypes_and_bias(M, dtype):
    x, q, s, b = make_inputs(M, 1024, 384, dtype=dtype, seed=M, bias=True)
    _close(torch.ops.mxpass.mxfp8_linear_triton(x, q, s, b), mxfp8_linear_reference(x, q, s, b), dtype)


def _plans(K, N):
    """Each path of the op alone, over all M, at a few configurations."""
    one = lambda impl: mk.Plan((mk.Regime(0, None, impl),))  # noqa: E731
    yield "gemv", one(mk.SplitK("gemv", 32, 1, 256, 3))
    yield "gemv-S1", one(mk.SplitK("gemv", 16, 1, 512, 1))
    yield "gemv-evict", one(mk.SplitK("gemv", 8, 1, 1024, 2, evict_first=True))
    yield "gemv-row", one(mk.SplitK("gemv", 1, 1, 2048, 1, 4, 3))  # one row per program, K tail
    yield "gemv-tiles", one(mk.SplitK("gemv", 4, 1, 256, 2, 4, 3, row_tiles=7))  # 7 row tiles per program, split
    yield "gemv-tiles-S1", one(mk.SplitK("gemv", 2, 1, 512, 1, 4, 2, row_tiles=9))
    yield "gemv-chunk8", one(mk.SplitK("gemv", 4, 1, 256, 3, 4, 4))  # 8 elements per thread, 4 stages
    yield "gemv-nopipe", one(mk.SplitK("gemv", 2, 1, 1024, 2, 4, 1))
    yield "dot16", one(mk.SplitK("dot", 64, 16, 256, 5))
    yield "dot64", one(mk.SplitK("dot", 128, 64, 128, 3, 8))
    yield "dot128", one(mk.SplitK("dot", 64, 128, 128, 2, 4, 3))
    yield "dequant-gemm", one(mk.DequantGemm(mk.SplitK("dot", 128, 128, 64, 1, 8)))
    yield "default", mk.default_plan(K, N)


@pytest.mark.parametrize("M", [1, 7, 33, 300])
def test_every_path(M):
    K, N = 1056, 520
    x, q, s, b = make_inputs(M, K, N, seed=M, bias=True)
    ref = mxfp8_linear_reference(x, q, s, b)
    for name, plan in _plans(K, N):
        y = mk.mxfp8_linear_with_plan(x, q, s, b, plan)
        err = rel_error(y, ref)
        assert err <= TOLERANCE[x.dtype], f"{name}: relative error {err:.2e}"


def test_writes_every_element_and_is_deterministic():
    """Output memory poisoned with NaN by the caching allocator's previous tenant; two runs bit-identical."""
    for M in (1, 9, 200, 1500):
        x, q, s, _ = make_inputs(M, 2048, 1536, seed=M)
        torch.full((M * 1536 * 4,), float("nan"), device="cuda")  # freed: the op's buffers reuse it
        y1 = torch.ops.mxpass.mxfp8_linear_triton(x, q, s)
        y2 = torch.ops.mxpass.mxfp8_linear_triton(x, q, s)
        assert torch.isfinite(y1).all()
        assert torch.equal(y1, y2)


def test_special_scales_and_values():
    """E8M0 byte 0 (2**-127), byte 255 (NaN), zero weights, large scales: NaN exactly where the reference has it."""
    M, K, N = 4, 256, 64
    x, q, s, _ = make_inputs(M, K, N, seed=3)
    sb = s.view(torch.uint8).clone()
    sb[0, :] = 0  # row 0: 2**-127 scales, subnormal products
    sb[1, 2] = 255  # row 1: one NaN block -> whole output column NaN
    sb[2, :] = 127 + 20  # row 2: large, still finite
    q = q.clone()
    q[3] = 0  # row 3: zero weights
    s2 = sb.view(torch.float8_e8m0fnu)
    ref = mxfp8_linear_reference(x, q, s2)
    for plan in (mk.default_plan(K, N),) + tuple(p for _, p in _plans(K, N)):
        for m in (1, M):
            y = mk.mxfp8_linear_with_plan(x[:m], q, s2, None, plan)
            assert torch.equal(torch.isnan(y), torch.isnan(ref[:m]))
            fin = ~torch.isnan(ref[:m])
            assert torch.equal(y[fin], ref[:m][fin]) or rel_error(y[fin], ref[:m][fin]) <= TOLERANCE[x.dtype]


def test_k_not_multiple_of_32_is_an_error():
    x = torch.randn(2, 48, device="cuda", dtype=torch.bfloat16)
    q = torch.zeros(8, 48, device="cuda").to(torch.float8_e4m3fn)
    s = torch.full((8, 1), 127, device="cuda", dtype=torch.uint8).view(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match="multiple of 32"):
        torch.ops.mxpass.mxfp8_linear_triton(x, q, s)


@pytest.mark.parametrize("M,bias", [(0, False), (1, True), (6, False), (40, True), (1030, False)])
def test_opcheck(M, bias):
    """Fake vs real (shapes, strides, dtypes), AOT dispatch with dynamic shapes, no input mutation."""
    x, q, s, b = make_inputs(M, 256, 96, seed=1, bias=bias)
    opcheck_float8(torch.ops.mxpass.mxfp8_linear_triton.default, (x, q, s, b))


@pytest.mark.parametrize("mark", ["dynamic", "unbacked"])
def test_compiles_once_for_every_m(mark):
    """One Inductor graph serves M in {3, ..., 2048}; with M unbacked, also 0 and 1 (no guard on M exists)."""
    torch._dynamo.reset()
    K, N = 4096, 1000
    _, q, s, _ = make_inputs(1, K, N, seed=5)
    backend = CountingBackend(compile_fx)
    f = torch.compile(lambda x: torch.ops.mxpass.mxfp8_linear_triton(x, q, s, None), backend=backend, dynamic=True)
    ms = [3, 15, 16, 17, 128, 2048] + ([0, 1] if mark == "unbacked" else [])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for M in ms:
            x = make_inputs(M, K, 1, seed=M)[0]
            if mark == "unbacked":
                torch._dynamo.decorators.mark_unbacked(x, 0)
            _close(f(x), mxfp8_linear_reference(x, q, s), x.dtype)
    assert backend.graphs == 1
    # Under plain dynamic=True Dynamo specializes M = 0 and M = 1 (its 0/1 rule): one graph each, no more.
    if mark == "dynamic":
        for M in (0, 1, 1, 0):
            x = make_inputs(M, K, 1, seed=M)[0]
            _close(f(x), mxfp8_linear_reference(x, q, s), x.dtype)
        assert backend.graphs == 3


def test_inductor_launches_the_triton_kernels():
    """The generated code launches our kernels itself: no call back into the op, no copy of the weights."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, q, s, b = make_inputs(17, 1024, 512, seed=2, bias=True)
    f = torch.compile(lambda x, q, s, b: torch.ops.mxpass.mxfp8_linear_triton(x, q, s, b), dynamic=True)
    y, codes = run_and_get_code(f, x, q, s, b)
    _close(y, mxfp8_linear_reference(x, q, s, b), x.dtype)
    code = "\n".join(codes)
    for name in ("_mxfp8_gemv_kernel", "_mxfp8_dot_kernel", "_splitk_reduce_kernel", "_mxfp8_dequant_kernel"):
        assert name in code, name
    assert "mxpass.mxfp8_linear_triton" not in code
    assert "clone" not in code.split("def call(")[-1]


def test_cuda_graphs_capture():
    """mode="reduce-overhead": no cudagraph skip, replays match the reference for several M."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, q, s, _ = make_inputs(1, 2048, 768, seed=9)
    f = torch.compile(
        lambda x: torch.ops.mxpass.mxfp8_linear_triton(x, q, s, None), mode="reduce-overhead", dynamic=True
    )
    for M in (1, 4, 4, 4, 64, 64, 64, 2000, 2000, 2000):
        x = make_inputs(M, 2048, 1, seed=M)[0]
        y = f(x).clone()
        _close(y, mxfp8_linear_reference(x, q, s), x.dtype)
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_no_host_sync():
    """Eager op and compiled op run under torch.cuda.set_sync_debug_mode("error")."""
    torch._dynamo.reset()
    _, q, s, b = make_inputs(1, 1024, 256, seed=4, bias=True)
    xs = [make_inputs(M, 1024, 1, seed=M)[0] for M in (1, 8, 100, 1500)]
    f = torch.compile(lambda x: torch.ops.mxpass.mxfp8_linear_triton(x, q, s, b), dynamic=True)
    for x in xs:
        f(x)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs:
            torch.ops.mxpass.mxfp8_linear_triton(x, q, s, b)
            f(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
