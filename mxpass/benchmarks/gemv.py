"""Small-M W8A8 linear: the CUDA tensor-core GEMV vs cuBLAS in the same run (GPU).

Per scheme, shape and M: the kernel is checked against fp32 math on the same quantized
operands (relative Frobenius error), then timed with its peers: cuBLAS bf16 on the
unquantized weight, ``torch._scaled_mm`` (rowwise for fp8-dynamic, tensorwise for fp8),
``torch._int_mm`` (int8, padded to the 17 rows it needs). Times: median of CUDA-graph
replays of 4 calls on 4 weight copies (the L2 cannot serve the weight), divided by 4.

    python -m mxpass.benchmarks.gemv [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

from mxpass.benchmarks.suite import write_json

SCHEMES = ("fp8-dynamic", "fp8", "fp8-block", "int8")
SHAPES = ((4096, 12288), (4096, 28672), (14336, 4096))
MS = (1, 4, 16)
_GROUP = {"channel": 0, "tensor": 0, "block": 128}


def run(schemes=SCHEMES, shapes=SHAPES, ms=MS) -> list[dict]:
    from mxpass import quant
    from mxpass.benchmarks.linear import graph_ms, rel_error
    from mxpass.formats import get_format
    from mxpass.kernels.cuda import w8a8_gemv as G

    rows = []
    for k, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        ws = [torch.randn(n, k, generator=g, device="cuda") * 0.02 for _ in range(4)]
        wb = [w.bfloat16() for w in ws]
        for m in ms:
            x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
            bf16 = graph_ms(lambda: [torch.mm(x, w.t()) for w in wb], 4)
            for name in schemes:
                f = get_format(name)
                act = torch.tensor([0.05], device="cuda") if f.static_activation else None
                qs = [quant.quantize_weight(f, w, "bench.weight") for w in ws]
                xq, xs = quant.quantize_activation(f, x, act)
                group = _GROUP[f.weight_granularity]
                y = G.w8a8_gemv(xq, xs, qs[0][0], qs[0][1], None, group, torch.bfloat16)
                ref = quant.dequantize_activation(f, xq, xs) @ quant.dequantize_weight(f, *qs[0]).float().t()
                ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                t = graph_ms(lambda: [G.w8a8_gemv_into(ys[i], xq, xs, *qs[i], None, group) for i in range(4)], 4)
                row = dict(bench="w8a8-gemv", scheme=name, M=m, K=k, N=n, bf16_ms=bf16, ms=t, vs_bf16=bf16 / t,
                           weight_tbps=n * k / (t * 1e-3) / 1e12, err=rel_error(y, ref), peer=None, peer_ms=None)
                if name in ("fp8-dynamic", "fp8"):
                    rowwise = name == "fp8-dynamic"
                    sa = xs.reshape(-1, 1) if rowwise else xs.reshape(())
                    row["peer"] = f"_scaled_mm {'rowwise' if rowwise else 'tensorwise'}"
                    row["peer_ms"] = graph_ms(lambda: [torch._scaled_mm(
                        xq, q.t(), scale_a=sa, scale_b=s.reshape(1, -1) if rowwise else s.reshape(()),
                        out_dtype=torch.bfloat16) for q, s in qs], 4)
                elif name == "int8":
                    xp = torch.nn.functional.pad(xq, (0, 0, 0, max(17 - m, 0)))
                    row["peer"] = "_int_mm (17 rows)"
                    row["peer_ms"] = graph_ms(lambda: [torch._int_mm(xp, q.t()) for q, _ in qs], 4)
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    peer = "" if r["peer_ms"] is None else f"{r['peer']} {r['peer_ms'] * 1e3:6.1f} us ({r['peer_ms'] / r['ms']:.2f}x)"
    return (f"{r['scheme']:12} M={r['M']:3} K={r['K']:5} N={r['N']:5} {r['ms'] * 1e3:6.1f} us "
            f"{r['weight_tbps']:5.2f} TB/s  bf16 {r['bf16_ms'] * 1e3:6.1f} us ({r['vs_bf16']:.2f}x)  {peer}  err {r['err']:.1e}")


def format_table(rows: list[dict]) -> str:
    lines = ["| scheme | M | K x N | us | weight TB/s | vs cuBLAS bf16 | peer | vs peer | err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_peer = "" if r["peer_ms"] is None else f"{r['peer_ms'] / r['ms']:.2f}x"
        lines.append(f"| {r['scheme']} | {r['M']} | {r['K']}x{r['N']} | {r['ms'] * 1e3:.1f} | {r['weight_tbps']:.2f} | "
                     f"{r['vs_bf16']:.2f}x | {r['peer'] or ''} | {vs_peer} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = run()
    print(format_table(rows))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
