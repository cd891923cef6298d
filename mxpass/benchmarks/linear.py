"""MXFP8 linear vs cuBLAS bf16 on one CUDA GPU: correctness first, then times.

Shapes: M = tokens, K = in features, N = out features; weights [N, K].

Method (see notes/kernel-notes.md): fresh random inputs, never zeros; every timed
function is first checked against ``mxfp8_linear_reference`` (fp32 math) by relative
Frobenius error. Times are medians of ``triton.testing.do_bench`` over CUDA-graph replays
of ``rotate`` calls on ``rotate`` different weight copies (so launch gaps are gone and a
weight that fits the 50-60 MB L2 is not read from cache), divided by ``rotate``.

    python -m mxpass.benchmarks.linear [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import torch

from mxpass.benchmarks.suite import write_json

DEFAULT_SHAPES = ((4096, 12288), (4096, 28672), (14336, 4096))  # (K, N): Llama-3-8B qkv / gate-up / down
DEFAULT_MS = (1, 16, 128, 4096)

# bf16 output rounding alone is up to 2**-9 relative per element; fp32 sums in another
# order add far less (MX products are exact in fp32). 2**-8 leaves room for neither to hide
# a wrong tile, which gives errors of order 1. fp16 rounds at 2**-11.
TOLERANCE = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def make_inputs(M: int, K: int, N: int, dtype=torch.bfloat16, device="cuda", seed: int = 0, bias: bool = False):
    """x [M, K] (values exactly representable as MXFP8), qweight [N, K] e4m3, wscale [N, K/32] e8m0, bias [N]."""
    from mxpass.schemes import mxfp8

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=device, dtype=torch.float32) * 0.02
    qw = mxfp8.quantize_weight(w, "bench.weight")
    x = mxfp8.fake_quantize(torch.randn(M, K, generator=g, device=device, dtype=torch.float32)).to(dtype)
    b = (torch.randn(N, generator=g, device=device, dtype=torch.float32) * 0.1).to(dtype) if bias else None
    return x, qw.data, qw.scale, b


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||_F / ||ref||_F in float64; NaN anywhere gives inf."""
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return math.inf
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _no_wrap_triton():
    """Eager launches straight to Triton, as the op itself does (no higher-order-op dispatch)."""
    try:
        from torch._library.triton import set_wrap_triton_enabled

        return set_wrap_triton_enabled(False)
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()


def capture(fn, warmups: int = 2) -> torch.cuda.CUDAGraph:
    """``fn`` run ``warmups`` times on a side stream, then captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_ms(fn, calls: int, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of one of the ``calls`` calls that ``fn`` makes, timed as CUDA-graph replays."""
    import triton.testing

    g = capture(fn)
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median") / calls


def stream_copies(bytes_per_call: float, device=None, factor: int = 8) -> int:
    """How many weight copies make a working set of ``factor`` times the L2 cache (at least 4)."""
    l2 = torch.cuda.get_device_properties(device or torch.cuda.current_device()).L2_cache_size
    return max(4, math.ceil(factor * l2 / bytes_per_call))


