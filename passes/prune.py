"""``prune``: unstructured (or N:M) pruning of MatMul/Gemm/Conv weights.

Importance is |W| (magnitude), |W|·‖X_k‖ from calibration data (``method=wanda``), or that per unit of
the sparse kernel's work (``method=activity``: SparseMatMul's row walk skips zero inputs, so a weight whose
input is rarely nonzero costs little to keep). The target sparsity
applies per layer, per output column, or with one global threshold over all layers. A pruned weight is
written as an ONNX ``sparse_initializer`` (the file shrinks); a MatMul/Gemm (Conv) whose sparsity reaches
the kernel break-even ``min_sparse_ratio`` becomes an ``ai.onnxopt`` ``SparseMatMul`` (``SparseConv``) node,
which takes over a Relu that alone consumes its output (``activation="relu"``) and, for a SparseConv, a MaxPool
(``maxpool_kernel_shape``: onnxruntime would surround its own MaxPool with NCHWc reorders). With ``recover=true`` the
surviving weights are re-fitted layer by layer against the unpruned model.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io, ops
from onnxopt.activations import input_grams
from onnxopt.calibration import Dataset
from onnxopt.compression import (
    absorb_maxpool,
    absorb_relu,
    conv_geometry,
    custom_op_blocker,
    global_keep_masks,
    group_by_weight,
    importance,
    keep_mask,
    lower_to_custom_op,
    mark_sparse_storage,
    nm_mask,
    replace_weight,
    sparsity,
)
from onnxopt.filters import NodeFilter
from onnxopt.passes.recover import recover_layers, require_data
from onnxopt.registry import register
from onnxopt.weights import WeightUse, name_layers, name_uniquely, other_readers, scan_weights

# Sparsity from which SparseMatMul beats dense fp32 MatMul, by dense weight size (measured with
# /work/main kernels, 1 thread, interleaved medians): a weight streamed from DRAM (4096x4096, 64 MiB)
# breaks even at 55-65 %; a cache-resident one is read by dense GEMV at cache speed while the sparse
# kernel stays gather-bound: MNIST fc1 (1568x512, 3 MiB, batch 1) 0.84x at 80 %, 1.5x at 90 %; MiniLM
# 384x1536 at batch 1 0.80x / 1.38x; at 128 rows 0.75-1.4x at 80 %. Under 64 KiB (e.g. the CNN's
# 512x10 classifier) the sparse op never won (0.96x at 95 %): call overhead dominates.
CACHE_RESIDENT_BYTES = 16 << 20  # effective L3 of the reference machine (reads over 16 MiB hit DRAM)
TINY_BYTES = 64 << 10
BREAK_EVEN_DRAM = 0.6
BREAK_EVEN_CACHED = 0.85
# SparseConv (direct sparse convolution, batch 1, 1 thread; AVX2 Zen 3, session 5) vs onnxruntime's Conv
# alone, same run: 16->32 3x3 on 14x14 0.88x at 50 %, 1.1-1.2x at 70 %, 1.4-1.6x at 90 %; 32->64 on 14x14
# 0.89x / 1.04x / 1.30x at 60 / 70 / 80 %; 64->64 on 28x28 0.82x / 1.04x / 1.73x; 128->128 on 14x14
# 1.06x / 1.22x / 1.65x. Inside a model a SparseConv also costs what onnxruntime's Conv fuses or hides:
# the NCHWc layout around it needs reorders (~3-5 us at batch 1); its Relu and MaxPool now fold into it
# (session 14). MNIST conv2 (18 KiB) alone pruned, over 64 images (session 16, Zen 3): dense Conv 107-116 us
# end to end; SparseConv at 70 % 106-119, at 80 % 4-7 % faster in 6 of 6 trials, at 90 % 95-106. Small convs
# therefore wait for 80 %; 1-input-channel convs (under 8 KiB) stay dense.
BREAK_EVEN_CONV = 0.75
BREAK_EVEN_SMALL_CONV = 0.8
SMALL_CONV_BYTES = 64 << 10
TINY_CONV_BYTES = 8 << 10


def sparse_break_even(k: int, n: int, conv: bool = False) -> float:
    """Sparsity from which a (K, N) float32 layer runs faster as SparseMatMul, or SparseConv for a
    Conv's GEMM view (above 1: never)."""
    dense_bytes = 4 * k * n
    if conv:
        if dense_bytes < TINY_CONV_BYTES:
            return float("inf")
        return BREAK_EVEN_SMALL_CONV if dense_bytes < SMALL_CONV_BYTES else BREAK_EVEN_CONV
    if dense_bytes < TINY_BYTES:
        return float("inf")
    return BREAK_EVEN_CACHED if dense_bytes <= CACHE_RESIDENT_BYTES else BREAK_EVEN_DRAM


