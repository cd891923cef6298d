"""What activation quantization costs inside one HF Llama decoder layer (GPU), by kernel.

One ``LlamaDecoderLayer`` with Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 heads,
8 KV heads; random bf16 weights, std 0.02), ``tokens`` tokens in one sequence, SDPA causal
attention, rotary embeddings given. Compiled three ways, each under CUDA graphs
(``mode="reduce-overhead"`` for bf16, ``mxpass.backend(cudagraphs=True)`` otherwise), static
shapes, so the registry sees M = tokens:

- bf16 ``torch.compile``;
- mxpass with each scheme (the activation quantization is ATen math fused by Inductor into
  the RMSNorm and SiLU*mul kernels that produce the GEMM inputs).

Method. The layer's forward time is the median of CUDA-event timings; then the profiler
records ``iters`` forwards and every GPU kernel is put in one class by its name: GEMM
(cuBLAS/CUTLASS kernels: ``nvjet``, ``gemm``, ``cutlass``, ``xmma``; mxpass's own GEMM
kernels and their split-K reduction), attention (``flash``,
``fmha``, ``sdpa``), other (Inductor's Triton kernels: RMSNorm, rotary, SiLU*mul, residual adds, and
in a quantized layer the quantization fused into them or left on its own). A quantized
layer's activation quantization costs

    quant_us = other_us(scheme) - other_us(bf16)

(the fused RMSNorm / SiLU*mul kernels of the scheme minus the plain ones of bf16, plus any
kernel that only quantizes; bf16 is profiled before and after the schemes, and the lower of
its two ``other_us`` is the baseline), and the linear ops together cost ``(gemm_us +
quant_us) / gemm_us`` times their GEMMs alone (``overhead``). Where a scheme's kernel
dequantizes weights in Inductor kernels of their own (``dequant_cublas_mm``), those count
in ``other_us`` too: its rows' largest kernels show them. Rows also carry the largest kernels.

    python -m mxpass.benchmarks.layer [--tokens 4096] [--schemes fp8-dynamic,fp8-block] [--json out.json]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from mxpass.benchmarks.suite import write_json

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)

_GEMM = ("nvjet", "gemm", "cutlass", "xmma", "cublas")
# mxpass's own linear kernels (Triton and the CUDA extension): the GEMM and its split-K reduction.
_MXPASS_GEMM = ("_int8_mm", "_mxfp8_gemv", "_mxfp8_dot", "_splitk_reduce", "_w8_gemv", "_w8_dot", "w8a8_gemv")
_ATTENTION = ("flash", "fmha", "attention", "sdpa")


def kernel_class(name: str) -> str:
    """"gemm", "attention" or "other" for a GPU kernel name (module docstring)."""
    low = name.lower()
    if any(low.startswith(s) for s in _MXPASS_GEMM):
        return "gemm"
    if low.startswith("triton"):
        return "other"
    if any(s in low for s in _ATTENTION):
        return "attention"
    if any(s in low for s in _GEMM):
        return "gemm"
    return "other"


class DecoderLayer(torch.nn.Module):
    """An HF ``LlamaDecoderLayer`` taking (hidden_states, cos, sin)."""

    def __init__(self, config: dict = LLAMA_8B):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        cfg = LlamaConfig(**config)
        cfg._attn_implementation = "sdpa"
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)

    def forward(self, h, cos, sin):
        return self.layer(h, position_embeddings=(cos, sin))


def build(config: dict = LLAMA_8B, tokens: int = 4096, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """(layer, (h, cos, sin)) with random weights (std 0.02) and x ~ N(0, 1)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(seed)
    with torch.device(device):
        layer = DecoderLayer(config).to(dtype).eval()
        for p in layer.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        h = torch.randn(1, tokens, config["hidden_size"], dtype=dtype)
        rope = LlamaRotaryEmbedding(LlamaConfig(**config))
        cos, sin = rope(h, torch.arange(tokens)[None])
    return layer, (h, cos.to(dtype), sin.to(dtype))


