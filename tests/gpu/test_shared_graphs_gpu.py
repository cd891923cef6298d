"""One compiled graph run for several layers' weights, on the GPU kernels and under CUDA graphs.

A graph break inside a layer makes Dynamo run one graph per half-layer for every layer (it
does not guard on a Parameter's identity); each call must use its own layer's quantized
weights (``mxpass.passes.inputs.BoundInputs``), also when CUDA graphs are recorded per set of
weights. The CPU side of this is ``tests/test_shared_graphs.py``.
"""

import pytest
import torch

import mxpass
from tests.conftest import rel_err
from tests.test_shared_graphs import Stack, _dequantized

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _stack():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Stack(3, d=512).to(torch.bfloat16).eval()  # wide enough for every GPU kernel's K
        return model, torch.randn(4, 512, dtype=torch.bfloat16)


@pytest.mark.parametrize("cudagraphs", [False, True])
@pytest.mark.parametrize("scheme", ["fp8-w", "fp8-dynamic", "mxfp8"])
def test_layers_sharing_a_graph_on_gpu(scheme, cudagraphs):
    model, x = _stack()
    with torch.inference_mode():
        ref = torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager"))(x)
        torch._dynamo.reset()
        fast = torch.compile(model, backend=mxpass.backend(scheme=scheme, cudagraphs=cudagraphs))
        outs = []
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(fast(x).clone())
        plain = model(x)
    kernels = {e.kernel.split(" (")[0] for r in mxpass.reports()[-4:] for e in r.rewritten}
    assert "reference" not in kernels, kernels
    if scheme == "fp8-w":  # weight-only: the dequantized model is the reference
        with torch.inference_mode():
            ref = _dequantized(model, mxpass.get_format(scheme))(x)
    for out in outs:
        # bf16 outputs; activation rounding in fused producers may differ in the last bit
        assert rel_err(out, ref) < 2e-2, (rel_err(out, ref), rel_err(plain, ref))
    assert rel_err(outs[-1], plain) > 1e-3
