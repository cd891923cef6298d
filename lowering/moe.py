"""Lowering of ``mxpass::moe`` for Inductor: the reference math, traced into the graph.

Each ``mxpass::moe`` node becomes a call of :func:`moe_lowered` before AOTAutograd traces
the graph (``lowering/nodes.py``, as for linears): per-expert dequantization, the
activation quantization of both expert inputs, two batched fp32 matmuls over all experts
and a gather of each token's A results, all ATen ops that Inductor compiles and fuses. No
kernel registry entry yet: this is the CPU path; GPU MoE kernels will be registry candidates.
Routing ids outside [0, E) hit the bounds check Inductor generates for the gather.
"""

from __future__ import annotations

from mxpass.formats import get_format
from mxpass.ops import moe_reference


def moe_lowered(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: str, activation: str):
    """What an ``mxpass::moe`` node becomes; an MX scale may be its uint8 storage."""
    return moe_reference(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, get_format(fmt), activation)
