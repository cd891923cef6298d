"""Real Hugging Face models (tiny configs, and the real MiniLM) through Inductor on CPU.

Every compile is fullgraph=True: a graph break fails the test. Outputs are compared with
the same rewritten graph run op by op (``compiler="eager"``: the mxpass reference).

Tolerance: both sides use the same quantized weights and fp32 math, but Inductor fuses
and reorders fp32 reductions (RMSNorm, softmax, matmul). A last-bit difference upstream
can move an activation across an e4m3 rounding boundary (one e4m3 step is 6-12% of the
element), so a few elements of each layer's input may differ by one quantization step.
Measured relative Frobenius error of the logits: up to ~2e-3 (torch 2.13 CPU, fp32); we
allow 1e-2, and a wrong kernel (e.g. a transposed or unscaled weight) gives ~1.
"""

import pytest
import torch
import transformers

import mxpass
from tests.conftest import CountingBackend, rel_err

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256),
    "bert": lambda: transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, vocab_size=256),
}


def _build(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_model_fullgraph_matches_reference(name):
    model = _build(name)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = _out(torch.compile(model, backend=mxpass.backend(compiler="eager"), fullgraph=True)(ids))
        torch._dynamo.reset()
        got = _out(torch.compile(model, backend=mxpass.backend, fullgraph=True)(ids))
        plain = _out(model(ids))
    rep = mxpass.last_report()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if name == "gpt2":  # Conv1D: c_attn, c_proj, c_fc, c_proj per layer, all addmm
        assert {r.kind for r in rep.rewritten} == {"addmm"} and len(rep.rewritten) == 8
    else:
        assert len(rep.rewritten) + len(rep.kept) == n_linear
    assert all(k.fqn == "lm_head" for k in rep.kept)
    assert rel_err(got, ref) < 1e-2
    # the quantization is real: the output moved away from the unquantized model, a little
    assert 1e-4 < rel_err(got, plain) < 0.1


def test_dynamic_tokens_compile_once():
    """HF Llama, token dim dynamic: one graph serves M in {3, 17, 128, 2048}, each M right.

    M=1 takes one more graph, with or without mxpass: Dynamo specializes sizes 0/1, and
    transformers' mask code branches on ``q_length == 1`` (masking_utils, sdpa mask), so a
    1-token decode is its own graph. ``test_mxpass_adds_no_token_guards`` shows mxpass itself
    guards on nothing.
    """
    model = _build("llama")
    be = CountingBackend(mxpass.backend)
    fast = torch.compile(model, backend=be, fullgraph=True)
    ref = torch.compile(model, backend=mxpass.backend(compiler="eager"), fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (3, 17, 128, 2048):
            ids = torch.randint(0, 256, (1, m))
            torch._dynamo.mark_dynamic(ids, 1)
            assert rel_err(fast(ids).logits, ref(ids).logits) < 1e-2, m
    assert be.graphs == 1


class MLPStack(torch.nn.Module):
    """RMSNorm -> gate/up -> SiLU*mul -> down, twice: the linear-heavy part of a decoder."""

    def __init__(self, h=64, i=128):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=i)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"norm": LlamaRMSNorm(h), "mlp": LlamaMLP(cfg)}) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](layer["norm"](x))
        return x


def test_mxpass_adds_no_token_guards():
    """With size-oblivious guards (no 0/1 specialization), M in {1, 3, 17, 128, 2048} is one graph."""
    torch.manual_seed(0)
    model = MLPStack().eval()
    be = CountingBackend(mxpass.backend)
    fast = torch.compile(model, backend=be, fullgraph=True)
    ref = torch.compile(model, backend=mxpass.backend(compiler="eager"), fullgraph=True)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True), torch.no_grad():
        for m in (1, 3, 17, 128, 2048):
            x = torch.randn(m, 64)
            torch._dynamo.mark_dynamic(x, 0)
            assert rel_err(fast(x), ref(x)) < 1e-2, m
    assert be.graphs == 1


def test_real_minilm_accuracy():
    """The real all-MiniLM-L6-v2: sentence embeddings stay within cosine 0.99 of fp32.

    Measured (torch 2.13 CPU, fp32 model, MXFP8 W8A8, 16 sentences): mean 0.9972, min 0.9962.
    A threshold of 0.99 leaves room for platform differences; a broken kernel gives < 0.5.
    """
    from mxpass.demo import SENTENCES, embed, load_minilm

    tok, model = load_minilm("cpu", torch.float32)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = embed(model, batch)
        got = embed(torch.compile(model, backend=mxpass.backend, fullgraph=True), batch)
    rep = mxpass.last_report()
    assert len(rep.rewritten) == 6 * 6 + 1 and not rep.kept  # q k v o, up, down per layer + pooler
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99, cos
