"""The kernel candidates of the registry, in order of preference per (op, format).

Each kernel's ``run`` receives the raw activation [M, K] and applies the format's
activation quantization itself (as ATen math, which Inductor fuses into the producer):
fake-quantized for kernels that compute on dequantized values, really quantized for the
cuBLAS FP8 kernels. Order is decided by measurement (docs/performance.md); the reference is
always last and always available.
"""

from __future__ import annotations

import importlib.util

import torch

from mxpass import quant
from mxpass.formats import Format, format_names, get_format
from mxpass.lowering.registry import Kernel, Problem, RegistryKey


def _cuda_capability(device: torch.device, need: tuple[int, int], what: str) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"needs a CUDA device, got {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        return False, f"needs compute capability >= {need[0]}.{need[1]} for {what}, device has {cap[0]}.{cap[1]}"
    return True, ""


class ReferenceLinear:
    """Fake-quantized activation, dequantized weight, fp32 matmul, in ATen ops (any device)."""

    name = "reference"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        return True, ""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        return quant.linear_reference(x, qweight, wscale, bias, act_scale, fmt)


class TritonMXFP8Linear:
    """Triton MXFP8 x bf16/fp16 GEMM (weights dequantized in-kernel), small-M and large-M paths."""

    name = "triton_mxfp8"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        # e4m3 conversions in hardware arrive with sm_89 (Ada) and sm_90 (Hopper)
        return _cuda_capability(device, (8, 9), "e4m3")

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.dtype not in (torch.bfloat16, torch.float16):
            return False, f"activations must be bf16 or fp16, got {problem.dtype}"
        return True, ""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        from mxpass.kernels.triton import mxfp8_linear  # noqa: F401  (registers the op)

        x = quant.fake_quantize_activation(fmt, x, act_scale)
        return torch.ops.mxpass.mxfp8_linear_triton(x, qweight, wscale, bias)


class ScaledMMLinear:
    """cuBLAS FP8 GEMM through ``torch._scaled_mm``: rowwise (per-token x per-channel) or
    tensorwise (per-tensor x per-tensor) scales; the activation is really quantized to e4m3."""

    def __init__(self, mode: str):
        self.mode = mode
        self.name = f"cublas_scaled_mm_{mode}"

    def is_supported(self, device: torch.device) -> tuple[bool, str]:
        return _cuda_capability(device, (8, 9), "FP8 tensor cores")

    def can_implement(self, problem: Problem) -> tuple[bool, str]:
        if problem.dtype not in (torch.bfloat16, torch.float16) or (
                self.mode == "rowwise" and problem.dtype != torch.bfloat16):
            return False, f"{self.mode} scaling needs {'bf16' if self.mode == 'rowwise' else 'bf16/fp16'} output, got {problem.dtype}"
        if problem.k % 16 or problem.n % 16:
            return False, f"K={problem.k} and N={problem.n} must be multiples of 16"
        return True, ""

    def run(self, x, qweight, wscale, bias, act_scale, fmt: Format):
        xq, xs = quant.quantize_activation(fmt, x, act_scale)
        if self.mode == "rowwise":
            scale_a, scale_b = xs.reshape(-1, 1), wscale.reshape(1, -1)
        else:
            scale_a, scale_b = xs.reshape(()), wscale.reshape(())
        y = torch._scaled_mm(xq, qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=x.dtype)
        return y if bias is None else y + bias


def candidates() -> dict[RegistryKey, list[Kernel]]:
    ref = ReferenceLinear()
    table: dict[RegistryKey, list[Kernel]] = {}
    for name in format_names():
        f = get_format(name)
        if f.family == "mxfp8":
            kernels = [TritonMXFP8Linear(), ref]
        elif f.name == "fp8-dynamic":
            kernels = [ScaledMMLinear("rowwise"), ref]
        elif f.name == "fp8":
            kernels = [ScaledMMLinear("tensorwise"), ref]
        else:  # fp8-block, W8A16 FP8, INT8: the reference only, for now
            kernels = [ref]
        table[RegistryKey("linear", name)] = kernels
    return table
