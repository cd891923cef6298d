"""Merged q/k/v and gate/up on the GPU: the kernels the registry picks for the stacked
weights (the CUDA GEMV at a static M = 1, cuBLAS / Triton for a dynamic M), under CUDA graphs."""

import pytest
import torch

import mxpass

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def llama():
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**TINY), dtype=torch.bfloat16).eval()


def _run(model, ids, dynamic, **kw):
    torch._dynamo.reset()
    fn = torch.compile(model, backend=mxpass.backend(**kw), dynamic=dynamic)
    with torch.inference_mode():
        for _ in range(2):  # the second call replays the CUDA graph
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(ids, use_cache=False).logits.float().clone()
    return out, mxpass.last_report()


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "int8", "mxfp8", "fp8-block", "fp8-w"])
@pytest.mark.parametrize("tokens, dynamic", [(1, False), (9, True)])
def test_merged_matches_unmerged_on_the_gpu(llama, scheme, tokens, dynamic):
    ids = torch.randint(0, 512, (1, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(tokens))
    ref, ref_rep = _run(llama, ids, dynamic, scheme=scheme, cudagraphs=True, merge=False)
    out, rep = _run(llama, ids, dynamic, scheme=scheme, cudagraphs=True)
    q = next(r for r in rep.rewritten if r.fqn.endswith("layers.0.self_attn.q_proj"))
    assert q.merged.startswith("merged: q_proj+k_proj+v_proj as one 512 x 256 GEMM"), q.merged
    separate = next(r for r in ref_rep.rewritten if r.fqn.endswith("layers.0.self_attn.q_proj"))
    print(scheme, tokens, "merged:", q.kernel.split(" (")[0], "separate:", separate.kernel.split(" (")[0])
    err = ((out - ref).norm() / ref.norm()).item()
    # same activation quantization on both sides; the GEMMs differ in their fp32 summation
    # order (another split of K for another N) and round to bf16: last-place differences
    assert err < 1e-2, (scheme, tokens, err)
