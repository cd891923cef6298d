"""GPU tests of ``mxpass::int8_mm_triton`` (kernels/triton/int8_gemm.py), the INT8 W8A8 GEMM.

Every test compares with exact math on the same quantized operands (``_int_mm``'s int32
sum, or a float64 matmul of the dequantized operands, scaled in float64) and with
``mxpass.quant.linear_reference`` on fresh random inputs. Shapes: M = tokens, K = in
features, N = out features. Run on the GPU machine: ``pytest -m gpu tests/gpu/test_triton_int8.py``.
"""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from tests.conftest import CountingBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import mxpass.kernels.triton.int8_gemm as ig
    from mxpass import quant
    from mxpass.benchmarks.linear import rel_error
    from mxpass.formats import get_format

# The int32 sums are exact; the epilogue's two fp32 products add ~2**-23 relative; what is
# left is the single rounding to the output dtype (2**-9 bf16 / 2**-12 fp16 relative per
# element). A wrong tile, scale or row gives errors of order 1.
TOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
# linear_reference rounds the fake-quantized activation to x.dtype before its fp32 matmul
# (2**-9 relative per element in bf16, random signs): measured ~1e-3 on these shapes.
REF_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}

# one config per kernel path, on shapes where each meets tails and several tiles
PLANS = {
    "default": None,
    "default-k1008": None,  # the op's plan on K = 1008 (16-byte rows)
    "small-tiles": ig.Plan(((0, None, ig.Config(64, 64, 64, 4, 3)),)) if torch.cuda.is_available() else None,
    "persistent": ig.Plan(((0, None, ig.Config(64, 128, 64, 4, 3, persistent=True)),)) if torch.cuda.is_available() else None,
    "swap": ig.Plan(((0, None, ig.Config(64, 32, 128, 4, 3, swap=True)),)) if torch.cuda.is_available() else None,
    "tma": ig.Plan(((0, None, ig.Config(64, 64, 64, 4, 3, tma=True)),)) if torch.cuda.is_available() else None,
    "tma-persistent": ig.Plan(((0, None, ig.Config(128, 128, 64, 8, 3, persistent=True, tma=True)),))
    if torch.cuda.is_available() else None,
}
# K = 1000 is not a multiple of 16: TMA (eager-only plans) needs K = 1008 (a tail in every BLOCK_K still)
TMA_K = 1008


def _operands(M, K, N, scheme="int8", dtype=torch.bfloat16, bias=False, seed=0):
    fmt = get_format(scheme)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=g, device="cuda") * 0.05).to(dtype)
    act = torch.tensor([0.02], device="cuda") if fmt.static_activation else None
    q, s = quant.quantize_weight(fmt, w, "test.weight")
    xq, xs = quant.quantize_activation(fmt, x, act)
    b = (torch.randn(N, generator=g, device="cuda") * 0.1).to(dtype) if bias else None
    return fmt, x, act, xq, xs, q, s, b


def _exact(fmt, xq, xs, q, s, b):
    y = quant.dequantize_activation(fmt, xq, xs).double() @ quant.dequantize_weight(fmt, q, s).double().t()
    return y if b is None else y + b.double()


def _run(xq, xs, q, s, b, dtype, plan):
    if plan is None:
        return torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, b, dtype)
    return ig.int8_mm_with_plan(xq, xs, q, s, b, dtype, plan)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("scheme", ["int8", "int8-static"])
@pytest.mark.parametrize("M", [0, 1, 3, 16, 17, 255, 256, 300])
def test_matches_exact_math_and_reference(plan, scheme, M):
    """K = 1000 (1008 for TMA) and N = 200: tails in every BLOCK_K and BLOCK_N; bias on odd M; fp16 output
    at M = 3, 17, 256 (one of each regime edge), bf16 elsewhere."""
    dtype = torch.float16 if M in (3, 17, 256) else torch.bfloat16
    k = TMA_K if ("tma" in plan or "k1008" in plan) else 1000
    fmt, x, act, xq, xs, q, s, b = _operands(M, k, 200, scheme, dtype, bias=M % 2 == 1, seed=M)
    y = _run(xq, xs, q, s, b, dtype, PLANS[plan])
    assert y.shape == (M, 200) and y.dtype == dtype
    if M:
        assert rel_error(y, _exact(fmt, xq, xs, q, s, b)) < TOL[dtype]
        assert rel_error(y, quant.linear_reference(x, q, s, b, act, fmt)) < REF_TOL[dtype]


