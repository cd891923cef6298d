"""Plans of the fused MoE kernels for few tokens, timed in one process (the sweep behind ``default_plan``).

Shape legend: T tokens, E experts, A active experts per token, H hidden, I expert intermediate,
S = T * A slots.

    python -m mxpass.benchmarks.moe_plans [--json out.json] [--before old_moe.py] [--tokens ...] [--workers N]

For each (shape, T) of ``CASES`` it times ``candidates(shape, T)``: the default plan, the
decode or grouped path forced, other GEMV tiles, the ordered top-k sum, and (level "full")
the grouped tiles of the regime T falls in varied one at a time (gate/up with down at the
default, down with gate/up at the default), then the pairing of the fastest of each; every
plan on the fp8-w weights, the default (and the best pairing) also on fp8-dynamic, and the
peers of ``mxpass.benchmarks.moe`` (HF grouped_mm bf16, torch._scaled_grouped_mm) as
baselines. ``--before FILE``: a previous version of ``kernels/triton/moe.py`` (e.g. ``git
show REV:kernels/triton/moe.py > FILE``, a file inside the working tree to reach the GPU
machine), loaded under the op namespace ``mxpass_before`` and timed the same way: the
"before" rows of a change, in the same run. ``--breakdown``: the default plan's two ops
timed alone too (level "full").

Triton compiles every configuration once per process; the kernels are compiled first in
``--workers`` processes (on dummy weights of the same shapes and dtypes, which gives the
same cache keys: 85 jobs in 27 s on the 16-core H200 machine), so the timing process finds
them in Triton's cache. Times, errors and method are those of ``mxpass.benchmarks.moe``
(CUDA-graph replays of 4 calls on 4 routings, medians).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

from mxpass.benchmarks.moe import (
    SHAPES,
    MoEShape,
    _experts,
    _hf_experts,
    _mxpass_fn,
    _routing,
    scaled_grouped_mm_moe,
)

# shape -> {T: level}; level "default" (the default plan only), "paths", "full" (tile variations)
CASES = {"qwen3-30b-a3b": {1: "paths", 2: "paths", 4: "paths", 8: "full", 16: "paths", 64: "full", 4096: "default"},
         "mixtral-8x7b": {1: "paths", 8: "paths", 4096: "default"}}
PEERS_AT = {"qwen3-30b-a3b": (1, 8, 64, 4096), "mixtral-8x7b": (1, 4096)}
DYNAMIC_AT = {"qwen3-30b-a3b": (1, 8, 64, 4096), "mixtral-8x7b": (1, 4096)}


def candidates(s: MoEShape, T: int, level: str):
    """[(name, plan or None (the default), part, tiles)]: part "gu" / "dn" for the one-at-a-time tile
    variations of the grouped regime that S = T * A falls in, else "path"."""
    import mxpass.kernels.triton.moe as km

    G = km.Grouped
    base = km.default_plan(s.E, s.A, s.H, s.I)
    dec = base.decode_slots
    S = T * s.A
    out = [("default", None, "path", None)]
    if level == "default":
        return out
    if S <= dec:
        out.append(("grouped forced", km.build_plan(s.E, 0), "path", None))
        if T <= 2:
            for g in (km.Gemv(2, 1024, 4), km.Gemv(8, 256, 4)):
                out.append((f"decode gemv {g.block_n}x{g.block_k}", km.build_plan(s.E, dec, gemv=g), "path", None))
        return out
    if T <= 8:
        out.append(("decode forced", km.build_plan(s.E, 10**9), "path", None))
    out.append(("ordered sum", km.build_plan(s.E, dec, atomic=False), "path", None))
    if level != "full":
        return out
    i = _regime_index(s, S)
    _, gu0, dn0 = km.GROUPED_TILES[i]
    gus = (G(16, 64, 128, 4, 4), G(16, 64, 64, 4, 4), G(16, 32, 128, 4, 4), G(16, 128, 64, 8, 4), G(16, 128, 128, 8, 3))
    dns = (G(16, 128, 128, 4, 3), G(16, 128, 128, 8, 3), G(16, 64, 64, 4, 4), G(16, 128, 64, 4, 4), G(16, 256, 128, 8, 3))
    m = gu0.block_m
    out += [(f"grouped gu {_tiles(g)}", _with_tiles(s, i, g, dn0), "gu", g) for g in (g._replace(block_m=m) for g in gus)
            if g != gu0]
    out += [(f"grouped dn {_tiles(g)}", _with_tiles(s, i, gu0, g), "dn", g) for g in (g._replace(block_m=m) for g in dns)
            if g != dn0]
    return out


def _regime_index(s: MoEShape, S: int) -> int:
    """Index in GROUPED_TILES of the regime that S slots fall in (above the decode range)."""
    import mxpass.kernels.triton.moe as km

    for i, (per_expert, _, _) in enumerate(km.GROUPED_TILES):
        if per_expert is None or S < per_expert * s.E:
            return i
    raise AssertionError("the last regime has no upper end")


def _with_tiles(s: MoEShape, i: int, gu, dn):
    """The default plan with regime i's tiles replaced."""
    import mxpass.kernels.triton.moe as km

    tiles = list(km.GROUPED_TILES)
    tiles[i] = (tiles[i][0], gu, dn)
    return km.build_plan(s.E, km.default_plan(s.E, s.A, s.H, s.I).decode_slots, tuple(tiles))


