"""Lazy access to a checkpoint's safetensors files (one file, or shards with an index).

Names, shapes and dtypes come from the headers; data is read one tensor at a time, on the
CPU (memory-mapped), so the caller decides what reaches the device and in which dtype.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

# safetensors header dtype names (the safetensors format specification)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def has_weights(path: str) -> bool:
    return os.path.exists(os.path.join(path, INDEX)) or os.path.exists(os.path.join(path, SINGLE))


class SafetensorsIndex:
    """:class:`~mxpass.checkpoint.plan.TensorIndex` over the safetensors files in ``path``."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, SINGLE)):
            weight_map = None
        else:
            raise FileNotFoundError(f"mxpass.checkpoint: no {SINGLE} or {INDEX} in {path}")
        self.path = path
        self._files: dict[str, object] = {}
        for name in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"mxpass.checkpoint: {INDEX} names {name}, which is not in {path}")
            try:
                self._files[name] = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"mxpass.checkpoint: cannot read {file} (truncated or not a "
                                 f"safetensors file?): {e}") from None
        stored = {k: name for name, f in self._files.items() for k in f.keys()}
        if weight_map is not None:
            for key, name in weight_map.items():
                if stored.get(key) != name:
                    raise ValueError(f"mxpass.checkpoint: {INDEX} places tensor {key!r} in {name}, "
                                     "which does not hold it")
        self.where = {k: stored[k] for k in (weight_map or stored)}
        self.stored = {k: k for k in self.where}  # name -> the key in its file
        self.read: set[str] = set()

    def rename(self, fn) -> None:
        """Use ``fn(stored key)`` as every tensor's name (transformers' renamings)."""
        where, stored = {}, {}
        for name, file in self.where.items():
            new = fn(name)
            if new in where:
                raise ValueError(f"mxpass.checkpoint: tensors {stored[new]!r} and {name!r} both become "
                                 f"{new!r} under transformers' renaming for this model")
            where[new], stored[new] = file, self.stored[name]
        self.where, self.stored = where, stored

    def source_name(self, name: str) -> str:
        """The key a (renamed) tensor has in its file."""
        return self.stored.get(name, name)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def _slice(self, name: str):
        return self._files[self.where[name]].get_slice(self.stored[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise TypeError(f"mxpass.checkpoint: tensor {name!r} has safetensors dtype {code}, "
                            "which torch has no equivalent for")
        return _DTYPES[code]

    def nbytes(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n * self.dtype(name).itemsize

    def get(self, name: str) -> torch.Tensor:
        """The tensor, on the CPU. Every name was checked against the headers before."""
        self.read.add(name)
        try:
            return self._files[self.where[name]].get_tensor(self.stored[name])
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"mxpass.checkpoint: cannot read tensor {self.stored[name]!r} from "
                             f"{self.where[name]} (truncated file?): {e}") from None
