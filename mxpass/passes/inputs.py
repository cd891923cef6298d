"""New graph inputs for the tensors a pass creates (quantized weights, scales), and the call
that passes them.

Each becomes a placeholder appended after Dynamo's, marked as a static input: AOTAutograd
reads ``tensor_dict["_dynamo_static_input_type"]`` into ``static_input_indices``, so CUDA
graphs keep the tensor's address instead of copying it in at every replay.

Each tensor also records how it follows from Dynamo's inputs (:class:`Derivation`: a
quantized weight from its Parameter), because Dynamo runs one compiled graph for other
Parameters than it was compiled with: it does not guard on a Parameter's identity, so every
module instance that runs the same code reuses the graph (the layers of a model with a graph
break inside a layer; a second model compiled with the same backend). :class:`BoundInputs`
computes the tensors for the Parameters a call actually holds.
"""

from __future__ import annotations

import logging
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

log = logging.getLogger("mxpass")


@dataclass
class Derivation:
    """``derive(*sources)`` gives the values of placeholders ``nodes`` (in the form they are
    passed in) for the graph inputs ``sources``; ``what`` names them in errors."""

    sources: tuple[torch.Tensor, ...]
    nodes: tuple[fx.Node, ...]
    derive: Callable[..., tuple[torch.Tensor, ...]]
    what: str


def _stored(scale: torch.Tensor) -> torch.Tensor:
    """An E8M0 scale travels as its uint8 storage (Inductor has no e8m0 kernel arguments)."""
    return scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale


