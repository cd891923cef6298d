"""One MoE layer: mxpass's fused Triton MoE vs HF grouped_mm (bf16) and torch._scaled_grouped_mm (FP8), one run.

Shape legend: T tokens, E experts, A active experts per token, H hidden, I expert intermediate.

    python -m mxpass.benchmarks.moe [--sweep] [--shapes qwen3-30b-a3b ...] [--tokens 1 8 ...] [--json out.json]

Implementations (rows' "impl"):
  hf_grouped_mm_bf16     transformers' experts module (Qwen3MoeExperts / MixtralExperts) with its
                         grouped_mm implementation: sort, histc, torch._grouped_mm x2, index_add
  scaled_grouped_mm_fp8  the same flow with torch._scaled_grouped_mm: e4m3 per-channel weights
                         (the fp8-dynamic bytes), per-token e4m3 activations (amax / 448), bf16 out
  mxpass_<scheme>        the scheme's per-expert weights through ``moe_triton``: weight-only
                         schemes as mxpass::moe_fused_triton; W8A8 schemes as
                         mxpass::moe_gate_up_triton + mxpass::moe_down_triton with the activation
                         fake-quantization of x and h as the ATen math the lowering emits, compiled
                         by Inductor (torch.compile of that function alone), as in a compiled model
  mxpass_bf16            the fused op on the bf16 weights (granularity "none")
  mxpass_<scheme>_w8a8   (fp8-dynamic, int8) the registry's ``triton_moe_w8a8``, its first choice
                         for them: the fused op quantizing x and h in its kernels, e4m3 / int8
                         MMAs in the grouped GEMMs (see there)
  sweep                  (--sweep) mxpass fp8-w under other plans (config column)

Method: random bf16 weights (std 0.02), x ~ N(0, 1) in bf16, routing = top-A of uniform
scores (distinct experts per token), routing weights = their softmax. Every function is
first checked against ``mxpass.ops.moe_reference`` / ``experts_reference`` (fp32 math) by
relative Frobenius error on routing 0. Times: medians of ``triton.testing.do_bench`` over
CUDA-graph replays of ``rotate`` calls with ``rotate`` different routings and inputs
(so the experts touched change between calls and an L2-sized working set is not reused),
divided by ``rotate``; every implementation the same way, in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import NamedTuple

import torch

from mxpass.benchmarks.suite import write_json


class MoEShape(NamedTuple):
    E: int
    A: int
    H: int
    I: int  # noqa: E741


SHAPES = {"qwen3-30b-a3b": MoEShape(128, 8, 2048, 768), "mixtral-8x7b": MoEShape(8, 2, 4096, 14336)}
TOKENS = (1, 8, 64, 4096)
SCHEMES = {"qwen3-30b-a3b": ("fp8-w", "fp8-dynamic", "int8", "mxfp8", "mxfp8-w"),
           "mixtral-8x7b": ("fp8-w", "fp8-dynamic")}
# bf16 output rounding is up to 2**-9 relative per element, h is rounded to bf16 before the
# down projection in both, and W8A8 formats can move one quantized element by one step
# where the two sides' fp32 sums round h differently; 2**-7 flags a wrong tile or scale
# (order 1). The FP8 peer's numerics are not the reference's (its own scale rule): its
# error is printed, not checked.
TOLERANCE = 2.0**-7


def _routing(T: int, s: MoEShape, seed: int, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(T, s.E, generator=g, device=device)
    top, ids = scores.topk(s.A, dim=-1)
    return ids, torch.softmax(top, dim=-1).to(torch.bfloat16)


def _experts(fmt, w: torch.Tensor):
    from mxpass import quant

    parts = [quant.quantize_weight(fmt, w[e].contiguous(), f"bench[{e}]") for e in range(w.shape[0])]
    return torch.stack([d for d, _ in parts]), torch.stack([sc for _, sc in parts])


def _hf_experts(s: MoEShape, w13: torch.Tensor, w2: torch.Tensor):
    import transformers

    if s.E == 8:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        cfg = transformers.MixtralConfig(hidden_size=s.H, intermediate_size=s.I, num_local_experts=s.E,
                                         num_experts_per_tok=s.A)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = transformers.Qwen3MoeConfig(hidden_size=s.H, moe_intermediate_size=s.I, num_experts=s.E,
                                          num_experts_per_tok=s.A)
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        mod = cls(cfg)
    mod.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return mod.eval()


def _fp8_rowwise(x: torch.Tensor):
    """(e4m3 x, float32 per-row scale [rows]): amax / 448, as vLLM's dynamic per-token quantization."""
    amax = x.float().abs().amax(dim=-1).clamp_min(1e-12)
    scale = amax / 448.0
    return (x.float() / scale[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def scaled_grouped_mm_moe(x, ids, tw, w13q, s13, w2q, s2):
    """MoE with torch._scaled_grouped_mm (FP8 rowwise), HF's grouped_mm flow; weights [E, N, K] e4m3, scales [E, N]."""
    E, two_i, _ = w13q.shape
    inter = two_i // 2
    A = ids.shape[1]
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    offs = torch.cumsum(torch.histc(sorted_ids.int(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
    xq, xs = _fp8_rowwise(x[perm // A])
    gu = torch._scaled_grouped_mm(xq, w13q.transpose(-2, -1), xs, s13, offs=offs, out_dtype=torch.bfloat16)
    h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    hq, hs = _fp8_rowwise(h)
    out = torch._scaled_grouped_mm(hq, w2q.transpose(-2, -1), hs, s2, offs=offs, out_dtype=torch.bfloat16)
    out = out * tw.reshape(-1)[perm, None]
    return torch.zeros_like(x).index_add_(0, perm // A, out)


def _mxpass_fn(fmt, q13, s13, q2, s2, plan=None, quantized: bool = False):
    """The MoE as the lowering runs it (``moe_triton``): weight-only formats and ``quantized``
    (activations quantized inside the kernels, e4m3 / int8 MMAs: ``triton_moe_w8a8``) as the
    one fused op; other formats with the activation fake-quantization of x and h as
    ``moe_triton`` does it (``fake_quantize_act``: MXFP8 by its Triton kernel; other formats
    by Inductor's code, torch.compile of that math alone, as in a compiled model) around the
    two ops."""
    import mxpass.kernels.triton.moe as km
    from mxpass import quant

    gran = "none" if fmt is None else fmt.weight_granularity
    if km.runs_fused(fmt, quantized):
        return lambda x, ids, tw: km.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plan, quantized)
    # x and h as the lowering quantizes them: MXFP8 by its Triton kernel, other formats by Inductor's code
    if fmt.family == "mxfp8":
        fq = lambda a: km.fake_quantize_act(fmt, a)  # noqa: E731
    else:
        fq = torch.compile(lambda t: quant.fake_quantize_activation(fmt, t, None), dynamic=True, fullgraph=True)

    def run(x, ids, tw):
        if plan is None:
            h, srt, off = torch.ops.mxpass.moe_gate_up_triton(fq(x), ids, q13, s13, gran)
            return torch.ops.mxpass.moe_down_triton(fq(h), ids, tw, srt, off, q2, s2, gran)
        h, srt, off = km.moe_gate_up_with_plan(fq(x), ids, q13, s13, gran, plan)
        return km.moe_down_with_plan(fq(h), ids, tw, srt, off, q2, s2, gran, plan)

    return run


def _grouped_plan(base, gu, dn, atomic=True):
    """``base`` with one grouped regime for every S (tiles gu / dn) and no decode path."""
    import mxpass.kernels.triton.moe as km

    return km.Plan(0, base.gate_up_gemv, base.down_gemv, (km.Regime(1, None, gu, dn),), atomic)


def _tiles(g) -> str:
    return f"{g.block_m}x{g.block_n}x{g.block_k} w{g.num_warps} s{g.num_stages}"


def _sweep_plans(s: MoEShape, T: int):
    """(name, plan, part, tiles) worth timing at this T: the decode/grouped switch, then the
    grouped tiles of gate/up (part "gu", down at the default) and of down (part "dn", gate/up at
    the default) varied one at a time, and the ordered top-k sum (part "sum")."""
    import mxpass.kernels.triton.moe as km

    base = km.default_plan(s.E, s.A, s.H, s.I)
    S = T * s.A
    regime = next(r for r in base.regimes if r.s_lo <= max(S, base.decode_slots + 1)
                  and (r.s_hi is None or S < r.s_hi))
    gu0, dn0 = regime.gate_up, regime.down

    def decode(gu, dn):
        return km.Plan(10**9, gu, dn, (km.Regime(10**9 + 1, None, *base.regimes[-1][2:]),))

    G = km.Grouped
    out = []
    if T <= 1:
        for bn, bk, nw in ((4, 512, 4), (2, 1024, 4)):
            out.append((f"decode gemv bn{bn} bk{bk} w{nw}", decode(km.Gemv(bn, bk, nw), km.Gemv(bn, bk, nw)), "decode", None))
    if S < 8 * s.E:  # few slots per expert: bandwidth-bound, narrow M
        gus = (G(16, 32, 128, 4, 3), G(16, 64, 128, 4, 4), G(16, 64, 256, 4, 3))
        dns = (G(16, 32, 128, 4, 3), G(16, 128, 128, 4, 3), G(16, 64, 256, 4, 3))
    elif S < 32 * s.E:
        gus = (G(32, 32, 128, 4, 3), G(32, 64, 128, 4, 4), G(32, 64, 256, 4, 3))
        dns = (G(32, 32, 128, 4, 3), G(32, 128, 128, 4, 3), G(32, 64, 256, 4, 3))
    else:  # compute-bound: larger tiles cut the L2 -> SM bytes per MMA
        gus = (G(64, 64, 64, 4, 3), G(64, 64, 64, 4, 4), G(64, 128, 64, 8, 3), G(128, 64, 64, 8, 3),
               G(128, 128, 64, 8, 3), G(128, 128, 64, 8, 4), G(64, 128, 128, 8, 3))
        dns = (G(64, 128, 64, 8, 3), G(128, 128, 64, 8, 3), G(128, 128, 64, 8, 4), G(64, 256, 64, 8, 3),
               G(128, 256, 64, 8, 3), G(128, 128, 128, 8, 3))
    out.append((f"grouped default gu {_tiles(gu0)} dn {_tiles(dn0)}", _grouped_plan(base, gu0, dn0), "base", None))
    out += [(f"grouped gu {_tiles(g)}", _grouped_plan(base, g, dn0), "gu", g) for g in gus if g != gu0]
    out += [(f"grouped dn {_tiles(g)}", _grouped_plan(base, gu0, g), "dn", g) for g in dns if g != dn0]
    out.append(("grouped default, ordered sum", _grouped_plan(base, gu0, dn0, atomic=False), "sum", None))
    return out


def _best_combination(s: MoEShape, T: int, timed: dict):
    """(name, plan) pairing the fastest gate/up and down tiles of the one-at-a-time sweep, or None
    when one of them is the default (then that pairing was timed already). timed: (part, tiles) -> us."""
    import mxpass.kernels.triton.moe as km

    base = km.default_plan(s.E, s.A, s.H, s.I)
    ref = timed.get(("base", None))
    if ref is None:
        return None
    best = {}
    for part in ("gu", "dn"):
        cands = [(us, g) for (p, g), us in timed.items() if p == part]
        if cands and min(cands)[0] < ref:
            best[part] = min(cands, key=lambda c: c[0])[1]
    if len(best) < 2:
        return None
    atomic = timed.get(("sum", None), float("inf")) >= ref
    return (f"grouped best gu {_tiles(best['gu'])} dn {_tiles(best['dn'])}{'' if atomic else ' ordered sum'}",
            _grouped_plan(base, best["gu"], best["dn"], atomic))


def _touched_bytes(ids: torch.Tensor, s: MoEShape, bytes_per_weight: float) -> float:
    return int(torch.unique(ids).numel()) * 3 * s.H * s.I * bytes_per_weight


def run(shapes=tuple(SHAPES), tokens=TOKENS, rotate: int = 4, warmup: int = 10, rep: int = 40,
        sweep: bool = False, log=None, impls=None, rounds: int = 1) -> list[dict]:
    """Rows: shape, T, impl, config, us, err, weight_gb (bytes of the experts routing 0 touches),
    tbps (those bytes / time), tflops, vs_hf and vs_fp8 (peer time / time). ``impls``: time only
    these implementations (names as in the rows; None: all); the sweep runs regardless.
    ``rounds``: time every implementation that many times, round after round (so a drift of
    the GPU's speed during the run reaches all of them alike), and report the median
    (``us_rounds``: every round's time)."""
    rows: list[dict] = []

    def emit(row):
        rows.append(row)
        print(_fmt(row), flush=True)
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    for shape_name in shapes:
        _bench_shape(shape_name, tokens, rotate, warmup, rep, sweep, emit, impls, rounds)
        torch.cuda.empty_cache()
    return rows


def _bench_shape(shape_name: str, tokens, rotate, warmup, rep, sweep, emit, only=None, rounds: int = 1) -> None:
    from mxpass.formats import get_format

    s = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(s.E, 2 * s.I, s.H, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(s.E, s.H, s.I, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    hf = _hf_experts(s, w13, w2)
    fp8 = get_format("fp8-dynamic")
    q13_8, s13_8 = _experts(fp8, w13)
    q2_8, s2_8 = _experts(fp8, w2)
    empty = torch.empty(0, device="cuda")
    # impl -> (reference key, function, weight bytes per element)
    impls = {"hf_grouped_mm_bf16": ("bf16", lambda x, i, w: hf(x, i, w), 2.0),
             "scaled_grouped_mm_fp8": ("fp8-dynamic", lambda x, i, w: scaled_grouped_mm_moe(
                 x, i, w, q13_8, s13_8.view(s.E, -1), q2_8, s2_8.view(s.E, -1)), 1.0),
             "mxpass_bf16": ("bf16", _mxpass_fn(None, w13, empty, w2, empty), 2.0)}
    weights = {"bf16": (None, w13, None, w2, None), "fp8-dynamic": (fp8, q13_8, s13_8, q2_8, s2_8)}
    for scheme in SCHEMES[shape_name]:
        fmt = get_format(scheme)
        same = scheme in ("fp8-w", "fp8-dynamic")  # per-channel e4m3: the same bytes
        q13, s13 = (q13_8, s13_8) if same else _experts(fmt, w13)
        q2, s2 = (q2_8, s2_8) if same else _experts(fmt, w2)
        weights[scheme] = (fmt, q13, s13, q2, s2)
        impls[f"mxpass_{scheme}"] = (scheme, _mxpass_fn(fmt, q13, s13, q2, s2), 1.0 + (1 / 32 if fmt.block == 32 else 0))
        if scheme in ("fp8-dynamic", "int8"):
            impls[f"mxpass_{scheme}_w8a8"] = (scheme, _mxpass_fn(fmt, q13, s13, q2, s2, quantized=True), 1.0)
    if only is not None:
        impls = {k: v for k, v in impls.items() if k in only}
    for T in tokens:
        _bench_tokens(shape_name, s, T, g, w13, w2, weights, impls, rotate, warmup, rep, sweep, emit, rounds)
        torch.cuda.empty_cache()


def _bench_tokens(shape_name, s, T, g, w13, w2, weights, impls, rotate, warmup, rep, sweep, emit, rounds=1) -> None:
    from mxpass.benchmarks.linear import graph_ms, rel_error
    from mxpass.ops import experts_reference, moe_reference

    inputs = []
    for r in range(rotate):
        ids, tw = _routing(T, s, seed=1000 * T + r)
        inputs.append((torch.randn(T, s.H, generator=g, device="cuda").to(torch.bfloat16), ids, tw))
    x0, ids0, tw0 = inputs[0]
    refs: dict[str, torch.Tensor] = {}

    def ref_of(key):
        if key not in refs:
            fmt, q13, s13, q2, s2 = weights[key]
            with torch.no_grad():
                refs[key] = (experts_reference(x0, ids0, tw0, w13, w2, "silu") if fmt is None else
                             moe_reference(x0, ids0, tw0, q13, s13, q2, s2, fmt, "silu"))
        return refs[key]

    def timed(fn, ref):
        with torch.no_grad():
            err = rel_error(fn(x0, ids0, tw0), ref)
            ms = graph_ms(lambda: [fn(*a) for a in inputs], rotate, warmup, rep)
        return ms, err

    def measure(row, fn, ref, weight_bytes):
        try:
            ms, err = timed(fn, ref)
        except Exception as exc:  # a peer or configuration that cannot run here
            emit({**row, "error": repr(exc)[:300]})
            return None
        emit(_row(row, s, T, ms, err, weight_bytes, times))
        return ms

    # every implementation once per round, rounds interleaved; the median of the rounds
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    errs: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for impl, (key, fn, _) in impls.items():
            if impl in failed:
                continue
            try:
                ms, errs[impl] = timed(fn, ref_of(key))
            except Exception as exc:  # a peer that cannot run here
                failed[impl] = repr(exc)[:300]
                continue
            samples[impl].append(ms)
    times: dict[str, float] = {impl: statistics.median(v) for impl, v in samples.items() if impl not in failed}
    for impl, (key, fn, bpw) in impls.items():
        row = {"shape": shape_name, "T": T, "impl": impl, "config": ""}
        if impl in failed:
            emit({**row, "error": failed[impl]})
            continue
        if rounds > 1:
            row["us_rounds"] = [ms * 1e3 for ms in samples[impl]]
        others = {k: v for k, v in times.items() if k != impl}
        emit(_row(row, s, T, times[impl], errs[impl], _touched_bytes(ids0, s, bpw), others))
    if sweep:
        fmt, q13, s13, q2, s2 = weights["fp8-w"]
        sweep_us: dict = {}
        for name, plan, part, tiles in _sweep_plans(s, T):
            ms = measure({"shape": shape_name, "T": T, "impl": "sweep", "config": name},
                         _mxpass_fn(fmt, q13, s13, q2, s2, plan), ref_of("fp8-w"), _touched_bytes(ids0, s, 1.0))
            if ms is not None:
                sweep_us[(part, tiles)] = ms * 1e3
        combo = _best_combination(s, T, sweep_us)
        if combo is not None:
            measure({"shape": shape_name, "T": T, "impl": "sweep", "config": combo[0]},
                    _mxpass_fn(fmt, q13, s13, q2, s2, combo[1]), ref_of("fp8-w"), _touched_bytes(ids0, s, 1.0))
        if T * s.A >= 32 * s.E and "mxfp8-w" in weights:  # MX weights under the large tiles too
            fmt, q13, s13, q2, s2 = weights["mxfp8-w"]
            for name, plan, part, tiles in _sweep_plans(s, T):
                if part == "base" or (part in ("gu", "dn") and tiles.block_m == 128 and tiles.block_n == 128):
                    measure({"shape": shape_name, "T": T, "impl": "sweep_mxfp8-w", "config": name},
                            _mxpass_fn(fmt, q13, s13, q2, s2, plan), ref_of("mxfp8-w"), _touched_bytes(ids0, s, 1 + 1 / 32))


def _row(row: dict, s: MoEShape, T: int, ms: float, err: float, weight_bytes: float, times: dict) -> dict:
    hf, fp8 = times.get("hf_grouped_mm_bf16"), times.get("scaled_grouped_mm_fp8")
    return {**row, "us": ms * 1e3, "err": err, "weight_gb": weight_bytes / 1e9,
            "tbps": weight_bytes / (ms * 1e-3) / 1e12,
            "tflops": 2.0 * T * s.A * 3 * s.H * s.I / (ms * 1e-3) / 1e12,
            "vs_hf": hf / ms if hf else None, "vs_fp8": fp8 / ms if fp8 else None}


def _fmt(r: dict) -> str:
    head = f"{r['shape']:<14}{r['T']:>6}  {r['impl']:<24}{r.get('config', ''):<36}"
    if "error" in r:
        return head + " FAILED " + r["error"][:150]
    vs = "".join(f" {r[k]:5.2f}x {k[3:]}" if r.get(k) else "" for k in ("vs_hf", "vs_fp8"))
    tol = 2.0**-5 if r["impl"].endswith("_w8a8") else TOLERANCE  # see triton_moe_w8a8
    flag = "" if r["impl"].startswith(("scaled", "hf")) or r["err"] <= tol else "  ERR>TOL"
    return (head + f"{r['us']:9.1f} us {r['tbps']:5.2f} TB/s {r['tflops']:6.1f} TF err {r['err']:.1e}{vs}{flag}")


def kernel_stats() -> list[dict]:
    """Registers, spills and shared memory of every grouped MoE kernel compiled in this process
    (best effort: read from Triton's in-process cache; empty where its layout differs)."""
    import mxpass.kernels.triton.moe as km

    out = []
    for fn in (km._moe_gate_up_kernel, km._moe_down_kernel, km._moe_gate_up_q_kernel, km._moe_down_q_kernel):
        try:
            for cache in getattr(fn, "device_caches", {}).values():
                for key, k in cache[0].items():
                    out.append({"kernel": fn.__name__, "key": str(key)[-400:], "n_regs": getattr(k, "n_regs", None),
                                "n_spills": getattr(k, "n_spills", None),
                                "shared": getattr(getattr(k, "metadata", None), "shared", None)})
        except Exception as exc:  # noqa: BLE001  (diagnostics only)
            out.append({"kernel": fn.__name__, "error": repr(exc)[:200]})
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'shape':<14}{'T':>6}  {'impl':<24}{'config':<36}"
    return "\n".join([head, "-" * 100, *(_fmt(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.moe")
    p.add_argument("--sweep", action="store_true", help="also time other plans of the fp8-w kernels")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    p.add_argument("--impls", nargs="*", help="time only these implementations (default: all)")
    p.add_argument("--json", help="write the rows to this file (and append each row to <json>.log as measured)")
    p.add_argument("--rounds", type=int, default=1, help="time every implementation this many times, interleaved; "
                   "rows report the median")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the MoE benchmark measures GPU kernels: no CUDA device here")
    from mxpass.benchmarks.suite import environment

    print(" ".join(f"{k}={v}" for k, v in environment().items()), flush=True)
    rows = run(tuple(args.shapes), tuple(args.tokens), sweep=args.sweep, log=args.json and args.json + ".log",
               impls=args.impls, rounds=args.rounds)
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"env": environment(), "rows": rows, "kernels": kernel_stats()}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
