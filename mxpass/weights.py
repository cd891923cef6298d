"""Quantized weights, computed once per Parameter and cached (weakly keyed).

A recompile (new shapes, a second graph) finds the same tensors, so quantized copies are
never duplicated. An entry is recomputed if the Parameter was modified in place since.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mxpass.formats import Format
from mxpass import quant

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def quantized_weight(param: torch.Tensor, fmt: Format, transposed: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of ``param`` quantized in ``fmt`` as an [N, K] weight (``transposed``: param is [K, N])."""
    entries = _CACHE.setdefault(param, {})
    key = (fmt.name, transposed)
    hit = entries.get(key)
    if hit is not None and hit[0] == param._version:
        return hit[1]
    if param.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device (no data to quantize)")
    with torch.no_grad():
        w = param.detach()
        if transposed:
            w = w.t()
        q = quant.quantize_weight(fmt, w.contiguous(), name)
    entries[key] = (param._version, q)
    return q


def quantized_experts(param: torch.Tensor, fmt: Format, name: str,
                      rows: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [E, N, K], scale [E, ...]) of a 3-D experts weight ``param`` [E, N, K], each
    expert's [N, K] slice quantized as a 2-D weight in ``fmt``.

    ``rows`` reorders every slice's rows first (a gate/up layout brought to [gate; up]);
    ``None`` keeps them. Cached like :func:`quantized_weight`.
    """
    entries = _CACHE.setdefault(param, {})
    key = (fmt.name, "experts", rows)
    hit = entries.get(key)
    if hit is not None and hit[0] == param._version:
        return hit[1]
    if param.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device (no data to quantize)")
    with torch.no_grad():
        w = param.detach()
        if rows is not None:
            w = w[:, list(rows)]
        parts = [quant.quantize_weight(fmt, w[e].contiguous(), f"{name}[{e}]") for e in range(w.shape[0])]
        q = (torch.stack([d for d, _ in parts]), torch.stack([s for _, s in parts]))
    entries[key] = (param._version, q)
    return q


def cache_size() -> int:
    """Number of (Parameter, format) entries alive (for tests)."""
    return sum(len(v) for v in _CACHE.values())
