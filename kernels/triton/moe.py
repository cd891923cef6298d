"""Fused Mixture-of-Experts on sm_89+/sm_90: Triton kernels behind three ``torch.library.triton_op``.

Shape legend: T tokens, A active experts per token (top-k), S = T * A slots (slot s = t * A + a),
E experts, H hidden size, I expert intermediate size, P = S rows of the intermediate h.

    h[p] = silu(W13[e, :I] @ x[t]) * (W13[e, I:] @ x[t])       gate rows first, then up rows
    y[t] = sum_a topk_weights[t, a] * W2[e] @ h[p]             e = topk_ids[t, a]

x [T, H] bf16/fp16 (fake-quantized by the caller for the two-op flow below, as it is for the fused op),
topk_ids [T, A] any integer dtype, topk_weights [T, A] any float dtype, w13 [E, 2I, H] and
w2 [E, H, I] with per-expert scales (``granularity``):

    granularity  scale tensor                       W[e, n, k]
    "none"       (unused; bf16/fp16 weights)         w[e, n, k]
    "tensor"     [E, 1] float32                      float(q) * s[e]
    "channel"    [E, N, 1] float32                   float(q) * s[e, n]
    "block"      [E, ceil(N/128), ceil(K/128)] fp32  float(q) * s[e, n // 128, k // 128]
    "mx32"       [E, N, K / 32] E8M0 (or uint8)      fp8(q) * 2**(s[e, n, k // 32] - 127)

Weights are never rounded: e4m3 and int8 values are exact in bf16/fp16, so the tensor-core
kernels multiply float(q) by x and apply "channel"/"tensor" scales to the fp32 sums, "block"
scales to each 128-aligned K step's product, and MX scales (powers of two, exact) to the
tile before the product, as the linear kernels do (``mxfp8_linear.py``, ``w8_linear.py``).
All sums are fp32; h is rounded once to x.dtype, y once to x.dtype.

Two paths, chosen per call by S with no branch on it (the guard-free ``_in_range``
arithmetic of ``mxfp8_linear.py``: the other path's grids are empty):

  decode, S <= plan.decode_slots (GEMV-like, CUDA cores, no routing alignment):
    _moe_gate_up_gemv_kernel  grid (S, cdiv(I, BN)): slot s, BN gate rows and BN up rows of its
                              expert, SiLU*mul in the epilogue; h row p = s
    _moe_down_gemv_kernel     grid (T, cdiv(H, BN)): token t, loops over its A slots in order,
                              routed-weight multiply and top-k sum in registers; writes y.
                              Deterministic.
  grouped, S > plan.decode_slots (tensor cores):
    _moe_prep_kernel          one program per token (the fused op: x's quantization, zeroing of
                              y32 and of h's amax / arrival counters) and one that aligns the
                              routing: for S <= ALIGN_MAX all of it (histogram of the ids,
                              offsets = its exclusive prefix sum, each slot at offsets[e] + rank,
                              ranks from atomic increments after a barrier); above, it zeroes the
                              counters of
    _moe_count_kernel         per-expert slot counts (each program's histogram added with one
                              atomic per expert into a zeroed int32 [E])
    _moe_scatter_kernel       exclusive prefix sum of the counts -> offsets [E + 1]; each slot's
                              position = offsets[e] + rank (rank: an atomic increment of a second
                              zeroed counter); sorted_slots[position] = s. Positions are unpadded:
                              expert e owns positions offsets[e] .. offsets[e + 1] - 1.
    _moe_gate_up_kernel       grid (tile bound, cdiv(I, BN)): each program finds its expert and
                              rows from the offsets (``_expert_tile``: segments padded to BLOCK_M
                              tiles, computed in registers), gathers x rows, two accumulators
                              (gate, up), SiLU*mul epilogue; h row p = sorted position
    _moe_down_kernel          grid (tile bound, cdiv(H, BN)): reads h rows contiguously, routed
                              weight in the epilogue, then either fp32 atomic adds into a zeroed
                              y32 [T, H] (``plan.atomic``) + ``_moe_cast_kernel``, or fp32 rows
                              per slot + ``_moe_sum_kernel`` (fixed order over A: deterministic);
                              the two-op flow zeroes y32 with ``_moe_fill_kernel``
    _moe_gate_up_tl_kernel,   the same two GEMMs with the token rows as the MMA's left operand
    _moe_down_tl_kernel       and each converted weight tile as its right one (gate and up in one
                              product), for the regimes whose tiles say ``tokens_left``
    _moe_gate_up_q_kernel,    the same two GEMMs on quantized activations (below), token rows as
    _moe_down_q_kernel        the MMA's left operand and weight rows as its right one

The ops: ``mxpass::moe_gate_up_triton`` (prep, gate/up) and ``mxpass::moe_down_triton``
(down, cast), around which the caller fake-quantizes x and h (W8A8 formats, the reference's
numerics; ``fake_quantize_act``); ``mxpass::moe_fused_triton`` (all of it in one op, for weight-only formats and,
with ``quantize``, for per-token e4m3 / int8 activations, below).

Buffers have static sizes in T, A, E (no host synchronisation, no data-dependent shape):
sorted_slots [S], offsets [E + 1], h [S, I], counters [2E], and, grouped only, y32 [T, H]
or per-slot rows [S, H] (size max(., 32) otherwise: a size that can be 0 or 1 makes the
tracer guard on T). Every buffer is ``torch.empty``; the grouped path zeroes what it needs
in the prep kernel (or ``_moe_fill_kernel``), whose grids are empty on the decode path, so
a decode call is two kernels and no memset (two memsets were two more CUDA-graph nodes).
Tile grids use the bound sum_e ceil(c_e / BLOCK_M) <= cdiv(S, BLOCK_M) + E; programs past
the real tile count return at once. So the ops run under CUDA-graph capture, and one
compiled graph serves every T. Tensors a kernel may write are never passed twice (also not
as views of one buffer): under Inductor that gave wrong results where eager was right
(notes/moe-kernel-notes.md, run 5).

Routing ids outside [0, E) (the eager op raises on them): such a slot is never counted,
sorted, loaded or stored; it contributes nothing to y (as an expert-parallel "not mine" id
would) and its h row is zero on the decode path. Every address a kernel forms stays inside
its tensor.

Quantized activations (``moe_fused_triton(..., quantize=True)``, ``moe_triton(...,
quantized_activations=True)``, registry ``triton_moe_w8a8``; per-token formats with
"channel" / "tensor" weights): the prep kernel quantizes x per token (``act_quant``'s
numerics); each gate/up program stores its part of h in x.dtype, raises the rows' amax
(atomic integer max of |h|'s bits), counts itself in the tile's (or slot's) arrival counter,
and the last one to arrive quantizes the rows into hq / hs (``_last_quantizes``), so h's
quantization needs no kernel of its own. The grouped GEMMs (the ``_q`` kernels) then run
e4m3 x e4m3 (fp32 sums promoted once per 128-wide K step) or int8 x int8 (int32, exact) MMAs with
the scales applied to the sums; the decode kernels rebuild the reference's fake-quantized
values (q * s rounded to the output dtype) exactly. The plan has its own tiles
(``GROUPED_TILES_W8A8``) in every grouped regime.

Measured figures and the reasons for the default plan: notes/moe-kernel-notes.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from mxpass.kernels.triton.act_quant import _max_keeping_nan, codes, scale_of, to_e4m3
from mxpass.kernels.triton.act_quant import params as act_params
from mxpass.kernels.triton.mxfp8_linear import _at_least, _dequant_tile, _e8m0_to_fp32, _in_range
from mxpass.kernels.triton.w8_linear import _w8_to_float

__all__ = [
    "GRANULARITIES",
    "Gemv",
    "Grouped",
    "Plan",
    "Regime",
    "build_plan",
    "default_plan",
    "fake_quantize_act",
    "moe_down_with_plan",
    "moe_gate_up_with_plan",
    "moe_triton",
    "runs_fused",
    "takes_quantized_activations",
]

GRANULARITIES = ("none", "tensor", "channel", "block", "mx32")
# Scale modes of the kernels (constexpr SCALE)
_NONE, _TENSOR, _CHANNEL, _BLOCK, _MX = 0, 1, 2, 3, 4
_MODE = {"none": _NONE, "tensor": _TENSOR, "channel": _CHANNEL, "block": _BLOCK, "mx32": _MX}
SCALE_BLOCK = 128  # "block": 128 x 128 (mxpass/schemes/fp8.py)
MX_BLOCK = 32  # "mx32": OCP MX v1.0, one E8M0 scale per 32 along K
CHUNK = 16  # gemv: weight elements of one row a thread sums (one 16-byte load of fp8/int8)
COUNT_BLOCK = 1024  # slots per program of the count kernel
ALIGN_MAX = 1024  # up to this many slots the prep kernel aligns the routing in one program
QUANT_TILE = 4096  # values of h per step of the grouped kernels' last-arrival quantization
FP8_PROMOTE = 128  # e4m3 MMAs: products summed by the tensor core before each fp32 promotion (``_qdot``)
CAST_BLOCK = 1024
FILL_BLOCK = 1024


# --------------------------------------------------------------------------- shared pieces


@triton.jit
def _expert_tile(off_ptr, j, E, BLOCK_M: tl.constexpr, E_P2: tl.constexpr):
    """(e, p0, p_end) of grouped tile j: expert e's positions p0 .. min(p0 + BLOCK_M, p_end) - 1.

    Each expert's segment offsets[e] .. offsets[e + 1] is cut into ceil(count / BLOCK_M)
    tiles, numbered expert after expert; e >= E when j is past the last tile.
    """
    r = tl.arange(0, E_P2)
    lo = tl.load(off_ptr + r, mask=r < E, other=0)
    hi = tl.load(off_ptr + r + 1, mask=r < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    end = tl.cumsum(tiles, 0)  # tiles of experts 0..r
    e = tl.sum((end <= j).to(tl.int32), 0)  # experts whose tiles all come before j
    sel = r == e
    first = tl.sum(tl.where(sel, end - tiles, 0), 0)
    p0 = tl.sum(tl.where(sel, lo, 0), 0) + (j - first) * BLOCK_M
    p_end = tl.sum(tl.where(sel, hi, 0), 0)
    return e, p0, p_end


@triton.jit
def _tile_slots(sorted_ptr, p0, p_end, BLOCK_M: tl.constexpr):
    """(positions p0 .. p0 + BLOCK_M - 1, their mask (< p_end), the slot at each valid position)
    of a grouped tile (``_expert_tile``); a slot's token is slot // A."""
    pos = p0 + tl.arange(0, BLOCK_M)
    m_mask = pos < p_end
    return pos, m_mask, tl.load(sorted_ptr + pos, mask=m_mask, other=0)


