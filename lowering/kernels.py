"""The kernel candidates of the registry, in order of preference per (op, format).

Order is decided by measurements (docs/performance.md): on sm_90 the Triton MXFP8 kernel
against cuBLAS bf16; the reference is always last and always available.
"""

from __future__ import annotations

import importlib.util

import torch

from mxpass.formats import Format
from mxpass.lowering.registry import Kernel, Problem, RegistryKey
from mxpass.schemes.linear import mxfp8_linear_reference


class ReferenceLinear:
    """Dequantize + fp32 matmul in ATen ops; Inductor compiles it (CPU, or anywhere)."""

    name = "reference"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        return True, ""

    def run(self, x, qweight, wscale, bias, fmt: Format):
        # activation quantization was applied by the caller (so that it fuses upstream)
        return mxfp8_linear_reference(x, qweight, wscale, bias, quantize_activation=False)


class TritonMXFP8Linear:
    """Triton MXFP8 x bf16/fp16 GEMM (weights dequantized in-kernel), small-M and large-M paths."""

    name = "triton_mxfp8"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"needs a CUDA device, got {device.type}"
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        cap = torch.cuda.get_device_capability(device)
        # e4m3 conversions in hardware arrive with sm_89 (Ada) and sm_90 (Hopper)
        if cap < (8, 9):
            return False, f"needs compute capability >= 8.9 for e4m3, device has {cap[0]}.{cap[1]}"
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.dtype not in (torch.bfloat16, torch.float16):
            return False, f"activations must be bf16 or fp16, got {problem.dtype}"
        if problem.k % 32:
            return False, f"K={problem.k} is not a multiple of 32"
        return True, ""

    def run(self, x, qweight, wscale, bias, fmt: Format):
        from mxpass.kernels.triton import mxfp8_linear  # noqa: F401  (registers the op)

        return torch.ops.mxpass.mxfp8_linear_triton(x, qweight, wscale, bias)


def candidates() -> dict[RegistryKey, list[Kernel]]:
    mx = [TritonMXFP8Linear(), ReferenceLinear()]
    return {
        RegistryKey("linear", "mxfp8"): mx,
        RegistryKey("linear", "mxfp8-w"): mx,
    }
