"""Whole-model forward: HF Llama with Llama-3-8B shapes (4 layers), bf16 torch.compile vs mxpass.

Both sides are compiled the same way (Inductor, fullgraph) and timed the same way, in one
run: 1 token with CUDA graphs (the decode case) and without, and 2048 tokens. Random
weights (bf16, std 0.02), random token ids; the outputs are compared first.
"""

from __future__ import annotations

import time

import torch

LLAMA_8B_4L = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=8192, rope_theta=500000.0)


def build_llama(config: dict = LLAMA_8B_4L, device="cuda", dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval()


def _median_ms(fn, cudagraphs: bool, iters: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run(scheme: str = "mxfp8", tokens=(1, 2048)) -> list[dict]:
    import mxpass

    model = build_llama()
    rows = []
    for m in tokens:
        ids = torch.randint(0, LLAMA_8B_4L["vocab_size"], (1, m), device="cuda")
        for cudagraphs in ((True, False) if m == 1 else (False,)):
            torch._dynamo.reset()
            variants = {
                "bf16 torch.compile": torch.compile(
                    model, fullgraph=True, mode="reduce-overhead" if cudagraphs else None),
                f"mxpass {scheme}": torch.compile(
                    model, fullgraph=True, backend=mxpass.backend(scheme=scheme, cudagraphs=cudagraphs)),
            }
            outs, times = {}, {}
            with torch.inference_mode():
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    call = (lambda fn=fn: fn(ids, use_cache=False).logits)
                    if cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    outs[name] = call().float().clone()
                    compile_s = time.perf_counter() - t0
                    times[name] = _median_ms(call, cudagraphs)
                    print(f"  M={m} graphs={cudagraphs} {name}: {times[name]:.3f} ms (compile {compile_s:.0f} s)")
            base, ours = times["bf16 torch.compile"], times[f"mxpass {scheme}"]
            a, b = outs["bf16 torch.compile"], outs[f"mxpass {scheme}"]
            rel = ((b - a).norm() / a.norm()).item()
            rows.append(dict(bench="llama8b-4layers", tokens=m, cudagraphs=cudagraphs, scheme=scheme,
                             bf16_ms=base, mxpass_ms=ours, speedup=base / ours, logits_rel_diff=rel))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| tokens | CUDA graphs | bf16 torch.compile ms | mxpass ms | speedup | logits rel. diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {'yes' if r['cudagraphs'] else 'no'} | {r['bf16_ms']:.3f} | "
                     f"{r['mxpass_ms']:.3f} | {r['speedup']:.2f}x | {r['logits_rel_diff']:.3f} |")
    return "\n".join(lines)
