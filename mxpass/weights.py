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


def _cached(param: torch.Tensor, key: tuple, name: str, compute):
    """``compute(param.detach())`` for this Parameter and key, recomputed only if the
    Parameter changed in place since (its ``_version``)."""
    entries = _CACHE.setdefault(param, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == param._version:
        return hit[1]
    if prequantized_scheme(param) is not None:
        raise ValueError(
            f"{name}: this weight was loaded quantized from a checkpoint as {prequantized_scheme(param)!r} "
            f"and has no data of its own; compile with scheme={prequantized_scheme(param)!r} "
            f"(asked for {key[0]!r})")
    if param.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device (no data to quantize)")
    with torch.no_grad():
        q = compute(param.detach())
    entries[key] = (param._version, q)
    return q


def quantized_weight(param: torch.Tensor, fmt: Format, transposed: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of ``param`` quantized in ``fmt`` as an [N, K] weight (``transposed``: param is [K, N])."""
    def compute(w):
        return quant.quantize_weight(fmt, (w.t() if transposed else w).contiguous(), name)

    return _cached(param, (fmt.name, transposed), name, compute)


def seed_quantized_weight(param: torch.Tensor, fmt: Format, transposed: bool,
                          data: torch.Tensor, scale: torch.Tensor) -> None:
    """Make :func:`quantized_weight` return ``(data, scale)`` for ``param`` without computing it.

    For weights that arrive already quantized (a checkpoint): ``param`` may be a stand-in on
    the ``meta`` device, since a seeded entry is returned before its data would be read.
    The entry holds while ``param`` is not modified in place.
    """
    _CACHE.setdefault(param, {})[(fmt.name, transposed)] = (param._version, (data, scale))
    param._mxpass_prequantized = fmt.name  # a stand-in: no data of its own


def prequantized_scheme(param: torch.Tensor) -> str | None:
    """The scheme a checkpoint stand-in was seeded with, or None for an ordinary weight."""
    return getattr(param, "_mxpass_prequantized", None)


def quantized_experts(param: torch.Tensor, fmt: Format, name: str,
                      rows: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [E, N, K], scale [E, ...]) of a 3-D experts weight ``param`` [E, N, K], each
    expert's [N, K] slice quantized as a 2-D weight in ``fmt``.

    ``rows`` reorders every slice's rows first (a gate/up layout brought to [gate; up]);
    ``None`` keeps them. Cached like :func:`quantized_weight`.
    """
    def compute(w):
        if rows is not None:
            w = w[:, list(rows)]
        parts = [quant.quantize_weight(fmt, w[e].contiguous(), f"{name}[{e}]") for e in range(w.shape[0])]
        return torch.stack([d for d, _ in parts]), torch.stack([s for _, s in parts])

    return _cached(param, (fmt.name, "experts", rows), name, compute)


def cache_size() -> int:
    """Number of (Parameter, format) entries alive (for tests)."""
    return sum(len(v) for v in _CACHE.values())
