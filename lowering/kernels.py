"""The kernel candidates of the registry, in order of preference per (op, format).

Each kernel's ``run`` receives the raw activation [M, K] and applies the format's
activation quantization itself (as ATen math, which Inductor fuses into the producer):
fake-quantized for kernels that compute on dequantized values (``_FakeQuantizedInput``,
which also take it fake-quantized elsewhere through ``run_fake``), really quantized for the
W8A8 kernels (``_QuantizedInput``), which also take it quantized elsewhere through
``run_quantized``. MoE kernels (op "moe") take the ``mxpass::moe`` arguments and apply
the activation quantization of both expert inputs themselves. Order is decided by measurement (docs/performance.md); the reference is
always last and always available.
"""

from __future__ import annotations

import importlib.util
import re

import torch

from mxpass import quant
from mxpass.formats import Format, format_names
from mxpass.lowering.registry import Kernel, Problem, RegistryKey


def _cuda_capability(device: torch.device, need: tuple[int, int], what: str) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"needs a CUDA device, got {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return False, f"needs compute capability >= {need[0]}.{need[1]} for {what}, device has {cap[0]}.{cap[1]}"
    return True, ""


def _half_precision(problem: Problem) -> tuple[bool, str]:
    if problem.dtype not in (torch.bfloat16, torch.float16):
        return False, f"activations must be bf16 or fp16, got {problem.dtype}"
    return True, ""


class _Reference:
    """The definition of an op in ATen math: runs on any device, dtype and shape."""

    name = "reference"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        return True, ""


class _FakeQuantizedInput:
    """A kernel on the activation quantize-dequantized in its own dtype. ``run`` fake-quantizes
    it (ATen math that Inductor fuses into its producer); ``run_fake`` takes
    ``quant.fake_quantize_activation``'s output computed elsewhere (``lowering/producers.py``:
    act_quant_triton's MXFP8 fake-quantization)."""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        return self.run_fake(quant.fake_quantize_activation(fmt, x, act_scale), qweight, wscale, bias, fmt)


class ReferenceLinear(_Reference):
    """Fake-quantized activation, dequantized weight, fp32 matmul, in ATen ops (any device).
    It quantizes its activation itself (never act_quant_triton's), as the definition."""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        return quant.linear_reference(x, qweight, wscale, bias, act_scale, fmt)


class _TritonE4M3:
    """Triton kernels that convert e4m3 in hardware (sm_89 Ada, sm_90 Hopper and later) and
    compute in bf16/fp16."""

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        return _cuda_capability(device, (8, 9), "e4m3")

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        return _half_precision(problem)


class TritonMXFP8Linear(_FakeQuantizedInput, _TritonE4M3):
    """Triton MXFP8 x bf16/fp16 GEMM (weights dequantized in-kernel), small-M and large-M paths."""

    name = "triton_mxfp8"

    def run_fake(self, xf, qweight, wscale, bias, fmt: Format):
        from mxpass.kernels.triton import mxfp8_linear  # noqa: F401  (registers the op)

        return torch.ops.mxpass.mxfp8_linear_triton(xf, qweight, wscale, bias)


class TritonW8Linear(TritonMXFP8Linear):
    """Triton FP8/INT8-weight x bf16/fp16 linear with float32 channel, tensor or 128x128-block
    scales (the weight is never rounded, except in the large-M scratch of block scales); the
    M = 1 GEMV and the split-K tensor-core paths read the 1-byte weight once. Same device
    and dtype requirements as ``triton_mxfp8``."""

    name = "triton_w8"

    def run_fake(self, xf, qweight, wscale, bias, fmt: Format):
        from mxpass.kernels.triton import w8_linear  # noqa: F401  (registers the op)

        return torch.ops.mxpass.w8_linear_triton(xf, qweight, wscale, bias, fmt.weight_granularity)


class _QuantizedInput:
    """A kernel on the activation really quantized. ``run`` quantizes it (ATen math that
    Inductor fuses into its producer); ``run_quantized`` takes ``quant.quantize_activation``'s
    outputs computed elsewhere (``lowering/producers.py``: act_quant_triton)."""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        xq, xs = quant.quantize_activation(fmt, x, act_scale)
        return self.run_quantized(xq, xs, qweight, wscale, bias, fmt, x.dtype)


