"""Quantized weights, computed once per Parameter and cached (weakly keyed).

A recompile (new shapes, a second graph) finds the same tensors, so quantized copies are
never duplicated. An entry is recomputed if the Parameter was modified in place since, or
its data replaced (``p.data = ...``, ``module.to(...)``).

Weights loaded by ``mxpass.load`` also carry where they came from (:class:`Origin`): a
stand-in seeded with a checkpoint's quantized tensors (its format and static input scale),
or a weight the load left in the model dtype (and why). The passes read it to pick each
layer's format when the backend was given no scheme.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mxpass.formats import Format
from mxpass import quant

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MERGED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ORIGIN: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class Origin:
    """Where a loaded weight came from.

    scheme      -- format the weight was seeded with (a stand-in without data), or None
    input_scale -- static per-tensor activation scale stored with it (static formats)
    kept        -- why the load left it in the model dtype ("unquantized in the checkpoint")
    """

    scheme: str | None = None
    input_scale: float | None = None
    kept: str | None = None


def origin(param: torch.Tensor) -> Origin | None:
    """How ``param`` was loaded by ``mxpass.load`` (None for an ordinary weight)."""
    return _ORIGIN.get(param)


def mark_kept(param: torch.Tensor, reason: str) -> None:
    """Record that a load left ``param`` in the model dtype, and why."""
    _ORIGIN[param] = Origin(kept=reason)


def _stamp(t: torch.Tensor) -> tuple:
    """What a cache entry computed from ``t`` is valid for: its version counter (in-place
    changes), and for a weight with data of its own also where that data lives, its dtype and
    device (``p.data = ...`` and ``module.to(...)`` replace the data without counting a
    version). A checkpoint stand-in has no data: its version only."""
    if prequantized_scheme(t) is not None:
        return (t._version,)
    return (t._version, t.data_ptr(), t.dtype, t.device)


def _cached(param: torch.Tensor, key: tuple, name: str, compute):
    """``compute(param.detach())`` for this Parameter and key, recomputed only if the
    Parameter changed since (:func:`_stamp`)."""
    entries = _CACHE.setdefault(param, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == _stamp(param):
        return hit[1]
    if prequantized_scheme(param) is not None:
        raise ValueError(
            f"{name}: this weight was loaded quantized from a checkpoint as {prequantized_scheme(param)!r} "
            f"and has no data of its own; compile with scheme={prequantized_scheme(param)!r} or with "
            f"no scheme (asked for {key[0]!r})")
    if param.device.type == "meta":
        raise ValueError(f"{name}: weight is on the meta device (no data to quantize)")
    with torch.no_grad():
        q = compute(param.detach())
    entries[key] = (_stamp(param), q)
    return q


def quantized_weight(param: torch.Tensor, fmt: Format, transposed: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of ``param`` quantized in ``fmt`` as an [N, K] weight (``transposed``: param is [K, N])."""
    def compute(w):
        return quant.quantize_weight(fmt, (w.t() if transposed else w).contiguous(), name)

    return _cached(param, (fmt.name, transposed), name, compute)


def _stacked(first: torch.Tensor, others: list[torch.Tensor], key: tuple, compute):
    """``compute()`` cached on ``first`` under ``key``; recomputed when ``first`` or any of
    ``others`` (held weakly, compared by identity) changed in place since."""
    versions = tuple(_stamp(t) for t in (first, *others))
    hit = _MERGED.get(first, {}).get(key)
    if hit is not None and hit[0] == versions and all(r() is t for r, t in zip(hit[1], others)):
        return hit[2]
    out = compute()
    _MERGED.setdefault(first, {})[key] = (versions, tuple(weakref.ref(t) for t in others), out)
    return out


