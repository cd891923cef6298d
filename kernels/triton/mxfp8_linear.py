"""MXFP8 linear on Hopper (sm_90): Triton kernels behind one ``torch.library.triton_op``.

    y [M, N] = x [M, K] @ W.T + bias,   W[n, k] = fp8(qweight[n, k]) * 2**(e8m0(wscale[n, k // 32]) - 127)

Shapes: M = tokens (dynamic), N = out features, K = in features (K % 32 == 0),
G = K // 32 scale blocks, S = K splits. x is bf16/fp16 [M, K], qweight [N, K]
float8_e4m3fn, wscale [N, G] float8_e8m0fnu (or its uint8 storage), bias [N] in x.dtype or None; y is x.dtype.

Hopper has no MX block-scaled MMA, so the weight is turned into x.dtype (or fp32) in
registers: fp8 * 2**(e - 127) is exact in bf16 (3 mantissa bits into 7, fp32's exponent
range); in fp16 it is exact while the dequantized weight is inside fp16's range. All
sums are fp32. Paths (a ``Plan`` of M ranges, picked per call at run time):

    M = 1         _mxfp8_gemv_kernel  CUDA cores, weight-bandwidth bound, no split-K: a grid of
                                      ~8 programs per SM, each walking several row tiles
    2 <= M <= 16  _mxfp8_dot_kernel   tensor cores, W tile as the left MMA operand and
                                      x^T (16 wide) as the right one, split-K
    17 <= M <= 64 _mxfp8_dot_kernel   same, 64-wide x tile, S shrinking with M
    65 <= M < 256 _mxfp8_dot_kernel   same, 128-wide x tile (each W tile dequantized once)
    M >= 256      _mxfp8_dequant_kernel into a scratch W [N, K] in x.dtype, then
                  _mxfp8_dot_kernel as a plain GEMM (W_DENSE): one extra pass over W

Split-K programs write fp32 partials [S, M, N]; ``_splitk_reduce_kernel`` sums them in a
fixed order (deterministic: no atomics, no zeroed buffer), adds bias and casts. With
S == 1 the kernel writes y itself and the reduce grid is empty.

Guard-free dispatch. M is symbolic when the op is compiled, so there is no Python ``if``
on M: each path gets the row count M * ind(M), with ind an integer expression
(``_in_range``) that is 1 inside its M range and 0 outside, and every grid is a product
with that count. The launcher skips a zero-sized grid (checked on H200 with Inductor's
generated code, M in 0..2048). Tensor sizes never depend on which path runs: the
partials buffer has a static size (``_partial_rows``) and the scratch weight is
[N, max(K * ind, 32)], because a size that can be 0 or 1 makes the tracer add a guard
on M (``Eq(K_c, 0)``, contiguity checks), i.e. a recompile at the threshold. For the same
reason the large-M path does not call cuBLAS: ``mm`` on a K-slice of x guarded on M
(``Ne(K_c, K)`` from the view's contiguity), and ``mm`` on all of x costs a full GEMM on
every path. Measured numbers behind each choice: notes/kernel-notes.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = [
    "DequantGemm",
    "Plan",
    "Regime",
    "SplitK",
    "default_plan",
    "mxfp8_dequantize_triton",
    "mxfp8_linear_triton",
    "mxfp8_linear_with_plan",
]

MX_BLOCK = 32  # OCP MX v1.0 §5.2: one E8M0 scale per 32 elements


# --------------------------------------------------------------------------- kernels


@triton.jit
def _e8m0_to_fp32(e):
    """2**(e - 127) as float32 from uint8 bytes, exact: float32 bits e << 23; 0 -> 2**-127, 255 -> NaN."""
    e = e.to(tl.int32)
    bits = tl.where(e == 0, 0x00400000, e << 23)  # 0x00400000: 2**-127, a float32 subnormal
    bits = tl.where(e == 255, 0x7FC00000, bits)  # quiet NaN
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_tile(q, e, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """W tile [BLOCK_N, BLOCK_K] in dtype from fp8 q [BLOCK_N, BLOCK_K] and E8M0 bytes e [BLOCK_N, BLOCK_K // 32].

    Multiplied in fp32 and rounded once. (A bf16 multiply, exact too, was ~20% slower in
    the dot kernel with triton 3.6 on H200: 34.2 vs 28.2 us, M=16, K=4096, N=12288.)
    """
    scale = _e8m0_to_fp32(e)
    w = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // 32, 32)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype)


@triton.jit
def _split_range(K_GROUPS, BLOCK_K: tl.constexpr):
    """[g_lo, g_hi) in scale groups of 32 for this program's K split (axis 2); whole BLOCK_K steps."""
    pid_s = tl.program_id(2)
    num_s = tl.num_programs(2)
    G: tl.constexpr = BLOCK_K // 32
    iters = tl.cdiv(tl.cdiv(K_GROUPS, G), num_s)
    g_lo = pid_s * iters * G
    g_hi = tl.minimum(g_lo + iters * G, K_GROUPS)
    return g_lo, g_hi


@triton.jit
def _store_tile(acc, offs_n, offs_m, M, N, b_ptr, y_ptr, p_ptr, HAS_BIAS: tl.constexpr, MAY_SPLIT: tl.constexpr):
    """Epilogue: y[m, n] = acc (+ bias) in y's dtype when S == 1, else the fp32 partial p[s, m, n].

    MAY_SPLIT False compiles only the first branch: the run-time branch costs ~80 registers
    at 128x128 tiles (190 vs 106 for sm_90, triton 3.9 ptxas).
    """
    mask = (offs_n < N) & (offs_m < M)
    if MAY_SPLIT and tl.num_programs(2) > 1:
        tl.store(p_ptr + (tl.program_id(2) * M + offs_m).to(tl.int64) * N + offs_n, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_m.to(tl.int64) * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_stream(ptrs, mask, EVICT_FIRST: tl.constexpr):
    """Masked load (0 where masked) of data read once; EVICT_FIRST asks the caches to drop it first."""
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gemv_scales(e_ptr, n0, g0, g_hi, N, K_GROUPS, BLOCK_N: tl.constexpr, C: tl.constexpr, PER_BLOCK: tl.constexpr):
    """E8M0 bytes [BLOCK_N, C] of rows n0.. and chunks from scale block g0 on (127, i.e. 1.0, where masked)."""
    rn = tl.arange(0, BLOCK_N)
    rg = tl.arange(0, C) // PER_BLOCK
    ptrs = e_ptr + n0.to(tl.int64) * K_GROUPS + (rn[:, None] * K_GROUPS + (g0 + rg)[None, :])
    return tl.load(ptrs, mask=((n0 + rn) < N)[:, None] & ((g0 + rg) < g_hi)[None, :], other=127)


@triton.jit
def _mxfp8_gemv_kernel(
    # pointers
    x_ptr, q_ptr, e_ptr, b_ptr, y_ptr, p_ptr,
    # sizes (K = 32 * K_GROUPS; x [M, K], q [N, K], e [N, K_GROUPS] uint8, b [N], y [M, N], contiguous)
    M, N, K_GROUPS, ROW_TILES,
    # meta
    HAS_BIAS: tl.constexpr, MAY_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVICT_FIRST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr,
):
    """Partial y[m, n] over one K split on CUDA cores: grid (M, cdiv(cdiv(N, BLOCK_N), ROW_TILES), S).

    Each program takes row m of x and ROW_TILES consecutive tiles of BLOCK_N weight rows,
    walking (tile, K step) as one loop. The weight tile is read as [BLOCK_N, C, CHUNK]
    (C = BLOCK_K // CHUNK, CHUNK = the elements one thread holds, so each chunk's dot is
    summed inside the thread, no shuffles) and each chunk's sum is scaled by its block's
    E8M0 byte; x is loaded as [1, C, CHUNK] and broadcast over the rows.

    ROW_TILES > 1 sizes the grid to what the GPU holds at once (no partly filled last wave)
    and removes split-K at M = 1: 20.0 / 38.2 / 22.2 us vs 21.1 / 39.6 / 22.3 us with one
    tile per program (H200, K x N = 4096 x 12288 / 4096 x 28672 / 14336 x 4096). Loads stay
    in flight across steps and tiles: ``tl.range(num_stages=STAGES)`` pipelines the weight
    and x loads through shared memory (cp.async; triton does this for loads that feed no
    tl.dot only when the loop asks, not for the kernel-level num_stages: 20.0 vs 23.9 us
    unpipelined, 4096 x 12288), and the scale bytes, too narrow for cp.async, are loaded
    one step ahead by hand (else each step waits for its scale load after its weights, two
    DRAM round trips per step, as sm_90 SASS of the unpipelined loop showed).
    """
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 32
    C: tl.constexpr = BLOCK_K // CHUNK
    PER_BLOCK: tl.constexpr = 32 // CHUNK  # chunks per scale block
    K = K_GROUPS * 32  # a product, so the compiler knows rows are 32-byte aligned

    rn = tl.arange(0, BLOCK_N)
    rc = tl.arange(0, C)
    rj = tl.arange(0, CHUNK)
    k3 = rc[None, :, None] * CHUNK + rj[None, None, :]  # [1, C, CHUNK]
    q_offs = rn[:, None, None] * K + k3  # [BLOCK_N, C, CHUNK]
    x_ptrs = x_ptr + pid_m.to(tl.int64) * K + k3

    g_lo, g_hi = _split_range(K_GROUPS, BLOCK_K)
    k_steps = tl.maximum(tl.cdiv(g_hi - g_lo, G), 1)  # >= 1: an empty split still stores its zeros
    g_end = g_lo + k_steps * G
    n0 = pid_t * ROW_TILES * BLOCK_N  # (n0, g0): this step's first row and scale block
    g0 = g_lo
    e_next = _gemv_scales(e_ptr, n0, g0, g_hi, N, K_GROUPS, BLOCK_N, C, PER_BLOCK)
    acc = tl.zeros((BLOCK_N, C), dtype=tl.float32)
    for _ in tl.range(0, ROW_TILES * k_steps, num_stages=STAGES):
        last = g0 + G >= g_end  # this tile's K range ends with this step
        n1 = tl.where(last, n0 + BLOCK_N, n0)
        g1 = tl.where(last, g_lo, g0 + G)
        e = e_next
        e_next = _gemv_scales(e_ptr, n1, g1, g_hi, N, K_GROUPS, BLOCK_N, C, PER_BLOCK)
        n_mask = (n0 + rn) < N
        q_ptrs = q_ptr + n0.to(tl.int64) * K + g0 * 32 + q_offs
        if EVEN_K:
            step_ok = ((g0 + 0 * rc) < g_hi)[None, :, None]  # false only in an empty split
            q = _load_stream(q_ptrs, n_mask[:, None, None] & step_ok, EVICT_FIRST)
            xv = tl.load(x_ptrs + g0 * 32, mask=step_ok, other=0.0)
        else:
            c_mask = ((g0 + rc // PER_BLOCK) < g_hi)[None, :, None]  # K % 32 == 0: a whole block is in or out
            q = _load_stream(q_ptrs, n_mask[:, None, None] & c_mask, EVICT_FIRST)
            xv = tl.load(x_ptrs + g0 * 32, mask=c_mask, other=0.0)
        part = tl.sum(q.to(tl.float32) * xv.to(tl.float32), axis=2)  # [BLOCK_N, C]
        acc += part * _e8m0_to_fp32(e)
        if last:
            out = tl.sum(acc, axis=1)
            offs_m = pid_m + tl.zeros((1, 1), tl.int32)
            _store_tile(out[:, None], (n0 + rn)[:, None], offs_m, M, N, b_ptr, y_ptr, p_ptr, HAS_BIAS, MAY_SPLIT)
            acc = tl.zeros((BLOCK_N, C), dtype=tl.float32)
        n0 = n1
        g0 = g1


@triton.jit
def _mxfp8_dot_kernel(
    # pointers
    x_ptr, q_ptr, e_ptr, b_ptr, y_ptr, p_ptr,
    # sizes (K = 32 * K_GROUPS; x [M, K], q [N, K], e [N, K_GROUPS] uint8, b [N], y [M, N], contiguous)
    M, N, K_GROUPS,
    # meta
    HAS_BIAS: tl.constexpr, MAY_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, W_DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial y^T tile [BLOCK_N, BLOCK_M] over one K split: grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), S).

    acc += dequant(W tile [BLOCK_N, BLOCK_K]) @ x^T tile [BLOCK_K, BLOCK_M]; the M tiles of
    one weight tile are neighbours in launch order, so the weight comes from DRAM once.
    W_DENSE: q_ptr already holds W [N, K] in x.dtype (e_ptr unused): a plain GEMM.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 32
    K = K_GROUPS * 32

    # 64-bit row bases once per program, 32-bit offsets inside the tile (fewer registers).
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, G)
    n_mask = (pid_n * BLOCK_N + rn) < N
    m_mask = (pid_m * BLOCK_M + rm) < M
    q_base = q_ptr + (pid_n * BLOCK_N).to(tl.int64) * K
    e_base = e_ptr + (pid_n * BLOCK_N).to(tl.int64) * K_GROUPS
    x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * K
    q_offs = rn[:, None] * K + rk[None, :]  # [BLOCK_N, BLOCK_K]
    e_offs = rn[:, None] * K_GROUPS + rg[None, :]  # [BLOCK_N, G]
    x_offs = rm[None, :] * K + rk[:, None]  # [BLOCK_K, BLOCK_M]: x^T

    g_lo, g_hi = _split_range(K_GROUPS, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(g_lo, g_hi, G):
        k0 = g0 * 32
        if EVEN_K:
            q = tl.load(q_base + k0 + q_offs, mask=n_mask[:, None], other=0.0)
            xt = tl.load(x_base + k0 + x_offs, mask=m_mask[None, :], other=0.0)
        else:
            k_mask = (g0 + rk // 32) < g_hi  # constant over each scale block
            q = tl.load(q_base + k0 + q_offs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_base + k0 + x_offs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if W_DENSE:
            w = q
        else:
            g_mask = (g0 + rg) < g_hi
            e = tl.load(e_base + g0 + e_offs, mask=n_mask[:, None] & g_mask[None, :], other=127)
            w = _dequant_tile(q, e, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty)
        acc = tl.dot(w, xt, acc)
    offs_n = pid_n * BLOCK_N + rn
    offs_m = pid_m * BLOCK_M + rm
    _store_tile(acc, offs_n[:, None], offs_m[None, :], M, N, b_ptr, y_ptr, p_ptr, HAS_BIAS, MAY_SPLIT)


@triton.jit
def _splitk_reduce_kernel(
    # pointers
    p_ptr, b_ptr, y_ptr,
    # sizes (p [S, M, N] fp32, b [N], y [M, N], contiguous)
    M, N, S,
    # meta
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = sum_s p[s] (+ bias), cast to y's dtype: grid (cdiv(M * N, BLOCK),). Fixed order, so deterministic."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    numel = M * N
    mask = offs < numel
    p_ptrs = p_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(S):
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += numel
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mxfp8_dequant_kernel(
    # pointers
    q_ptr, e_ptr, w_ptr,
    # sizes (q [N, K] fp8, e [N, K_GROUPS] uint8, w [N, K] out, contiguous; K = 32 * K_GROUPS)
    N, K_GROUPS,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w = dequant(q, e) in w's dtype: grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 32
    K = K_GROUPS * 32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_g = pid_k * G + tl.arange(0, G)
    k_mask = (offs_k // 32) < K_GROUPS
    mask = (offs_n < N)[:, None] & k_mask[None, :]
    rows = offs_n.to(tl.int64)[:, None] * K
    q = tl.load(q_ptr + rows + offs_k[None, :], mask=mask, other=0.0)
    e = tl.load(
        e_ptr + offs_n.to(tl.int64)[:, None] * K_GROUPS + offs_g[None, :],
        mask=(offs_n < N)[:, None] & (offs_g < K_GROUPS)[None, :],
        other=127,
    )
    w = _dequant_tile(q, e, BLOCK_N, BLOCK_K, w_ptr.dtype.element_ty)
    tl.store(w_ptr + rows + offs_k[None, :], w, mask=mask)


# --------------------------------------------------------------------------- plans


class SplitK(NamedTuple):
    """In-kernel dequantization: ``kernel`` "gemv" (CUDA cores, block_m = 1) or "dot" (tensor cores)."""

    kernel: str
    block_n: int
    block_m: int
    block_k: int
    split: int  # S0: K splits while all M rows fit one M tile; S(M) = 1 + (S0 - 1) // m_tiles
    num_warps: int = 4
    num_stages: int = 3  # gemv: stages of its K loop (tl.range); dot: the kernel's
    evict_first: bool = False  # gemv: weight loads marked evict-first (read once)
    row_tiles: int = 1  # gemv: tiles of block_n rows per program (see _gemv_row_tiles)


class DequantGemm(NamedTuple):
    """Dequantize the weight into a scratch [N, K] in x.dtype, then the dot kernel on it as a plain GEMM."""

    gemm: SplitK  # kernel "dot", split 1
    dequant_block_n: int = 16
    dequant_block_k: int = 512
    dequant_warps: int = 4


class Regime(NamedTuple):
    """Rows M in [m_lo, m_hi) take ``impl``; m_hi None means no upper end."""

    m_lo: int
    m_hi: int | None
    impl: SplitK | DequantGemm


class Plan(NamedTuple):
    """Consecutive regimes covering M >= 0."""

    regimes: tuple[Regime, ...]


REDUCE_BLOCK = 1024
# Columns of the scratch weight while M is outside the DequantGemm regime (never written
# nor read then). Not 0: a tensor size that can be 0 (or 1) makes the tracer guard on it,
# and such a guard would recompile the graph when M crosses the regime's threshold.
_IDLE_K = MX_BLOCK

# M thresholds of the default plan (H200, torch 2.11, triton 3.6; notes/kernel-notes.md).
GEMV_MAX_M = 1  # M <= 1: gemv kernel (CUDA cores)
SMALL_MAX_M = 16  # 2 <= M <= 16: dot kernel, 16-wide x tile
MEDIUM_MAX_M = 64  # 17 <= M <= 64: dot kernel, 64-wide x tile
LARGE_M = 256  # 65 <= M < 256: dot kernel, 128-wide x tile; M >= 256: dequantize + GEMM
NARROW_SPLIT = 3  # K splits (S0) of the narrow-N regime after LARGE_M (large_regimes)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_for(K: int, N: int, block_n: int, block_k: int, num_sms: int, waves: int = 4) -> int:
    """S0 so that cdiv(N, block_n) * S0 programs make ``waves`` programs per SM, at most one per BLOCK_K step."""
    n_tiles = triton.cdiv(N, block_n)
    k_steps = triton.cdiv(K, block_k)
    return max(1, min(k_steps, (waves * num_sms + n_tiles - 1) // n_tiles))


def large_regimes(K: int, N: int, num_sms: int, large: DequantGemm) -> tuple[Regime, ...]:
    """The regimes from LARGE_M on: ``large`` (weight tiles of 128 rows x 256 rows of x), and
    before it, where N is narrow, 128 x 128 tiles split along K (S0 = NARROW_SPLIT) for the M
    at which ``large``'s grid would hold at most half a program per SM: M <= 256 * t for t =
    num_sms // (2 * weight tiles). On 14336 x 4096 (32 weight tiles) ``large`` ran 32 / 64
    programs at M = 256 / 512.

    H200 (``triton_mxfp8``; ``triton_w8`` the same within 3%), CUDA-graph replays, us,
    ``large`` alone -> with this regime (S0 = 3), bf16 cuBLAS in brackets:
    14336 x 4096 M = 256 186.0 -> 103.9 (52.4), 384 186.0 -> 131.8, 512 189.1 -> 138.8 (89.0),
    but 768 200.0 -> 218.7 (a grid of 96 programs; t = 2 stops the regime at 512);
    13824 x 5120 M = 256 192.8 -> 153.2 (S0 = 5: 133.2), 512 192.8 -> 219.4;
    28672 x 8192 M = 256 465.0 -> 379.4, 512 502.8 -> 551.3 (t = 1 there: M = 256 only).
    N = 12288 / 28672: no gain from 128-row tiles or splits (docs/performance.md)."""
    g = large.gemm
    t = num_sms // (2 * triton.cdiv(N, g.block_n))
    if t < 1:
        return (Regime(LARGE_M, None, large),)
    hi = t * LARGE_M + 1
    narrow = large._replace(gemm=g._replace(block_m=128, num_stages=4, split=min(NARROW_SPLIT, triton.cdiv(K, g.block_k))))
    return (Regime(LARGE_M, hi, narrow), Regime(hi, None, large))


def default_plan(K: int, N: int, num_sms: int = 132) -> Plan:
    """The plan the op runs for a [N, K] weight (a pure function of the static shapes).

    Fastest configurations of ``python -m mxpass.benchmarks.linear --sweep`` on H200
    (torch 2.11, triton 3.6) for (K, N) in (4096, 12288), (4096, 28672), (14336, 4096);
    per-configuration times in notes/kernel-notes.md. M = 1: gemv 4x1024 tiles, 4 warps,
    3-stage K loop, row tiles for <= 8 programs per SM, no split (20.0 / 38.2 / 22.2 us vs
    20.7 / 39.8 / 23.0 us for the previous 4x512 split-K gemv in the same run); M = 16: dot
    128x16x128 (28.2 / 58.2 / 33.5 us); M = 17..64: dot 64x64x128 (35.1 / 94.3 / 44.2 us
    at M = 64); M = 65..255: dot 64x128x128, one M tile (51.0 / 97.4 / 62.0 us at M = 96
    vs 52.9 / 137.3 / 64.7 with 64-wide tiles); M >= 256: dequantize + GEMM 128x256x64,
    8 warps (84.5 us at M = 256, 4096x12288, vs 94.8 us in-kernel; 630 vs 1087 us at M = 4096).
    """
    gemv = SplitK("gemv", block_n=4, block_m=1, block_k=1024, split=1, num_warps=4, num_stages=3, evict_first=True)
    small = SplitK("dot", block_n=128, block_m=16, block_k=128, split=0, num_warps=4, num_stages=3)
    medium = SplitK("dot", block_n=64, block_m=64, block_k=128, split=0, num_warps=4, num_stages=3)
    wide = SplitK("dot", block_n=64, block_m=128, block_k=128, split=0, num_warps=4, num_stages=3)
    gemv = gemv._replace(row_tiles=_gemv_row_tiles(N, gemv.block_n, num_sms, programs_per_sm=8))
    small = small._replace(split=_split_for(K, N, small.block_n, small.block_k, num_sms, waves=4))
    medium = medium._replace(split=_split_for(K, N, medium.block_n, medium.block_k, num_sms, waves=2))
    wide = wide._replace(split=_split_for(K, N, wide.block_n, wide.block_k, num_sms, waves=1))
    large = DequantGemm(SplitK("dot", block_n=128, block_m=256, block_k=64, split=1, num_warps=8, num_stages=3))
    return Plan(
        (
            Regime(0, GEMV_MAX_M + 1, gemv),
            Regime(GEMV_MAX_M + 1, SMALL_MAX_M + 1, small),
            Regime(SMALL_MAX_M + 1, MEDIUM_MAX_M + 1, medium),
            Regime(MEDIUM_MAX_M + 1, LARGE_M, wide),
            *large_regimes(K, N, num_sms, large),
        )
    )


# --------------------------------------------------------------------------- launch


def _at_least(M, t: int):
    """1 if M >= t else 0, for M >= 0, as integer arithmetic (no branch, so no guard on a symbolic M)."""
    if t <= 0:
        return 1
    return 1 - 1 // ((M + t) // t)


def _in_range(M, lo: int, hi: int | None):
    return _at_least(M, lo) - (0 if hi is None else _at_least(M, hi))


def _splits(m_r, cfg: SplitK):
    """S(M) = 1 + (S0 - 1) // m_tiles for the regime's row count m_r (m_r = 0 counts as one tile)."""
    m_tiles = triton.cdiv(m_r, cfg.block_m)
    return 1 + (cfg.split - 1) // (m_tiles + 1 // (m_r + 1))


def _partial_rows(r: Regime) -> int:
    """Most rows S(M) * M of fp32 partials the regime writes over its M range (a static bound)."""
    cfg = r.impl.gemm if isinstance(r.impl, DequantGemm) else r.impl
    if cfg.split <= 1:
        return 0
    # S(M) >= 2 only while m_tiles <= S0 - 1, i.e. M <= (S0 - 1) * block_m.
    hi = (cfg.split - 1) * cfg.block_m + 1
    hi = hi if r.m_hi is None else min(hi, r.m_hi)
    return max((_splits(m, cfg) * m for m in range(max(r.m_lo, 1), hi) if _splits(m, cfg) > 1), default=0)


def _gemv_row_tiles(N: int, block_n: int, num_sms: int, programs_per_sm: int) -> int:
    """Row tiles per gemv program so that its grid (one row of x, no split) is at most num_sms * programs_per_sm."""
    return max(1, triton.cdiv(triton.cdiv(N, block_n), num_sms * programs_per_sm))


def _gemv_chunk(cfg: SplitK) -> int:
    """Elements of a weight row one gemv thread holds (<= 16: one 16-byte load; divides 32 and BLOCK_K)."""
    per_thread = cfg.block_n * cfg.block_k // (32 * cfg.num_warps)
    return max(1, min(16, per_thread, cfg.block_k))


def _check_inputs(x, qweight, wscale, bias) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"mxfp8_linear: x has dtype {x.dtype}; expected bfloat16 or float16")
    if x.dim() != 2:
        raise ValueError(f"mxfp8_linear: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if qweight.dtype != torch.float8_e4m3fn or qweight.dim() != 2:
        raise TypeError(f"mxfp8_linear: qweight must be 2-D float8_e4m3fn, got {qweight.dtype} {tuple(qweight.shape)}")
    if wscale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise TypeError(f"mxfp8_linear: wscale has dtype {wscale.dtype}; expected float8_e8m0fnu (or its uint8 storage)")
    N, K = qweight.shape
    if K % MX_BLOCK != 0:
        raise ValueError(f"mxfp8_linear: K = {K} (qweight {tuple(qweight.shape)}) is not a multiple of {MX_BLOCK}")
    if x.shape[1] != K:
        raise ValueError(f"mxfp8_linear: x {tuple(x.shape)} and qweight {tuple(qweight.shape)} disagree on K")
    if tuple(wscale.shape) != (N, K // MX_BLOCK):
        raise ValueError(f"mxfp8_linear: wscale has shape {tuple(wscale.shape)}; expected ({N}, {K // MX_BLOCK})")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"mxfp8_linear: bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def _launch_dequant(qweight, e, w, k_groups: int, cols, cfg: DequantGemm) -> None:
    """w[:, :cols] = dequant(qweight, e)[:, :cols]; cols = 0 launches nothing."""
    N = qweight.shape[0]
    grid = (triton.cdiv(cols, cfg.dequant_block_k), triton.cdiv(N, cfg.dequant_block_n))
    wrap_triton(_mxfp8_dequant_kernel)[grid](
        qweight, e, w, N, k_groups,
        BLOCK_N=cfg.dequant_block_n, BLOCK_K=cfg.dequant_block_k, num_warps=cfg.dequant_warps,
    )


def mxfp8_dequantize_triton(qweight: torch.Tensor, wscale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype`` (bf16/fp16) from MXFP8 qweight/wscale, by ``_mxfp8_dequant_kernel``."""
    N, K = qweight.shape
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)
    cfg = DequantGemm(SplitK("dot", 0, 0, 0, 1))
    _launch_dequant(qweight.contiguous(), wscale.contiguous().view(torch.uint8), w, K // MX_BLOCK, K, cfg)
    return w


def mxfp8_linear_with_plan(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    plan: Plan,
) -> torch.Tensor:
    """The op's body for an explicit ``plan``; traceable, with no branch on M. Benchmarks call it directly."""
    _check_inputs(x, qweight, wscale, bias)
    x = x.contiguous()
    qweight = qweight.contiguous()
    # uint8 storage passes straight through; an e8m0 input is viewed (a copy under
    # Inductor, which materialises dtype views of graph inputs: ~6 us per call measured)
    e = wscale.contiguous()
    e = e if e.dtype == torch.uint8 else e.view(torch.uint8)
    M = x.shape[0]
    N, K = qweight.shape
    k_groups = K // MX_BLOCK

    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rows = max([_partial_rows(r) for r in plan.regimes], default=0)
    partial = torch.empty((max(rows * N, 1),), dtype=torch.float32, device=x.device)  # static size
    b = y if bias is None else bias
    for r in plan.regimes:
        m_r = M * _in_range(M, r.m_lo, r.m_hi)  # M inside the regime, 0 outside: every grid below empty
        cfg, w, w_dense = r.impl, qweight, False
        if isinstance(cfg, DequantGemm):
            if cfg.gemm.kernel != "dot":
                raise ValueError(f"mxfp8_linear: DequantGemm needs the dot kernel, got {cfg.gemm.kernel!r}")
            k_on = K * _in_range(M, r.m_lo, r.m_hi)
            w = torch.empty((N, torch.sym_max(k_on, _IDLE_K)), dtype=x.dtype, device=x.device)
            _launch_dequant(qweight, e, w, k_groups, k_on, cfg)
            cfg, w_dense = cfg.gemm, True
        split = _splits(m_r, cfg)
        grid = (triton.cdiv(m_r, cfg.block_m), triton.cdiv(triton.cdiv(N, cfg.block_n), cfg.row_tiles), split)
        even_k = k_groups % (cfg.block_k // MX_BLOCK) == 0
        if cfg.kernel == "gemv":
            wrap_triton(_mxfp8_gemv_kernel)[grid](
                x, w, e, b, y, partial, m_r, N, k_groups, cfg.row_tiles,
                HAS_BIAS=bias is not None, MAY_SPLIT=cfg.split > 1, EVEN_K=even_k, EVICT_FIRST=cfg.evict_first,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=_gemv_chunk(cfg), STAGES=cfg.num_stages,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        else:
            wrap_triton(_mxfp8_dot_kernel)[grid](
                x, w, e, b, y, partial, m_r, N, k_groups,
                HAS_BIAS=bias is not None, MAY_SPLIT=cfg.split > 1, W_DENSE=w_dense, EVEN_K=even_k,
                BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if cfg.split == 1:
            continue  # S(M) == 1 for every M: the kernel above wrote y itself
        # Where S(M) == 1 the kernel above wrote y itself and this grid is empty.
        wrap_triton(_splitk_reduce_kernel)[(triton.cdiv(m_r * N, REDUCE_BLOCK) * (1 - 1 // split),)](
            partial, b, y, m_r, N, split,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )
    return y


@triton_op("mxpass::mxfp8_linear_triton", mutates_args=())
def mxfp8_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(qweight [N, K], wscale [N, K // 32]).T + bias, in x.dtype.

    Under torch.compile Inductor traces into this body and launches the Triton kernels
    from its generated code; M may be symbolic (one graph serves every M >= 2).
    """
    num_sms = 132
    if x.device.type == "cuda":
        num_sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    N, K = qweight.shape
    return mxfp8_linear_with_plan(x, qweight, wscale, bias, default_plan(int(K), int(N), num_sms))