class ScaledMMLinear(_QuantizedInput):
    """cuBLAS FP8 GEMM through ``torch._scaled_mm``: rowwise (per-token x per-channel) or
    tensorwise (per-tensor x per-tensor) scales; the activation is really quantized to e4m3."""

    def __init__(self, mode: str):
        self.mode = mode
        self.name = f"cublas_scaled_mm_{mode}"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return _cuda_capability(device, (8, 9), "FP8 tensor cores")

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.dtype not in (torch.bfloat16, torch.float16) or (
                self.mode == "rowwise" and problem.dtype != torch.bfloat16):
            return False, f"{self.mode} scaling needs {'bf16' if self.mode == 'rowwise' else 'bf16/fp16'} output, got {problem.dtype}"
        if problem.k % 16 or problem.n % 16:
            return False, f"K={problem.k} and N={problem.n} must be multiples of 16"
        return True, ""

    def run_quantized(self, xq, xs, qweight, wscale, bias, fmt: Format, out_dtype: torch.dtype):
        if self.mode == "rowwise":
            scale_a, scale_b = xs.reshape(-1, 1), wscale.reshape(1, -1)
        else:
            scale_a, scale_b = xs.reshape(()), wscale.reshape(())
        y = torch._scaled_mm(xq, qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
        return y if bias is None else y + bias


def _torch_at_least(major: int, minor: int) -> bool:
    """torch.__version__ >= major.minor (local and pre-release suffixes ignored)."""
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(re.match(r"\d+", parts[1]).group())) >= (major, minor)
    except (IndexError, AttributeError, ValueError):
        return False


def _cuda_toolkit_at_least(major: int, minor: int) -> bool:
    if not torch.version.cuda:
        return False
    got = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    return got >= (major, minor)


class ScaledMMBlockwiseLinear(_QuantizedInput):
    """cuBLAS FP8 GEMM with DeepSeek-style block scales through ``torch._scaled_mm``: the
    activation really quantized in 1 x 128 groups (scale [M, K/128], passed outer-dim-major,
    strides (1, M)), the weight's 128 x 128 block scales [N/128, K/128] passed as their
    transpose. cuBLAS (>= 12.9) implements this on Hopper only; torch routes it there from
    2.9 on and raises on every other architecture. cuBLAS 13.0 on H200 answered
    CUBLAS_STATUS_NOT_SUPPORTED for M in {1, 2, 5} and ran M in {16, 64, 128, 4096}: rows are
    zero-padded to a multiple of ``ROWS`` with guard-free size arithmetic (no row is added
    when M is one already), and the padded rows of the output are dropped. cuBLAS has no
    fast-accumulation mode for 128x128 block scales (torch raises)."""

    name = "cublas_scaled_mm_blockwise"
    ROWS = 16

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        ok, reason = _cuda_capability(device, (9, 0), "cuBLAS 1x128 / 128x128 block-scaled FP8")
        if not ok:
            return ok, reason
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:
            return False, f"cuBLAS block-scaled FP8 through torch._scaled_mm runs on sm_90 only, device has {cap[0]}.{cap[1]}"
        if not _torch_at_least(2, 9):
            return False, f"needs torch >= 2.9 for block scales in torch._scaled_mm, got {torch.__version__}"
        if not _cuda_toolkit_at_least(12, 9):
            return False, f"needs CUDA >= 12.9 (cuBLAS block scaling), torch is built with {torch.version.cuda}"
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.fmt.weight_granularity != "block" or problem.fmt.activation != "group":
            return False, f"{problem.fmt.name} has no 128x128 weight blocks with 1x128 activation groups"
        if problem.dtype != torch.bfloat16:
            # fp16 output: 2 of 4 shapes (M = 300 and 1000) failed the reference comparison
            # on H200 with cuBLAS 13.0, bf16 passed all; not offered until understood
            return False, f"block scaling is verified with bf16 output only, got {problem.dtype}"
        if problem.k % 128 or problem.n % 128:
            return False, f"K={problem.k} and N={problem.n} must be multiples of 128 (whole scale blocks)"
        if problem.k % 512:
            # measured on H200 (cuBLAS 13.0): with more than one 128-row block of N, the
            # output is wrong (errors of order 1 and more) for every K / 128 that is not a
            # multiple of 4 (K = 256, 384, 640, 768, 1152) and right for K = 512, 1024
            return False, (f"K={problem.k}: K / 128 must be a multiple of 4 (cuBLAS misreads the weight's "
                           f"block scales otherwise)")
        return True, ""

    def _pad(self, m):
        """Rows to add to M for a multiple of ``ROWS`` (guard-free for a symbolic M)."""
        return (self.ROWS - m % self.ROWS) % self.ROWS

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        m = x.shape[0]
        pad = self._pad(m)
        xq, xs = quant.quantize_activation(fmt, torch.nn.functional.pad(x, (0, 0, 0, pad)), act_scale)
        return self._gemm(xq, xs, qweight, wscale, bias, m, x.dtype)

    def run_quantized(self, xq, xs, qweight, wscale, bias, fmt: Format, out_dtype: torch.dtype):
        """``run`` for an activation quantized elsewhere: its rows padded here (data 0, scale 1)."""
        m = xq.shape[0]
        pad = self._pad(m)
        if not (isinstance(pad, int) and pad == 0):  # a static M that needs none: no copy of xq
            xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(xq.dtype)
            xs = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
        return self._gemm(xq, xs, qweight, wscale, bias, m, out_dtype)

    @staticmethod
    def _gemm(xq, xs, qweight, wscale, bias, m, out_dtype):
        scale_a = xs.t().contiguous().t()  # [M + pad, K/128] outer-dim-major: strides (1, M + pad)
        y = torch._scaled_mm(xq, qweight.t(), scale_a=scale_a, scale_b=wscale.t(), out_dtype=out_dtype)[:m]
        return y if bias is None else y + bias


