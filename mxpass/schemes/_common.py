"""Helpers shared by the FP8 and INT8 scheme modules (float32 scales, compressed-tensors rules)."""

import torch

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def round_to(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 v rounded (nearest-even) to dtype's precision, kept in float32.

    Equals ``v.to(dtype).float()`` for every v whose dtype value is finite (fp16 values
    from 65520 up stay finite here instead of becoming Inf; every caller clamps them to
    the same end of the quantized range); a NaN stays NaN (its payload may differ). Not
    written as ``.to(dtype).float()``: Inductor drops that round trip inside a fused kernel
    (``pointless_convert``; its Triton code keeps bf16 values in float32), and a bitcast to
    int16 and back is folded away too. bf16: the hardware conversion, then float32 from its
    bits by a 16-bit shift (three instructions); fp16: integer emulation of the rounding.
    """
    if dtype == torch.float32:
        return v
    if dtype == torch.bfloat16:
        return (v.to(torch.bfloat16).view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    nan = v.isnan()
    bits = torch.where(nan, 0.0, v).view(torch.int32)
    # round_to_nearest_even on the 13 float32 mantissa bits fp16 lacks: add 0xFFF plus the
    # lowest kept bit, truncate (no int32 overflow for non-NaN bits)
    bias = ((bits >> 13) & 1) + 0xFFF
    r = ((bits + bias) & -(1 << 13)).view(torch.float32)
    # below fp16's smallest normal the step is fixed: round to a multiple of 2**-24
    sub = torch.round(v * 2.0**24) * 2.0**-24
    r = torch.where(v.abs() < 2.0**-14, sub, r)
    return torch.where(nan, v, r)


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
