"""FP8 schemes on the GPU: the cuBLAS kernels against the reference kernel, through the backend."""

import pytest
import torch

import mxpass
from tests.conftest import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("scheme,kernel", [("fp8-dynamic", "cublas_scaled_mm_rowwise"),
                                           ("fp8", "cublas_scaled_mm_tensorwise"),
                                           ("int8", "triton_int8_mm"), ("int8-static", "triton_int8_mm"),
                                           ("fp8-block", "cublas_scaled_mm_blockwise"), ("fp8-w", "triton_w8"),
                                           ("fp8-w-block", "triton_w8")])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_kernel_matches_reference_kernel(monkeypatch, scheme, kernel, tokens):
    """RMSNorm -> linear(+bias). Same quantized values on both sides (the reference fake-
    quantizes what cuBLAS receives quantized); cuBLAS accumulates in its own order and rounds
    to bf16 (2**-9 relative); the large-M scratch of block scales also rounds dequantized
    values to bf16 (2**-9 each): 2**-7 is generous, a wrong scale layout gives ~1.
    fp8-block's activation is quantized by act_quant_triton from the RMSNorm's bf16 output,
    as eager PyTorch rounds it, where the reference kernel's graph quantizes Inductor's
    unrounded float32 (1.2-1.5e-2 apart, measured): its reference is the mxpass reference
    run op by op (compiler="eager")."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(LlamaRMSNorm(512), torch.nn.Linear(512, 1024)).cuda().bfloat16()
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    kw = {"activation_scales": {"1": 0.02}} if scheme in ("fp8", "int8-static") else {}
    with torch.inference_mode():
        torch._dynamo.reset()
        if scheme == "fp8-block":
            ref = torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager", **kw))(x)
        else:
            monkeypatch.setenv("MXPASS_KERNEL", "reference")
            ref = torch.compile(model, backend=mxpass.backend(scheme=scheme, **kw))(x)
            monkeypatch.delenv("MXPASS_KERNEL")
        torch._dynamo.reset()
        out = torch.compile(model, backend=mxpass.backend(scheme=scheme, **kw))(x)
    if tokens <= 16 and scheme in ("fp8-dynamic", "fp8", "int8", "int8-static", "fp8-block"):
        kernel = "cuda_w8a8_gemv"  # a static M <= 16 (each compile here sees one M)
    if tokens <= 16 and (scheme == "fp8-w-block" or (scheme == "fp8-w" and tokens > 1)):
        kernel = "cuda_w8a16_gemv"  # W8A16 at a static M <= 16 (fp8-w from M = 2)
    assert mxpass.last_report().rewritten[0].kernel.startswith(kernel)
    assert rel_err(out, ref) < 2**-7


def test_w8a16_and_mx_choice_follows_static_m(monkeypatch):
    """W8A16 and MXFP8: a graph with a static M >= the threshold takes dequant_cublas_mm, a
    smaller static M and a dynamic M take the Triton kernel (the report says why); every
    output matches the reference kernel on the same quantized values."""
    from mxpass.lowering.kernels import MX_DEQUANT_MIN_M, W8A16_DEQUANT_MIN_M

    torch.manual_seed(0)
    # K differs from every M here: Dynamo gives equal sizes one symbol (duck sizing), so an M
    # equal to K would be specialized with K even under dynamic=True
    lin = torch.nn.Linear(1024, 384, bias=False).cuda().bfloat16()
    with torch.inference_mode():
        for scheme, T, triton in (("fp8-w", W8A16_DEQUANT_MIN_M, "triton_w8"),
                                  ("fp8-w-tensor", W8A16_DEQUANT_MIN_M, "triton_w8"),
                                  ("fp8-w-block", W8A16_DEQUANT_MIN_M, "triton_w8"),
                                  ("mxfp8", MX_DEQUANT_MIN_M, "triton_mxfp8"),
                                  ("mxfp8-w", MX_DEQUANT_MIN_M, "triton_mxfp8")):
            assert T not in (1024, 384)
            big = torch.randn(T, 1024, device="cuda", dtype=torch.bfloat16)
            small = torch.randn(T - 1, 1024, device="cuda", dtype=torch.bfloat16)
            monkeypatch.setenv("MXPASS_KERNEL", "reference")
            torch._dynamo.reset()
            ref = torch.compile(lin, backend=mxpass.backend(scheme=scheme), dynamic=True)
            refs = [ref(big), ref(small)]
            monkeypatch.delenv("MXPASS_KERNEL")
            for x, r, dynamic, kernel, reason in (
                    (big, refs[0], False, "dequant_cublas_mm", None),
                    (small, refs[1], False, triton, f"M={T - 1} < {T}"),
                    (big, refs[0], True, triton, "M is dynamic in this graph")):
                torch._dynamo.reset()
                out = torch.compile(lin, backend=mxpass.backend(scheme=scheme), dynamic=dynamic)(x)
                chosen = mxpass.last_report().rewritten[0].kernel
                assert chosen.startswith(kernel), (scheme, dynamic, chosen)
                if reason:
                    assert f"dequant_cublas_mm: {reason}" in chosen, chosen
                assert rel_err(out, r) < 2**-7, (scheme, kernel)
