"""Dynamic activation quantization in one pass over each row, optionally of SiLU(gate) * up.

``mxpass::act_quant_triton(x, up, fmt)`` quantizes the rows of ``x`` [M, K] (``up`` None) or of
``silu(x) * up`` (the input of a SwiGLU MLP's down projection, never written to memory) to
the activation encoding of ``fmt``: dynamic per-token e4m3 (``fp8-dynamic``), 1 x 128 e4m3
groups (``fp8-block``), per-token int8 (``int8``) or MXFP8 (``mxfp8``: e4m3 with one E8M0
byte per 32, written as uint8). Per-token scales: one program per row, the whole row in
registers (K <= MAX_K); grouped scales (1 x 128, MX): one program per CHUNK elements of a
row. Either way the input is read once: Inductor's fused kernel for the same
math reads a row twice when the row is longer than its persistent-reduction limit, and
spends ~25 integer instructions per element emulating the dtype roundings that
a hardware conversion does in one.

Numerics: ``mxpass.quant.quantize_activation`` of ``x`` (or of ``F.silu(gate) * up`` computed
in the input dtype: SiLU rounded to it, then the product rounded to it), element for element:

    amax  = max |y| over the group; a group holding NaN/Inf gets a NaN scale
    s     = rnd_T(amax / R) (R = 448 e4m3, 127.5 int8; correctly rounded division), 0 -> eps_T
    q     = rnd_T(y / s): for bf16, y * (1 / s) rounded to bf16 equals the rounded quotient (y
            and s carry 8 significant bits, so y / s is never closer than 2**-17 (relative) to a
            bf16 rounding midpoint, and the product errs by at most 2**-23); fp16 divides.
    e4m3  clamp(q, +/-448), -0 -> +0, NaN -> 0x7F          int8  rint(clamp(q, -128, 127)), NaN -> 0

MXFP8 has its own scale rule (``mxpass.schemes.mxfp8``, ``_mx_codes``): an integer max of the
elements' exponent bytes, and a power-of-two multiply (exact) for the codes.

Instructions per element decide its speed (it is issue-bound, not memory-bound, once
SiLU*mul is in it): the amax reduction keeps NaN (max.NaN) instead of a second reduction
for NaN/Inf, -0 becomes +0 by adding +0, and the e4m3 conversion's saturation does the
clamp and the NaN encoding (measurements in docs/performance.md).

Two differences from the ATen math, both outside what a model produces: Triton flushes fp32
subnormals, so a group whose scale is subnormal (amax < 448 * 2**-126) quantizes as if
its amax were 0 (Inductor's code for the ATen math flushes the same way; for MXFP8, an MX
block whose values are all below 2**-126 gets byte 0 and zero codes); and SiLU uses
the GPU's fast ``exp``, whose last-bit differences can move a bf16 rounding of SiLU(x)
(measured on random inputs: see tests/gpu/test_act_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from mxpass.formats import Format, get_format
from mxpass.kernels.triton.mxfp8_linear import _e8m0_to_fp32
from mxpass.schemes import fp8, int8, mxfp8

MAX_K = 32768  # longest row held in registers (one row per program)
GROUP = 128    # fp8-block activation groups
# activation encodings (format family, granularity) -> kernel KIND
KINDS = {("fp8", "token"): 0, ("fp8", "group"): 1, ("int8", "token"): 2, ("mxfp8", "mx32"): 3}
_GROUP_SIZE = {1: GROUP, 3: mxfp8.BLOCK_SIZE}  # elements per scale for the grouped KINDs


@triton.jit
def _round(v, HALF: tl.constexpr, BIT_MATH: tl.constexpr):
    """float32 v rounded (nearest-even) to the input dtype (bf16, or fp16 when HALF), kept in
    float32. BIT_MATH: bf16 by integer math (Triton's interpreter truncates instead)."""
    if HALF:
        return v.to(tl.float16).to(tl.float32)
    if BIT_MATH:
        bits = v.to(tl.int32, bitcast=True)
        r = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r)
    return v.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def scale_of(amax, RANGE: tl.constexpr, EPS: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr):
    """The scheme's dynamic scale of a group from its amax: rnd_T(amax / RANGE), 0 -> eps_T,
    NaN for a NaN or infinite amax (module docstring)."""
    s = _round(tl.math.div_rn(amax, RANGE), HALF, BIT_MATH)
    s = tl.where(s == 0.0, EPS, s)
    return tl.where(amax == float("inf"), float("nan"), s)  # a NaN amax gave a NaN s already


