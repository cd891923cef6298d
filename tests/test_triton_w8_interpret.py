"""W8A16 linear Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is chosen when the kernels are defined, so the check runs in a child
process. fp16 inputs: with triton 3.9 the interpreter's ``tl.dot`` on bf16 operands is
wrong, fp16 is right (and the inline-PTX e4m3 -> bf16 conversion only runs on CUDA).
Shapes are tiny; every path of the op and the op itself are compared with
``mxpass.quant.linear_reference`` for each weight format and scale granularity.
"""

import textwrap

from tests.conftest import run_under_triton_interpreter

_CHILD = textwrap.dedent(
    """
    import dataclasses
    import torch
    import mxpass.kernels.triton.mxfp8_linear as mk
    import mxpass.kernels.triton.w8_linear as wk
    from mxpass import quant
    from mxpass.formats import get_format

    torch.manual_seed(0)
    K, N = 328, 136  # K: 3 scale columns (the last partial), rows not 16-byte aligned; N: a partial scale row
    cases = [("fp8-w", "channel"), ("fp8-w-tensor", "tensor"), ("fp8-w-block", "block"),
             ("int8", "channel"), ("int8-static", "tensor")]
    one = lambda impl: mk.Plan((mk.Regime(0, None, impl),))
    plans = {
        "gemv": one(mk.SplitK("gemv", 16, 1, 256, 2)),
        "dot-S1": one(mk.SplitK("dot", 32, 16, 128, 1)),
        "dequant-gemm": one(mk.DequantGemm(mk.SplitK("dot", 16, 16, 32, 1), 16, 64)),
    }
    for name, gran in cases:
        fmt = dataclasses.replace(get_format(name), activation=None)
        q, s = quant.quantize_weight(fmt, (torch.randn(N, K) * 0.05).half(), "w")
        b = torch.randn(N).half()
        for M in (0, 1, 3, 17):
            x = torch.randn(M, K).half()
            bias = b if M % 2 else None
            ref = quant.linear_reference(x, q, s, bias, None, fmt)
            # the op's default plan: gemv (M = 1), split-K dot (3, 17), dequantize + GEMM not at these M
            outs = {p: wk.w8_linear_with_plan(x, q, s, bias, gran, plan) for p, plan in plans.items()}
            outs["op"] = torch.ops.mxpass.w8_linear_triton(x, q, s, bias, gran)
            for p, y in outs.items():
                assert y.shape == (M, N) and y.dtype == torch.float16, (name, p, y.shape, y.dtype)
                if M:
                    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                    # fp16 output rounding is 2**-11; the dequantize-gemm "block" scratch rounds W too
                    assert err <= 2.0**-10, (name, p, M, err)
    print("ok")
    """
)


def test_w8_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_CHILD, timeout=180)
