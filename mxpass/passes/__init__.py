"""The FX passes over Dynamo's graph, and what they share."""

from __future__ import annotations

import torch.fx as fx


def node_value(node: fx.Node):
    """The example (fake) value Dynamo or a pass recorded on ``node``: ``example_value``,
    else ``val``; None when it has neither."""
    return node.meta.get("example_value", node.meta.get("val"))
