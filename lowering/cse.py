"""Common-subexpression elimination on the post-grad graph, for this compile only.

q, k and v (and gate and up) read the same activation; each ``mxpass::linear``
decomposes into its own copy of the activation quantization. Inductor fuses all copies
into the producer's kernel but writes one quantized buffer per copy (seen in the CPU
generated code: one RMSNorm kernel storing two identical buffers for gate and up). This
pass merges identical pure ATen nodes so the buffer is computed and written once.
Installed through ``config_patches`` (``post_grad_custom_pre_pass``), never globally.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass


def _allocates(node: fx.Node) -> bool:
    """An uninitialized allocation (empty, empty_strided, empty_like, new_empty...). Merging two
    saves nothing, and where the buffer is then written by a kernel (a ``triton_op``'s outputs
    are ``torch.empty`` filled by its kernel), every writer but one must work on a clone:
    seen on an 8B-shaped Llama decode as one copy kernel per quantized activation."""
    return node.target._schema.name.split("::")[-1].startswith(("empty", "new_empty"))


def _pure(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or _allocates(node):
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)


def _key(node: fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return ("const", str(a))
        if isinstance(a, float):  # nan != nan, and 0.0 == -0.0: compare spellings instead
            return ("float", repr(a))
        return a

    try:
        key = (node.target, freeze(node.args), tuple(sorted((k, freeze(v)) for k, v in node.kwargs.items())))
        hash(key)
    except TypeError:
        return None
    return key


def merge_identical_nodes(graph: fx.Graph) -> int:
    """Replace each pure node that repeats an earlier one with that one; returns how many."""
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if not _pure(node):
            continue
        key = _key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


class MergeIdenticalNodes(CustomGraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        merge_identical_nodes(graph)

    def uuid(self) -> bytes:
        # part of Inductor's cache key: changes whenever this file's code changes
        return hashlib.sha256(inspect.getsource(merge_identical_nodes).encode()
                              + inspect.getsource(_key).encode() + inspect.getsource(_pure).encode()
                              + inspect.getsource(_allocates).encode()).digest()