@pytest.mark.parametrize("M", [4096, 1000])
def test_large_shape_against_int_mm(M):
    """Llama-3-8B qkv shape (the benchmark's): against _int_mm's exact int32 sum, scaled in float64."""
    fmt, x, act, xq, xs, q, s, _ = _operands(M, 4096, 12288)
    y = torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, None, torch.bfloat16)
    acc = torch._int_mm(xq, q.t())
    exact = acc.double() * xs.double() * s.double().t()
    assert rel_error(y, exact) < TOL[torch.bfloat16]
    # cublas_int_mm's epilogue (fp32, same order): equal up to fp32 rounding of the scales' products
    ref = (acc.float() * xs.reshape(-1, 1) * s.reshape(1, -1)).to(torch.bfloat16)
    assert (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2.0**-7
    assert (y == ref).float().mean() > 0.99


def test_extreme_values_sum_exactly():
    """Every operand at -128 / 127 (the largest products), K = 4096, both regimes: the int32 sums
    are exact, so the output equals cublas_int_mm's epilogue on _int_mm's exact sum, bit for bit."""
    K, N = 4096, 256
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.where(torch.rand(N, K, generator=g, device="cuda") < 0.5, -128, 127).to(torch.int8)
    s = torch.full((N, 1), 2.0**-12, device="cuda")
    for M in (64, 300):
        xq = torch.where(torch.rand(M, K, generator=g, device="cuda") < 0.5, -128, 127).to(torch.int8)
        xs = torch.full((M, 1), 2.0**-12, device="cuda")
        y = torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, None, torch.bfloat16)
        acc = torch._int_mm(xq, q.t())
        assert torch.equal(acc.double(), xq.double() @ q.double().t())
        assert torch.equal(y, (acc.float() * xs * s.t()).to(torch.bfloat16))


def test_nan_row_stays_in_its_row():
    fmt, x, act, xq, xs, q, s, _ = _operands(40, 512, 256)
    x[7, 3] = float("nan")
    xq, xs = quant.quantize_activation(fmt, x, None)
    y = torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, None, torch.bfloat16)
    assert torch.isnan(y[7]).all() and not torch.isnan(y[torch.arange(40, device="cuda") != 7]).any()


def test_writes_every_element_and_is_deterministic():
    fmt, x, act, xq, xs, q, s, b = _operands(300, 1024, 384, bias=True)
    ys = [torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, b, torch.bfloat16) for _ in range(3)]
    assert torch.isfinite(ys[0]).all()
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_bad_inputs_are_errors():
    fmt, x, act, xq, xs, q, s, _ = _operands(4, 64, 32)
    with pytest.raises(ValueError, match="disagree on K"):
        torch.ops.mxpass.int8_mm_triton(xq[:, :32], xs, q, s, None, torch.bfloat16)
    with pytest.raises(TypeError, match="xq must be a 2-D int8"):
        torch.ops.mxpass.int8_mm_triton(x, xs, q, s, None, torch.bfloat16)
    with pytest.raises(ValueError, match="xscale"):
        torch.ops.mxpass.int8_mm_triton(xq, xs[:2], q, s, None, torch.bfloat16)
    with pytest.raises(TypeError, match="wscale has dtype"):
        torch.ops.mxpass.int8_mm_triton(xq, xs, q, s.half(), None, torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, None, torch.float32)


