"""Lowering of ``mxpass::moe`` for Inductor: the kernel the registry picks.

Each ``mxpass::moe`` node becomes a call of :func:`moe_lowered` before AOTAutograd traces
the graph (``lowering/nodes.py``, as for linears), so what the chosen kernel's ``run``
does is traced like model code:

- ``triton_moe_w8a8`` (CUDA, sm_89+; per-token e4m3 / int8 activations with channel / tensor
  weight scales: fp8-dynamic, int8): ``mxpass::moe_fused_triton`` quantizing x and h inside
  its kernels (prep kernel: x's quantization and the routing alignment; gate/up grouped GEMM
  with SiLU*mul, its last program per tile quantizing h; e4m3 / int8 down GEMM with the
  routed-weight multiply and top-k sum).
- ``triton_moe`` (CUDA, sm_89+; every format): weight-only formats as the same fused op
  without quantization; W8A8 formats with the format's activation quantization of x,
  ``mxpass::moe_gate_up_triton``, the activation quantization of h,
  ``mxpass::moe_down_triton``: the reference's numerics. MXFP8 quantizes x and h by
  ``mxpass::mx_fake_quant_triton`` (one Triton pass each); other formats as ATen math (x's
  fuses into its producer).
  All are ``triton_op``s, so Inductor launches their kernels from its generated code
  (``kernels/triton/moe.py``).
- ``reference`` (any device): per-expert dequantization, both activation quantizations,
  two batched fp32 matmuls over all experts and a gather of each token's A results, all
  ATen ops that Inductor compiles. Routing ids outside [0, E) hit the bounds check
  Inductor generates for the gather.

The choice is recorded in the Report by the MoE pass (``mxpass.backend``).
"""

from __future__ import annotations

from mxpass.formats import get_format
from mxpass.lowering.registry import Problem, choose


def moe_problem(fmt, device, hidden: int, inter: int, dtype) -> Problem:
    """The registry's description of one MoE layer: k = H (hidden), n = I (expert intermediate)."""
    return Problem("moe", fmt, device, hidden, inter, dtype)


def moe_lowered(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, fmt: str, activation: str):
    """What an ``mxpass::moe`` node becomes; an MX scale may be its uint8 storage."""
    f = get_format(fmt)
    _, hidden, inter = w2.shape
    choice = choose(moe_problem(f, x.device, hidden, inter, x.dtype))
    return choice.kernel.run(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, f, activation)
