"""What mxpass did to a graph: every linear rewritten (with its kernel) and every one kept."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rewritten:
    fqn: str          # module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str         # "linear" (form found in the graph: linear / addmm / matmul)
    scheme: str       # format name
    kernel: str       # registry choice, with the reasons other kernels were not picked
    shape: tuple[int, int]  # (N, K)
    input_quant: str = ""   # where the activation is quantized, when not in Inductor's fused producer
    merged: str = ""        # run as one GEMM with the layers that read the same input, or why not


@dataclass(frozen=True)
class Kept:
    fqn: str
    reason: str


@dataclass
class Report:
    scheme: str
    graph: int = 0
    frame: str = ""   # the function Dynamo compiled; layer names are relative to its module
    rewritten: list[Rewritten] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [("layer", "N x K", "scheme / reason", "kernel")]
        rows += [(r.fqn or "(root)", f"{r.shape[0]} x {r.shape[1]}", r.scheme, r.kernel.split(" (")[0])
                 for r in self.rewritten]
        rows += [(k.fqn or "(root)", "", "kept: " + k.reason, "") for k in self.kept]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
            for r in rows
        ]
        lines.insert(1, "-" * max(len(line) for line in lines))
        frame = f", frame {self.frame}" if self.frame else ""
        head = (f"mxpass report (graph {self.graph}{frame}, scheme {self.scheme}): "
                f"{len(self.rewritten)} rewritten, {len(self.kept)} kept")
        # why each kernel was chosen over the others, once per distinct choice
        tail = [f"kernel {c}" for c in dict.fromkeys(r.kernel for r in self.rewritten) if " (" in c]
        tail += [f"{r.fqn}: {r.input_quant}" for r in self.rewritten if r.input_quant]
        tail += [f"{r.fqn}: {r.merged}" for r in self.rewritten if r.merged]
        tail += [f"warning: {w}" for w in self.warnings]
        return "\n".join([head, *lines, *tail])

    def __str__(self) -> str:
        return self.table()


_REPORTS: list[Report] = []


def record(report: Report) -> None:
    report.graph = len(_REPORTS)
    _REPORTS.append(report)


def last_report() -> Report:
    """The report of the most recently compiled graph (raises if nothing was compiled)."""
    if not _REPORTS:
        raise RuntimeError("mxpass has not compiled any graph yet")
    return _REPORTS[-1]


def reports() -> list[Report]:
    """Reports of every graph compiled in this process, oldest first."""
    return list(_REPORTS)
