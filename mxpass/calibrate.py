"""Static activation scales for the static schemes, measured on sample inputs.

    scales = mxpass.calibrate(model, batches, scheme="fp8")
    fast = torch.compile(model, backend=mxpass.backend(scheme="fp8", activation_scales=scales))

Runs the model eagerly, records max |input| of every module whose forward takes the
activation of a 2-D weight (``nn.Linear`` and GPT-2's ``Conv1D``), and turns it into the
per-tensor scale of the scheme's activation format: amax / 448 (FP8 e4m3) or
amax / 127.5 (INT8, compressed-tensors' symmetric divisor), in float32.
"""

from __future__ import annotations

from typing import Iterable

import torch

from mxpass.formats import get_format
from mxpass.schemes import fp8, int8

_QMAX = {"fp8": fp8.E4M3_MAX, "int8": int8.HALF_RANGE}


def _linear_like(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.nn.Parameter) and w.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def calibrate(model: torch.nn.Module, batches: Iterable, scheme: str) -> dict[str, float]:
    """{module path: static activation scale} over ``batches`` (each a tensor, tuple or dict of inputs)."""
    fmt = get_format(scheme)
    if not fmt.static_activation:
        raise ValueError(f"mxpass.calibrate: scheme {scheme!r} has no static activation scale to calibrate")
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def record(_module, args):
            x = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return record

    for name, module in model.named_modules():
        if _linear_like(module):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("mxpass.calibrate: no batches given")
    qmax = _QMAX[fmt.family]
    # an all-zero activation would give scale 0: use the smallest normal float32 instead
    return {name: max(a.item() / qmax, torch.finfo(torch.float32).tiny) for name, a in amax.items()}
