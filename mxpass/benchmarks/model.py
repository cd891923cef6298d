"""Whole-model forward, bf16 torch.compile vs mxpass, in one run.

- ``run``: HF Llama with Llama-3-8B shapes (4 layers): 1 token with CUDA graphs (the
  decode case) and without, and 2048 tokens.
- ``run_moe``: HF Qwen3-MoE with Qwen3-30B-A3B shapes (4 layers, 128 experts, top-8), 1 token
  with CUDA graphs. The bf16 side runs transformers' grouped_mm experts implementation (the
  eager loop graph-breaks); mxpass with the lm_head kept bf16 (the default) and quantized
  (``quantize_lm_head=True``): the 151936 x 2048 lm_head alone streams 622 MB in bf16.

Both sides are compiled the same way (Inductor, fullgraph) and timed the same way, twice:
each forward on its own between CUDA events with a synchronization after it (``*_ms``: what
one request waits, host-side launch or graph replay included), and 20 forwards launched
back to back (``*_ms_b2b``: the GPU's time per forward once the host runs ahead). Random
weights (bf16, std 0.02), random token ids; the outputs are compared first.
"""

from __future__ import annotations

import time

import torch

LLAMA_8B_4L = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=8192, rope_theta=500000.0)


QWEN3_MOE_30B_A3B_4L = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=4,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                            max_position_embeddings=40960, rope_theta=1000000.0, decoder_sparse_step=1,
                            mlp_only_layers=[])


def build_qwen3_moe(config: dict = QWEN3_MOE_30B_A3B_4L, device="cuda", dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**config), dtype=dtype)
    with torch.no_grad():  # from_config initializes the 3-D experts with zeros on some versions
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval()


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


def _back_to_back_ms(fn, cudagraphs: bool, calls: int = 20, trials: int = 7) -> float:
    """Median over ``trials`` of the time per forward of ``calls`` forwards launched back to back."""
    times = []
    for _ in range(trials):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2]


def run(scheme: str = "mxfp8", tokens=(1, 2048), merge=(True,), graphs=(True, False),
        lm_head=(False,)) -> list[dict]:
    """Llama 8B shapes, 4 layers: bf16 torch.compile against mxpass ``scheme``, once per
    ``merge`` setting (``(True, False)`` also times the layers unmerged, in the same run) and
    per ``lm_head`` setting (``quantize_lm_head``; the 128256 x 4096 lm_head streams 1.05 GB
    in bf16); 1 token with and without CUDA graphs (``graphs``), more tokens without."""
    import mxpass

    model = build_llama()
    rows = []
    for m in tokens:
        ids = torch.randint(0, LLAMA_8B_4L["vocab_size"], (1, m), device="cuda")
        for cudagraphs in (graphs if m == 1 else (False,)):
            torch._dynamo.reset()
            variants = {"bf16 torch.compile": torch.compile(
                model, fullgraph=True, mode="reduce-overhead" if cudagraphs else None)}
            settings = {f"mxpass {scheme}" + ("" if mg else " merge=False") + (" +lm_head" if lq else ""): (mg, lq)
                        for mg in merge for lq in lm_head}
            for name, (mg, lq) in settings.items():
                variants[name] = torch.compile(model, fullgraph=True, backend=mxpass.backend(
                    scheme=scheme, cudagraphs=cudagraphs, merge=mg, quantize_lm_head=lq))
            outs, times, b2b = {}, {}, {}
            with torch.inference_mode():
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    call = (lambda fn=fn: fn(ids, use_cache=False).logits)
                    if cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    outs[name] = call().float().clone()
                    compile_s = time.perf_counter() - t0
                    times[name] = _median_ms(call, cudagraphs)
                    b2b[name] = _back_to_back_ms(call, cudagraphs)
                    print(f"  M={m} graphs={cudagraphs} {name}: {times[name]:.3f} ms, back to back "
                          f"{b2b[name]:.3f} ms (compile {compile_s:.0f} s)")
            base, a = times["bf16 torch.compile"], outs["bf16 torch.compile"]
            for name, (mg, lq) in settings.items():
                rel = ((outs[name] - a).norm() / a.norm()).item()
                rows.append(dict(bench="llama8b-4layers", tokens=m, cudagraphs=cudagraphs, scheme=scheme, merge=mg,
                                 lm_head_quantized=lq, bf16_ms=base, mxpass_ms=times[name],
                                 speedup=base / times[name], logits_rel_diff=rel,
                                 **_b2b_columns(b2b["bf16 torch.compile"], b2b[name])))
    return rows


