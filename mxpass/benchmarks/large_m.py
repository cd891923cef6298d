"""Large-M linear kernels on one CUDA GPU: FP8 block scaling and the W8A16 threshold.

Two parts, both checked against ``mxpass.quant.linear_reference`` (fp32 math on the same
quantized operands; relative Frobenius error) before they are timed:

``kernels``  the GEMM alone, operands already quantized (so no activation quantization):
             cuBLAS bf16 ``x @ W.T``; ``torch._scaled_mm`` rowwise (per-token x per-channel,
             the fp8-dynamic kernel); ``torch._scaled_mm`` with 1x128 / 128x128 block scales
             (the fp8-block kernel ``cublas_scaled_mm_blockwise``; M a multiple of 16, as the
             op pads it; ``use_fast_accum`` is refused for 128x128 blocks); the Triton W8A16
             op on the block weight. Times: median of ``do_bench`` over CUDA-graph replays of ``rotate``
             calls on ``rotate`` weight copies (``linear.graph_ms``), / ``rotate``.
``w8a16``    one bf16 ``nn.Linear`` compiled with ``mxpass.backend(scheme=...)`` with the
             kernel forced by ``MXPASS_KERNEL`` (``triton_w8`` or ``dequant_cublas_mm``), a
             dynamic token dimension, timed at each M as a CUDA graph against the same layer
             under bf16 ``torch.compile``: where the two W8A16 kernels cross over.

    python -m mxpass.benchmarks.large_m [--part kernels,w8a16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from mxpass.benchmarks.suite import write_json

from mxpass.benchmarks.linear import DEFAULT_SHAPES, _no_wrap_triton, graph_ms, rel_error

KERNEL_MS = (16, 128, 4096)  # block scaling: cuBLAS 13.0 rejects M in {1, 2, 5} (the op pads to 16)
W8A16_MS = (512, 1024, 2048, 4096)
W8A16_SCHEMES = ("fp8-w", "fp8-w-block")  # fp8-w-tensor runs the channel code paths
W8A16_KERNELS = ("triton_w8", "dequant_cublas_mm")


def _weights(K: int, N: int, count: int, seed: int = 100):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(N, K, generator=g, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(count)]


def blockwise_mm(xq, xs, qweight, wscale, out_dtype=torch.bfloat16, fast_accum: bool = False):
    """The fp8-block GEMM of ``cublas_scaled_mm_blockwise`` on quantized operands (M a multiple of 16)."""
    return torch._scaled_mm(xq, qweight.t(), scale_a=xs.t().contiguous().t(), scale_b=wscale.t(),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


def rowwise_mm(xq, xs, qweight, wscale, out_dtype=torch.bfloat16):
    return torch._scaled_mm(xq, qweight.t(), scale_a=xs.reshape(-1, 1), scale_b=wscale.reshape(1, -1),
                            out_dtype=out_dtype)


def kernels(shapes=DEFAULT_SHAPES, ms=KERNEL_MS, rotate: int = 4) -> list[dict]:
    from mxpass import quant
    from mxpass.formats import get_format
    from mxpass.kernels.triton import w8_linear  # noqa: F401  (registers the op)

    blk, row = get_format("fp8-block"), get_format("fp8-dynamic")
    op = torch.ops.mxpass.w8_linear_triton
    rows = []
    for K, N in shapes:
        ws = _weights(K, N, rotate)
        qb = [quant.quantize_weight(blk, w, "bench") for w in ws]
        qr = [quant.quantize_weight(row, w, "bench") for w in ws]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            xqb, xsb = quant.quantize_activation(blk, x, None)
            xqr, xsr = quant.quantize_activation(row, x, None)
            ref_b = quant.linear_reference(x, *qb[0], None, None, blk)
            ref_r = quant.linear_reference(x, *qr[0], None, None, row)
            bf16 = graph_ms(lambda: [x @ w.t() for w in ws], rotate)
            cases = {
                "cublas_bf16": (lambda q: x @ ws[0].t(), None, ws),
                "scaled_mm_rowwise": (lambda q: rowwise_mm(xqr, xsr, *q), ref_r, qr),
                "scaled_mm_blockwise": (lambda q: blockwise_mm(xqb, xsb, *q), ref_b, qb),
                "triton_w8_block": (lambda q: op(x, *q, None, "block"), quant.linear_reference(
                    x, *qb[0], None, None, get_format("fp8-w-block")), qb),
            }
            for impl, (f, ref, sets) in cases.items():
                r = {"bench": "large_m-kernels", "impl": impl, "M": M, "K": K, "N": N}
                try:
                    with _no_wrap_triton():
                        r["err"] = None if ref is None else rel_error(f(sets[0]), ref)
                        r["ms"] = bf16 if impl == "cublas_bf16" else graph_ms(lambda: [f(q) for q in sets], rotate)
                except Exception as exc:  # recorded, not fatal: e.g. block scales on another architecture
                    r["error"] = repr(exc)[:400]
                else:
                    r["vs_bf16"] = bf16 / r["ms"]
                rows.append(r)
                print(_fmt(r), flush=True)
            rw = next((r for r in rows[-len(cases):] if r["impl"] == "scaled_mm_rowwise" and "ms" in r), None)
            for r in rows[-len(cases):]:
                if rw and "ms" in r:
                    r["vs_rowwise"] = rw["ms"] / r["ms"]
            del x, ref_b, ref_r
        del ws, qb, qr
        torch.cuda.empty_cache()
    return rows


def _fmt(r: dict) -> str:
    head = f"{r['impl']:<22} M={r['M']:<5} K={r['K']:<6} N={r['N']:<6}"
    if "error" in r:
        return f"{head} FAILED {r['error'][:200]}"
    err = "" if r.get("err") is None else f" err {r['err']:.1e}"
    kern = f" [{r['kernel']}]" if r.get("kernel") else ""
    return f"{head} {r['ms'] * 1e3:9.1f} us {r['vs_bf16']:5.2f}x bf16{err}{kern}"


@contextlib.contextmanager
def _kernel_env(name: str | None):
    old = os.environ.get("MXPASS_KERNEL")
    if name is None:
        os.environ.pop("MXPASS_KERNEL", None)
    else:
        os.environ["MXPASS_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MXPASS_KERNEL", None)
        else:
            os.environ["MXPASS_KERNEL"] = old


def w8a16(shapes=DEFAULT_SHAPES, ms=W8A16_MS, schemes=W8A16_SCHEMES, kernel_names=W8A16_KERNELS) -> list[dict]:
    import mxpass
    from mxpass import quant
    from mxpass.benchmarks.schemes import _graph_ms

    rows = []
    for K, N in shapes:
        torch.manual_seed(0)
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        xs = {m: torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for m in ms}
        with torch.inference_mode():
            torch._dynamo.reset()
            bf16 = torch.compile(lin, fullgraph=True, dynamic=True)
            base = {m: _graph_ms(bf16, x) for m, x in xs.items()}
            for scheme in schemes:
                fmt = mxpass.get_format(scheme)
                qw = quant.quantize_weight(fmt, lin.weight, "bench")
                for name in kernel_names:
                    torch._dynamo.reset()
                    with _kernel_env(name):
                        fn = torch.compile(lin, backend=mxpass.backend(scheme=scheme), dynamic=True)
                        for m, x in xs.items():
                            y = fn(x)
                            kernel = mxpass.last_report().rewritten[0].kernel.split(" ")[0]
                            ref = quant.linear_reference(x, *qw, None, None, fmt)
                            t = _graph_ms(fn, x)
                            r = dict(bench="large_m-w8a16", scheme=scheme, impl=name, kernel=kernel, M=m, K=K,
                                     N=N, bf16_ms=base[m], ms=t, vs_bf16=base[m] / t, err=rel_error(y, ref))
                            rows.append(r)
                            print(f"{scheme:<13}" + _fmt(r), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.large_m")
    p.add_argument("--part", default="kernels,w8a16")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    parts = args.part.split(",")
    if "kernels" in parts:
        rows += kernels()
    if "w8a16" in parts:
        rows += w8a16()
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