def profile(fn, inputs, iters: int = 10) -> dict:
    """Median forward ms (CUDA events, 30 forwards) and GPU µs per forward by kernel class."""
    from mxpass.benchmarks.model import _median_ms

    ms = _median_ms(lambda: fn(*inputs), cudagraphs=True, iters=30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.compiler.cudagraph_mark_step_begin()
            fn(*inputs)
        torch.cuda.synchronize()
    per_kernel, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time / iters
            calls[e.name] += 1
    by_class = defaultdict(float)
    for name, us in per_kernel.items():
        by_class[kernel_class(name)] += us
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:14]
    return {
        "forward_ms": ms, "kernels_us": sum(per_kernel.values()),
        "gemm_us": by_class["gemm"], "attention_us": by_class["attention"], "other_us": by_class["other"],
        "kernels": [{"name": n[:160], "us": us, "calls": calls[n] // iters, "class": kernel_class(n)} for n, us in top],
    }


def run(schemes=("fp8-dynamic", "fp8-block"), tokens: int = 4096, iters: int = 10,
        inductor_options: dict | None = None) -> list[dict]:
    """Rows for bf16 and each scheme; ``inductor_options`` go to both sides' Inductor."""
    import mxpass

    opts = dict(inductor_options or {})
    label = ",".join(f"{k}={v}" for k, v in opts.items())
    layer, inputs = build(tokens=tokens)
    rows = []

    def bf16_row(when):
        torch._dynamo.reset()
        bf16 = torch.compile(layer, fullgraph=True, options={"triton.cudagraphs": True, **opts})
        ref = bf16(*inputs).float()
        rows.append({"bench": "layer", "variant": "bf16", "when": when, "inductor": label, "tokens": tokens,
                     **profile(bf16, inputs, iters)})
        return ref

    with torch.inference_mode():
        ref = bf16_row("first")
        for scheme in schemes:
            torch._dynamo.reset()
            fn = torch.compile(layer, fullgraph=True,
                               backend=mxpass.backend(scheme=scheme, cudagraphs=True, inductor_options=opts))
            y = fn(*inputs).float()
            kernels = sorted({e.kernel.split(" ")[0] for e in mxpass.last_report().rewritten})
            err = ((y - ref).norm() / ref.norm()).item()
            rows.append({"bench": "layer", "variant": scheme, "inductor": label, "linear_kernels": kernels,
                         "tokens": tokens, "err_vs_bf16": err, **profile(fn, inputs, iters)})
        bf16_row("last")
    # bf16 profiled before and after the schemes: the quieter of the two is the baseline (a
    # run's plain SiLU*mul once took 118 us against 80 in every other profile)
    base = min((r for r in rows if r["variant"] == "bf16"), key=lambda r: r["other_us"])
    for r in rows:
        if r["variant"] != "bf16":
            quant = r["other_us"] - base["other_us"]
            r.update(quant_us=quant, overhead=(r["gemm_us"] + quant) / r["gemm_us"] if r["gemm_us"] else None,
                     forward_vs_bf16=base["forward_ms"] / r["forward_ms"])
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'variant':<12}{'tokens':>7}{'fwd ms':>9}{'kernels us':>12}{'GEMM us':>10}{'attn us':>10}"
            f"{'other us':>10}{'quant us':>10}{'overhead':>10}")
    out = [head, "-" * len(head)]
    for r in rows:
        if r.get("inductor"):
            out.append(f"  (Inductor: {r['inductor']})")
        q = f"{r['quant_us']:.1f}" if "quant_us" in r else ""
        o = f"{r['overhead']:.3f}x" if r.get("overhead") else ""
        out.append(f"{r['variant'] + (' ' + r['when'] if 'when' in r else ''):<12}{r['tokens']:>7}{r['forward_ms']:>9.3f}{r['kernels_us']:>12.1f}"
                   f"{r['gemm_us']:>10.1f}{r['attention_us']:>10.1f}{r['other_us']:>10.1f}{q:>10}{o:>10}")
    for r in rows:
        out.append(f"\n{r['variant']} {r.get('inductor', '')}: " + ", ".join(r.get("linear_kernels", [])))
        out += [f"  {k['us']:9.1f} us {k['calls']:3d}x {k['class']:<9} {k['name'][:100]}" for k in r["kernels"]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.layer")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--schemes", default="fp8-dynamic,fp8-block")
    p.add_argument("--multi-kernel", action="store_true",
                   help="also run with Inductor's triton.multi_kernel (persistent reductions up to 16k per row)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    schemes = tuple(args.schemes.split(","))
    rows = run(schemes, args.tokens)
    if args.multi_kernel:
        rows += run(schemes, args.tokens, inductor_options={"triton.multi_kernel": 1})
    print(format_table(rows), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
