"""``quantize-int8``: static INT8 QDQ quantization with streaming calibration.

QuantizeLinear/DequantizeLinear pairs are placed the way onnxruntime's QDQ fusion turns them into
integer kernels:

* MatMul/Gemm/Conv: activation input through Q->DQ, weight through DQ (int8, per channel), Conv/Gemm
  bias as int32 DQ. A MatMul whose output stays float becomes ``MatMulIntegerToFloat``; with its
  output quantized too (all consumers quantized) ``QLinearMatMul``; Conv needs its output quantized
  (``QLinearConv``). A Relu right after a quantized op is folded into the output's range (zero point
  at the bottom of the integer range), as onnxruntime's own quantizer does.
* Pooling/shape ops (MaxPool, Reshape, Flatten, Transpose, ...) get Q/DQ on both sides with the
  input's parameters, so onnxruntime drops the pair and runs them on integers.
* Embedding tables are stored int8 with one scale per row (``embeddings``).

Calibration runs the model on the data one batch at a time and keeps per tensor only running
min/max and a fixed-size histogram. Tensors with non-finite values or a range above
``max_activation`` (e.g. an additive attention mask of -3.4e38) stay float, and so do the ops
reading them. MatMul/Gemm weights inside subgraphs (whose activations cannot be observed) are
quantized dynamically instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import quantization as qz
from onnxopt.calibration import Dataset, capture
from onnxopt.errors import DataError
from onnxopt.filters import NodeFilter
from onnxopt.passes.quantize_dynamic import DynamicRewriter, quantize_gather
from onnxopt.registry import register
from onnxopt.weights import WeightUse, constant_tensor, drop_if_unused, name_uniquely, new_initializer, scan_weights

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPSET = 13  # QuantizeLinear/DequantizeLinear with an axis (per-channel weights)
SHARED_SCALE_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
DEFAULT_OP_TYPES = ["MatMul", "Gemm", "Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape"]



@dataclasses.dataclass
class _Plan:
    """Which tensors get a Q/DQ pair and which of their consumers read the dequantized value."""

    consumers: dict[ir.Value, set[ir.Node]]  # tensor -> nodes rewired to its DQ output
    all_consumers: set[ir.Value]  # tensors whose every use is rewired (quantized outputs)
    range_of: dict[ir.Value, ir.Value]  # tensor -> tensor whose calibrated range it uses
    relu_floor: set[ir.Value]  # outputs whose range starts at 0 (a folded Relu)
    shared_with: dict[ir.Value, ir.Value]  # tensor -> tensor whose parameters it reuses
    folded: dict[ir.Value, ir.Value]  # output of a Relu folded away -> its producer's output

    @property
    def folded_relus(self) -> list[ir.Node]:
        return [value.producer() for value in self.folded]


@register("quantize-int8", lossless=False)
class QuantizeInt8Pass(ir.passes.InPlacePass):
    """Static INT8 QDQ quantization placed for onnxruntime's integer kernels, calibrated on data.

    Args:
        calibration: Range estimation: ``minmax``, ``percentile``, ``entropy`` (KL) or ``mse``.
        percentile: Percentile of |x| kept by ``percentile`` calibration.
        per_channel: One weight scale per output channel (else one per tensor).
        symmetric_activations: Symmetric activation ranges (zero point in the middle).
        activation_type: ``uint8`` (what onnxruntime's x86 kernels prefer) or ``int8``.
        weight_type: Integer type of the weights (``int8`` for onnxruntime's fast u8s8 kernels).
        reduce_range: 7-bit weights, which avoid u8*s8 saturation on x86 CPUs without VNNI. Default
            (None): on when this machine is such a CPU and the types are uint8 x int8; set it
            explicitly when the model will run on other hardware.
        op_types: Op types to quantize (compute ops MatMul/Gemm/Conv plus pooling/activation ops).
        exclude: Node names or regular expressions (full match) to keep in float.
        activation_matmuls: Also quantize MatMuls of two activations (attention scores, context).
        embeddings: Store Gather tables (embeddings) as int8 with one scale per row.
        max_activation: Tensors whose calibrated |x| exceeds this (masks, sentinels) stay float.
        calibration_samples: Samples of the data used for calibration.
        batch_size: Samples per onnxruntime run during calibration.
    """

    def __init__(
        self,
        calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax",
        percentile: float = 99.999,
        per_channel: bool = True,
        symmetric_activations: bool = False,
        activation_type: Literal["uint8", "int8"] = "uint8",
        weight_type: Literal["int8", "uint8"] = "int8",
        reduce_range: bool | None = None,
        op_types: list[str] | None = None,
        exclude: list[str] | None = None,
        activation_matmuls: bool = False,
        embeddings: bool = True,
        max_activation: float = 1e5,
        calibration_samples: int = 256,
        batch_size: int = 8,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        qz.RangeCalibrator(calibration, percentile)  # validates both
        if activation_type not in ("uint8", "int8") or weight_type not in ("int8", "uint8"):
            raise ValueError("activation_type and weight_type must be uint8 or int8")
        if max_activation <= 0 or calibration_samples < 1 or batch_size < 1:
            raise ValueError("max_activation, calibration_samples and batch_size must be positive")
        for pattern in exclude or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude pattern '{pattern}' is not a regular expression: {exc}") from None
        self.calibration, self.percentile = calibration, percentile
        self.per_channel, self.symmetric_activations = per_channel, symmetric_activations
        self.activation_type, self.weight_type = activation_type, weight_type
        self.reduce_range = qz.resolve_reduce_range(reduce_range, activation_type, weight_type)
        self.op_types = set(op_types if op_types is not None else DEFAULT_OP_TYPES)
        self.exclude = list(exclude or [])
        self.activation_matmuls, self.embeddings = activation_matmuls, embeddings
        self.max_activation = max_activation
        self.calibration_samples, self.batch_size = calibration_samples, batch_size
        self.data, self.node_filter = data, node_filter
        self.details: dict = {}

    # ------------------------------------------------------------------ selection
    def _allowed(self, node: ir.Node) -> bool:
        """Passes the recipe's node filter and the ``exclude`` list."""
        if self.node_filter is not None and not self.node_filter(node):
            return False
        name = node.name or ""
        return not any(name == p or re.fullmatch(p, name) for p in self.exclude)

    def _selected(self, node: ir.Node) -> bool:
        return node.op_type in self.op_types and node.domain in ("", "ai.onnx") and self._allowed(node)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.data is None:
            raise DataError("quantize-int8 needs calibration data (--data); use quantize-dynamic without data")
        notes: list[str] = []
        quantizable = any(self._selected(n) or (self.embeddings and n.op_type == "Gather" and self._allowed(n))
                          for n in ir.traversal.RecursiveGraphIterator(model.graph))
        if quantizable:  # before the scan: the converter may rebuild the graph
            qz.raise_opset(model, QDQ_OPSET, "per-channel QuantizeLinear/DequantizeLinear", notes)
        scan = scan_weights(model, tuple(op for op in COMPUTE_OPS if op in self.op_types), self._selected)
        graph = model.graph
        skipped = dict(scan.skipped)
        weights: dict[ir.Node, WeightUse] = {}
        sub_uses = []
        for use in scan.uses:
            if constant_tensor(use.value).dtype != ir.DataType.FLOAT:
                skipped[use.label] = f"weight dtype {constant_tensor(use.value).dtype} (only float32 is quantized)"
            elif use.graph is not graph:
                sub_uses.append(use)
            else:
                weights[use.node] = use
        selected = set(weights)
        for node in graph:
            if node in selected or not self._selected(node):
                continue
            if node.op_type in COMPUTE_OPS:
                if node.op_type == "MatMul" and self.activation_matmuls and _float_activation(node.inputs[1]):
                    selected.add(node)
            elif any(_float_activation(v) for v in node.inputs):
                selected.add(node)

        plan = self._plan(graph, selected, weights)
        calibrators = self._calibrate(model, self._candidates(selected))
        kept_float: dict[str, str] = {}
        while True:  # drop nodes reading or writing tensors that must stay float, until stable
            params, newly = self._parameters(plan, calibrators)
            kept_float.update({v.name: reason for v, reason in newly.items()})
            blocked = {n for v in newly for n in plan.consumers.get(v, ())}
            blocked |= {v.producer() for v in newly if v in plan.all_consumers and v.producer() is not None}
            if not blocked & selected:
                break
            selected -= blocked
            plan = self._plan(graph, selected, weights)
        input_params = {n: params.get(plan.folded.get(n.inputs[0], n.inputs[0])) for n in selected & set(weights)}
        self._apply(graph, plan, params)
        weight_errors, stored = {}, {}
        for node in [n for n in graph if n in input_params]:
            use = weights[node]
            x_params = input_params[node]
            if x_params is None:
                skipped[use.label] = "activation input not quantized"
                continue
            weight_errors[use.label] = round(self._quantize_weight(use, x_params, stored), 5)
        dynamic = DynamicRewriter(model, self.per_channel, self.weight_type, self.reduce_range, "ort")
        dynamic_errors = {}
        for use in sub_uses:
            if use.node.op_type == "Conv":
                skipped[use.label] = "Conv inside a subgraph (activations cannot be calibrated)"
                continue
            label, result = use.label, dynamic.rewrite(use)
            if isinstance(result, str):
                skipped[label] = result
            else:
                dynamic_errors[label] = round(result, 5)
        embedding_errors = self._quantize_embeddings(model) if self.embeddings else {}
        ops_quantized: dict[str, int] = {}
        for node in selected:
            ops_quantized[node.op_type] = ops_quantized.get(node.op_type, 0) + 1
        self.details = {
            "calibration": self.calibration,
            "calibration_batches": calibrators.pop("__batches__"),
            "quantized_tensors": len(params),
            "quantized_ops": ops_quantized,
            "folded_relus": len(plan.folded_relus),
            "kept_float": kept_float,
            "weight_relative_error": weight_errors,
            "max_weight_relative_error": max(weight_errors.values(), default=0.0),
            "dynamic_in_subgraphs": dynamic_errors,
            "embedding_relative_error": embedding_errors,
            "reduce_range": self.reduce_range,
            "skipped": skipped,
            "notes": notes,
        }
        name_uniquely(model)
        return ir.passes.PassResult(model, bool(params or dynamic_errors or embedding_errors))

    # ------------------------------------------------------------------ planning
    def _plan(self, graph: ir.Graph, selected: set[ir.Node], weights: dict) -> _Plan:
        plan = _Plan({}, set(), {}, set(), {}, {})
        folded = plan.folded
        for node in graph:
            if node not in selected:
                continue
            output = node.outputs[0]
            if node.op_type in SHARED_SCALE_OPS:
                # Only extends a quantized region: the input must already be quantized as an output.
                source = folded.get(node.inputs[0], node.inputs[0])
                if source in plan.all_consumers and _float_activation(output) and not output.is_graph_output():
                    plan.shared_with[output] = source
                    plan.all_consumers.add(output)
                continue
            if node in plan.folded_relus:
                continue
            if node.op_type in COMPUTE_OPS:
                inputs = [0] if node in weights else [0, 1]
            else:
                inputs = [i for i, v in enumerate(node.inputs) if _float_activation(v)]
            for i in inputs:
                value = folded.get(node.inputs[i], node.inputs[i])
                if _float_activation(value) and not _is_dequantized(value) and value not in plan.all_consumers:
                    plan.consumers.setdefault(value, set()).add(node)
                    plan.range_of.setdefault(value, value)
            if not _float_activation(output) or output.is_graph_output():
                continue
            consumers = [n for n, _ in output.uses()]
            relu = self._foldable_relu(node, consumers, selected)
            if relu is not None:
                folded[relu.outputs[0]] = output
                plan.range_of[output] = relu.outputs[0]
                plan.relu_floor.add(output)
                plan.all_consumers.add(output)
            elif node.op_type not in COMPUTE_OPS or node.op_type == "Conv" or (
                consumers and all(n in selected for n in consumers)
            ):
                plan.all_consumers.add(output)
                plan.range_of[output] = output
        return plan

    def _foldable_relu(self, node: ir.Node, consumers: list[ir.Node], selected: set[ir.Node]) -> ir.Node | None:
        """The Relu after a compute op that a zero point at the integer minimum can replace."""
        if node.op_type not in COMPUTE_OPS or self.symmetric_activations or len(consumers) != 1:
            return None
        relu = consumers[0]
        out = relu.outputs[0]
        if relu.op_type != "Relu" or relu not in selected or out.is_graph_output() or not out.uses():
            return None
        return relu if all(n in selected for n, _ in out.uses()) else None

    def _candidates(self, selected: set[ir.Node]) -> list[str]:
        """Every tensor a plan over ``selected`` (or a subset of it) may need a range for."""
        return sorted({v.name for n in selected for v in (*n.inputs, *n.outputs) if _float_activation(v)})

    def _calibrate(self, model: ir.Model, names: list[str]) -> dict:
        self._not_float: set[str] = set()
        calibrators = {name: qz.RangeCalibrator(self.calibration, self.percentile) for name in names}

        def on_batch(outputs: dict[str, np.ndarray]) -> None:
            for name, array in outputs.items():
                if array.dtype == np.float32:
                    calibrators[name].update(array)
                else:
                    self._not_float.add(name)

        self.data.check(model)
        total = min(self.data.num_samples(), self.calibration_samples)
        batches = self.data.batches(model, self.batch_size, self.calibration_samples)
        progress = qz.progress(batches, math.ceil(total / self.batch_size), "calibrating")
        calibrators["__batches__"] = capture(model, names, progress, on_batch) if names else 0
        return calibrators

    def _parameters(self, plan: _Plan, calibrators: dict) -> tuple[dict, dict]:
        """(scale, zero point) per planned tensor, and the tensors that must stay float with why."""
        params, kept_float = {}, {}
        planned = list(plan.consumers) + [v for v in plan.all_consumers if v not in plan.consumers]
        for value in planned:
            if value in plan.shared_with:
                continue
            name = plan.range_of[value].name
            reason = "not a float32 tensor" if name in self._not_float else self._float_reason(calibrators[name])
            if reason:
                kept_float[value] = reason
                continue
            qmin, qmax = qz.int_range(self.activation_type)
            low, high = calibrators[name].range(qmax - qmin + 1, self.symmetric_activations)
            if value in plan.relu_floor:
                low = max(low, 0.0)
            params[value] = qz.scale_zero_point(low, high, self.activation_type, self.symmetric_activations)
        for value, source in plan.shared_with.items():
            if source in params:
                params[value] = params[source]
            else:
                kept_float[value] = "input of a shared-scale op is not quantized"
        return params, kept_float

    def _float_reason(self, calibrator: qz.RangeCalibrator) -> str | None:
        if calibrator.nonfinite:
            return f"{calibrator.nonfinite} non-finite values in calibration"
        if calibrator.count == 0:
            return "no values observed"
        if calibrator.absmax > self.max_activation:
            return f"range [{calibrator.minimum:.3g}, {calibrator.maximum:.3g}] exceeds max_activation"
        return None

    # ------------------------------------------------------------------ rewriting
    def _apply(self, graph: ir.Graph, plan: _Plan, params: dict) -> None:
        for relu in plan.folded_relus:
            ir.convenience.replace_all_uses_with(relu.outputs[0], relu.inputs[0])
            graph.remove(relu, safe=True)
        for value, (scale, zero_point) in params.items():
            rewire_all = value in plan.all_consumers
            targets = plan.consumers.get(value, set())
            uses = [(n, i) for n, i in value.uses() if rewire_all or n in targets]
            if not uses:
                continue
            scale_v = new_initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32))
            zp_v = new_initializer(graph, f"{value.name}_zero_point", np.asarray(zero_point))
            q = ir.node("QuantizeLinear", [value, scale_v, zp_v], name=f"{value.name}_quantize")
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale_v, zp_v], name=f"{value.name}_dequantize")
            dq.outputs[0].shape, dq.outputs[0].type = value.shape, ir.TensorType(ir.DataType.FLOAT)
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, [q, dq])
            else:
                graph.insert_before(next(iter(graph)), [q, dq])
            for node, index in uses:
                node.replace_input_with(index, dq.outputs[0])

    def _quantize_weight(self, use: WeightUse, x_params: tuple[np.ndarray, np.ndarray], cache: dict) -> float:
        """Weight through an int8 DequantizeLinear (per channel), Conv/Gemm bias through an int32 one.

        A weight shared by several quantized nodes is stored once (``cache``: one DequantizeLinear).
        """
        node, graph = use.node, use.graph
        w = use.array().astype(np.float32)
        if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
            channel_axis = 0
        else:
            channel_axis = 1
        axis = channel_axis if self.per_channel else None
        q, scale, zp = qz.quantize_tensor(w, self.weight_type, axis, True, self.reduce_range)
        key = (id(use.value), channel_axis)
        if key not in cache:
            name = use.value.name
            inputs = [
                new_initializer(graph, f"{name}_quantized", q),
                new_initializer(graph, f"{name}_scale", scale),
                new_initializer(graph, f"{name}_zero_point", zp),
            ]
            attrs = {"axis": channel_axis} if axis is not None else {}
            dq = ir.node("DequantizeLinear", inputs, attrs, name=f"{node.name}_weight_dequantize")
            graph.insert_before(node, dq)
            cache[key] = dq.outputs[0]
        old = use.value
        node.replace_input_with(use.index, cache[key])
        drop_if_unused(old)
        bias = node.inputs[2] if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
        bias_tensor = constant_tensor(bias)
        channels = w.shape[channel_axis]
        if bias_tensor is not None and tuple(bias_tensor.shape) == (channels,) and node.attributes.get_float("beta", 1.0) == 1.0:
            bias_scale = (np.asarray(x_params[0], np.float64) * np.broadcast_to(scale, (channels,))).astype(np.float32)
            b_q = np.rint(bias_tensor.numpy().astype(np.float64) / bias_scale)
            b_q = np.clip(b_q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
            b_inputs = [
                new_initializer(graph, f"{bias.name}_quantized", b_q),
                new_initializer(graph, f"{bias.name}_scale", bias_scale),
                new_initializer(graph, f"{bias.name}_zero_point", np.zeros(channels, np.int32)),
            ]
            b_dq = ir.node("DequantizeLinear", b_inputs, {"axis": 0}, name=f"{node.name}_bias_dequantize")
            graph.insert_before(node, b_dq)
            node.replace_input_with(2, b_dq.outputs[0])
            drop_if_unused(bias)
        return qz.relative_error(w, qz.dequantize(q, scale, zp, axis))

    def _quantize_embeddings(self, model: ir.Model) -> dict[str, float]:
        scan = scan_weights(model, ("Gather",), self._allowed)
        cache: dict = {}
        return {use.label: round(quantize_gather(use, cache), 5) for use in scan.uses
                if constant_tensor(use.value).dtype == ir.DataType.FLOAT}


def _float_activation(value: ir.Value | None) -> bool:
    """A tensor computed at run time that may be float32 (untyped values are checked when calibrating)."""
    return value is not None and value.dtype in (ir.DataType.FLOAT, None) and constant_tensor(value) is None


def _is_dequantized(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"
