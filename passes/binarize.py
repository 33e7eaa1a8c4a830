"""``binarize``: 1-bit weights for chosen MatMul/Gemm layers.

``mode=weights`` (BinaryConnect) emits ``BinaryMatMul``: ``Y = X · (α ⊙ sign(W))`` with float
activations; ``mode=xnor`` (XNOR-Net) emits ``XnorMatMul``, which also binarizes the activations per row.
α per output column = mean|W|. The first and last layers (in graph order) are kept by default, as
in the literature: they are small and the most sensitive. ``recover=true`` re-fits α and the bias
of every binarized layer, front to back, to the original layer outputs (the model is run with
onnxopt's kernel library).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io, ops
from onnxopt.calibration import Dataset
from onnxopt.compression import custom_op_blocker, lower_to_custom_op
from onnxopt.filters import NodeFilter
from onnxopt.passes.recover import recover_layers, require_data
from onnxopt.registry import register
from onnxopt.weights import edge_layers, name_layers, name_uniquely, scan_weights

PACKERS = {"weights": ops.pack_binary_matmul, "xnor": ops.pack_xnor_matmul}


@register("binarize", lossless=False)
class BinarizePass(ir.passes.InPlacePass):
    """Binarize MatMul/Gemm weights (BinaryMatMul) or weights and activations (XnorMatMul).

    Args:
        mode: ``weights`` binarizes weights only; ``xnor`` also binarizes activations (sign, scale β).
        keep_first_last: Leave the first and the last MatMul/Gemm of the main graph in full precision.
        min_elements: Layers with fewer weights are left alone.
        recover: Re-fit α and the bias of each binarized layer to the original model's layer outputs.
        samples: Calibration samples for ``recover``.
    """

    def __init__(
        self,
        mode: Literal["weights", "xnor"] = "weights",
        keep_first_last: bool = True,
        min_elements: int = 256,
        recover: bool = False,
        samples: int = 128,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if samples < 1:
            raise ValueError("samples must be >= 1")
        self.mode = mode
        self.keep_first_last = keep_first_last
        self.min_elements = min_elements
        self.recover = recover
        self.samples = samples
        self.data = data
        self.node_filter = node_filter
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.recover:
            require_data(self.data, "binarize with recover=true")
        edges = edge_layers(model, ("MatMul", "Gemm")) if self.keep_first_last else set()
        scan = scan_weights(model, ("MatMul", "Gemm"), self.node_filter, self.min_elements)
        name_layers(scan.uses)
        original = io.clone(model) if self.recover else None
        layers, binarized = dict(scan.skipped), set()
        for use in scan.uses:
            label = use.label
            if id(use.node) in edges:
                layers[label] = "kept (first or last layer)"
                continue
            blocker = custom_op_blocker(use)
            if blocker:
                layers[label] = f"kept ({blocker})"
                continue
            w = use.matrix()
            weight_error = np.linalg.norm(w - ops.dense_weight(PACKERS[self.mode](w))) / max(np.linalg.norm(w), 1e-30)
            node = lower_to_custom_op(model, use, PACKERS[self.mode])
            binarized.add(node.name)
            layers[label] = f"{node.op_type}, relative weight error {weight_error:.3f}"
        if self.recover and binarized:
            self.details["recover"] = recover_layers(original, model, self.data, binarized, self.samples)
        self.details["layers"] = layers
        name_uniquely(model)  # a subgraph's new initializers may reuse an outer graph's names
        return ir.passes.PassResult(model, bool(binarized))
