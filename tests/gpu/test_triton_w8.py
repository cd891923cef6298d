"""GPU tests of ``mxpass::w8_linear_triton`` (kernels/triton/w8_linear.py).

Shapes: M = tokens, K = in features, N = out features. Every test compares with
``mxpass.quant.linear_reference`` for a weight-only format (dequantize to fp32, fp32
matmul) on fresh random inputs. Run on the GPU machine: ``pytest -m gpu tests/gpu/test_triton_w8.py``.
"""

import dataclasses

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from tests.conftest import CountingBackend, opcheck_float8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import mxpass
    import mxpass.kernels.triton.w8_linear as wk
    from mxpass import quant
    from mxpass.benchmarks.linear import rel_error
    from mxpass.formats import get_format

# The op and the reference both round one fp32 result per element to x.dtype (relative
# error up to 2**-8 in bf16, 2**-11 in fp16); their fp32 sums differ only in order and in
# where the scale is applied, so most outputs are identical and the rest differ by one ulp
# (measured: <= 2e-4 relative, bf16). The large-M "block" path also rounds each
# W = q * s to x.dtype before its GEMM (same unit roundoff per element, random signs):
# 2.5e-3 relative in bf16 at K = 4096 on H200, 2.9e-4 - 3.5e-4 in fp16 (interpreter).
# 2**-8 / 2**-10 covers that and stays far below what a wrong tile or scale gives (order 1).
TOLERANCE = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}

# (format giving the quantization, granularity); weight-only versions of the formats
CASES = {
    "fp8-channel": ("fp8-w", "channel"),
    "fp8-tensor": ("fp8-w-tensor", "tensor"),
    "fp8-block": ("fp8-w-block", "block"),
    "int8-channel": ("int8", "channel"),
    "int8-tensor": ("int8-static", "tensor"),
}
# Every regime of the default plan and its edges: 1 gemv, 3 and 16 small dot, 17 medium dot, 300 dequantize + GEMM.
MS = [0, 1, 3, 16, 17, 300]
# K = 1000: partial 128-wide scale blocks, rows not 16-byte aligned, tails in every BLOCK_K;
# N = 200: partial 128-row scale block and tails in every BLOCK_N.
K, N = 1000, 200


def _weight_only(name):
    return dataclasses.replace(get_format(name), activation=None)


def _inputs(case, M, k=K, n=N, dtype=torch.bfloat16, bias=False, seed=0):
    fmt = _weight_only(CASES[case][0])
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device="cuda") * 0.05).to(dtype)
    q, s = quant.quantize_weight(fmt, w, "test.weight")
    x = torch.randn(M, k, generator=g, device="cuda").to(dtype)
    b = (torch.randn(n, generator=g, device="cuda") * 0.1).to(dtype) if bias else None
    return fmt, x, q, s, b


def _close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.numel():
        err = rel_error(y, ref)
        assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_reference(case, M, dtype):
    # with and without bias on every path: odd M in bf16, even M in fp16
    bias = (M % 2 == 1) == (dtype == torch.bfloat16)
    fmt, x, q, s, b = _inputs(case, M, dtype=dtype, bias=bias, seed=M)
    y = torch.ops.mxpass.w8_linear_triton(x, q, s, b, CASES[case][1])
    _close(y, quant.linear_reference(x, q, s, b, None, fmt), dtype)


@pytest.mark.parametrize("case", ["fp8-channel", "fp8-block"])
def test_e4m3_without_inline_ptx(case):
    """The dot kernel's plain ``q.to(bf16)`` conversion (asm=False) computes the same."""
    fmt, x, q, s, _ = _inputs(case, 9, seed=4)
    y = wk.w8_linear_with_plan(x, q, s, None, CASES[case][1], wk.default_plan(K, N), asm=False)
    _close(y, quant.linear_reference(x, q, s, None, None, fmt), x.dtype)


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_gemv_with_and_without_pipelining(case, stages):
    """The gemv alone (M = 1, 2), its K loop plain or pipelined by tl.range, split in 3."""
    plan = wk.Plan((wk.Regime(0, None, wk.SplitK("gemv", 4, 1, 512, 3, 4, stages, True)),))
    for M in (1, 2):
        fmt, x, q, s, b = _inputs(case, M, bias=M == 2, seed=stages)
        y = wk.w8_linear_with_plan(x, q, s, b, CASES[case][1], plan)
        _close(y, quant.linear_reference(x, q, s, b, None, fmt), x.dtype)


@pytest.mark.parametrize("wdtype", ["e4m3", "int8"])
def test_every_weight_byte_is_decoded_exactly(wdtype):
    """All 254 finite e4m3 values (subnormals, +/-0, +/-448) or all 256 int8 values, through every path."""
    codes = torch.arange(256, dtype=torch.int32)
    if wdtype == "e4m3":
        codes = codes[(codes & 0x7F) != 0x7F]  # drop the NaN bytes
    dt = torch.float8_e4m3fn if wdtype == "e4m3" else torch.int8
    q = codes.to(torch.uint8).view(dt).reshape(2, -1).repeat(64, 1).cuda()  # [128, k]
    k = q.shape[1]
    s = torch.full((128, 1), 2.0**-3, device="cuda")
    fmt = _weight_only("fp8-w" if wdtype == "e4m3" else "int8")
    eye = torch.eye(k, device="cuda", dtype=torch.bfloat16).repeat(3, 1)
    for M in (1, 16, k, 300):  # gemv, small dot, medium dot, dequantize + GEMM
        for start in range(0, k, M):
            x = eye[start : start + M]  # y[m, n] = q[n, (start + m) % k] * s[n]: one exact product
            y = torch.ops.mxpass.w8_linear_triton(x, q, s, None, "channel")
            assert torch.equal(y, quant.linear_reference(x, q, s, None, None, fmt)), (M, start)


