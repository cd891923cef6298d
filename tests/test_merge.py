"""Layers that read the same input run as one GEMM on their stacked quantized weights."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import mxpass
from mxpass.weights import merged_weight, quantized_weight

LLAMA = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=1, vocab_size=128)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def _logits(model, ids, **kw):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=mxpass.backend(**kw))(ids).logits
    return out, mxpass.last_report()


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "mxfp8", "int8", "fp8-block", "fp8-w"])
def test_merged_layers_compute_what_separate_layers_do(llama, scheme):
    """q/k/v and gate/up become one GEMM each; op by op, the logits equal the unmerged graph's
    bit for bit (every output row keeps its own scales), and the report says so per layer."""
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    merged, rep = _logits(llama, ids, scheme=scheme, compiler="eager")
    by = {r.fqn.rsplit(".", 1)[-1]: r for r in rep.rewritten}
    assert by["q_proj"].merged == "merged: q_proj+k_proj+v_proj as one 512 x 256 GEMM (rows 0:256)"
    assert by["v_proj"].merged.endswith("(rows 384:512)")
    assert by["up_proj"].merged == "merged: gate_proj+up_proj as one 768 x 256 GEMM (rows 384:768)"
    assert by["o_proj"].merged == "" and by["down_proj"].merged == ""
    assert by["q_proj"].shape == (256, 256) and by["k_proj"].shape == (128, 256)
    assert "v_proj: merged: q_proj+k_proj+v_proj" in rep.table()
    separate, rep2 = _logits(llama, ids, scheme=scheme, compiler="eager", merge=False)
    assert {r.merged for r in rep2.rewritten} >= {"not merged with q_proj+k_proj+v_proj: disabled (merge=False)"}
    assert torch.equal(merged, separate)


def test_merged_weight_is_stored_once_and_reused(llama):
    """The layers' own quantized weights become row slices of the stacked tensor, and a
    recompile finds the same stacked tensor."""
    attn = llama.model.layers[0].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    fmt = mxpass.get_format("mxfp8")
    data, scale = merged_weight(params, fmt, [False] * 3, ["q", "k", "v"])
    again, _ = merged_weight(params, fmt, [False] * 3, ["q", "k", "v"])
    assert again is data
    k_data, k_scale = quantized_weight(attn.k_proj.weight, fmt, False, "k")
    assert k_data._base is data and k_data.data_ptr() == data[256:].data_ptr()
    assert k_scale._base is scale and torch.equal(k_scale.view(torch.uint8), scale[256:384].view(torch.uint8))
    alone = mxpass.quant.quantize_weight(fmt, attn.k_proj.weight.detach(), "k")
    assert torch.equal(k_data.view(torch.uint8), alone[0].view(torch.uint8))
    with torch.no_grad():
        attn.v_proj.weight.mul_(2)  # changed in place: stacked again with the new values
    fresh, _ = merged_weight(params, fmt, [False] * 3, ["q", "k", "v"])
    assert fresh is not data
    v_alone = mxpass.quant.quantize_weight(fmt, attn.v_proj.weight.detach(), "v")[0]
    assert torch.equal(fresh[384:].view(torch.uint8), v_alone.view(torch.uint8))
    with torch.no_grad():
        attn.v_proj.weight.div_(2)


def test_biases_are_stacked():
    """Qwen2's q/k/v carry biases: the merged layer adds the stacked biases; compiled and op by
    op it matches the unmerged layers."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=128)).eval()
    with torch.no_grad():
        for p in (model.model.layers[0].self_attn.k_proj.bias, model.model.layers[0].self_attn.v_proj.bias):
            p.normal_()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    separate, _ = _logits(model, ids, scheme="fp8-dynamic", compiler="eager", merge=False)
    merged, rep = _logits(model, ids, scheme="fp8-dynamic", compiler="eager")
    assert next(r for r in rep.rewritten if r.fqn.endswith("k_proj")).merged.startswith("merged: q_proj+k_proj+v_proj")
    assert torch.equal(merged, separate)
    compiled, _ = _logits(model, ids, scheme="fp8-dynamic")
    torch.testing.assert_close(compiled, separate, atol=2e-2, rtol=2e-2)  # Inductor's own float order


class TwoHeads(torch.nn.Module):
    def __init__(self, flatten: bool):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 64, bias=False)
        self.flatten = flatten

    def forward(self, x):
        a = self.a(x)
        a = a.view(-1) if self.flatten else a.view(*x.shape[:-1], 4, 8)
        return a.sum() + self.b(x).sum()


@pytest.mark.parametrize("scheme, flatten, why", [
    ("fp8-dynamic", True, "a: output viewed as (160,) (merges its last dimension with others)"),
    ("fp8-w-tensor", False, "per-tensor weight scales"),
    ("fp8", False, "static activation scales are per layer"),
    ("fp8-dynamic", False, None),
])
def test_layers_that_cannot_merge_say_why(scheme, flatten, why):
    torch.manual_seed(0)
    model = TwoHeads(flatten)
    x = torch.randn(5, 64)
    scales = {"a": 0.05, "b": 0.05} if scheme == "fp8" else None
    ref, _ = _ran(model, x, scheme=scheme, compiler="eager", merge=False, activation_scales=scales)
    out, rep = _ran(model, x, scheme=scheme, compiler="eager", activation_scales=scales)
    for r in rep.rewritten:
        assert r.merged == (f"not merged with a+b: {why}" if why else
                            f"merged: a+b as one 96 x 64 GEMM (rows {'0:32' if r.fqn == 'a' else '32:96'})")
    # float32 model: the CPU GEMM's blocking (and so its summation order) depends on N
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _ran(model, x, **kw):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=mxpass.backend(**kw))(x)
    return out, mxpass.last_report()


def test_merged_layers_under_inductor_match_the_reference(llama):
    """Compiled by Inductor on the CPU: the merged graph matches the op-by-op reference, and
    the generated code runs two GEMMs fewer per decoder layer (q/k/v as one, gate/up as one)."""
    from torch._inductor.utils import run_and_get_code

    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    ref, _ = _logits(llama, ids, scheme="int8", compiler="eager")
    counts = {}
    for merge in (True, False):
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(llama, backend=mxpass.backend(scheme="int8", merge=merge)),
                                         ids)
        counts[merge] = "\n".join(code).count("torch.ops.mxpass.") + "\n".join(code).count("extern_kernels.")
        if merge:
            torch.testing.assert_close(out.logits, ref, atol=2e-2, rtol=2e-2)
    assert counts[True] == counts[False] - 3, counts