def stream_ms(fn, calls: int, reps: int = 50, trials: int = 7) -> float:
    """Median ms per call of ``fn``'s ``calls`` calls, each on its own weight copy (a working
    set several times the L2: see ``stream_copies``), captured in one CUDA graph and replayed
    back to back; CUDA events around ``reps`` replays, median of ``trials``.

    This is how a decode forward streams its weights: one GEMV after another, each reading
    weights that no other call touched recently. ``graph_ms`` instead lets ``do_bench`` clear
    the L2 before every replay by writing a 256 MB buffer, whose dirty lines are written back
    while the timed kernels run (measured on H200: +2-4 us per call for GEMVs and cuBLAS alike)."""
    g = capture(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (reps * calls))
    return sorted(times)[len(times) // 2]


def _row(impl: str, M: int, K: int, N: int, ms: float, bf16_ms: float | None, err: float | None, weight_bytes: float):
    return {
        "impl": impl, "M": M, "K": K, "N": N, "ms": ms,
        "weight_tbps": weight_bytes / (ms * 1e-3) / 1e12,
        "tflops": 2.0 * M * N * K / (ms * 1e-3) / 1e12,
        "vs_bf16": (bf16_ms / ms) if bf16_ms else None,
        "err": err,
    }


def run(
    shapes=DEFAULT_SHAPES,
    ms=DEFAULT_MS,
    warmup: int = 25,
    rep: int = 100,
    rotate: int = 4,
    compiled: bool = True,
    dtype=torch.bfloat16,
) -> list[dict]:
    """Time cuBLAS bf16 ``x @ W.T``, the op called eagerly and the op inside torch.compile, per (M, K, N).

    Rows: impl in {"cublas_bf16", "mxfp8_op", "mxfp8_compiled", "dequant+cublas"}, ms, weight_tbps
    (weight bytes read / time: 2 B/elem for bf16, 1 + 1/32 for MXFP8), tflops, vs_bf16 (bf16 ms / ms),
    err (relative Frobenius error vs the fp32 reference; None for the bf16 baseline).
    """
    import mxpass.kernels.triton.mxfp8_linear as mk
    from mxpass.kernels.reference import mxfp8_linear_reference

    op = torch.ops.mxpass.mxfp8_linear_triton
    rows: list[dict] = []
    for K, N in shapes:
        sets = [make_inputs(1, K, N, dtype, seed=100 + i)[1:3] for i in range(rotate)]
        w16 = [mk.mxfp8_dequantize_triton(q, s, dtype) for q, s in sets]
        cf = torch.compile(lambda x, q, s: op(x, q, s), dynamic=True) if compiled else None
        for M in ms:
            x = make_inputs(M, K, 1, dtype, seed=M)[0]
            ref = mxfp8_linear_reference(x, *sets[0])
            bf16 = graph_ms(lambda: [x @ w.t() for w in w16], rotate, warmup, rep)
            rows.append(_row("cublas_bf16", M, K, N, bf16, bf16, None, 2.0 * N * K))
            fp8_bytes = N * K * (1 + 1 / 32)
            with _no_wrap_triton():
                err = rel_error(op(x, *sets[0]), ref)
                t = graph_ms(lambda: [op(x, q, s) for q, s in sets], rotate, warmup, rep)
                rows.append(_row("mxfp8_op", M, K, N, t, bf16, err, fp8_bytes))
                err = rel_error(x @ mk.mxfp8_dequantize_triton(*sets[0], dtype).t(), ref)
                t = graph_ms(lambda: [x @ mk.mxfp8_dequantize_triton(q, s, dtype).t() for q, s in sets],
                             rotate, warmup, rep)
                rows.append(_row("dequant+cublas", M, K, N, t, bf16, err, fp8_bytes))
            if cf is not None:
                err = rel_error(cf(x, *sets[0]), ref)
                t = graph_ms(lambda: [cf(x, q, s) for q, s in sets], rotate, warmup, rep)
                rows.append(_row("mxfp8_compiled", M, K, N, t, bf16, err, fp8_bytes))
            del x, ref
        del sets, w16
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per row: impl, M, K, N, us, weight TB/s, TFLOP/s, x vs bf16, error."""
    head = f"{'impl':<16}{'M':>6}{'K':>7}{'N':>7}{'us':>10}{'TB/s':>7}{'TFLOP/s':>9}{'vs bf16':>9}{'err':>10}"
    out = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r['vs_bf16']:.2f}x" if r.get("vs_bf16") else ""
        err = f"{r['err']:.1e}" if r.get("err") is not None else ""
        out.append(
            f"{r['impl']:<16}{r['M']:>6}{r['K']:>7}{r['N']:>7}{r['ms'] * 1e3:>10.1f}"
            f"{r['weight_tbps']:>7.2f}{r['tflops']:>9.1f}{vs:>9}{err:>10}"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------- kernel sweep


def _sweep_candidates(M: int, K: int, N: int, num_sms: int):
    """(name, plan) pairs of single-regime plans worth timing at this M."""
    import mxpass.kernels.triton.mxfp8_linear as mk

    def one(impl):
        return mk.Plan((mk.Regime(0, None, impl),))

    def split_k(kind, bn, bm, bk, nw, ns, waves, evict=False):
        seen = set()
        for w in waves:
            s = 1 if w == 0 else mk._split_for(K, N, bn, bk, num_sms, w)
            if s in seen:
                continue
            seen.add(s)
            name = f"{kind}{bm} bn{bn} bk{bk} w{nw} s{ns} S0={s}" + (" evict" if evict else "")
            yield name, one(mk.SplitK(kind, bn, bm, bk, s, nw, ns, evict))

    cands = []
    if M == 1:
        cands.append(("gemv1 bn4 bk1024 w4 s2 S0=1 (one tile)", one(mk.SplitK("gemv", 4, 1, 1024, 1, 4, 2, True))))
        # gemv over row tiles: (block_n, block_k, warps, K-loop stages, programs per SM)
        for bn, bk, nw, ns, per_sm in ((4, 1024, 4, 3, 8), (4, 1024, 4, 2, 8), (4, 1024, 4, 3, 6), (2, 2048, 4, 3, 8),
                                       (4, 2048, 4, 3, 6), (8, 1024, 4, 3, 6), (4, 1024, 2, 3, 12), (8, 1024, 8, 3, 4),
                                       (4, 512, 4, 3, 8), (4, 1024, 4, 1, 8)):
            rt = mk._gemv_row_tiles(N, bn, num_sms, per_sm)
            name = f"gemv1 bn{bn} bk{bk} w{nw} s{ns} {per_sm}/SM rows={rt}x{bn}"
            cands.append((name, one(mk.SplitK("gemv", bn, 1, bk, 1, nw, ns, True, row_tiles=rt))))
    if 1 < M <= 16:
        for bn, bk, nw, ns in ((128, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3)):
            cands += split_k("dot", bn, 16, bk, nw, ns, (2, 4))
    if 16 < M <= 256:
        for bn, bm, bk, nw, ns in ((64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3)):
            cands += split_k("dot", bn, bm, bk, nw, ns, (1, 2))
    if M >= 256:
        for bn, bm, bk, nw, ns in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4)):
            tile = mk.SplitK("dot", bn, bm, bk, 1, nw, ns)
            cands.append((f"deq+dot{bm} bn{bn} bk{bk} w{nw} s{ns}", one(mk.DequantGemm(tile))))
            cands.append((f"dot{bm} bn{bn} bk{bk} w{nw} s{ns}", one(tile)))
    return cands


def sweep(shapes=DEFAULT_SHAPES, ms=(1, 16, 128, 256, 4096), rotate: int = 4, warmup: int = 10, rep: int = 40,
          log=None):
    """Time every candidate kernel configuration (single-regime plans); rows as ``run`` plus "config".

    ``log``: a path; each row is appended to it as one JSON line as soon as it is measured.
    """
    import mxpass.kernels.triton.mxfp8_linear as mk
    from mxpass.kernels.reference import mxfp8_linear_reference

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for K, N in shapes:
        sets = [make_inputs(1, K, N, seed=100 + i)[1:3] for i in range(rotate)]
        w16 = [mk.mxfp8_dequantize_triton(q, s, torch.bfloat16) for q, s in sets]
        for M in ms:
            x = make_inputs(M, K, 1, seed=M)[0]
            ref = mxfp8_linear_reference(x, *sets[0])
            bf16 = graph_ms(lambda: [x @ w.t() for w in w16], rotate, warmup, rep)
            rows.append({**_row("cublas_bf16", M, K, N, bf16, bf16, None, 2.0 * N * K), "config": ""})
            print(f"M={M:<5} K={K:<6} N={N:<6} {'cublas bf16':<40} {bf16 * 1e3:8.1f} us", flush=True)
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps(rows[-1], default=str) + "\n")
            for name, plan in _sweep_candidates(M, K, N, num_sms):
                try:
                    with _no_wrap_triton():
                        err = rel_error(mk.mxfp8_linear_with_plan(x, *sets[0], None, plan), ref)
                        t = graph_ms(lambda: [mk.mxfp8_linear_with_plan(x, q, s, None, plan) for q, s in sets],
                                     rotate, warmup, rep)
                    rows.append({**_row("sweep", M, K, N, t, bf16, err, N * K * (1 + 1 / 32)), "config": name})
                except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
                    rows.append({"impl": "sweep", "M": M, "K": K, "N": N, "config": name, "error": repr(exc)[:300]})
                print(_fmt_sweep(rows[-1]), flush=True)
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(rows[-1], default=str) + "\n")
            del x, ref
        del sets, w16
        torch.cuda.empty_cache()
    return rows


def _fmt_sweep(r: dict) -> str:
    if "error" in r:
        return f"M={r['M']:<5} K={r['K']:<6} N={r['N']:<6} {r['config']:<40} FAILED {r['error'][:120]}"
    return (f"M={r['M']:<5} K={r['K']:<6} N={r['N']:<6} {r['config']:<40} {r['ms'] * 1e3:8.1f} us "
            f"{r['weight_tbps']:5.2f} TB/s {r['tflops']:6.1f} TF {r['vs_bf16']:.2f}x err {r['err']:.1e}")


def best_of_sweep(rows: list[dict]) -> list[dict]:
    """Fastest correct configuration per (M, K, N), with the bf16 time beside it."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r.get("impl") != "sweep" or "error" in r or r["err"] > TOLERANCE[torch.bfloat16]:
            continue
        k = (r["M"], r["K"], r["N"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    return [best[k] for k in sorted(best)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.linear")
    p.add_argument("--sweep", action="store_true", help="time every kernel configuration instead")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--ms", help="comma-separated token counts for --sweep (default 1,16,128,256,4096)")
    p.add_argument("--log", help="--sweep: append each row to this file as a JSON line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("mxpass.benchmarks.linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    env = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    print(env, flush=True)
    out = {"env": env}
    if args.sweep:
        ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else (1, 16, 128, 256, 4096)
        out["sweep"] = sweep(ms=ms, log=args.log)
        out["sweep_best"] = best_of_sweep(out["sweep"])
        write_json(args.json, out, default=str)
        print("\nbest configuration per shape:\n" + "\n".join(_fmt_sweep(r) for r in out["sweep_best"]), flush=True)
        return 0
    out["rows"] = run(compiled=not args.no_compile)
    write_json(args.json, out, default=str)
    print(f"\n{env} {time.time() - t0:.0f} s\n" + format_table(out["rows"]))
    bad = [r for r in out["rows"] if r["err"] is not None and not r["err"] <= TOLERANCE[torch.bfloat16]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
