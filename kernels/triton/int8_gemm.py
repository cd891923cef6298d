"""INT8 W8A8 GEMM on int8 tensor cores (Hopper wgmma), scales, bias and cast in the epilogue.

    y [M, N] = (float32(xq @ qweight.T) * sx * sw + bias).to(out_dtype)

    xq       [M, K] int8      the activation, already quantized (mxpass/schemes/int8.py)
    xscale   [M, 1] float32   per token ("token", dynamic)   or [1] per tensor ("tensor", static)
    qweight  [N, K] int8      row-major, K contiguous (as stored)
    wscale   [N, 1] float32   per channel                    or [1] per tensor
    bias     [N] or None      any float dtype, added in float32
    y        [M, N] out_dtype (bf16 or fp16)

The K reduction is ``tl.dot(int8, int8) -> int32``: exact (|q| <= 128, so K < 2**17 cannot
overflow), on sm_90 one ``wgmma.mma_async ... .s32.s8.s8`` per 32-deep k step; both
operands K-major in shared memory, as 8-bit wgmma requires. The epilogue is that of
``cublas_int_mm`` (``lowering/kernels.py``): ``acc.float() * sx * sw (+ bias.float())``
rounded once to out_dtype, in the same order, so the two give the same values up to the
fp32 rounding of a product (they agree bit for bit almost everywhere; the tests bound it).
The static per-tensor variant (``int8-static``) is the same kernel with a scalar scale
(constexpr X_ROWS / W_ROWS choose a per-row vector or one scalar). A NaN per-token scale
(a row holding NaN/Inf, data 0) gives a NaN output row, as the reference does.

Tiles: each program computes BLOCK_M x BLOCK_N tiles of y, walking K in BLOCK_K steps
through a ``num_stages``-deep software pipeline (cp.async into shared memory on Hopper,
async wgmma); tiles are visited in groups of GROUP_M row tiles so that consecutive programs
share weight columns in L2. ``persistent``: a grid of at most ``num_programs`` programs
loops over the tiles (``tl.range(..., flatten=True)``, which overlaps one tile's epilogue
with the next tile's loads); otherwise one program per tile. Rows of x and w beyond M / N
are clamped to row 0 instead of masked (the loads stay unmasked and vectorized; the store
drops them); K tails are masked (EVEN_K: none).

M is dynamic under ``torch.compile``: the op's plan has M regimes with their own tiles,
every regime's launch is issued and the ones outside their range get an empty grid
(integer arithmetic on M, no guard; see ``mxfp8_linear._in_range``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from mxpass.kernels.triton.mxfp8_linear import _in_range, _num_sms

__all__ = ["Config", "Plan", "default_plan", "int8_mm_triton", "int8_mm_with_plan"]

# fp32 output is not offered: with the swapped small-M tiles it measured out of shared
# memory on H200 (327712 bytes required), and fp32 models keep ``cublas_int_mm``.
OUT_DTYPES = (torch.bfloat16, torch.float16)
MIN_STATIC_M = 128  # a graph with a static M below this keeps cublas_int_mm (measured faster at M = 16)
K_ALIGN = 16  # int8 rows 16-byte aligned: vectorized 16-byte loads (and the cuBLAS-compatible shapes)


class Config(NamedTuple):
    """One launch configuration of ``_int8_mm_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 4
    group_m: int = 8
    persistent: bool = False
    swap: bool = False  # y^T tiles: weight rows on the MMA's M side (BLOCK_M), tokens on its N side (BLOCK_N)
    tma: bool = False  # TMA loads (_int8_mm_tma_kernel); not with swap
    warp_specialize: bool = False  # with tma: a producer warp for the loads


class Plan(NamedTuple):
    """M regimes [m_lo, m_hi) and their configs (m_hi None: no upper end); they must tile [0, inf)."""

    regimes: tuple[tuple[int, int | None, Config], ...]