def _tiles(g) -> str:
    return f"{g.block_m}x{g.block_n}x{g.block_k} w{g.num_warps} s{g.num_stages}"


def load_before(path: str):
    """The module in ``path`` (an earlier kernels/triton/moe.py) with its ops renamed to mxpass_before::."""
    with open(path) as fh:
        src = fh.read()
    src = src.replace('"mxpass::moe_', '"mxpass_before::moe_')
    src = src.replace("torch.ops.mxpass.moe_", "torch.ops.mxpass_before.moe_")
    d = tempfile.mkdtemp(prefix="moe_before_")
    f = os.path.join(d, "mxpass_moe_before.py")
    with open(f, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("mxpass_moe_before", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mxpass_moe_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def _before_fn(mod, fmt, q13, s13, q2, s2):
    """The previous version's MoE as its lowering ran it (activation fake-quantization compiled, two ops)."""
    from mxpass import quant

    fq = None
    if fmt.activation is not None:
        fq = torch.compile(lambda t: quant.fake_quantize_activation(fmt, t, None), dynamic=True, fullgraph=True)
    gran = fmt.weight_granularity

    gate_up, down = torch.ops.mxpass_before.moe_gate_up_triton, torch.ops.mxpass_before.moe_down_triton
    # ops before the fused op took (activation scale, out dtype) after the granularity
    extra = len(gate_up.default._schema.arguments) > 5

    def run(x, ids, tw):
        xq = fq(x) if fq else x
        h, srt, off = gate_up(xq, ids, q13, s13, gran, *((None, x.dtype) if extra else ()))
        hq = fq(h) if fq else h
        return down(hq, ids, tw, srt, off, q2, s2, gran, *((None, x.dtype) if extra else ()))

    return run


# --------------------------------------------------------------------------- compile workers

_WORKER: dict = {}
_BEFORE: dict = {}


def _dummy_weights(shape_name: str):
    if shape_name not in _WORKER:
        s = SHAPES[shape_name]
        q13 = torch.empty(s.E, 2 * s.I, s.H, device="cuda", dtype=torch.float8_e4m3fn)
        q2 = torch.empty(s.E, s.H, s.I, device="cuda", dtype=torch.float8_e4m3fn)
        q13.view(torch.uint8).fill_(0x38)  # 1.0
        q2.view(torch.uint8).fill_(0x38)
        _WORKER.clear()
        _WORKER[shape_name] = (q13, torch.ones(s.E, 2 * s.I, 1, device="cuda"), q2, torch.ones(s.E, s.H, 1, device="cuda"))
    return _WORKER[shape_name]


def _compile_job(job):
    shape_name, T, name, before = job
    try:
        from mxpass.formats import get_format

        s = SHAPES[shape_name]
        w = _dummy_weights(shape_name)
        fmt = get_format("fp8-w")
        if before:
            if "mod" not in _BEFORE:
                _BEFORE["mod"] = load_before(before)
            fn = _before_fn(_BEFORE["mod"], fmt, *w)
        else:
            plan = {n: p for n, p, _, _ in candidates(s, T, CASES[shape_name][T])}[name]
            fn = _mxpass_fn(fmt, *w, plan)
        ids, tw = _routing(T, s, seed=T)
        x = torch.randn(T, s.H, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fn(x, ids, tw)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001  (reported; the timing process reports it again)
        return f"{job}: {exc!r}"[:300]


def precompile(jobs, workers: int) -> list[str]:
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = sorted(jobs, key=lambda j: j[0])  # one shape's weights per worker at a time
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return [e for e in ex.map(_compile_job, jobs, chunksize=1) if e]


# --------------------------------------------------------------------------- timing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.moe_plans")
    p.add_argument("--json", help="rows to this file; each row also appended to <json>.log as measured")
    p.add_argument("--before", help="an earlier kernels/triton/moe.py, timed as the 'before' rows")
    p.add_argument("--shapes", nargs="*", default=list(CASES))
    p.add_argument("--tokens", nargs="*", type=int, help="only these T")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="the default plan's ops timed alone (T = 8, 64)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    from mxpass.benchmarks.suite import environment, write_json

    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    cases = {sh: {T: lv for T, lv in CASES[sh].items() if not args.tokens or T in args.tokens} for sh in args.shapes}
    t0 = time.time()
    jobs = [(sh, T, name, None) for sh, ts in cases.items() for T, lv in ts.items()
            for name, _, _, _ in candidates(SHAPES[sh], T, lv)]
    if args.before:
        jobs += [(sh, T, "before", args.before) for sh, ts in cases.items() for T in ts]
    errors = precompile(jobs, args.workers) if args.workers > 0 else []
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.0f} s; {len(errors)} failed", flush=True)
    for e in errors:
        print("  ", e, flush=True)
    before = load_before(args.before) if args.before else None
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        print(f"{row['shape']:<14}{row['T']:>6}  {row['impl']:<22}{row.get('config', ''):<44}"
              + (f" FAILED {row['error'][:120]}" if "error" in row else
                 f"{row['us']:9.1f} us  err {row['err']:.1e}  {row['tbps']:.2f} TB/s"), flush=True)
        if args.json:
            with open(args.json + ".log", "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    for sh, ts in cases.items():
        _time_shape(sh, ts, before, not args.no_peers, args.breakdown, emit)
        torch.cuda.empty_cache()
    if args.json:
        write_json(args.json, {"env": env, "rows": rows}, default=str)
    return 0


def _time_shape(sh: str, ts: dict, before, peers: bool, breakdown: bool, emit) -> None:
    from mxpass.formats import get_format

    s = SHAPES[sh]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(s.E, 2 * s.I, s.H, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(s.E, s.H, s.I, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    fp8d = get_format("fp8-dynamic")
    q13, s13 = _experts(fp8d, w13)
    q2, s2 = _experts(fp8d, w2)
    weights = (w13, w2, q13, s13, q2, s2)
    hf = _hf_experts(s, w13, w2) if peers else None
    for T, level in ts.items():
        _time_tokens(sh, s, T, level, g, weights, hf, before, breakdown, emit)
        torch.cuda.empty_cache()


def _time_tokens(sh, s: MoEShape, T: int, level: str, g, weights, hf, before, breakdown: bool, emit) -> None:
    from mxpass.benchmarks.linear import graph_ms, rel_error
    from mxpass.formats import get_format
    from mxpass.ops import experts_reference, moe_reference

    w13, w2, q13, s13, q2, s2 = weights
    fp8w, fp8d = get_format("fp8-w"), get_format("fp8-dynamic")
    inputs = []
    for r in range(4):
        ids, tw = _routing(T, s, seed=1000 * T + r)
        inputs.append((torch.randn(T, s.H, generator=g, device="cuda").to(torch.bfloat16), ids, tw))
    x0, ids0, tw0 = inputs[0]
    touched = int(torch.unique(ids0).numel()) * 3 * s.H * s.I
    with torch.no_grad():
        refs = {fmt.name: moe_reference(x0, ids0, tw0, q13, s13, q2, s2, fmt, "silu") for fmt in (fp8w, fp8d)}
        refs["bf16"] = experts_reference(x0, ids0, tw0, w13, w2, "silu") if hf is not None else None

    def measure(impl, config, fn, ref, nbytes=touched):
        row = {"shape": sh, "T": T, "impl": impl, "config": config}
        try:
            with torch.no_grad():
                err = rel_error(fn(x0, ids0, tw0), ref)
                ms = graph_ms(lambda: [fn(*a) for a in inputs], 4, 10, 40)
        except Exception as exc:  # noqa: BLE001  (a configuration that cannot run is reported, not fatal)
            emit({**row, "error": repr(exc)[:300]})
            return None
        emit({**row, "us": ms * 1e3, "err": err, "tbps": nbytes / (ms * 1e-3) / 1e12})
        return ms * 1e3

    if hf is not None and T in PEERS_AT.get(sh, ()):
        measure("hf_grouped_mm_bf16", "", lambda x, i, w: hf(x, i, w), refs["bf16"], 2 * touched)
        measure("scaled_grouped_mm_fp8", "", lambda x, i, w: scaled_grouped_mm_moe(
            x, i, w, q13, s13.view(s.E, -1), q2, s2.view(s.E, -1)), refs["fp8-dynamic"])
    schemes = (fp8w, fp8d) if T in DYNAMIC_AT.get(sh, ()) else (fp8w,)
    if before is not None:
        for fmt in schemes:
            measure(f"before_{fmt.name}", "previous default", _before_fn(before, fmt, q13, s13, q2, s2), refs[fmt.name])
    timed = {}
    for name, plan, part, tiles in candidates(s, T, level):
        for fmt in (schemes if plan is None else (fp8w,)):
            us = measure(f"mxpass_{fmt.name}", name, _mxpass_fn(fmt, q13, s13, q2, s2, plan), refs[fmt.name])
            if us is not None and fmt is fp8w:
                timed[(part, tiles)] = us
    best = _best_pair(s, T * s.A, timed)
    if best is not None:
        for fmt in schemes:
            measure(f"mxpass_{fmt.name}", best[0], _mxpass_fn(fmt, q13, s13, q2, s2, best[1]), refs[fmt.name])
    if breakdown and level == "full":
        _breakdown(sh, s, T, inputs, q13, s13, q2, s2, emit)


def _best_pair(s: MoEShape, S: int, timed: dict):
    """(name, plan) pairing the fastest gate/up and down tiles of the sweep, when both beat the default."""
    ref = timed.get(("path", None))
    best = {}
    for part in ("gu", "dn"):
        c = [(us, g) for (p, g), us in timed.items() if p == part]
        if c and min(c, key=lambda t: t[0])[0] < (ref or float("inf")):
            best[part] = min(c, key=lambda t: t[0])[1]
    if len(best) < 2:
        return None
    return (f"grouped best gu {_tiles(best['gu'])} dn {_tiles(best['dn'])}",
            _with_tiles(s, _regime_index(s, S), best["gu"], best["dn"]))


def _breakdown(sh, s, T, inputs, q13, s13, q2, s2, emit):
    """The default plan's gate/up op and down op, each timed alone (fp8-w)."""
    import mxpass.kernels.triton.moe as km
    from mxpass.benchmarks.linear import graph_ms

    plan = km.default_plan(s.E, s.A, s.H, s.I)
    with torch.no_grad():
        mids = [km.moe_gate_up_with_plan(x, ids, q13, s13, "channel", plan) for x, ids, _ in inputs]
        gu = graph_ms(lambda: [km.moe_gate_up_with_plan(x, ids, q13, s13, "channel", plan) for x, ids, _ in inputs], 4, 10, 40)
        dn = graph_ms(lambda: [km.moe_down_with_plan(m[0], ids, tw, *m[1:], q2, s2, "channel", plan)
                               for m, (_, ids, tw) in zip(mids, inputs)], 4, 10, 40)
    for part, ms in (("gate/up op alone", gu), ("down op alone", dn)):
        emit({"shape": sh, "T": T, "impl": "breakdown", "config": part, "us": ms * 1e3, "err": float("nan"),
              "tbps": float("nan")})


if __name__ == "__main__":
    sys.exit(main())
