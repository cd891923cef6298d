"""Every MoE architecture of the installed transformers (experts as 3-D ``gate_up_proj`` /
``down_proj`` in one module, the v5 convention, and some that store them otherwise): a tiny
model from a config, the mxpass pass run op by op (``compiler="eager"``: no Inductor, a second or
so per model), and what became of each experts module and of every other weight of three or more
dims (two of them larger than 1). Each is rewritten into ``mxpass::moe`` or kept with a reason;
none stays unreported.

Only the experts are quantized here (every other layer is ignored), with MXFP8 weights and
activations in the model dtype (``mxfp8-w``), so the rewritten model must compute what the same
model computes eagerly with its expert weights replaced by their dequantized values: that checks
recognition, gate/up layout, activation function and routing weights at once. Measured
difference: at most 2.4e-7 relative on the logits (transformers 5.23, torch 2.13 CPU, fp32; the
op sums in another order); allowed 1e-5. Against the unquantized model the same logits move by
0.1-14% (a tiny random model's top-k routing flips on small changes); a wrong expert, layout or
activation would also show against the dequantized model. Kept experts leave the model as it
was: allowed 1e-5 against it.

An architecture that this transformers does not have, or whose tiny config does not build or run
unquantized, is skipped: that is about the config below, not about mxpass.
"""

import copy
import gc

import pytest
import torch
import transformers

import mxpass
from mxpass import quant
from mxpass.formats import get_format
from mxpass.passes.moe import use_grouped_mm

SIZES = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
             max_position_embeddings=256, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, moe_topk=2, top_k=2, first_k_dense_replace=0, n_group=1, topk_group=1,
             decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=64,
             n_shared_experts=1, sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: MLA attention (DeepSeek-V2/V3 and its descendants): as many kv heads as heads, head_dim derived
MLA = dict(num_key_value_heads=4, head_dim=None)
OVERRIDES = {name: MLA for name in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                                    "axk1", "axk2")}
#: architectures whose experts mxpass keeps, and the reason it gives
KEPT = {
    "gpt_oss": "mxpass::moe has no expert biases",
    "nemotron_h": "are not gate_up [E, 2I, H] and down [E, H, I]",
    "deepseek_v4": "its output matches no MoE that mxpass implements",
    "hy_v4": "its output matches no MoE that mxpass implements",
    "minimax_m3_vl_text": "its output matches no MoE that mxpass implements",
    "llama4_text": "are not gate_up [E, 2I, H] and down [E, H, I]",  # stored [E, H, 2I]
    "jetmoe": "weights outside any experts module mxpass recognizes",  # one module per 3-D weight
}
#: architectures whose experts mxpass rewrites (those of this list that transformers has)
REWRITTEN = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "phimoe",
             "minimax", "minimax_m2", "dots1", "granitemoe", "granitemoeshared", "granitemoehybrid",
             "granitemoe_swa", "solar_open", "flex_olmo", "jamba", "qwen3_next", "bailing_hybrid", "exaone_moe",
             "cohere2_moe", "afmoe", "flint", "hy_v3", "kimi_linear", "kolibri1", "laguna", "mellum",
             "mimo_v2_flash", "qwen3_5_moe_text", "qwen4_exp_text", *OVERRIDES]
ONLY_EXPERTS = ["re:^(?!.*experts$).*"]  # ignore every layer but the experts modules


def _experts_modules(model) -> list[str]:
    """Modules holding at least two 3-D Parameters of their own: the experts of the convention."""
    return [name for name, mod in model.named_modules()
            if sum(p.dim() == 3 for p in mod.parameters(recurse=False)) >= 2]


def _tiny(model_type: str):
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    try:
        sizes = {**SIZES, **OVERRIDES.get(model_type, {})}
        cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if v is not None})
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(3, 256, (2, 9))
        with torch.no_grad():
            plain = model(ids, use_cache=False).logits
    except Exception as e:  # the tiny config, not mxpass
        pytest.skip(f"tiny {model_type} does not build or run here: {type(e).__name__}: {str(e)[:120]}")
    return model, ids, plain


def _other_layer(why: str) -> bool:
    """A kept entry for a weight that is not an expert's: a convolution (Qwen3.5 / Kimi linear
    attention) or a 2-D weight viewed in groups before a matmul (DeepSeek-V4's o_a_proj)."""
    return why.startswith("convolution") or "viewed or sliced before a matmul" in why


def _with_dequantized_experts(model, experts: list[str], fmt):
    """A copy of ``model`` whose experts' 3-D weights hold their quantize-dequantized values
    (each expert's [rows, K] matrix quantized along its last dim, as mxpass stores it)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name in experts:
            for p in model.get_submodule(name).parameters(recurse=False):
                if p.dim() == 3:
                    p.copy_(torch.stack([quant.dequantize_weight(fmt, *quant.quantize_weight(fmt, w, name))
                                         for w in p]).to(p.dtype))
    return model


@pytest.mark.parametrize("model_type", REWRITTEN + list(KEPT))
def test_every_experts_module_rewritten_or_kept_with_reason(model_type):
    model, ids, plain = _tiny(model_type)
    experts = _experts_modules(model)
    weights_3d = [name for name, p in model.named_parameters() if p.dim() >= 3 and sum(d > 1 for d in p.shape) >= 2]
    if not weights_3d:
        pytest.skip(f"tiny {model_type} has no MoE layer (its dense layers come first)")
    fmt = get_format("mxfp8-w")
    use_grouped_mm(model)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(model, backend=mxpass.backend(scheme=fmt.name, compiler="eager", ignore=ONLY_EXPERTS),
                                fullgraph=True)(ids, use_cache=False).logits
        report = mxpass.last_report()
    finally:
        torch._dynamo.reset()
    rewritten = {r.fqn: r for r in report.rewritten if r.kind == "moe"}
    kept = {k.fqn: k.reason for k in report.kept if not k.reason.startswith("ignored by")}
    # every weight of three or more dims lies under a report entry: nothing stays unreported
    entries = rewritten.keys() | kept.keys()
    assert all(any(w.startswith(f + ".") for f in entries) for w in weights_3d), (weights_3d, entries)
    assert set(experts) <= entries, (experts, entries)
    if model_type in KEPT:
        assert not rewritten
        assert any(KEPT[model_type] in why for why in kept.values()), kept
        assert all(KEPT[model_type] in why or _other_layer(why) for why in kept.values()), kept
        expected = plain
    else:
        assert experts and set(experts) == rewritten.keys(), (experts, rewritten.keys())
        assert all(_other_layer(why) for why in kept.values()), kept
        assert all("silu, gate/up layout gate_up" in r.kernel for r in rewritten.values())
        with torch.no_grad():
            expected = _with_dequantized_experts(model, experts, fmt)(ids, use_cache=False).logits
        assert ((got - plain).norm() / plain.norm()).item() > 1e-5  # the experts did change
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    del model
    gc.collect()
    assert err < 1e-5, err
