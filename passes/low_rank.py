"""``low-rank``: replace a MatMul/Gemm weight W (K×N) by two factors U (K×r) · V (r×N).

The layer ``y = x W`` becomes ``h = x @ U`` (a MatMul named ``<layer>.lowrank_u``) followed by the
original node multiplying by V (Gemm keeps its bias, alpha and beta). The rank comes from ``rank``,
``ratio`` (fraction of the layer's parameters kept) or ``energy`` (fraction of the squared singular
values kept). ``activation_aware`` whitens W with the Cholesky factor L of the calibration inputs'
covariance before the SVD (minimizing ``‖X(W − UV)‖`` instead of ``‖W − UV‖``). Layers where
``r(K+N) >= KN`` are left alone (``n·r(K+N) >= KN`` for a weight n layers share, each with its own factors),
and so are weights that a layer the pass does not factor reads too (the file would keep both).

With ``conv_split=spatial``, a 2-D Conv W (C_out, C_in, kh, kw) is split as in Jaderberg et al. 2014
(scheme 2): the truncated SVD of its (C_in·kh, C_out·kw) view gives a vertical kh×1 Conv C_in → r
(``<layer>.lowrank_u``: the H stride, pads and dilation) followed by the layer itself as a horizontal
1×kw Conv r → C_out (the W stride, pads and dilation, and the bias); the same rank rules apply with
K = C_in·kh and N = C_out·kw. Activation-aware Conv splits whiten with the covariance of the vertical
kh×1 patches (the diagonal blocks of the full patches' covariance, averaged over the kw columns).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.activations import input_grams
from onnxopt.calibration import Dataset
from onnxopt.compression import conv_geometry, factorize, whitening
from onnxopt.filters import NodeFilter
from onnxopt.passes.recover import LOW_RANK_SUFFIX, recover_layers, require_data
from onnxopt.registry import register
from onnxopt.weights import (
    WeightUse,
    drop_if_unused,
    edge_layers,
    name_layers,
    name_uniquely,
    new_initializer,
    other_readers,
    scan_weights,
    unique_name,
    value_names,
)


@register("low-rank", lossless=False)
class LowRankPass(ir.passes.InPlacePass):
    """Factorize MatMul/Gemm weights by truncated SVD (optionally activation-aware).

    Args:
        rank: Fixed rank r for every layer (overrides ``ratio`` and ``energy``).
        ratio: Fraction of each layer's K·N parameters kept: r = floor(ratio·K·N / (K+N)), divided among
            the layers sharing a weight; with ``allocation=global``, the fraction of all selected weights'
            parameters kept.
        allocation: ``uniform`` gives every layer the ``ratio``; ``global`` distributes the ratio's
            parameter budget across layers by relative error reduction per parameter.
        energy: Keep the smallest rank whose singular values hold this fraction of the squared sum.
        activation_aware: Whiten by the Cholesky factor of the calibration inputs' covariance.
        min_elements: Layers with fewer weights are left alone.
        conv_split: ``spatial`` also splits 2-D Convs (group 1, auto_pad NOTSET) into a vertical kh×1
            and a horizontal 1×kw Conv; ``none`` leaves Convs alone.
        keep_first_last: Leave the first and the last MatMul/Gemm/Conv of the main graph whole (a small
            classifier head loses far more end to end than its layer error suggests).
        recover: Re-fit U and V layer by layer to the original model's layer outputs.
        samples: Calibration samples for ``activation_aware`` and ``recover``.
        damping: Ridge added to the covariance, as a fraction of its mean diagonal.
    """

    def __init__(
        self,
        rank: int | None = None,
        ratio: float | None = 0.5,
        energy: float | None = None,
        allocation: Literal["uniform", "global"] = "uniform",
        activation_aware: bool = False,
        min_elements: int = 4096,
        conv_split: Literal["none", "spatial"] = "none",
        keep_first_last: bool = False,
        recover: bool = False,
        samples: int = 128,
        damping: float = 1e-2,
        data: Dataset | None = None,
        node_filter: NodeFilter | None = None,
    ):
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if samples < 1 or damping < 0:
            raise ValueError(f"samples must be >= 1 and damping >= 0, got {samples} and {damping}")
        if energy is not None and not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if rank is None and ratio is None and energy is None:
            raise ValueError("give one of rank, ratio or energy")
        if allocation == "global" and (rank is not None or energy is not None or ratio is None):
            raise ValueError("allocation=global distributes a ratio budget: give ratio, not rank or energy")
        self.rank, self.ratio, self.energy = rank, ratio, energy
        self.allocation = allocation
        self.activation_aware = activation_aware
        self.min_elements = min_elements
        self.op_types = ("MatMul", "Gemm", "Conv") if conv_split == "spatial" else ("MatMul", "Gemm")
        self.keep_first_last = keep_first_last
        self.recover = recover
        self.samples = samples
        self.damping = damping
        self.data = data
        self.node_filter = node_filter
        self.details: dict = {}

    def _choose_rank(self, k: int, n: int, sigma: np.ndarray, readers: int) -> int:
        if self.rank is not None:
            return min(self.rank, k, n)
        if self.energy is not None:
            cumulative = np.cumsum(sigma**2) / max(float(np.sum(sigma**2)), 1e-30)
            return int(np.searchsorted(cumulative, self.energy - 1e-12) + 1)
        return max(1, int(self.ratio * k * n / (readers * (k + n))))  # a shared weight's layers split its budget

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scan = scan_weights(model, self.op_types, self.node_filter, self.min_elements)
        if self.activation_aware or self.recover:
            require_data(self.data, "low-rank with activation_aware or recover")
        layers = dict(scan.skipped)
        edges = edge_layers(model, ("MatMul", "Gemm", "Conv")) if self.keep_first_last else set()
        candidates = []
        for use in scan.uses:
            if id(use.node) in edges:
                layers[use.label] = "kept dense (first or last layer)"
                continue
            blocker = spatial_split_blocker(use) if use.node.op_type == "Conv" else None
            if blocker:
                layers[use.label] = f"kept dense ({blocker})"
            else:
                candidates.append(use)
        uses = []
        for use in candidates:
            others = other_readers(use, [c.node for c in candidates])
            if others:
                layers[use.label] = f"kept dense (weight also read by {others[0]})"
            else:
                uses.append(use)
        name_layers(uses)
        original = io.clone(model) if self.recover else None
        grams = input_grams(model, uses, self.data, self.samples) if self.activation_aware else {}
        factors = []
        for use in uses:
            w = split_matrix(use).astype(np.float64)
            gram = grams.get(use.activation.name)
            chol = None
            if gram is not None:
                xtx = vertical_patch_gram(gram.xtx, use.array().shape) if use.node.op_type == "Conv" else gram.xtx
                chol = whitening(xtx, gram.rows, self.damping)
            factors.append((use, w.shape, *factorize(w, min(w.shape), chol), chol is not None))
        readers = [len(use.value.uses()) for use, *_ in factors]  # a shared weight: one pair of factors per layer
        if self.allocation == "global":
            ranks = allocate_ranks([(shape, sigma, count) for (_, shape, _, _, sigma, _), count in zip(factors, readers)], self.ratio)
        else:
            ranks = [self._choose_rank(*shape, sigma, count) for (_, shape, _, _, sigma, _), count in zip(factors, readers)]
        factored, taken = set(), value_names(model.graph)
        for (use, (k, n), u, v, _, aware), r, readers in zip(factors, ranks, readers):
            if readers * r * (k + n) >= k * n:
                shared = f" for each of {readers} layers sharing the weight" if readers > 1 else ""
                layers[use.label] = f"kept dense (rank {r}{shared}: {readers * r * (k + n)} >= {k * n} parameters)"
                continue
            how = "activation-aware" if aware else "plain SVD"
            summary = f"rank {r} of {min(k, n)} ({how}), parameters {r * (k + n) / (k * n):.3f}"
            if use.node.op_type == "Conv":
                kh, kw = use.array().shape[2:]
                summary += f", {kh}x1 then 1x{kw} Conv"
                self._split_conv(use, u[:, :r], v[:r], taken)
            else:
                self._split(use, u[:, :r], v[:r], taken)
            factored.add(use.node.name)
            layers[use.label] = summary
        if self.recover and factored:
            self.details["recover"] = recover_layers(original, model, self.data, factored, self.samples, self.damping)
        self.details["layers"] = layers
        name_uniquely(model)  # a subgraph's new initializers may reuse an outer graph's names
        return ir.passes.PassResult(model, bool(factored))

    def _split(self, use: WeightUse, u: np.ndarray, v: np.ndarray, taken: set[str]) -> None:
        """``x @ W`` → ``(x @ U) @ V``: a new MatMul for U, the layer's node keeps V in its own layout."""
        transposed = use.node.op_type == "Gemm" and use.node.attributes.get_int("transB", 0)
        _insert_u_node(use, "MatMul", u, v.T if transposed else v, {}, taken)

    def _split_conv(self, use: WeightUse, u: np.ndarray, v: np.ndarray, taken: set[str]) -> None:
        """Conv kh×kw → vertical kh×1 Conv (U, new node) then horizontal 1×kw Conv (V, the layer's node)."""
        node = use.node
        c_out, c_in, kh, kw = use.array().shape
        rank = u.shape[1]
        (sh, sw), (top, left, bottom, right), (dh, dw) = conv_geometry(node)
        vertical = u.T.reshape(rank, c_in, kh, 1)
        horizontal = v.reshape(rank, c_out, 1, kw).transpose(1, 0, 2, 3)
        vertical_attrs = {"kernel_shape": [kh, 1], "strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]}
        _insert_u_node(use, "Conv", vertical, horizontal, vertical_attrs, taken)
        horizontal_attrs = {"kernel_shape": [1, kw], "strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}
        for name, value in horizontal_attrs.items():
            node.attributes[name] = ir.AttrInt64s(name, value)
        node.attributes.pop("auto_pad", None)


def _insert_u_node(use: WeightUse, op_type: str, u: np.ndarray, v: np.ndarray, attributes: dict, taken: set[str]) -> None:
    """Insert ``op_type(x, U)`` as ``<layer>.lowrank_u`` before the layer, which then reads its output with
    weight V (both given in their op's layout, cast to the weight's dtype). The output's name is made
    unique against ``taken``, the model's value names (a subgraph layer may share a main layer's name)."""
    node, graph, old = use.node, use.graph, use.value
    dtype = use.array().dtype
    u_value = new_initializer(graph, f"{old.name}_lowrank_u", u.astype(dtype))
    u_node = ir.node(op_type, [use.activation, u_value], attributes, name=node.name + LOW_RANK_SUFFIX)
    u_node.outputs[0].name = unique_name(node.name + LOW_RANK_SUFFIX, taken)
    taken.add(u_node.outputs[0].name)
    u_node.outputs[0].type = ir.TensorType(u_value.dtype)
    graph.insert_before(node, u_node)
    v_value = new_initializer(graph, f"{old.name}_lowrank_v", v.astype(dtype))
    node.replace_input_with(0, u_node.outputs[0])
    node.replace_input_with(use.index, v_value)
    drop_if_unused(old)


def spatial_split_blocker(use: WeightUse) -> str | None:
    """Why a Conv (2-D, group 1, per :func:`scan_weights`) cannot be split spatially (None when it can)."""
    auto_pad = use.node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        return f"auto_pad {auto_pad}: pads not explicit"
    if use.array().shape[2:] == (1, 1):
        return "1x1 kernel: nothing to split"
    return None


def split_matrix(use: WeightUse) -> np.ndarray:
    """The matrix factorized: the (K, N) GEMM view of MatMul/Gemm, W[co, ci, i, j] as M[(ci, i), (co, j)] for Conv."""
    if use.node.op_type != "Conv":
        return use.matrix()
    c_out, c_in, kh, kw = use.array().shape
    return use.array().astype(np.float32).transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def vertical_patch_gram(xtx: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
    """XᵀX of a Conv's vertical kh×1 patches from that of its full (C_in, kh, kw) im2col patches: the
    diagonal blocks of the kw patch columns, averaged."""
    _, c_in, kh, kw = weight_shape
    blocks = xtx.reshape(c_in, kh, kw, c_in, kh, kw)
    return np.einsum("aibcjb->aicj", blocks).reshape(c_in * kh, c_in * kh) / kw


def allocate_ranks(layers: list[tuple[tuple[int, int], np.ndarray, int]], ratio: float) -> list[int]:
    """Ranks of layers ``[((K, N), singular values, readers of the weight)]`` keeping ``ratio`` of their
    weights' K·N parameters (a weight shared by several layers counts once; each layer pays for its factors).

    Greedy on the relative error each rank removes (σ_r² / Σσ²) per parameter it costs (K + N); since σ
    decreases within a layer, taking candidates in that order always extends a layer's prefix. A layer
    never gets a rank at which factoring stops paying (readers·r(K+N) >= KN); every layer gets at least rank 1.
    """
    budget = ratio * sum(k * n / readers for (k, n), _, readers in layers)
    candidates = []
    for index, ((k, n), sigma, readers) in enumerate(layers):
        energy = sigma.astype(np.float64) ** 2
        gain = energy / max(float(energy.sum()), 1e-30) / (k + n)
        useful = max(1, min(len(sigma), -(-k * n // (readers * (k + n))) - 1))
        candidates += [(-g, index) for g in gain[1:useful]]
    ranks = [1] * len(layers)
    spent = sum(k + n for (k, n), _, _ in layers)
    for _, index in sorted(candidates):
        (k, n), _, _ = layers[index]
        if spent + k + n > budget:
            continue
        ranks[index] += 1
        spent += k + n
    return ranks
