"""INT8 W8A8 GEMM Triton kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is chosen when the kernels are defined, so the check runs in a child
process. Tiny shapes with tails in every tile dimension; every kernel path (one program
per tile, persistent, swapped y^T tiles, the op's default plan across its M regimes) for
per-token/per-channel (``int8``) and per-tensor (``int8-static``) scales, with and without
bias, against exact math on the same quantized operands and against
``mxpass.quant.linear_reference``.
"""

import textwrap

from tests.conftest import run_under_triton_interpreter

_CHILD = textwrap.dedent(
    """
    import torch
    import mxpass.kernels.triton.int8_gemm as ig
    from mxpass import quant
    from mxpass.formats import get_format

    torch.manual_seed(0)
    N = 72  # a tail in every BLOCK_N; K = 200 and 208 (16-byte rows: TMA): a tail in every BLOCK_K
    C = ig.Config
    plans = {
        "tiles": ig.Plan(((0, None, C(16, 32, 64, 1, 1)),)),
        "persistent": ig.Plan(((0, None, C(32, 16, 32, 1, 1, group_m=2, persistent=True)),)),
        "swap": ig.Plan(((0, None, C(32, 16, 64, 1, 1, swap=True)),)),
        "regimes": ig.Plan(((0, 4, C(16, 16, 32, 1, 1, swap=True)), (4, 20, C(16, 32, 64, 1, 1)),
                            (20, None, C(32, 32, 32, 1, 1, persistent=True)))),
        "tma": ig.Plan(((0, None, C(16, 32, 64, 1, 1, tma=True)),)),
        "tma-persistent": ig.Plan(((0, None, C(32, 16, 32, 1, 1, group_m=2, persistent=True, tma=True)),)),
    }
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    for scheme, K in (("int8", 200), ("int8-static", 200), ("int8", 208), ("int8-static", 208)):
        fmt = get_format(scheme)
        act = torch.tensor([0.03]) if fmt.static_activation else None
        q, s = quant.quantize_weight(fmt, torch.randn(N, K).half() * 0.05, "w")
        b = torch.randn(N).half() * 0.1
        for M in (0, 1, 3, 17, 45):
            x = torch.randn(M, K).half()
            xq, xs = quant.quantize_activation(fmt, x, act)
            bias = b if M % 2 else None
            exact = quant.dequantize_activation(fmt, xq, xs).double() @ quant.dequantize_weight(fmt, q, s).double().t()
            if bias is not None:
                exact = exact + bias.double()
            ref = quant.linear_reference(x, q, s, bias, act, fmt)
            outs = {p: ig.int8_mm_with_plan(xq, xs, q, s, bias, torch.float16, plan, num_sms=3)
                    for p, plan in plans.items() if K % 16 == 0 or not p.startswith("tma")}
            outs["op"] = torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, bias, torch.float16)
            outs["bf16"] = ig.int8_mm_with_plan(xq, xs, q, s, bias, torch.bfloat16, plans["tiles"])
            for p, y in outs.items():
                assert y.shape == (M, N), (scheme, p, y.shape)
                if M:
                    # int32 sums are exact: only fp32 scaling and the output rounding remain
                    tol = 2.0**-8 if y.dtype == torch.bfloat16 else 2.0**-10
                    assert rel(y, exact) <= tol, (scheme, p, M, rel(y, exact))
                    # the reference also rounds the fake-quantized activation to fp16
                    assert rel(y, ref) <= 2.0 * tol, (scheme, p, M, rel(y, ref))
    print("ok")
    """
)


def test_int8_gemm_under_triton_interpreter():
    run_under_triton_interpreter(_CHILD, timeout=180)