class DequantMMLinear(_FakeQuantizedInput):
    """Activation fake-quantized and weight dequantized in the model dtype (Inductor
    pointwise code, fused with the producer), then one cuBLAS ``mm``. Works for every format
    and every M; it moves the weight three times (fp8/int8 read, bf16 write and read), so it
    suits large M. Rounding the dequantized values to bf16/fp16 adds up to 2**-9 relative
    error per element (exact for MX, whose scales are powers of two)."""

    name = "dequant_cublas_mm"

    def __init__(self, min_static_m: int | None = None, faster_than: str = ""):
        # min_static_m: offered only where the graph's M is static and at least this (the
        # entry placed before a kernel that serves every M but is slower at large M)
        self.min_static_m = min_static_m
        self.faster_than = faster_than

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"needs a CUDA device, got {device.type}"
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if self.min_static_m is not None:
            where = f"picked first for a static M >= {self.min_static_m}, where it measured faster than {self.faster_than}"
            if problem.m is None:
                return False, f"M is dynamic in this graph ({where})"
            if problem.m < self.min_static_m:
                return False, f"M={problem.m} < {self.min_static_m} ({where})"
        return _half_precision(problem)

    def run_fake(self, xf, qweight, wscale, bias, fmt: Format):
        w = quant.dequantize_weight(fmt, qweight, wscale).to(xf.dtype)
        y = torch.mm(xf, w.t())
        return y if bias is None else y + bias


class IntMMLinear(_QuantizedInput):
    """cuBLAS INT8 GEMM through ``torch._int_mm`` (int32 accumulation, exact), then the
    per-token x per-channel (or per-tensor) rescale in fp32. ``_int_mm`` needs more than 16
    rows: smaller batches are zero-padded to 17 rows with guard-free size arithmetic."""

    name = "cublas_int_mm"
    MIN_ROWS = 17

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return _cuda_capability(device, (7, 5), "INT8 tensor cores")

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.k % 8 or problem.n % 8:
            return False, f"K={problem.k} and N={problem.n} must be multiples of 8"
        return True, ""

    def run_quantized(self, xq, xs, qweight, wscale, bias, fmt: Format, out_dtype: torch.dtype):
        m = xq.shape[0]
        pad = torch.sym_max(self.MIN_ROWS - m, 0)
        acc = torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, pad)), qweight.t())
        y = acc[:m].float() * xs.reshape(-1, 1) * wscale.reshape(1, -1)
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)


