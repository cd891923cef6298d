"""The FX passes over Dynamo's graph, and what they share."""

from __future__ import annotations

import torch.fx as fx


def node_value(node: fx.Node):
    """The example (fake) value Dynamo or a pass recorded on ``node``: ``example_value``,
    else ``val``; None when it has neither."""
    return node.meta.get("example_value", node.meta.get("val"))


def target_name(node: fx.Node) -> str:
    """What ``node`` calls, as a name: the method name of a call_method ("view"), the function's
    ``__name__`` of a call_function ("matmul", "topk"), else its text."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