@triton.jit
def _mma(acc, q, x, s_ptr, s_off, rows, row_mask, k0, KG, KB,
         dtype: tl.constexpr, SCALE: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_RIGHT: tl.constexpr = False):
    """The MMA of one K step with W from the raw tile q [BLOCK_N, BLOCK_K] of weight rows ``rows``
    at k0 (s_off: this expert's first scale; KG = K / 32, KB = ceil(K / 128)), converted to
    dtype in registers: acc [BLOCK_N, BLOCK_M] += W @ x^T for x = the x^T tile [BLOCK_K, BLOCK_M]
    (W the left operand, taken from registers), or with W_RIGHT acc [BLOCK_M, BLOCK_N] += x @ W^T
    for x = [BLOCK_M, BLOCK_K] (token rows on the left; the converted W goes through shared
    memory as the right operand)."""
    if SCALE == 4:  # _MX: powers of two, exact in x.dtype
        rg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        eb = tl.load(s_ptr + s_off + rows[:, None] * KG + rg[None, :],
                     mask=row_mask[:, None] & (rg < KG)[None, :], other=127)
        w = _dequant_tile(q, eb, BLOCK_N, BLOCK_K, dtype)
    elif SCALE == 0:  # _NONE: q is already in x.dtype
        w = q
    else:
        w = _w8_to_float(q, dtype, IS_INT8, ASM)
    if SCALE == 3:  # _BLOCK: BLOCK_K divides 128, so the step lies in one scale column
        sb = tl.load(s_ptr + s_off + (rows // 128) * KB + k0 // 128, mask=row_mask, other=0.0)
        if W_RIGHT:
            acc += tl.dot(x, tl.trans(w)) * sb[None, :]
        else:
            acc += tl.dot(w, x) * sb[:, None]
    elif W_RIGHT:
        acc = tl.dot(x, tl.trans(w), acc)
    else:
        acc = tl.dot(w, x, acc)
    return acc


@triton.jit
def _qdot(a, b, acc, IS_INT8: tl.constexpr, PROMOTE: tl.constexpr):
    """acc += a @ b on quantized operands of one type: int8 x int8 into int32 (exact), or
    e4m3 x e4m3 with the sums promoted to fp32 every PROMOTE products (``max_num_imprecise_acc``;
    it must not exceed a's K width, or Triton promotes never). The launchers pass
    min(128, BLOCK_K): one promotion per 128-wide K step. Triton's sm_90 default lets the
    tensor core's reduced-precision fp8 accumulator run over all of K; promoting every 32
    products (the setting before run 7 of the notes) cost 17% at Qwen3 T = 4096 and changed
    the error against the reference by 2e-5. The scales are applied by the caller."""
    if IS_INT8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE)
    return acc


@triton.jit
def _qacc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_INT8: tl.constexpr):
    """The zeroed accumulator of ``_qdot``: int32 for int8, else fp32."""
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def _out_scale(acc, s_ptr, s_off, rows, row_mask, SCALE: tl.constexpr):
    """acc times the "tensor" / "channel" scale of the weight rows ``rows``, shaped to broadcast
    against acc ([BLOCK_N] for a vector, [BLOCK_N, 1] where weight rows are acc's rows, [1, BLOCK_N]
    where they are its columns)."""
    if SCALE == 1:  # _TENSOR
        acc = acc * tl.load(s_ptr + s_off)
    elif SCALE == 2:  # _CHANNEL
        acc = acc * tl.load(s_ptr + s_off + rows, mask=row_mask, other=0.0)
    return acc


@triton.jit
def _id_ok(eid, like, E):
    """0 <= eid < E for a scalar id, as a bool tensor shaped like ``like`` (the Triton
    interpreter of triton 3.9 turns ``vector & scalar bool`` into integers, not a valid mask)."""
    ev = eid + tl.zeros_like(like).to(eid.dtype)
    return (ev >= 0) & (ev < E)


@triton.jit
def _abs_bits(h, mask):
    """The bits of |h| as int32 where mask, else 0: their integer max is the amax (NaN above Inf above
    every finite value), so amax buffers start at 0 and take atomic maxima."""
    return tl.where(mask, tl.abs(h.to(tl.float32)).to(tl.int32, bitcast=True), 0)


@triton.jit
def _encode(c, IS_INT8: tl.constexpr, BIT_MATH: tl.constexpr):
    """float32 codes (``act_quant.codes``) as int8 or e4m3 (one return: the compiler visits
    statements after a constexpr if's return)."""
    if IS_INT8:
        q = c.to(tl.int8)
    else:
        q = to_e4m3(c, BIT_MATH)
    return q


