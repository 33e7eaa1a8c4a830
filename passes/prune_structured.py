"""``prune-structured``: remove whole output channels, neurons and attention heads, for a smaller dense model.

A *channel group* is a producer layer (MatMul/Gemm/Conv with a constant weight) and every tensor its
output channels flow into: per-channel bias ``Add``/``Mul`` constants, BatchNormalization, elementwise
activations (GELU's Erf and tanh chains included), pooling, ``Flatten``/``Reshape`` to 2-D, Reshapes that
regroup the rows and keep the channels last (HF ``Conv1D``'s (b·q, C) ↔ (b, q, C) around a 2-D Gemm), up
to the layers that contract over the channels (the next MatMul/Gemm's input rows, the next Conv's input
channels; after an NCHW flatten, each channel is a block of H·W consecutive rows). Removing a channel
slices the producer's output columns, every per-channel constant and the consumers' input rows, and
updates Reshape constants that hard-code the width: only standard ONNX ops remain.

Attention heads (``heads=true``): the MiniLM/BERT pattern ``x@Wq+bq → Reshape(0,0,H,d) → Transpose`` (and
K, V) ``→ MatMul → scale/mask → Softmax → MatMul V → Transpose → Reshape(0,0,H·d) → @Wo`` loses whole
heads: Q/K/V columns, biases, Wo rows and the Reshape head counts are sliced. GPT-2's fused projection
(one ``x@Wqkv+b`` then ``Split`` into Q, K, V) loses the head's columns in each third, and the Split
sizes follow; projections may be ``Gemm`` on the rows flattened to 2-D, as HF's ``Conv1D`` exports.
PyTorch exports of it are followed too: Reshape targets built at run time (a head count of -1 or read
with ``Shape`` needs no change; reads of the batch and sequence lengths are left alone), SDPA's NaN
guard after Softmax and its Kᵀ as Reshape-Transpose-Reshape, one-input ``Concat`` (no past keys),
``Cast`` and inference ``Dropout``; a mask built at run time must broadcast over heads by symbolic
shape inference. A computation done head by head on Q or K, such as Llama's rotary embedding
(``x·cos + Concat(-x2, x1)·sin``: Add/Sub/Mul/Neg, Slice and Concat along the head size, tables that
broadcast over the heads), is passed through. Grouped-query attention (K and V repeated for groups of
query heads by ``Reshape(Expand(Unsqueeze(x, 2)))``, as HF Llama exports it) is pruned by key/value head:
each one goes with the query heads it serves, and the repeat's Expand and Reshape shapes follow; so do
the Reshapes of torch's SDPA on a one-token query, which regroups the query heads per key/value head
instead, (b, h, q, d) -> (b, g, r·q, d) and back. With ``kv_cache=true``, keys
and values appended to past-cache graph inputs (``Concat(past, new)`` along the key axis, the result maybe
a ``present`` graph output) lose the pruned heads in the cache inputs and outputs too; the kept indices
are recorded in the model (:mod:`onnxopt.signature`).

A group whose channels reach a graph output, a residual ``Add``/``Concat`` with another tensor, a shared
weight, a subgraph, or any op that cannot be sliced is refused with a message and left as is.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io, signature
from onnxopt.activations import layer_input_rows
from onnxopt.calibration import Dataset, capture, capture_many
from onnxopt.compression import gemm_alpha, solve_masked
from onnxopt.filters import NodeFilter
from onnxopt.passes.recover import GramLayer, require_data
from onnxopt.registry import register
from onnxopt.shapes import ancestors, symbolic_shapes
from onnxopt.stats import model_stats
from onnxopt.weights import (
    WeightUse,
    constant_array,
    constant_tensor,
    name_layers,
    name_uniquely,
    scan_weights,
    set_weight,
)

UNARY_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Mish", "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Sin",
    "Cos", "Identity", "Dropout", "Cast", "ThresholdedRelu", "Shrink", "Floor", "Ceil", "Round", "Sign",
}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
POOL_OPS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
PRODUCER_OPS = ("MatMul", "Gemm", "Conv")


class Refused(Exception):
    """A channel group that cannot be sliced safely; the message says why."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the channels sit in a tensor: negative ``axis``; ``flat`` when each channel is a block of
    consecutive entries of the last axis (after an NCHW Flatten)."""

    axis: int
    rank: int | None
    flat: bool = False

    @property
    def is_axis1(self) -> bool:
        return self.rank is not None and self.axis == 1 - self.rank


@dataclasses.dataclass
class Consumer:
    """A layer contracting over the channels: its weight's input rows (or Conv input channels) are sliced."""

    use: WeightUse
    group: int  # consecutive input rows per channel (H·W after a flatten, else 1)


@dataclasses.dataclass
class ChannelGroup:
    """A producer's channels, the constants sliced with them and the layers contracting over them."""

    label: str
    channels: int
    # A unit (channel or head) spans ``per`` consecutive entries of the sliced axis.
    producers: list[tuple[WeightUse, int]]  # (use, per): output columns
    constants: list[tuple[ir.Node, int, int, int]] = dataclasses.field(default_factory=list)  # (node, input, axis, per)
    consumers: list[Consumer] = dataclasses.field(default_factory=list)
    reshapes: list[tuple[ir.Node, tuple[int | None, int], int]] = dataclasses.field(default_factory=list)  # (node, where, per)
    region: dict[ir.Value, Layout] = dataclasses.field(default_factory=dict)
    unshaped: list[ir.Value] = dataclasses.field(default_factory=list)  # shapes forgotten after slicing
    cut_io: list[tuple[ir.Value, int]] = dataclasses.field(default_factory=list)  # (graph input or output, axis)
    unit: str = "channels"
    segments: int = 1  # producer columns and constants hold this many equal parts (fused Q/K/V), sliced alike


# --------------------------------------------------------------------------- tracing a channel group


def _out_columns(use: WeightUse) -> int:
    return use.matrix().shape[1]


def _in_rows(use: WeightUse) -> int:
    return use.matrix().shape[0] if use.node.op_type != "Conv" else use.array().shape[1]



def _check_value(value: ir.Value, graph: ir.Graph) -> None:
    if value.is_graph_output():
        raise Refused(f"channels reach the graph output '{value.name}'")
    for node, _ in value.uses():
        if node.graph is not graph:
            raise Refused(f"channels are read inside a subgraph (by '{node.name or node.op_type}')")


def _extra_outputs_unused(node: ir.Node) -> None:
    for out in node.outputs[1:]:
        if out.uses() or out.is_graph_output():
            raise Refused(f"{node.op_type} '{node.name}' output '{out.name}' is used")


def trace_group(use: WeightUse) -> ChannelGroup:
    """The channel group of producer ``use``; raises :class:`Refused` when a consumer can't be sliced."""
    node, graph = use.node, use.graph
    if use.shared:
        raise Refused("producer weight is shared by several nodes")
    channels = _out_columns(use)
    if node.op_type == "Conv":
        rank = use.array().ndim
        layout = Layout(1 - rank, rank)
    else:
        shape = node.outputs[0].shape
        layout = Layout(-1, 2 if node.op_type == "Gemm" else (len(shape) if shape is not None else None))
    group = ChannelGroup(use.label, channels, [(use, 1)])
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        _add_constant(group, node, 2, Layout(-1, 1))  # Gemm C / Conv B
    group.region[node.outputs[0]] = layout
    _check_value(node.outputs[0], graph)
    nodes = list(graph)
    for later in nodes[nodes.index(node) + 1 :]:  # graph order: both inputs of a binary op are known
        hits = [i for i, v in enumerate(later.inputs) if v is not None and v in group.region]
        if hits:
            _visit(group, later, hits, graph)
    return group


def _add_constant(group: ChannelGroup, node: ir.Node, index: int, layout: Layout) -> None:
    """Record a per-channel constant input (slice it) or accept a broadcast one; refuse anything else."""
    value = node.inputs[index]
    tensor = constant_tensor(value)
    if tensor is None:
        raise Refused(f"{node.op_type} '{node.name}' mixes the channels with the non-constant tensor "
                      f"'{value.name}' (residual or other branch not pruned with them)")
    shape = tuple(tensor.shape)
    if len(shape) < -layout.axis or shape[layout.axis] == 1:
        return
    if layout.flat or shape[layout.axis] != group.channels:
        raise Refused(f"{node.op_type} '{node.name}' constant '{value.name}' of shape {shape} is not per channel")
    group.constants.append((node, index, layout.axis, 1))


