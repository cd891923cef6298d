"""Lowering: activation quantization fuses into its producer; the kernel registry's choices."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import mxpass
from mxpass.lowering import registry
from mxpass.lowering.registry import NoKernelError, Problem
from tests.test_models import MLPStack

# float -> e4m3 conversion in Inductor's C++ (activation quantization); weight dequantization
# converts the other way and does not contain it.
_QUANT_CAST = "convert<at::Float8_e4m3fn>"


def _kernels(src: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(
        r"(cpp_fused\w+) = async_compile\.cpp_pybinding\((.*?)'''\)", src, re.S)}


def test_activation_quantization_fuses_into_rmsnorm_and_silu_mul():
    """RMSNorm+quantize is one kernel, SiLU*mul+quantize is one kernel; no standalone quantize."""
    torch.manual_seed(0)
    model = MLPStack().eval()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model, backend=mxpass.backend), torch.randn(5, 64))
    kernels = _kernels(code[0])
    quantizing = {name for name, body in kernels.items() if _QUANT_CAST in body}
    assert quantizing, "no activation quantization found in the generated code"
    for name in quantizing:
        assert "rsqrt" in name or "silu" in name, f"activation quantization in its own kernel: {name}"
    # two layers, each quantizing after its RMSNorm and after its SiLU*mul (identical kernels
    # are emitted once and called per layer, so count call sites)
    calls = {n: len(re.findall(rf"^\s+{n}\(", code[0], re.M)) for n in quantizing}
    assert sum(c for n, c in calls.items() if "rsqrt" in n) == 2, calls
    assert sum(c for n, c in calls.items() if "silu" in n) == 2, calls


def test_registry_reasons_and_overrides(monkeypatch):
    fmt = mxpass.get_format("mxfp8")
    cpu = Problem("linear", fmt, torch.device("cpu"), 64, 32, torch.bfloat16)
    choice = registry.choose(cpu)
    assert choice.kernel.name == "reference"
    assert choice.rejected == (("dequant_cublas_mm", "needs a CUDA device, got cpu"),
                               ("cuda_w8a8_gemv", "needs a CUDA device, got cpu"),
                               ("triton_mxfp8", "needs a CUDA device, got cpu"),
                               ("dequant_cublas_mm", "needs a CUDA device, got cpu"))

    monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "reference")
    with pytest.raises(NoKernelError, match="triton_mxfp8: needs a CUDA device.*reference: disabled"):
        registry.choose(cpu)
    monkeypatch.delenv("MXPASS_DISABLE_KERNELS")
    monkeypatch.setenv("MXPASS_KERNEL", "triton_mxfp8")
    with pytest.raises(NoKernelError, match="dequant_cublas_mm: MXPASS_KERNEL=triton_mxfp8; cuda_w8a8_gemv: "
                                            "MXPASS_KERNEL=triton_mxfp8; triton_mxfp8: needs "
                                            "a CUDA device.*dequant_cublas_mm: MXPASS_KERNEL=triton_mxfp8; "
                                            "reference: MXPASS_KERNEL=triton_mxfp8"):
        registry.choose(cpu)


def test_kernel_choice_is_in_the_report(monkeypatch):
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        torch.compile(lin, backend=mxpass.backend(compiler="eager"))(torch.randn(2, 64))
    (entry,) = mxpass.last_report().rewritten
    assert entry.kernel == ("reference (not picked: dequant_cublas_mm: needs a CUDA device, got cpu; "
                            "cuda_w8a8_gemv: needs a CUDA device, got cpu; "
                            "triton_mxfp8: needs a CUDA device, got cpu; "
                            "dequant_cublas_mm: needs a CUDA device, got cpu)")


def test_shared_activation_is_quantized_once():
    """Unmerged, gate and up read one quantized buffer (CSE of their decompositions): 6 GEMMs,
    4 inputs; merged (the default), gate/up is one GEMM: 4 GEMMs on 4 inputs."""
    torch.manual_seed(0)
    model = MLPStack().eval()
    for merge, gemms in ((False, 6), (True, 4)):
        torch._dynamo.reset()
        with torch.no_grad():
            _, code = run_and_get_code(torch.compile(model, backend=mxpass.backend(merge=merge)),
                                       torch.randn(5, 64))
        inputs = re.findall(r"extern_kernels\.(?:mm|addmm)\((?:\w+, )?reinterpret_tensor\((buf\d+)", code[0])
        assert len(inputs) == gemms and len(set(inputs)) == 4, (merge, inputs)


def test_cse_leaves_allocations_apart():
    """Two identical ``empty`` buffers written by two kernels must stay two buffers: merged, one
    writer would need a clone (a copy kernel per quantized activation in a decode step)."""
    from mxpass.lowering.cse import merge_identical_nodes

    def f(x):
        a, b = torch.empty(4), torch.empty(4)
        c, d = torch.empty_like(x), torch.empty_like(x)
        return a.copy_(x), b.copy_(x * 2), c.copy_(x + 1), d.copy_(x + 1), x.abs(), x.abs()

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(4))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.empty.memory_format) == 2
    assert merge_identical_nodes(gm.graph) == 2  # the second abs and the second x + 1; no empty
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.empty.memory_format) == 2
    assert ops.count(torch.ops.aten.empty_like.default) == 2


def test_cse_keeps_nan_and_signed_zero_constants_apart():
    from mxpass.lowering.cse import merge_identical_nodes

    def f(x):
        return (torch.where(x > 0, float("nan"), x) + torch.where(x > 0, float("nan"), x),
                1 / torch.full_like(x, 0.0), 1 / torch.full_like(x, -0.0))

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(3))
    x = torch.randn(3)
    expected = f(x)
    assert merge_identical_nodes(gm.graph) >= 1  # the second where (and its nan constant)
    gm.recompile()
    got = gm(x)
    for a, b in zip(got, expected):  # +inf and -inf stay apart
        torch.testing.assert_close(a, b, equal_nan=True)


def test_capability_is_checked(monkeypatch):
    """On a GPU without FP8 tensor cores (sm_80) no FP8 kernel is offered; dequant+cuBLAS runs."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    gpu = torch.device("cuda", 0)
    for scheme, skipped in (("mxfp8", "triton_mxfp8"), ("fp8-dynamic", "cublas_scaled_mm_rowwise"),
                            ("fp8", "cublas_scaled_mm_tensorwise")):
        choice = registry.choose(Problem("linear", mxpass.get_format(scheme), gpu, 4096, 4096, torch.bfloat16))
        assert choice.kernel.name == "dequant_cublas_mm"
        assert skipped in dict(choice.rejected)
        for name, reason in choice.rejected:
            if not reason.startswith("M is dynamic"):  # the large-static-M entry of mxfp8
                assert reason.endswith("device has 8.0"), (name, reason)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    choice = registry.choose(Problem("linear", mxpass.get_format("int8"), gpu, 4096, 4096, torch.bfloat16))
    assert choice.kernel.name == "dequant_cublas_mm" and "INT8 tensor cores" in dict(choice.rejected)["cublas_int_mm"]


