"""``quantize-dynamic``: int8 weights, activations quantized at run time (no calibration data).

Each MatMul/Gemm with a constant weight becomes onnxruntime's ``DynamicQuantizeMatMul`` (the bias
``Add`` that follows a MatMul is folded into it), or with ``format=onnx`` the standard
``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul`` chain. An LSTM becomes onnxruntime's
``DynamicQuantizeLSTM`` (int8 W and R, one scale per gate row; GRU and RNN have no such kernel and stay
float). Weights in subgraphs, Constant-node weights and shared weights (quantized once) are handled;
already quantized weights are skipped.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import quantization as qz
from onnxopt.filters import NodeFilter
from onnxopt.registry import register
from onnxopt.weights import (
    RECURRENT_OPS,
    WeightUse,
    constant_tensor,
    drop_if_unused,
    name_uniquely,
    new_initializer,
    scan_weights,
)

MS_DOMAIN = "com.microsoft"
STANDARD_OPSET = 13  # the standard ops emitted (DynamicQuantizeLinear, MatMulInteger, int8 Gather dequantization)



class DynamicRewriter:
    """Replaces MatMul/Gemm weight uses by dynamically quantized integer matmuls.

    Quantized weights are cached per (tensor, orientation), so a shared weight is stored once.
    """

    def __init__(self, model: ir.Model, per_channel: bool, weight_type: str, reduce_range: bool, fmt: str):
        self.model = model
        self.per_channel = per_channel
        self.weight_type = weight_type
        self.reduce_range = reduce_range
        self.fmt = fmt
        self._cache: dict[tuple[int, bool], tuple[ir.Value, ir.Value, ir.Value, float]] = {}

    def rewrite(self, use: WeightUse) -> float | str:
        """Rewrite one use; returns the weight's relative error, or the reason it was left alone."""
        node, graph = use.node, use.graph
        if node.op_type == "Gather":
            return quantize_gather(use, self._cache)
        if node.op_type in RECURRENT_OPS:
            return self._quantized_lstm(use)
        transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
        parts = matmul_parts(use, constant_tensor(use.value).shape[0 if transposed else 1])
        if isinstance(parts, str):
            return parts
        old_nodes, bias, extra_add = parts
        weights = self._quantized_weight(use, transposed)
        new_nodes = self._integer_matmul(graph, node.inputs[0], weights, bias, node.name)
        replace_matmul(graph, old_nodes, new_nodes, extra_add)
        return weights[3]

    def _quantized_weight(self, use: WeightUse, transposed: bool):
        key = (id(use.value), transposed)
        if key not in self._cache:
            w = use.matrix()
            axis = 1 if self.per_channel else None
            q, scale, zp = qz.quantize_tensor(w, self.weight_type, axis, True, self.reduce_range)
            error = qz.relative_error(w, qz.dequantize(q, scale, zp, axis))
            graph, name = use.home, use.value.name
            self._cache[key] = (
                new_initializer(graph, f"{name}_quantized", q),
                new_initializer(graph, f"{name}_scale", scale),
                new_initializer(graph, f"{name}_zero_point", zp),
                error,
            )
        return self._cache[key]

    def _quantized_lstm(self, use: WeightUse) -> float | str:
        """``LSTM`` -> onnxruntime's ``DynamicQuantizeLSTM`` with int8 W and R."""
        node = use.node
        if node.op_type != "LSTM":
            return f"no onnxruntime kernel runs a {node.op_type} with integer weights (only LSTM has one)"
        if node.attributes.get_int("layout", 0) != 0:
            return "LSTM with layout=1 (DynamicQuantizeLSTM takes sequence-first inputs)"
        recurrence = constant_tensor(node.inputs[2])
        if recurrence is None or recurrence.dtype != ir.DataType.FLOAT or len(recurrence.shape) != 3:
            return "recurrence weight R is not a constant float32 tensor (computed from the parameters? run cleanup first)"
        self.model.opset_imports.setdefault(MS_DOMAIN, 1)
        (w, w_scale, w_zp, w_error), (r, r_scale, r_zp, r_error) = (self._gate_weights(use, i) for i in (1, 2))
        optional = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]  # B, lengths, h0, c0, P
        attributes = {name: attr for name, attr in node.attributes.items() if name != "layout"}
        new = ir.node("DynamicQuantizeLSTM", [node.inputs[0], w, r, *optional, w_scale, w_zp, r_scale, r_zp],
                      attributes, domain=MS_DOMAIN, num_outputs=len(node.outputs), name=node.name)
        old_inputs = list(node.inputs[1:3])
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.shape, out.type = old.name, old.shape, old.type
        ir.convenience.replace_nodes_and_values(use.graph, node, [node], [new], list(node.outputs), list(new.outputs))
        for value in old_inputs:
            drop_if_unused(value)
        return max(w_error, r_error)

    def _gate_weights(self, use: WeightUse, index: int):
        """LSTM input ``index`` (W or R: directions × 4·hidden × K) as DynamicQuantizeLSTM reads it:
        codes (directions, K, 4·hidden), scales and zero points per gate row (directions, 4·hidden), or
        per direction without ``per_channel``."""
        value = use.node.inputs[index]
        key = (id(value), "lstm")
        if key not in self._cache:
            w = constant_tensor(value).numpy().astype(np.float32).transpose(0, 2, 1)
            axis = 1 if self.per_channel else None
            parts = [qz.quantize_tensor(m, self.weight_type, axis, True, self.reduce_range) for m in w]
            q, scale, zp = (np.stack([p[i] for p in parts]) for i in range(3))
            restored = np.stack([qz.dequantize(*p, axis) for p in parts])
            home, name = use.home, value.name
            self._cache[key] = (
                new_initializer(home, f"{name}_quantized", q),
                new_initializer(home, f"{name}_scale", scale.astype(np.float32)),
                new_initializer(home, f"{name}_zero_point", zp),
                qz.relative_error(w, restored),
            )
        return self._cache[key]

    def _integer_matmul(self, graph, x, weights, bias, name) -> list[ir.Node]:
        q, scale, zp, _ = weights
        if self.fmt == "ort":
            self.model.opset_imports.setdefault(MS_DOMAIN, 1)
            return [ir.node("DynamicQuantizeMatMul", [x, q, scale, zp, bias], domain=MS_DOMAIN, name=name)]
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_quantize_input")
        x_q, x_scale, x_zp = dql.outputs
        mmi = ir.node("MatMulInteger", [x_q, q, x_zp, zp], name=f"{name}_integer")
        cast = ir.node("Cast", [mmi.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
        combined = ir.node("Mul", [x_scale, scale], name=f"{name}_scale")
        nodes = [dql, mmi, cast, combined, ir.node("Mul", [cast.outputs[0], combined.outputs[0]], name=f"{name}_rescale")]
        if bias is not None:
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias], name=f"{name}_bias"))
        return nodes