def _visit(group: ChannelGroup, node: ir.Node, hits: list[int], graph: ir.Graph) -> None:
    layout = group.region[node.inputs[hits[0]]]
    op = node.op_type
    where = f"{op} '{node.name}'"
    if node.domain not in ("", "ai.onnx"):
        raise Refused(f"{where} of domain {node.domain} cannot be sliced")
    out = None
    if op in UNARY_OPS and hits == [0]:
        for index in range(1, len(node.inputs)):
            if node.inputs[index] is not None:
                _add_constant(group, node, index, layout)  # Clip bounds, PRelu slope, Dropout ratio
        _extra_outputs_unused(node)
        out = layout
    elif op in BINARY_OPS:
        if any(group.region[node.inputs[i]] != layout for i in hits):
            raise Refused(f"{where} combines the channels in two different layouts")
        for index, value in enumerate(node.inputs):
            if index not in hits:
                _add_constant(group, node, index, layout)
        out = layout
        constant_ranks = [len(constant_tensor(v).shape) for i, v in enumerate(node.inputs) if i not in hits]
        if layout.rank is not None:
            out = dataclasses.replace(layout, rank=max([layout.rank, *constant_ranks]))
    elif op == "BatchNormalization" and hits == [0] and layout.is_axis1 and not layout.flat:
        for index in range(1, 5):
            _add_constant(group, node, index, Layout(-1, 1))
        _extra_outputs_unused(node)
        out = layout
    elif op in POOL_OPS and hits == [0] and layout.is_axis1:
        _extra_outputs_unused(node)
        out = layout
    elif op == "Flatten" and hits == [0] and layout.is_axis1 and not layout.flat and node.attributes.get_int("axis", 1) == 1:
        out = Layout(-1, 2, flat=layout.rank > 2)
    elif op == "Reshape" and hits == [0]:
        out = _flatten_reshape(group, node, layout)
    elif op == "Shape" and hits == [0]:
        _check_shape_reads(group, node, layout)
    elif op in ("MatMul", "Gemm", "Conv") and hits == [0]:
        _add_consumer(group, node, layout)
    else:
        raise Refused(f"{where} consumes the channels (input {hits[0]}) and cannot be sliced")
    if out is not None:
        _check_value(node.outputs[0], graph)
        group.region[node.outputs[0]] = out