def test_int8_order_follows_static_m_on_hopper(monkeypatch):
    """INT8 W8A8 on sm_90: the Triton GEMM for a dynamic M and a static M >= 128, cuBLAS
    _int_mm for a static M in 17..127 (the Triton tiles are 64 rows tall; measured slower
    there), and the report's reasons say so."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "cuda_w8a8_gemv")  # needs nvcc; its own test covers it
    gpu = torch.device("cuda", 0)
    for scheme in ("int8", "int8-static"):
        fmt = mxpass.get_format(scheme)
        for m, kernel in ((None, "triton_int8_mm"), (4096, "triton_int8_mm"), (128, "triton_int8_mm"),
                          (64, "cublas_int_mm"), (17, "cublas_int_mm")):
            choice = registry.choose(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16, m))
            assert choice.kernel.name == kernel, (scheme, m, choice.describe())
            if kernel == "cublas_int_mm":
                assert "static M" in dict(choice.rejected)["triton_int8_mm"]
    choice = registry.choose(Problem("linear", mxpass.get_format("int8"), gpu, 4104, 4096, torch.bfloat16))
    assert choice.kernel.name == "cublas_int_mm" and "K=4104" in dict(choice.rejected)["triton_int8_mm"]


def test_blockwise_scaled_mm_is_offered_on_hopper_only(monkeypatch):
    """cuBLAS block scaling is a Hopper path of torch._scaled_mm: fp8-block takes it on sm_90
    for whole 128-blocks, and says why not elsewhere (sm_89 and sm_100 keep triton_w8)."""
    from mxpass.lowering.kernels import ScaledMMBlockwiseLinear

    fmt, gpu = mxpass.get_format("fp8-block"), torch.device("cuda", 0)
    kernel = ScaledMMBlockwiseLinear()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    for cap, ok in (((9, 0), True), ((8, 9), False), ((10, 0), False), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        supported, reason = kernel.is_supported(gpu)
        assert supported == ok, (cap, reason)
        if not ok:
            assert f"device has {cap[0]}.{cap[1]}" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert kernel.is_supported(gpu) == (False, "needs CUDA >= 12.9 (cuBLAS block scaling), torch is built with 12.4")
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    assert not kernel.is_supported(gpu)[0]
    monkeypatch.setattr(torch, "__version__", "2.13.0.dev20260101+cpu")
    assert kernel.is_supported(gpu)[0]

    assert kernel.can_implement(Problem("linear", fmt, gpu, 4096, 12288, torch.bfloat16))[0]
    ok, reason = kernel.can_implement(Problem("linear", fmt, gpu, 4096, 200, torch.bfloat16))
    assert not ok and "N=200" in reason
    for k in (256, 384, 640, 768, 1152):  # K / 128 not a multiple of 4: wrong results measured on H200
        ok, reason = kernel.can_implement(Problem("linear", fmt, gpu, k, 256, torch.bfloat16))
        assert not ok and f"K={k}" in reason
    assert kernel.can_implement(Problem("linear", fmt, gpu, 14336, 4096, torch.bfloat16))[0]
    assert not kernel.can_implement(Problem("linear", fmt, gpu, 4096, 256, torch.float32))[0]
    assert not kernel.can_implement(Problem("linear", fmt, gpu, 4096, 256, torch.float16))[0]
    assert not kernel.can_implement(Problem("linear", mxpass.get_format("fp8-w-block"), gpu, 4096, 256,
                                            torch.bfloat16))[0]
    monkeypatch.setattr(registry, "_CANDIDATES", {})
    for m, name in ((None, "cublas_scaled_mm_blockwise"), (4096, "cublas_scaled_mm_blockwise")):
        monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "cuda_w8a8_gemv")  # needs nvcc, not the point here
        assert registry.choose(Problem("linear", fmt, gpu, 4096, 12288, torch.bfloat16, m)).kernel.name == name
    choice = registry.choose(Problem("linear", fmt, gpu, 4096, 200, torch.bfloat16))
    assert choice.kernel.name == "triton_w8" and "N=200" in dict(choice.rejected)["cublas_scaled_mm_blockwise"]


def test_w8a16_and_mx_take_dequant_cublas_for_a_large_static_m(monkeypatch):
    """W8A16 and MXFP8 formats: dequant_cublas_mm first only where the graph fixed M at or above
    the measured threshold; a dynamic or smaller M keeps the Triton kernel, and the report says why."""
    from mxpass.lowering.kernels import MX_DEQUANT_MIN_M, W8A16_DEQUANT_MIN_M

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # the GEMVs need nvcc; tests/test_cuda_gemv.py covers them
    monkeypatch.setenv("MXPASS_DISABLE_KERNELS", "cuda_w8a8_gemv,cuda_w8a16_gemv")
    gpu = torch.device("cuda", 0)
    for scheme, T, triton in (("fp8-w", W8A16_DEQUANT_MIN_M, "triton_w8"),
                              ("fp8-w-tensor", W8A16_DEQUANT_MIN_M, "triton_w8"),
                              ("fp8-w-block", W8A16_DEQUANT_MIN_M, "triton_w8"),
                              ("mxfp8", MX_DEQUANT_MIN_M, "triton_mxfp8"),
                              ("mxfp8-w", MX_DEQUANT_MIN_M, "triton_mxfp8")):
        fmt = mxpass.get_format(scheme)
        assert registry.choose(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16, T)).kernel.name == \
            "dequant_cublas_mm"
        small = registry.choose(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16, T - 1))
        assert small.kernel.name == triton
        assert small.rejected[0] == ("dequant_cublas_mm", f"M={T - 1} < {T} (picked first for a static M >= {T}, "
                                                          f"where it measured faster than {triton})")
        assert [name for name, _ in small.rejected[1:]] == ["cuda_w8a8_gemv" if scheme == "mxfp8" else "cuda_w8a16_gemv"]
        dyn = registry.choose(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16))
        assert dyn.kernel.name == triton and dyn.rejected[0][1].startswith("M is dynamic in this graph")
    # forcing the kernel still works for a dynamic M (its later, unconditional entry)
    monkeypatch.setenv("MXPASS_KERNEL", "dequant_cublas_mm")
    fmt = mxpass.get_format("fp8-w")
    assert registry.choose(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16)).kernel.name == "dequant_cublas_mm"


def test_registry_builds_without_triton(monkeypatch):
    """No import may fail on a platform without triton: the registry still builds, its Triton
    entries say why they are not picked, and the reference runs."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    monkeypatch.setattr(registry, "_CANDIDATES", {})
    for scheme, triton_kernel in (("int8", "triton_int8_mm"), ("mxfp8", "triton_mxfp8")):
        choice = registry.choose(Problem("linear", mxpass.get_format(scheme), torch.device("cpu"), 256, 256,
                                         torch.bfloat16))
        assert choice.kernel.name == "reference"
        assert dict(choice.rejected)[triton_kernel] == "triton is not installed"