# --------------------------------------------------------------------------- kernel


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles walk the column tiles together (weight reuse in L2)."""
    in_group = GROUP_M * num_pid_n
    group = tile_id // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % in_group) % size_m
    pid_n = (tile_id % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, offs_a, offs_b, MA, NB, sa_ptr, sb_ptr, bias_ptr, y_ptr, stride_ya, stride_yb,
              SA_ROWS: tl.constexpr, SB_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr):
    """y[a, b] = (float(acc) * s_x * s_w + bias).to(y), the cublas_int_mm lowering's fp32 math in
    its order (x scale, then w scale, then bias). SWAP: the A rows are weight rows (y^T tiles)."""
    a_ok = offs_a < MA
    b_ok = offs_b < NB
    y = acc.to(tl.float32)
    if SA_ROWS:
        sa = tl.load(sa_ptr + offs_a, mask=a_ok, other=0.0)[:, None]
    else:
        sa = tl.load(sa_ptr)
    if SB_ROWS:
        sb = tl.load(sb_ptr + offs_b, mask=b_ok, other=0.0)[None, :]
    else:
        sb = tl.load(sb_ptr)
    if SWAP:
        y = y * sb
        y = y * sa
    else:
        y = y * sa
        y = y * sb
    if HAS_BIAS:
        if SWAP:
            y = y + tl.load(bias_ptr + offs_a, mask=a_ok, other=0.0).to(tl.float32)[:, None]
        else:
            y = y + tl.load(bias_ptr + offs_b, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_a.to(tl.int64)[:, None] * stride_ya + offs_b.to(tl.int64)[None, :] * stride_yb
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=a_ok[:, None] & b_ok[None, :])


@triton.jit
def _int8_mm_kernel(
    # pointers: a [MA, K] int8, b [NB, K] int8 (K contiguous), sa [MA] / [1] f32, sb [NB] / [1] f32,
    # bias [N], y (element [a, b] at a * stride_ya + b * stride_yb)
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr,
    MA, NB, K, stride_ya, stride_yb,
    SA_ROWS: tl.constexpr, SB_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """Tiles of a @ b.T, grid (programs,): one per tile, or (PERSISTENT) a strided loop over them.

    Not swapped: a = xq, b = w (y tiles [BLOCK_M tokens, BLOCK_N features]); SWAP: a = w,
    b = xq (y^T tiles [BLOCK_M features, BLOCK_N tokens], stored transposed), for small M.
    """
    num_pid_m = tl.cdiv(MA, BLOCK_M)
    num_pid_n = tl.cdiv(NB, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + rm
        offs_n = pid_n * BLOCK_N + rn
        # rows past MA / NB read row 0 (in bounds, unmasked, contiguous); the store drops them
        lm = tl.max_contiguous(tl.multiple_of(tl.where(offs_m < MA, offs_m, 0), BLOCK_M), BLOCK_M)
        ln = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < NB, offs_n, 0), BLOCK_N), BLOCK_N)
        a_ptrs = a_ptr + lm.to(tl.int64)[:, None] * K + rk[None, :]
        b_ptrs = b_ptr + ln.to(tl.int64)[:, None] * K + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = rk[None, :] < K - ki * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok, other=0)
                b = tl.load(b_ptrs, mask=k_ok, other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _epilogue(acc, offs_m, offs_n, MA, NB, sa_ptr, sb_ptr, bias_ptr, y_ptr, stride_ya, stride_yb,
                  SA_ROWS, SB_ROWS, HAS_BIAS, SWAP)


@triton.jit
def _int8_mm_tma_kernel(
    # x_desc / w_desc: host TMA descriptors of xq [M, K] and w [N, K] with blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]
    x_desc, w_desc, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, K,
    X_ROWS: tl.constexpr, W_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """``_int8_mm_kernel`` (not swapped) with TMA loads (out-of-bounds boxes read as 0, no masks); K % 16 == 0."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = x_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        _epilogue(acc, off_m + rm, off_n + rn, M, N, sx_ptr, sw_ptr, bias_ptr, y_ptr, N, 1,
                  X_ROWS, W_ROWS, HAS_BIAS, False)


