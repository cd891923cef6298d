"""INT8 W8A8 GEMM (``triton_int8_mm``) against cuBLAS ``_int_mm`` and cuBLAS bf16 on one CUDA GPU.

Shapes: M = tokens, K = in features, N = out features; weight [N, K] int8 per channel,
activation int8 per token (mxpass/schemes/int8.py numerics), bf16 output.

Method: fresh random inputs (W = randn * 0.02, x = randn, bf16, quantized by mxpass.quant);
every timed int8 variant is first checked against the exact result (``_int_mm``'s int32
sum, exact, scaled in float64) by relative Frobenius error. Times: median of
``triton.testing.do_bench`` over CUDA-graph replays of ``rotate`` calls on ``rotate`` weight
copies (``mxpass.benchmarks.linear.graph_ms``), / rotate. Every variant starts from the
quantized activation (xq, xs); the activation quantization is the same ATen code before
each and fuses into its producer in a model. Variants, all timed in the same run:

    bf16          cuBLAS ``x @ W.T`` on the dequantized weight in bf16
    int_mm        ``torch._int_mm`` alone (int32 out; M <= 16 padded to 17 rows as the registry does)
    int_mm+epi    what ``cublas_int_mm`` runs: _int_mm, then ``acc.float() * xs * ws`` -> bf16,
                  compiled by Inductor (one fused pointwise kernel after the GEMM)
    triton        ``int8_mm_with_plan`` with the default plan, called eagerly
    triton-tma    its large-M tiles with TMA loads and a persistent grid, eager only (M >= 256)
    triton-static the same with per-tensor scales (``int8-static``)
    compiled      ``torch.ops.mxpass.int8_mm_triton`` inside torch.compile(dynamic=True)

    python -m mxpass.benchmarks.int8 [--sweep] [--ms 16,128,1024,4096] [--json out.json] [--asm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from mxpass.benchmarks.suite import write_json

from mxpass.benchmarks.linear import DEFAULT_SHAPES, _no_wrap_triton, graph_ms, rel_error

DEFAULT_MS = (16, 128, 1024, 4096)
ROTATE = 4
TOLERANCE = 2.0**-8  # bf16 output rounding (2**-9 per element) plus fp32 scaling; a wrong tile is order 1


def _sweep_configs():
    from mxpass.kernels.triton.int8_gemm import Config as C

    large = [
        C(128, 256, 128, 8, 4), C(128, 256, 128, 8, 3), C(128, 256, 128, 8, 4, persistent=True),
        C(128, 256, 64, 8, 5), C(128, 256, 64, 8, 6, persistent=True), C(256, 128, 128, 8, 4),
        C(128, 128, 128, 8, 5), C(128, 128, 128, 4, 5), C(128, 256, 128, 8, 4, group_m=16),
        C(128, 256, 128, 8, 4, tma=True, persistent=True), C(128, 256, 128, 8, 4, tma=True),
        C(128, 256, 128, 8, 3, tma=True, persistent=True, warp_specialize=True),
        C(256, 128, 128, 8, 4, tma=True, persistent=True), C(128, 256, 64, 8, 6, tma=True, persistent=True),
        C(128, 128, 128, 8, 6, tma=True, persistent=True),
    ]
    small = [
        C(64, 128, 128, 4, 4), C(64, 256, 128, 4, 4), C(128, 128, 128, 8, 4), C(64, 64, 128, 4, 5),
        C(128, 128, 128, 4, 4, swap=True), C(64, 128, 128, 4, 4, swap=True), C(128, 64, 128, 4, 4, swap=True),
        C(64, 64, 256, 4, 4, swap=True), C(128, 16, 256, 4, 4, swap=True), C(64, 32, 256, 4, 5, swap=True),
        C(64, 128, 128, 4, 4, tma=True),
    ]
    return {"large": large, "small": small}


def _inputs(M: int, K: int, N: int, seed: int = 0):
    from mxpass import quant
    from mxpass.formats import get_format

    fmt = get_format("int8")
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws, wbs = [], []
    for _ in range(ROTATE):
        w = (torch.randn(N, K, generator=g, device="cuda") * 0.02).bfloat16()
        q, s = quant.quantize_weight(fmt, w, "bench.weight")
        ws.append((q, s))
        wbs.append(quant.dequantize_weight(fmt, q, s).bfloat16())
    x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
    xq, xs = quant.quantize_activation(fmt, x, None)
    return x, xq, xs, ws, wbs


def _pad17(xq):
    """``_int_mm`` needs more than 16 rows: pad smaller batches with zero rows (eager, no copy otherwise)."""
    return xq if xq.shape[0] > 16 else torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))


def _exact(xq, xs, q, s):
    acc = torch._int_mm(_pad17(xq), q.t())[: xq.shape[0]]  # int32, exact
    return acc.double() * xs.double().reshape(-1, 1) * s.double().reshape(1, -1)


def _int_mm_epilogue(xq, xs, q, s):
    """``IntMMLinear.run`` (lowering/kernels.py) after the activation quantization, line for line."""
    m = xq.shape[0]
    pad = torch.sym_max(17 - m, 0)
    acc = torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, pad)), q.t())
    return (acc[:m].float() * xs.reshape(-1, 1) * s.reshape(1, -1)).to(torch.bfloat16)


_EPI = []


def _compiled_epilogue():
    """One Inductor graph (dynamic shapes) for every shape, as the registry's dynamic-M graphs run it."""
    if not _EPI:
        _EPI.append(torch.compile(_int_mm_epilogue, dynamic=True))
    return _EPI[0]


