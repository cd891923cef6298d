"""The mxpass ops traced with their weights as graph inputs under ``dynamic=True``.

A model's weights are parameters with static shapes, but a user's function may take them as
inputs; Dynamo then makes their sizes symbolic too. The lowering picks a kernel for
concrete sizes: it specializes K, N (H, I) on the weights while the token count stays
dynamic (one graph for every T), and the outputs equal the eager op."""

import torch

from mxpass import weights
from mxpass.formats import get_format
from tests.conftest import CountingBackend


def _lowering_backend(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    from mxpass.lowering.nodes import lower_mxpass_nodes

    assert lower_mxpass_nodes(gm) == 1
    return compile_fx(gm, example_inputs)


def test_moe_with_weight_inputs_keeps_tokens_dynamic():
    torch.manual_seed(0)
    E, A, H, I = 4, 2, 64, 32  # noqa: E741
    fmt = get_format("mxfp8")
    w13 = weights.quantized_experts(torch.randn(E, 2 * I, H), fmt, "w13")
    w2 = weights.quantized_experts(torch.randn(E, H, I), fmt, "w2")
    # E8M0 scales as their uint8 storage, as the backend binds them (CPU Inductor has no e8m0 inputs)
    w13, w2 = (w13[0], w13[1].view(torch.uint8)), (w2[0], w2[1].view(torch.uint8))
    be = CountingBackend(_lowering_backend)
    f = torch.compile(lambda x, ids, tw, a, b, c, d: torch.ops.mxpass.moe.default(x, ids, tw, a, b, c, d, "mxfp8", "silu"),
                      backend=be, dynamic=True, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T in (3, 17, 40):
            x = torch.randn(T, H)
            ids = torch.randint(0, E, (T, A))
            tw = torch.rand(T, A)
            got = f(x, ids, tw, *w13, *w2)
            want = torch.ops.mxpass.moe(x, ids, tw, *w13, *w2, "mxfp8", "silu")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same fp32 math, fused differently
    assert be.graphs == 1


def test_linear_with_weight_inputs_keeps_rows_dynamic():
    torch.manual_seed(0)
    fmt = get_format("fp8-dynamic")
    from mxpass import quant

    qw, ws = quant.quantize_weight(fmt, torch.randn(48, 64), "w")
    be = CountingBackend(_lowering_backend)
    f = torch.compile(lambda x, a, b: torch.ops.mxpass.linear.default(x, a, b, None, None, "fp8-dynamic"),
                      backend=be, dynamic=True, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for M in (3, 17, 40):
            x = torch.randn(M, 64)
            torch.testing.assert_close(f(x, qw, ws), torch.ops.mxpass.linear(x, qw, ws, None, None, "fp8-dynamic"),
                                       rtol=1e-5, atol=1e-5)
    assert be.graphs == 1