def _flatten_reshape(group: ChannelGroup, node: ir.Node, layout: Layout) -> Layout:
    """A Reshape of N×C×... to (N, C·rest): the channels become blocks of the last axis.

    Accepted targets: ``[0, -1]``, ``[0, K]``, and ``[-1, K]`` when the input's static shape shows that
    K is C·rest (so the first axis stays the batch).
    """
    shape = constant_tensor(node.inputs[1])
    target = None if shape is None else shape.numpy().tolist()
    dims = node.inputs[0].shape
    rest = None
    if dims is not None and all(isinstance(d, int) for d in dims.dims[1:]):
        rest = int(np.prod(dims.dims[1:]))
    flattening = (
        target is not None and len(target) == 2 and layout.is_axis1 and not layout.flat
        and (node.attributes.get_int("allowzero", 0) == 0 or 0 not in target)  # allowzero: a 0 stays 0
        and ((target[0] == 0 and (target[1] == -1 or target[1] > 0)) or (target[0] == -1 and target[1] == rest))
    )
    if not flattening and (rows := _rows_reshape(group, node, layout)) is not None:
        return rows
    if not flattening:
        out_shape = node.outputs[0].shape
        rank = len(target) if target is not None else (out_shape.rank() if out_shape is not None else 0)
        hint = " (attention heads are removed whole by heads=true)" if rank > 2 else ""
        text = target if target is not None else "a shape computed at run time"
        raise Refused(f"Reshape '{node.name}' to {text} is not a proven (batch, C·rest) flatten of the channels{hint}")
    if target[1] > 0:
        if target[1] % group.channels:
            raise Refused(f"Reshape '{node.name}' width {target[1]} is not a multiple of {group.channels} channels")
        group.reshapes.append((node, (None, 1), target[1] // group.channels))
    return Layout(-1, 2, flat=True)


def _rows_reshape(group: ChannelGroup, node: ir.Node, layout: Layout) -> Layout | None:
    """A Reshape that regroups the rows of channels-last data and keeps the channels as its last axis, e.g.
    (b·q, C) ↔ (b, q, C) around a 2-D Gemm (HF GPT-2's ``Conv1D``): the output layout, None when not one.

    The last target entry must be the channel count (a constant, rewritten) or a read of a channel axis;
    the others constants or reads of other axes. Each ``-1`` keeps its value: the channels change the
    element count and the last entry alike.
    """
    if layout.axis != -1 or layout.flat:
        return None
    try:
        entries = _target(node, {v: found.rank for v, found in group.region.items() if found.rank is not None})
    except Refused:
        return None

    def reads_channels(entry: Entry) -> bool:
        found = group.region.get(entry.tensor)
        rank = found.rank if found is not None else None
        return found is not None and rank is not None and entry.axis == rank + found.axis and entry.factor == 1

    def other_axis(entry: Entry) -> bool:
        if entry.tensor is None:
            return entry.constant is not None
        found = group.region.get(entry.tensor)
        return found is None or (found.rank is not None and not found.flat and entry.axis != found.rank + found.axis)

    *others, last = entries or [Entry()]
    if not entries or not all(other_axis(e) for e in others):
        return None
    if last.tensor is None and last.constant == group.channels and last.where is not None:
        group.reshapes.append((node, last.where, 1))
    elif last.tensor is None or not reads_channels(last):
        return None
    return Layout(-1, len(entries))


def _check_shape_reads(group: ChannelGroup, shape: ir.Node, layout: Layout) -> None:
    """A ``Shape`` of channel data may feed targets of Reshapes of the channel data (checked when they are
    visited), or read other axes only: anywhere else the channel count it reads would change under a
    node that expects the old one."""
    data = shape.inputs[0]
    ranks = {data: layout.rank} if layout.rank is not None else {}
    channel_axis = layout.rank + layout.axis if layout.rank is not None and not layout.flat else None

    def ends(reader: ir.Node, index: int) -> bool:
        return (_reads_only(reader, ranks, lambda e: channel_axis is not None and e.axis != channel_axis)
                or (reader.op_type == "Reshape" and index == 1 and reader.inputs[0] in group.region))

    if (escape := _shape_escape(shape.outputs[0], ends)) is not None:
        raise Refused(f"the shape of '{data.name}' is read by {escape}")


def _add_consumer(group: ChannelGroup, node: ir.Node, layout: Layout) -> None:
    where = f"{node.op_type} '{node.name}'"
    use = WeightUse(node, 1)
    if len(node.inputs) < 2 or constant_tensor(node.inputs[1]) is None:
        raise Refused(f"{where} multiplies the channels by a non-constant tensor")
    if use.shared:
        raise Refused(f"{where} weight '{use.value.name}' is shared by several nodes")
    weight = use.array()
    if node.op_type == "Conv":
        if (groups := node.attributes.get_int("group", 1)) != 1:
            raise Refused(f"{where} is a grouped convolution (group={groups}): its input channels cannot be sliced")
        if not layout.is_axis1 or layout.flat:
            raise Refused(f"{where}: the channels are not its input channels")
        rows, per = weight.shape[1], 1
    else:
        if weight.ndim != 2 or layout.axis != -1 or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
            raise Refused(f"{where}: channels are not the contracted axis of a 2-D weight")
        rows = _in_rows(use)
        per = rows // group.channels if layout.flat else 1
    if rows != per * group.channels:
        raise Refused(f"{where}: {rows} input rows do not match {group.channels} channels")
    group.consumers.append(Consumer(use, per))


# --------------------------------------------------------------------------- attention heads


def _only_use(value: ir.Value, values: list[ir.Value]) -> None:
    """Refuse unless ``value`` is read once by the pattern, or only by nodes whose outputs the pattern holds
    (a rotary embedding reads its input three times), ``Shape`` readers aside (they follow the new head count
    at run time), and is no graph output; remember it."""
    readers = [node for node, _ in value.uses() if node.op_type != "Shape"]
    inside = len(readers) == 1 or (readers and all(node.outputs[0] in values for node in readers))
    if not inside or value.is_graph_output():
        raise Refused(f"'{value.name}' is read outside the attention pattern")
    values.append(value)


def _producer(value: ir.Value, op_type: str, values: list[ir.Value]) -> ir.Node:
    node = value.producer()
    if node is None or node.op_type != op_type:
        raise Refused(f"'{value.name}' is not produced by {op_type}")
    _only_use(value, values)
    return node


def _producer_type(value: ir.Value) -> str | None:
    node = value.producer()
    return None if node is None else node.op_type


def _perm(transpose: ir.Node) -> list[int] | None:
    perm = transpose.attributes.get_ints("perm", None)
    return None if perm is None else list(perm)


def _scalar_input(node: ir.Node) -> int | None:
    """Index of a one-element constant input of a binary node, None without one."""
    for index, value in enumerate(node.inputs):
        tensor = constant_tensor(value)
        if tensor is not None and tensor.size == 1:
            return index
    return None


def _passes_through(node: ir.Node) -> bool:
    """Whether ``node`` hands its only data input on elementwise: heads sliced before it are sliced after."""
    if node.op_type == "Dropout":
        training = node.inputs[2] if len(node.inputs) > 2 else None
        flag = constant_tensor(training) if training is not None else None
        return (training is None or (flag is not None and not flag.numpy().any())) and not (
            len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()))
    return node.op_type in ("Identity", "Cast") or (node.op_type == "Concat" and len(node.inputs) == 1)


def _skip_scalar_ops(value: ir.Value, values: list[ir.Value]) -> ir.Value:
    """Walk back through Mul/Div by scalar constants (attention scaling)."""
    while (node := value.producer()) is not None and node.op_type in ("Mul", "Div") and _scalar_input(node) == 1:
        _only_use(value, values)
        value = node.inputs[0]
    return value


def _softmax(value: ir.Value, values: list[ir.Value]) -> ir.Node:
    """The Softmax producing ``value``, also through ``Where(IsNaN(p), 0, p)``: PyTorch's SDPA export."""
    where = value.producer()
    test = where.inputs[0].producer() if where is not None and where.op_type == "Where" else None
    if test is not None and test.op_type == "IsNaN" and test.inputs[0] is where.inputs[2] and _scalar_input(where) == 1:
        _only_use(value, values)
        _only_use(test.outputs[0], values)
        value = where.inputs[2]
        if {node for node, _ in value.uses()} != {test, where} or value.is_graph_output():
            raise Refused(f"'{value.name}' is read outside the attention pattern")
        values.append(value)
        node = value.producer()
        if node is None or node.op_type != "Softmax":
            raise Refused(f"'{value.name}' is not produced by Softmax")
        return node
    return _producer(value, "Softmax", values)


def _is_one_along(value: ir.Value, axis: int) -> bool:
    """Whether ``value`` statically has size 1 (or no dimension) along negative ``axis`` (mask broadcast)."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return len(tensor.shape) < -axis or tensor.shape[axis] == 1
    if value.shape is not None:
        return len(value.shape) < -axis or value.shape[axis] == 1
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Unsqueeze" and len(node.inputs) > 1 and node.inputs[0].shape is not None:
        axes = constant_tensor(node.inputs[1])
        if axes is None:
            return False
        rank = len(node.inputs[0].shape) + axes.size
        position = rank + axis
        inserted = {a % rank for a in axes.numpy().tolist()}
        return position < 0 or position in inserted
    if node.op_type in BINARY_OPS | {"Cast", "Neg", "Not", "Where"}:
        return all(_is_one_along(v, axis) for v in node.inputs if v is not None)
    return False


def _one_along(shape: tuple | None, axis: int) -> bool:
    return shape is not None and (len(shape) < -axis or shape[axis] == 1)


_PER_HEAD_OPS = ("Add", "Sub", "Mul", "Neg", "Slice", "Concat")


def _along_last_axis(node: ir.Node, last: int) -> bool:
    """Whether a ``Concat`` or ``Slice`` works along the last axis (``last``) only."""
    if node.op_type == "Concat":
        return node.attributes.get_int("axis", 0) in (-1, last)
    axes = constant_tensor(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return axes is not None and all(a in (-1, last) for a in axes.numpy().reshape(-1).tolist())


# Reshape targets. Exporters build them at run time: ``Concat`` of constants and dimensions read with
# ``Shape`` → ``Gather``/``Slice``. An entry is a constant or such a read; a read follows the pruned head
# count by itself when it reads a head axis, every other entry must not depend on the heads.


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a Reshape target: ``constant``, or dimension ``axis`` of ``tensor`` read at run time
    (times ``factor``: with grouped-query attention, key/value heads x repeats or heads / repeats), or computed from the reads
    ``sources`` (a cache's past length plus the new tokens).

    ``where`` locates a constant that can be rewritten: (Concat input or None for a constant target, index).
    """

    constant: int | None = None
    tensor: ir.Value | None = None
    axis: int | None = None
    where: tuple[int | None, int] | None = None
    factor: Fraction = Fraction(1)
    sources: tuple[Entry, ...] | None = None


def _rank(value: ir.Value, ranks: dict[ir.Value, int]) -> int | None:
    return ranks.get(value, len(value.shape) if value.shape is not None else None)


def _dimension_reads(value: ir.Value, ranks: dict[ir.Value, int]) -> list[Entry] | None:
    """Entries of a 1-D int64 piece of a Reshape target: a constant or a read of a ``Shape``; None if unknown."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return [Entry(int(v)) for v in tensor.numpy().reshape(-1)] if tensor.dtype.is_integer() else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity") or _flattens_to_1d(node):
        return _dimension_reads(node.inputs[0], ranks)
    if node.op_type == "Where" and _replaces_minus_one(node):  # TorchScript's Expand shapes: -1 -> 1
        entries = _dimension_reads(node.inputs[2], ranks)
        return None if entries is None else [Entry(1) if e.constant == -1 else e for e in entries]
    if node.op_type in ("Mul", "Div") and (by := _int_scalar(node.inputs[1])) is not None and by > 0:
        times = Fraction(by) if node.op_type == "Mul" else Fraction(1, by)
        entries = _dimension_reads(node.inputs[0], ranks)
        if entries is None or any(e.constant is not None and (e.constant * times).denominator != 1 for e in entries):
            return None
        return [Entry(int(e.constant * times)) if e.constant is not None else dataclasses.replace(e, factor=e.factor * times)
                for e in entries]
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        pieces = [_dimension_reads(v, ranks) for v in node.inputs]
        if any(p is None or len(p) != 1 for p in pieces):
            return None
        return [Entry(sources=tuple(r for (e,) in pieces for r in (e.sources or (e,)) if r.tensor is not None))]
    if node.op_type == "Concat":
        pieces = [_dimension_reads(v, ranks) for v in node.inputs]
        return None if any(p is None for p in pieces) else [e for p in pieces for e in p]
    source = node if node.op_type == "Shape" else (node.inputs[0].producer() if node.inputs else None)
    if source is None or source.op_type != "Shape":
        return None
    start, end = source.attributes.get_int("start", 0), source.attributes.get_int("end", None)
    if node.op_type == "Shape":
        picked = _read_axes(start, end, _rank(source.inputs[0], ranks), lambda axes: axes)
    elif node.op_type == "Gather" and (index := constant_tensor(node.inputs[1])) is not None:
        indices = index.numpy().reshape(-1).tolist()
        picked = _read_axes(start, end, _rank(source.inputs[0], ranks), lambda axes: [axes[i] for i in indices])
    elif node.op_type == "Slice" and len(node.inputs) in (3, 4) and all(constant_tensor(v) is not None for v in node.inputs[1:]):
        bounds = [constant_tensor(v).numpy().reshape(-1).tolist() for v in node.inputs[1:]]
        if any(len(b) != 1 for b in bounds) or (len(bounds) == 3 and bounds[2][0] != 0):
            return None
        picked = _read_axes(start, end, _rank(source.inputs[0], ranks), lambda axes: axes[bounds[0][0]:bounds[1][0]])
    else:
        return None
    return None if picked is None else [Entry(tensor=source.inputs[0], axis=axis) for axis in picked]


def _flattens_to_1d(node: ir.Node) -> bool:
    target = constant_tensor(node.inputs[1]) if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    return target is not None and target.numpy().reshape(-1).tolist() == [-1]


def _int_scalar(value: ir.Value) -> int | None:
    tensor = constant_tensor(value)
    return int(tensor.numpy().reshape(-1)[0]) if tensor is not None and tensor.size == 1 and tensor.dtype.is_integer() else None


def _replaces_minus_one(where: ir.Node) -> bool:
    """``Where(Equal(s, -1 · ones), ones, s)``: a shape ``s`` with its -1 entries replaced by 1."""
    test = where.inputs[0].producer()
    return test is not None and test.op_type == "Equal" and test.inputs[0] is where.inputs[2]


_UNBOUNDED = 1 << 62
_MAX_RANK = 64


def _read_axes(start: int, end: int | None, rank: int | None, pick) -> list[int] | None:
    """The axes read by ``Shape(start, end)`` then ``pick`` (a Gather or Slice of the axes it reads); without
    the rank, only reads counted from the front are known. None when unknown."""
    if rank is None and (start < 0 or (end is not None and end < 0)):
        return None
    try:
        picked = pick(range(rank if rank is not None else _UNBOUNDED)[start:end])
    except IndexError:
        return None
    if len(picked) > _MAX_RANK or any(axis >= _MAX_RANK for axis in picked):
        return None  # counted from the end of an unknown rank
    return list(picked)


def _target(reshape: ir.Node, ranks: dict[ir.Value, int]) -> list[Entry]:
    """The entries of ``reshape``'s target shape (a 0 copies the input's dimension unless ``allowzero``),
    or of an ``Expand``'s shape."""
    target, concat = reshape.inputs[1], reshape.inputs[1].producer()
    if constant_tensor(target) is not None:
        entries = [dataclasses.replace(e, where=(None, i)) for i, e in enumerate(_dimension_reads(target, ranks))]
    elif concat is not None and concat.op_type == "Concat":
        pieces = [_dimension_reads(piece, ranks) for piece in concat.inputs]
        entries = None if any(p is None for p in pieces) else [
            dataclasses.replace(e, where=(j, k)) if constant_tensor(concat.inputs[j]) is not None else e
            for j, piece in enumerate(pieces) for k, e in enumerate(piece)]
    else:
        entries = _dimension_reads(target, ranks)
    if entries is None:
        raise Refused(f"Reshape '{reshape.name}' takes a shape computed at run time in a way not traced")
    if reshape.op_type == "Reshape" and not reshape.attributes.get_int("allowzero", 0):
        entries = [Entry(tensor=reshape.inputs[0], axis=i) if e.constant == 0 else e for i, e in enumerate(entries)]
    return entries


