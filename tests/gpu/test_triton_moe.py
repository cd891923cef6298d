"""GPU tests of the fused Triton MoE (kernels/triton/moe.py) and its registry entry ``triton_moe``.

Shape legend: T tokens, E experts, A active experts per token, H hidden, I expert intermediate.

Every test compares with ``mxpass.ops.moe_reference`` (per-expert dequantization, the
format's activation fake-quantization, fp32 matmuls; ``experts_reference`` for bf16 weights)
on fresh random routing. Run on the GPU machine: ``pytest -m gpu tests/gpu/test_triton_moe.py``.

Tolerance (relative Frobenius): y is rounded to bf16 once on both sides (up to 2**-9 per
element), and h is rounded to bf16 on both sides before the down projection; the fp32 sums
differ in order, which can move an h element by one bf16 ulp and, for the W8A8 formats,
that element's quantized value by one e4m3/int8 step. 2**-8 (bf16) / 2**-10 (fp16) as for
the linear kernels; a wrong expert, row, scale or routed weight gives errors of order 1.
Compiled graphs fake-quantize with Inductor's code, whose divisions may round differently
from eager's: 2**-6 there (measured below, printed).
"""

import pytest
import torch

from tests.conftest import CountingBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    import mxpass
    import mxpass.kernels.triton.moe as km
    from mxpass import quant
    from mxpass.benchmarks.linear import rel_error
    from mxpass.formats import get_format
    from mxpass.ops import experts_reference, moe_reference

TOLERANCE = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
# H = 1056: 33 MX blocks, not a multiple of 64 / 128 (K tails, partial 128-wide scale
# columns); I = 352: 2I = 704 rows, the up rows start inside a 128-row scale block.
E, A, H, I = 16, 4, 1056, 352  # noqa: E741
# default plan for E = 16: decode for T * A <= 4 (T = 1), grouped regimes from T = 2, 32, 128, 512, 2048
TS = [0, 1, 3, 17, 64, 300]
FULL = [None, "mxfp8", "fp8-w-block", "int8"]  # one scheme per scale kind, every T and routing
OTHER = ["mxfp8-w", "fp8-dynamic", "fp8-w", "fp8-w-tensor"]


def _weights(scheme, dtype=torch.bfloat16, e=E, h=H, i=I, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device="cuda") * 0.05).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g, device="cuda") * 0.05).to(dtype)
    if scheme is None:
        empty = torch.empty(0, device="cuda")
        return None, (w13, empty, w2, empty), lambda x, ids, tw: experts_reference(x, ids, tw, w13, w2, "silu")
    fmt = get_format(scheme)
    parts = []
    for w in (w13, w2):
        qs = [quant.quantize_weight(fmt, w[k].contiguous(), f"test[{k}]") for k in range(e)]
        parts += [torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])]
    return fmt, tuple(parts), lambda x, ids, tw: moe_reference(x, ids, tw, *parts, fmt, "silu")