def quantize_gather(use: WeightUse, cache: dict) -> float:
    """``Gather(table)`` -> ``Gather(int8 table) * Gather(row scales)``: one scale per table row,
    standard ONNX ops only, and the table stays int8 at run time."""
    node, graph = use.node, use.graph
    key = (id(use.value), "gather")
    if key not in cache:
        table = use.array().astype(np.float32)
        q, scale, zp = qz.quantize_tensor(table, "int8", 0, True)
        error = qz.relative_error(table, qz.dequantize(q, scale, zp, 0))
        name, home = use.value.name, use.home
        cache[key] = (
            new_initializer(home, f"{name}_quantized", q),
            new_initializer(home, f"{name}_row_scale", scale.reshape(-1, 1)),
            None,
            error,
        )
    q, scale, _, error = cache[key]
    old, ids = use.value, node.inputs[1]
    rows = ir.node("Gather", [q, ids], name=node.name)
    cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{node.name}_cast")
    row_scale = ir.node("Gather", [scale, ids], name=f"{node.name}_scale")
    scaled = ir.node("Mul", [cast.outputs[0], row_scale.outputs[0]], name=f"{node.name}_dequantize")
    output = node.outputs[0]
    scaled.outputs[0].shape, scaled.outputs[0].type = output.shape, output.type
    new_nodes = [rows, cast, row_scale, scaled]
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [output], [scaled.outputs[0]])
    drop_if_unused(old)
    return error


def matmul_parts(use: WeightUse, n: int) -> tuple[list[ir.Node], ir.Value | None, ir.Value | None] | str:
    """What replacing ``use``'s MatMul/Gemm by a fused ``x @ W + bias`` op involves.

    Returns (nodes to replace, constant (N,) bias value or None, value still to add afterwards or None),
    or the reason the node cannot be replaced. A MatMul's bias ``Add`` and a Gemm's ``C`` are folded.
    """
    node, graph = use.node, use.graph
    if node.op_type == "Gemm":
        if float(node.attributes.get_float("alpha", 1.0)) != 1.0:
            return "Gemm with alpha != 1"
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return [node], None, None
        c, beta = node.inputs[2], float(node.attributes.get_float("beta", 1.0))
        c_tensor = constant_tensor(c)
        if c_tensor is not None and c_tensor.size == n and c_tensor.dtype == ir.DataType.FLOAT:
            bias = beta * c_tensor.numpy().reshape(n).astype(np.float32)
            return [node], new_initializer(graph, f"{c.name}_bias", bias), None
        if beta == 1.0:
            return [node], None, c
        return "Gemm with a non-constant C and beta != 1"
    add = _single_bias_add(node, n)
    if add is None:
        return [node], None, None
    return [node, add], add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0], None


