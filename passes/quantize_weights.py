"""``quantize-weights``: INT4/INT8 block-wise weight-only quantization (RTN or GPTQ).

Weights of MatMul/Gemm (as the ``(K, N)`` matrix of ``y = x @ W``) are quantized in blocks along K;
Gather tables (embeddings, tied lm-head tensors included) in blocks along the hidden axis. Formats:

* ``onnx``: standard ``DequantizeLinear`` with ``block_size`` (opset 21; the model's default opset
  is converted when lower). Portable; onnxruntime dequantizes the weight at run time.
* ``ort``: onnxruntime's ``MatMulNBits`` (bias Add folded in) and ``GatherBlockQuantized``.
* ``onnxopt``: onnxopt's ``QuantMatMul`` kernel (embeddings use ``GatherBlockQuantized``).

float16 and bfloat16 weights (a model exported or converted to half precision) are quantized too, their
scales stored in the weight's type (the ``onnxopt`` format takes float32 only).

``algorithm=gptq`` compensates rounding errors with the Hessian ``XᵀX`` of each layer's inputs on the
calibration data (main-graph layers; layers inside subgraphs and Gather tables use RTN), all taken
from the float model in one pass. ``sequential=true`` goes front to back instead: the layers of one
depth (no path between them, e.g. Q/K/V) get their Hessians from the model whose earlier layers
already hold their quantized weights, one pass over the data per depth (MiniLM-L6: 24 passes, ~6x
the time of one-pass GPTQ for no measurable WordSim gain, hence not the default).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import ops
from onnxopt import quantization as qz
from onnxopt.activations import input_grams
from onnxopt.calibration import Dataset
from onnxopt.errors import DataError
from onnxopt.filters import NodeFilter
from onnxopt.passes.quantize_dynamic import MS_DOMAIN, matmul_parts, replace_matmul
from onnxopt.registry import register
from onnxopt.weights import WeightUse, constant_tensor, drop_if_unused, name_uniquely, new_initializer, scan_weights

BLOCKED_DQ_OPSET = 21
INT4_TYPES = {True: ir.DataType.INT4, False: ir.DataType.UINT4}
WEIGHT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
"""Weights quantized; scales are stored in the weight's type (what MatMulNBits/DequantizeLinear then output)."""