@triton.jit
def _silu_mul(g, u):
    """silu(g) * u = g / (1 + exp(-g)) * u in fp32 (torch's silu formula)."""
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _quantize_rows(h_ptr, hq_ptr, hs_ptr, amax_ptr, rows, row_mask, I,
                   IS_INT8: tl.constexpr, RANGE: tl.constexpr, EPS: tl.constexpr, QMIN: tl.constexpr,
                   QMAX: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Rows ``rows`` of h [., I] quantized per token (``act_quant``'s numerics) into hq and hs,
    with each row's scale from its amax; h and amax are read past L1 (".cg": other SMs wrote them)."""
    amax = tl.load(amax_ptr + rows, mask=row_mask, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True)
    s = scale_of(amax, RANGE, EPS, HALF, BIT_MATH)
    inv = tl.math.div_rn(1.0, s)
    tl.store(hs_ptr + rows, s, mask=row_mask)
    base = rows.to(tl.int64)[:, None] * I
    for c0 in range(0, I, BLOCK_Q):
        cols = c0 + tl.arange(0, BLOCK_Q)
        m = row_mask[:, None] & (cols < I)[None, :]
        v = tl.load(h_ptr + base + cols[None, :], mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        q = codes(v, s[:, None], inv[:, None], 2 if IS_INT8 else 0, HALF, BIT_MATH, QMIN, QMAX)
        tl.store(hq_ptr + base + cols[None, :], _encode(q, IS_INT8, BIT_MATH), mask=m)


@triton.jit
def _last_quantizes(h_ptr, hq_ptr, hs_ptr, amax_ptr, arrive, rows, row_mask, bits, I,
                    IS_INT8: tl.constexpr, RANGE: tl.constexpr, EPS: tl.constexpr, QMIN: tl.constexpr,
                    QMAX: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr, BLOCK_Q: tl.constexpr):
    """After this program stored its columns of h ``rows``: raise their amax to ``bits`` (this
    program's, ``_abs_bits``) with atomic maxima, then count the program in ``arrive`` (zeroed
    by the prep kernel); the last of the grid's dimension-1 programs to arrive quantizes the
    rows (``_quantize_rows``). The barrier orders every thread's stores before the counter's
    release; its acquire makes the other programs' rows visible to the last one."""
    tl.atomic_max(amax_ptr + rows, bits, mask=row_mask, sem="relaxed")
    tl.debug_barrier()
    done = tl.atomic_add(arrive, 1, sem="acq_rel")
    if done == tl.num_programs(1) - 1:
        _quantize_rows(h_ptr, hq_ptr, hs_ptr, amax_ptr, rows, row_mask, I,
                       IS_INT8, RANGE, EPS, QMIN, QMAX, HALF, BIT_MATH, BLOCK_Q)


# --------------------------------------------------------------------------- routing alignment


@triton.jit
def _moe_count_kernel(
    ids_ptr, cnt_ptr,  # ids [S] integer, cnt [E] int32 (zeroed)
    S, E,
    BLOCK: tl.constexpr, E_P2: tl.constexpr,
):
    """cnt[e] += number of slots routed to e; ids outside [0, E) are skipped: grid (cdiv(S, BLOCK),).
    Each program counts its BLOCK slots in a histogram (bin E: invalid ids and the tail) and adds
    it with one atomic per expert it saw (one atomic per slot contended on E counters: 7.4 us at
    S = 32768, E = 128)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < S
    e = tl.load(ids_ptr + offs, mask=m, other=-1)
    ok = m & (e >= 0) & (e < E)
    cnt = tl.histogram(tl.where(ok, e, E).to(tl.int32), E_P2)
    r = tl.arange(0, E_P2)
    tl.atomic_add(cnt_ptr + r, cnt, mask=(r < E) & (cnt > 0), sem="relaxed")


@triton.jit
def _moe_scatter_kernel(
    ids_ptr, cnt_ptr, sorted_ptr, off_ptr,  # cnt [2E] int32: final counts, then E zeroed cursors
    S, E,
    BLOCK: tl.constexpr, E_P2: tl.constexpr,
):
    """offsets = exclusive prefix sum of cnt (program 0 writes offsets[0..E]); every valid slot s
    goes to sorted[offsets[e] + rank], rank from an atomic increment: grid (cdiv(S, BLOCK),).

    The order inside an expert's segment varies between runs; no result depends on it (each
    position's row of h and of the down product is computed on its own)."""
    r = tl.arange(0, E_P2)
    cnt = tl.load(cnt_ptr + r, mask=r < E, other=0)
    start = tl.cumsum(cnt, 0) - cnt  # [E_P2]; start[E] = number of valid slots
    if tl.program_id(0) == 0:
        tl.store(off_ptr + r, start, mask=r <= E)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < S
    e = tl.load(ids_ptr + offs, mask=m, other=-1)
    ok = m & (e >= 0) & (e < E)
    e32 = tl.where(ok, e, 0).to(tl.int32)
    rank = tl.atomic_add(cnt_ptr + E + e32, 1, mask=ok, sem="relaxed")
    base = tl.sum(tl.where(r[None, :] == e32[:, None], start[None, :], 0), 1)  # start[e] per slot
    tl.store(sorted_ptr + base + rank, offs, mask=ok)


@triton.jit
def _moe_prep_kernel(
    # pointers (xq [T, H], xs [T] (QUANT); ids / sorted [S]; offsets [E + 1]; cnt [2E]; y32 [>= N_Y];
    # amax / arrive [S]: h's amax and the arrival counters of ``_last_quantizes``)
    x_ptr, xq_ptr, xs_ptr, ids_ptr, sorted_ptr, off_ptr, cnt_ptr, y32_ptr, amax_ptr, arrive_ptr,
    R, S, A, E, H, N_Y,
    # meta (KIND ... BIT_MATH: the activation encoding, ``act_quant.params``)
    QUANT: tl.constexpr, KIND: tl.constexpr, IS_INT8: tl.constexpr, RANGE: tl.constexpr, EPS: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_A: tl.constexpr, ALIGN_BLOCK: tl.constexpr, E_P2: tl.constexpr,
):
    """Everything the GEMMs need first, in one launch: grid (R + 1,), or (R,) without alignment.

    Programs t < R (one per token): QUANT: row t of x in the activation encoding (xq, xs,
    the numerics of ``act_quant``), and h's amax and arrival counters of slots
    t*A .. t*A + A - 1 zeroed;
    elements t*H .. t*H + H - 1 of y32 zeroed where below N_Y.
    Program R: the routing alignment. S <= ALIGN_BLOCK: all of it here (per-expert counts,
    offsets = their exclusive prefix sum, each valid slot stored at offsets[e] + rank, ranks
    from atomic increments of zeroed cursors); larger S: the 2E counters of
    ``_moe_count_kernel`` / ``_moe_scatter_kernel`` zeroed."""
    pid = tl.program_id(0)
    if pid < R:
        t = pid.to(tl.int64)
        rh = tl.arange(0, BLOCK_H)
        hm = rh < H
        if QUANT:
            y = tl.load(x_ptr + t * H + rh, mask=hm, other=0.0).to(tl.float32)
            s = scale_of(tl.reduce(tl.abs(y), 0, _max_keeping_nan), RANGE, EPS, HALF, BIT_MATH)
            q = codes(y, s, tl.math.div_rn(1.0, s), KIND, HALF, BIT_MATH, QMIN, QMAX)
            tl.store(xq_ptr + t * H + rh, _encode(q, IS_INT8, BIT_MATH), mask=hm)
            tl.store(xs_ptr + t, s)
            ra = t * A + tl.arange(0, BLOCK_A)
            zero = tl.zeros((BLOCK_A,), dtype=tl.int32)
            tl.store(amax_ptr + ra, zero, mask=ra < t * A + A)
            tl.store(arrive_ptr + ra, zero, mask=ra < t * A + A)
        yo = t * H + rh
        tl.store(y32_ptr + yo, tl.zeros((BLOCK_H,), dtype=tl.float32), mask=hm & (yo < N_Y))
    else:
        r = tl.arange(0, E_P2)
        r2 = tl.arange(0, 2 * E_P2)
        if S <= ALIGN_BLOCK:
            rs = tl.arange(0, ALIGN_BLOCK)
            m = rs < S
            e = tl.load(ids_ptr + rs, mask=m, other=-1)
            ok = m & (e >= 0) & (e < E)
            eb = tl.where(ok, e, E).to(tl.int32)  # bin E: invalid ids and the block's tail
            cnt = tl.histogram(eb, E_P2)
            tl.store(off_ptr + r, tl.cumsum(cnt, 0) - cnt, mask=r <= E)
            tl.store(cnt_ptr + r, tl.zeros((E_P2,), dtype=tl.int32), mask=r < E)
            tl.debug_barrier()  # the offsets and zeroed cursors are visible to the whole program
            rank = tl.atomic_add(cnt_ptr + eb, 1, mask=ok, sem="relaxed")
            base = tl.load(off_ptr + eb, mask=ok, other=0)
            tl.store(sorted_ptr + base + rank, rs, mask=ok)
        else:
            tl.store(cnt_ptr + r2, tl.zeros((2 * E_P2,), dtype=tl.int32), mask=r2 < 2 * E)


# --------------------------------------------------------------------------- grouped GEMMs


@triton.jit
def _moe_gate_up_kernel(
    # pointers
    x_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, h_ptr,
    # sizes (x [T, H], w [E, 2I, H], h [S, I]; S_STRIDE: scale elements per expert)
    A, E, H, I, S_STRIDE, KB,
    # meta
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr,
):
    """h^T tile [BLOCK_N, BLOCK_M] = silu(Wg @ x^T) * (Wu @ x^T) for one expert's rows: grid (tiles, cdiv(I, BLOCK_N)).

    The W tiles are the left MMA operands (dequantized in registers: the tensor core takes
    its left operand from registers), the gathered x^T tile the right one, as in the linear
    dot kernels; tiles of one expert are neighbours in launch order, so a weight tile comes
    from DRAM about once."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    dtype = h_ptr.dtype.element_ty
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    tok = slot // A
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    e64 = e.to(tl.int64)
    w_base = w_ptr + e64 * (2 * I) * H
    s_off = e64 * S_STRIDE
    x_ptrs = x_ptr + tok.to(tl.int64)[None, :] * H + rk[:, None]  # [BLOCK_K, BLOCK_M]: x^T
    g_ptrs = w_base + n[:, None] * H + rk[None, :]  # [BLOCK_N, BLOCK_K]
    u_ptrs = g_ptrs + I * H
    KG = H // 32
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
            qg = tl.load(g_ptrs + k0, mask=n_mask[:, None], other=0.0)
            qu = tl.load(u_ptrs + k0, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + rk) < H
            xt = tl.load(x_ptrs + k0, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
            qg = tl.load(g_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            qu = tl.load(u_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc_g = _mma(acc_g, qg, xt, s_ptr, s_off, n, n_mask, k0, KG, KB, dtype, SCALE, IS_INT8, ASM, BLOCK_N, BLOCK_K)
        acc_u = _mma(acc_u, qu, xt, s_ptr, s_off, n + I, n_mask, k0, KG, KB, dtype, SCALE, IS_INT8, ASM, BLOCK_N,
                     BLOCK_K)
    acc_g = _out_scale(acc_g, s_ptr, s_off, n[:, None], n_mask[:, None], SCALE)
    acc_u = _out_scale(acc_u, s_ptr, s_off, (n + I)[:, None], n_mask[:, None], SCALE)
    h = _silu_mul(acc_g, acc_u).to(dtype)
    tl.store(h_ptr + pos.to(tl.int64)[None, :] * I + n[:, None], h, mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _gate_up_rows(I, BLOCK_N: tl.constexpr):
    """(weight rows, mask) [2 BLOCK_N] of w13 [2I, H] that program_id(1)'s BLOCK_N columns of h
    need: its BLOCK_N gate rows, then the BLOCK_N up rows (one MMA, split by ``_store_h``)."""
    c = tl.arange(0, 2 * BLOCK_N)
    col = tl.program_id(1) * BLOCK_N + c % BLOCK_N  # column of h this weight row serves
    return col + (c // BLOCK_N) * I, col < I


@triton.jit
def _store_h(h_ptr, acc, pos, m_mask, I, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """h tile = silu(gate) * up from acc [BLOCK_M, 2 BLOCK_N] (``_gate_up_rows``' columns), stored
    at rows ``pos`` of h [S, I]; returns (h, its store mask)."""
    g, u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    h = _silu_mul(g, u).to(h_ptr.dtype.element_ty)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (n < I)[None, :]
    tl.store(h_ptr + pos.to(tl.int64)[:, None] * I + n[None, :], h, mask=mask)
    return h, mask


@triton.jit
def _moe_gate_up_tl_kernel(
    # pointers and sizes as ``_moe_gate_up_kernel``
    x_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, h_ptr,
    A, E, H, I, S_STRIDE, KB,
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr,
):
    """``_moe_gate_up_kernel`` with the gathered token rows as the left MMA operand: h tile
    [BLOCK_M, BLOCK_N] from one [BLOCK_M, 2 BLOCK_N] product (gate rows, then up rows, as
    ``_moe_gate_up_q_kernel``), each W tile converted in registers and given to the MMA as its
    right operand (``_mma`` W_RIGHT): grid (tiles, cdiv(I, BLOCK_N))."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    tok = slot // A
    wrow, c_mask = _gate_up_rows(I, BLOCK_N)
    e64 = e.to(tl.int64)
    s_off = e64 * S_STRIDE
    x_ptrs = x_ptr + tok.to(tl.int64)[:, None] * H + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + e64 * (2 * I) * H + wrow.to(tl.int64)[:, None] * H + rk[None, :]  # [2 BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        xa, q = _tl_loads(x_ptrs, w_ptrs, k0, rk, H, m_mask, c_mask, EVEN_K)
        acc = _mma(acc, q, xa, s_ptr, s_off, wrow, c_mask, k0, H // 32, KB, h_ptr.dtype.element_ty, SCALE, IS_INT8,
                   ASM, 2 * BLOCK_N, BLOCK_K, W_RIGHT=True)
    acc = _out_scale(acc, s_ptr, s_off, wrow[None, :], c_mask[None, :], SCALE)
    _store_h(h_ptr, acc, pos, m_mask, I, BLOCK_M, BLOCK_N)


@triton.jit
def _tl_loads(x_ptrs, w_ptrs, k0, rk, K, m_mask, w_mask, EVEN_K: tl.constexpr):
    """K step k0 of the tokens-left kernels: the token rows [BLOCK_M, BLOCK_K] and the raw weight
    rows [rows, BLOCK_K] (zeros past K and outside the masks)."""
    if EVEN_K:
        xa = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        q = tl.load(w_ptrs + k0, mask=w_mask[:, None], other=0.0)
    else:
        k_mask = (k0 + rk) < K
        xa = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs + k0, mask=w_mask[:, None] & k_mask[None, :], other=0.0)
    return xa, q


@triton.jit
def _moe_down_tl_kernel(
    # pointers and sizes as ``_moe_down_kernel``
    h_ptr, tw_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, y_ptr,
    A, E, H, I, S_STRIDE, KB,
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr,
):
    """``_moe_down_kernel`` with the h rows as the left MMA operand and each converted W2 tile
    as the right one (``_mma`` W_RIGHT): tile [BLOCK_M, BLOCK_N], grid (tiles, cdiv(H, BLOCK_N))."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    e64 = e.to(tl.int64)
    s_off = e64 * S_STRIDE
    a_ptrs = h_ptr + pos.to(tl.int64)[:, None] * I + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + e64 * H * I + n.to(tl.int64)[:, None] * I + rk[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        a, q = _tl_loads(a_ptrs, w_ptrs, k0, rk, I, m_mask, n_mask, EVEN_K)
        acc = _mma(acc, q, a, s_ptr, s_off, n, n_mask, k0, I // 32, KB, h_ptr.dtype.element_ty, SCALE, IS_INT8, ASM,
                   BLOCK_N, BLOCK_K, W_RIGHT=True)
    acc = _out_scale(acc, s_ptr, s_off, n[None, :], n_mask[None, :], SCALE)
    acc = acc * tl.load(tw_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    _add_rows(y_ptr, acc, slot, m_mask, n, n_mask, A, H, ATOMIC)


@triton.jit
def _moe_gate_up_q_kernel(
    # pointers
    x_ptr, xs_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, h_ptr, hq_ptr, hs_ptr, amax_ptr, arrive_ptr,
    # sizes (xq [T, H] with row scales xs [T], w [E, 2I, H], h / hq [S, I], hs / amax / arrive [S])
    A, E, H, I, S_STRIDE,
    # meta (RANGE ... BIT_MATH: h's activation encoding, ``act_quant.params``)
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, EVEN_K: tl.constexpr,
    RANGE: tl.constexpr, EPS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, HALF: tl.constexpr,
    BIT_MATH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
    PROMOTE: tl.constexpr,
):
    """Quantized activations: h tile [BLOCK_M, BLOCK_N] = silu(xq @ Wg^T) * (xq @ Wu^T) * scales
    for one expert's rows, then the last program of the tile quantizes its h rows into (hq,
    hs) (``_last_quantizes``): grid (tiles, cdiv(I, BLOCK_N)).

    The gathered token rows are the left MMA operand and BLOCK_N gate rows with the BLOCK_N
    up rows after them the right one, [BLOCK_K, 2 BLOCK_N] (one MMA, split in the epilogue):
    with nothing to convert in registers, tokens as the MMA's rows and 2 BLOCK_N weight rows
    as its columns ran 1.6x faster at 64 tokens per expert than the weight-rows-left layout
    of ``_moe_gate_up_kernel`` (notes/moe-kernel-notes.md, run 6)."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    tok = slot // A
    wrow, c_mask = _gate_up_rows(I, BLOCK_N)
    e64 = e.to(tl.int64)
    x_ptrs = x_ptr + tok.to(tl.int64)[:, None] * H + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + e64 * (2 * I) * H + wrow.to(tl.int64)[None, :] * H + rk[:, None]  # [BLOCK_K, 2 BLOCK_N]: W^T
    acc = _qacc(BLOCK_M, 2 * BLOCK_N, IS_INT8)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xa = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
            wb = tl.load(w_ptrs + k0, mask=c_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + rk) < H
            xa = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wb = tl.load(w_ptrs + k0, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _qdot(xa, wb, acc, IS_INT8, PROMOTE)
    acc = _out_scale(acc.to(tl.float32), s_ptr, e64 * S_STRIDE, wrow[None, :], c_mask[None, :], SCALE)
    acc = acc * tl.load(xs_ptr + tok, mask=m_mask, other=0.0)[:, None]
    h, mask = _store_h(h_ptr, acc, pos, m_mask, I, BLOCK_M, BLOCK_N)
    # the tile's first position p0 indexes its arrival counter
    _last_quantizes(h_ptr, hq_ptr, hs_ptr, amax_ptr, arrive_ptr + p0, pos, m_mask, tl.max(_abs_bits(h, mask), 1),
                    I, IS_INT8, RANGE, EPS, QMIN, QMAX, HALF, BIT_MATH, BLOCK_Q)


@triton.jit
def _moe_down_kernel(
    # pointers
    h_ptr, tw_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, y_ptr,
    # sizes (h [S, I], tw [S], w [E, H, I]; y: fp32 [T, H] (ATOMIC) or [S, H])
    A, E, H, I, S_STRIDE, KB,
    # meta
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr,
):
    """topk_weight * (W2 @ h^T) tile [BLOCK_N, BLOCK_M] for one expert's positions: grid (tiles, cdiv(H, BLOCK_N)).

    ATOMIC: added (fp32, relaxed) into y32[token]; else stored as the slot's fp32 row."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    dtype = h_ptr.dtype.element_ty
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    e64 = e.to(tl.int64)
    s_off = e64 * S_STRIDE
    x_ptrs = h_ptr + pos.to(tl.int64)[None, :] * I + rk[:, None]  # [BLOCK_K, BLOCK_M]: h^T
    w_ptrs = w_ptr + e64 * H * I + n[:, None] * I + rk[None, :]  # [BLOCK_N, BLOCK_K]
    KG = I // 32
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
            q = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + rk) < I
            xt = tl.load(x_ptrs + k0, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
            q = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(acc, q, xt, s_ptr, s_off, n, n_mask, k0, KG, KB, dtype, SCALE, IS_INT8, ASM, BLOCK_N, BLOCK_K)
    acc = _out_scale(acc, s_ptr, s_off, n[:, None], n_mask[:, None], SCALE)
    acc = acc * tl.load(tw_ptr + slot, mask=m_mask, other=0.0).to(tl.float32)[None, :]
    _add_rows(y_ptr, tl.trans(acc), slot, m_mask, n, n_mask, A, H, ATOMIC)


@triton.jit
def _moe_down_q_kernel(
    # pointers
    h_ptr, hs_ptr, tw_ptr, sorted_ptr, off_ptr, w_ptr, s_ptr, y_ptr,
    # sizes (hq [S, I] with row scales hs [S], tw [S], w [E, H, I]; y: fp32 [T, H] (ATOMIC) or [S, H])
    A, E, H, I, S_STRIDE,
    # meta
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_P2: tl.constexpr, PROMOTE: tl.constexpr,
):
    """Quantized activations: topk_weight * hs * (hq @ W2^T) tile [BLOCK_M, BLOCK_N] for one
    expert's positions, h rows the left MMA operand (as ``_moe_gate_up_q_kernel``): grid
    (tiles, cdiv(H, BLOCK_N)). ATOMIC: added into y32[token]; else the slot's fp32 row."""
    e, p0, p_end = _expert_tile(off_ptr, tl.program_id(0), E, BLOCK_M, E_P2)
    if e >= E:
        return
    rk = tl.arange(0, BLOCK_K)
    pos, m_mask, slot = _tile_slots(sorted_ptr, p0, p_end, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    e64 = e.to(tl.int64)
    a_ptrs = h_ptr + pos.to(tl.int64)[:, None] * I + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + e64 * H * I + n.to(tl.int64)[None, :] * I + rk[:, None]  # [BLOCK_K, BLOCK_N]: W2^T
    acc = _qacc(BLOCK_M, BLOCK_N, IS_INT8)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + rk) < I
            a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _qdot(a, w, acc, IS_INT8, PROMOTE)
    acc = _out_scale(acc.to(tl.float32), s_ptr, e64 * S_STRIDE, n[None, :], n_mask[None, :], SCALE)
    tw = tl.load(tw_ptr + slot, mask=m_mask, other=0.0).to(tl.float32) * tl.load(hs_ptr + pos, mask=m_mask, other=0.0)
    _add_rows(y_ptr, acc * tw[:, None], slot, m_mask, n, n_mask, A, H, ATOMIC)


@triton.jit
def _add_rows(y_ptr, v, slot, m_mask, n, n_mask, A, H, ATOMIC: tl.constexpr):
    """v [BLOCK_M, BLOCK_N] (fp32, rows = slots, columns n of H) added into y32[slot's token]
    (relaxed atomics) when ATOMIC, else stored as the slots' rows of y32 [S, H]."""
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + (slot // A).to(tl.int64)[:, None] * H + n[None, :], v, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptr + slot.to(tl.int64)[:, None] * H + n[None, :], v, mask=mask)


@triton.jit
def _moe_fill_kernel(ptr, numel, BLOCK: tl.constexpr):
    """ptr[0 .. numel) = 0: grid (cdiv(numel, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros((BLOCK,), dtype=ptr.dtype.element_ty), mask=offs < numel)


@triton.jit
def _moe_cast_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
    """dst = src (fp32) in dst's dtype: grid (cdiv(numel, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m).to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _moe_sum_kernel(src_ptr, ids_ptr, dst_ptr, A, E, H, BLOCK: tl.constexpr):
    """y[t] = sum over a = 0..A-1 of the valid slots' fp32 rows src[t * A + a], in that order: grid (T, cdiv(H, BLOCK))."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_mask = n < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for a in range(0, A):
        s = t * A + a
        e = tl.load(ids_ptr + s)
        acc += tl.load(src_ptr + s * H + n, mask=n_mask & _id_ok(e, n, E), other=0.0)
    tl.store(dst_ptr + t * H + n, acc.to(dst_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------- decode (GEMV) kernels


@triton.jit
def _gemv_rows(acc, x_ptr, xs, w_ptr, s_ptr, s_off, rows, row_mask, K, KB,
               SCALE: tl.constexpr, IS_INT8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               CHUNK: tl.constexpr, QACT: tl.constexpr, DTYPE: tl.constexpr):
    """acc [BLOCK_N, C] += per-chunk sums of W[rows, k] * x[k] over all of K (C = BLOCK_K / CHUNK).

    The tile is read as [BLOCK_N, C, CHUNK], CHUNK elements per thread, so each chunk's sum
    stays inside a thread; "mx32" / "block" scales multiply each chunk's sum (a chunk lies in
    one 32- or 128-wide scale block), "channel" / "tensor" are applied by the caller.
    QACT: x holds quantized activations with the row scale xs; each element is used as
    (q * xs) rounded to DTYPE, the reference's fake-quantized value, bit for bit."""
    C: tl.constexpr = BLOCK_K // CHUNK
    rc = tl.arange(0, C)
    k3 = rc[None, :, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]  # [1, C, CHUNK]
    w_ptrs = w_ptr + rows[:, None, None] * K + k3  # [BLOCK_N, C, CHUNK]
    KG = K // 32
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + k3) < K
        xv = tl.load(x_ptr + k0 + k3, mask=k_mask, other=0.0)
        if QACT:
            xv = (_w8_to_float(xv, tl.float32, IS_INT8) * xs).to(DTYPE)
        xv = xv.to(tl.float32)
        q = tl.load(w_ptrs + k0, mask=row_mask[:, None, None] & k_mask, other=0.0)
        part = tl.sum(_w8_to_float(q, tl.float32, IS_INT8) * xv, axis=2)  # [BLOCK_N, C]
        kc = k0 + rc * CHUNK
        if SCALE == 4:  # _MX
            eb = tl.load(s_ptr + s_off + rows[:, None] * KG + (kc // 32)[None, :],
                         mask=row_mask[:, None] & (kc < K)[None, :], other=127)
            part = part * _e8m0_to_fp32(eb)
        elif SCALE == 3:  # _BLOCK
            sb = tl.load(s_ptr + s_off + (rows // 128)[:, None] * KB + (kc // 128)[None, :],
                         mask=row_mask[:, None] & (kc < K)[None, :], other=0.0)
            part = part * sb
        acc += part
    return acc


@triton.jit
def _moe_gate_up_gemv_kernel(
    # pointers
    x_ptr, xs_ptr, ids_ptr, w_ptr, s_ptr, h_ptr, hq_ptr, hs_ptr, amax_ptr, arrive_ptr,
    # sizes (x [T, H], xs [T] (QACT), ids [S], w [E, 2I, H], h [S, I]; QACT: hq [S, I], hs / amax / arrive [S])
    A, E, H, I, S_STRIDE, KB,
    # meta (RANGE ... BIT_MATH: h's activation encoding under QACT, ``act_quant.params``)
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, QACT: tl.constexpr, RANGE: tl.constexpr, EPS: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """h[s, n] = silu(Wg[e] x[t]) * (Wu[e] x[t]) for BLOCK_N rows n of slot s: grid (S, cdiv(I, BLOCK_N)).

    A slot whose id is outside [0, E) reads no weight and gets a zero row. QACT: x is
    quantized (xq, xs; used as the reference's fake-quantized values) and the last program
    of slot s quantizes h row s into (hq, hs) (``_quantize_rows``)."""
    s = tl.program_id(0)
    eid = tl.load(ids_ptr + s)
    e64 = tl.where((eid >= 0) & (eid < E), eid, 0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < I
    w_mask = n_mask & _id_ok(eid, n, E)
    w_base = w_ptr + e64 * (2 * I) * H
    t = s // A
    x_row = x_ptr + t.to(tl.int64) * H
    xs = 1.0
    if QACT:
        xs = tl.load(xs_ptr + t)
    s_off = e64 * S_STRIDE
    C: tl.constexpr = BLOCK_K // CHUNK
    DTYPE = h_ptr.dtype.element_ty
    g = _gemv_rows(tl.zeros((BLOCK_N, C), dtype=tl.float32), x_row, xs, w_base, s_ptr, s_off, n, w_mask, H, KB,
                   SCALE, IS_INT8, BLOCK_N, BLOCK_K, CHUNK, QACT, DTYPE)
    u = _gemv_rows(tl.zeros((BLOCK_N, C), dtype=tl.float32), x_row, xs, w_base, s_ptr, s_off, n + I, w_mask, H, KB,
                   SCALE, IS_INT8, BLOCK_N, BLOCK_K, CHUNK, QACT, DTYPE)
    g = _out_scale(tl.sum(g, 1), s_ptr, s_off, n, w_mask, SCALE)
    u = _out_scale(tl.sum(u, 1), s_ptr, s_off, n + I, w_mask, SCALE)
    h = _silu_mul(g, u).to(DTYPE)
    tl.store(h_ptr + s.to(tl.int64) * I + n, h, mask=n_mask)
    if QACT:
        r2 = tl.arange(0, 2)
        _last_quantizes(h_ptr, hq_ptr, hs_ptr, amax_ptr, arrive_ptr + s, s + r2, r2 < 1, tl.max(_abs_bits(h, n_mask), 0),
                        I, IS_INT8, RANGE, EPS, QMIN, QMAX, HALF, BIT_MATH, BLOCK_Q)


@triton.jit
def _moe_down_gemv_kernel(
    # pointers
    h_ptr, hs_ptr, ids_ptr, tw_ptr, w_ptr, s_ptr, y_ptr,
    # sizes (h [S, I], hs [S] (QACT), ids / tw [S], w [E, H, I], y [T, H])
    A, E, H, I, S_STRIDE, KB,
    # meta
    SCALE: tl.constexpr, IS_INT8: tl.constexpr, QACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """y[t, n] = sum over a = 0..A-1 of tw[s] * (W2[e] h[s])[n], s = t * A + a, in that order: grid (T, cdiv(H, BLOCK_N)).

    Slots with ids outside [0, E) are skipped. QACT: h holds quantized rows with scales hs,
    used as the reference's fake-quantized values (q * hs rounded to y's dtype)."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < H
    C: tl.constexpr = BLOCK_K // CHUNK
    DTYPE = y_ptr.dtype.element_ty
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for a in range(0, A):
        s = t * A + a
        eid = tl.load(ids_ptr + s)
        e64 = tl.where((eid >= 0) & (eid < E), eid, 0).to(tl.int64)
        w_mask = n_mask & _id_ok(eid, n, E)
        s_off = e64 * S_STRIDE
        hs = 1.0
        if QACT:
            hs = tl.load(hs_ptr + s)
        acc = _gemv_rows(tl.zeros((BLOCK_N, C), dtype=tl.float32), h_ptr + s * I, hs, w_ptr + e64 * H * I,
                         s_ptr, s_off, n, w_mask, I, KB, SCALE, IS_INT8, BLOCK_N, BLOCK_K, CHUNK, QACT, DTYPE)
        r = _out_scale(tl.sum(acc, 1), s_ptr, s_off, n, w_mask, SCALE)
        tw = tl.load(tw_ptr + s).to(tl.float32)
        out += tl.where(w_mask, r * tw, 0.0)
    tl.store(y_ptr + t * H + n, out.to(DTYPE), mask=n_mask)


# --------------------------------------------------------------------------- plans


class Gemv(NamedTuple):
    """Decode kernel tiles: BLOCK_N weight rows x BLOCK_K columns per step (BLOCK_K % 32 == 0)."""

    block_n: int
    block_k: int
    num_warps: int = 4


class Grouped(NamedTuple):
    """Grouped tensor-core tiles: BLOCK_M positions (tokens) x BLOCK_N weight rows x BLOCK_K."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    tokens_left: bool = False  # weight-only kernels: token rows as the left MMA operand (``_moe_*_tl_kernel``)


class Regime(NamedTuple):
    """Slots S in [s_lo, s_hi) take these grouped tiles; s_hi None means no upper end."""

    s_lo: int
    s_hi: int | None
    gate_up: Grouped
    down: Grouped


class Plan(NamedTuple):
    """S <= decode_slots: the decode kernels; above, the regimes (consecutive, covering
    decode_slots + 1 .. inf). ``atomic``: the grouped down kernel adds into fp32 y with
    atomics (else per-slot fp32 rows and an ordered sum)."""

    decode_slots: int
    gate_up_gemv: Gemv
    down_gemv: Gemv
    regimes: tuple[Regime, ...]
    atomic: bool = True


def default_plan(E: int, A: int, H: int, I: int, quantized: bool = False, int8: bool = False,  # noqa: E741  (I: the intermediate size)
                 granularity: str = "channel") -> Plan:
    """The plan for one MoE layer's static shapes.

    Fastest of ``python -m mxpass.benchmarks.moe --sweep`` and ``mxpass.benchmarks.moe_plans`` on
    H200 (torch 2.11, triton 3.6; fp8-w weights; notes/moe-kernel-notes.md), regimes by slots per
    expert S / E:
      decode (S <= max(A, 16, E / 4) on E >= 32 experts, else S <= A): gemv 4 rows x 512, 4
        warps: Qwen3-30B T = 1 27.8 us (grouped 49.1), T = 4 66.8 us (grouped 76.1: few
        duplicate experts, so decode's re-reads cost less than the grouped path's five more
        kernels); Mixtral T = 1 117.3 us (grouped 186.5); at T = 8 the grouped path wins
        (106.1 vs 121.5 us; Mixtral 399.6 vs 767.2 us)
      S / E < 8: 16 x 64 x 128 tiles (Qwen3 T = 8, 64: 106.1, 204.8 us; 32-wide 240 us at
        T = 64; 16 x 32, 4 stages, BLOCK_K 256, down 16 x 128: no gain over 1%; unsorted
        "direct" kernels without the alignment 142.9, 318.6 us)
      8 <= S / E < 32: 32 x 64 x 128 (Mixtral T = 64: 512 us; 16-wide 548 us)
      32 <= S / E < 128: 64-wide (gate/up 64 x 64 x 64, down 64 x 128 x 64)
      128 <= S / E < 512: gate/up 64 x 64 x 64, down 128 x 128 x 128, 8 warps (Qwen3 T = 4096:
        1217 us; down 64 x 128 x 64 1420 us, 128 x 128 x 64 1233-1255 us; gate/up 128-wide
        1521-1669 us: its two 128 x 128 accumulators need ~230 registers, one CTA per SM)
      S / E >= 512: gate/up 128 x 128 x 64, 8 warps, 4 stages, down 128 x 128 x 128 (Mixtral
        T = 4096: 7886 us; gate/up 128 x 64 x 64 with down 128 x 128 x 64 8732 us)
    ``quantized`` (the fused op's e4m3 / int8 kernels, token rows as the MMA's left operand):
    ``GROUPED_TILES_W8A8``, from sweeps of those kernels (fp8-dynamic and int8, run 6 of the
    notes): below 32 slots per expert 16 x 128 x 128 for both (Qwen3 T = 8: 81.9 us, gate/up
    16 x 64 87.3; T = 64 165-167 us for every 16-wide tile tried); up to 512 per expert
    gate/up 64 x 64 x 128 and down 64 x 128 x 128, 4 stages (Qwen3 T = 512: 228 us, 16-wide
    252-270, 32-wide 271; T = 4096: 850 us, the weight-rows-left kernels 955 us); above, down
    128 x 128 x 128, 8 warps (Mixtral T = 4096). ``int8`` (with ``quantized``):
    ``GROUPED_TILES_INT8``, the same but for 128 to 512 slots per expert, where int8's exact
    sums keep no second accumulator for the fp32 promotion: gate/up 3 stages, down
    128 x 128 x 128 with 4 warps and 3 stages. Two rounds each, us, fp8-dynamic's tiles ->
    these: Qwen3 T = 4096 (256 per expert) 716-719 -> 672; Mixtral T = 1024 (256) 1224-1232 ->
    1195; Mixtral T = 512 (128) 834 -> 820-831; but Qwen3 T = 512 (32) 223 -> 238 and T = 1024
    (64) 278 -> 274, hence the regime starts at 128 (notes/moe-kernel-notes.md, run 9).

    Weight-only kernels with token rows on the left (``Grouped.tokens_left``, run 11 of the
    notes; us, the weight-rows-left tiles above -> these): from 32 slots per expert to 512
    for every format (gate/up 64 x 64 x 64, down 64 x 128 x 64, 4 warps): fp8-w Qwen3
    T = 512 381 -> 313, T = 4096 1180 -> 1069, Mixtral T = 256 916 -> 741, T = 512 1214 ->
    1177; bf16 Qwen3 T = 512 336 -> 328, T = 4096 1053 -> 980, Mixtral T = 256 814 -> 746.
    Above 512 per expert fp8-w keeps the weight-rows-left tiles (Mixtral T = 4096 7983
    against 8436-8934). ``granularity`` "block" (128 x 128 weight scales, applied to every K
    step's product): ``GROUPED_TILES_BLOCK``, tokens left only from 32 to 128 slots per
    expert (fp8-w-block Qwen3 T = 512 407 -> 374; at T = 4096 the weight-rows-left tiles
    1337 against 1458-1686). "mx32" (MXFP8 weights, whose per-32 dequantize gains most):
    ``GROUPED_TILES_MX``, tokens left from 8 slots per expert: Qwen3 T = 128 363 -> 306,
    T = 512 503 -> 387, T = 1024 707 -> 537, T = 4096 1860 -> 1461; Mixtral T = 64 883 ->
    640, T = 256 1374 -> 1343, T = 4096 12773 -> 11003, but T = 512 1959 -> 2042.
    """
    # few slots on many experts: mostly distinct experts (S = E / 4: ~12% duplicates)
    decode_slots = max(A, 16, E // 4) if E >= 32 else A
    if quantized:
        return build_plan(E, decode_slots, GROUPED_TILES_INT8 if int8 else GROUPED_TILES_W8A8)
    return build_plan(E, decode_slots, {"mx32": GROUPED_TILES_MX, "block": GROUPED_TILES_BLOCK}.get(granularity,
                                                                                                  GROUPED_TILES))


GEMV = Gemv(block_n=4, block_k=512, num_warps=4)
# (upper end of the regime in slots per expert S / E, gate/up tiles, down tiles)
_TL = Grouped(64, 128, 64, tokens_left=True)  # the tokens-left down tiles from 32 slots per expert
GROUPED_TILES = ((8, Grouped(16, 64, 128), Grouped(16, 64, 128)),
                 (32, Grouped(32, 64, 128), Grouped(32, 64, 128)),
                 (128, Grouped(64, 64, 64, tokens_left=True), _TL),
                 (512, Grouped(64, 64, 64, tokens_left=True), _TL),
                 (None, Grouped(128, 128, 64, num_warps=8, num_stages=4), Grouped(128, 128, 128, num_warps=8)))
# 128 x 128 block-scaled weights (``default_plan(granularity="block")``): the weight-rows-left
# tiles of before from 128 slots per expert
GROUPED_TILES_BLOCK = (*GROUPED_TILES[:3], (512, Grouped(64, 64, 64), Grouped(128, 128, 128, num_warps=8)),
                       GROUPED_TILES[4])
# MXFP8 weights (``default_plan(granularity="mx32")``): token rows on the left from 8 slots per expert
GROUPED_TILES_MX = (GROUPED_TILES[0],
                    (32, Grouped(32, 64, 128, tokens_left=True), Grouped(32, 64, 128, tokens_left=True)),
                    GROUPED_TILES[2],
                    (512, Grouped(128, 64, 64, num_warps=8, tokens_left=True), _TL),
                    (None, Grouped(128, 64, 64, num_warps=8, tokens_left=True),
                     Grouped(128, 128, 64, num_warps=8, tokens_left=True)))
# the quantized-activation kernels (_moe_gate_up_q_kernel / _moe_down_q_kernel), from their sweep
GROUPED_TILES_W8A8 = ((32, Grouped(16, 128, 128), Grouped(16, 128, 128)),
                      (512, Grouped(64, 64, 128, num_stages=4), Grouped(64, 128, 128, num_stages=4)),
                      (None, Grouped(64, 64, 128, num_stages=4), Grouped(128, 128, 128, num_warps=8, num_stages=4)))
GROUPED_TILES_INT8 = (GROUPED_TILES_W8A8[0],
                      (128, *GROUPED_TILES_W8A8[1][1:]),
                      (512, Grouped(64, 64, 128, num_stages=3), Grouped(128, 128, 128, num_stages=3)),
                      GROUPED_TILES_W8A8[2])


def build_plan(E: int, decode_slots: int, tiles=GROUPED_TILES, gemv: Gemv = GEMV, atomic: bool = True) -> Plan:
    """decode for S <= decode_slots, then the grouped regimes ``tiles`` ((upper end in slots per
    expert or None, gate/up tiles, down tiles), consecutive); regimes that the decode range
    covers entirely are left out."""
    regimes: list[Regime] = []
    for per_expert, gu, dn in tiles:
        lo = regimes[-1].s_hi if regimes else decode_slots + 1
        hi = None if per_expert is None else per_expert * E
        if hi is None or hi > lo:
            regimes.append(Regime(lo, hi, gu, dn))
    return Plan(decode_slots, gemv, gemv, tuple(regimes), atomic=atomic)


def _check_plan(plan: Plan, mode: int) -> None:
    prev = plan.decode_slots + 1
    for r in plan.regimes:
        if r.s_lo != prev:
            raise ValueError(f"moe: plan regimes must be consecutive from {plan.decode_slots + 1}, got {plan.regimes}")
        prev = r.s_hi
        for g in (r.gate_up, r.down):
            if mode == _BLOCK and SCALE_BLOCK % g.block_k:
                raise ValueError(f"moe: BLOCK_K {g.block_k} must divide 128 for 'block' scales")
            if mode == _MX and g.block_k % MX_BLOCK:
                raise ValueError(f"moe: BLOCK_K {g.block_k} must be a multiple of 32 for 'mx32' scales")
            if min(g.block_m, g.block_n, g.block_k) < 16:
                raise ValueError(f"moe: grouped tiles must be at least 16 wide (tl.dot), got {g}")
    if prev is not None:
        raise ValueError("moe: the last regime must have no upper end")
    for g in (plan.gate_up_gemv, plan.down_gemv):
        if g.block_k % MX_BLOCK:
            raise ValueError(f"moe: gemv BLOCK_K {g.block_k} must be a multiple of 32")


# --------------------------------------------------------------------------- launch


def _scale_args(w: torch.Tensor, scale: torch.Tensor, granularity: str, what: str):
    """(scale tensor as the kernels read it, elements per expert, KB) after checking its shape."""
    E, N, K = w.shape
    if granularity not in _MODE:
        raise ValueError(f"moe: granularity {granularity!r}; expected one of {GRANULARITIES}")
    if granularity == "none":
        if w.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"moe: {what} is {w.dtype}; unquantized weights must be bf16/fp16")
        return w, 0, 1  # never read
    if granularity == "mx32":
        if w.dtype != torch.float8_e4m3fn or scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            raise TypeError(f"moe: mx32 {what} must be float8_e4m3fn with E8M0/uint8 scales, "
                            f"got {w.dtype} / {scale.dtype}")
        expected = (E, N, K // MX_BLOCK)
        if K % MX_BLOCK:
            raise ValueError(f"moe: mx32 {what} {tuple(w.shape)}: K = {K} is not a multiple of 32")
        s = scale.contiguous()
        s = s if s.dtype == torch.uint8 else s.view(torch.uint8)
    else:
        if w.dtype not in (torch.float8_e4m3fn, torch.int8) or scale.dtype != torch.float32:
            raise TypeError(f"moe: {granularity} {what} must be float8_e4m3fn/int8 with float32 scales, "
                            f"got {w.dtype} / {scale.dtype}")
        expected = {"tensor": (E, 1), "channel": (E, N, 1),
                    "block": (E, triton.cdiv(N, SCALE_BLOCK), triton.cdiv(K, SCALE_BLOCK))}[granularity]
        s = scale.contiguous()
        if granularity == "tensor" and s.numel() == E:
            s = s.reshape(E, 1)
    if tuple(s.shape) != expected:
        raise ValueError(f"moe: {granularity} scale of {what} {tuple(w.shape)} has shape {tuple(scale.shape)}; "
                         f"expected {expected}")
    return s, s.numel() // E, triton.cdiv(K, SCALE_BLOCK)


def _check_routing(topk_ids) -> None:
    if topk_ids.is_floating_point() or topk_ids.is_complex():
        raise TypeError(f"moe: topk_ids must be integer, got {topk_ids.dtype}")


def _weights(a, w, scale, granularity: str, plan: Plan, a_name: str, w_name: str):
    """Checks of one GEMM's activation ``a`` and experts ``w`` against each other and the plan:
    (scale mode, w's scale as the kernels read it, its elements per expert, KB)."""
    mode = _MODE.get(granularity, -1)
    s, s_stride, kb = _scale_args(w, scale, granularity, w_name)
    _check_plan(plan, mode)
    if a.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"moe: {a_name} has dtype {a.dtype}; expected bfloat16 or float16")
    if mode == _NONE and w.dtype != a.dtype:
        raise TypeError(f"moe: unquantized {w_name} is {w.dtype}, {a_name} is {a.dtype}")
    return mode, s, s_stride, kb


def _check_gate_up(x, topk_ids, w13) -> None:
    _check_routing(topk_ids)
    if w13.dim() != 3 or x.dim() != 2 or w13.shape[2] != x.shape[1] or w13.shape[1] % 2:
        raise ValueError(f"moe: x {tuple(x.shape)} and w13 {tuple(w13.shape)} must be [T, H] and [E, 2I, H]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe: topk_ids {tuple(topk_ids.shape)} must be [T, A] with T = {x.shape[0]}")


def _check_down(rows, topk_ids, topk_weights) -> None:
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or rows != topk_ids.shape[0] * topk_ids.shape[1]:
        raise ValueError(f"moe: topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                         f"must be [T, A] with T * A = {rows} rows of h")
    if not topk_weights.is_floating_point():
        raise TypeError(f"moe: topk_weights must be floating point, got {topk_weights.dtype}")


def _act_kind(w13, w2, granularity: str) -> int:
    """The ``act_quant`` KIND of the activations that ``quantize`` gives the MMAs: per-token
    e4m3 (0) or int8 (2), the weights' type, which needs "channel" / "tensor" scales."""
    if granularity not in ("channel", "tensor") or w13.dtype not in (torch.float8_e4m3fn, torch.int8) \
            or w2.dtype != w13.dtype:
        raise TypeError(f"moe: quantized activations need e4m3 or int8 experts with channel / tensor scales, "
                        f"got {w13.dtype} / {w2.dtype} with {granularity!r} scales")
    return 2 if w13.dtype == torch.int8 else 0


def _regime_sizes(S, plan: Plan):
    """(indicator of the decode path, [(indicator, regime) of each grouped regime], indicator of any grouped)."""
    on_decode = _in_range(S, 0, plan.decode_slots + 1)
    grouped = [(_in_range(S, r.s_lo, r.s_hi), r) for r in plan.regimes]
    return on_decode, grouped, _at_least(S, plan.decode_slots + 1)


def _tile_bound(S_r, ind, block_m: int, E: int):
    """Most tiles of block_m positions the E segments of S_r slots make (0 when the regime is off)."""
    return triton.cdiv(S_r, block_m) + E * ind


class _Launch(NamedTuple):
    """What every kernel of one call shares."""

    S: int  # slots (may be symbolic)
    A: int
    E: int
    plan: Plan
    on_decode: int  # indicators (may be symbolic)
    grouped: list
    on_grouped: int
    e_p2: int
    asm: bool


def _launch(topk_ids, E: int, plan: Plan, device, asm: bool) -> _Launch:
    T, A = topk_ids.shape
    S = T * A
    on_decode, grouped, on_grouped = _regime_sizes(S, plan)
    return _Launch(S, A, E, plan, on_decode, grouped, on_grouped, triton.next_power_of_2(E + 1),
                   asm and device.type == "cuda")


def _prep(L: _Launch, x, ids, kind: int | None, y32, n_y, counts):
    """The prep kernel (and, above ALIGN_MAX slots, the count / scatter kernels): (xq, xs,
    sorted_slots, offsets). ``kind``: quantize x to that ``act_quant`` KIND (else xq is x);
    ``y32``: zero its first n_y elements (a symbolic count; 0 off the grouped path);
    ``counts``: (amax, arrive) [S] int32 to zero with x's quantization."""
    T, H = x.shape
    dev = x.device
    sorted_slots = torch.empty((L.S,), dtype=torch.int32, device=dev)
    offsets = torch.empty((L.E + 1,), dtype=torch.int32, device=dev)
    counters = torch.empty((2 * L.E,), dtype=torch.int32, device=dev)
    quant = kind is not None
    if quant:
        xq = torch.empty((T, H), dtype=torch.int8 if kind == 2 else torch.float8_e4m3fn, device=dev)
        xs = torch.empty((T,), dtype=torch.float32, device=dev)
        rows = T
    else:
        xq = xs = x
        rows = 0 if y32 is None else T * L.on_grouped
    block_h = triton.next_power_of_2(H)
    # stand-ins for buffers this call does not use: their own tensors, never another argument
    # (the same tensor for several written arguments gave wrong results under Inductor: notes, run 5)
    y32 = torch.empty((1,), dtype=torch.float32, device=dev) if y32 is None else y32
    amax, arrive = counts or (torch.empty((1,), dtype=torch.int32, device=dev),
                              torch.empty((1,), dtype=torch.int32, device=dev))
    wrap_triton(_moe_prep_kernel)[(rows + L.on_grouped,)](
        x, xq, xs, ids, sorted_slots, offsets, counters, y32, amax, arrive, rows, L.S, L.A, L.E, H, n_y,
        QUANT=quant, KIND=kind or 0, IS_INT8=kind == 2, **act_params(kind or 0, x.dtype, dev.type),
        BLOCK_H=block_h, BLOCK_A=triton.next_power_of_2(L.A), ALIGN_BLOCK=ALIGN_MAX, E_P2=L.e_p2,
        num_warps=8 if block_h >= 8192 else 4,
    )
    big = L.S * L.on_grouped * _at_least(L.S, ALIGN_MAX + 1)  # slots the count / scatter kernels align
    wrap_triton(_moe_count_kernel)[(triton.cdiv(big, COUNT_BLOCK),)](
        ids, counters, L.S, L.E, BLOCK=COUNT_BLOCK, E_P2=L.e_p2, num_warps=4)
    scatter_block = max(16, min(1024, 8192 // L.e_p2))
    wrap_triton(_moe_scatter_kernel)[(triton.cdiv(big, scatter_block),)](
        ids, counters, sorted_slots, offsets, L.S, L.E, BLOCK=scatter_block, E_P2=L.e_p2, num_warps=4)
    return xq, xs, sorted_slots, offsets


def _gate_up(L: _Launch, xq, xs, ids, sorted_slots, offsets, w13, checked, h, hq_state):
    """The gate/up kernels of both paths into h [S, I]; ``checked``: what ``_weights`` returned
    for w13. ``hq_state`` (quantized activations): (KIND, hq [S, I], hs [S], amax [S],
    arrive [S]) for the last-arrival quantization of h."""
    mode, s13, s_stride, kb = checked
    E, two_i, H = w13.shape
    I = two_i // 2  # noqa: E741
    is_int8 = w13.dtype == torch.int8
    qact = hq_state is not None
    kind, hq, hs, amax, arrive = hq_state if qact else (0, xq, xq, ids, ids)  # untouched without qact
    act = act_params(kind, h.dtype, h.device.type)
    block_i = triton.next_power_of_2(I)
    g = L.plan.gate_up_gemv
    wrap_triton(_moe_gate_up_gemv_kernel)[(L.S * L.on_decode, triton.cdiv(I, g.block_n))](
        xq, xs, ids, w13, s13, h, hq, hs, amax, arrive, L.A, E, H, I, s_stride, kb,
        SCALE=mode, IS_INT8=is_int8, QACT=qact, BLOCK_N=g.block_n, BLOCK_K=g.block_k, CHUNK=CHUNK,
        num_warps=g.num_warps, BLOCK_Q=min(1024, block_i), **act,
    )
    for ind, r in L.grouped:
        c = r.gate_up
        grid = (_tile_bound(L.S * ind, ind, c.block_m, E), triton.cdiv(I, c.block_n))
        tiles = dict(EVEN_K=H % c.block_k == 0, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                     E_P2=L.e_p2, num_warps=c.num_warps, num_stages=c.num_stages)
        if qact:
            wrap_triton(_moe_gate_up_q_kernel)[grid](
                xq, xs, sorted_slots, offsets, w13, s13, h, hq, hs, amax, arrive, L.A, E, H, I, s_stride,
                SCALE=mode, IS_INT8=is_int8, BLOCK_Q=min(block_i, max(16, QUANT_TILE // c.block_m)),
                PROMOTE=min(FP8_PROMOTE, c.block_k),
                **act, **tiles,
            )
        else:
            wrap_triton(_moe_gate_up_tl_kernel if c.tokens_left else _moe_gate_up_kernel)[grid](
                xq, sorted_slots, offsets, w13, s13, h, L.A, E, H, I, s_stride, kb,
                SCALE=mode, IS_INT8=is_int8, ASM=L.asm, **tiles,
            )


def _down(L: _Launch, h, hs, ids, tw, sorted_slots, offsets, w2, checked, y, y32):
    """The down kernels of both paths into y [T, H] (fp32 y32 on the grouped path, then the
    cast or the ordered sum); ``checked``: what ``_weights`` returned for w2. ``hs``: h holds
    quantized rows with these scales (else None)."""
    mode, s2, s_stride, kb = checked
    E, H, I = w2.shape  # noqa: E741
    T = y.shape[0]
    is_int8 = w2.dtype == torch.int8
    qact = hs is not None
    hs = sorted_slots if hs is None else hs
    g = L.plan.down_gemv
    wrap_triton(_moe_down_gemv_kernel)[(T * L.on_decode, triton.cdiv(H, g.block_n))](
        h, hs, ids, tw, w2, s2, y, L.A, E, H, I, s_stride, kb,
        SCALE=mode, IS_INT8=is_int8, QACT=qact, BLOCK_N=g.block_n, BLOCK_K=g.block_k, CHUNK=CHUNK,
        num_warps=g.num_warps,
    )
    for ind, r in L.grouped:
        c = r.down
        grid = (_tile_bound(L.S * ind, ind, c.block_m, E), triton.cdiv(H, c.block_n))
        tiles = dict(EVEN_K=I % c.block_k == 0, ATOMIC=L.plan.atomic, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                     BLOCK_K=c.block_k, E_P2=L.e_p2, num_warps=c.num_warps, num_stages=c.num_stages)
        if qact:
            wrap_triton(_moe_down_q_kernel)[grid](
                h, hs, tw, sorted_slots, offsets, w2, s2, y32, L.A, E, H, I, s_stride,
                SCALE=mode, IS_INT8=is_int8, PROMOTE=min(FP8_PROMOTE, c.block_k), **tiles,
            )
        else:
            wrap_triton(_moe_down_tl_kernel if c.tokens_left else _moe_down_kernel)[grid](
                h, tw, sorted_slots, offsets, w2, s2, y32, L.A, E, H, I, s_stride, kb,
                SCALE=mode, IS_INT8=is_int8, ASM=L.asm, **tiles,
            )
    n = T * H * L.on_grouped
    if L.plan.atomic:
        wrap_triton(_moe_cast_kernel)[(triton.cdiv(n, CAST_BLOCK),)](y32, y, n, BLOCK=CAST_BLOCK, num_warps=4)
    else:
        wrap_triton(_moe_sum_kernel)[(T * L.on_grouped, triton.cdiv(H, CAST_BLOCK))](
            y32, ids, y, L.A, E, H, BLOCK=CAST_BLOCK, num_warps=4)


def _y32(L: _Launch, T: int, H: int, device):
    """The grouped path's fp32 sums: [T, H] for atomics, [S, H] per-slot rows otherwise; never
    0 or 1 elements (see the module docstring)."""
    rows = T if L.plan.atomic else L.S
    return torch.empty((torch.sym_max(rows * H * L.on_grouped, 32),), dtype=torch.float32, device=device)


def moe_gate_up_with_plan(x, topk_ids, w13, w13_scale, granularity: str, plan: Plan, *, asm: bool = True):
    """(h [S, I] in x.dtype, sorted_slots [S] int32, offsets [E + 1] int32) for an explicit plan.

    h row p is slot p on the decode path and sorted position p on the grouped path (where
    sorted_slots / offsets say which slot and expert; on the decode path they are unused)."""
    _check_gate_up(x, topk_ids, w13)
    checked = _weights(x, w13, w13_scale, granularity, plan, "x", "w13")
    x = x.contiguous()
    ids = topk_ids.contiguous().view(-1)
    L = _launch(topk_ids, w13.shape[0], plan, x.device, asm)
    h = torch.empty((L.S, w13.shape[1] // 2), dtype=x.dtype, device=x.device)
    _, _, sorted_slots, offsets = _prep(L, x, ids, None, None, 0, None)
    _gate_up(L, x, x, ids, sorted_slots, offsets, w13.contiguous(), checked, h, None)
    return h, sorted_slots, offsets


def moe_down_with_plan(h, topk_ids, topk_weights, sorted_slots, offsets, w2, w2_scale, granularity: str,
                       plan: Plan, *, asm: bool = True):
    """y [T, H] in h.dtype from the gate/up op's outputs (h fake-quantized since, or not) for an explicit plan."""
    _check_routing(topk_ids)
    if w2.dim() != 3 or h.dim() != 2 or w2.shape[2] != h.shape[1]:
        raise ValueError(f"moe: h {tuple(h.shape)} and w2 {tuple(w2.shape)} must be [S, I] and [E, H, I]")
    _check_down(h.shape[0], topk_ids, topk_weights)
    checked = _weights(h, w2, w2_scale, granularity, plan, "h", "w2")
    T = topk_ids.shape[0]
    H = w2.shape[1]
    L = _launch(topk_ids, w2.shape[0], plan, h.device, asm)
    y = torch.empty((T, H), dtype=h.dtype, device=h.device)
    y32 = _y32(L, T, H, h.device)
    if plan.atomic:
        n = T * H * L.on_grouped
        wrap_triton(_moe_fill_kernel)[(triton.cdiv(n, FILL_BLOCK),)](y32, n, BLOCK=FILL_BLOCK, num_warps=4)
    _down(L, h.contiguous(), None, topk_ids.contiguous().view(-1), topk_weights.contiguous().view(-1),
          sorted_slots, offsets, w2.contiguous(), checked, y, y32)
    return y


def moe_fused_with_plan(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, granularity: str, plan: Plan,
                        quantize: bool = False, *, asm: bool = True):
    """y [T, H] in x.dtype: the whole MoE in one call (prep, gate/up, down, and on the grouped
    path the cast or sum) for an explicit plan.

    ``quantize``: x and h are quantized per token to the weights' type inside the kernels
    (e4m3 or int8, ``act_quant``'s numerics; "channel" / "tensor" weights): x by the prep
    kernel, h by the last gate/up program of each tile (or slot) from the rows' amax. The
    decode path then computes the reference's fake-quantized values exactly; the grouped
    path runs e4m3 / int8 MMAs on the codes with the scales applied to the sums (module
    docstring). Without it x and h go to bf16/fp16 MMAs as they are (weight-only formats)."""
    _check_gate_up(x, topk_ids, w13)
    if w2.dim() != 3 or w2.shape[0] != w13.shape[0] or w2.shape[1] != x.shape[1] or 2 * w2.shape[2] != w13.shape[1]:
        raise ValueError(f"moe: w2 {tuple(w2.shape)} must be [E, H, I] for w13 {tuple(w13.shape)} = [E, 2I, H]")
    _check_down(topk_ids.shape[0] * topk_ids.shape[1], topk_ids, topk_weights)
    checked13 = _weights(x, w13, w13_scale, granularity, plan, "x", "w13")
    checked2 = _weights(x, w2, w2_scale, granularity, plan, "h", "w2")
    kind = _act_kind(w13, w2, granularity) if quantize else None
    x = x.contiguous()
    ids = topk_ids.contiguous().view(-1)
    T, H = x.shape
    L = _launch(topk_ids, w13.shape[0], plan, x.device, asm)
    dev = x.device
    h = torch.empty((L.S, w2.shape[2]), dtype=x.dtype, device=dev)
    y = torch.empty((T, H), dtype=x.dtype, device=dev)
    y32 = _y32(L, T, H, dev)
    hq_state = None
    if quantize:  # h quantized by the gate/up kernels (hq, hs), from its amax and arrival counters
        hq_state = (kind, torch.empty_like(h, dtype=w13.dtype), torch.empty((L.S,), dtype=torch.float32, device=dev),
                    torch.empty((L.S,), dtype=torch.int32, device=dev), torch.empty((L.S,), dtype=torch.int32, device=dev))
    n_y = T * H * L.on_grouped if plan.atomic else 0
    xq, xs, sorted_slots, offsets = _prep(L, x, ids, kind, y32, n_y, None if hq_state is None else hq_state[3:])
    _gate_up(L, xq, xs, ids, sorted_slots, offsets, w13.contiguous(), checked13, h, hq_state)
    hd, hs = (h, None) if hq_state is None else hq_state[1:3]
    _down(L, hd, hs, ids, topk_weights.contiguous().view(-1), sorted_slots, offsets, w2.contiguous(), checked2,
          y, y32)
    return y


def _plan_for(topk_ids, w13_or_w2, gate_up: bool, granularity: str, quantized: bool = False) -> Plan:
    A = topk_ids.shape[1]
    if gate_up:
        E, two_i, H = w13_or_w2.shape
        return default_plan(int(E), int(A), int(H), int(two_i) // 2, quantized, w13_or_w2.dtype == torch.int8,
                            granularity)
    E, H, I = w13_or_w2.shape  # noqa: E741
    return default_plan(int(E), int(A), int(H), int(I), granularity=granularity)


@triton_op("mxpass::moe_gate_up_triton", mutates_args=())
def moe_gate_up_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    granularity: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [T*A, I], sorted_slots [T*A], offsets [E+1]): the gate/up half of the MoE (module docstring).

    x: bf16/fp16 [T, H] (fake-quantized by the caller where the format quantizes
    activations). Under torch.compile Inductor traces into this body and launches the
    kernels from its generated code; T may be symbolic (no branch on it)."""
    return moe_gate_up_with_plan(x, topk_ids, w13, w13_scale, granularity, _plan_for(topk_ids, w13, True, granularity))


@triton_op("mxpass::moe_down_triton", mutates_args=())
def moe_down_triton(
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    offsets: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    granularity: str,
) -> torch.Tensor:
    """y [T, H]: the down half, routed-weight multiply and top-k sum (module docstring)."""
    return moe_down_with_plan(h, topk_ids, topk_weights, sorted_slots, offsets, w2, w2_scale, granularity,
                              _plan_for(topk_ids, w2, False, granularity))


@triton_op("mxpass::moe_fused_triton", mutates_args=())
def moe_fused_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    granularity: str,
    quantize: bool,
) -> torch.Tensor:
    """y [T, H]: the whole MoE in one op (``moe_fused_with_plan``): weight-only formats and
    bf16/fp16 experts (``quantize`` False), or per-token e4m3 / int8 activations quantized
    inside the kernels (``quantize`` True)."""
    return moe_fused_with_plan(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, granularity,
                               _plan_for(topk_ids, w13, True, granularity, quantize), quantize)


def takes_quantized_activations(fmt) -> bool:
    """Whether ``moe_triton(..., quantized_activations=True)`` applies to this format: per-token
    activations with "channel" / "tensor" weights (fp8-dynamic, int8)."""
    return fmt is not None and fmt.activation == "token" and fmt.weight_granularity in ("channel", "tensor")


def runs_fused(fmt, quantized_activations: bool) -> bool:
    """Whether ``moe_triton`` runs ``fmt`` as the one fused op (weight-only formats, ``None``,
    quantized activations) rather than the two ops around ATen fake-quantization."""
    return quantized_activations or fmt is None or fmt.activation is None


def fake_quantize_act(fmt, a: torch.Tensor) -> torch.Tensor:
    """The format's activation fake-quantization of x [T, H] or h [S, I] around the two ops:
    for MXFP8 ``mxpass::mx_fake_quant_triton`` (same values in one pass; h comes from an op,
    so no producer kernel can take the quantization in, and Inductor's kernels for the ATen
    math ran at a fifth of copy bandwidth: ~110 us for h and 44.5 for x at Qwen3-30B
    T = 4096, docs/performance.md), else the ATen math (fused into x's producer)."""
    from mxpass import quant

    if fmt is not None and fmt.family == "mxfp8" and fmt.activation is not None:
        return torch.ops.mxpass.mx_fake_quant_triton(a)
    return quant.fake_quantize_activation(fmt, a, None)


def moe_triton(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt, plan: Plan | None = None,
               quantized_activations: bool = False):
    """The whole MoE for a Format ``fmt`` (or ``None``: unquantized bf16/fp16 weights) as the
    lowering emits it (with ``plan``: the ops' bodies under that plan).

    Weight-only formats and ``None``: ``mxpass::moe_fused_triton``. ``quantized_activations``
    (formats of ``takes_quantized_activations``): the same op quantizing x and h in its
    kernels; the grouped GEMMs then run e4m3 / int8 MMAs on q_x * q_w with the scales applied
    to the sums, i.e. on q * s unrounded where the reference rounds q * s to x.dtype first
    (the decode path rounds as the reference does). Other formats: x and h fake-quantized
    (quantize-dequantize in x.dtype, ``fake_quantize_act``), the values ``moe_reference``
    computes, around ``mxpass::moe_gate_up_triton`` and ``mxpass::moe_down_triton``."""
    gran = "none" if fmt is None else fmt.weight_granularity
    if quantized_activations and not takes_quantized_activations(fmt):
        raise ValueError(f"moe: quantized activations need per-token activations with channel/tensor weights, "
                         f"not {getattr(fmt, 'name', fmt)!r}")
    if runs_fused(fmt, quantized_activations):
        args = (x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, gran)
        if plan is None:
            return torch.ops.mxpass.moe_fused_triton(*args, quantized_activations)
        return moe_fused_with_plan(*args, plan, quantized_activations)
    x = fake_quantize_act(fmt, x)
    if plan is None:
        h, sorted_slots, offsets = torch.ops.mxpass.moe_gate_up_triton(x, topk_ids, w13, w13_scale, gran)
    else:
        h, sorted_slots, offsets = moe_gate_up_with_plan(x, topk_ids, w13, w13_scale, gran, plan)
    h = fake_quantize_act(fmt, h)
    args = (h, topk_ids, topk_weights, sorted_slots, offsets, w2, w2_scale, gran)
    if plan is None:
        return torch.ops.mxpass.moe_down_triton(*args)
    return moe_down_with_plan(*args, plan)