@dataclasses.dataclass
class HeadGroup:
    """One attention block: Q/K/V projections (output columns), their biases, Reshapes, and Wo."""

    label: str
    heads: int  # pruning units: heads, or key/value heads with grouped-query attention
    head_dim: int
    projections: list[WeightUse]  # Q, K, V (or the fused one)
    biases: list[tuple[ir.Node, int, int]]  # (node, input, projection index)
    reshapes: list[tuple[ir.Node, tuple[int | None, int], int]]  # (Reshape, head count's place, per unit)
    output: WeightUse
    values: list[ir.Value]
    segments: int = 1  # 3: one fused Q/K/V projection
    caches: list[tuple[ir.Value, str]] = dataclasses.field(default_factory=list)  # KV cache inputs/outputs, labels
    group_size: int = 1  # query heads per key/value head (grouped-query attention)

    def as_channel_group(self) -> ChannelGroup:
        """The same slicing expressed per unit: a head's ``head_dim`` channels, or with grouped-query attention
        a key/value head's and the ``group_size`` query heads' it serves."""
        per = [self.head_dim * (self.group_size if i == 0 else 1) for i in range(len(self.projections))]
        group = ChannelGroup(self.label, self.heads, list(zip(self.projections, per)), segments=self.segments)
        group.constants = [(node, index, -1, per[p]) for node, index, p in self.biases]
        group.reshapes = self.reshapes
        group.consumers = [Consumer(self.output, per[0])]
        cached = {value for value, _ in self.caches}
        group.unshaped = [v for v in self.values if v not in cached]
        group.region = {v: Layout(_heads_axis(labels) - len(labels), len(labels)) for v, labels in self.caches}
        group.cut_io = [(v, _heads_axis(labels)) for v, labels in self.caches]
        group.unit = "kv heads" if self.group_size > 1 else "heads"
        return group


def _heads_axis(labels: str) -> int:
    """The axis of the heads that pruning removes: the key/value heads (g) where they are grouped."""
    return labels.index("g" if "g" in labels else "h")


# Axis labels of the tensors of an attention block: b batch, q queries, k keys, h heads, d head_dim,
# w = h·d, n = b·h, t = 3·w (fused Q/K/V), m = b·q (rows flattened for a Gemm), e the model width;
# grouped-query attention: g key/value heads, u = g·d, r query heads per key/value head (h = g·r), 1 an
# inserted axis, z = r·q (queries regrouped per key/value head). Pruning changes h, w, n, t, g and u only.
HEAD_LABELS = "hwntgu"
UNIT_LABELS = ("heads", "kv heads")


