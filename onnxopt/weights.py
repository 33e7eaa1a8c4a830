"""The one helper every weight-rewriting pass uses to find, read and replace weights.

:func:`scan_weights` walks all graphs (subgraphs of If/Loop/Scan included) and yields a
:class:`WeightUse` per (consumer node, constant weight input) — weights held as initializers or as
``Constant`` nodes alike — and records why others were skipped (already quantized, non-constant,
unsupported layout). ``WeightUse.matrix()`` gives the weight as the (K, N) matrix of ``y = x @ W``
whatever the op (MatMul, Gemm with transB, Conv by its GEMM view, Gather of embeddings);
:func:`set_weight` puts a new array in place without disturbing other consumers of a shared tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx_ir as ir

# Input index holding the weight, per op type.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0, "LSTM": 1, "GRU": 1, "RNN": 1}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # weight W (directions, gates × hidden, input); R alongside
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
    "MatMulNBits",
    "GatherBlockQuantized",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
}
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class WeightUse:
    """A constant weight consumed by ``node`` at input ``index``; ``scope`` locates a node inside a
    subgraph (``<container>/<attribute>/``, see :func:`scoped_nodes`)."""

    node: ir.Node
    index: int
    scope: str = ""

    @property
    def value(self) -> ir.Value:
        return self.node.inputs[self.index]

    @property
    def graph(self) -> ir.Graph:
        return self.node.graph

    @property
    def activation(self) -> ir.Value | None:
        """The non-constant input multiplied with the weight (None for Gather)."""
        return None if self.node.op_type == "Gather" else self.node.inputs[0]

    @property
    def shared(self) -> bool:
        return len(self.value.uses()) > 1

    def array(self) -> np.ndarray:
        return constant_array(self.value)

    def matrix(self) -> np.ndarray:
        """The weight as a float32 (K, N) matrix of ``y = x @ W``."""
        w = self.array().astype(np.float32)
        op = self.node.op_type
        if op == "Gemm" and self.node.attributes.get_int("transB", 0):
            return np.ascontiguousarray(w.T)
        if op == "Conv":
            return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
        return w

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: back to the op's own layout and the weight's dtype."""
        original = self.array()
        op = self.node.op_type
        if op == "Gemm" and self.node.attributes.get_int("transB", 0):
            matrix = matrix.T
        elif op == "Conv":
            matrix = matrix.T.reshape(original.shape)
        return np.ascontiguousarray(matrix, dtype=original.dtype)

    @property
    def label(self) -> str:
        """The layer's name in reports: unique even where a subgraph layer is named like a main one."""
        return self.scope + (self.node.name or f"{self.node.op_type}({self.value.name})")

    @property
    def home(self) -> ir.Graph:
        """The graph defining the weight: a replacement shared by all its readers goes there, where every
        reader sees it (a main-graph weight may be read inside an If/Loop/Scan body too)."""
        return self.value.graph or self.graph


@dataclasses.dataclass
class WeightScan:
    uses: list[WeightUse]
    skipped: list[tuple[str, str]]  # (node label, reason)


FUSED_LAYERS = {("com.microsoft", "Attention"), ("com.microsoft", "PackedAttention")}
"""ORT contrib ops that hold the Q/K/V weights ``fuse`` took from MatMul layers: no pass compresses them."""


def scan_weights(
    model: ir.Model | ir.Graph,
    op_types: Iterable[str] = ("MatMul", "Gemm"),
    node_filter: Callable[[ir.Node], bool] | None = None,
    min_elements: int = 1,
) -> WeightScan:
    """Find the constant 2-D (or Conv 4-D) float weights of ``op_types`` nodes, in all graphs."""
    graph = model.graph if isinstance(model, ir.Model) else model
    op_types = set(op_types)
    uses, skipped = [], []
    for scope, node in scoped_nodes(graph):
        if node_filter is not None and not node_filter(node):
            continue
        if "MatMul" in op_types and (node.domain, node.op_type) in FUSED_LAYERS:
            fused = f"{node.domain}.{node.op_type}"
            skipped.append((scope + (node.name or fused), f"weights fused into {fused} by `fuse`: run this pass before it"))
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        use = WeightUse(node, WEIGHT_INPUT[node.op_type], scope)
        reason = _unsupported_reason(use)
        if reason is None and use.array().size < min_elements:
            reason = f"smaller than {min_elements} elements"
        if reason:
            skipped.append((use.label if len(node.inputs) > use.index else scope + node.name, reason))
        else:
            uses.append(use)
    return WeightScan(uses, skipped)


def scoped_nodes(graph: ir.Graph, scope: str = "") -> Iterator[tuple[str, ir.Node]]:
    """Every node of ``graph`` and, after each, those of its subgraphs, with its scope: ``""`` in
    ``graph``, ``<container>/<attribute>/`` inside a subgraph (an unnamed container is ``<op_type>#<its
    position>``; nested scopes concatenate)."""
    for index, node in enumerate(graph):
        yield scope, node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subgraphs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                subgraphs = attr.as_graphs()
            else:
                continue
            for subgraph in subgraphs:
                yield from scoped_nodes(subgraph, f"{scope}{node.name or f'{node.op_type}#{index}'}/{attr.name}/")


