"""Where the time of one compiled forward goes: CUDA kernels by total time (profiler).

    python -m mxpass.benchmarks.profile_model [--tokens 1] [--scheme mxfp8] [--bf16]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main(argv=None) -> None:
    import mxpass
    from mxpass.benchmarks.model import build_llama

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--scheme", default="mxfp8")
    p.add_argument("--bf16", action="store_true", help="profile bf16 torch.compile instead")
    args = p.parse_args(argv)
    model = build_llama()
    ids = torch.randint(0, 128256, (1, args.tokens), device="cuda")
    if args.bf16:
        fn = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    else:
        fn = torch.compile(model, fullgraph=True, backend=mxpass.backend(scheme=args.scheme, cudagraphs=True))
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
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{us:10.1f} {count[name] // 5:6d}  {name[:110]}")
    print(f"{sum(total.values()):10.1f} {sum(count.values()) // 5:6d}  total")


if __name__ == "__main__":
    main()
