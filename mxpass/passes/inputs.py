"""New graph inputs for the tensors a pass creates (quantized weights, scales).

Each becomes a placeholder appended after Dynamo's, marked as a static input: AOTAutograd
reads ``tensor_dict["_dynamo_static_input_type"]`` into ``static_input_indices``, so CUDA
graphs keep the tensor's address instead of copying it in at every replay.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class StaticInputs:
    """Appends static placeholders to ``gm``; ``tensors`` are their values, in order."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        self.gm = gm
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.last = placeholders[-1] if placeholders else None
        self.fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.tensors: list[torch.Tensor] = []
        self.nodes: list[fx.Node] = []  # the placeholders of ``tensors``, in order

    def fake(self, t: torch.Tensor):
        return self.fake_mode.from_tensor(t, static_shapes=True) if self.fake_mode else t

    def add(self, name: str, t: torch.Tensor) -> fx.Node:
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

    def weight(self, prefix: str, data: torch.Tensor, scale: torch.Tensor,
               before: fx.Node) -> tuple[fx.Node, fx.Node]:
        """Placeholders for a quantized weight and its scale.

        An E8M0 scale travels as its uint8 storage (Inductor has no e8m0 kernel arguments)
        and is viewed back to float8_e8m0fnu right before ``before``, the op that uses it.
        """
        stored = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
        qw = self.add(f"{prefix}_qweight", data)
        ws = self.add(f"{prefix}_wscale", stored)
        if stored is not scale:
            with self.gm.graph.inserting_before(before):
                ws = self.gm.graph.call_function(torch.ops.aten.view.dtype, (ws, scale.dtype))
            ws.meta["example_value"] = self.fake(scale)
        return qw, ws