@register("prune", lossless=False)
class PrunePass(ir.passes.InPlacePass):
    """Prune MatMul/Gemm/Conv weights to a target sparsity (magnitude, Wanda, activity or N:M).

    Args:
        sparsity: Fraction of weights set to zero (ignored when ``pattern`` is given).
        method: ``magnitude`` ranks by |W|; ``wanda`` by |W|·‖X_k‖ over calibration data; ``activity``
            by |W|·‖X_k‖ / r_k, r_k the fraction of calibration rows with x_k nonzero, for MatMul/Gemm
            layers after a Relu (Conv layers: Wanda, as SparseConv visits every input). MNIST fc1 at
            90.5 %, against magnitude: 16 % fewer weights walked per image, 7-10 % faster end to end,
            recovered layer error 0.036 -> 0.013 (``models/recipes/cnn_mnist_sparse90.toml``). Use
            it with ``recover``: unrefitted, that model's accuracy is 0.24 (magnitude's 0.67).
        scope: ``layer`` prunes each layer to ``sparsity``; ``column`` each output column (Wanda's
            grouping); ``global`` uses one threshold over all selected layers.
        pattern: N:M structured sparsity such as ``2:4`` (keep N of every M consecutive input weights).
            With M a multiple of 32 (e.g. ``3:32``, 90.6 %) SparseMatMul's batch-1 kernel has no padding
            (MNIST fc1: 2.0x the fp32 model end to end, against 1.65x for unstructured 90 %).
        op_types: Layer op types pruned (Conv through its GEMM view).
        min_elements: Layers with fewer weights are left alone.
        min_sparse_ratio: Layer sparsity from which a MatMul/Gemm becomes a SparseMatMul node (a Conv
            a SparseConv); below it the dense op stays, with a sparse initializer. Default: the
            kernel's measured break-even for the weight's size (MatMul: 0.6 when the dense weight
            exceeds the cache, 0.85 when it fits, never under 64 KiB; Conv: 0.75, 0.8 under 64 KiB,
            never under 8 KiB).
        sparse_op: Emit SparseMatMul/SparseConv nodes at all (off: standard ONNX only, sparse initializers).
        value_dtype: Storage of the sparse ops' nonzero values.
        recover: Re-fit the surviving weights layer by layer to the unpruned model's layer outputs.
        samples: Calibration samples for ``wanda`` and ``recover``.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        method: Literal["magnitude", "wanda", "activity"] = "magnitude",
        scope: Literal["layer", "column", "global"] = "layer",
        pattern: str | None = None,
        op_types: list[str] = ["MatMul", "Gemm", "Conv"],  # noqa: B006 - read only
        min_elements: int = 256,
        min_sparse_ratio: float | None = None,
        sparse_op: bool = True,
        value_dtype: Literal["float32", "float16", "int8"] = "float32",
        recover: bool = False,
        samples: int = 128,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.nm = None
        if pattern is not None:
            match = re.fullmatch(r"(\d+):(\d+)", pattern)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"pattern must be N:M with 0 < N < M, such as 2:4 (got {pattern!r})")
            self.nm = (int(match[1]), int(match[2]))
        unknown = set(op_types) - {"MatMul", "Gemm", "Conv"}
        if unknown:
            raise ValueError(f"op_types may only hold MatMul, Gemm and Conv (got {sorted(unknown)})")
        if (min_sparse_ratio is not None and not 0.0 <= min_sparse_ratio <= 1.0) or samples < 1:
            raise ValueError("min_sparse_ratio must be in [0, 1] and samples >= 1")
        self.sparsity = sparsity
        self.method = method
        self.scope = scope
        self.op_types = tuple(op_types)
        self.min_elements = min_elements
        self.min_sparse_ratio = min_sparse_ratio
        self.sparse_op = sparse_op
        self.value_dtype = value_dtype
        self.recover = recover
        self.samples = samples
        self.data = data
        self.node_filter = node_filter
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scan = scan_weights(model, self.op_types, self.node_filter, self.min_elements)
        if self.method != "magnitude" or self.recover:
            require_data(self.data, f"prune with method={self.method} or recover=true")
        name_layers(scan.uses)
        original = io.clone(model) if self.recover else None
        grams = input_grams(model, scan.uses, self.data, self.samples) if self.method != "magnitude" else {}
        groups, layers = [], {}
        for group in group_by_weight(scan.uses):
            others = other_readers(group[0], [use.node for use in group])
            if others:
                layers.update({use.label: f"kept (weight also read by {others[0]})" for use in group})
            else:
                groups.append(group)
        uses = [use for group in groups for use in group]
        scores = [sum(self._importance(use, grams) for use in group) for group in groups]
        global_masks = global_keep_masks(scores, self.sparsity) if self.scope == "global" and not self.nm else None
        for index, (group, score) in enumerate(zip(groups, scores)):
            if self.nm:
                mask = nm_mask(score, *self.nm)
            elif global_masks is not None:
                mask = global_masks[index]
            else:
                mask = keep_mask(score, self.sparsity, per_column=self.scope == "column")
            pruned = group[0].matrix() * mask
            new = replace_weight(group, group[0].from_matrix(pruned), "pruned")
            stored = "sparse_initializer" if mark_sparse_storage(new) else "dense initializer"
            for use in group:
                note = "" if self.method == "magnitude" or use.activation.name in grams else " (magnitude: not observable)"
                layers[use.label] = f"sparsity {sparsity(pruned):.3f}{note}, {stored}"
        if self.recover:
            self.details["recover"] = recover_layers(original, model, self.data, {u.node.name for u in uses}, self.samples)
        lowered = self._lower(model, uses) if self.sparse_op else {}
        for label, how in lowered.items():
            layers[label] += f", {how}"
        self.details.update(layers=layers, skipped=dict(scan.skipped))
        name_uniquely(model)  # a subgraph's new initializers may reuse an outer graph's names
        return ir.passes.PassResult(model, bool(uses))

    def _importance(self, use: WeightUse, grams: dict) -> np.ndarray:
        gram = grams.get(use.activation.name) if use.activation is not None else None
        if gram is None:
            return importance(use.matrix())
        rates = gram.nonzero_rates if self.method == "activity" and use.node.op_type != "Conv" else None
        return importance(use.matrix(), gram.column_norms, rates)

    def _lower(self, model: ir.Model, uses: list[WeightUse]) -> dict[str, str]:
        """SparseMatMul for layers at or above the break-even; why not for the others."""
        outcome = {}
        for use in uses:
            matrix = use.matrix()
            break_even = self.min_sparse_ratio
            if break_even is None:
                break_even = sparse_break_even(*matrix.shape, conv=use.node.op_type == "Conv")
            if sparsity(matrix) < break_even:
                outcome[use.label] = "dense (below break-even)"
                continue
            blocker = custom_op_blocker(use)
            if blocker:
                outcome[use.label] = f"dense ({blocker})"
                continue
            label = use.label
            if use.node.op_type == "Conv":
                shape, geometry = use.array().shape, conv_geometry(use.node)
                node = lower_to_custom_op(model, use, lambda w, s=shape, g=geometry: ops.pack_sparse_conv(
                    w.T.reshape(s), *g, value_dtype=self.value_dtype))
            else:
                node = lower_to_custom_op(model, use, lambda w: ops.pack_sparse_matmul(w, self.value_dtype))
            relu = absorb_relu(node)
            pool = absorb_maxpool(node)
            relu = relu or (pool and absorb_relu(node))  # MaxPool then Relu: the two commute
            outcome[label] = node.op_type + (" + Relu" if relu else "") + (" + MaxPool" if pool else "")
        return outcome