class TritonInt8MM(_QuantizedInput):
    """W8A8 INT8 GEMM in Triton (kernels/triton/int8_gemm.py): the activation really quantized
    to int8 (per token, or per tensor for ``int8-static``; ATen math that Inductor fuses into
    the producer), int8 x int8 -> int32 on the tensor cores, scales / bias / cast fused in the
    epilogue (no int32 [M, N] round trip through memory as ``cublas_int_mm`` has)."""

    name = "triton_int8_mm"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        ok, reason = _cuda_capability(device, (8, 0), "int8 tensor cores with Triton's int8 dot")
        if not ok:
            return ok, reason
        cap = torch.cuda.get_device_capability(device)
        if cap[0] != 9:
            return False, (f"tuned and measured only on sm_90 (Hopper wgmma); not offered on compute capability "
                           f"{cap[0]}.{cap[1]}, where cublas_int_mm runs")
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        from mxpass.kernels.triton.int8_gemm import K_ALIGN, MIN_STATIC_M

        if problem.fmt.family != "int8" or problem.fmt.activation not in ("token", "tensor"):
            return False, f"{problem.fmt.name} is not a W8A8 INT8 scheme"
        ok, reason = _half_precision(problem)
        if not ok:
            return ok, reason
        if problem.m is not None and problem.m < MIN_STATIC_M:
            return False, (f"static M={problem.m} < {MIN_STATIC_M}: measured slower than cublas_int_mm at small M "
                           f"(M = 16: 34.0 vs 23.8 us, 4096 x 12288, H200)")
        if problem.k % K_ALIGN:
            return False, (f"K={problem.k} is not a multiple of {K_ALIGN}: int8 rows not 16-byte aligned "
                           f"(no vector loads; cublas_int_mm needs a multiple of 8)")
        return True, ""

    def run_quantized(self, xq, xs, qweight, wscale, bias, fmt: Format, out_dtype: torch.dtype):
        from mxpass.kernels.triton import int8_gemm  # noqa: F401  (registers the op)

        return torch.ops.mxpass.int8_mm_triton(xq, xs, qweight, wscale, bias, out_dtype)


class _CudaGemv:
    """The small-M tensor-core kernels of kernels/cuda/w8a8_gemv.cu, built on first use with
    the CUDA toolkit's nvcc. Taken only when the graph's M is static and at most 16 (decode
    graphs: Dynamo specializes M = 1); a dynamic-M graph keeps the kernel that serves every M."""

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        ok, reason = _cuda_capability(device, (8, 9), "its FP8/INT8 mma.sync build")
        if not ok:
            return ok, reason
        from mxpass.kernels.cuda import w8a8_gemv

        try:
            w8a8_gemv.library(device)
        except w8a8_gemv.BuildError as e:
            return False, str(e).splitlines()[0]
        return True, ""

    def _static_small_m(self, problem: Problem) -> tuple[bool, str]:
        from mxpass.kernels.cuda.w8a8_gemv import MAX_M

        if problem.m is None:
            return False, "M is dynamic in this graph (this kernel is picked for a static M <= 16)"
        if problem.m > MAX_M:
            return False, f"M={problem.m} > {MAX_M}"
        return _half_precision(problem)


