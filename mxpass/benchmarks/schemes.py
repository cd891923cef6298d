"""Every scheme's linear layer through the backend vs bf16, one run (GPU).

One ``nn.Linear`` (bf16, no bias) compiled with ``mxpass.backend(scheme=...)`` — activation
quantization included, as a model pays it — against the same layer under bf16
``torch.compile``. Each compiled function is captured in a CUDA graph and its replays are
timed with ``triton.testing.do_bench`` (median). Outputs are checked against the
reference kernel first (relative Frobenius error). By default the token dimension is
dynamic (one graph per scheme serves every M); ``--static`` compiles one graph per M, so
the registry sees a static M and picks per M (``cuda_w8a8_gemv`` at M <= 16, dequantize +
cuBLAS for W8A16 at large M: docs/performance.md).

    python -m mxpass.benchmarks.schemes [--schemes a,b] [--ms 1,4096] [--static] [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import torch

from mxpass.benchmarks.suite import write_json

SCHEMES = ("mxfp8", "fp8-dynamic", "fp8", "fp8-block", "fp8-w", "fp8-w-tensor", "fp8-w-block", "int8")
SHAPES = ((4096, 12288), (4096, 28672), (14336, 4096))
MS = (1, 16, 128, 4096)


def _graph_ms(fn, x) -> float:
    import triton.testing

    from mxpass.benchmarks.linear import capture

    g = capture(lambda: fn(x), warmups=3)
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")


def run(schemes=SCHEMES, shapes=SHAPES, ms=MS, static: bool = False) -> list[dict]:
    import mxpass

    def compiled(lin, **kw):
        return torch.compile(lin, dynamic=not static, **kw)

    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in ms}
        with torch.inference_mode():
            torch._dynamo.reset()
            bf16 = compiled(lin, fullgraph=True)
            base = {m: _graph_ms(bf16, x) for m, x in xs.items()}
            for scheme in schemes:
                kw = {"activation_scales": {"": 0.01}} if mxpass.get_format(scheme).static_activation else {}
                torch._dynamo.reset()
                os.environ["MXPASS_KERNEL"] = "reference"
                ref_fn = compiled(lin, backend=mxpass.backend(scheme=scheme, **kw))
                refs = {m: ref_fn(x) for m, x in xs.items()}
                del os.environ["MXPASS_KERNEL"]
                torch._dynamo.reset()
                fn = compiled(lin, backend=mxpass.backend(scheme=scheme, **kw))
                for m, x in xs.items():
                    if static:
                        torch._dynamo.reset()
                        fn = compiled(lin, backend=mxpass.backend(scheme=scheme, **kw))
                    y, ref = fn(x), refs[m]
                    kernel = mxpass.last_report().rewritten[0].kernel.split(" ")[0]
                    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
                    t = _graph_ms(fn, x)
                    rows.append(dict(bench="scheme-linear", scheme=scheme, kernel=kernel, M=m, K=k, N=n,
                                     static_m=static, bf16_ms=base[m], ms=t, vs_bf16=base[m] / t,
                                     err_vs_reference=err))
                    print(f"{scheme:12} {kernel:26} M={m:5} K={k:5} N={n:5} {t * 1e3:9.1f} us"
                          f"  bf16 {base[m] * 1e3:9.1f} us  {base[m] / t:5.2f}x  err {err:.1e}", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.schemes")
    p.add_argument("--json")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--ms", default=",".join(map(str, MS)), help="token counts")
    p.add_argument("--static", action="store_true", help="one graph per M (the registry sees a static M)")
    args = p.parse_args(argv)
    rows = run(schemes=tuple(args.schemes.split(",")), ms=tuple(int(m) for m in args.ms.split(",")),
               static=args.static)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
