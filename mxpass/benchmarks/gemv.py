"""Small-M linear: the CUDA tensor-core GEMVs vs cuBLAS in the same run (GPU).

Per scheme, shape and M: the kernel (``w8a8_gemv`` for the W8A8 schemes, ``w8a16_gemv``
for the weight-only ones) is checked against fp64 math on the same quantized operands
(relative Frobenius error), then timed with its peers: cuBLAS bf16 on the unquantized
weight, ``torch._scaled_mm`` (rowwise for fp8-dynamic, tensorwise for fp8),
``torch._int_mm`` (int8, padded to the 17 rows it needs), ``triton_mxfp8`` (mxfp8 on the
quantize-dequantized activation, and mxfp8-w), ``triton_w8`` (the other weight-only
schemes). For mxfp8 the row also times ``w8a16_gemv`` on the quantize-dequantized
activation (``a16_ms``), the same numerics as ``triton_mxfp8``.

Times (``stream_ms``): one CUDA graph of calls on distinct weight copies, together 8x the
L2, replayed back to back; this is how a decode forward streams its weights. The same
kernel and cuBLAS bf16 are also timed the earlier way (``graph_ms``: 4 copies,
``do_bench`` clearing the L2 before every replay), as ``*_do_bench`` in the rows.

    python -m mxpass.benchmarks.gemv [--schemes mxfp8,int8] [--ms 1,16] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from mxpass.benchmarks.suite import write_json

SCHEMES = ("fp8-dynamic", "fp8", "fp8-block", "int8", "mxfp8", "fp8-w", "fp8-w-tensor", "fp8-w-block", "mxfp8-w")
SHAPES = ((4096, 12288), (4096, 28672), (14336, 4096))
MS = (1, 4, 16)


def _peer(name, f, x, xq, xs, qs):
    """(peer name, callable over the weight copies) for a scheme, or (None, None)."""
    if name in ("fp8-dynamic", "fp8"):
        rowwise = name == "fp8-dynamic"
        sa = xs.reshape(-1, 1) if rowwise else xs.reshape(())
        return f"_scaled_mm {'rowwise' if rowwise else 'tensorwise'}", lambda: [torch._scaled_mm(
            xq, q.t(), scale_a=sa, scale_b=s.reshape(1, -1) if rowwise else s.reshape(()),
            out_dtype=torch.bfloat16) for q, s in qs]
    if name == "int8":
        xp = torch.nn.functional.pad(xq, (0, 0, 0, max(17 - xq.shape[0], 0)))
        return "_int_mm (17 rows)", lambda: [torch._int_mm(xp, q.t()) for q, _ in qs]
    if name in ("mxfp8", "mxfp8-w"):
        from mxpass.kernels.triton import mxfp8_linear  # noqa: F401  (registers the op)

        op = torch.ops.mxpass.mxfp8_linear_triton
        return "triton_mxfp8", lambda: [op(x, q, s) for q, s in qs]
    if f.activation is None:
        from mxpass.kernels.triton import w8_linear  # noqa: F401  (registers the op)

        op = torch.ops.mxpass.w8_linear_triton
        return "triton_w8", lambda: [op(x, q, s, None, f.weight_granularity) for q, s in qs]
    return None, None


def run(schemes=SCHEMES, shapes=SHAPES, ms=MS) -> list[dict]:
    from mxpass import quant
    from mxpass.benchmarks.linear import _no_wrap_triton, graph_ms, rel_error, stream_copies, stream_ms
    from mxpass.formats import get_format
    from mxpass.kernels.cuda import w8a8_gemv as G

    rows = []
    for k, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, generator=g, device="cuda") * 0.02
        wb = [w.bfloat16() for _ in range(stream_copies(2 * n * k))]
        xs_by_m = {m: torch.randn(m, k, generator=g, device="cuda").bfloat16() for m in ms}
        bf16 = {m: (stream_ms(lambda: [torch.mm(x, v.t()) for v in wb], len(wb)),
                    graph_ms(lambda: [torch.mm(x, v.t()) for v in wb[:4]], 4)) for m, x in xs_by_m.items()}
        for name in schemes:
            f = get_format(name)
            act = torch.tensor([0.05], device="cuda") if f.static_activation else None
            q0, s0 = quant.quantize_weight(f, w, "bench.weight")
            nbytes = q0.numel() * q0.element_size() + s0.numel() * s0.element_size()
            qs = [(q0.clone(), s0.clone()) for _ in range(stream_copies(nbytes))]
            group = G.group_of(f)
            for m, x in xs_by_m.items():
                # the weight-only kernel's activation: x itself, or mxfp8's quantize-dequantized x
                xq, xs = quant.quantize_activation(f, x, act) if f.activation else (None, None)
                xa = x if f.activation is None else quant.dequantize_activation(f, xq, xs).to(x.dtype)
                ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in qs]
                if f.activation is None:
                    y = G.w8a16_gemv(x, q0, s0, None, group)
                    ref = x.double() @ quant.dequantize_weight(f, q0, s0).double().t()
                    call = lambda i: G.w8a16_gemv_into(ys[i], x, *qs[i], None, group)  # noqa: E731
                else:
                    y = G.w8a8_gemv(xq, xs, q0, s0, None, group, torch.bfloat16)
                    ref = quant.dequantize_activation(f, xq, xs) @ quant.dequantize_weight(f, q0, s0).float().t()
                    call = lambda i: G.w8a8_gemv_into(ys[i], xq, xs, *qs[i], None, group)  # noqa: E731
                t = stream_ms(lambda: [call(i) for i in range(len(qs))], len(qs))
                t_db = graph_ms(lambda: [call(i) for i in range(4)], 4)
                row = dict(bench="w8a8-gemv" if f.activation else "w8a16-gemv", scheme=name, M=m, K=k, N=n,
                           copies=len(qs), bf16_ms=bf16[m][0], ms=t,
                           vs_bf16=bf16[m][0] / t, weight_tbps=nbytes / (t * 1e-3) / 1e12, err=rel_error(y, ref),
                           ms_do_bench=t_db, bf16_ms_do_bench=bf16[m][1], peer=None, peer_ms=None, a16_ms=None)
                if name == "mxfp8":
                    row["a16_err"] = rel_error(G.w8a16_gemv(xa, q0, s0, None, group), ref)
                    row["a16_ms"] = stream_ms(lambda: [G.w8a16_gemv_into(ys[i], xa, *qs[i], None, group)
                                                       for i in range(len(qs))], len(qs))
                peer, fn = _peer(name, f, xa, xq, xs, qs)
                if fn is not None:
                    with _no_wrap_triton():
                        row["peer"], row["peer_ms"] = peer, stream_ms(fn, len(qs))
                rows.append(row)
                print(format_row(row), flush=True)
            qs = None  # frees the copies before the next scheme
        wb = None
        torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    peer = "" if r["peer_ms"] is None else f"{r['peer']} {r['peer_ms'] * 1e3:6.1f} us ({r['peer_ms'] / r['ms']:.2f}x)"
    if r.get("a16_ms") is not None:
        peer += f"  w8a16_gemv {r['a16_ms'] * 1e3:6.1f} us (err {r['a16_err']:.1e})"
    return (f"{r['scheme']:12} M={r['M']:3} K={r['K']:5} N={r['N']:5} {r['ms'] * 1e3:6.1f} us "
            f"{r['weight_tbps']:5.2f} TB/s  bf16 {r['bf16_ms'] * 1e3:6.1f} us ({r['vs_bf16']:.2f}x)  {peer}  "
            f"err {r['err']:.1e}  do_bench {r['ms_do_bench'] * 1e3:.1f} vs bf16 {r['bf16_ms_do_bench'] * 1e3:.1f} us")


def format_table(rows: list[dict]) -> str:
    lines = ["| scheme | M | K x N | us | weight TB/s | vs cuBLAS bf16 | peer | vs peer | err "
             "| do_bench us (vs bf16) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_peer = "" if r["peer_ms"] is None else f"{r['peer_ms'] / r['ms']:.2f}x"
        lines.append(f"| {r['scheme']} | {r['M']} | {r['K']}x{r['N']} | {r['ms'] * 1e3:.1f} | {r['weight_tbps']:.2f} | "
                     f"{r['vs_bf16']:.2f}x | {r['peer'] or ''} | {vs_peer} | {r['err']:.1e} | "
                     f"{r['ms_do_bench'] * 1e3:.1f} ({r['bf16_ms_do_bench'] / r['ms_do_bench']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated token counts (at most 16)")
    args = p.parse_args(argv)
    rows = run(schemes=tuple(args.schemes.split(",")), ms=tuple(int(m) for m in args.ms.split(",")))
    print(format_table(rows))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