class CudaW8A8Gemv(_CudaGemv, _QuantizedInput):
    """Small-M W8A8 linear on FP8 / INT8 tensor cores: the weight streams straight into
    ``mma.sync`` operands, the activation is really quantized (fused into its producer).
    MXFP8 (one mma per 32-k block, E8M0 scales per block) at M = 1 only from
    ``MX_GEMV_M1_MIN_N``: below, triton_mxfp8's CUDA-core GEMV is faster."""

    name = "cuda_w8a8_gemv"

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        from mxpass.kernels.cuda.w8a8_gemv import group_of, shape_problem

        ok, reason = self._static_small_m(problem)
        if not ok:
            return ok, reason
        if problem.fmt.activation is None:
            return False, f"{problem.fmt.name} is not a W8A8 FP8/INT8 scheme"
        group = group_of(problem.fmt)
        if group == 32 and problem.m == 1 and problem.n < MX_GEMV_M1_MIN_N:
            return False, (f"MXFP8 at M=1, N={problem.n}: triton_mxfp8 is faster below N={MX_GEMV_M1_MIN_N} "
                           "(docs/performance.md)")
        why = shape_problem(problem.k, group)
        return (False, why) if why else (True, "")

    def run_quantized(self, xq, xs, qweight, wscale, bias, fmt: Format, out_dtype: torch.dtype):
        from mxpass.kernels.cuda import w8a8_gemv  # also registers the op

        b = None if bias is None else bias.to(out_dtype)
        return torch.ops.mxpass.w8a8_gemv(xq, xs, qweight, wscale, b, w8a8_gemv.group_of(fmt), out_dtype)


class CudaW8A16Gemv(_CudaGemv, _FakeQuantizedInput):
    """Small-M W8A16 linear (e4m3 weights with channel, tensor, 128x128-block or MX scales)
    on bf16 / fp16 tensor cores: the weight streams into ``mma.sync`` operands, converted
    exactly in registers; the activation is used as the model computes it."""

    name = "cuda_w8a16_gemv"

    def __init__(self, at_m1: bool = True, m1_peer: str = ""):
        # at_m1=False: M = 1 is left to ``m1_peer`` (measured as fast or faster there)
        self.at_m1, self.m1_peer = at_m1, m1_peer

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        from mxpass.kernels.cuda.w8a8_gemv import group_of, shape_problem

        ok, reason = self._static_small_m(problem)
        if not ok:
            return ok, reason
        if problem.fmt.activation is not None or problem.fmt.weight != torch.float8_e4m3fn:
            return False, f"{problem.fmt.name} is not an e4m3 weight-only scheme"
        if problem.m == 1 and not self.at_m1:
            return False, f"M=1: {self.m1_peer}'s GEMV measured as fast or faster (docs/performance.md)"
        why = shape_problem(problem.k, group_of(problem.fmt))
        return (False, why) if why else (True, "")

    def run_fake(self, xf, qweight, wscale, bias, fmt: Format):
        from mxpass.kernels.cuda import w8a8_gemv  # also registers the op

        b = None if bias is None else bias.to(xf.dtype)
        return torch.ops.mxpass.w8a16_gemv(xf, qweight, wscale, b, w8a8_gemv.group_of(fmt))


class ReferenceMoE(_Reference):
    """Every expert on every token with dequantized weights, fp32 matmuls, a gather (any device)."""

    def run(self, x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: Format, activation: str):
        from mxpass.ops import moe_reference

        return moe_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt, activation)


class TritonMoE(_TritonE4M3):
    """Fused Triton MoE (kernels/triton/moe.py): routing alignment on the GPU, grouped GEMMs
    with SiLU*mul and the top-k sum fused, a GEMV path for few tokens; weights dequantized
    in-kernel (every weight granularity), activations fake-quantized in ATen math: the
    reference's numerics."""

    name = "triton_moe"

    def run(self, x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: Format, activation: str):
        from mxpass.kernels.triton.moe import moe_triton

        if activation != "silu":
            raise ValueError(f"triton_moe: activation {activation!r} is not implemented (silu only)")
        return moe_triton(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt)


class TritonMoEW8A8(TritonMoE):
    """The fused Triton MoE with the activations really quantized (fp8-dynamic, int8), inside
    its kernels: e4m3 / int8 MMAs in the grouped GEMMs with the scales applied to the sums,
    as the linear W8A8 kernels do. First for those formats: faster than ``triton_moe`` at
    every measured token count, and as close to the unquantized MoE as the reference is; it
    differs from the reference (which rounds q * s to the model dtype before its GEMMs) by
    ~1.5e-2 relative after h's requantization (docs/performance.md, MoE section)."""

    name = "triton_moe_w8a8"

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        from mxpass.kernels.triton.moe import takes_quantized_activations

        if not takes_quantized_activations(problem.fmt):
            return False, "needs per-token activations and channel/tensor weight scales"
        return _half_precision(problem)

    def run(self, x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: Format, activation: str):
        from mxpass.kernels.triton.moe import moe_triton

        if activation != "silu":
            raise ValueError(f"triton_moe_w8a8: activation {activation!r} is not implemented (silu only)")
        return moe_triton(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt, quantized_activations=True)