def _routing(T, case, e=E, a=A, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if case == "random":  # distinct experts per token, as a router's top-k
        ids = torch.rand(T, e, generator=g, device="cuda").topk(a, dim=-1).indices
    elif case == "idle_experts":  # experts 0..e/2-1 only: the other half receive no token
        ids = torch.rand(T, e // 2, generator=g, device="cuda").topk(a, dim=-1).indices
    else:  # "one_expert": every token's first choice is expert 3
        scores = torch.rand(T, e, generator=g, device="cuda")
        scores[:, 3] = 2.0
        ids = scores.topk(a, dim=-1).indices
    tw = torch.rand(T, a, generator=g, device="cuda").to(torch.bfloat16)
    return ids, tw


def _x(T, dtype=torch.bfloat16, seed=0, h=H):
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    return torch.randn(T, h, generator=g, device="cuda").to(dtype)


def _close(y, ref, tol):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.numel():
        err = rel_error(y, ref)
        assert err <= tol, f"relative error {err:.2e} > {tol:.2e}"


@pytest.fixture(scope="module")
def weights():
    return {s: _weights(s) for s in FULL + OTHER}


@pytest.mark.parametrize("case", ["random", "idle_experts", "one_expert"])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("scheme", FULL, ids=str)
def test_matches_reference(weights, scheme, T, case):
    fmt, w, ref_fn = weights[scheme]
    ids, tw = _routing(T, case, seed=T)
    x = _x(T, seed=T)
    _close(km.moe_triton(x, ids, tw, *w, fmt), ref_fn(x, ids, tw), TOLERANCE[x.dtype])


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("scheme", OTHER)
def test_other_schemes_match_reference(weights, scheme, T):
    fmt, w, ref_fn = weights[scheme]
    ids, tw = _routing(T, "random", seed=T)
    x = _x(T, seed=T)
    _close(km.moe_triton(x, ids, tw, *w, fmt), ref_fn(x, ids, tw), TOLERANCE[x.dtype])


@pytest.mark.parametrize("scheme", ["mxfp8", "fp8-w", None], ids=str)
def test_fp16(scheme):
    fmt, w, ref_fn = _weights(scheme, torch.float16, seed=3)
    for T in (1, 40):
        ids, tw = _routing(T, "random", seed=T)
        x = _x(T, torch.float16, seed=T)
        _close(km.moe_triton(x, ids, tw, *w, fmt), ref_fn(x, ids, tw), TOLERANCE[x.dtype])


def test_every_path_alone(weights):
    """Decode forced at T = 64, each grouped regime's tiles forced alone (T = 1, 5, 64), and the ordered top-k sum instead of atomics."""
    base = km.default_plan(E, A, H, I)
    last = base.regimes[-1]
    plans = {
        "decode": km.Plan(10**9, base.gate_up_gemv, base.down_gemv, (km.Regime(10**9 + 1, None, last.gate_up, last.down),)),
        "grouped-sum": base._replace(atomic=False),
    }
    # every regime's tiles forced alone, from 16 x 64 x 128 to 128 x 128 x 128, weight rows or token
    # rows on the left (the MXFP8 and block-scale plans' tiles too)
    others = [r for g in ("mx32", "block") for r in km.default_plan(E, A, H, I, granularity=g).regimes]
    for i, r in enumerate(base.regimes + tuple(dict.fromkeys(r for r in others if r not in base.regimes))):
        plans[f"grouped-{i}"] = km.Plan(0, base.gate_up_gemv, base.down_gemv, (km.Regime(1, None, r.gate_up, r.down),))
    for scheme in ("mxfp8", "int8"):
        fmt, w, ref_fn = weights[scheme]
        for T in (1, 5, 64):
            ids, tw = _routing(T, "idle_experts", seed=T)
            x = _x(T, seed=T)
            ref = ref_fn(x, ids, tw)
            for name, plan in plans.items():
                _close(km.moe_triton(x, ids, tw, *w, fmt, plan), ref, TOLERANCE[x.dtype])


def test_e4m3_without_inline_ptx(weights):
    fmt, (q13, s13, q2, s2), ref_fn = weights["fp8-w"]
    ids, tw = _routing(40, "random")
    x = _x(40)
    plan = km.default_plan(E, A, H, I)
    h, srt, off = km.moe_gate_up_with_plan(x, ids, q13, s13, "channel", plan, asm=False)
    y = km.moe_down_with_plan(h, ids, tw, srt, off, q2, s2, "channel", plan, asm=False)
    _close(y, ref_fn(x, ids, tw), TOLERANCE[x.dtype])


def test_out_of_range_ids_contribute_nothing(weights):
    """Ids < 0 or >= E: no fault, no write outside the output, those slots add nothing."""
    fmt, w, ref_fn = weights["mxfp8"]
    for T in (1, 70):
        ids, tw = _routing(T, "random", seed=T)
        ids[0, 0] = -1
        ids[-1, -1] = E
        ids[T // 2, 1] = 2**40
        bad = (ids < 0) | (ids >= E)
        x = _x(T, seed=T)
        y = km.moe_triton(x, ids, tw, *w, fmt)
        torch.cuda.synchronize()
        _close(y, ref_fn(x, ids.masked_fill(bad, 0), tw.masked_fill(bad, 0)), TOLERANCE[x.dtype])


def test_writes_every_element_and_repeats(weights):
    """Output memory poisoned with NaN by the allocator's previous tenant; two runs equal
    (the atomic top-k sum may differ in the last bit of fp32, so compared at the tolerance)."""
    fmt, w, ref_fn = weights["int8"]
    for T in (1, 9, 300):
        ids, tw = _routing(T, "random", seed=T)
        x = _x(T, seed=T)
        torch.full((T * H * 8,), float("nan"), device="cuda")
        y1 = km.moe_triton(x, ids, tw, *w, fmt)
        y2 = km.moe_triton(x, ids, tw, *w, fmt)
        assert torch.isfinite(y1).all()
        _close(y2, y1, 2.0**-9)
    # the decode path and the ordered sum are deterministic
    for T, plan in ((1, None), (300, km.default_plan(E, A, H, I)._replace(atomic=False))):
        ids, tw = _routing(T, "random", seed=T)
        x = _x(T, seed=T)
        assert torch.equal(km.moe_triton(x, ids, tw, *w, fmt, plan), km.moe_triton(x, ids, tw, *w, fmt, plan))


def _opcheck(op, args):
    """opcheck's fake-tensor and autograd-registration checks, then "mutates nothing" on raw bytes.

    Not test_aot_dispatch_dynamic: it compares two runs' outputs, and the gate/up op's
    sorted_slots (and h, stored in that order) list an expert's slots in an order that
    varies between runs (atomic ranks), and are left unwritten on the decode path; y does
    not depend on that order. AOT dispatch with dynamic T is what
    test_compiles_once_and_inductor_launches_the_kernels runs. (test_schema needs a
    float8 allclose, which torch has no CUDA kernel for: tests/conftest.py.)"""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.view(torch.uint8).clone() for t in tensors]
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor"))
    out = op(*args)
    for b, t in zip(before, tensors):
        assert torch.equal(b, t.view(torch.uint8)), "an input was modified"
    return out


def test_opcheck(weights):
    fmt, (q13, s13, q2, s2), _ = weights["fp8-w-block"]
    for T in (1, 20):
        ids, tw = _routing(T, "random", seed=T)
        x = _x(T, seed=T)
        h, srt, off = _opcheck(torch.ops.mxpass.moe_gate_up_triton.default, (x, ids, q13, s13, "block"))
        _opcheck(torch.ops.mxpass.moe_down_triton.default, (h, ids, tw, srt, off, q2, s2, "block"))
        _opcheck(torch.ops.mxpass.moe_fused_triton.default, (x, ids, tw, q13, s13, q2, s2, "block", False))
        _, w8, _ = weights["int8"]
        _opcheck(torch.ops.mxpass.moe_fused_triton.default, (x, ids, tw, *w8, "channel", True))


@pytest.mark.parametrize("quantized", [False, True], ids=["fake-quantized", "fused-w8a8"])
def test_no_host_sync_and_cuda_graph_capture(weights, quantized):
    """Decode and grouped paths (activation quantization included: the ATen math around the
    two ops, or the fused op quantizing in its kernels) run with sync debug mode "error", are
    captured in a CUDA graph, and replays with new inputs match the reference (the fused
    op's grouped MMAs at their own tolerance, see test_quantized_activation_mmas)."""
    fmt, w, ref_fn = weights["fp8-dynamic"]

    def run(x, ids, tw):
        return km.moe_triton(x, ids, tw, *w, fmt, quantized_activations=quantized)

    for T in (1, 48):
        ids, tw = _routing(T, "random", seed=T)
        x = _x(T, seed=T)
        run(x, ids, tw)  # warm: compile outside the checks
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(x, ids, tw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = run(x, ids, tw)
        for seed in (11, 12):
            ids2, tw2 = _routing(T, "idle_experts" if seed == 12 else "random", seed=seed)
            x2 = _x(T, seed=seed)
            ids.copy_(ids2), tw.copy_(tw2), x.copy_(x2)
            g.replay()
            _close(y, ref_fn(x2, ids2, tw2), TOLERANCE[x.dtype] if T == 1 or not quantized else 2.0**-5)


def _lowering_backend(gm, example_inputs):
    """What mxpass.backend does after its passes: mxpass op nodes lowered, then Inductor."""
    from torch._inductor.compile_fx import compile_fx

    from mxpass.lowering.nodes import lower_mxpass_nodes

    assert lower_mxpass_nodes(gm) == 1  # the node is mxpass::moe.default, as the MoE pass emits it
    return compile_fx(gm, example_inputs)


def test_compiles_once_and_inductor_launches_the_kernels(weights):
    """``mxpass::moe`` through the lowering: one Inductor graph for T in {3, 17, 64, 300} (decode
    and every grouped regime but the last, which is forced in test_every_path_alone), whose
    code launches our kernels, not the ops."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fmt, w, ref_fn = weights["mxfp8"]
    backend = CountingBackend(_lowering_backend)
    f = torch.compile(lambda x, ids, tw: torch.ops.mxpass.moe.default(x, ids, tw, *w, fmt.name, "silu"),
                      backend=backend, dynamic=True)
    code = ""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, T in enumerate((3, 17, 64, 300)):
            ids, tw = _routing(T, "random", seed=T)
            x = _x(T, seed=T)
            y, codes = run_and_get_code(f, x, ids, tw) if i == 0 else (f(x, ids, tw), None)
            err = rel_error(y, ref_fn(x, ids, tw))
            print(f"T={T}: compiled vs reference {err:.2e}")
            assert err <= 2.0**-6
            code = code or "\n".join(codes)
    assert backend.graphs == 1
    for name in ("_moe_prep_kernel", "_moe_count_kernel", "_moe_scatter_kernel", "_moe_gate_up_kernel",
                 "_moe_down_kernel", "_moe_gate_up_gemv_kernel", "_moe_down_gemv_kernel", "_moe_cast_kernel",
                 "_moe_fill_kernel"):
        assert name in code, name
    assert "mxpass.moe_gate_up_triton" not in code and "mxpass.moe_down_triton" not in code
    assert "mxpass.moe.default" not in code


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "int8"])
def test_quantized_activation_mmas(weights, scheme):
    """triton_moe_w8a8's path: the fused op quantizing x and h in its kernels. The decode path
    rounds q * s to bf16 as the reference does (same tolerance as above); the grouped e4m3 /
    int8 MMAs use q * s unrounded, which h's requantization amplifies (1.3e-2 to 1.5e-2
    measured on Qwen3-30B shapes; a missing scale or a wrong expert gives order 1), so 2**-5,
    and it must be as close to the unquantized MoE (bf16 weights, fp32 math) as the reference
    is: within 5% of the reference's own error (measured: equal to 3 digits). T = 300 takes
    the count / scatter alignment (S = 1200 > ALIGN_MAX); T = 600 and 2100 the W8A8 plan's
    own tiles (128 and 512 slots per expert and up)."""
    from mxpass.ops import experts_reference

    fmt, w, ref_fn = weights[scheme]
    w13f, w2f = weights[None][1][0], weights[None][1][2]  # the same bf16 weights (same seed)
    for T in (1, 3, 17, 64, 300, 600, 2100):
        ids, tw = _routing(T, "idle_experts", seed=T)
        x = _x(T, seed=T)
        y = km.moe_triton(x, ids, tw, *w, fmt, quantized_activations=True)
        ref = ref_fn(x, ids, tw)
        err = rel_error(y, ref)
        unq = experts_reference(x.float(), ids, tw.float(), w13f.float(), w2f.float(), "silu")
        mine, theirs = rel_error(y, unq), rel_error(ref, unq)
        print(f"{scheme} T={T}: vs reference {err:.2e}; vs unquantized {mine:.3e} (reference {theirs:.3e})")
        assert err <= (TOLERANCE[x.dtype] if T == 1 else 2.0**-5)  # decode only at T = 1 (E = 16)
        assert mine <= 1.05 * theirs


def test_registry_order():
    from mxpass.lowering import registry
    from mxpass.lowering.moe import moe_problem

    gpu = torch.device("cuda", 0)
    for scheme, kernel in (("mxfp8", "triton_moe"), ("fp8-dynamic", "triton_moe_w8a8"), ("fp8-w-block", "triton_moe"),
                           ("int8", "triton_moe_w8a8"), ("fp8-w", "triton_moe")):
        choice = registry.choose(moe_problem(get_format(scheme), gpu, H, I, torch.bfloat16))
        assert choice.kernel.name == kernel, choice.describe()
    choice = registry.choose(moe_problem(get_format("mxfp8"), gpu, H, I, torch.float32))
    assert choice.kernel.name == "reference" and "bf16 or fp16" in choice.describe()


def test_forcing_the_w8a8_kernel(monkeypatch):
    from mxpass.lowering import registry
    from mxpass.lowering.moe import moe_problem
    from mxpass.lowering.registry import Problem

    gpu = torch.device("cuda", 0)
    monkeypatch.setenv("MXPASS_KERNEL", "triton_moe")  # the reference's numerics for a W8A8 format
    assert registry.choose(moe_problem(get_format("int8"), gpu, H, I, torch.bfloat16)).kernel.name == "triton_moe"
    monkeypatch.setenv("MXPASS_KERNEL", "triton_moe_w8a8")
    with pytest.raises(registry.NoKernelError, match="needs per-token activations"):
        registry.choose(moe_problem(get_format("mxfp8"), gpu, H, I, torch.bfloat16))
    # linears have no kernel of that name: they keep their own order
    assert registry.choose(Problem("linear", get_format("mxfp8"), gpu, H, I, torch.bfloat16)).kernel.name == "triton_mxfp8"


QWEN3_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128)


@pytest.mark.parametrize("scheme, tokens, kernel, launched", [
    ("mxfp8", 1, "triton_moe (", ("_moe_gate_up_gemv_kernel", "_moe_down_gemv_kernel")),
    ("fp8-dynamic", 8, "triton_moe_w8a8", ("_moe_prep_kernel", "_moe_gate_up_q_kernel", "_moe_down_q_kernel"))])
def test_tiny_qwen3_moe_compiled(monkeypatch, scheme, tokens, kernel, launched):
    """HF Qwen3-MoE through the mxpass backend with CUDA graphs: MXFP8 at one token (decode
    kernels), fp8-dynamic at 8 tokens (the fused W8A8 op, grouped kernels). The report names
    the kernel, Inductor's code launches it, the logits match the op-by-op reference, the graph
    is replayed (no cudagraph skips) and a replay syncs nothing."""
    import transformers
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**QWEN3_TINY),
                                                              dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (1, tokens), device="cuda")
    with torch.inference_mode():
        ref = torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager"), fullgraph=True)(ids).logits
        torch._dynamo.reset()
        counters.clear()
        fast = torch.compile(model, backend=mxpass.backend(scheme=scheme, cudagraphs=True), fullgraph=True)
        _, codes = run_and_get_code(fast, ids)
        report = mxpass.last_report()
        moe = [r for r in report.rewritten if r.kind == "moe"]
        assert len(moe) == 2 and all(r.kernel.startswith(kernel) for r in moe), [r.kernel for r in moe]
        for name in launched:
            assert name in "\n".join(codes), name
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = fast(ids).logits.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.compiler.cudagraph_mark_step_begin()
            fast(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert counters["inductor"]["cudagraph_skips"] == 0
    # quantized activations downstream amplify last-bit differences (see test_e2e), and a
    # router near-tie can send a token elsewhere; a broken kernel gives ~1
    err = rel_error(out, ref)
    print(f"logits relative error vs the op-by-op reference {err:.2e}")
    assert err < 0.1