def test_writes_every_element_and_is_deterministic():
    """Output memory poisoned with NaN by the caching allocator's previous tenant; two runs bit-identical."""
    for M in (1, 9, 200, 300):
        _, x, q, s, _ = _inputs("fp8-block", M, seed=M)
        torch.full((M * N * 4,), float("nan"), device="cuda")  # freed: the op's buffers reuse it
        y1 = torch.ops.mxpass.w8_linear_triton(x, q, s, None, "block")
        y2 = torch.ops.mxpass.w8_linear_triton(x, q, s, None, "block")
        assert torch.isfinite(y1).all()
        assert torch.equal(y1, y2)


def test_bad_inputs_are_errors():
    _, x, q, s, _ = _inputs("fp8-channel", 2)
    with pytest.raises(ValueError, match="granularity 'group'"):
        torch.ops.mxpass.w8_linear_triton(x, q, s, None, "group")
    with pytest.raises(ValueError, match=r"block wscale has shape \(200, 1\); expected \(2, 8\)"):
        torch.ops.mxpass.w8_linear_triton(x, q, s, None, "block")
    with pytest.raises(TypeError, match="float32"):
        torch.ops.mxpass.w8_linear_triton(x, q, s.half(), None, "channel")


@pytest.mark.parametrize("case,M,bias", [("fp8-channel", 0, False), ("int8-tensor", 1, True), ("fp8-block", 40, True)])
def test_opcheck(case, M, bias):
    """Fake vs real (shapes, strides, dtypes), AOT dispatch with dynamic shapes, no input mutation."""
    _, x, q, s, b = _inputs(case, M, k=256, n=96, bias=bias)
    opcheck_float8(torch.ops.mxpass.w8_linear_triton.default, (x, q, s, b, CASES[case][1]))


def test_compiles_once_and_inductor_launches_the_kernels():
    """One Inductor graph for M in {3, ..., 2048} (every regime); its code launches our kernels, not the op."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fmt, _, q, s, b = _inputs("fp8-channel", 1, bias=True)
    backend = CountingBackend(compile_fx)
    f = torch.compile(lambda x: torch.ops.mxpass.w8_linear_triton(x, q, s, b, "channel"), backend=backend, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, M in enumerate((3, 15, 16, 17, 128, 300, 2048)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y, codes = run_and_get_code(f, x) if i == 0 else (f(x), None)
            _close(y, quant.linear_reference(x, q, s, b, None, fmt), x.dtype)
            if codes is not None:
                code = "\n".join(codes)
    assert backend.graphs == 1
    for name in ("_w8_gemv_kernel", "_w8_dot_kernel", "_w8_cast_kernel", "_splitk_reduce_kernel"):
        assert name in code, name
    assert "torch.ops.mxpass" not in code and "mxpass.w8_linear_triton" not in code


def test_registry_picks_triton_w8_and_runs_it(monkeypatch):
    """On sm_89+ the W8A16 and FP8_BLOCK formats pick triton_w8 for a dynamic M (FP8_BLOCK once
    cuBLAS block scaling is disabled); its run quantizes the activation as the format says."""
    from mxpass.lowering import registry
    from mxpass.lowering.kernels import TritonW8Linear
    from mxpass.lowering.registry import Problem

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs sm_89+")
    monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "cublas_scaled_mm_blockwise")
    for name in ("fp8-w", "fp8-w-tensor", "fp8-w-block", "fp8-block"):
        fmt = get_format(name)
        choice = registry.choose(Problem("linear", fmt, torch.device("cuda", 0), 1024, 256, torch.bfloat16))
        assert choice.kernel.name == "triton_w8", choice.describe()
        g = torch.Generator(device="cuda").manual_seed(1)
        q, s = quant.quantize_weight(fmt, torch.randn(256, 1024, generator=g, device="cuda").bfloat16() * 0.05, "w")
        for M in (1, 33):
            x = torch.randn(M, 1024, generator=g, device="cuda", dtype=torch.bfloat16)
            y = TritonW8Linear().run(x, q, s, None, None, fmt)
            _close(y, quant.linear_reference(x, q, s, None, None, fmt), x.dtype)


@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("scheme", ["fp8-w", "fp8-w-tensor", "fp8-w-block", "fp8-block"])
def test_backend_lowers_to_triton_w8(monkeypatch, scheme, tokens):
    """RMSNorm -> linear(+bias) through mxpass.backend: triton_w8 is chosen and matches the
    reference kernel on the same quantized values (fp8-block: 1x128 activation groups too)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(LlamaRMSNorm(512), torch.nn.Linear(512, 1024)).cuda().bfloat16()
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        torch._dynamo.reset()
        monkeypatch.setenv("MXPASS_KERNEL", "reference")
        ref = torch.compile(model, backend=mxpass.backend(scheme=scheme))(x)
        monkeypatch.delenv("MXPASS_KERNEL")
        torch._dynamo.reset()
        # the static-M <= 16 GEMVs and fp8-block's cuBLAS block-scaled choice
        monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "cuda_w8a8_gemv,cuda_w8a16_gemv,cublas_scaled_mm_blockwise")
        out = torch.compile(model, backend=mxpass.backend(scheme=scheme))(x)
    assert mxpass.last_report().rewritten[0].kernel.startswith("triton_w8")
    _close(out, ref, torch.bfloat16)