def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Like :func:`new_initializer`, storing ``array`` as ``dtype`` (int4/uint4) when given."""
    if dtype is None:
        return new_initializer(graph, name, array)
    value = new_initializer(graph, name, np.zeros((), np.uint8))  # reserve a unique name
    tensor = ir.Tensor(array, dtype=dtype, name=value.name)
    value.const_value, value.shape, value.type = tensor, ir.Shape(array.shape), ir.TensorType(dtype)
    return value


@register("quantize-weights", lossless=False)
class QuantizeWeightsPass(ir.passes.InPlacePass):
    """INT4/INT8 block-wise weight-only quantization of MatMul/Gemm weights and embeddings.

    Args:
        bits: 4 or 8.
        block_size: Rows of K sharing one scale (16, 32, 64, 128 or 256; onnxopt format: 32, 64, 128).
        symmetric: Symmetric blocks (no zero points); else asymmetric with a zero point per block.
        algorithm: ``rtn`` (round to nearest) or ``gptq`` (Hessian-based error compensation, needs data).
        sequential: GPTQ layer by layer, each Hessian taken with the earlier layers quantized (one pass
            over the data per depth of layers); else every Hessian from the float model (one pass).
        format: ``onnx`` (DequantizeLinear with block_size, opset 21), ``ort`` (MatMulNBits and
            GatherBlockQuantized) or ``onnxopt`` (onnxopt's QuantMatMul kernel).
        embeddings: Also quantize Gather tables (word embeddings, tied lm-head weights).
        accuracy_level: MatMulNBits accuracy_level (4: int8 activations, fastest on CPU; 0: float).
        scale_dtype: Scales of the onnxopt format: ``float16`` (default; per block the fp16 neighbour
            with the least weight error — 1 MB less to stream per 4096² int4 weight) or ``float32``.
        damping: GPTQ Hessian damping, as a fraction of its mean diagonal.
        calibration_samples: Samples of the data used for GPTQ's Hessians.
        min_elements: Leave weights with fewer elements in float.
    """

    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = True,
        algorithm: Literal["rtn", "gptq"] = "rtn",
        sequential: bool = False,
        format: Literal["onnx", "ort", "onnxopt"] = "ort",
        embeddings: bool = True,
        accuracy_level: int = 4,
        scale_dtype: Literal["float16", "float32"] = "float16",
        damping: float = 0.01,
        calibration_samples: int = 128,
        min_elements: int = 1,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        qz.check_block_options(bits, block_size)
        if algorithm not in ("rtn", "gptq"):
            raise ValueError(f"algorithm must be rtn or gptq, got '{algorithm}'")
        if format not in ("onnx", "ort", "onnxopt"):
            raise ValueError(f"format must be onnx, ort or onnxopt, got '{format}'")
        if format == "onnxopt" and block_size not in (32, 64, 128):
            raise ValueError(f"format onnxopt needs block_size 32, 64 or 128, got {block_size}")
        if scale_dtype not in ("float16", "float32"):
            raise ValueError(f"scale_dtype must be float16 or float32, got '{scale_dtype}'")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
        if not 0 <= damping < 1:
            raise ValueError(f"damping must be in [0, 1), got {damping}")
        if calibration_samples < 1 or min_elements < 1:
            raise ValueError("calibration_samples and min_elements must be >= 1")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.algorithm, self.format, self.embeddings = algorithm, format, embeddings
        self.sequential = sequential
        self.accuracy_level, self.damping, self.scale_dtype = accuracy_level, damping, scale_dtype
        self.calibration_samples, self.min_elements = calibration_samples, min_elements
        self.data, self.node_filter = data, node_filter
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        op_types = ("MatMul", "Gemm", "Gather") if self.embeddings else ("MatMul", "Gemm")
        scan = scan_weights(model, op_types, self.node_filter, self.min_elements)
        skipped = dict(scan.skipped)
        uses = []
        accepted = (ir.DataType.FLOAT,) if self.format == "onnxopt" else WEIGHT_TYPES
        for use in scan.uses:
            dtype = constant_tensor(use.value).dtype
            if dtype not in accepted:
                kinds = "float32" if self.format == "onnxopt" else "float32, float16 and bfloat16"
                skipped[use.label] = f"weight dtype {dtype} (format {self.format} quantizes {kinds} weights)"
            else:
                uses.append(use)
        notes: list[str] = []
        if self.format == "onnx" and uses and qz.raise_opset(model, BLOCKED_DQ_OPSET, "blocked DequantizeLinear", notes):
            uses = scan_weights(model, op_types, self.node_filter, self.min_elements).uses
            uses = [u for u in uses if constant_tensor(u.value).dtype in accepted]
        weight_error, output_error = {}, {}
        stored = self._quantize_all(model, uses, output_error, notes)
        for use in uses:
            label, entry = use.label, stored[_key(use)]
            reason = self._rewrite(model, use, entry)
            if reason:
                skipped[label] = reason
            else:
                weight_error[label] = round(entry.error, 5)
        self.details = {
            "quantized": len(weight_error),
            "algorithm": self.algorithm,
            "weight_relative_error": weight_error,
            "max_weight_relative_error": max(weight_error.values(), default=0.0),
            "skipped": skipped,
            "notes": notes,
        }
        if output_error:
            self.details["layer_output_relative_error"] = output_error
        name_uniquely(model)
        return ir.passes.PassResult(model, bool(weight_error))

    def _quantize_all(self, model: ir.Model, uses: list[WeightUse], output_error: dict, notes: list) -> dict:
        """Block quantization of every weight (once per tensor and orientation), keyed by :func:`_key`."""
        stored: dict[tuple, _Stored] = {}
        observed = [u for u in uses if u.activation is not None and u.graph is model.graph]
        if self.algorithm == "rtn":
            observed = []
        elif self.data is None:
            raise DataError("quantize-weights with algorithm=gptq needs calibration data (--data)")
        else:
            notes += [f"{u.label}: inside a subgraph, RTN instead of GPTQ" for u in uses
                      if u.activation is not None and u not in observed]  # fmt: skip
            if any(u.activation is None for u in uses):
                notes.append("Gather tables use RTN (lookups have no input Hessian)")
        for use in uses:  # RTN first: a table tied to a GPTQ layer is quantized from its own values
            if use not in observed:
                self._store(use, None, stored, {})
        groups = _layers_by_depth(model.graph, observed) if self.sequential else [observed]
        originals: dict[ir.Value, ir.TensorProtocol] = {}
        try:
            for group in filter(None, groups):
                grams = input_grams(model, group, self.data, limit=self.calibration_samples)
                factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                for use in group:
                    entry = self._store(use, grams[use.activation.name], stored, factors)
                    if entry is not None and entry.layer_error is not None:
                        output_error[use.label] = entry.layer_error
                    if self.sequential and entry is not None and use.value.is_initializer():
                        # later layers see this layer's quantized weight (restored below)
                        originals.setdefault(use.value, use.value.const_value)
                        quantized = use.from_matrix(entry.blocks.dequantize())
                        use.value.const_value = ir.Tensor(quantized, name=use.value.name)
        finally:
            for value, tensor in originals.items():
                value.const_value = tensor
        if len(groups) > 1:
            notes.append(f"sequential GPTQ: {len(groups)} passes over the data (one per depth of layers)")
        return stored

    def _store(self, use: WeightUse, gram, stored: dict, factors: dict) -> _Stored | None:
        """Quantize ``use``'s weight into ``stored`` unless already there; returns the new entry."""
        key = _key(use)
        if key in stored:
            return None
        # Gather tables are blocked along the hidden axis: quantize the transposed table.
        w = use.array().astype(np.float32).T if use.node.op_type == "Gather" else use.matrix()
        if gram is None:
            blocks = qz.quantize_blocks(w, self.bits, self.block_size, self.symmetric)
        else:
            name = use.activation.name  # layers reading the same input share one factorization
            if name not in factors:
                factors[name] = qz.inverse_hessian_factor(gram.hessian(self.damping))
            blocks = qz.gptq_quantize(w, factors[name], self.bits, self.block_size, self.symmetric)
        dtype = constant_tensor(use.value).dtype.numpy()  # half-precision weights keep half-precision scales: round them now
        blocks = dataclasses.replace(blocks, scales=blocks.scales.astype(dtype).astype(np.float32))
        entry = _Stored(blocks, qz.relative_error(w, blocks.dequantize()), dtype)
        if gram is not None:
            rtn = qz.quantize_blocks(w, self.bits, self.block_size, self.symmetric).dequantize()
            entry.layer_error = {
                "gptq": round(_output_error(w, blocks.dequantize(), gram.xtx), 5),
                "rtn": round(_output_error(w, rtn, gram.xtx), 5),
            }
        stored[key] = entry
        return entry

    def _rewrite(self, model, use: WeightUse, stored: _Stored) -> str | None:
        if use.node.op_type == "Gather":
            return self._replace_gather(model, use, stored)
        return self._replace_matmul(model, use, stored)

    def _replace_matmul(self, model: ir.Model, use: WeightUse, stored: _Stored) -> str | None:
        node, graph, blocks = use.node, use.graph, stored.blocks
        if self.format == "onnx":
            if stored.values is None:
                transposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
                dq = self._blocked_dequantize(graph, use.value.name, blocks, transposed, stored.dtype)
                graph.insert_before(node, dq)
                stored.values = dq.outputs
            old = use.value
            node.replace_input_with(use.index, stored.values[0])
            drop_if_unused(old)
            return None
        k, n = blocks.codes.shape
        parts = matmul_parts(use, n)
        if isinstance(parts, str):
            return parts
        old_nodes, bias, extra_add = parts
        name = node.name or use.value.name
        if self.format == "ort":
            if stored.values is None:
                stored.values = self._matmul_nbits_inputs(graph, blocks, use.value.name, stored.dtype)
            attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size,
                     "accuracy_level": self.accuracy_level}  # fmt: skip
            inputs = [node.inputs[0], *stored.values, *([None, bias] if bias is not None else [])]
            new_node = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{name}_nbits")
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        else:
            packed = ops.pack_quant_matmul(blocks.dequantize(), self.bits, self.block_size, self.symmetric, self.scale_dtype)
            if self.scale_dtype == "float16":  # fp16 scales can move codes: report what the kernel multiplies by
                stored.error = qz.relative_error(use.matrix(), ops.dense_weight(packed))
            new_node, initializers = ops.make_node(packed, node.inputs[0], bias, name=f"{name}_quant")
            for value in initializers:
                graph.register_initializer(value)
            model.opset_imports.setdefault(ops.DOMAIN, ops.OPSET_VERSION)
        replace_matmul(graph, old_nodes, [new_node], extra_add)
        return None

    def _blocked_dequantize(self, graph, name, blocks: qz.BlockQuantized, transposed: bool, dtype: np.dtype) -> ir.Node:
        codes, scales, zps = blocks.codes, blocks.scales, blocks.zero_points
        axis = 0
        if transposed:
            codes, scales = codes.T, scales.T
            zps = None if zps is None else zps.T
            axis = 1
        int_type = INT4_TYPES[blocks.symmetric] if self.bits == 4 else None
        inputs = [
            _initializer(graph, f"{name}_q{self.bits}", np.ascontiguousarray(codes), int_type),
            new_initializer(graph, f"{name}_scale", np.ascontiguousarray(scales, dtype=dtype)),
        ]
        if zps is not None:
            inputs.append(_initializer(graph, f"{name}_zero_point", np.ascontiguousarray(zps), int_type))
        return ir.node(
            "DequantizeLinear", inputs, {"axis": axis, "block_size": self.block_size}, name=f"{name}_dequantize"
        )

    def _matmul_nbits_inputs(self, graph, blocks: qz.BlockQuantized, name: str, dtype: np.dtype) -> list[ir.Value | None]:
        """MatMulNBits' B (N, blocks, block bytes), scales (N * blocks) and packed zero points (or None)."""
        k, n = blocks.codes.shape
        nb = blocks.scales.shape[0]
        padded = np.zeros((nb * self.block_size, n), np.uint8)
        padded[:k] = blocks.unsigned_codes()
        per_column = padded.T.reshape(n, nb, self.block_size)
        packed = qz.pack_nibbles(per_column) if self.bits == 4 else per_column
        values = [
            new_initializer(graph, f"{name}_B", np.ascontiguousarray(packed)),
            new_initializer(graph, f"{name}_scales", np.ascontiguousarray(blocks.scales.T, dtype=dtype).reshape(-1)),
            None,
        ]
        if blocks.zero_points is not None:
            zps = blocks.zero_points.T
            zps = qz.pack_nibbles(zps) if self.bits == 4 else zps
            values[2] = new_initializer(graph, f"{name}_zero_points", np.ascontiguousarray(zps).reshape(-1))
        return values

    def _replace_gather(self, model: ir.Model, use: WeightUse, stored: _Stored) -> str | None:
        node, graph, blocks = use.node, use.graph, stored.blocks
        table = use.value
        if self.format == "onnx":
            if stored.values is None:
                dq = self._blocked_dequantize(graph, table.name, blocks, True, stored.dtype)
                graph.insert_before(node, dq)
                stored.values = dq.outputs
            node.replace_input_with(0, stored.values[0])
            drop_if_unused(table)
            return None
        hidden = use.array().shape[1]
        if self.bits == 4 and hidden % 2:
            return f"kept: GatherBlockQuantized packs two 4-bit codes per byte, rows of {hidden} would come out {hidden + 1} long"
        if stored.values is None:
            codes = blocks.unsigned_codes().T  # (rows, hidden)
            data = qz.pack_nibbles(codes) if self.bits == 4 else codes
            stored.values = [
                new_initializer(graph, f"{table.name}_q{self.bits}", np.ascontiguousarray(data)),
                new_initializer(graph, f"{table.name}_scales", np.ascontiguousarray(blocks.scales.T, dtype=stored.dtype)),
                new_initializer(graph, f"{table.name}_zero_points", self._gather_zero_points(blocks)),
            ]
        data, scales, zero_points = stored.values
        inputs = [data, node.inputs[1], scales, zero_points]
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block_size, "bits": self.bits}
        gather = ir.node("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN, name=f"{node.name}_quantized")
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        output = node.outputs[0]
        gather.outputs[0].shape, gather.outputs[0].type = output.shape, output.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gather], [output], [gather.outputs[0]])
        drop_if_unused(table)
        return None

    def _gather_zero_points(self, blocks: qz.BlockQuantized) -> np.ndarray:
        zps = blocks.unsigned_zero_points().T  # (rows, blocks)
        return np.ascontiguousarray(qz.pack_nibbles(zps) if self.bits == 4 else zps)