@triton.jit
def codes(y, s, inv, KIND: tl.constexpr, HALF: tl.constexpr, BIT_MATH: tl.constexpr,
          QMIN: tl.constexpr, QMAX: tl.constexpr):
    """float32 codes of y for the scale s (inv = div_rn(1, s); both broadcast to y): int8
    (KIND 2) rounded and clamped, NaN -> 0; e4m3 rnd_T(y / s) with -0 -> +0, still to be
    converted (the GPU's saturating conversion clamps and keeps NaN, see ``to_e4m3``)."""
    if HALF:
        q = _round(tl.math.div_rn(y, s), HALF, BIT_MATH)
    else:
        q = _round(y * inv, HALF, BIT_MATH)
    if KIND == 2:
        nan = q != q  # before the clamps: min/max return the non-NaN operand
        # nearest-even to an integer: adding 1.5 * 2**23 leaves no fraction bits in float32
        q = (tl.minimum(tl.maximum(q, QMIN), QMAX) + 12582912.0) - 12582912.0
        return tl.where(nan, 0.0, q)
    return q + 0.0  # -0 -> +0, compressed-tensors' zero-point add


@triton.jit
def to_e4m3(q, BIT_MATH: tl.constexpr):
    """float32 q -> e4m3, nearest-even, saturating at +/-448, NaN -> NaN. BIT_MATH: rounded in
    float32 integer math first, since Triton's interpreter converts ties away from zero and
    wraps values past 448 (the GPU's cvt.rn.satfinite needs none of it)."""
    if BIT_MATH:
        bits = q.to(tl.int32, bitcast=True)
        normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) & -1048576).to(tl.float32, bitcast=True)
        sub = ((tl.abs(q) * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)  # multiples of 2**-9
        r = tl.where(tl.abs(q) < 0.015625, tl.where(q < 0, -sub, sub), normal)  # -0 stays -0
        q = tl.where(q != q, q, tl.minimum(tl.maximum(r, -448.0), 448.0))
    return q.to(tl.float8e4nv)


def params(kind: int, dtype: torch.dtype, device_type: str) -> dict:
    """Constexpr arguments of ``scale_of`` / ``codes`` for an activation KIND and input dtype."""
    rng, qmin, qmax = (int8.HALF_RANGE, int8.INT8_MIN, int8.INT8_MAX) if kind == 2 else (
        fp8.E4M3_MAX, -fp8.E4M3_MAX, fp8.E4M3_MAX)
    return dict(RANGE=float(rng), EPS=torch.finfo(dtype).eps, QMIN=float(qmin), QMAX=float(qmax),
                HALF=dtype == torch.float16, BIT_MATH=device_type == "cpu")


@triton.jit
def _mx_codes(y, RTZ: tl.constexpr):
    """MXFP8 (``mxpass.schemes.mxfp8``) of float32 blocks y [groups, 32]: (float32 codes, still
    to be converted to e4m3, int32 E8M0 byte per group). The byte is the largest of the
    elements' own bytes (the rule is monotone in |y|): the biased exponent of |y| rounded up
    when its significand is >= 1.75, minus 8, at least 0; 255 (NaN) for a group holding
    NaN/Inf. Codes: y * 2**(127 - byte), exact; +0 where that rounds to 0 in the input dtype
    (|.| <= RTZ), 0 * y for a NaN group (NaN stays NaN)."""
    a = tl.abs(y)
    finite = a < float("inf")  # False for NaN too
    bits = tl.where(finite, a, 0.0).to(tl.int32, bitcast=True)
    byte = tl.maximum(((bits + (1 << 21)) >> 23) - 8, 0)
    byte = tl.max(tl.where(finite, byte, 255), 1)
    inv = tl.where(byte == 255, 0, (254 - byte) << 23).to(tl.float32, bitcast=True)
    q = y * inv[:, None]
    return tl.where(tl.abs(q) <= RTZ, 0.0, q), byte


@triton.jit
def _act_quant_kernel(x_ptr, up_ptr, q_ptr, s_ptr, M, K, NG, stride_x, stride_up, stride_sm, stride_sg,
                      SILU_MUL: tl.constexpr, KIND: tl.constexpr, HALF: tl.constexpr,
                      RANGE: tl.constexpr, EPS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      BLOCK_G: tl.constexpr, GS: tl.constexpr, BIT_MATH: tl.constexpr, STORE_F32: tl.constexpr,
                      RTZ: tl.constexpr, FAKE: tl.constexpr = False):
    row = tl.program_id(0)
    if row >= M:
        return
    row = row.to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # this program's groups of the row
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]  # [groups, group size]; token: one group
    mask = offs < K
    y = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
        y = _round(_round(y / (1.0 + tl.exp(-y)), HALF, BIT_MATH) * up, HALF, BIT_MATH)
    if KIND == 3:
        q, byte = _mx_codes(y, RTZ)
        s = byte.to(tl.uint8)
    else:
        amax = tl.reduce(tl.abs(y), 1, _max_keeping_nan)  # NaN if the group holds NaN
        s = scale_of(amax, RANGE, EPS, HALF, BIT_MATH)
        q = codes(y, s[:, None], tl.math.div_rn(1.0, s)[:, None], KIND, HALF, BIT_MATH, QMIN, QMAX)
    if FAKE:  # MXFP8 (KIND 3) only: the dequantized values in the input dtype (``mxfp8.fake_quantize``)
        v = to_e4m3(q, BIT_MATH).to(tl.float32) * _e8m0_to_fp32(byte)[:, None]
        tl.store(q_ptr + row * K + offs, v.to(q_ptr.dtype.element_ty), mask=mask)
    elif STORE_F32:
        if KIND != 2:
            # what the conversion below does on the GPU: clamp to +/-448, every NaN one NaN
            q = tl.where(q != q, float("nan"), tl.minimum(tl.maximum(q, QMIN), QMAX))
        tl.store(q_ptr + row * K + offs, q, mask=mask)
    elif KIND == 2:
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=mask)
    else:
        # cvt.rn.satfinite: |q| > 448 -> 448, NaN -> 0x7F; |q| <= 450 here (q <= 448 * (1 + 2**-8), rounded)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
    if not FAKE:
        tl.store(s_ptr + row * stride_sm + g * stride_sg, s, mask=g < NG)