def merged_weight(params: list[torch.Tensor], fmt: Format, transposed: list[bool],
                  names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scale) of several weights that read the same input (q/k/v, gate/up), their
    quantized rows stacked in order: one [sum N, K] weight for one GEMM.

    Only for formats whose scales belong to output rows (per channel, MX, 128-row blocks
    that each weight fills). Each weight's own entry (:func:`quantized_weight`) becomes
    its rows of the stacked tensors, so the quantized bytes exist once. Cached on the first
    Parameter, recomputed when any of them changed in place.
    """
    def compute():
        parts = [quantized_weight(p, fmt, t, n) for p, t, n in zip(params, transposed, names)]
        data = torch.cat([d for d, _ in parts])
        scale = torch.cat([s for _, s in parts])
        row = srow = 0
        for p, t, (d, sc) in zip(params, transposed, parts):
            _CACHE[p][(fmt.name, t)] = (_stamp(p), (data[row:row + d.shape[0]], scale[srow:srow + sc.shape[0]]))
            row, srow = row + d.shape[0], srow + sc.shape[0]
        return data, scale

    key = (fmt.name, tuple(transposed), tuple(id(p) for p in params[1:]))
    return _stacked(params[0], params[1:], key, compute)


def merged_bias(biases: list[torch.Tensor | None], rows: list[int], like: torch.Tensor) -> torch.Tensor:
    """The biases of merged layers stacked (zeros for a layer without one), cached on the first
    bias given and recomputed when any of them changed in place."""
    def compute():
        with torch.no_grad():
            return torch.cat([b.detach().reshape(-1) if b is not None else like.new_zeros(n)
                              for b, n in zip(biases, rows)])

    given = [b for b in biases if b is not None]
    return _stacked(given[0], given[1:], (tuple(id(b) for b in biases), tuple(rows)), compute)


def seed_quantized_weight(param: torch.Tensor, fmt: Format, transposed: bool,
                          data: torch.Tensor, scale: torch.Tensor,
                          input_scale: float | None = None) -> None:
    """Make :func:`quantized_weight` return ``(data, scale)`` for ``param`` without computing it.

    For weights that arrive already quantized (a checkpoint): ``param`` is a stand-in with
    no data of its own, since a seeded entry is returned before its data would be read.
    ``input_scale``: the static per-tensor activation scale stored with it (static formats).
    The entry holds while ``param`` is not modified in place.
    """
    _ORIGIN[param] = Origin(scheme=fmt.name, input_scale=input_scale)
    _CACHE.setdefault(param, {})[(fmt.name, transposed)] = (_stamp(param), (data, scale))


def seed_quantized_experts(param: torch.Tensor, fmt: Format, rows: tuple[int, ...] | None,
                           data: torch.Tensor, scale: torch.Tensor) -> None:
    """:func:`seed_quantized_weight` for a 3-D experts weight: :func:`quantized_experts`
    returns ``(data [E, N, K], scale [E, ...])`` for ``param`` with this ``rows``."""
    _ORIGIN[param] = Origin(scheme=fmt.name)
    _CACHE.setdefault(param, {})[(fmt.name, "experts", rows)] = (_stamp(param), (data, scale))


def prequantized_scheme(param: torch.Tensor) -> str | None:
    """The scheme a checkpoint stand-in was seeded with, or None for an ordinary weight."""
    o = _ORIGIN.get(param)
    return o.scheme if o is not None else None


def prequantized_input_scale(param: torch.Tensor) -> float | None:
    """The static input scale a checkpoint stored with a seeded stand-in, if any."""
    o = _ORIGIN.get(param)
    return o.input_scale if o is not None else None


def kept_reason(param: torch.Tensor) -> str | None:
    """Why ``mxpass.load`` left this weight in the model dtype (None: it did not say)."""
    o = _ORIGIN.get(param)
    return o.kept if o is not None else None


def cached_weights(param: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{format name: (data, scale)} of the valid [N, K] (not transposed) entries of ``param``."""
    entries = _CACHE.get(param) or {}
    return {key[0]: q for key, (version, q) in entries.items()
            if len(key) == 2 and key[1] is False and version == _stamp(param)}


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


def cache_keys(param: torch.Tensor) -> list[tuple]:
    """The keys of ``param``'s entries: (format, transposed) or (format, "experts", rows)."""
    return list((_CACHE.get(param) or {}).keys())


def cache_size() -> int:
    """Number of (Parameter, format) entries alive (for tests)."""
    return sum(len(v) for v in _CACHE.values())


def record_input_scale(param: torch.Tensor, fmt: Format, value: float) -> None:
    """Remember the static input scale a compile used with ``param`` in ``fmt`` (``mxpass.save``
    writes it beside the weight)."""
    _INPUT_SCALES.setdefault(param, {})[fmt.name] = float(value)


def input_scale(param: torch.Tensor, fmt: Format) -> float | None:
    """The static input scale of ``param`` in ``fmt``: the one a compile used, else the one
    stored with a loaded weight."""
    used = (_INPUT_SCALES.get(param) or {}).get(fmt.name)
    if used is not None:
        return used
    o = _ORIGIN.get(param)
    return o.input_scale if o is not None and o.scheme == fmt.name else None


_INPUT_SCALES: WeakIdKeyDictionary = WeakIdKeyDictionary()
