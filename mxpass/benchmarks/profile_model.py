"""Where the time of one compiled forward goes: CUDA kernels by total time (profiler).

    python -m mxpass.benchmarks.profile_model [--tokens 1] [--scheme mxfp8] [--lm-head] [--bf16] [--top 25]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main(argv=None) -> None:
    import mxpass
    from mxpass.benchmarks.model import build_llama, build_qwen3_moe

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--moe", action="store_true", help="HF Qwen3-MoE (30B-A3B shapes, 4 layers) instead of Llama")
    p.add_argument("--scheme", default="mxfp8")
    p.add_argument("--lm-head", action="store_true", help="quantize the lm_head too (quantize_lm_head=True)")
    p.add_argument("--bf16", action="store_true", help="profile bf16 torch.compile instead")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--sequence", action="store_true", help="also list one forward's kernels in launch order")
    args = p.parse_args(argv)
    if args.moe:
        from mxpass.passes.moe import use_grouped_mm

        model = build_qwen3_moe()
        use_grouped_mm(model)  # the eager experts loop graph-breaks (bf16 side)
    else:
        model = build_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    if args.bf16:
        fn = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    else:
        fn = torch.compile(model, fullgraph=True, backend=mxpass.backend(scheme=args.scheme, cudagraphs=True,
                                                                          quantize_lm_head=args.lm_head))
    with torch.inference_mode():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            fn(ids, use_cache=False)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.compiler.cudagraph_mark_step_begin()
                fn(ids, use_cache=False)
            torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / 5
            count[e.name] += 1
    print(f"{'us/forward':>10} {'calls':>6}  kernel")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{us:10.1f} {count[name] // 5:6d}  {name[:110]}")
    print(f"{sum(total.values()):10.1f} {sum(count.values()) // 5:6d}  total")
    if args.sequence:
        events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
        one = events[-(sum(count.values()) // 5):]
        print(f"{'start us':>9} {'us':>6} {'gap':>5}  kernel (last forward, launch order)")
        t0, end = one[0].time_range.start, one[0].time_range.start
        for e in one:
            print(f"{e.time_range.start - t0:9.1f} {e.device_time:6.1f} {e.time_range.start - end:5.1f}  {e.name[:100]}")
            end = e.time_range.end


if __name__ == "__main__":
    main()
