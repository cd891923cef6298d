"""Command line: ``mxpass demo`` and ``mxpass bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from mxpass.formats import format_names

    parser = argparse.ArgumentParser(prog="mxpass")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="compile the real all-MiniLM-L6-v2 and compare with bf16/fp32")
    demo.add_argument("--scheme", default="mxfp8", choices=format_names())
    demo.add_argument("--iters", type=int, default=10)
    bench = sub.add_parser("bench", help="benchmarks (GPU): linear op and model forward")
    bench.add_argument("what", nargs="*", help="linear, model, moe-model, gemv, load, moe, schemes, large-m, layer "
                       "(default: linear and model)")
    bench.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)

    if args.cmd == "demo":
        from mxpass.demo import main as demo_main

        demo_main(scheme=args.scheme, iters=args.iters)
        return 0
    if args.cmd == "bench":
        from mxpass.benchmarks.suite import run_all, write_json

        known = ("linear", "model", "moe-model", "gemv", "load", "moe", "schemes", "large-m", "layer")
        unknown = set(args.what) - set(known)
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(known)}")
        rows = run_all(args.what or ["linear", "model"])
        write_json(args.json, rows)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