class _HeadTrace:
    """Walks one attention block back from its output projection, labelling each tensor's axes, and
    checks that every Reshape target still gives its labelled shape once heads are gone."""

    def __init__(self, kv_cache: bool = False, model: ir.Model | None = None):
        self.model = model  # for symbolic shapes
        self.values: list[ir.Value] = []
        self.labels: dict[ir.Value, str] = {}
        self.reshapes: list[tuple[ir.Node, list[Entry], str]] = []  # (Reshape, its target, labels of its output)
        self.self_attention = False  # queries and keys come from one tensor: q and k are the same length
        self.kv_cache = kv_cache  # cache inputs (and outputs) may lose heads with the block
        self.caches: list[ir.Value] = []
        self.group_size = 1  # query heads per key/value head: K and V are repeated (grouped-query attention)

    def note(self, value: ir.Value, labels: str) -> ir.Value:
        self.labels[value] = labels
        return value

    def through(self, value: ir.Value) -> ir.Value:
        """Back through nodes that pass ``value`` on unchanged per head (:func:`_passes_through`): past-key
        ``Concat`` of one input, ``Cast``, inference ``Dropout``; the tensor before them, same labels. Also
        back through the ``Concat`` that appends this step's keys or values to a KV cache (:meth:`cache_concat`)."""
        while (node := value.producer()) is not None:
            if _passes_through(node):
                _only_use(value, self.values)
                value = self.note(node.inputs[0], self.labels[value]) if value in self.labels else node.inputs[0]
            elif node.op_type == "Concat" and len(node.inputs) == 2 and value in self.labels:
                value = self.cache_concat(node, value)
            elif node.op_type in ("Add", "Sub", "Mul") and self.labels.get(value, "")[:2] in ("bh", "bg"):
                value = self.per_head(value)
            elif (node.op_type == "Reshape" and self.labels.get(value) == "bhkd"
                  and _producer_type(node.inputs[0]) == "Expand"):
                value = self.repeated(value)
            else:
                break
        return value

    def repeated(self, value: ir.Value) -> ir.Value:
        """From K or V repeated for grouped-query attention, (b, h, k, d) = Reshape(Expand(Unsqueeze(x, 2)))
        with h = g·r, back to x (b, g, k, d): each of its g key/value heads serves r query heads."""
        expanded = self.reshape(value, "bhkd", "bgrkd")
        expand = _producer(expanded, "Expand", self.values)
        target = _target(expand, {v: len(labels) for v, labels in self.labels.items()})
        repeats = target[2].constant if len(target) == 5 else None
        if repeats is None or repeats < 2 or self.group_size not in (1, repeats):
            raise Refused(f"Expand '{expand.name}' does not repeat K and V by one constant count")
        self.group_size = repeats
        self.reshapes.append((expand, target, "bgrkd"))
        unsqueeze = _producer(self.note(expand.inputs[0], "bg1kd"), "Unsqueeze", self.values)
        axes = constant_tensor(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
        if axes is None or axes.numpy().reshape(-1).tolist() not in ([2], [-3]):
            raise Refused(f"Unsqueeze '{unsqueeze.name}' does not insert the repeat axis after the heads")
        return self.note(unsqueeze.inputs[0], "bgkd")

    def per_head(self, value: ir.Value) -> ir.Value:
        """The one tensor that ``value`` computes head by head, e.g. a rotary embedding
        ``x·cos + Concat(-x[..., d/2:], x[..., :d/2])·sin``: Add/Sub/Mul/Neg, Slice and Concat along the head
        size, other operands broadcast over the heads (the cos/sin tables). Pruning heads leaves it alone."""
        labels = self.labels[value]
        heads_axis, last = _heads_axis(labels) - len(labels), len(labels) - 1
        region, inner, leaves, stack = set(), [], {}, [value.producer()]
        while stack:
            node = stack.pop()
            if node in region:
                continue
            region.add(node)
            if node.op_type in ("Slice", "Concat") and not _along_last_axis(node, last):
                raise Refused(f"{node.op_type} '{node.name}' of the heads' tensors is not along the head size")
            binary = node.op_type in BINARY_OPS
            for operand in node.inputs[:1] if node.op_type == "Slice" else node.inputs:
                if binary and _is_one_along(operand, heads_axis):
                    continue  # a table shared by every head
                producer = operand.producer()
                if producer is not None and producer.op_type in _PER_HEAD_OPS:
                    inner.append(operand)
                    stack.append(producer)
                else:  # only the operands of Add/Sub/Mul may be tables
                    leaves[operand] = leaves.get(operand, True) and binary
        sources = [v for v, maybe_table in leaves.items() if not maybe_table]
        undecided = [v for v in leaves if v not in sources]
        if undecided and (sources or len(undecided) > 1):
            shapes = symbolic_shapes(self.model, undecided) if self.model is not None else {}
            sources += [v for v in undecided if not _one_along(shapes.get(v), heads_axis)]
        elif undecided:
            sources = undecided
        if len(sources) != 1:
            raise Refused(f"'{value.name}' is computed from {len(sources)} tensors by a per-head pattern, not one")
        _only_use(value, self.values)
        for v in inner:
            if {node for node, _ in v.uses() if node.op_type != "Shape"} - region or v.is_graph_output():
                raise Refused(f"'{v.name}' is read outside the attention pattern")
            self.values.append(self.note(v, labels))
        return self.note(sources[0], labels)

    def cache_concat(self, concat: ir.Node, value: ir.Value) -> ir.Value:
        """The step's keys or values, which ``concat`` appends along the key axis to a cache that is a graph
        input (maybe through nodes that pass it on); ``value`` may be a graph output (the updated cache).
        Both lose the pruned heads, so only with ``kv_cache``."""
        labels = self.labels[value]
        axis = concat.attributes.get_int("axis", 0)
        if not -len(labels) <= axis < len(labels) or labels[axis] != "k":
            raise Refused(f"Concat '{concat.name}' joins the heads' tensors along another axis than the keys")
        chains = []
        for start in concat.inputs:
            chain = [start]
            while (node := chain[-1].producer()) is not None and _passes_through(node):
                chain.append(node.inputs[0])
            chains.append(chain)
        past = [i for i, chain in enumerate(chains) if chain[-1].is_graph_input()]
        if len(past) != 1:
            raise Refused(f"Concat '{concat.name}' appends to the keys or values a tensor that is no cache input")
        cache = chains[past[0]][-1]
        if not self.kv_cache:
            raise Refused(f"keys or values are appended to the cache input '{cache.name}': kv_cache=true prunes "
                          "the cache's heads too (the model's cache inputs and outputs change)")
        if len([node for node, _ in value.uses() if node.op_type != "Shape"]) != 1:
            raise Refused(f"'{value.name}' is read outside the attention pattern")
        self.values.append(value)
        for link in chains[past[0]]:
            if link.is_graph_output():
                raise Refused(f"the cache input '{link.name}' is also a graph output")
            self.values.append(self.note(link, labels))
            if len([node for node, _ in link.uses() if node.op_type != "Shape"]) != 1:
                raise Refused(f"'{link.name}' is read outside the attention pattern")
        self.caches += [cache] + ([value] if value.is_graph_output() else [])
        return self.note(concat.inputs[1 - past[0]], labels)

    def producer(self, value: ir.Value, op_type: str, labels: str) -> ir.Node:
        """The ``op_type`` node producing ``value``; its input is labelled ``labels``."""
        node = _producer(self.through(value), op_type, self.values)
        self.note(node.inputs[0], labels)
        return node

    def transpose(self, value: ir.Value, perm: list[int], name: str) -> ir.Value:
        """The input of the Transpose ``perm`` producing ``value`` (labelled by undoing the perm)."""
        value = self.through(value)
        node = _producer(value, "Transpose", self.values)
        if _perm(node) != perm:
            raise Refused(f"{name} Transpose perm {_perm(node)} is not {perm}")
        labels = [""] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            labels[in_axis] = self.labels[value][out_axis]
        return self.note(node.inputs[0], "".join(labels))

    def reshape(self, value: ir.Value, labels: str, input_labels: str) -> ir.Value:
        """The input of the Reshape producing ``value``: ``labels`` → ``input_labels``."""
        node = _producer(value, "Reshape", self.values)
        self.note(value, labels)
        self.note(node.inputs[0], input_labels)
        target = _target(node, {v: len(labels) for v, labels in self.labels.items()})
        if len(target) != len(labels):
            raise Refused(f"Reshape '{node.name}' does not give a {len(labels)}-D tensor")
        self.reshapes.append((node, target, labels))
        return node.inputs[0]

    def key_transposed(self, value: ir.Value) -> ir.Value:
        """From Kᵀ (b, h, d, k) (or (b, g, d, k)) back to the head-split K projection (b, k, h, d)."""
        node, h = value.producer(), self.labels[value][1]
        if node is not None and node.op_type == "Reshape":  # dynamo's SDPA: Kᵀ as Reshape-Transpose-Reshape
            merged = self.transpose(self.reshape(value, f"b{h}dk", "ndk"), [0, 2, 1], "k")
            value = self.reshape(merged, "nkd", f"b{h}kd")
        elif node is not None and _perm(node) == [0, 1, 3, 2]:
            value = self.transpose(value, [0, 1, 3, 2], "k")
        else:
            return self.transpose(value, [0, 2, 3, 1], "k")
        return self.transpose(value, [0, 2, 1, 3], "k")

    def _entry_label(self, entry: Entry) -> str | None:
        """The label an entry reads; None for a read of a tensor outside the block (unchanged by pruning)."""
        labels = self.labels.get(entry.tensor)
        if labels is None:
            return "?" if entry.tensor in self.values else None  # a block tensor not labelled: never matches
        return labels[entry.axis] if entry.axis < len(labels) else "?"

    def check_entries(self, heads: int, head_dim: int) -> list[tuple[ir.Node, tuple[int | None, int], int]]:
        """Check every traced Reshape target against the labels of its output; the constant head counts
        to rewrite, as (Reshape, place, units per head)."""
        same = {"q": "qk", "k": "qk"} if self.self_attention else {}
        r = self.group_size  # per pruned unit: r query heads, one key/value head
        counts = {"h": (heads, r), "w": (heads * head_dim, r * head_dim), "t": (3 * heads * head_dim, 3 * head_dim),
                  "g": (heads // r, 1), "u": (heads // r * head_dim, head_dim), "d": (head_dim, None)}
        per = {label: count[1] for label, count in counts.items() if label in "hgwu"}  # sizes per pruned unit
        updates = []
        for node, entries, labels in self.reshapes:
            for i, (entry, wanted) in enumerate(zip(entries, labels)):
                if entry.sources is not None:  # arithmetic on lengths: no head count may go in or come out
                    fine = wanted not in HEAD_LABELS and all(
                        self._entry_label(e) not in tuple(HEAD_LABELS) + ("?",) for e in entry.sources)
                elif entry.tensor is not None:
                    read = self._entry_label(entry)
                    fine = wanted not in HEAD_LABELS if read is None else (
                        read in same.get(wanted, wanted) and entry.factor == 1) or (
                        read in per and wanted in per and per[read] * entry.factor == per[wanted])
                elif entry.constant == -1:
                    fine = True  # inferred: right when every other entry is
                elif wanted in counts:
                    count, per = counts[wanted]
                    fine = entry.constant == count and (per is None or entry.where is not None)
                    if fine and per is not None:
                        updates.append((node, entry.where, per))
                else:
                    fine = wanted not in HEAD_LABELS  # a static batch or sequence length
                if not fine:
                    raise Refused(f"Reshape '{node.name}' entry {i} does not give the {_LABEL_NAMES[wanted]}")
        return updates


_LABEL_NAMES = {"b": "batch", "q": "query length", "k": "key length", "h": "head count", "d": "head size",
                "w": "heads × head size", "n": "batch × heads", "e": "model width", "t": "3 × heads × head size",
                "m": "batch × sequence", "g": "key/value head count", "u": "key/value heads × head size",
                "r": "query heads per key/value head", "1": "inserted axis",
                "z": "query heads per key/value head × query length"}


def _looks_like_attention_output(use: WeightUse) -> bool:
    """``use`` reads Reshape(Transpose(...)), maybe through a second Reshape to 2-D: the way attention
    merges its heads before the output projection."""
    merge = use.activation.producer() if use.activation is not None else None
    if merge is None or merge.op_type != "Reshape":
        return False
    before = merge.inputs[0].producer()
    if before is not None and before.op_type == "Reshape":
        before = before.inputs[0].producer()
    return before is not None and before.op_type == "Transpose"


def _scores_input(add: ir.Node, model: ir.Model) -> int:
    """Which input of ``add`` carries the scores; the other, the mask, must broadcast over the heads.

    Exporters compute masks with run-time shapes: their head axis is found by symbolic shape inference.
    """
    ones = [_is_one_along(v, -3) for v in add.inputs]
    # the side computed by fewer nodes first: usually the mask, not the whole model before the block
    for i in sorted((0, 1), key=lambda i: len(ancestors([add.inputs[i]]))) if not any(ones) else ():
        shape = symbolic_shapes(model, [add.inputs[i]]).get(add.inputs[i])
        if _one_along(shape, -3):
            ones[i] = True
            break
    if ones == [True, False]:
        return 1
    if not ones[1]:
        raise Refused(f"attention mask added by '{add.name or add.op_type}' is not broadcast over heads")
    return 0


def trace_heads(output: WeightUse, model: ir.Model, kv_cache: bool = False) -> HeadGroup:
    """Match the attention pattern ending at output projection ``output``; :class:`Refused` otherwise.
    ``kv_cache``: keys and values may extend cache inputs, which then lose the pruned heads too."""
    plain, regrouped = _HeadTrace(kv_cache, model), _HeadTrace(kv_cache, model)
    try:
        return _trace_heads(plain, output, model, regrouped=False)
    except Refused as plain_reason:
        try:
            return _trace_heads(regrouped, output, model, regrouped=True)
        except Refused as regrouped_reason:  # the reason of the reading that got further
            raise (regrouped_reason if len(regrouped.values) > len(plain.values) else plain_reason) from None


def _trace_heads(trace: _HeadTrace, output: WeightUse, model: ir.Model, regrouped: bool) -> HeadGroup:
    """:func:`trace_heads` on a fresh ``trace``; ``regrouped``: grouped-query attention as torch's SDPA writes
    it on a one-token query, the query heads regrouped per key/value head, (b, h, q, d) -> (b, g, r·q, d),
    around the attention instead of K and V repeated."""
    merged, labels = output.activation, "bqw"
    if output.node.op_type == "Gemm":  # rows flattened to (b·q, w), from (b, q, w) or straight from the heads
        if output.node.attributes.get_int("transA", 0):
            raise Refused(f"output projection '{output.node.name}' transposes its input")
        reshape = merged.producer()
        source = reshape.inputs[0].producer() if reshape is not None and reshape.inputs else None
        labels = "bqw" if source is not None and source.op_type == "Reshape" else "bqhd"
        merged = trace.reshape(merged, "mw", labels)
    if labels == "bqw":
        merged = trace.reshape(merged, "bqw", "bqhd")
    context = trace.transpose(merged, [0, 2, 1, 3], "context")
    h, q = ("g", "z") if regrouped else ("h", "q")  # the attention's head and query axes
    if (node := context.producer()) is not None and node.op_type == "Reshape":  # the TorchScript SDPA export
        context = trace.reshape(context, "bhqd", f"b{h}{q}d")
    elif regrouped:
        raise Refused("no regrouped attention output")
    attend = trace.producer(context, "MatMul", f"b{h}{q}k")
    trace.note(attend.inputs[1], f"b{h}kd")
    softmax = _softmax(trace.through(attend.inputs[0]), trace.values)
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise Refused("Softmax is not over the key axis")
    scores = trace.note(softmax.inputs[0], f"b{h}{q}k")
    while (node := scores.producer()) is not None and node.op_type in ("Add", "Mul", "Div"):
        if node.op_type == "Add":  # attention mask: must be the same for every head
            path = _scores_input(node, model)
        elif _scalar_input(node) != 1:
            raise Refused(f"scores scaled by '{node.name}' with a non-scalar")
        else:
            path = 0
        _only_use(scores, trace.values)
        scores = trace.note(node.inputs[path], f"b{h}{q}k")
    product = trace.producer(scores, "MatMul", f"b{h}{q}d")
    query = trace.note(_skip_scalar_ops(product.inputs[0], trace.values), f"b{h}{q}d")
    if regrouped:
        query = trace.reshape(query, "bgzd", "bhqd")
    key = trace.note(_skip_scalar_ops(trace.note(product.inputs[1], f"b{h}dk"), trace.values), f"b{h}dk")
    split_values = {"q": (trace.transpose(query, [0, 2, 1, 3], "q"), "q"),
                    "k": (trace.key_transposed(key), "k"),
                    "v": (trace.transpose(attend.inputs[1], [0, 2, 1, 3], "v"), "k")}
    branches, head_dims = [], set()
    for name, (value, length) in split_values.items():
        labels = trace.labels[value]  # b?hd, or b?gd for grouped keys and values
        branches.append(trace.reshape(value, labels, labels[:2] + ("u" if "g" in labels else "w")))
        head_dims.add(_head_dim(trace.reshapes[-1][1], name))
    if len(head_dims) != 1:
        raise Refused("Q/K/V split into different head shapes")
    head_dim = head_dims.pop()
    split = branches[0].producer()
    r = trace.group_size
    if split is not None and split.op_type == "Split":  # GPT-2: one projection, then Split
        if r > 1:
            raise Refused("grouped keys and values from one fused projection are not followed")
        projections, biases, split_updates = _fused_projection(trace, split, branches, head_dim)
        biases = [(node, index, 0) for node, index in biases]
        segments = 3
    else:
        projections, biases, split_updates = [], [], []
        for p, (name, value) in enumerate(zip(split_values, branches)):
            projection, bias = _projection(trace, value, trace.labels[value], name)
            projections.append(projection)
            biases += [(node, index, p) for node, index in bias]
        segments = 1
    trace.self_attention = segments == 3 or projections[0].activation is projections[1].activation
    width = _out_columns(projections[0]) // segments
    if regrouped:  # as many query heads per key/value head as the projections say
        r = trace.group_size = width // max(_out_columns(projections[1]), 1)
        if r < 2:
            raise Refused("the queries are regrouped without fewer key/value heads")
    widths = [segments * width] + [width // r] * (len(projections) - 1)  # grouped K, V: one head per r query heads
    if width % (head_dim * r) or any(_out_columns(u) != w for u, w in zip(projections, widths)):
        raise Refused(f"projection widths are not equal multiples of head_dim {head_dim}"
                      + (f" ({r} query heads per key/value head)" if r > 1 else ""))
    if any(constant_tensor(node.inputs[index]) is None or constant_tensor(node.inputs[index]).size != widths[p]
           for node, index, p in biases):
        raise Refused("a Q/K/V bias is not a per-channel constant")
    if output.shared or _in_rows(output) != width:
        raise Refused(f"output projection weight is shared or does not match heads × head_dim = {width}")
    heads = width // head_dim
    updates = trace.check_entries(heads, head_dim) + split_updates
    _check_shape_readers(trace)
    return HeadGroup(output.label, heads // r, head_dim, projections, biases, updates, output, trace.values, segments,
                     [(v, trace.labels[v]) for v in trace.caches], r)


def _projection(trace: _HeadTrace, value: ir.Value, labels: str, name: str) -> tuple[WeightUse, list[tuple[ir.Node, int]]]:
    """The projection (``MatMul``, or ``Gemm`` on rows flattened by a Reshape) producing ``value``
    (labelled ``labels``), through a bias ``Add``; its weight use and bias slots."""
    biases = []
    value = trace.through(value)
    if (add := value.producer()) is not None and add.op_type == "Add":
        bias_index = 1 if constant_tensor(add.inputs[1]) is not None else 0
        _producer(value, "Add", trace.values)
        biases.append((add, bias_index))
        value = trace.through(trace.note(add.inputs[1 - bias_index], labels))
    if (reshape := value.producer()) is not None and reshape.op_type == "Reshape":
        labels = "m" + labels[-1]
        value = trace.through(trace.reshape(value, trace.labels[value], labels))
    node = value.producer()
    op_type = "Gemm" if node is not None and node.op_type == "Gemm" else "MatMul"
    node = trace.producer(value, op_type, labels[:-1] + "e")
    if op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            raise Refused(f"{name} projection '{node.name}' transposes its input")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            biases.append((node, 2))
    use = WeightUse(node, 1)
    if constant_tensor(use.value) is None or use.shared or use.array().ndim != 2:
        raise Refused(f"{name} projection '{node.name}' has no unshared constant 2-D weight")
    return use, biases


def _fused_projection(trace: _HeadTrace, split: ir.Node, branches: list[ir.Value], head_dim: int) -> tuple[
        list[WeightUse], list[tuple[ir.Node, int]], list[tuple[ir.Node, tuple[int | None, int], int]]]:
    """Q, K and V as the three outputs of one ``Split`` of a fused projection's last axis (GPT-2's
    ``c_attn``): the projection, its bias slots, and the Split sizes to rewrite as (Split, place, per head)."""
    if list(split.outputs) != branches:
        raise Refused(f"Q, K and V are not the outputs of Split '{split.name}' in that order")
    if split.attributes.get_int("axis", 0) not in (-1, 2):
        raise Refused(f"Split '{split.name}' does not split the last axis of (batch, sequence, 3 × width)")
    for value in branches:
        _only_use(value, trace.values)
    updates = []
    if "split" in split.attributes:
        raise Refused(f"Split '{split.name}' holds its sizes as an attribute (opset < 13): not rewritten")
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = constant_tensor(split.inputs[1])
        if sizes is None or len(set(sizes.numpy().reshape(-1).tolist())) != 1:
            raise Refused(f"Split '{split.name}' sizes are not three equal constants")
        updates = [(split, (None, i), head_dim) for i in range(3)]
    fused = trace.note(split.inputs[0], "bqt")
    _only_use(fused, trace.values)
    projection, biases = _projection(trace, fused, "bqt", "fused Q/K/V")
    return [projection], biases, updates


def _head_dim(target: list[Entry], name: str) -> int:
    """The constant head size a split Reshape ``target`` writes last."""
    if target[-1].constant is None or target[-1].constant < 1:
        raise Refused(f"{name} Reshape does not split into (.., .., heads, head_dim) with a constant head_dim")
    return target[-1].constant


SHAPE_ARITHMETIC = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity")
# also in attention blocks: GQA's repeated head count (Mul) and TorchScript's Expand shapes (-1 -> 1 by Where)
HEAD_SHAPE_ARITHMETIC = (*SHAPE_ARITHMETIC, "Mul", "Div", "Reshape", "Shape", "ConstantOfShape", "Equal", "Where")


def _reads_only(reader: ir.Node, ranks: dict[ir.Value, int], unchanged) -> bool:
    """Whether ``reader`` (of a ``Shape`` output) is a ``Gather``/``Slice`` picking only dimensions that
    ``unchanged(entry)`` says pruning leaves alone (e.g. GPT-2 reads (b, q) to restore the rows after a 2-D Gemm)."""
    if reader.op_type not in ("Gather", "Slice"):
        return False
    entries = _dimension_reads(reader.outputs[0], ranks)
    return entries is not None and all(e.tensor is not None and unchanged(e) for e in entries)


def _shape_escape(shape: ir.Value, ends, arithmetic: tuple[str, ...] = SHAPE_ARITHMETIC) -> str | None:
    """Follow a ``Shape`` output through shape arithmetic until every path reaches a reader that
    ``ends(reader, input index)`` accepts. Returns where a path escapes instead (another reader, the graph
    output, a dead end), or None if none does."""
    stack = [shape]
    while stack:
        piece = stack.pop()
        if piece.is_graph_output() or not piece.uses():
            return "the graph output" if piece.is_graph_output() else f"nothing ('{piece.name}' is unused)"
        for reader, index in piece.uses():
            if ends(reader, index):
                continue
            if reader.op_type not in arithmetic:
                return f"{reader.op_type} '{reader.name}'"
            stack.append(reader.outputs[0])
    return None


def _check_shape_readers(trace: _HeadTrace) -> None:
    """A ``Shape`` of a block tensor may only feed the Reshape targets checked, or read axes pruning leaves
    alone: elsewhere its head count would change under a node that expects the old one."""
    checked = {node.inputs[1] for node, _, _ in trace.reshapes}
    ranks = {v: len(labels) for v, labels in trace.labels.items()}

    def unchanged(entry: Entry) -> bool:  # batch, sequence lengths, head size
        label = trace._entry_label(entry)
        return label is not None and label not in HEAD_LABELS + "?"

    def ends(reader: ir.Node, index: int) -> bool:
        return reader.inputs[index] in checked or _reads_only(reader, ranks, unchanged)

    for value in trace.values:
        for shape, _ in value.uses():
            if shape.op_type != "Shape":
                continue
            read = _dimension_reads(shape.outputs[0], ranks)  # Shape(start, end) of batch or lengths only
            if read is not None and all(unchanged(e) for e in read):
                continue
            if _shape_escape(shape.outputs[0], ends, HEAD_SHAPE_ARITHMETIC) is not None:
                raise Refused(f"the shape of '{value.name}' is read outside the attention pattern")


# --------------------------------------------------------------------------- slicing


def _unit_index(keep: np.ndarray, per: int, segments: int = 1, units: int = 0) -> np.ndarray:
    """Entries kept when each kept unit spans ``per`` consecutive entries, in each of ``segments`` equal
    parts of ``units`` units."""
    entries = (keep[:, None] * per + np.arange(per)).reshape(-1)
    return np.concatenate([s * units * per + entries for s in range(segments)])


def _slice_input(node: ir.Node, index: int, axis: int, entries: np.ndarray, suffix: str) -> None:
    array = constant_array(node.inputs[index])
    set_weight(WeightUse(node, index), np.take(array, entries, axis=axis), suffix)


def apply_group(group: ChannelGroup, keep: np.ndarray) -> dict[ir.Node, np.ndarray]:
    """Slice everything in ``group`` to the kept channel (or head) indices ``keep`` (sorted).

    Returns the kept output columns of each producer node.
    """
    kept_outputs = {}
    for use, per in group.producers:
        entries = _unit_index(keep, per, group.segments, group.channels)
        transposed = use.node.op_type == "Conv" or (use.node.op_type == "Gemm" and use.node.attributes.get_int("transB", 0))
        _slice_input(use.node, use.index, 0 if transposed else 1, entries, "pruned")
        kept_outputs[use.node] = entries
    for node, index, axis, per in group.constants:
        _slice_input(node, index, axis, _unit_index(keep, per, group.segments, group.channels), "pruned")
    for consumer in group.consumers:
        use, entries = consumer.use, _unit_index(keep, consumer.group)
        transposed = use.node.op_type == "Gemm" and use.node.attributes.get_int("transB", 0)
        axis = 1 if use.node.op_type == "Conv" or transposed else 0
        _slice_input(use.node, use.index, axis, entries, "pruned")
    for node, where, per in group.reshapes:
        _set_target_entry(node, where, len(keep) * per)
    for value, layout in group.region.items():
        _resize(value, layout.axis, group.channels, len(keep))
    for value in group.unshaped:  # sizes forgotten, the rank kept (tracing a pruned export again needs it)
        value.shape = None if value.shape is None else ir.Shape([None] * len(value.shape))
    return kept_outputs


def _set_target_entry(reshape: ir.Node, where: tuple[int | None, int], count: int) -> None:
    """Write ``count`` into ``reshape``'s target at ``where``: (None, i) in a constant target, (j, i) in
    the constant input j of the ``Concat`` building it (copied first when other nodes read that Concat)."""
    piece, position = where
    holder, index = reshape, 1
    if piece is not None:
        holder, index = reshape.inputs[1].producer(), piece
        if len(reshape.inputs[1].uses()) > 1 or reshape.inputs[1].is_graph_output():
            copy = ir.node("Concat", list(holder.inputs), {"axis": 0}, name=f"{holder.name}_pruned")
            reshape.graph.insert_before(reshape, copy)
            reshape.replace_input_with(1, copy.outputs[0])
            holder = copy
    target = constant_array(holder.inputs[index]).copy()
    target.reshape(-1)[position] = count
    set_weight(WeightUse(holder, index), target, "pruned")


def _resize(value: ir.Value, axis: int, old: int, new: int) -> None:
    """Keep a recorded static shape consistent after the channel count changed from ``old`` to ``new``."""
    shape = value.shape
    if shape is None or len(shape) < -axis:
        return
    dims = list(shape.dims)
    dims[axis] = dims[axis] * new // old if isinstance(dims[axis], int) else None
    value.shape = ir.Shape(dims)


# --------------------------------------------------------------------------- the pass


def _kept_count(channels: int, ratio: float, min_channels: int, round_to: int) -> int:
    keep = max(channels - int(round(ratio * channels)), min(min_channels, channels), 1)
    return min(channels, math.ceil(keep / round_to) * round_to)


def _unit_norms(matrix: np.ndarray, per: int, axis: int, order: int, segments: int = 1) -> np.ndarray:
    """Norm of each block of ``per`` consecutive entries along ``axis`` of ``matrix`` (other axes summed),
    a unit's blocks in all ``segments`` equal parts of the axis together."""
    moved = np.moveaxis(np.abs(matrix.astype(np.float64)), axis, 0)
    units = moved.shape[0] // (per * segments)
    blocks = moved.reshape(segments, units, -1).swapaxes(0, 1).reshape(units, -1)
    return blocks.sum(axis=1) if order == 1 else np.sqrt((blocks**2).sum(axis=1))


def _consumer_row_norms(consumer: Consumer, order: int) -> np.ndarray:
    use = consumer.use
    if use.node.op_type == "Conv":
        return _unit_norms(use.array(), consumer.group, 1, order)
    return _unit_norms(use.matrix(), consumer.group, 0, order)


NO_BLOCK = ("none found: a block is traced back from an output projection MatMul or Gemm that reads "
            "Reshape(Transpose(context)), to separate Q, K and V projections or one fused projection and a Split")


@register("prune-structured", lossless=False)
class PruneStructuredPass(ir.passes.InPlacePass):
    """Remove whole channels, neurons or attention heads and shrink every consumer (a smaller dense model).

    Args:
        ratio: Fraction of the channels (or heads) removed in each channel group.
        op_types: Producer layers whose output channels are pruned (MatMul, Gemm, Conv); ``op_types=``
            (empty) prunes none, e.g. heads only.
        heads: Also remove whole attention heads (Q/K/V columns, Wo rows, Reshape head counts).
        kv_cache: Also prune heads whose keys and values extend a KV cache given as graph inputs (a
            decoder exported with past keys and values): the cache inputs and the updated-cache outputs
            then hold the kept heads only. What was kept is recorded in the model (:mod:`onnxopt.signature`).
        importance: ``l1``/``l2``: norm of the producer's output column (Q/K/V/Wo weights of a head);
            ``activation``: Σ over consumers of ‖X_c‖·‖W_next rows of c‖ from calibration data.
        min_channels: Never keep fewer channels than this in a group.
        round_to: Keep channel counts a multiple of this (kernel-friendly widths).
        recover: Re-fit each consumer's weight (and bias) by least squares to the original model's
            consumer outputs on calibration data, pulled toward the current weights with the strength
            that best predicts held-out calibration batches (kept as is when none does), as ``recover``.
        samples: Calibration samples for ``importance=activation`` and ``recover``.
        damping: Ridge term of the recovery, as a fraction of the mean diagonal of XᵀX/rows.
    """

    def __init__(
        self,
        ratio: float = 0.25,
        op_types: list[str] = ["MatMul", "Gemm", "Conv"],  # noqa: B006 - read only
        heads: bool = False,
        kv_cache: bool = False,
        importance: Literal["l1", "l2", "activation"] = "l2",
        min_channels: int = 1,
        round_to: int = 1,
        recover: bool = False,
        samples: int = 128,
        damping: float = 1e-4,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        unknown = set(op_types) - set(PRODUCER_OPS)
        if unknown:
            raise ValueError(f"op_types may only hold MatMul, Gemm and Conv (got {sorted(unknown)})")
        if min_channels < 1 or round_to < 1 or samples < 1 or damping < 0:
            raise ValueError("min_channels, round_to and samples must be >= 1 and damping >= 0")
        self.ratio = ratio
        self.op_types = tuple(op_types)
        self.heads = heads
        self.kv_cache = kv_cache
        self.importance = importance
        self.min_channels = min_channels
        self.round_to = round_to
        self.recover = recover
        self.samples = samples
        self.damping = damping
        self.data = data
        self.node_filter = node_filter
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.importance == "activation" or self.recover:
            require_data(self.data, "prune-structured with importance=activation or recover=true")
        model.graph.sort()  # tracing reads nodes in list order: every reader must follow its producer
        scan = scan_weights(model, PRODUCER_OPS, self.node_filter)
        name_layers(scan.uses)
        groups, refused = self._groups(model, scan.uses)
        original = io.clone(model) if self.recover else None
        norms = self._activation_norms(model, groups) if self.importance == "activation" else {}
        layers, kept_outputs, cut_io, params_before = {}, {}, {}, model_stats(model).parameters
        for group in groups:
            unit = group.unit
            kept = self._kept(group)
            if kept == group.channels:
                layers[group.label] = f"{unit} {group.channels} (unchanged)"
                continue
            scores = self._scores(group, norms.get(group.label))
            keep = np.sort(np.argsort(-scores, kind="stable")[:kept])
            removed = float(np.delete(scores, keep).sum() / max(scores.sum(), 1e-30))
            how = self.importance if group.label in norms or self.importance != "activation" else "l2: not observable"
            kept_outputs.update(apply_group(group, keep))
            layers[group.label] = f"{unit} {group.channels} -> {kept}, importance removed {removed:.4f} ({how})"
            for value, axis in group.cut_io:
                signature.record_kept(model, value.name, axis, group.channels, keep)
                cut_io[value.name] = f"{unit} {group.channels} -> {kept} on axis {axis}"
        params_after = model_stats(model).parameters
        self.details.update(layers=layers, refused=refused, skipped=dict(scan.skipped),
                            parameters=f"{params_before} -> {params_after}")
        if self.heads:
            blocks = sum(g.unit in UNIT_LABELS for g in groups) + sum(k.endswith(" (heads)") for k in refused)
            self.details["attention blocks"] = blocks or NO_BLOCK
        if cut_io:
            self.details["model inputs and outputs cut"] = cut_io
        changed = params_after != params_before
        # before recovery runs it: a subgraph's new initializers may reuse an outer graph's names, and a shape
        # Concat copied for each of a block's Reshapes (or Expands) names each copy alike
        name_uniquely(model)
        if self.recover and changed:
            self.details["recover"] = self._recover(original, model, groups, kept_outputs)
        return ir.passes.PassResult(model, changed)

    def _groups(self, model: ir.Model, uses: list[WeightUse]) -> tuple[list[ChannelGroup], dict[str, str]]:
        groups, refused, claimed = [], {}, set()
        if self.heads:
            for use in uses:
                if use.node.op_type not in ("MatMul", "Gemm"):
                    continue
                try:
                    head_group = trace_heads(use, model, self.kv_cache)
                except Refused as exc:
                    if _looks_like_attention_output(use):  # else: not an output projection, nothing to say
                        refused[f"{use.label} (heads)"] = str(exc)
                    continue
                groups.append(head_group.as_channel_group())
                claimed.update(u.node for u in head_group.projections)
                claimed.add(use.node)
        for use in uses:
            if use.node.op_type not in self.op_types or use.node in claimed:
                continue
            try:
                groups.append(trace_group(use))
            except Refused as exc:
                refused[use.label] = str(exc)
        return groups, refused

    def _kept(self, group: ChannelGroup) -> int:
        per = group.producers[0][1]
        if group.unit in UNIT_LABELS:  # at least ceil(min_channels / head_dim) heads
            return _kept_count(group.channels, self.ratio, -(-self.min_channels // per), 1)
        return _kept_count(group.channels, self.ratio, self.min_channels, self.round_to)

    def _scores(self, group: ChannelGroup, activation: list[np.ndarray] | None) -> np.ndarray:
        """Importance of each channel (head) of ``group``; ``activation``: Σx² per consumer input entry."""
        if activation is not None:
            return sum(np.sqrt(_block_sums(sums, group.channels)) * _consumer_row_norms(consumer, 2)
                       for sums, consumer in zip(activation, group.consumers))
        order = 1 if self.importance == "l1" else 2
        score = sum(_unit_norms(u.matrix(), per, 1, order, group.segments) ** order for u, per in group.producers)
        if group.unit in UNIT_LABELS:  # the output projection's rows count too
            score = score + sum(_consumer_row_norms(c, order) ** order for c in group.consumers)
        return score ** (1 / order)

    def _activation_norms(self, model: ir.Model, groups: list[ChannelGroup]) -> dict[str, list[np.ndarray]]:
        """Per group of the main graph, Σx² per entry of the channel axis of each consumer's input."""
        observable = [g for g in groups if g.producers[0][0].graph is model.graph]
        sums = {g.label: [0.0] * len(g.consumers) for g in observable}

        def on_batch(outputs: dict[str, np.ndarray]) -> None:
            for group in observable:
                for i, consumer in enumerate(group.consumers):
                    axis = 1 if consumer.use.node.op_type == "Conv" else -1
                    x = np.moveaxis(outputs[consumer.use.activation.name].astype(np.float64), axis, -1)
                    sums[group.label][i] = sums[group.label][i] + (x.reshape(-1, x.shape[-1]) ** 2).sum(axis=0)

        names = [c.use.activation.name for g in observable for c in g.consumers]
        if names:
            capture(model, names, self.data.batches(model, 8, self.samples), on_batch)
        return sums

    def _recover(self, original: ir.Model, model: ir.Model, groups: list[ChannelGroup],
                 kept_outputs: dict[ir.Node, np.ndarray]) -> dict[str, dict]:
        """Re-fit each consumer (front to back) to the original model's output of that layer."""
        reference = {u.node.name: u for u in scan_weights(original, PRODUCER_OPS).uses}
        consumers = {c.use.node for g in groups for c in g.consumers}
        results = {}
        for node in list(model.graph):
            if node in consumers:
                results[node.name] = _refit(original, reference[node.name], model, WeightUse(node, 1),
                                            kept_outputs.get(node), self.data, self.samples, self.damping)
        for node in consumers - set(model.graph):
            results[node.name] = {"kind": "skipped", "reason": "inside a subgraph: not observable"}
        return results


def _block_sums(sums: np.ndarray, channels: int) -> np.ndarray:
    return sums.reshape(channels, -1).sum(axis=1)


# --------------------------------------------------------------------------- recovery


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where the layer's (N,) output bias lives: Gemm C, Conv B, or the constant of a following Add."""
    node_columns = WeightUse(node, 1).array().shape[0 if node.op_type == "Conv" or node.attributes.get_int("transB", 0) else 1]
    if node.op_type in ("Gemm", "Conv"):
        bias = constant_tensor(node.inputs[2]) if len(node.inputs) > 2 else None
        return (node, 2) if bias is not None and bias.size == node_columns else None
    uses = node.outputs[0].uses()
    if len(uses) == 1 and uses[0][0].op_type == "Add" and not node.outputs[0].is_graph_output():
        add = uses[0][0]
        other = 1 - uses[0][1]
        tensor = constant_tensor(add.inputs[other])
        if tensor is not None and len(tensor.shape) == 1 and tensor.size == node_columns:
            return add, other
    return None


def _refit(original: ir.Model, orig_use: WeightUse, model: ir.Model, use: WeightUse, kept_columns: np.ndarray | None,
           data: Dataset, samples: int, damping: float) -> dict:
    """Least squares of the layer's kept input rows (plus its bias) on the original layer output, pulled
    toward the current weights with the strength chosen on held-out batches (:meth:`GramLayer.ridge_refit`).

    ``kept_columns``: the layer's own output columns that survived (when it is also a pruned producer).
    """
    alpha_o, alpha = gemm_alpha(orig_use.node), gemm_alpha(use.node)
    w_orig = orig_use.matrix() * np.float32(alpha_o)
    if kept_columns is not None:
        w_orig = w_orig[:, kept_columns]
    slot = _bias_slot(use.node)
    layer = GramLayer(use.node)

    def on_batch(outs):
        target = layer_input_rows(orig_use, outs[0][orig_use.activation.name]) @ w_orig
        rows = layer_input_rows(use, outs[1][use.activation.name])
        if slot is not None:
            rows = np.hstack([rows, np.ones((rows.shape[0], 1), rows.dtype)])
        layer.accumulate(rows, target)

    capture_many([(original, [orig_use.activation.name]), (model, [use.activation.name])],
                 data.batches(original, 8, samples), on_batch)
    current = use.matrix().astype(np.float64) * alpha
    if slot is not None:
        current = np.vstack([current, np.zeros((1, current.shape[1]))])  # the bias is unchanged so far
    mask = np.ones(current.shape, bool)
    fitted = layer.ridge_refit(lambda gram, strength: solve_masked(gram.xtx, gram.xty, gram.rows, mask, strength, current),
                               current, damping)
    before = layer.error(current)
    after = before if fitted is None else layer.error(fitted)
    applied = after < before
    if applied:
        weights = fitted[:-1] if slot is not None else fitted
        set_weight(use, use.from_matrix((weights / alpha).astype(np.float32)), "recovered")
        if slot is not None:
            node, index = slot
            bias = constant_array(node.inputs[index])
            shift = fitted[-1] / (node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0)
            new_bias = (bias.astype(np.float64) + np.broadcast_to(shift, (bias.size,)).reshape(bias.shape))
            set_weight(WeightUse(node, index), new_bias.astype(bias.dtype), "recovered")
    rows = layer.gram.rows
    return {"error_before": round(before, 6), "error_after": round(after if applied else before, 6),
            "applied": applied, "bias": slot is not None, "rows": rows, "inputs": current.shape[0], **layer.report,
            **({"note": "fewer rows than inputs: in-sample error"} if rows <= current.shape[0] else {})}