def test_silu_mul_inputs_report_why_they_stay_in_inductor_on_cpu():
    """On the CPU the down projections' SiLU*mul inputs keep Inductor's fused quantization,
    and the report says why (act_quant_triton is a CUDA kernel)."""
    with torch.no_grad():
        torch.compile(MLPStack().eval(), backend=mxpass.backend(scheme="fp8-dynamic"))(torch.randn(5, 64))
    notes = {r.fqn: r.input_quant for r in mxpass.last_report().rewritten}
    downs = [f for f in notes if f.endswith("down_proj")]
    assert len(downs) == 2
    for fqn, note in notes.items():
        if fqn in downs:
            assert note == "input silu*mul quantized in Inductor's kernel (act_quant_triton: runs on CUDA, device is cpu)"
        else:
            assert note == ""
    assert "layers.0.mlp.down_proj: input silu*mul quantized in Inductor's kernel" in str(mxpass.last_report())


def _tiny_llama():
    import transformers

    # K multiples of 128 (fp8-block's activation groups)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_quantizing_inputs_become_one_call(monkeypatch):
    """Where act_quant_triton applies, each down projection takes (gate, up), the SiLU and mul
    nodes leave the graph, and each o_proj takes the attention output; formats it does not
    encode keep Inductor's quantization, and the report says which path each input takes."""
    from torch._inductor import compile_fx as inductor

    from mxpass.lowering import producers
    from mxpass.lowering.linear import linear_lowered

    monkeypatch.setattr(producers, "fusion_problem",
                        lambda problem, choice: None if problem.fmt.activation == "token" else "not this one")
    # on the CPU every layer takes the reference: stand in for the GPU kernels' input modes
    monkeypatch.setattr(producers, "input_mode", lambda problem, choice: "quantized")
    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, example_inputs, **kwargs):
        graphs.append(gm)

        def stop(*args):
            raise Captured

        return stop

    monkeypatch.setattr(inductor, "compile_fx", capture)
    model, ids = _tiny_llama(), torch.randint(0, 128, (1, 6))
    def compile_graph(scheme, merge=True):
        torch._dynamo.reset()
        graphs.clear()
        with torch.no_grad(), pytest.raises(Captured):
            torch.compile(model, backend=mxpass.backend(scheme=scheme, merge=merge))(ids, use_cache=False)
        return graphs[0], {r.fqn.split(".")[-1]: r.input_quant for r in mxpass.last_report().rewritten}

    for scheme in ("fp8-dynamic",):
        gm, notes = compile_graph(scheme)
        linears = [n for n in gm.graph.nodes if n.target is producers.linear_on_input]
        quantized = [n for n in gm.graph.nodes if n.target is producers.quantize_input]
        silus = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.silu]
        assert len(linears) == 4 and len(quantized) == 4 and not silus, (scheme, gm.graph)
        for q in quantized:
            src, up = q.args[:2]
            if up is None:  # o_proj: the attention output (through its views)
                assert src.op in ("call_method", "call_function") and src.target is not linear_lowered
            else:  # down_proj: gate and up, two slices of the merged gate/up linear
                assert src.target is torch.narrow and up.target is torch.narrow and src is not up
                assert src.args[0] is up.args[0] and src.args[0].target is linear_lowered
        assert notes["down_proj"] == "input silu*mul quantized by act_quant_triton", notes
        assert notes["o_proj"] == "input attention output quantized by act_quant_triton", notes
        assert notes["q_proj"] == notes["gate_proj"] == ""  # token scales: fused into the RMSNorm

    # 1 x 128 groups: every input; kept in Inductor when act_quant_triton cannot take it ...
    gm, notes = compile_graph("fp8-block")
    assert not [n for n in gm.graph.nodes if n.target is producers.quantize_input]
    assert notes["q_proj"] == "input activation quantized in Inductor's kernel (act_quant_triton: not this one)"
    # ... else one quantization shared by q/k/v and one by gate/up
    monkeypatch.setattr(producers, "fusion_problem", lambda problem, choice: None)
    gm, notes = compile_graph("fp8-block")
    linears = [n for n in gm.graph.nodes if n.target is producers.linear_on_input]
    quantized = [n for n in gm.graph.nodes if n.target is producers.quantize_input]
    # 2 layers x (q, k, v: k/v have 64 rows, not a 128-row block, so not merged; o; gate/up merged; down)
    assert len(linears) == 12 and len(quantized) == 8, gm.graph
    assert notes["q_proj"] == notes["gate_proj"] == "input activation quantized by act_quant_triton", notes
    # MXFP8 too: every input, one quantization per distinct input
    gm, notes = compile_graph("mxfp8")
    quantized = [n for n in gm.graph.nodes if n.target is producers.quantize_input]
    assert len(quantized) == 8 and all(q.args[3] == "mxfp8" for q in quantized), gm.graph
    assert notes["q_proj"] == notes["gate_proj"] == "input activation quantized by act_quant_triton", notes
    assert notes["down_proj"] == "input silu*mul quantized by act_quant_triton", notes
    # MXFP8 kernels on fake-quantized activations (dequantize + cuBLAS, triton_mxfp8) take
    # act_quant_triton's fake-quantization; an input shared by layers of both kinds (unmerged
    # q: fake; k, v: quantized) gets one call per kind
    monkeypatch.setattr(producers, "input_mode", lambda problem, choice: "quantized" if problem.n == 64 else "fake")
    gm, notes = compile_graph("mxfp8", merge=False)
    quantized = [n for n in gm.graph.nodes if n.target is producers.quantize_input]
    linears = [n for n in gm.graph.nodes if n.target is producers.linear_on_input]
    modes = sorted(q.args[4] for q in quantized)
    # per layer: q's input, o's, gate/up's (one call for both), down's; k/v's input
    assert modes == ["fake"] * 8 + ["quantized"] * 2, gm.graph
    assert sorted(n.args[-1] for n in linears) == ["fake"] * 10 + ["quantized"] * 4
    for n in linears:  # each linear reads the call of its own mode
        assert n.args[0].args[0].target is producers.quantize_input and n.args[0].args[0].args[4] == n.args[-1]
    assert notes["q_proj"] == notes["gate_proj"] == "input activation fake-quantized by act_quant_triton", notes
    assert notes["k_proj"] == "input activation quantized by act_quant_triton", notes
    assert notes["down_proj"] == "input silu*mul fake-quantized by act_quant_triton", notes