def _warm_one(cfg_dict: dict) -> str:
    """Compile one config into Triton's on-disk cache (same specialization as the benchmark shapes)."""
    from mxpass.kernels.triton import int8_gemm as ig

    cfg = ig.Config(**cfg_dict)
    xq = torch.ones(64, 512, dtype=torch.int8, device="cuda")
    q = torch.ones(256, 512, dtype=torch.int8, device="cuda")
    xs, s = torch.ones(64, 1, device="cuda"), torch.ones(256, 1, device="cuda")
    try:
        with _no_wrap_triton():
            ig.int8_mm_with_plan(xq, xs, q, s, None, torch.bfloat16, ig.Plan(((0, None, cfg),)))
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported; the benchmark records it again
        return f"{type(e).__name__}: {str(e)[:200]}"


def warm_cache(configs, workers: int) -> None:
    """Compile the sweep's configs in parallel processes (Triton's cache is on disk and shared)."""
    import concurrent.futures
    import multiprocessing

    from mxpass.benchmarks import int8 as this  # by module name, not __main__, for the spawned workers

    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        results = list(ex.map(this._warm_one, [c._asdict() for c in configs]))
    bad = [(c, r) for c, r in zip(configs, results) if r != "ok"]
    print(f"compiled {len(configs)} configs in {time.time() - t0:.1f} s; failed: {bad}", flush=True)