def replace_matmul(graph: ir.Graph, old_nodes: list[ir.Node], new_nodes: list[ir.Node], extra_add: ir.Value | None):
    """Put ``new_nodes`` (+ ``Add(extra_add)``) in place of ``old_nodes``; drop weights nothing uses."""
    first = old_nodes[0]
    if extra_add is not None:
        new_nodes.append(ir.node("Add", [new_nodes[-1].outputs[0], extra_add], name=f"{first.name}_add"))
    old_output, new_output = old_nodes[-1].outputs[0], new_nodes[-1].outputs[0]
    new_output.shape, new_output.type = old_output.shape, old_output.type
    old_inputs = [v for node in old_nodes for v in node.inputs if v is not None]
    ir.convenience.replace_nodes_and_values(graph, first, old_nodes, new_nodes, [old_output], [new_output])
    for value in old_inputs:
        if value.is_initializer() or (value.producer() is not None and value.producer().op_type == "Constant"):
            drop_if_unused(value)


def _single_bias_add(node: ir.Node, n: int) -> ir.Node | None:
    """The Add that adds a constant (N,) bias to ``node``'s output, if it is the output's only use."""
    output = node.outputs[0]
    uses = output.uses()
    if len(uses) != 1 or output.is_graph_output():
        return None
    add = uses[0][0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not node.graph:
        return None
    other = add.inputs[1 - uses[0][1]]
    tensor = constant_tensor(other)
    if tensor is None or tuple(tensor.shape) != (n,) or other.dtype != ir.DataType.FLOAT:
        return None
    return add


@register("quantize-dynamic", lossless=False)
class QuantizeDynamicPass(ir.passes.InPlacePass):
    """Int8 weights with activations quantized at run time; no calibration data needed. MatMul/Gemm,
    embeddings (Gather) and LSTM layers (onnxruntime's DynamicQuantizeLSTM).

    Args:
        per_channel: One scale per output column of each weight, per gate row of an LSTM (else one per
            tensor, per direction of an LSTM).
        weight_type: Integer type of the stored weights (int8 is what onnxruntime runs fastest).
        reduce_range: Quantize weights to 7 bits, which avoids u8*s8 saturation on x86 CPUs without
            VNNI. Default (None): on when this machine is such a CPU and weight_type is int8; set it
            explicitly when the model will run on other hardware.
        format: ``ort``: onnxruntime's DynamicQuantizeMatMul with the bias folded in; ``onnx``:
            standard DynamicQuantizeLinear, MatMulInteger, Cast and Mul nodes.
        embeddings: Also store Gather tables (embeddings) as int8 (always signed) with one scale per row, dequantized after
            the Gather.
        min_elements: Leave weights with fewer elements in float.
    """

    def __init__(
        self,
        per_channel: bool = True,
        weight_type: Literal["int8", "uint8"] = "int8",
        reduce_range: bool | None = None,
        format: Literal["ort", "onnx"] = "ort",
        embeddings: bool = True,
        min_elements: int = 1,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if weight_type not in ("int8", "uint8"):
            raise ValueError(f"weight_type must be int8 or uint8, got '{weight_type}'")
        if format not in ("ort", "onnx"):
            raise ValueError(f"format must be ort or onnx, got '{format}'")
        if min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {min_elements}")
        self.per_channel = per_channel
        self.weight_type = weight_type
        self.reduce_range = qz.resolve_reduce_range(reduce_range, "uint8", weight_type)
        self.format = format
        self.embeddings = embeddings
        self.min_elements = min_elements
        self.node_filter = node_filter
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        op_types = ("MatMul", "Gemm", *RECURRENT_OPS, *(("Gather",) if self.embeddings else ()))
        scan = scan_weights(model, op_types, self.node_filter, self.min_elements)
        notes: list[str] = []
        floats = [u for u in scan.uses if constant_tensor(u.value).dtype == ir.DataType.FLOAT]
        standard_ops = self.format == "onnx" or any(u.node.op_type == "Gather" for u in floats)
        if standard_ops and floats and qz.raise_opset(model, STANDARD_OPSET, "DynamicQuantizeLinear and int8 Gather", notes):
            scan = scan_weights(model, op_types, self.node_filter, self.min_elements)
        rewriter = DynamicRewriter(model, self.per_channel, self.weight_type, self.reduce_range, self.format)
        errors, skipped = {}, dict(scan.skipped)
        for use in scan.uses:
            if constant_tensor(use.value).dtype != ir.DataType.FLOAT:
                skipped[use.label] = f"weight dtype {constant_tensor(use.value).dtype} (only float32 is quantized)"
                continue
            label = use.label
            result = rewriter.rewrite(use)
            if isinstance(result, str):
                skipped[label] = result
            else:
                errors[label] = round(result, 5)
        self.details = {
            "quantized": len(errors),
            "weight_relative_error": errors,
            "max_weight_relative_error": max(errors.values(), default=0.0),
            "reduce_range": self.reduce_range,
            "skipped": skipped,
            "notes": notes,
        }
        name_uniquely(model)
        return ir.passes.PassResult(model, bool(errors) or bool(notes))

