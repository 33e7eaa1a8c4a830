"""``convert-fp16`` / ``convert-bf16``: float32 tensors and ops to half precision, mixed where needed.

Numerically sensitive ops (normalizations, reductions, Softmax, Exp/Log/Pow/Sqrt...) stay float32, as
do ops whose schema at the model's opset has no such type (bfloat16 Conv before opset 22), and so do
ops all of whose float inputs come from such ops (the rest of a LayerNorm's variance
chain), so a ``ReduceMean -> Add(eps) -> Sqrt`` chain is not split by casts; a fused normalization or
Softmax (one node) does not pull its readers into float32. Casts are inserted only
at the boundaries between float32 and half regions (one per tensor and graph), Cast nodes that
produced float32 inside a converted region produce half instead, constants are converted once
(finite values clamped to the target's range, ±65504 for fp16 and ±3.39e38 for bf16, so masks like
-3.4028235e38 do not become -inf and then NaN). Graph inputs/outputs stay float32 unless
``keep_io_types=false``; subgraph outputs always keep their type. With data, ops whose float32
outputs exceed the target's range are reported (and kept in float32 with ``keep_overflowing``).
"""

from __future__ import annotations

import functools
import re

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt.calibration import Dataset, capture
from onnxopt.filters import NodeFilter
from onnxopt.io import no_new_annotations
from onnxopt.registry import register
from onnxopt.weights import constant_tensor, drop_if_unused, name_uniquely, new_initializer

FP16_MAX = float(np.finfo(np.float16).max)
HALF_MAX = {ir.DataType.FLOAT16: FP16_MAX, ir.DataType.BFLOAT16: float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)}
"""Largest finite value of each target: float32's -3.4028235e38 (a common attention-mask fill) rounds to
-inf in bfloat16 too, and 0 × -inf is NaN."""
# The overflow check captures this many tensors per pass over the data, one sample at a time, so its
# memory is bounded by 2 x OVERFLOW_CHECK_VALUES x the largest intermediate tensor of one sample
# (onnxruntime's output and numpy's copy; on MiniLM seq 128 the whole check, its session included, adds
# ~170 MB of peak RSS, 790 MB with batches of 8 and every tensor at once) whatever the model's size
# and the number of samples; each chunk is one more pass over the samples.
OVERFLOW_CHECK_VALUES = 128
SENSITIVE_OPS = [
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "InstanceNormalization",
    "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
]  # fmt: skip
SELF_CONTAINED_OPS = {
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "InstanceNormalization",
    "GroupNormalization", "Softmax", "LogSoftmax",
}  # fmt: skip
"""Sensitive ops that compute in float32 inside one node: what reads them alone is converted (a fused
LayerNormalization kept a whole pre-LN transformer in float32)."""
# Ops that never change precision: control flow (their subgraphs are converted), randomness, ranges,
# outputs typed by an attribute (ConstantOfShape's value, EyeLike's dtype).
UNCONVERTIBLE_OPS = {
    "If", "Loop", "Scan", "Range", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
    "Multinomial", "Bernoulli", "NonMaxSuppression", "Constant", "ConstantOfShape", "EyeLike",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}  # fmt: skip
ANY_TYPE_INPUT_OPS = {"Cast", "Shape", "Size"}
DATA_MOVEMENT_OPS = {
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather",
    "GatherElements", "GatherND", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "Cast", "Shape", "Size",
}  # fmt: skip
"""Ops that only move or measure values: a region of them alone, holding no weight, would gain nothing in
half precision and pay a Cast at each end."""
FLOAT32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}  # inputs that must stay float32 whatever T is


