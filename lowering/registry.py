"""Kernel registry: which kernel serves which (op, format, device, shape), and why not the others.

Candidates are ordered per (op, format). Each answers ``is_supported(device)`` and
``can_implement(problem)`` with ``(ok, reason)``; the first that accepts wins. The reference
is an ordinary last entry. Overrides:

- ``MXPASS_KERNEL=name``: use this kernel (an error, with its reason, if it cannot run) for
  every op that has a kernel of that name; ops that have none keep their order;
- ``MXPASS_DISABLE_KERNELS=a,b``: skip these.

Every choice is logged once and recorded in the Report by the backend.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from mxpass.formats import Format

log = logging.getLogger("mxpass.kernels")


class Problem(NamedTuple):
    """What a kernel must compute: a linear of K inputs and N outputs in ``fmt`` (op "linear"),
    or the experts of one MoE layer with hidden size K and expert intermediate size N (op "moe")."""

    op: str
    fmt: Format
    device: torch.device
    k: int
    n: int
    dtype: torch.dtype
    m: int | None = None  # rows (tokens) when the graph's M is static, None when it is dynamic


class Kernel(Protocol):
    name: str

    def is_supported(self, device: torch.device) -> tuple[bool, str]: ...

    def can_implement(self, problem: Problem) -> tuple[bool, str]: ...

    def run(self, x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
            bias: torch.Tensor | None, fmt: Format) -> torch.Tensor:
        """x [M, K] (activation quantization already applied) -> y [M, N] in x's dtype."""
        ...


@dataclass(frozen=True)
class Choice:
    kernel: Kernel
    rejected: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def describe(self) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in self.rejected)
        return self.kernel.name + (f" (not picked: {why})" if why else "")


class NoKernelError(RuntimeError):
    pass


class RegistryKey(NamedTuple):
    op: str
    fmt: str


_CANDIDATES: dict[RegistryKey, list[Kernel]] = {}
_LOGGED: set[tuple] = set()


def _build() -> dict[RegistryKey, list[Kernel]]:
    from mxpass.lowering.kernels import candidates

    return candidates()


def candidates_for(op: str, fmt: Format) -> list[Kernel]:
    if not _CANDIDATES:
        _CANDIDATES.update(_build())
    return _CANDIDATES.get(RegistryKey(op, fmt.name), [])


def _split_env(name: str) -> set[str]:
    return {s.strip() for s in os.environ.get(name, "").split(",") if s.strip()}


def choose(problem: Problem) -> Choice:
    """The kernel for ``problem``; raises NoKernelError listing every candidate's reason."""
    # K and N come from weight shapes: static for parameters, symbolic when a traced function
    # takes the weights as inputs under dynamic=True; a kernel is chosen for concrete sizes,
    # so specialize them (a guard on the weight's shape, never on the token count)
    problem = problem._replace(k=int(problem.k), n=int(problem.n))
    forced = os.environ.get("MXPASS_KERNEL", "").strip()
    disabled = _split_env("MXPASS_DISABLE_KERNELS")
    rejected: list[tuple[str, str]] = []
    cands = candidates_for(problem.op, problem.fmt)
    if forced and forced not in {k.name for k in cands} and forced in {k.name for ks in _CANDIDATES.values() for k in ks}:
        forced = ""  # a kernel of another op (MXPASS_KERNEL=triton_moe): this op keeps its own order
    for kernel in cands:
        if forced and kernel.name != forced:
            rejected.append((kernel.name, f"MXPASS_KERNEL={forced}"))
            continue
        if kernel.name in disabled:
            rejected.append((kernel.name, "disabled by MXPASS_DISABLE_KERNELS"))
            continue
        ok, reason = kernel.is_supported(problem.device)
        if ok:
            ok, reason = kernel.can_implement(problem)
        if not ok:
            rejected.append((kernel.name, reason))
            continue
        choice = Choice(kernel, tuple(rejected))
        key = (problem.op, problem.fmt.name, str(problem.device), problem.k, problem.n, problem.dtype,
               problem.m)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.info("mxpass %s %s M=%s K=%d N=%d on %s: %s", problem.op, problem.fmt.name,
                     "dynamic" if problem.m is None else problem.m, problem.k, problem.n,
                     problem.device, choice.describe())
        return choice
    reasons = "; ".join(f"{n}: {r}" for n, r in rejected) or "no candidates registered"
    raise NoKernelError(
        f"no mxpass kernel for {problem.op} {problem.fmt.name} K={problem.k} N={problem.n} "
        f"{problem.dtype} on {problem.device}: {reasons}"
    )