@dataclasses.dataclass
class _Stored:
    """A weight's quantization and, once written, the values that hold it in the graph."""

    blocks: qz.BlockQuantized
    error: float
    dtype: np.dtype  # the weight's, which its scales keep
    layer_error: dict | None = None  # GPTQ vs RTN output error on the layer's calibration inputs
    values: list | None = None


def _key(use: WeightUse) -> tuple:
    """One quantization (and one stored copy) per tensor, orientation and graph: shared weights stay shared."""
    return id(use.value), f"{use.node.op_type}{use.node.attributes.get_int('transB', 0)}", id(use.graph)


def _layers_by_depth(graph: ir.Graph, uses: list[WeightUse]) -> list[list[WeightUse]]:
    """``uses`` grouped by the number of listed layers on the longest path before them, in order.

    No layer depends on another of its group, so a group can be quantized from one pass over the data.
    """
    layers: dict[ir.Node, list[WeightUse]] = {}
    for use in uses:
        layers.setdefault(use.node, []).append(use)
    reach: dict[ir.Value, int] = {}
    groups: dict[int, list[WeightUse]] = {}
    for node in graph:  # topological order
        depth = max((reach.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in layers:
            groups.setdefault(depth, []).extend(layers[node])
            depth += 1
        for value in node.outputs:
            reach[value] = depth
    return [groups[d] for d in sorted(groups)]


def _output_error(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    """``‖X(W - Ŵ)‖_F / ‖XW‖_F`` from the Gram matrix ``XᵀX`` (no activations kept)."""
    diff = (w - w_hat).astype(np.float64)
    num = float(np.sum(diff * (xtx @ diff)))
    den = float(np.sum(w * (xtx @ w)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
