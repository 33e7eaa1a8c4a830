"""Symbolic shapes of tensors whose shapes exporters compute at run time (``Shape`` → ``Concat`` → ``Expand``).

onnxruntime's symbolic shape inference propagates named dimensions through such shape arithmetic; it runs
here on the nodes computing the asked-for tensors only, with float initializers passed as shaped inputs
(their values never decide a shape), so a large model is neither copied nor serialized.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxopt.weights import constant_tensor

SMALL_CONSTANT = 4096  # integer initializers up to this size are kept: they may hold shapes


def ancestors(values: list[ir.Value]) -> list[ir.Node]:
    """The nodes of the graph computing ``values``, in graph order."""
    seen: set[ir.Node] = set()
    stack = [v.producer() for v in values if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    graph = next((node.graph for node in seen), None)
    return [node for node in graph if node in seen] if graph is not None else []


def symbolic_shapes(model: ir.Model, values: list[ir.Value]) -> dict[ir.Value, tuple[int | str | None, ...]]:
    """Shapes of ``values`` (of the main graph) with named dimensions; values it cannot infer are absent."""
    values = [v for v in values if v.producer() is not None]  # graph inputs and initializers: as declared
    # Constant nodes become initializers: the inference reads only the ``value`` form of their attribute
    nodes = [node for node in ancestors(values) if node.op_type != "Constant"]
    if not nodes:
        return {}
    produced = {out for node in nodes for out in node.outputs}
    sources = {v for node in nodes for v in node.inputs if v is not None and v not in produced}
    graph = onnx.GraphProto(name="shapes")
    graph.node.extend(ir.serde.serialize_node(node) for node in nodes)
    for value in sources:
        tensor = constant_tensor(value)
        if tensor is not None and tensor.dtype.is_integer() and tensor.size <= SMALL_CONSTANT:
            graph.initializer.append(ir.serde.serialize_tensor(tensor))
            graph.initializer[-1].name = value.name
        elif tensor is not None:  # only its shape can decide another shape
            graph.input.append(onnx.helper.make_tensor_value_info(value.name, tensor.dtype, list(tensor.shape.numpy())))
        elif value.type is not None:
            graph.input.append(ir.serde.serialize_value(value))
        else:
            return {}
    graph.output.extend(onnx.ValueInfoProto(name=v.name) for v in values)
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - an op it does not know: the shapes stay unknown
        return {}
    if inferred is None:
        return {}
    infos = {i.name: i for i in list(inferred.graph.value_info) + list(inferred.graph.output)}
    shapes = {}
    for value in values:
        info = infos.get(value.name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[value] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in info.type.tensor_type.shape.dim)
    return shapes