def supports(fmt: Format, k: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``act_quant_triton`` encodes this format's activation (the reason when not)."""
    if (fmt.family, fmt.activation) not in KINDS:
        return False, (f"{fmt.name} ({fmt.family} {fmt.activation} activations) is not one it encodes "
                       f"(dynamic fp8 per token or 1x128, int8 per token, MXFP8)")
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"activation dtype {dtype} (it takes bf16 or fp16)"
    if k > MAX_K:
        return False, f"K={k} > {MAX_K} (it holds a row in registers)"
    if fmt.activation == "group" and k % GROUP:
        return False, f"K={k} is not a multiple of {GROUP}"
    return True, ""


def _check(x: torch.Tensor, up: torch.Tensor | None, fmt: Format) -> None:
    if x.dim() != 2:
        raise ValueError(f"act_quant_triton: x must be [M, K], got shape {tuple(x.shape)}")
    ok, reason = supports(fmt, int(x.shape[1]), x.dtype)
    if not ok:
        raise ValueError(f"act_quant_triton: {reason}")
    if x.stride(1) != 1:
        raise ValueError(f"act_quant_triton: x needs unit stride along K, got strides {tuple(x.stride())}")
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.stride(1) != 1):
        raise ValueError(f"act_quant_triton: up {tuple(up.shape)} {up.dtype} strides {tuple(up.stride())} must "
                         f"match x {tuple(x.shape)} {x.dtype} with unit stride along K")


CHUNK = 2048  # elements of a row per program for the grouped KINDs (whose groups are independent)
CHUNK_WARPS = 4


