"""Helpers shared by the FP8 and INT8 scheme modules (float32 scales, compressed-tensors rules)."""

import torch

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP16_MIN_NORMAL = 2.0**-14
_FP16_SUBNORMAL_STEP = 2.0**-24


def round_to(v: torch.Tensor, dtype: torch.dtype, keep_nan: bool = True) -> torch.Tensor:
    """float32 v rounded (nearest-even) to dtype's precision, kept in float32.

    Equals ``v.to(dtype).float()`` for every v whose dtype value is finite (fp16 values
    from 65520 up stay finite here instead of becoming Inf; every caller clamps them to
    the same end of the quantized range). Integer bit math, so Inductor cannot drop it.
    ``keep_nan=False``: a NaN comes out as an arbitrary value, for callers that replace
    NaN positions themselves (three fewer instructions per element in a fused kernel).
    """
    if dtype == torch.float32:
        return v
    drop = 16 if dtype == torch.bfloat16 else 13  # float32 mantissa bits the dtype lacks
    nan = v.isnan() if keep_nan else None
    bits = (torch.where(nan, 0.0, v) if keep_nan else v).view(torch.int32)
    # c10::BFloat16's round_to_nearest_even: add 0x7FFF plus the lowest kept bit, truncate.
    # No int32 overflow for non-NaN bits: +/-Inf and the largest finite values stay below.
    bias = ((bits >> drop) & 1) + ((1 << (drop - 1)) - 1)
    r = ((bits + bias) & -(1 << drop)).view(torch.float32)
    if dtype == torch.float16:
        # below fp16's smallest normal the step is fixed: round to a multiple of 2**-24
        sub = torch.round(v * (1 / _FP16_SUBNORMAL_STEP)) * _FP16_SUBNORMAL_STEP
        r = torch.where(v.abs() < _FP16_MIN_NORMAL, sub, r)
    return torch.where(nan, v, r) if keep_nan else r


def check_dtype(x: torch.Tensor, what: str, family: str) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{family}: {what} has dtype {x.dtype}; expected bfloat16, float16 or float32")


def check_granularity(granularity: str, allowed: tuple[str, ...], what: str, family: str) -> None:
    if granularity not in allowed:
        raise ValueError(f"{family}: {what} granularity {granularity!r}; expected one of {allowed}")


def check_weight(w: torch.Tensor, what: str, family: str) -> None:
    """A weight to quantize: 2-D [N, K] of a float dtype, every value finite (NaN/Inf would
    poison a whole scale group, so they are refused, naming the tensor)."""
    check_dtype(w, what, family)
    if w.dim() != 2:
        raise ValueError(f"{family}: {what} has shape {tuple(w.shape)}; expected a 2-D [N, K] weight")
    nonfinite = int((~torch.isfinite(w)).sum())
    if nonfinite:
        raise ValueError(f"{family}: {what} has {nonfinite} non-finite values (NaN/Inf); refusing to quantize it")