def edge_layers(model: ir.Model, op_types: Iterable[str]) -> set[int]:
    """``id()`` of the first and the last ``op_types`` node with a constant weight in the main graph: the
    input and classifier layers that lossy passes can be told to leave alone."""
    main = [use.node for use in scan_weights(model, op_types).uses if use.graph is model.graph]
    return {id(main[0]), id(main[-1])} if main else set()


def name_layers(uses: list[WeightUse]) -> None:
    """Give unnamed layer nodes a unique name (layers are matched by name during recovery)."""
    for i, use in enumerate(uses):
        if not use.node.name:
            use.node.name = f"{use.node.op_type}_{use.value.name}_{i}"


def other_readers(use: WeightUse, rewritten: Iterable[ir.Node]) -> list[str]:
    """The nodes besides ``rewritten`` that read ``use``'s weight: a lossy pass rewriting the weight for
    its own layers would add its result to a file that must keep the original for them."""
    ids = {id(node) for node in rewritten}
    return [f"{node.op_type} '{node.name}'" for node, _ in use.value.uses() if id(node) not in ids]


def _unsupported_reason(use: WeightUse) -> str | None:
    node = use.node
    if len(node.inputs) <= use.index or node.inputs[use.index] is None:
        return "no weight input"
    value = use.value
    producer = value.producer()
    if producer is not None and producer.op_type in QUANTIZED_OPS:
        return "already quantized"
    if constant_tensor(value) is None:
        return "weight is not a constant"
    dtype = constant_tensor(value).dtype  # a Constant node's output may carry no type
    if dtype not in FLOAT_TYPES:
        return f"weight dtype {dtype} is not float"
    act = use.activation
    if act is not None and constant_tensor(act) is not None:
        return "both inputs are constant"
    rank = len(constant_tensor(value).shape)
    expected = 4 if node.op_type == "Conv" else 3 if node.op_type in RECURRENT_OPS else 2
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
        return "grouped convolution"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
        return "Gather on an axis other than 0"
    if rank != expected:
        return f"weight of rank {rank}"
    return None


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer or Constant-node output; None if not constant."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and list(node.attributes) == ["value"] and not node.attributes["value"].is_ref():
        return node.attributes["value"].as_tensor()  # get_const_tensor would name it: the file grows by the name
    return ir.convenience.get_const_tensor(value)


def constant_array(value: ir.Value) -> np.ndarray:
    tensor = constant_tensor(value)
    if tensor is None:
        raise ValueError(f"value '{value.name}' is not constant")
    return tensor.numpy()


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` under a name unique in that graph."""
    unique = unique_name(name, value_names(graph))
    tensor = ir.tensor(np.asarray(array, order="C"), name=unique)  # asarray keeps 0-d arrays scalar
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def set_weight(use: WeightUse, array: np.ndarray, suffix: str) -> ir.Value:
    """Replace the weight of ``use`` with ``array``; other consumers of a shared weight keep theirs."""
    old = use.value
    new = new_initializer(use.graph, f"{old.name}_{suffix}", array)
    use.node.replace_input_with(use.index, new)
    drop_if_unused(old)
    return new


def name_uniquely(model: ir.Model) -> None:
    """Name every value of ``model`` (new, unnamed ones included) unlike any other value of it, subgraphs
    included, and every named node unlike the other nodes of its graph: onnxruntime refuses a value
    defined twice ("SSA form") and two nodes of one name in a graph. Each graph names its new values
    without seeing the enclosing graph's, and a pass run twice names its new nodes alike. The main graph's
    names win, then outer graphs' over inner ones'; absent optional outputs (named ``""``) and unnamed
    nodes stay so.
    """
    seen: set[ir.Value] = set()
    taken: set[str] = set()
    for graph in model.graphs():  # the main graph first, outer graphs before the graphs inside them
        outputs = [v for node in graph for v in node.outputs]
        for value in [*graph.inputs, *graph.outputs, *graph.initializers.values(), *outputs]:
            if value in seen or (value.name == "" and not value.uses()):
                continue
            seen.add(value)
            value.name = unique_name(value.name or "val", taken)
            taken.add(value.name)
        taken_nodes: set[str] = set()
        for node in graph:
            if node.name:
                node.name = unique_name(node.name, taken_nodes)
                taken_nodes.add(node.name)


def drop_if_unused(value: ir.Value) -> None:
    """Remove an initializer (or the Constant node producing it) that nothing consumes any more."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.graph.remove(producer, safe=True)
    elif value.is_initializer() and value.graph is not None:
        value.graph.initializers.pop(value.name, None)


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first not in ``taken``."""
    unique, n = name, 1
    while unique in taken:
        unique, n = f"{name}_{n}", n + 1
    return unique


def value_names(graph: ir.Graph) -> set[str]:
    """The names of the values (inputs, initializers, node outputs) of ``graph`` and its subgraphs."""
    names = set()
    for g in (graph, *graph.subgraphs()):
        names.update(g.initializers)
        names.update(v.name for v in g.inputs if v.name)
        names.update(v.name for node in g for v in node.outputs if v.name)
    return names
