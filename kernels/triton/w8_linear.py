"""W8A16 linear: FP8 (e4m3) or INT8 weights with float32 scales, bf16/fp16 activations.

    y [M, N] = x [M, K] @ W.T + bias,   W[n, k] = float(qweight[n, k]) * s(n, k)

    granularity  wscale                       s(n, k)
    "channel"    [N, 1]                       wscale[n, 0]
    "tensor"     [1] (any shape, numel 1)     wscale[0]
    "block"      [ceil(N/128), ceil(K/128)]   wscale[n // 128, k // 128]

Shapes: M = tokens (dynamic), N = out features, K = in features (any K), KB = ceil(K/128)
scale columns of "block". qweight [N, K] float8_e4m3fn or int8, wscale float32, bias [N]
in x.dtype or None; y is x.dtype. The numerics are those of ``mxpass.quant.linear_reference``
for a weight-only format (``mxpass/schemes/fp8.py``, ``mxpass/schemes/int8.py``).

Exactness. Every e4m3 value and every int8 value is exact in fp32, bf16 and fp16 (e4m3:
4 significant bits, exponents 2**-9..2**8; int8: |q| <= 128, 8 bits), so the kernels
never round the weight: they multiply the *unscaled* q by x (exact products on the tensor
cores, fp32 sums) and apply the scale in fp32: "channel"/"tensor" once per output after
the K reduction; "block" once per 128-wide K step (the gemv scales x instead, see there).
The one exception is the large-M path for "block", whose scratch holds W = q * s rounded
to x.dtype (relative error up to 2**-8 per element in bf16, 2**-11 in fp16), as
``dequant_cublas_mm`` does: 2.5e-3 relative on the output in bf16 (K = 4096, H200).

Paths: the M regimes, split-K, the fp32 partials and the deterministic reduction, and the
guard-free run-time dispatch are those of the MXFP8 op (``mxfp8_linear.py``, whose
docstring explains them); its plan types, regime arithmetic and split-K epilogue/reduction
kernels are imported from there. Only the weight decoding differs:

    M = 1         _w8_gemv_kernel  CUDA cores, split-K, weight-bandwidth bound
    2 <= M < 256  _w8_dot_kernel   tensor cores, q tile in x.dtype as the left MMA operand,
                                   x^T as the right one, split-K
    M >= 256      _w8_cast_kernel  into a scratch [N, K] in x.dtype (q, exact; q * s for
                                   "block"), then _w8_dot_kernel as a plain GEMM with the
                                   per-channel / per-tensor scale in its epilogue

INT8 to float: ``float(q) = bits(0x4B000080 ^ byte(q)) - (2**23 + 128)``, an integer XOR
and an fp32 subtraction, exact: the XOR forms the fp32 2**23 + (q + 128). This avoids the
int-to-float conversion instruction, which Hopper issues at 16 per clock per SM (CUDA C++
programming guide, arithmetic instruction throughput table), where streaming a 1-byte
weight at 3.5 TB/s takes ~13 elements per clock per SM (132 SMs at 1.98 GHz).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from mxpass.kernels.triton.mxfp8_linear import (
    _IDLE_K,
    GEMV_MAX_M,
    LARGE_M,
    REDUCE_BLOCK,
    SMALL_MAX_M,
    DequantGemm,
    Plan,
    Regime,
    SplitK,
    _in_range,
    _load_stream,
    _num_sms,
    _partial_rows,
    _split_for,
    _split_range,
    _splitk_reduce_kernel,
    _splits,
    _store_tile,
    large_regimes,
)

__all__ = ["GRANULARITIES", "default_plan", "w8_linear_triton", "w8_linear_with_plan"]

SCALE_BLOCK = 128  # compressed-tensors FP8_BLOCK: 128 x 128 weight blocks (mxpass/schemes/fp8.py)
GRANULARITIES = ("channel", "tensor", "block")
# Scale modes of the kernels (constexpr SCALE): how s(n, k) is read and when it is applied.
_NONE, _TENSOR, _CHANNEL, _BLOCK = 0, 1, 2, 3
_MODE = {"tensor": _TENSOR, "channel": _CHANNEL, "block": _BLOCK}
GEMV_VEC = 16  # weight bytes per thread and row in the gemv: one 16-byte load
_INT8_MAGIC = tl.constexpr(0x4B000080)  # fp32 bits of 2**23 + 128
_INT8_BIAS = tl.constexpr(8388736.0)  # 2**23 + 128


# --------------------------------------------------------------------------- kernels


# f16x2 -> bf16x2 for the f16 values of e4m3 bytes (``q.to(tl.float16)``: one hardware
# e4m3x2 -> f16x2 conversion per two elements): move the exponent/mantissa fields (sign
# kept, >> 3: the f16 value times 2**-112, a normal bf16 for every e4m3 value) and multiply
# by 2**112 (bf16 0x7780; an fma with -0, which keeps +0 and -0). Exact for every finite
# byte; the NaN bytes 0x7F / 0xFF decode to a finite +/-2**17 or so instead of NaN (mxpass
# never stores them: quantize_weight rejects non-finite weights). ``q.to(tl.bfloat16)``
# instead converts each f16 to bf16 on its own (sm_90 SASS from triton 3.9: F2F per
# element after the F2FP pair), and conversions issue at 16 per clock per SM. Measured in
# the dot kernel, M = 16, fp8 per-channel, H200: 24.9 / 45.3 / 30.1 us with this, 28.6 /
# 54.5 / 33.0 us without, for (K, N) = (4096, 12288), (4096, 28672), (14336, 4096).
_F16_TO_BF16_ASM = tl.constexpr(  # one line: Inductor copies this global into its generated source
    "{ .reg .b32 h, s, c, z; "
    "and.b32 s, $1, 0x80008000; shr.b32 h, $1, 3; and.b32 h, h, 0x0FFF0FFF; or.b32 h, h, s; "
    "mov.b32 c, 0x77807780; mov.b32 z, 0x80008000; fma.rn.bf16x2 $0, h, c, z; }"
)


@triton.jit
def _w8_to_float(q, dtype: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr = False):
    """float(q) in dtype (fp32, bf16 or fp16), exact, for e4m3 or int8 q; ASM: e4m3 -> bf16 by PTX (CUDA only)."""
    if ASM and not IS_INT8 and dtype == tl.bfloat16:
        h = q.to(tl.float16)
        return tl.inline_asm_elementwise(_F16_TO_BF16_ASM, "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    if IS_INT8:
        u = q.to(tl.uint8, bitcast=True).to(tl.uint32)
        f = (u ^ _INT8_MAGIC).to(tl.float32, bitcast=True) - _INT8_BIAS
        return f.to(dtype)
    return q.to(dtype)


@triton.jit
def _w8_out_scale(acc, s_ptr, offs_n, N, SCALE: tl.constexpr):
    """acc [BLOCK_N, ...] times the per-channel / per-tensor scale of rows offs_n [BLOCK_N, 1]."""
    if SCALE == 1:  # _TENSOR
        acc = acc * tl.load(s_ptr)
    elif SCALE == 2:  # _CHANNEL
        acc = acc * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    return acc


@triton.jit
def _w8_gemv_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, p_ptr,
    # sizes (x [M, K], q [N, K], s by SCALE (module docstring), b [N], y [M, N], contiguous)
    M, N, K, KB,
    # meta
    HAS_BIAS: tl.constexpr, MAY_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVICT_FIRST: tl.constexpr,
    IS_INT8: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
):
    """Partial y[m, n] over one K split on CUDA cores, one row m of x per program: grid (M, cdiv(N, BLOCK_N), S).

    The weight tile is read as [BLOCK_N, G, R, VEC] (G * R * VEC = BLOCK_K; VEC bytes, one
    16-byte load, per thread and row): products are summed over VEC inside each thread and
    accumulated elementwise over [BLOCK_N, G, R], so the loop has no cross-thread
    reduction; "block" multiplies each 128-wide group (GROUP_K = 128 = R * VEC) by its
    scale, "channel"/"tensor" (G = 1) scale the final sum. x is loaded through pointers
    broadcast to the weight tile's shape, as in ``_mxfp8_gemv_kernel`` (one register layout).
    STAGES > 1 pipelines the loads through shared memory (``tl.range``; triton does so for
    loads that feed no tl.dot only when the loop asks): 3x slower here (58.5 vs 18.5 us at
    STAGES 3, M = 1, 4096 x 12288, H200), so the default plan keeps 1.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // GROUP_K
    R: tl.constexpr = GROUP_K // VEC

    rn = tl.arange(0, BLOCK_N)
    rg = tl.arange(0, G)
    offs_n = pid_n * BLOCK_N + rn
    n_mask = offs_n < N
    q_base = q_ptr + (pid_n * BLOCK_N).to(tl.int64) * K
    x_base = x_ptr + pid_m.to(tl.int64) * K
    k4 = (rg[:, None, None] * GROUP_K + tl.arange(0, R)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :])[None]
    q_offs = rn[:, None, None, None] * K + k4  # [BLOCK_N, G, R, VEC]
    x_offs = rn[:, None, None, None] * 0 + k4  # same shape as q_offs
    s_offs = (offs_n // 128)[:, None] * KB + rg[None, :]  # [BLOCK_N, G]: "block" scales

    g_lo, g_hi = _split_range(tl.cdiv(K, 32), BLOCK_K)
    k_lo = g_lo * 32
    k_hi = tl.minimum(g_hi * 32, K)
    acc = tl.zeros((BLOCK_N, G, R), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            q = _load_stream(q_base + k0 + q_offs, n_mask[:, None, None, None], EVICT_FIRST)
            xv = tl.load(x_base + k0 + x_offs)
        else:
            k_mask = (k0 + k4) < k_hi
            q = _load_stream(q_base + k0 + q_offs, n_mask[:, None, None, None] & k_mask, EVICT_FIRST)
            xv = tl.load(x_base + k0 + x_offs, mask=k_mask, other=0.0)
        xf = xv.to(tl.float32)
        if SCALE == 3:  # _BLOCK: BLOCK_K steps start on 128-multiples, so group g is scale column k0 // 128 + g
            # Scales x rather than the group sums, so the scale load is issued with the weight
            # load (SASS): scaling the sums, ptxas issued it after the products. Not faster on
            # H200: 29.5 / 50.1 / 28.0 us vs 25.7 / 51.0 / 28.8 (M = 1, the three benchmark
            # shapes, two runs); "channel" takes 18.5 / 35.6 / 21.0 us. Cause not established.
            s = tl.load(s_ptr + k0 // 128 + s_offs, mask=n_mask[:, None] & (k0 + rg * 128 < k_hi)[None, :], other=0.0)
            xf = xf * s[:, :, None, None]
        part = tl.sum(_w8_to_float(q, tl.float32, IS_INT8) * xf, axis=3)  # [BLOCK_N, G, R]
        acc += part
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    out = _w8_out_scale(out, s_ptr, offs_n, N, SCALE)
    offs_m = pid_m + tl.zeros((1, 1), tl.int32)
    _store_tile(out[:, None], offs_n[:, None], offs_m, M, N, b_ptr, y_ptr, p_ptr, HAS_BIAS, MAY_SPLIT)


@triton.jit
def _w8_dot_kernel(
    # pointers
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, p_ptr,
    # sizes (x [M, K], q [N, K], s by SCALE, b [N], y [M, N], contiguous)
    M, N, K, KB,
    # meta
    HAS_BIAS: tl.constexpr, MAY_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, IS_INT8: tl.constexpr,
    W_DENSE: tl.constexpr, SCALE: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial y^T tile [BLOCK_N, BLOCK_M] over one K split: grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), S).

    acc += float(q tile [BLOCK_N, BLOCK_K]) @ x^T tile [BLOCK_K, BLOCK_M] in x.dtype (exact
    weight values); "block" scales each step's product (BLOCK_K divides 128, so a step lies
    in one scale column), "channel"/"tensor" scale the sum once. W_DENSE: q_ptr holds
    x.dtype values already (the scratch of the large-M path): a plain GEMM.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + rn
    n_mask = offs_n < N
    m_mask = (pid_m * BLOCK_M + rm) < M
    q_base = q_ptr + (pid_n * BLOCK_N).to(tl.int64) * K
    x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * K
    q_offs = rn[:, None] * K + rk[None, :]  # [BLOCK_N, BLOCK_K]
    x_offs = rm[None, :] * K + rk[:, None]  # [BLOCK_K, BLOCK_M]: x^T
    s_rows = s_ptr + (offs_n // 128) * KB  # "block" scale rows

    g_lo, g_hi = _split_range(tl.cdiv(K, 32), BLOCK_K)
    k_lo = g_lo * 32
    k_hi = tl.minimum(g_hi * 32, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            q = tl.load(q_base + k0 + q_offs, mask=n_mask[:, None], other=0.0)
            xt = tl.load(x_base + k0 + x_offs, mask=m_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + rk) < k_hi
            q = tl.load(q_base + k0 + q_offs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_base + k0 + x_offs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if W_DENSE:
            w = q
        else:
            w = _w8_to_float(q, x_ptr.dtype.element_ty, IS_INT8, ASM)
        if SCALE == 3:  # _BLOCK
            s = tl.load(s_rows + k0 // 128, mask=n_mask, other=0.0)
            acc += tl.dot(w, xt) * s[:, None]
        else:
            acc = tl.dot(w, xt, acc)
    acc = _w8_out_scale(acc, s_ptr, offs_n[:, None], N, SCALE)
    offs_m = pid_m * BLOCK_M + rm
    _store_tile(acc, offs_n[:, None], offs_m[None, :], M, N, b_ptr, y_ptr, p_ptr, HAS_BIAS, MAY_SPLIT)


@triton.jit
def _w8_cast_kernel(
    # pointers
    q_ptr, s_ptr, w_ptr,
    # sizes (q [N, K], w [N, >= K] out with row stride K, s "block" scales [., KB])
    N, K, KB,
    # meta
    IS_INT8: tl.constexpr, SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w = float(q) in w's dtype (exact), times s(n, k) for "block" (SCALE 3; rounded once): grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None] * K
    q = tl.load(q_ptr + rows + offs_k[None, :], mask=mask, other=0.0)
    if SCALE == 3:  # _BLOCK
        s = tl.load(s_ptr + (offs_n // 128)[:, None] * KB + (offs_k // 128)[None, :], mask=mask, other=0.0)
        w = _w8_to_float(q, tl.float32, IS_INT8) * s
    else:
        w = _w8_to_float(q, w_ptr.dtype.element_ty, IS_INT8)
    tl.store(w_ptr + rows + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- plans


def default_plan(K: int, N: int, num_sms: int = 132) -> Plan:
    """The plan the op runs for a [N, K] weight: the MXFP8 op's regimes (``GEMV_MAX_M``,
    ``SMALL_MAX_M``, ``LARGE_M``) with tiles timed for this op.

    Fastest of a sweep on H200 (torch 2.11, triton 3.6; notes/w8-kernel-notes.md) for (K, N)
    in (4096, 12288), (4096, 28672), (14336, 4096), fp8 and int8 per-channel: M = 1 gemv
    4 x 512, 4 warps, ~8 programs per SM (4 x 1024 within 1%; 8 or 16 rows 10-60% slower);
    M = 16 dot 128 x 16 x 128, S0 for 2 waves (4 waves: 2% faster on two shapes, 9% slower
    at K = 14336); M = 128 dot 64 x 128 x 128, S0 for 1 wave (64 x 64: 9-25% slower);
    M >= 256 cast + GEMM 128 x 256 x 64, 8 warps. Default plan, fp8 per-channel, same
    shapes: 18.5 / 35.6 / 21.0 us (M = 1), 25.2 / 45.1 / 27.1 (16), 38.5 / 76.7 / 46.6
    (128), 653 / 1604 / 732 (4096). A narrow N adds the split 128 x 128 regime of
    ``mxfp8_linear.large_regimes`` where the 256-row GEMM's grid would be under half a wave.
    Every configuration is valid for every granularity: "block" needs the gemv's BLOCK_K to
    be a multiple of 128 and the dot kernel's to divide 128.
    """
    gemv = SplitK("gemv", block_n=4, block_m=1, block_k=512, split=0, num_warps=4, num_stages=1, evict_first=True)
    small = SplitK("dot", block_n=128, block_m=16, block_k=128, split=0, num_warps=4, num_stages=3)
    medium = SplitK("dot", block_n=64, block_m=128, block_k=128, split=0, num_warps=4, num_stages=3)
    gemv = gemv._replace(split=_split_for(K, N, gemv.block_n, gemv.block_k, num_sms, waves=8))
    small = small._replace(split=_split_for(K, N, small.block_n, small.block_k, num_sms, waves=2))
    medium = medium._replace(split=_split_for(K, N, medium.block_n, medium.block_k, num_sms, waves=1))
    large = DequantGemm(SplitK("dot", block_n=128, block_m=256, block_k=64, split=1, num_warps=8, num_stages=3),
                        dequant_block_n=16, dequant_block_k=512)
    return Plan(
        (
            Regime(0, GEMV_MAX_M + 1, gemv),
            Regime(GEMV_MAX_M + 1, SMALL_MAX_M + 1, small),
            Regime(SMALL_MAX_M + 1, LARGE_M, medium),
            *large_regimes(K, N, num_sms, large),
        )
    )


# --------------------------------------------------------------------------- launch


def _check_inputs(x, qweight, wscale, bias, granularity: str) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"w8_linear: x has dtype {x.dtype}; expected bfloat16 or float16")
    if x.dim() != 2:
        raise ValueError(f"w8_linear: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if qweight.dtype not in (torch.float8_e4m3fn, torch.int8) or qweight.dim() != 2:
        raise TypeError(f"w8_linear: qweight must be 2-D float8_e4m3fn or int8, got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    if x.shape[1] != K:
        raise ValueError(f"w8_linear: x {tuple(x.shape)} and qweight {tuple(qweight.shape)} disagree on K")
    if wscale.dtype != torch.float32:
        raise TypeError(f"w8_linear: wscale has dtype {wscale.dtype}; expected float32")
    expected = {"channel": (N, 1), "tensor": None, "block": (triton.cdiv(N, SCALE_BLOCK), triton.cdiv(K, SCALE_BLOCK))}
    if granularity not in expected:
        raise ValueError(f"w8_linear: granularity {granularity!r}; expected one of {GRANULARITIES}")
    shape = expected[granularity]
    if (wscale.numel() != 1) if shape is None else (tuple(wscale.shape) != shape):
        want = "one element" if shape is None else str(shape)
        raise ValueError(f"w8_linear: {granularity} wscale has shape {tuple(wscale.shape)}; expected {want}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"w8_linear: bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def _check_plan(plan: Plan, granularity: str) -> None:
    """"block" steps must not straddle a 128-wide scale column (see the kernels)."""
    if granularity != "block":
        return
    for r in plan.regimes:
        cfg = r.impl.gemm if isinstance(r.impl, DequantGemm) else r.impl
        if isinstance(r.impl, DequantGemm):
            continue  # the GEMM reads q * s from the scratch
        ok = cfg.block_k % SCALE_BLOCK == 0 if cfg.kernel == "gemv" else SCALE_BLOCK % cfg.block_k == 0
        if not ok:
            raise ValueError(f"w8_linear: {cfg} cannot apply 128-wide block scales (BLOCK_K {cfg.block_k})")


def w8_linear_with_plan(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
    plan: Plan,
    *,
    asm: bool = True,
) -> torch.Tensor:
    """The op's body for an explicit ``plan``; traceable, with no branch on M. Benchmarks call it directly.

    ``asm``: the dot kernel turns e4m3 into bf16 with inline PTX (``_F16_TO_BF16_ASM``)
    where it can (CUDA tensors; the Triton interpreter runs no PTX); False: ``q.to``.
    """
    _check_inputs(x, qweight, wscale, bias, granularity)
    _check_plan(plan, granularity)
    x = x.contiguous()
    qweight = qweight.contiguous()
    s = wscale.contiguous()
    M = x.shape[0]
    N, K = qweight.shape
    kb = triton.cdiv(K, SCALE_BLOCK)
    mode, is_int8 = _MODE[granularity], qweight.dtype == torch.int8

    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rows = max([_partial_rows(r) for r in plan.regimes], default=0)
    partial = torch.empty((max(rows * N, 1),), dtype=torch.float32, device=x.device)  # static size
    b = y if bias is None else bias
    common = dict(HAS_BIAS=bias is not None, IS_INT8=is_int8)
    asm = asm and x.device.type == "cuda"
    for r in plan.regimes:
        ind = _in_range(M, r.m_lo, r.m_hi)
        m_r = M * ind  # M inside the regime, 0 outside: every grid below is then empty
        cfg, w, w_dense, k_mode = r.impl, qweight, False, mode
        if isinstance(cfg, DequantGemm):
            k_on = K * ind
            w = torch.empty((N, torch.sym_max(k_on, _IDLE_K)), dtype=x.dtype, device=x.device)
            wrap_triton(_w8_cast_kernel)[(triton.cdiv(k_on, cfg.dequant_block_k), triton.cdiv(N, cfg.dequant_block_n))](
                qweight, s, w, N, K, kb, IS_INT8=is_int8, SCALE=mode,
                BLOCK_N=cfg.dequant_block_n, BLOCK_K=cfg.dequant_block_k, num_warps=cfg.dequant_warps,
            )
            # the scratch holds q (scaled by the epilogue) or, for "block", q * s already
            cfg, w_dense, k_mode = cfg.gemm, True, (_NONE if mode == _BLOCK else mode)
        split = _splits(m_r, cfg)
        grid = (triton.cdiv(m_r, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
        even_k = K % cfg.block_k == 0
        if cfg.kernel == "gemv":
            wrap_triton(_w8_gemv_kernel)[grid](
                x, w, s, b, y, partial, m_r, N, K, kb,
                MAY_SPLIT=cfg.split > 1, EVEN_K=even_k, EVICT_FIRST=cfg.evict_first, SCALE=k_mode,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_K=SCALE_BLOCK if k_mode == _BLOCK else cfg.block_k,
                VEC=min(GEMV_VEC, cfg.block_k), STAGES=cfg.num_stages,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
            )
        else:
            wrap_triton(_w8_dot_kernel)[grid](
                x, w, s, b, y, partial, m_r, N, K, kb,
                MAY_SPLIT=cfg.split > 1, EVEN_K=even_k, W_DENSE=w_dense, SCALE=k_mode, ASM=asm,
                BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
            )
        if cfg.split > 1:  # where S(M) == 1 the kernel above wrote y itself and this grid is empty
            wrap_triton(_splitk_reduce_kernel)[(triton.cdiv(m_r * N, REDUCE_BLOCK) * (1 - 1 // split),)](
                partial, b, y, m_r, N, split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
            )
    return y


@triton_op("mxpass::w8_linear_triton", mutates_args=())
def w8_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    granularity: str,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (float(qweight [N, K]) * s).T + bias in x.dtype; s per ``granularity``.

    Under torch.compile Inductor traces into this body and launches the Triton kernels
    from its generated code; M may be symbolic (one graph serves every M >= 2).
    """
    num_sms = 132
    if x.device.type == "cuda":
        num_sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    N, K = qweight.shape
    return w8_linear_with_plan(x, qweight, wscale, bias, granularity, default_plan(int(K), int(N), num_sms))