# --------------------------------------------------------------------------- plans

SMALL_M = 256  # below: the small-M tiles of the plan


def default_plan(K: int, N: int, num_sms: int = 132) -> Plan:
    """Tiles per M regime, the fastest of the H200 sweep (torch 2.11, triton 3.6;
    notes/int8-kernel-notes.md) on (K, N) in (4096, 12288), (4096, 28672), (14336, 4096):

    M >= 256: 128 x 256 x 128, 8 warps, 4 stages, cp.async loads, one program per tile.
        M = 4096: 392 / 916 / 432 us, against 484 / 1129 / 568 us for ``_int_mm``. The same
        tiles with TMA loads and a persistent grid (``Config(..., persistent=True, tma=True)``)
        took 344 / 818 / 390 us, but torch 2.11 does not trace a host TMA descriptor through a
        ``triton_op`` (Triton's launcher is handed the FakeTensor: "Cannot access data
        pointer"), so that config is for eager ``int8_mm_with_plan`` calls only.
    M < 256: 64 x 128 x 128, 4 warps, 4 stages where N gives at least one 128-wide column
        tile per two SMs (M = 128: 22.5 / 43.0 us at N = 12288 / 28672); otherwise swapped
        tiles (64 weight rows x 64 tokens x 256, more programs): 28.3 us at N = 4096,
        K = 14336, where 64 x 128 takes 45.2.
    """
    if triton.cdiv(N, 128) * 2 >= num_sms:
        small = Config(64, 128, 128, num_warps=4, num_stages=4)
    else:
        small = Config(64, 64, 256, num_warps=4, num_stages=4, swap=True)
    large = Config(128, 256, 128, num_warps=8, num_stages=4)
    return Plan(((0, SMALL_M, small), (SMALL_M, None, large)))


# --------------------------------------------------------------------------- launch