def _grid_groups(kind: int, ng: int, gs: int) -> int:
    """Groups per program: a whole row for per-token scales (one group), else CHUNK elements.

    MX blocks and 1 x 128 groups need no row-wide reduction, so a program takes CHUNK
    elements of a row (16 per thread at 4 warps) instead of the whole row, which at 14336
    (SiLU*mul) held one 16-warp program per SM and was latency-bound. H200, bf16, us, one
    program per row -> 2048-element chunks: M = 4096, SiLU*mul of 14336: MXFP8 fake 144.0
    -> 87.2, MXFP8 91.8 -> 78.5, fp8-block 80.0 -> 72.7; x of 4096: 20.2 -> 18.7, 16.4 ->
    15.5, 13.8 -> 14.9; M = 1, SiLU*mul of 14336: 4.4 -> 2.2 (chunks of 512 and 1024, and
    8 warps, were slower at M = 4096; docs/performance.md)."""
    if kind not in _GROUP_SIZE:
        return 1
    return min(triton.next_power_of_2(ng), max(1, CHUNK // gs))


def _warps(M, block: int) -> int:
    """Per-token scales (one program per row, the whole row in registers): a static M of at
    most 16 (decode) takes 32 warps: the row is then latency-bound (HF Llama, 8B shapes, 1
    token, CUDA graphs, H200: 0.4935 -> 0.4905 ms per forward). Otherwise 4 warps, 8 for rows
    of 8192 or more; 2 warps for rows of 4096 gained nothing. (Grouped KINDs: CHUNK_WARPS.)"""
    if isinstance(M, int) and M <= 16:
        return 32
    if block >= 8192:
        return 8
    return 4


def launch(x: torch.Tensor, up: torch.Tensor | None, fmt: str, store_f32: bool = False,
           fake: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's body (``fmt``: a format name). ``store_f32``: data as the float32 values before
    the final cast to e4m3/int8 (Triton's interpreter converts to e4m3 wrongly; its tests check these).
    ``fake`` (MXFP8 only): data = the quantize-dequantized values in x.dtype, no scales written
    (the returned scale is a one-byte stand-in)."""
    f = get_format(fmt)
    _check(x, up, f)
    M, K = x.shape
    kind = KINDS[(f.family, f.activation)]
    if fake and kind != 3:
        raise ValueError(f"act_quant_triton: fake quantization is implemented for mxfp8 only, not {f.name}")
    block = triton.next_power_of_2(int(K))
    gs = _GROUP_SIZE.get(kind, block)
    ng = int(K) // gs if kind in _GROUP_SIZE else 1
    dtype = x.dtype if fake else torch.float32 if store_f32 else torch.int8 if kind == 2 else torch.float8_e4m3fn
    data = torch.empty((M, K), dtype=dtype, device=x.device)
    if fake:
        scale = torch.empty((1, 1), dtype=torch.uint8, device=x.device)
    elif kind == 3:  # E8M0 bytes
        scale = torch.empty((M, ng), dtype=torch.uint8, device=x.device)
    elif kind == 1 and isinstance(M, int) and M > 16:
        # 1 x 128 groups beyond decode sizes go to cuBLAS block scaling, which takes the
        # scales outer-dim-major (strides (1, M)): written so, they need no transposing copy.
        # A static M only (verified on the GPU there; a symbolic M has its rows padded, and
        # the pad copies the scales anyway)
        scale = torch.empty((ng, M), dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty((M, ng), dtype=torch.float32, device=x.device)
    per = _grid_groups(kind, ng, gs)
    warps = CHUNK_WARPS if kind in _GROUP_SIZE else _warps(M, block)
    wrap_triton(_act_quant_kernel)[(torch.sym_max(M, 1), triton.cdiv(ng, per))](
        x, x if up is None else up, data, scale, M, K, ng, x.stride(0), x.stride(0) if up is None else up.stride(0),
        scale.stride(0), scale.stride(1),
        SILU_MUL=up is not None, KIND=kind, BLOCK_G=per, GS=gs, STORE_F32=store_f32, FAKE=fake,
        RTZ=mxfp8.ROUNDS_TO_ZERO[x.dtype], **params(kind, x.dtype, x.device.type), num_warps=warps)
    return data, scale


@triton_op("mxpass::act_quant_triton", mutates_args=())
def act_quant_triton(x: torch.Tensor, up: torch.Tensor | None, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [M, K], scale) of x, or of silu(x) * up when up is given, in the activation
    encoding of the format named ``fmt``. Scales: float32 [M, 1] (per token) or [M, K // 128]
    (fp8-block: outer-dim-major, strides (1, M), where M is static and above 16); for MXFP8
    the E8M0 bytes [M, K // 32] as uint8 (Triton has no e8m0 type; ``view`` them as
    ``torch.float8_e8m0fnu``).

    Same values as ``mxpass.quant.quantize_activation(get_format(fmt), y, None)`` (module
    docstring). Rows may be strided (a slice of a wider tensor); M may be symbolic.
    """
    return launch(x, up, fmt)


@triton_op("mxpass::mx_fake_quant_triton", mutates_args=())
def mx_fake_quant_triton(x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, K % 32 == 0), or silu(x) * up when up is given, quantized to
    MXFP8 and dequantized, in x.dtype: the values of ``mxpass.schemes.mxfp8.fake_quantize``
    in one pass over each row (for a tensor no producer kernel can fuse this into, such as a
    MoE op's h, or one Inductor's code serves slowly, such as a SwiGLU's SiLU*mul). Differs
    from it only where a dequantized value is an fp32 subnormal (below 2**-126 in
    magnitude): Triton flushes it to 0; and in SiLU's fast ``exp`` (module docstring)."""
    if x.shape[-1] % mxfp8.BLOCK_SIZE:
        raise ValueError(f"mx_fake_quant_triton: K={x.shape[-1]} is not a multiple of {mxfp8.BLOCK_SIZE}")
    return launch(x, up, "mxfp8", fake=True)[0]
