"""Draw docs/performance.png from the benchmark JSON kept beside this file (needs matplotlib).

    python docs/plot_performance.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
rows = [r for name in ("bench-schemes-2026-11-21-h200.json", "bench-schemes2-2026-11-21-h200.json")
        for r in json.loads((HERE / name).read_text())]
shapes = sorted({(r["K"], r["N"]) for r in rows})
fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
for ax, (k, n) in zip(axes, shapes):
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        pts = sorted((r["M"], r["vs_bf16"]) for r in rows if r["scheme"] == scheme and (r["K"], r["N"]) == (k, n))
        kernel = next(r["kernel"] for r in rows if r["scheme"] == scheme)
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=f"{scheme} ({kernel})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_title(f"K={k}, N={n}")
    ax.set_xlabel("tokens M")
axes[0].set_ylabel("speed-up over cuBLAS bf16 (same run)")
axes[-1].legend(fontsize=7)
fig.suptitle("Linear layer through mxpass.backend, activation quantization included (H200, torch 2.11)")
fig.tight_layout()
fig.savefig(HERE / "performance.png", dpi=110)