def test_input_modes_follow_the_kernel():
    """Which activation each kernel takes from act_quant_triton: codes and scales for the W8A8
    kernels, MXFP8 fake-quantized values for the kernels on dequantized values, nothing for
    weight-only formats or fake-quantized formats other than MXFP8 (reason in the report)."""
    from mxpass.lowering import producers
    from mxpass.lowering.kernels import DequantMMLinear, ScaledMMLinear, TritonMXFP8Linear, TritonW8Linear
    from mxpass.lowering.registry import Choice

    gpu = torch.device("cuda", 0)

    def problem(scheme):
        return Problem("linear", mxpass.get_format(scheme), gpu, 4096, 4096, torch.bfloat16, 4096)

    for kernel in (DequantMMLinear(), TritonMXFP8Linear()):
        assert producers.input_mode(problem("mxfp8"), Choice(kernel)) == "fake"
        assert producers.fusion_problem(problem("mxfp8"), Choice(kernel)) is None
    assert producers.input_mode(problem("fp8-dynamic"), Choice(ScaledMMLinear("rowwise"))) == "quantized"
    assert producers.input_mode(problem("fp8-dynamic"), Choice(DequantMMLinear())) is None
    assert producers.fusion_problem(problem("fp8-dynamic"), Choice(DequantMMLinear())) == (
        "dequant_cublas_mm takes the activation fake-quantized (act_quant_triton fake-quantizes MXFP8 only)")
    assert producers.fusion_problem(problem("mxfp8-w"), Choice(TritonW8Linear())) == (
        "mxfp8-w keeps activations unquantized")


def test_dynamic_m_keeps_inductors_input_quantization():
    """act_quant_triton's quantized inputs are taken only where the graph fixed M; a dynamic M
    keeps Inductor's fused quantization, and the reason is the report's."""
    from mxpass.lowering import producers
    from mxpass.lowering.kernels import ScaledMMLinear
    from mxpass.lowering.registry import Choice

    gpu = torch.device("cuda", 0)
    fmt = mxpass.get_format("fp8-dynamic")
    choice = Choice(ScaledMMLinear("rowwise"))
    assert producers.fusion_problem(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16, None), choice) == (
        "M is dynamic in this graph (Inductor cannot yet decompose the kernel call with symbolic sizes)")
    assert producers.fusion_problem(Problem("linear", fmt, gpu, 4096, 4096, torch.bfloat16, 16), choice) is None
    # MXFP8 fake-quantization (one output of x's shape) is taken with a dynamic M too
    from mxpass.lowering.kernels import TritonMXFP8Linear

    mx = Problem("linear", mxpass.get_format("mxfp8"), gpu, 4096, 4096, torch.bfloat16, None)
    assert producers.fusion_problem(mx, Choice(TritonMXFP8Linear())) is None