class _ConvertPrecision(ir.passes.InPlacePass):
    target: ir.DataType

    def __init__(
        self,
        keep_fp32_ops: list[str] | None = None,
        keep_io_types: bool = True,
        keep_overflowing: bool = True,
        exclude: list[str] | None = None,
        calibration_samples: int = 32,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        for pattern in exclude or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude pattern '{pattern}' is not a regular expression: {exc}") from None
        self.keep_ops = set(SENSITIVE_OPS if keep_fp32_ops is None else keep_fp32_ops)
        self.keep_io_types = keep_io_types
        self.keep_overflowing = keep_overflowing
        self.exclude = list(exclude or [])
        self.calibration_samples = calibration_samples
        self.data, self.node_filter = data, node_filter
        self.details: dict = {}

    def _excluded(self, node: ir.Node) -> bool:
        if self.node_filter is not None and not self.node_filter(node):
            return True
        name = node.name or ""
        return any(name == p or re.fullmatch(p, name) for p in self.exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with no_new_annotations(model):  # inferred shapes are only needed while converting
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        ShapeInferencePass()(model)
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        originally_float = {
            v for node in nodes for v in (*node.inputs, *node.outputs) if v is not None and v.dtype == ir.DataType.FLOAT
        } | {v for v in model.graph.inputs if v.dtype == ir.DataType.FLOAT}
        overflowing = self._overflowing(model, nodes, originally_float)
        opset = model.opset_imports.get("", 1)
        half = self._half_nodes(nodes, originally_float, set(overflowing) if self.keep_overflowing else set(), opset)
        retyped_io = set() if self.keep_io_types else {v for v in (*model.graph.inputs, *model.graph.outputs) if v in originally_float}
        half -= _idle_regions(half, originally_float, retyped_io)
        if not self.keep_io_types:
            for value in model.graph.inputs:
                if value in originally_float:
                    _set_dtype(value, self.target)
        for node in half:
            for value in node.outputs:
                if value in originally_float:
                    _set_dtype(value, self.target)
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", self.target)
        casts, clamped = self._reconcile_inputs(nodes, half, originally_float)
        casts += self._restore_outputs(model, originally_float)
        kept: dict[str, int] = {}
        unsupported: dict[str, int] = {}
        for node in nodes:
            if node not in half and any(v in originally_float for v in (*node.inputs, *node.outputs)):
                kept[node.op_type] = kept.get(node.op_type, 0) + 1
                if not _schema_accepts(node, originally_float, self.target, opset):
                    unsupported[node.op_type] = unsupported.get(node.op_type, 0) + 1
        self.details = {
            "converted_nodes": len(half),
            "kept_float32": kept,
            f"no_{self.suffix}_in_opset_{opset}": unsupported,  # kept, with what runs only on their outputs
            "casts_inserted": casts,
            "clamped_constants": clamped,
            "overflowing_ops": overflowing,
        }
        name_uniquely(model)
        return ir.passes.PassResult(model, bool(half) or bool(retyped_io))

    def _half_nodes(self, nodes: list[ir.Node], originally_float: set, overflowing: set[str], opset: int) -> set[ir.Node]:
        kept_values: set[ir.Value] = set()
        half = set()
        for node in nodes:
            floats = [v for v in (*node.inputs, *node.outputs) if v in originally_float]
            runtime_inputs = [v for v in node.inputs if v in originally_float and constant_tensor(v) is None]
            self_contained = node.op_type in self.keep_ops and node.op_type in SELF_CONTAINED_OPS
            keep = (
                not floats
                or node.domain not in ("", "ai.onnx")
                or node.op_type in self.keep_ops
                or node.op_type in UNCONVERTIBLE_OPS
                or any(v is not None and v.dtype is None for v in (*node.inputs, *node.outputs))  # e.g. after MatMulNBits
                or node.name in overflowing
                or self._excluded(node)
                or (runtime_inputs and all(v in kept_values for v in runtime_inputs))
                or not _schema_accepts(node, originally_float, self.target, opset)
            )
            if not keep:
                half.add(node)
            elif not self_contained or runtime_inputs and all(v in kept_values for v in runtime_inputs):
                kept_values.update(v for v in node.outputs if v in originally_float)
        return half

    def _reconcile_inputs(self, nodes, half: set[ir.Node], originally_float: set) -> tuple[int, dict[str, int]]:
        """Give every node its inputs in the precision it runs in: constants converted, Casts elsewhere."""
        casts: dict[tuple[ir.Value, ir.Graph, ir.DataType], ir.Value] = {}
        converted: dict[ir.Value, ir.Value] = {}
        clamped: dict[str, int] = {}
        for node in nodes:
            for index, value in enumerate(node.inputs):
                if value not in originally_float or (node in half and node.op_type in ANY_TYPE_INPUT_OPS):
                    continue
                wanted = ir.DataType.FLOAT
                if node in half and index not in FLOAT32_INPUTS.get(node.op_type, ()):
                    wanted = self.target
                if value.dtype == wanted:
                    continue
                tensor = constant_tensor(value)
                if tensor is not None and wanted == self.target:
                    if value not in converted:
                        array, count = self._to_half(tensor.numpy())
                        home = value.graph or node.graph  # where every reader sees it, subgraphs included
                        converted[value] = new_initializer(home, f"{value.name}_{self.suffix}", array)
                        if count:
                            clamped[value.name] = count
                    node.replace_input_with(index, converted[value])
                    continue
                key = (value, node.graph, wanted)
                if key not in casts:
                    cast = ir.node("Cast", [value], {"to": wanted}, name=f"{value.name}_to_{wanted.name.lower()}")
                    cast.outputs[0].dtype, cast.outputs[0].shape = wanted, value.shape
                    node.graph.insert_before(node, cast)
                    casts[key] = cast.outputs[0]
                node.replace_input_with(index, casts[key])
        for value in converted:
            drop_if_unused(value)
        return len(casts), clamped

    def _restore_outputs(self, model: ir.Model, originally_float: set) -> int:
        """Cast converted outputs back to float32: subgraph outputs always, the model's unless asked (outputs
        that were half precision already stay as they were)."""
        count = 0
        graphs = [model.graph, *model.graph.subgraphs()] if self.keep_io_types else list(model.graph.subgraphs())
        for graph in graphs:
            for i, value in enumerate(graph.outputs):
                if value.dtype != self.target or value not in originally_float:
                    continue
                name = value.name
                value.name = f"{name}_{self.suffix}"
                cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{name}_to_float")
                cast.outputs[0].name, cast.outputs[0].shape = name, value.shape
                _set_dtype(cast.outputs[0], ir.DataType.FLOAT)
                graph.append(cast)
                graph.outputs[i] = cast.outputs[0]
                count += 1
        return count

    def _overflowing(self, model: ir.Model, nodes: list[ir.Node], originally_float: set) -> dict[str, float]:
        """Main-graph ops whose float32 outputs exceed the target's range on the data: {node: max |x|}."""
        if self.data is None:
            return {}
        producers = {v.name: n for n in model.graph for v in n.outputs if v in originally_float and v.name}
        peaks: dict[str, float] = {}

        def on_batch(outputs: dict[str, np.ndarray]) -> None:
            for name, array in outputs.items():
                finite = np.abs(array[np.isfinite(array)])
                if finite.size:
                    peaks[name] = max(peaks.get(name, 0.0), float(finite.max()))

        names = sorted(producers)
        for start in range(0, len(names), OVERFLOW_CHECK_VALUES):
            samples = self.data.batches(model, 1, self.calibration_samples)
            capture(model, names[start : start + OVERFLOW_CHECK_VALUES], samples, on_batch)
        return {producers[n].name or n: peak for n, peak in peaks.items() if peak > HALF_MAX[self.target]}

    def _to_half(self, array: np.ndarray) -> tuple[np.ndarray, int]:
        """``array`` in the target type, finite values clamped to its range; and how many were clamped."""
        array, limit = array.astype(np.float32), HALF_MAX[self.target]
        finite = np.isfinite(array)
        over = int(np.count_nonzero(finite & (np.abs(array) > limit)))
        clipped = np.where(finite, np.clip(array, -limit, limit), array)
        return clipped.astype(np.float16 if self.target == ir.DataType.FLOAT16 else ml_dtypes.bfloat16), over


_ARGS_DOC = """
    Args:
        keep_fp32_ops: Op types kept in float32 (default: normalizations, reductions, Softmax,
            Exp/Log/Pow/Sqrt/Reciprocal).
        keep_io_types: Keep the model's float32 inputs and outputs (casts at the boundary).
        keep_overflowing: Keep in float32 the ops whose outputs exceed the target's range on the data.
        exclude: Node names or regular expressions (full match) kept in float32.
        calibration_samples: Samples of the data run to find overflowing ops.
"""


@register("convert-fp16", lossless=False)
class ConvertFp16Pass(_ConvertPrecision):
    __doc__ = "Convert float32 to float16 with float32 islands for sensitive ops; reports fp16 overflows.\n" + _ARGS_DOC
    target = ir.DataType.FLOAT16
    suffix = "fp16"


@register("convert-bf16", lossless=False)
class ConvertBf16Pass(_ConvertPrecision):
    __doc__ = "Convert float32 to bfloat16 with float32 islands for sensitive ops.\n" + _ARGS_DOC
    target = ir.DataType.BFLOAT16
    suffix = "bf16"


def _idle_regions(half: set[ir.Node], originally_float: set, retyped_io: set[ir.Value]) -> set[ir.Node]:
    """The nodes of connected regions of ``half`` made of :data:`DATA_MOVEMENT_OPS` only, reading no float
    constant and touching no model input or output retyped to half (``keep_io_types=false``): e.g. the
    Transpose/Unsqueeze between two float32 GRUs."""
    region = {node: node for node in half}  # union-find over values passed between half nodes

    def root(node: ir.Node) -> ir.Node:
        while region[node] is not node:
            region[node] = node = region[region[node]]
        return node

    for node in half:
        for value in node.outputs:
            for reader, _ in value.uses():
                if reader in region:
                    region[root(reader)] = root(node)
    busy = {root(node) for node in half if node.op_type not in DATA_MOVEMENT_OPS
            or any(v in originally_float and constant_tensor(v) is not None for v in node.inputs)
            or any(v in retyped_io for v in (*node.inputs, *node.outputs))}
    return {node for node in half if root(node) not in busy}


def _set_dtype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` (a tensor, or a sequence/optional of them) element type ``dtype`` through a new type
    object: ``Value.dtype = ...`` changes the type object in place, and values of a model built with the
    onnx_ir API may share one (``io.clone`` gives copies their own)."""
    def retyped(tp):
        if isinstance(tp, (ir.SequenceType, ir.OptionalType)):
            return type(tp)(retyped(tp.elem_type))
        return type(tp)(dtype) if isinstance(tp, (ir.TensorType, ir.SparseTensorType)) else ir.TensorType(dtype)

    value.type = retyped(value.type)


def _schema_accepts(node: ir.Node, originally_float: set, target: ir.DataType, opset: int) -> bool:
    """Whether the node's ONNX schema at ``opset`` lets each of its float32 inputs and outputs be ``target``
    (bfloat16 Conv, for one, exists only from opset 22). Ops of other domains: no schema to ask."""
    if node.domain not in ("", "ai.onnx"):
        return True
    inputs, outputs = _allowed_types(node.op_type, opset)
    wanted = f"tensor({target.name.lower()})"
    checks = [(outputs, node.outputs, ())]
    if node.op_type not in ANY_TYPE_INPUT_OPS:
        checks.append((inputs, node.inputs, FLOAT32_INPUTS.get(node.op_type, ())))
    for allowed, values, exempt in checks:
        for index, value in enumerate(values):
            if value in originally_float and index not in exempt and allowed:
                if not any(wanted in t for t in allowed[min(index, len(allowed) - 1)]):  # the last may be variadic
                    return False
    return True


@functools.cache
def _allowed_types(op_type: str, opset: int) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """The types each input and each output of ``op_type``'s schema at ``opset`` allows (none known: empty)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return (), ()
    constraints = {c.type_param_str: tuple(c.allowed_type_strs) for c in schema.type_constraints}
    return tuple(tuple(constraints.get(p.type_str, (p.type_str,)) for p in params) for params in (schema.inputs, schema.outputs))
