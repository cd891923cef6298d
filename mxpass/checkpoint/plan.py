"""The checkpoint reader interface: what a reader tells the loader.

A reader knows one quantization format's config (compressed-tensors, Quark, ...). Given
``config.json``'s ``quantization_config``, the model built on ``meta`` and the names,
shapes and dtypes of the stored tensors (:class:`TensorIndex`, read from the safetensors
headers, no data), it returns a :class:`Plan`: for every quantized Linear, the mxpass
:class:`~mxpass.formats.Format` it runs in and the names of its stored tensors, with the
stored scale's accepted shapes/dtypes and its conversion to mxpass's scale layout.
Everything else is the loader's (``loader.py``): it checks every planned tensor against
the headers before reading any data, reads, converts, seeds mxpass's weight cache, loads
the remaining tensors in the model dtype, and marks the Linears the plan did not quantize.

    class MyReader:
        name = "my-format"
        def accepts(self, quantization_config: dict) -> bool: ...
        def plan(self, quantization_config: dict, model, tensors: TensorIndex) -> Plan: ...

    readers() lists the readers, first match wins (add a new one to ``_builtin_readers``).

mxpass's scale layouts (N = out features, K = in features), what ``ScaleLayout.convert``
must return for the plan's format (:func:`mxpass_scale`, the layout compressed-tensors
stores, needs nothing else):

    weight_granularity  scale
    mx32                [N, K // 32] float8_e8m0fnu (OCP MX v1.0 E8M0; stored as uint8 bytes)
    channel             [N, 1] float32
    tensor              [1] float32
    block               [ceil(N / 128), ceil(K / 128)] float32

Stored weights are [N, K] in ``fmt.weight`` (float8_e4m3fn or int8), dequantized as
``weight * scale`` (one scale per group). A static format (``fmt.static_activation``) needs
``input_scale``: a one-element float tensor, the per-tensor activation scale.

A layer whose ``weight_scale`` is None is stored in a float dtype and quantized by the
loader while reading (online). MoE experts stored per expert as 2-D tensors are planned
with :class:`ExpertsPlan`: three 2-D layers per expert (gate, up, down), merged by the
loader into transformers' 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from mxpass.formats import Format

#: What a stand-in's Linear is kept for when the reader left it unquantized.
UNQUANTIZED = "unquantized in the checkpoint"

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MX_SCALE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)


@dataclass(frozen=True)
class ScaleLayout:
    """How a layer's weight scale is stored, and its conversion to mxpass's layout.

    shapes  -- accepted stored shapes (any one of them)
    dtypes  -- accepted stored dtypes
    convert -- stored scale (already checked against shapes/dtypes, on the target device)
               -> the scale in mxpass's layout for the plan's format (module docstring)
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    convert: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerPlan:
    """One quantized Linear as stored.

    fmt          -- the mxpass format it runs in
    weight       -- stored weight [N, K] in ``fmt.weight`` (or, with no weight_scale, in a
                    float dtype, quantized in ``fmt`` while loading)
    weight_scale -- stored weight scale, or None (online)
    scale        -- its layout and conversion (None: :func:`mxpass_scale`)
    input_scale  -- stored static per-tensor activation scale: required exactly when
                    ``fmt.static_activation``
    skip         -- stored tensors of this layer mxpass does not need (zero points of
                    symmetric schemes): never read, not reported as unused
    origin       -- where the choice came from, for messages ("config group 'group_0'")
    """

    fmt: Format
    weight: str
    weight_scale: str | None
    scale: ScaleLayout | None = None
    input_scale: str | None = None
    skip: tuple[str, ...] = ()
    origin: str = ""


@dataclass(frozen=True)
class ExpertsPlan:
    """The experts of one MoE layer, stored per expert as 2-D Linears.

    gate_up, down -- names of the experts module's 3-D Parameters ("gate_up_proj", "down_proj")
    experts       -- per expert: (gate [I, H], up [I, H], down [H, I]), each a LayerPlan in
                     ``fmt``
    merge_gate_up -- (gate data, gate scale, up data, up scale), each in mxpass's layout
                     -> (gate_up data [2I, H], its scale); None: concatenate data and scales
                     along rows ([gate; up]), which needs equal per-tensor scales within an
                     expert (a reader may requantize with the larger one, as vLLM does, or
                     convert per-tensor scales to per-channel in ``ScaleLayout.convert``)
    """

    fmt: Format
    gate_up: str
    down: str
    experts: tuple[tuple[LayerPlan, LayerPlan, LayerPlan], ...]
    merge_gate_up: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                            tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Plan:
    """What a reader found: quantized Linears and experts by module path."""

    reader: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    experts: dict[str, ExpertsPlan] = field(default_factory=dict)
    kept_reason: str = UNQUANTIZED  # for every Linear not in ``layers``


class TensorIndex(Protocol):
    """The stored tensors, as the safetensors headers describe them (no data read).

    Names are the checkpoint's keys after transformers' renamings for the model (Mixtral's
    ``block_sparse_moe`` -> ``mlp``); ``source_name`` gives the key as stored, which is what
    a config's module names (``ignore``, targets) refer to. ``experts`` lists the experts
    modules stored per expert (``experts.py``)."""

    def __contains__(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def source_name(self, name: str) -> str: ...

    experts: dict  # experts module path -> experts.StoredExperts


class Reader(Protocol):
    name: str

    def accepts(self, quantization_config: dict) -> bool: ...
    def plan(self, quantization_config: dict, model: torch.nn.Module, tensors: TensorIndex) -> Plan: ...


def _builtin_readers() -> list[Reader]:
    from mxpass.checkpoint.compressed_tensors import CompressedTensorsReader
    from mxpass.quark import QuarkReader

    return [CompressedTensorsReader(), QuarkReader()]


def readers() -> list[Reader]:
    return _builtin_readers()


def reader_for(quantization_config: dict) -> Reader:
    for reader in readers():
        if reader.accepts(quantization_config):
            return reader
    method = quantization_config.get("quant_method")
    raise NotImplementedError(
        f"mxpass.checkpoint: quantization_config with quant_method {method!r} is not supported "
        f"(readers: {', '.join(r.name for r in readers())})")


def mxpass_scale(fmt: Format, n: int, k: int) -> ScaleLayout:
    """The stored scale layout compressed-tensors writes for ``fmt``, and its conversion."""
    if fmt.weight_granularity == "mx32":
        # E8M0 bytes, OCP MX v1.0 section 5.4.1: reinterpret, no conversion
        return ScaleLayout(((n, k // 32),), MX_SCALE_DTYPES, lambda s: s.view(torch.float8_e8m0fnu))
    if fmt.weight_granularity == "channel":
        return ScaleLayout(((n, 1), (n,)), FLOATS, lambda s: s.float().reshape(n, 1))
    if fmt.weight_granularity == "block":
        shape = (-(-n // 128), -(-k // 128))
        return ScaleLayout((shape,), FLOATS, lambda s: s.float())
    return ScaleLayout(((), (1,), (1, 1)), FLOATS, lambda s: s.float().reshape(1))
