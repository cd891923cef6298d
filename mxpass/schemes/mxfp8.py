"""MXFP8 reference numerics: OCP Microscaling Formats (MX) v1.0, E4M3 elements.

Layout (shapes: ... = leading dims, K = last dim, G = K // 32 blocks)
    data  [..., K]  torch.float8_e4m3fn   one element per input value
    scale [..., G]  torch.float8_e8m0fnu  one biased exponent byte per block of 32

    value = data * 2**(byte - 127)                      (OCP MX §5.4.1: E8M0, bias 127)

Scale rule (bit-identical to compressed-tensors' MXFP8 / MXFP8A16 presets,
``compressed_tensors.quantization.utils.mxfp_utils.generate_mx_scales``; the spec's
§6.3 takes floor(log2(amax)) - 8 without the round-up, so its byte can be one lower)
    amax  = max |x| over the block, taken exactly in float32
    E     = biased float32 exponent of amax, plus one when amax's significand is
            >= 1.75 (compressed-tensors rounds with the FP4 E2M1 mantissa width:
            ``round_to_power_2(amax, elem_mantissa=1)``)
    byte  = max(E - 8, 0)                               (8 = floor(log2(448)))

    With this rule |x| / 2**(byte - 127) < 448 for every finite block, so the
    clamp to +/-448 before the cast (kept, as compressed-tensors has it) never
    changes a finite value. A finite amax never gives byte 255: the largest
    float32 amax gives E = 255, byte 247.

Elements
    data = e4m3(clamp(x / scale, -448, 448)), round-to-nearest-even. compressed-tensors
    divides in x's dtype and then adds its zero point 0.0, so a quotient that
    underflows to +/-0 in x's dtype is stored as +0; this module does the same.

NaN / Inf
    Activations (``quantize``, ``fake_quantize``): a block holding NaN or +/-Inf gets
    scale byte 255, the E8M0 NaN (§5.4.1), so every value of that block dequantizes
    to NaN; other blocks are untouched and nothing raises. The block's data bytes
    are x / inf as compressed-tensors computes them: +0 for finite x, NaN (0x7F)
    for NaN/Inf x. Weights (``quantize_weight``): a non-finite value is an error.

Where compressed-tensors is undefined, this module picks the natural value:
    * amax >= 1.75 * 2**127 (or >= 57344 in fp16): compressed-tensors' power of two
      overflows to inf, giving a NaN scale and all-zero data; here byte = 247
      (fp16: 135) and the block quantizes normally.
    * fp16 amax below 2**-14 (fp16 subnormal): compressed-tensors rounds amax in fp16
      bits, where a subnormal has no leading 1, to 2**-14 or to 0, and for 0 its
      scale 2**-127 underflows fp16 and is replaced by 1; here the rule is applied to
      amax's float32 value, as for bf16/fp32.

Everything in ``quantize``, ``dequantize`` and ``fake_quantize`` is elementwise ATen
math plus one integer max per block: no ``.item()``, no branches on values, no
data-dependent shapes, so Inductor traces and fuses it. ``fake_quantize`` never builds
an e8m0 tensor; ``quantize`` makes its e8m0 scale with one ATen cast (see there).
"""

from typing import NamedTuple

import torch

BLOCK_SIZE = 32  # OCP MX §5.2 (Table 1): k = 32 for every concrete MX format
E4M3_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2**8
E8M0_BIAS = 127  # §5.4.1
E8M0_NAN = 255  # §5.4.1: 0b11111111 is NaN; E8M0 has no Inf and no zero

_E4M3_EMAX = 8  # floor(log2(E4M3_MAX)); the "- offset" of generate_mx_scales
_F32_MBITS = 23
# 1 << (23 - 1 - 1): added to amax's float32 bits, it carries into the exponent
# exactly when the significand is >= 1.75 (round_to_power_2 with E2M1's 1 bit).
_ROUND_UP_ADD = 1 << (_F32_MBITS - 2)
_F32_TWO_POW_M127 = 0x00400000  # bits of 2**-127, a float32 subnormal
# Half the smallest subnormal of the input dtype: a quotient at or below it rounds to
# 0 in that dtype (a tie goes to the even neighbour, 0). For float32 only exact zeros:
# the float32 multiply below already rounds as compressed-tensors' division does.
ROUNDS_TO_ZERO = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 0.0}
_INPUT_DTYPES = tuple(ROUNDS_TO_ZERO)


class MXTensor(NamedTuple):
    data: torch.Tensor  # [..., K] float8_e4m3fn
    scale: torch.Tensor  # [..., K // 32] float8_e8m0fnu


def _check_input(x: torch.Tensor, what: str = "input") -> None:
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"MXFP8: {what} has dtype {x.dtype}; expected bfloat16, float16 or float32"
        )
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        k = x.shape[-1] if x.dim() else None
        raise ValueError(
            f"MXFP8: {what} has shape {tuple(x.shape)}: K (last dim) = {k}, "
            f"but K must be a multiple of {BLOCK_SIZE}"
        )


