"""Model statistics shared by ``inspect`` and the per-pass report."""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from onnxopt.io import tensor_bytes
from onnxopt.weights import constant_tensor


@dataclasses.dataclass
class ModelStats:
    nodes: int
    parameters: int
    """Elements of all constant tensors: initializers (unused ones included) and Constant nodes."""
    tensor_bytes: int
    op_histogram: dict[str, int]
    bytes_by_dtype: dict[str, int]
    bytes_by_op: dict[str, int]
    external_tensors: int


def model_stats(model: ir.Model) -> ModelStats:
    ops: collections.Counter[str] = collections.Counter()
    nodes = params = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        nodes += 1
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = constant_tensor(node.outputs[0])
            params += 0 if tensor is None else tensor.size
    by_dtype: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    external = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            params += tensor.size
            by_dtype[str(tensor.dtype).split(".")[-1]] += tensor.nbytes
            consumers = {n.op_type for n in value.consumers()} or {"(unused)"}
            by_op["/".join(sorted(consumers))] += tensor.nbytes
            external += isinstance(tensor, ir.ExternalTensor)
    return ModelStats(
        nodes, params, tensor_bytes(model), dict(ops.most_common()), dict(by_dtype), dict(by_op.most_common()), external
    )


def histogram_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) != before.get(k, 0)}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
