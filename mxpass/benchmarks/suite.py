"""``mxpass bench``: the benchmarks, run in one process, printed as tables."""

from __future__ import annotations

import platform
import time

import torch


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def write_json(path: str | None, data, default=None) -> None:
    """Write a benchmark's rows (or any JSON-able result) to ``path``; nothing when it is None."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=default)


def run_all(what=("linear", "model")) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("mxpass bench measures GPU kernels: no CUDA device here")
    env = environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    rows: list[dict] = []
    if "linear" in what:
        from mxpass.benchmarks import linear

        lin = linear.run()
        print(linear.format_table(lin))
        rows += [{**r, "bench": r.get("bench", "linear")} for r in lin]
    if "gemv" in what:
        from mxpass.benchmarks import gemv

        gem = gemv.run()
        print(gemv.format_table(gem))
        rows += gem
    if "load" in what:
        from mxpass.benchmarks import load

        for scheme in ("fp8-dynamic", "mxfp8"):
            rows_load = load.run(scheme)
            print(load.format_table(rows_load))
            rows += rows_load
    if "moe" in what:
        from mxpass.benchmarks import moe

        rows_moe = moe.run()
        print(moe.format_table(rows_moe))
        rows += [{**r, "bench": "moe"} for r in rows_moe]
    if "moe-model" in what:
        from mxpass.benchmarks import model

        mm = model.run_moe()
        print(model.format_moe_table(mm))
        rows += mm
    if "schemes" in what:  # every scheme's linear through the backend, one graph per M (static M)
        from mxpass.benchmarks import schemes

        rows += schemes.run(static=True)
    if "large-m" in what:  # block-scaled FP8 vs rowwise GEMMs; W8A16 kernels across M
        from mxpass.benchmarks import large_m

        rows += large_m.kernels() + large_m.w8a16()
    if "layer" in what:  # activation quantization inside an HF Llama decoder layer, 4096 tokens
        from mxpass.benchmarks import layer

        lay = layer.run()
        print(layer.format_table(lay))
        rows += lay
    if "model" in what:
        from mxpass.benchmarks import model

        mod = model.run()
        print(model.format_table(mod))
        rows += mod
    return [{**r, **{f"env_{k}": v for k, v in env.items()}} for r in rows]
