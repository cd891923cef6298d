"""MXFP8 linear Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is chosen when the kernels are defined, so the check runs in a child
process. fp16 inputs: with triton 3.9 the interpreter's ``tl.dot`` on bf16 operands is
wrong, fp16 is right. Shapes are tiny; every path of the op and the op itself are compared
with ``mxfp8_linear_reference``.
"""

import textwrap

from tests.conftest import run_under_triton_interpreter

_CHILD = textwrap.dedent(
    """
    import torch
    import mxpass.kernels.triton.mxfp8_linear as mk
    from mxpass.kernels.reference import mxfp8_linear_reference
    from mxpass.schemes import mxfp8

    torch.manual_seed(0)
    K, N = 160, 40  # K: 5 scale blocks, a tail in every BLOCK_K below; N: a tail in every BLOCK_N
    qw = mxfp8.quantize_weight(torch.randn(N, K) * 0.05, "w")
    q, s = qw.data, qw.scale
    b = torch.randn(N).half()
    one = lambda impl: mk.Plan((mk.Regime(0, None, impl),))
    plans = {
        "gemv": one(mk.SplitK("gemv", 16, 1, 64, 2)),
        "gemv-evict": one(mk.SplitK("gemv", 16, 1, 32, 3, evict_first=True)),
        # CHUNK 8 (not 16), a K tail in the pipelined loop, 3 row tiles per program (the last one past N);
        # gemv for M < 4 only (the interpreter is slow)
        "gemv-pipe": mk.Plan((mk.Regime(0, 4, mk.SplitK("gemv", 8, 1, 64, 1, num_warps=2, num_stages=3, row_tiles=3)),
                              mk.Regime(4, None, mk.SplitK("dot", 16, 16, 64, 3)))),
        "gemv-S2": mk.Plan((mk.Regime(0, 4, mk.SplitK("gemv", 8, 1, 128, 2, num_warps=4, num_stages=1)),
                            mk.Regime(4, None, mk.SplitK("dot", 16, 16, 64, 1)))),
        "dot": one(mk.SplitK("dot", 16, 16, 64, 3)),
        "dot-S1": one(mk.SplitK("dot", 16, 16, 32, 1)),
        "dequant-gemm": one(mk.DequantGemm(mk.SplitK("dot", 16, 16, 32, 1), 16, 64)),
        "mixed": mk.Plan((mk.Regime(0, 2, mk.SplitK("gemv", 16, 1, 64, 2)),
                          mk.Regime(2, 16, mk.SplitK("dot", 16, 16, 64, 3)),
                          mk.Regime(16, 32, mk.SplitK("dot", 32, 16, 32, 2)),
                          mk.Regime(32, None, mk.DequantGemm(mk.SplitK("dot", 16, 16, 32, 1), 16, 64)))),
    }
    for M in (0, 1, 3, 17, 40):
        x = mxfp8.fake_quantize(torch.randn(M, K)).half()
        for bias in (None, b):
            ref = mxfp8_linear_reference(x, q, s, bias)
            outs = {name: mk.mxfp8_linear_with_plan(x, q, s, bias, p) for name, p in plans.items()}
            outs["op"] = torch.ops.mxpass.mxfp8_linear_triton(x, q, s, bias)
            for name, y in outs.items():
                assert y.shape == (M, N) and y.dtype == torch.float16, (name, y.shape, y.dtype)
                if M:
                    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                    assert err <= 2.0**-10, (name, M, err)  # fp16 output rounding is 2**-11
    print("ok")
    """
)


def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_CHILD, timeout=120)