def _scale_byte(blocks: torch.Tensor) -> torch.Tensor:
    """E8M0 byte per block, int32 [..., G], for float32 blocks [..., G, 32].

    The rule is monotone in |x|, so the byte of the block amax is the largest of the
    elements' own bytes, and NaN/Inf, mapped to 255, win over every finite byte. An
    integer max needs no NaN-propagation rule. It is taken in int32: a uint8 max fed
    by an int32->uint8 convert reads undefined vector lanes in Inductor's AVX-512 C++
    code (byte 1 instead of 0 for an all-zero block, torch 2.13).
    """
    mag = blocks.abs()
    finite = torch.isfinite(mag)
    bits = torch.where(finite, mag, 0.0).view(torch.int32)
    biased_exp = (bits + _ROUND_UP_ADD) >> _F32_MBITS  # 0..255, no int32 overflow
    byte = (biased_exp - _E4M3_EMAX).clamp(min=0)
    return torch.where(finite, byte, E8M0_NAN).amax(dim=-1)


def _byte_to_float(byte: torch.Tensor) -> torch.Tensor:
    """2**(byte - 127) in float32 from int32 bytes, exact; 0 -> 2**-127 (subnormal), 255 -> NaN."""
    pow2 = torch.where(byte == 0, _F32_TWO_POW_M127, byte << _F32_MBITS).view(torch.float32)
    return torch.where(byte == E8M0_NAN, float("nan"), pow2)


def _elements(blocks: torch.Tensor, byte: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3(clamp(x / 2**(byte - 127), +/-448)); float32 blocks [..., G, 32], int32 byte [..., G]"""
    finite = byte != E8M0_NAN
    # 1 / scale = 2**(127 - byte): float32 bits (254 - byte) << 23, normal for byte in
    # 0..247. NaN blocks use 0, i.e. x / inf as compressed-tensors computes it.
    inv_scale = torch.where(finite, (2 * E8M0_BIAS - byte) << _F32_MBITS, 0).view(torch.float32)
    q = blocks * inv_scale.unsqueeze(-1)  # a power-of-two multiply: exact above 2**-126
    # compressed-tensors divides in x's dtype, then adds its zero point 0.0, so whatever
    # rounds to +/-0 in x's dtype is stored as +0. Any other rounding to x's dtype only
    # happens in its subnormal range (below 2**-14 for fp16, 2**-126 for bf16), where
    # e4m3 gives +/-0 with the same sign anyway (its smallest step is 2**-9).
    q = torch.where(q.abs() <= ROUNDS_TO_ZERO[dtype], 0.0, q)
    q = q.clamp(-E4M3_MAX, E4M3_MAX)
    # One NaN (0x7F) for every NaN: a NaN's sign differs between paths (compressed-tensors'
    # depends on the dtype; Inductor's AVX-512 clamp returns NaN with the sign bit set).
    q = torch.where(q.isnan(), float("nan"), q)
    return q.to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor) -> MXTensor:
    """MXFP8 along the last dim: data [..., K] e4m3, scale [..., K // 32] e8m0.

    A block holding NaN/Inf gets scale byte 255 (NaN); other blocks are unaffected.
    """
    _check_input(x)
    blocks = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    byte = _scale_byte(blocks)
    data = _elements(blocks, byte, x.dtype).flatten(-2)
    # The e8m0 tensor is an ATen cast of the exact power of two, not a uint8 view:
    # Inductor's C++ backend has no e8m0 type, and a view fused into a kernel fails
    # with "float8_e8m0fnu missing from DTYPE_TO_CPP" (torch 2.13). The cast runs as
    # one small separate op over the K / 32 scales.
    return MXTensor(data, _byte_to_float(byte).to(torch.float8_e8m0fnu))


def quantize_weight(w: torch.Tensor, name: str) -> MXTensor:
    """``quantize`` for a weight: a non-finite value or K % 32 != 0 is an error naming ``name``."""
    _check_input(w, what=f"weight {name!r}")
    nonfinite = int((~torch.isfinite(w)).sum())
    if nonfinite:
        raise ValueError(
            f"MXFP8: weight {name!r} has {nonfinite} non-finite values (NaN/Inf); "
            "refusing to quantize it"
        )
    return quantize(w)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (float8_e8m0fnu or uint8) -> float32 2**(byte - 127); byte 255 -> NaN."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise TypeError(
            f"MXFP8: scale has dtype {scale.dtype}; expected float8_e8m0fnu or uint8"
        )
    return _byte_to_float(scale.view(torch.uint8).to(torch.int32))


def dequantize(
    data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """data [..., K] e4m3 * 2**(byte - 127) of scale [..., K // 32], in float32, cast to dtype."""
    if data.dtype != torch.float8_e4m3fn:
        raise TypeError(f"MXFP8: data has dtype {data.dtype}; expected float8_e4m3fn")
    if data.shape[:-1] != scale.shape[:-1] or data.shape[-1] != BLOCK_SIZE * scale.shape[-1]:
        raise ValueError(
            f"MXFP8: data {tuple(data.shape)} and scale {tuple(scale.shape)} do not match "
            f"(one scale per {BLOCK_SIZE} elements of the last dim)"
        )
    blocks = data.float().unflatten(-1, (-1, BLOCK_SIZE))
    return (blocks * scale_to_float(scale).unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """``dequantize(*quantize(x), x.dtype)`` bit for bit, without building e8m0 tensors."""
    _check_input(x)
    blocks = x.float().unflatten(-1, (-1, BLOCK_SIZE))
    byte = _scale_byte(blocks)
    q = _elements(blocks, byte, x.dtype)
    return (q.float() * _byte_to_float(byte).unsqueeze(-1)).flatten(-2).to(x.dtype)