def _time(fn, calls=ROTATE):
    try:
        return graph_ms(fn, calls) * 1e3
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def bench_shape(M: int, K: int, N: int, sweep: bool, compiled: bool) -> list[dict]:
    from mxpass.kernels.triton import int8_gemm as ig

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    x, xq, xs, ws, wbs = _inputs(M, K, N)
    exact = _exact(xq, xs, *ws[0])
    flops = 2.0 * M * N * K
    rows = []

    def row(name, us, err=None, **extra):
        r = dict(M=M, K=K, N=N, variant=name, us=us, err=err, **extra)
        if isinstance(us, float):
            r["tops"] = flops / us / 1e6
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    bf16 = lambda: [torch.mm(x, w.t()) for w in wbs]  # noqa: E731
    row("bf16", _time(bf16))
    row("int_mm", _time(lambda: [torch._int_mm(_pad17(xq), q.t()) for q, _ in ws]))
    epi = _compiled_epilogue()
    row("int_mm+epi", _time(lambda: [epi(xq, xs, q, s) for q, s in ws]),
        rel_error(epi(xq, xs, *ws[0]), exact))

    def triton_variant(name, plan, sx=xs, wsl=ws, ref=exact, **extra):
        f = lambda q, s: ig.int8_mm_with_plan(xq, sx, q, s, None, torch.bfloat16, plan, num_sms)  # noqa: E731
        try:
            err = rel_error(f(*wsl[0]), ref)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded
            return row(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", None, **extra)
        us = _time(lambda: [f(q, s) for q, s in wsl]) if err <= TOLERANCE else "skipped: wrong result"
        return row(name, us, err, **extra)

    with _no_wrap_triton():
        plan = ig.default_plan(K, N, num_sms)
        triton_variant("triton", plan)
        if M == 4096 or not sweep:
            # per-tensor scales: the int8-static variant of the same kernel
            sxt = xs.amax().reshape(1)
            wst = [(q, s.amax().reshape(1)) for q, s in ws]
            triton_variant("triton-static", plan, sx=sxt, wsl=wst, ref=_exact(xq, sxt, *wst[0]))
        if M >= ig.SMALL_M and K % ig.K_ALIGN == 0:
            # the large-M tiles with TMA loads and a persistent grid (eager only: see default_plan)
            tma = plan.regimes[-1][2]._replace(tma=True, persistent=True)
            triton_variant("triton-tma", ig.Plan(((0, None, tma),)))
        if sweep:
            cfgs = _sweep_configs()["large" if M >= 1024 else "small"]
            for cfg in cfgs:
                triton_variant("sweep", ig.Plan(((0, None, cfg),)), config=cfg._asdict())
    if compiled:
        op = torch.compile(lambda xq, xs, q, s: torch.ops.mxpass.int8_mm_triton(xq, xs, q, s, None, torch.bfloat16),
                           dynamic=True)
        row("compiled", _time(lambda: [op(xq, xs, q, s) for q, s in ws]), rel_error(op(xq, xs, *ws[0]), exact))
    return rows


def asm_summary() -> dict:
    """What Triton made of the default large-M config on this GPU: MMA instructions, TMA, registers."""
    import re

    from mxpass.kernels.triton import int8_gemm as ig

    out = {}
    K, N, M = 4096, 12288, 4096
    cfg = ig.default_plan(K, N).regimes[-1][2]
    xq = torch.zeros(M, K, dtype=torch.int8, device="cuda")
    q = torch.zeros(N, K, dtype=torch.int8, device="cuda")
    s = torch.ones(1, device="cuda")
    y = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    kern = ig._int8_mm_kernel[(1,)](
        xq, q, s, s, y, y, M, N, K, N, 1, SA_ROWS=False, SB_ROWS=False, HAS_BIAS=False, SWAP=False, EVEN_K=True,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PERSISTENT=cfg.persistent, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptx = kern.asm.get("ptx", "")
    ttgir = kern.asm.get("ttgir", "")
    out["config"] = cfg._asdict()
    out["wgmma"] = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
    out["mma_sync"] = sorted(set(re.findall(r"mma\.sync[\w.]*", ptx)))
    out["cp_async"] = len(re.findall(r"cp\.async\.cg", ptx))
    out["tma"] = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    out["ttgir_mma"] = sorted(set(re.findall(r"#ttg\.nvidia_mma<[^>]*>", ttgir)))
    out["ttgir_dot"] = sorted(set(re.findall(r"ttng\.warp_group_dot|tt\.dot ", ttgir)))
    for key in ("n_regs", "n_spills"):
        out[key] = getattr(kern, key, None)
    out["shared"] = getattr(kern.metadata, "shared", None)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES), help="KxN,...")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--compiled", action="store_true")
    p.add_argument("--asm", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mxpass.benchmarks.int8 needs a CUDA GPU")
    import triton

    meta = dict(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(meta), flush=True)
    result = dict(meta=meta, rows=[])
    if args.asm:
        result["asm"] = asm_summary()
        print(json.dumps(result["asm"]), flush=True)
    if args.sweep:
        from mxpass.kernels.triton import int8_gemm as ig

        cfgs = [c for cs in _sweep_configs().values() for c in cs]
        cfgs += list({cfg for _, _, cfg in ig.default_plan(4096, 4096).regimes})
        warm_cache(cfgs, workers=min(len(cfgs), max(1, (os.cpu_count() or 2) - 2)))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for K, N in shapes:
        for M in (int(m) for m in args.ms.split(",")):
            result["rows"].extend(bench_shape(M, K, N, args.sweep, args.compiled))
            torch.cuda.empty_cache()
            write_json(args.json, result)
    print(format_table(result["rows"]))


def format_table(rows: list[dict]) -> str:
    """One line per (shape, M): bf16, _int_mm, _int_mm + epilogue, triton; ratios from the same run."""
    by = {}
    for r in rows:
        if r["variant"] != "sweep":
            by.setdefault((r["K"], r["N"], r["M"]), {})[r["variant"]] = r["us"]
    lines = ["| K x N | M | bf16 us | _int_mm us | _int_mm+epi us | triton us | vs _int_mm | vs _int_mm+epi | vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: f"{v:.1f}" if isinstance(v, float) else "-"  # noqa: E731
    rt = lambda a, b: f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"  # noqa: E731
    for (K, N, M), v in by.items():
        t = v.get("triton")
        lines.append(f"| {K} x {N} | {M} | {f(v.get('bf16'))} | {f(v.get('int_mm'))} | {f(v.get('int_mm+epi'))} | "
                     f"{f(t)} | {rt(v.get('int_mm'), t)} | {rt(v.get('int_mm+epi'), t)} | {rt(v.get('bf16'), t)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