def run_moe(schemes=("fp8-dynamic", "mxfp8")) -> list[dict]:
    """Qwen3-MoE 30B-A3B shapes, 4 layers, 1 token, CUDA graphs on both sides."""
    import mxpass
    from mxpass.passes.moe import use_grouped_mm

    model = build_qwen3_moe()
    notes = use_grouped_mm(model)
    print("  " + "; ".join(notes))
    ids = torch.randint(0, QWEN3_MOE_30B_A3B_4L["vocab_size"], (1, 1), device="cuda")
    variants = {"bf16 torch.compile": lambda: torch.compile(model, fullgraph=True, mode="reduce-overhead")}
    for scheme in schemes:
        for lm_head in (False, True):
            variants[f"mxpass {scheme}" + (" +lm_head" if lm_head else "")] = (
                lambda scheme=scheme, lm_head=lm_head: torch.compile(
                    model, fullgraph=True,
                    backend=mxpass.backend(scheme=scheme, cudagraphs=True, quantize_lm_head=lm_head)))
    outs, times, kernels, b2b = {}, {}, {}, {}
    with torch.inference_mode():
        for name, make in variants.items():
            torch._dynamo.reset()
            fn = make()
            call = (lambda fn=fn: fn(ids, use_cache=False).logits)
            t0 = time.perf_counter()
            torch.compiler.cudagraph_mark_step_begin()
            outs[name] = call().float().clone()
            compile_s = time.perf_counter() - t0
            if name != "bf16 torch.compile":
                rep = mxpass.last_report()
                kernels[name] = sorted({f"{e.kind}:{e.kernel.split(' ')[0]}" for e in rep.rewritten})
            times[name] = _median_ms(call, True, iters=100, warmup=10)
            b2b[name] = _back_to_back_ms(call, True)
            print(f"  qwen3-moe 1 token {name}: {times[name]:.3f} ms, back to back {b2b[name]:.3f} ms "
                  f"(compile {compile_s:.0f} s) {kernels.get(name, '')}")
    base = times["bf16 torch.compile"]
    a = outs["bf16 torch.compile"]
    rows = []
    for name, t in times.items():
        if name == "bf16 torch.compile":
            continue
        rel = ((outs[name] - a).norm() / a.norm()).item()
        rows.append(dict(bench="qwen3-moe-30b-a3b-4layers", tokens=1, cudagraphs=True, scheme=name.split()[1],
                         lm_head_quantized=name.endswith("+lm_head"), kernels=kernels[name],
                         bf16_ms=base, mxpass_ms=t, speedup=base / t, logits_rel_diff=rel,
                         **_b2b_columns(b2b["bf16 torch.compile"], b2b[name])))
    return rows


def _b2b_columns(bf16_ms: float, mxpass_ms: float) -> dict:
    return dict(bf16_ms_b2b=bf16_ms, mxpass_ms_b2b=mxpass_ms, speedup_b2b=bf16_ms / mxpass_ms)


def _table(rows: list[dict], first: tuple[str, str], second: tuple[str, str]) -> str:
    """Markdown rows: two leading columns (header, row -> cell), then the timing columns."""
    cols = (first, second)
    lines = ["| " + " | ".join(h for h, _ in cols) + " | bf16 torch.compile ms | mxpass ms | speedup "
             "| back to back: bf16 / mxpass ms | speedup | logits rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = " | ".join(str(cell(r)) for _, cell in cols)
        b2b = (f"{r['bf16_ms_b2b']:.3f} / {r['mxpass_ms_b2b']:.3f} | {r['speedup_b2b']:.2f}x"
               if "speedup_b2b" in r else " | ")
        lines.append(f"| {lead} | {r['bf16_ms']:.3f} | {r['mxpass_ms']:.3f} | {r['speedup']:.2f}x | {b2b} | "
                     f"{r['logits_rel_diff']:.3f} |")
    return "\n".join(lines)


def format_moe_table(rows: list[dict]) -> str:
    return _table(rows, ("scheme", lambda r: r["scheme"]),
                  ("lm_head", lambda r: "quantized" if r["lm_head_quantized"] else "bf16"))


def format_table(rows: list[dict]) -> str:
    return _table(rows, ("tokens", lambda r: r["tokens"]),
                  ("CUDA graphs", lambda r: ("yes" if r["cudagraphs"] else "no")
                   + ("" if r.get("merge", True) else ", layers unmerged")
                   + (", lm_head quantized" if r.get("lm_head_quantized") else "")))
