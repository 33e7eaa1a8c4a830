"""``low-rank``: replace a MatMul/Gemm weight W (K×N) by two factors U (K×r) · V (r×N).

The layer ``y = x W`` becomes ``h = x @ U`` (a MatMul named ``<layer>.lowrank_u``) followed by the
original node multiplying by V (Gemm keeps its bias, alpha and beta). The rank comes from ``rank``,
``ratio`` (fraction of the layer's parameters kept) or ``energy`` (fraction of the squared singular
values kept). ``activation_aware`` whitens W with the Cholesky factor L of the calibration inputs'
covariance before the SVD (minimizing ``‖X(W − UV)‖`` instead of ``‖W − UV‖``). Layers where
``r(K+N) >= KN`` are left alone. Conv layers are not factorized.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.activations import input_grams
from onnxopt.calibration import Dataset
from onnxopt.compression import factorize, whitening
from onnxopt.filters import NodeFilter
from onnxopt.passes.prune import name_layers
from onnxopt.passes.recover import LOW_RANK_SUFFIX, recover_layers, require_data
from onnxopt.registry import register
from onnxopt.weights import WeightUse, drop_if_unused, new_initializer, scan_weights


@register("low-rank", lossless=False)
class LowRankPass(ir.passes.InPlacePass):
    """Factorize MatMul/Gemm weights by truncated SVD (optionally activation-aware).

    Args:
        rank: Fixed rank r for every layer (overrides ``ratio`` and ``energy``).
        ratio: Fraction of each layer's K·N parameters kept: r = floor(ratio·K·N / (K+N)); with
            ``allocation=global``, the fraction of all selected layers' parameters kept.
        allocation: ``uniform`` gives every layer the ``ratio``; ``global`` distributes the ratio's
            parameter budget across layers by relative error reduction per parameter.
        energy: Keep the smallest rank whose singular values hold this fraction of the squared sum.
        activation_aware: Whiten by the Cholesky factor of the calibration inputs' covariance.
        min_elements: Layers with fewer weights are left alone.
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
        self.recover = recover
        self.samples = samples
        self.damping = damping
        self.data = data
        self.node_filter = node_filter
        self.details: dict = {}

    def _choose_rank(self, k: int, n: int, sigma: np.ndarray) -> int:
        if self.rank is not None:
            return min(self.rank, k, n)
        if self.energy is not None:
            cumulative = np.cumsum(sigma**2) / max(float(np.sum(sigma**2)), 1e-30)
            return int(np.searchsorted(cumulative, self.energy - 1e-12) + 1)
        return max(1, int(self.ratio * k * n / (k + n)))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scan = scan_weights(model, ("MatMul", "Gemm"), self.node_filter, self.min_elements)
        if self.activation_aware or self.recover:
            require_data(self.data, "low-rank with activation_aware or recover")
        name_layers(scan.uses)
        original = model.clone() if self.recover else None
        grams = input_grams(model, scan.uses, self.data, self.samples) if self.activation_aware else {}
        factors = []
        for use in scan.uses:
            w = use.matrix().astype(np.float64)
            gram = grams.get(use.activation.name)
            chol = whitening(gram.xtx, gram.rows, self.damping) if gram is not None else None
            factors.append((use, *factorize(w, min(w.shape), chol), chol is not None))
        if self.allocation == "global":
            ranks = allocate_ranks([(u.matrix().shape, sigma) for u, _, _, sigma, _ in factors], self.ratio)
        else:
            ranks = [self._choose_rank(*u.matrix().shape, sigma) for u, _, _, sigma, _ in factors]
        layers, factored = dict(scan.skipped), set()
        for (use, u, v, _, aware), r in zip(factors, ranks):
            k, n = use.matrix().shape
            if r * (k + n) >= k * n:
                layers[use.label] = f"kept dense (rank {r}: {r * (k + n)} >= {k * n} parameters)"
                continue
            self._split(use, u[:, :r], v[:r])
            factored.add(use.node.name)
            how = "activation-aware" if aware else "plain SVD"
            layers[use.label] = f"rank {r} of {min(k, n)} ({how}), parameters {r * (k + n) / (k * n):.3f}"
        if self.recover and factored:
            self.details["recover"] = recover_layers(original, model, self.data, factored, self.samples, self.damping)
        self.details["layers"] = layers
        return ir.passes.PassResult(model, bool(factored))

    def _split(self, use: WeightUse, u: np.ndarray, v: np.ndarray) -> None:
        """``x @ W`` → ``(x @ U) @ V``: a new MatMul for U, the layer's node keeps V in its own layout."""
        node, graph, old = use.node, use.graph, use.value
        dtype = use.array().dtype
        u_value = new_initializer(graph, f"{old.name}_lowrank_u", u.astype(dtype))
        u_node = ir.node("MatMul", [use.activation, u_value], name=node.name + LOW_RANK_SUFFIX)
        u_node.outputs[0].name = node.name + LOW_RANK_SUFFIX
        u_node.outputs[0].type = ir.TensorType(u_value.dtype)
        graph.insert_before(node, u_node)
        transposed = node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value
        v_value = new_initializer(graph, f"{old.name}_lowrank_v", (v.T if transposed else v).astype(dtype))
        node.replace_input_with(0, u_node.outputs[0])
        node.replace_input_with(use.index, v_value)
        drop_if_unused(old)


def allocate_ranks(layers: list[tuple[tuple[int, int], np.ndarray]], ratio: float) -> list[int]:
    """Ranks of layers ``[((K, N), singular values)]`` keeping ``ratio`` of their total K·N parameters.

    Greedy on the relative error each rank removes (σ_r² / Σσ²) per parameter it costs (K + N); since σ
    decreases within a layer, taking candidates in that order always extends a layer's prefix. A layer
    never gets a rank at which factoring stops paying (r(K+N) >= KN); every layer gets at least rank 1.
    """
    budget = ratio * sum(k * n for (k, n), _ in layers)
    candidates = []
    for index, ((k, n), sigma) in enumerate(layers):
        energy = sigma.astype(np.float64) ** 2
        gain = energy / max(float(energy.sum()), 1e-30) / (k + n)
        useful = max(1, min(len(sigma), -(-k * n // (k + n)) - 1))
        candidates += [(-g, index) for g in gain[1:useful]]
    ranks = [1] * len(layers)
    spent = sum(k + n for (k, n), _ in layers)
    for _, index in sorted(candidates):
        (k, n), _ = layers[index]
        if spent + k + n > budget:
            continue
        ranks[index] += 1
        spent += k + n
    return ranks
