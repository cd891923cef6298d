"""Checkpoints: load pre-quantized (or quantize while loading) and save compressed-tensors.

    model = mxpass.load("path/to/checkpoint", device="cuda")   # an unmodified HF model
    fast = torch.compile(model, backend=mxpass.backend)          # scheme from the checkpoint
    mxpass.checkpoint.info(model)                                # what the load did
    mxpass.save(fast, "out/")                                    # a compressed-tensors checkpoint

Files: ``plan.py`` (the reader interface), ``loader.py`` (the loader core),
``compressed_tensors.py`` (the compressed-tensors reader), ``tensors.py`` (safetensors),
``save.py`` (the compressed-tensors writer).
User guide: docs/checkpoints.md.
"""

from mxpass.checkpoint.compressed_tensors import format_for_scheme, read_quantization_config
from mxpass.checkpoint.loader import EagerCallError, LoadInfo, info, load
from mxpass.checkpoint.save import save
from mxpass.checkpoint.plan import (ExpertsPlan, LayerPlan, Plan, Reader, ScaleLayout, TensorIndex,
                                    mxpass_scale, reader_for, readers)

__all__ = [
    "EagerCallError", "ExpertsPlan", "LayerPlan", "LoadInfo", "Plan", "Reader", "ScaleLayout", "TensorIndex",
    "format_for_scheme", "info", "load", "mxpass_scale", "read_quantization_config", "reader_for",
    "readers", "save",
]