@pytest.mark.parametrize("scheme,M,bias", [("int8", 0, False), ("int8-static", 1, True), ("int8", 40, True)])
def test_opcheck(scheme, M, bias):
    """Fake vs real (shapes, strides, dtypes), AOT dispatch with dynamic shapes, schema (no mutation)."""
    _, _, _, xq, xs, q, s, b = _operands(M, 256, 96, scheme, bias=bias)
    torch.library.opcheck(torch.ops.mxpass.int8_mm_triton.default, (xq, xs, q, s, b, torch.bfloat16))


def test_compiles_once_for_every_m_and_inductor_launches_the_kernel():
    """One Inductor graph (dynamic M) for M in {3, ..., 2048} (Dynamo specializes M = 1), both
    regimes; the generated code launches the kernel itself (no call back into the op)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fmt, _, _, _, _, q, s, b = _operands(1, 1024, 384, bias=True)
    backend = CountingBackend(compile_fx)
    f = torch.compile(lambda xq, xs: torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, b, torch.bfloat16),
                      backend=backend, dynamic=True)
    code = None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, M in enumerate((3, 17, 255, 256, 300, 2048)):
            x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
            xq, xs = quant.quantize_activation(fmt, x, None)
            y, codes = run_and_get_code(f, xq, xs) if i == 0 else (f(xq, xs), None)
            assert rel_error(y, _exact(fmt, xq, xs, q, s, b)) < TOL[torch.bfloat16], M
            if codes is not None:
                code = "\n".join(codes)
    assert backend.graphs == 1
    assert "_int8_mm_kernel" in code
    assert "torch.ops.mxpass" not in code and "mxpass.int8_mm_triton" not in code


def test_quantization_and_op_compile_without_recompiles():
    """The registry's pattern (per-token quantization, then the op) under torch.compile with a
    dynamic M: no recompile across M in {3, ..., 2048}, results exact up to the output rounding."""
    torch._dynamo.reset()
    fmt, _, _, _, _, q, s, b = _operands(1, 1024, 384, bias=True)

    def f(x):
        xq, xs = quant.quantize_activation(fmt, x, None)
        return torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, b, x.dtype)

    fc = torch.compile(f, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for M in (3, 17, 255, 256, 300, 2048):
            x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
            xq, xs = quant.quantize_activation(fmt, x, None)
            assert rel_error(fc(x), _exact(fmt, xq, xs, q, s, b)) < TOL[torch.bfloat16], M


def test_registry_kernel_runs_the_scheme():
    """TritonInt8MM answers for sm_90 and its run (activation quantization + op) matches the reference."""
    from mxpass.lowering.kernels import TritonInt8MM
    from mxpass.lowering.registry import Problem

    kern = TritonInt8MM()
    dev = torch.device("cuda", 0)
    ok, why = kern.is_supported(dev)
    if torch.cuda.get_device_capability()[0] != 9:
        assert not ok and why
        pytest.skip(why)
    assert ok, why
    for scheme in ("int8", "int8-static"):
        fmt = get_format(scheme)
        assert kern.can_implement(Problem("linear", fmt, dev, 1024, 256, torch.bfloat16)) == (True, "")
        assert kern.can_implement(Problem("linear", fmt, dev, 1024, 256, torch.bfloat16, m=4096)) == (True, "")
        assert not kern.can_implement(Problem("linear", fmt, dev, 1024, 256, torch.bfloat16, m=16))[0]
        assert not kern.can_implement(Problem("linear", fmt, dev, 1024, 256, torch.float32))[0]
        assert not kern.can_implement(Problem("linear", fmt, dev, 1000, 256, torch.bfloat16))[0]
        assert not kern.can_implement(Problem("linear", get_format("fp8-dynamic"), dev, 1024, 256, torch.bfloat16))[0]
        _, x, act, _, _, q, s, b = _operands(33, 1024, 256, scheme, bias=True)
        y = kern.run(x, q, s, b, act, fmt)
        assert rel_error(y, quant.linear_reference(x, q, s, b, act, fmt)) < REF_TOL[torch.bfloat16]