#: Smallest static M at which the W8A16 formats take dequant_cublas_mm before triton_w8
#: (measured on H200, docs/performance.md).
W8A16_DEQUANT_MIN_M = 512
#: Smallest N at which MXFP8 W8A8 at M = 1 takes cuda_w8a8_gemv before triton_mxfp8 (H200,
#: docs/performance.md: 1.03-1.20x triton_mxfp8 at N = 4096 .. 28672; 0.76x at N = 1024,
#: 0.93x at 2048, 1.0x at 3072, K = 4096). From M = 2 it is taken at every N (M = 2 and 4: 1.6-2.0x faster than
#: triton_mxfp8 at N = 1024 .. 28672; M = 16: 1.06-1.16x).
MX_GEMV_M1_MIN_N = 4096
#: The same for the MXFP8 formats before triton_mxfp8 (H200, same run: triton_mxfp8 faster at
#: M = 128 on all three measured shapes, dequantize + cuBLAS at M = 256; docs/performance.md).
MX_DEQUANT_MIN_M = 256


def candidates() -> dict[RegistryKey, list[Kernel]]:
    ref, dequant, gemv = ReferenceLinear(), DequantMMLinear(), CudaW8A8Gemv()
    # INT8 W8A8: the CUDA GEMV for a static M <= 16, the Triton GEMM for dynamic M and static
    # M >= 128 (1.20-1.29x torch._int_mm at M = 4096), cuBLAS _int_mm between (notes/int8-kernel-notes.md)
    int8 = [gemv, TritonInt8MM(), IntMMLinear()]
    # W8A16: triton_w8 serves every M without guards; in a graph whose M is static and large,
    # dequantize + cuBLAS bf16 is faster (docs/performance.md, "W8A16 at large M")
    w8_large = DequantMMLinear(min_static_m=W8A16_DEQUANT_MIN_M, faster_than="triton_w8")
    # the W8A16 GEMV for a static M <= 16, at M = 1 only for block scales (docs/performance.md)
    w8 = [w8_large, CudaW8A16Gemv(at_m1=False, m1_peer="triton_w8"), TritonW8Linear()]
    w8_block = [w8_large, CudaW8A16Gemv(), TritonW8Linear()]
    # MXFP8 on sm_90 has no MX tensor cores: triton_mxfp8 dequantizes into scratch at M >= 256
    # and runs a Triton GEMM; where the graph fixed a large M, cuBLAS bf16 on the dequantized
    # weight is faster (docs/performance.md, "MXFP8 at large M")
    mx_large = DequantMMLinear(min_static_m=MX_DEQUANT_MIN_M, faster_than="triton_mxfp8")
    mx = [mx_large, CudaW8A16Gemv(at_m1=False, m1_peer="triton_mxfp8"), TritonMXFP8Linear()]
    first = {
        "mxfp8": [mx_large, gemv, TritonMXFP8Linear()], "mxfp8-w": mx,
        "fp8-dynamic": [gemv, ScaledMMLinear("rowwise")], "fp8": [gemv, ScaledMMLinear("tensorwise")],
        "int8": int8, "int8-static": int8,
        "fp8-w": w8, "fp8-w-tensor": w8, "fp8-w-block": w8_block,
        "fp8-block": [gemv, ScaledMMBlockwiseLinear(), TritonW8Linear()],
    }
    table = {RegistryKey("linear", name): [*first.get(name, []), dequant, ref] for name in format_names()}
    # MoE: the fused W8A8 kernel first where it applies (faster at every measured T, docs/performance.md)
    table.update({RegistryKey("moe", name): [TritonMoEW8A8(), TritonMoE(), ReferenceMoE()] for name in format_names()})
    return table
