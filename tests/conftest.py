import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with Dynamo's caches empty, so compile counts are its own."""
    torch._dynamo.reset()
    yield


def rel_err(a, b) -> float:
    """||a - b||_F / ||b||_F, in float64 (outputs of tiny magnitude, e.g. weights with E8M0
    scales near 2**-127, would underflow in the squares of a float32 norm)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class CountingBackend:
    """Wraps a backend and counts the graphs it is asked to compile."""

    def __init__(self, inner):
        self.inner = inner
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


# opcheck's test_schema compares inputs with torch.allclose, which has no float8 kernel
# (torch 2.13 CPU: "mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'; torch 2.11
# CUDA: "mul_cuda"): the other checks run, and "mutates nothing" is checked on raw bytes.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_float8(op, args):
    """``torch.library.opcheck`` without test_schema, then one eager call; no tensor argument
    may change (compared byte for byte). Returns the eager call's output."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.view(torch.uint8).clone() for t in tensors]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)
    out = op(*args)
    for b, t in zip(before, tensors):
        assert torch.equal(b, t.view(torch.uint8)), "an input was modified"
    return out


def small_m_backend_case(monkeypatch, scheme: str, tokens: int, bias: bool):
    """RMSNorm -> Linear(1024, 2048) (GPU, bf16) compiled by mxpass for a static M = ``tokens``
    with CUDA graphs (three replays; no graph may be skipped), then for a dynamic M. Returns the
    static graph's report entry, its output's relative error against
    ``same_quantization_reference``, and the kernel (report text) of the dynamic graph."""
    import mxpass
    from torch._dynamo.utils import counters
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(LlamaRMSNorm(1024), torch.nn.Linear(1024, 2048, bias=bias)).cuda().bfloat16()
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(model, backend=mxpass.backend(scheme=scheme, cudagraphs=True))
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(x).clone()
        assert counters["inductor"]["cudagraph_skips"] == 0
        entry = mxpass.last_report().rewritten[0]
        err = rel_err(out, same_quantization_reference(model, x, entry, monkeypatch, scheme=scheme))
        torch._dynamo.reset()
        dyn = torch.compile(model, backend=mxpass.backend(scheme=scheme), dynamic=True)
        dyn(torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16))
        return entry, err, mxpass.last_report().rewritten[0].kernel


def run_under_triton_interpreter(child: str, timeout: int) -> None:
    """Run the Python source ``child`` with TRITON_INTERPRET=1 in a child process (the
    interpreter is chosen when kernels are defined); it must print "ok" last."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    try:
        proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip("Triton interpreter too slow here")
    if proc.returncode != 0 and "interpret" in proc.stderr.lower() and "not supported" in proc.stderr.lower():
        pytest.skip(f"Triton interpreter cannot run these kernels: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def same_quantization_reference(model, x, entry, monkeypatch, **backend_kw):
    """The reference output of ``model(x)`` whose activation quantization matches what the
    kernel of report entry ``entry`` was given. An input quantized or fake-quantized by
    act_quant_triton is the bf16 producer output quantized as eager PyTorch rounds it, so the
    reference is the graph run op by op (``compiler="eager"``); elsewhere both sides quantize
    in Inductor's code (from the unrounded fp32 producer), so it is the reference kernel
    compiled (``MXPASS_KERNEL=reference``). ``backend_kw``: mxpass.backend options."""
    import mxpass

    torch._dynamo.reset()
    if "quantized by act_quant_triton" in entry.input_quant:
        return torch.compile(model, backend=mxpass.backend(compiler="eager", **backend_kw))(x)
    monkeypatch.setenv("MXPASS_KERNEL", "reference")
    try:
        return torch.compile(model, backend=mxpass.backend(**backend_kw))(x)
    finally:
        monkeypatch.delenv("MXPASS_KERNEL")