def _check_inputs(xq, xscale, qweight, wscale, bias, out_dtype) -> None:
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise TypeError(f"int8_mm: xq must be a 2-D int8 [M, K] tensor, got {xq.dtype} {tuple(xq.shape)}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"int8_mm: qweight must be a 2-D int8 [N, K] tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    if xq.shape[1] != K:
        raise ValueError(f"int8_mm: xq {tuple(xq.shape)} and qweight {tuple(qweight.shape)} disagree on K")
    for name, s, rows in (("xscale", xscale, "M"), ("wscale", wscale, "N")):
        if s.dtype != torch.float32:
            raise TypeError(f"int8_mm: {name} has dtype {s.dtype}; expected float32")
        if s.dim() not in (1, 2) or (s.dim() == 1 and s.shape[0] != 1) or (s.dim() == 2 and s.shape[1] != 1):
            raise ValueError(f"int8_mm: {name} has shape {tuple(s.shape)}; expected [{rows}, 1] (per row) or [1] (per tensor)")
    if xscale.dim() == 2 and xscale.shape[0] != xq.shape[0]:
        raise ValueError(f"int8_mm: xscale {tuple(xscale.shape)} does not match xq {tuple(xq.shape)} (expected [M, 1])")
    if wscale.dim() == 2 and wscale.shape[0] != N:
        raise ValueError(f"int8_mm: wscale {tuple(wscale.shape)} does not match qweight {tuple(qweight.shape)} (expected [N, 1])")
    if bias is not None and (tuple(bias.shape) != (N,) or not bias.dtype.is_floating_point):
        raise ValueError(f"int8_mm: bias must be a float [{N}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"int8_mm: out_dtype {out_dtype}; expected one of {OUT_DTYPES}")


def _grid(tiles, cfg: Config, num_sms: int):
    return (torch.sym_min(tiles, num_sms) if cfg.persistent else tiles,)


def _at_least_one_row(xq):
    """xq, or xq with one zero row appended when M = 0: a TMA descriptor is encoded at every
    launch, empty grid or not, and a dimension of size 0 is invalid. Traced with a symbolic M
    this is a pad by 1 // (M + 1) rows, which Inductor fuses into the kernel producing xq."""
    M = xq.shape[0]
    if isinstance(M, int):
        return xq if M > 0 else xq.new_zeros((1, xq.shape[1]))
    return torch.nn.functional.pad(xq, (0, 0, 0, 1 // (M + 1)))


def _launch(cfg: Config, m_r, xq, sx, qweight, sw, bias, y, num_sms: int) -> None:
    """One regime's launch; m_r = 0 gives an empty grid."""
    N, K = qweight.shape
    b = y if bias is None else bias
    flags = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 GROUP_M=cfg.group_m, PERSISTENT=cfg.persistent, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if K % K_ALIGN:
            raise ValueError(f"int8_mm: TMA loads need K % {K_ALIGN} == 0 (16-byte rows), got K={K}")
        tiles = triton.cdiv(m_r, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        x_desc = TensorDescriptor.from_tensor(_at_least_one_row(xq), [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(qweight, [cfg.block_n, cfg.block_k])
        wrap_triton(_int8_mm_tma_kernel)[_grid(tiles, cfg, num_sms)](
            x_desc, w_desc, sx, sw, b, y, m_r, N, K,
            X_ROWS=sx.dim() == 2, W_ROWS=sw.dim() == 2, WARP_SPECIALIZE=cfg.warp_specialize, **flags,
        )
        return
    even_k = K % cfg.block_k == 0
    if cfg.swap:  # a = w [N, K], b = xq [m_r, K]: y^T tiles, y[m, n] at n + m * N
        tiles = triton.cdiv(N, cfg.block_m) * triton.cdiv(m_r, cfg.block_n)
        args = (qweight, xq, sw, sx, b, y, N, m_r, K, 1, N)
        rows = dict(SA_ROWS=sw.dim() == 2, SB_ROWS=sx.dim() == 2)
    else:
        tiles = triton.cdiv(m_r, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        args = (xq, qweight, sx, sw, b, y, m_r, N, K, N, 1)
        rows = dict(SA_ROWS=sx.dim() == 2, SB_ROWS=sw.dim() == 2)
    wrap_triton(_int8_mm_kernel)[_grid(tiles, cfg, num_sms)](*args, SWAP=cfg.swap, EVEN_K=even_k, **rows, **flags)


def int8_mm_with_plan(xq, xscale, qweight, wscale, bias, out_dtype: torch.dtype, plan: Plan,
                      num_sms: int = 132) -> torch.Tensor:
    """The op's body for an explicit ``plan``; traceable, with no branch on M. Benchmarks call it directly."""
    _check_inputs(xq, xscale, qweight, wscale, bias, out_dtype)
    xq, qweight = xq.contiguous(), qweight.contiguous()
    sx, sw = xscale.contiguous(), wscale.contiguous()
    b = None if bias is None else bias.contiguous()
    M = xq.shape[0]
    y = torch.empty((M, qweight.shape[0]), dtype=out_dtype, device=xq.device)
    for m_lo, m_hi, cfg in plan.regimes:
        _launch(cfg, M * _in_range(M, m_lo, m_hi), xq, sx, qweight, sw, b, y, num_sms)
    return y


@triton_op("mxpass::int8_mm_triton", mutates_args=())
def int8_mm_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y [M, N] = (float(xq [M, K] @ qweight [N, K].T) * xscale * wscale + bias).to(out_dtype).

    Under torch.compile Inductor traces into this body and launches ``_int8_mm_kernel``
    from its generated code; M may be symbolic (one graph serves every M).
    """
    num_sms = 132
    if xq.device.type == "cuda":
        num_sms = _num_sms(xq.device.index if xq.device.index is not None else torch.cuda.current_device())
    N, K = qweight.shape
    return int8_mm_with_plan(xq, xscale, qweight, wscale, bias, out_dtype, default_plan(int(K), int(N), num_sms),
                             num_sms)