class StaticInputs:
    """Appends static placeholders to ``gm``; ``tensors`` are their values, in order."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm = gm
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.last = placeholders[-1] if placeholders else None
        self.fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.tensors: list[torch.Tensor] = []
        self.nodes: list[fx.Node] = []  # the placeholders of ``tensors``, in order
        self._derivations: list[Derivation] = []

    def fake(self, t: torch.Tensor):
        return self.fake_mode.from_tensor(t, static_shapes=True) if self.fake_mode else t

    def add(self, name: str, t: torch.Tensor, sources: tuple[torch.Tensor, ...] = (),
            derive: Callable[..., torch.Tensor] | None = None, what: str = "") -> fx.Node:
        """A placeholder for ``t``; ``derive(*sources)`` gives its value for other ``sources``
        (graph inputs). Without ``derive`` the value is a constant of the graph."""
        graph = self.gm.graph
        ctx = graph.inserting_after(self.last) if self.last is not None else graph.inserting_before(None)
        with ctx:
            ph = graph.placeholder(name)
        self.last = ph
        ph._dynamo_source = None  # not a user input: no guards
        ph.meta["example_value"] = self.fake(t)
        ph.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        t._dynamo_static_input_type = "unguarded"
        self.tensors.append(t)
        self.nodes.append(ph)
        if derive is not None:
            self._derivations.append(Derivation(tuple(sources), (ph,), lambda *s: (derive(*s),), what or name))
        return ph

    def remove_unused(self) -> None:
        """Drop the placeholders (and their tensors) that no node uses any more."""
        for i in reversed(range(len(self.nodes))):
            ph = self.nodes[i]
            if ph.users:
                continue
            if ph is self.last:
                self.last = ph.prev if ph.prev.op == "placeholder" else None
            self.gm.graph.erase_node(ph)
            del self.nodes[i], self.tensors[i]

    def weight(self, prefix: str, data: torch.Tensor, scale: torch.Tensor, before: fx.Node,
               sources: tuple[torch.Tensor, ...], derive: Callable[..., tuple[torch.Tensor, torch.Tensor]],
               what: str) -> tuple[fx.Node, fx.Node]:
        """Placeholders for a quantized weight and its scale; ``derive(*sources)`` gives
        ``(data, scale)`` for other source Parameters.

        An E8M0 scale travels as its uint8 storage and is viewed back to float8_e8m0fnu
        right before ``before``, the op that uses it.
        """
        stored = _stored(scale)
        qw = self.add(f"{prefix}_qweight", data)
        ws = self.add(f"{prefix}_wscale", stored)

        def both(*s):
            d, sc = derive(*s)
            return d, _stored(sc)

        self._derivations.append(Derivation(tuple(sources), (qw, ws), both, what))
        if stored is not scale:
            with self.gm.graph.inserting_before(before):
                ws = self.gm.graph.call_function(torch.ops.aten.view.dtype, (ws, scale.dtype))
            ws.meta["example_value"] = self.fake(scale)
        return qw, ws

    def derivations(self, offset: int = 0) -> list[tuple[Derivation, list[int | None]]]:
        """Each derivation with the positions of its placeholders among ``tensors`` (plus
        ``offset``; None for a placeholder since removed), for those with one left."""
        index = {ph: i + offset for i, ph in enumerate(self.nodes)}
        out = []
        for d in self._derivations:
            slots = [index.get(ph) for ph in d.nodes]
            if any(s is not None for s in slots):
                out.append((d, slots))
        return out


_VERSION = operator.attrgetter("_version")
_DATA_PTR = operator.methodcaller("data_ptr")


class BoundInputs:
    """``compiled(*args, *tensors)``, with ``tensors`` computed for the Parameters in ``args``.

    A call whose source Parameters are the ones the tensors were computed from (the same
    objects, not modified in place since, their data not replaced) passes them as they are:
    three tuple comparisons built in C. Otherwise (another module instance running this
    graph, weights changed in place, e.g. by ``load_state_dict``, or ``p.data = ...``) every
    derivation is run for the Parameters of the
    call (the weight caches make a repeat a lookup), kept for later calls with the same
    Parameters, and the first time this happens the report says so.
    """

    def __init__(self, compiled: Callable, example_inputs: list, tensors: list[torch.Tensor],
                 derivations: list[tuple[Derivation, list[int | None]]], report):
        self.compiled = self.__wrapped__ = compiled
        self.tensors = list(tensors)
        self.derivations = derivations
        self.report = report
        position = {id(t): i for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor)}
        sources: dict[int, torch.Tensor] = {}
        for d, _slots in derivations:
            for s in d.sources:
                if id(s) not in position:
                    raise RuntimeError(f"mxpass: {d.what}: a weight it is computed from is not a graph input")
                sources.setdefault(id(s), s)
        self._index = [position[i] for i in sources]
        self._slot_of = {i: k for k, i in enumerate(sources)}  # source id -> position in a call's sources
        index = self._index
        self._get = operator.itemgetter(*index) if len(index) > 1 else (lambda a: (a[index[0]],) if index else ())
        self._ids = tuple(sources)
        self._versions = tuple(map(_VERSION, sources.values()))
        self._ptrs = tuple(map(_DATA_PTR, sources.values()))
        self._alive = True  # ids are only compared while the objects they belong to live
        self._refs = [weakref.ref(s, self._dead) for s in sources.values()]
        self._variants: dict[tuple[int, ...], tuple] = {}
        self._told = False

    def _dead(self, _ref) -> None:
        self._alive = False

    def __call__(self, *args):
        srcs = self._get(args)
        if (self._alive and tuple(map(id, srcs)) == self._ids and tuple(map(_VERSION, srcs)) == self._versions
                and tuple(map(_DATA_PTR, srcs)) == self._ptrs):
            return self.compiled(*args, *self.tensors)
        return self.compiled(*args, *self._rebind(srcs))

    def _rebind(self, srcs: tuple) -> list[torch.Tensor]:
        key = tuple(map(id, srcs))
        versions = (tuple(map(_VERSION, srcs)), tuple(map(_DATA_PTR, srcs)))
        hit = self._variants.get(key)
        if hit is not None and hit[1] == versions and all(r() is s for r, s in zip(hit[0], srcs)):
            return hit[2]
        tensors = list(self.tensors)
        for d, slots in self.derivations:
            new = d.derive(*(srcs[self._slot_of[id(s)]] for s in d.sources))
            for slot, t in zip(slots, new):
                if slot is None:
                    continue
                old = tensors[slot]
                if (t.shape, t.dtype, t.device) != (old.shape, old.dtype, old.device):
                    raise ValueError(
                        f"mxpass: {d.what}: computed for the weights of this call it is {tuple(t.shape)} "
                        f"{t.dtype} on {t.device}, where the compiled graph takes {tuple(old.shape)} {old.dtype} "
                        f"on {old.device}")
                t._dynamo_static_input_type = "unguarded"
                tensors[slot] = t
        self._variants = {k: v for k, v in self._variants.items() if all(r() is not None for r in v[0])}
        self._variants[key] = ([weakref.ref(s) for s in srcs], versions, tensors)
        if not self._told:
            self._told = True
            note = (f"graph {self.report.graph} also ran with other weights than it was compiled with "
                    "(another module running the same code, or weights changed in place or replaced): their quantized "
                    "copies were computed for them; the layer names and choices above apply to each")
            self.report.warnings.append(note)
            log.info("mxpass: %s", note)
            warnings.warn(f"mxpass: {note}", stacklevel=3)
        return tensors


def bind_inputs(compiled: Callable, example_inputs: list, statics: list[StaticInputs], report) -> Callable:
    """``compiled`` called with the tensors of ``statics`` appended to Dynamo's inputs, each
    computed for the Parameters of the call (:class:`BoundInputs`)."""
    tensors: list[torch.Tensor] = []
    derivations: list[tuple[Derivation, list[int | None]]] = []
    for s in statics:
        derivations += s.derivations(offset=len(tensors))
        tensors += s.tensors
    if not tensors:
        return compiled
    return BoundInputs(compiled, example_inputs, tensors, derivations, report)


def by_name(value: torch.Tensor, param: torch.Tensor, what: str) -> Callable[..., torch.Tensor]:
    """A derivation for a value given for a layer by name (a static activation scale): it stays
    ``value`` while the layer's weight is the same Parameter (changed in place or not), and
    raises, naming ``what``, for another module's Parameter, whose name the graph cannot know."""
    ref = weakref.ref(param)

    def derive(p):
        if p is ref():
            return value
        raise ValueError(
            f"mxpass: {what} cannot follow other weights: this compiled graph ran with another module's "
            "weights (one running the same code, e.g. after a graph break inside a layer), and the value "
            "was given for the layer by name")
    return derive
