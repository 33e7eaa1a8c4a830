"""``recover``: layer-wise feature distillation of a compressed model against its original.

Front to back, each compressed layer is re-fitted so that, fed with the *compressed* model's own input
to that layer, it reproduces the *original* model's layer output on calibration data:

* pruned layers (dense MatMul/Gemm/Conv with zeros, or ``SparseMatMul`` / ``SparseConv``): least squares on the
  surviving weights, the mask kept;
* low-rank pairs (``x @ U`` then the layer with ``V``, as written by ``low-rank``): the best rank-r
  factors under the layer's input metric;
* spatially split Convs (vertical ``<layer>.lowrank_u`` then the horizontal layer, ``low-rank
  conv_split=spatial``): dense least squares of the horizontal filters on the vertical Conv's output,
  the vertical filters kept;
* ``BinaryMatMul`` / ``XnorMatMul``: the per-column scale α (within a factor ``BINARY_ALPHA_RANGE`` of
  the current one) and the bias, signs kept.

Pruned and low-rank re-fits are pulled toward the current weights by a ridge term whose strength is
chosen on calibration batches the fit did not see, and the current weights are kept when no strength
beats them there (unpulled least squares overfits: on MiniLM it lowered every layer's calibration
error and the WordSim score with it).

The relative output error ``‖X_c W − X_o W_o‖² / ‖X_o W_o‖²`` of every layer is reported before and
after; a re-fit that would not lower it is not applied. Layers are matched to the original by node
name. Models holding ``ai.onnxopt`` ops are run with onnxopt's kernel library. Layers inside If/Loop/Scan
subgraphs cannot be observed (onnxruntime exposes main-graph values only): they are reported as skipped
under their path and left as compressed; a main-graph layer is never matched to one of them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io, ops
from onnxopt.activations import Gram, layer_input_rows
from onnxopt.calibration import Dataset, capture_many
from onnxopt.compression import (
    bias_input_index,
    gemm_alpha,
    layer_bias,
    mark_sparse_storage,
    packed_from_node,
    relative_error,
    solve_low_rank_ridge,
    solve_masked,
)
from onnxopt.errors import DataError, PassOptionError
from onnxopt.registry import register
from onnxopt.weights import (
    WeightUse,
    constant_array,
    constant_tensor,
    drop_if_unused,
    name_uniquely,
    new_initializer,
    scan_weights,
    scoped_nodes,
    set_weight,
)

LOW_RANK_SUFFIX = ".lowrank_u"
"""Name suffix of the ``x @ U`` node ``low-rank`` inserts before the layer that keeps ``V``."""

LAYER_OPS = ("MatMul", "Gemm", "Conv")

BINARY_ALPHA_RANGE = 2.0
"""A re-fitted binary α stays within this factor of the current one (α = mean|W| after ``binarize``).
Unbounded, least squares shrank by more than 2x up to 42 % of the columns of a MiniLM FFN down-projection
(some to or below zero, i.e. sign flips) and grew others up to 5.7x: the calibration error fell, WordSim-353
fell from 0.657 to 0.557. Within 2x it rose to 0.697; the MNIST CNN's accuracy is unchanged."""

SUBGRAPH_REASON = "inside a subgraph (If/Loop/Scan): onnxruntime cannot capture its input; left as compressed"

RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Pulls toward the current weights tried by the held-out check besides ``damping`` (× mean diagonal
of XᵀX/rows)."""


@dataclasses.dataclass
class GramLayer:
    """Statistics XᵀX, XᵀY, YᵀY for layers whose free parameters are a (K, N) matrix, kept for two
    halves of the calibration batches (alternating) so a re-fit can be checked on rows it did not see.
    Every layer-wise re-fit (this pass's layers, ``prune-structured``'s consumers) goes through it."""

    node: ir.Node

    def __post_init__(self) -> None:
        self.halves: list[Gram] = []
        self.yty_halves = [0.0, 0.0]
        self.batches = 0
        self.report: dict = {}

    def accumulate(self, rows: np.ndarray, target: np.ndarray) -> None:
        if not self.halves:
            self.halves = [Gram.empty(rows.shape[1], target.shape[1]) for _ in range(2)]
        side = self.batches % 2
        self.halves[side].update(rows, target)
        self.yty_halves[side] += float(np.sum(target.astype(np.float64) ** 2))
        self.batches += 1

    @property
    def gram(self) -> Gram:
        first, second = self.halves
        return Gram(first.xtx + second.xtx, first.xty + second.xty, first.rows + second.rows, first.nonzero + second.nonzero)

    @property
    def yty(self) -> float:
        return sum(self.yty_halves)

    def matrix(self, w) -> np.ndarray:
        """The (K, N) matrix of the layer's parameters ``w``."""
        return w

    def error(self, w) -> float:
        return relative_error(self.gram.xtx, self.gram.xty, self.yty, self.matrix(w))

    def ridge_refit(self, solve, prior: np.ndarray, damping: float):
        """``solve(gram, strength)``, a least-squares fit pulled toward ``prior`` (the current weights), with
        the strength whose fit on one half of the batches best predicts the other half, re-solved on all
        batches; None when no strength beats ``prior`` on the held-out half. With one batch (nothing to
        hold out): ``solve(gram, damping)``."""
        fit, check = self.halves
        if fit.rows == 0 or check.rows == 0:
            return solve(self.gram, damping)

        def held_out(w) -> float:
            return relative_error(check.xtx, check.xty, self.yty_halves[1], self.matrix(w))

        errors = {None: held_out(prior)}
        for strength in sorted({damping, *RIDGE_STRENGTHS}):
            errors[strength] = held_out(solve(fit, strength))
        best = min(errors, key=errors.get)
        self.report = {"ridge": best, "held_out_before": round(errors[None], 6), "held_out_after": round(errors[best], 6)}
        return None if best is None else solve(self.gram, best)


class _Masked(GramLayer):
    """A dense MatMul/Gemm/Conv whose zero weights stay zero."""

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        return layer_input_rows(WeightUse(self.node, 1), x)

    def current(self) -> np.ndarray:
        return WeightUse(self.node, 1).matrix() * np.float32(gemm_alpha(self.node))

    def mask(self, prior: np.ndarray) -> np.ndarray:
        """The weights the re-fit may change: the stored nonzeros."""
        return prior != 0

    def refit(self, damping: float) -> np.ndarray:
        """Least squares on :meth:`mask` pulled toward the current weights (:meth:`ridge_refit`)."""
        prior = self.current().astype(np.float64)
        mask = self.mask(prior)
        fitted = self.ridge_refit(lambda gram, strength: solve_masked(gram.xtx, gram.xty, gram.rows, mask, strength, prior), prior, damping)
        return prior if fitted is None else fitted

    def keep_pattern(self, w: np.ndarray) -> np.ndarray:
        """``w`` with the stored pattern kept even where the re-fit lands on exactly zero (dead inputs)."""
        return np.where((self.current() != 0) & (w == 0), np.float32(np.finfo(np.float32).tiny), w)

    def apply(self, w: np.ndarray) -> None:
        use = WeightUse(self.node, 1)
        w = self.keep_pattern(w.astype(np.float32))
        mark_sparse_storage(set_weight(use, use.from_matrix(w / gemm_alpha(self.node)), "recovered"))


class _SpatialSplit(_Masked):
    """The horizontal 1×kw Conv of a spatial split, re-fitted densely on the vertical Conv's output."""

    def mask(self, prior: np.ndarray) -> np.ndarray:
        return np.ones(prior.shape, dtype=bool)


class _Sparse(_Masked):
    """A ``SparseMatMul`` node: re-fit its dense equivalent on the stored pattern, then re-pack."""

    def current(self) -> np.ndarray:
        return ops.dense_weight(packed_from_node(self.node))

    def rows(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])

    def apply(self, w: np.ndarray) -> None:
        old = packed_from_node(self.node)
        value_dtype = str(old.inputs["values"].dtype)
        _replace_packed_inputs(self.node, ops.pack_sparse_matmul(self.keep_pattern(w.astype(np.float32)), value_dtype))


class _SparseConv(_Sparse):
    """A ``SparseConv`` node: as :class:`_Sparse`, on the im2col rows of its input."""

    def geometry(self) -> tuple[tuple[int, ...], ...]:
        """(strides, pads, dilations) from the node's attributes (every packed SparseConv carries them)."""
        attrs = self.node.attributes
        return tuple(tuple(attrs[name].as_ints()) for name in ("strides", "pads", "dilations"))

    def rows(self, x: np.ndarray) -> np.ndarray:
        return ops.im2col(x, self.node.attributes["kernel_shape"].as_ints(), *self.geometry())

    def apply(self, w: np.ndarray) -> None:
        old = packed_from_node(self.node)
        weight = self.keep_pattern(w.astype(np.float32)).T.reshape(old.N, -1, *old.attributes["kernel_shape"])
        packed = ops.pack_sparse_conv(weight, *self.geometry(), value_dtype=str(old.inputs["values"].dtype))
        _replace_packed_inputs(self.node, packed)


class _LowRank(GramLayer):
    """``h = x @ U`` (node ``<name>.lowrank_u``) followed by the layer ``y = h @ V``."""

    def __init__(self, node: ir.Node, u_node: ir.Node):
        super().__init__(node)
        self.u_node = u_node

    @property
    def activation(self) -> ir.Value:
        return self.u_node.inputs[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        return constant_array(self.u_node.inputs[1]), WeightUse(self.node, 1).matrix() * np.float32(gemm_alpha(self.node))

    def current(self) -> np.ndarray:
        u, v = self.factors()
        return u.astype(np.float64) @ v

    def refit(self, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """Best rank-r factors pulled toward the current ones (:func:`solve_low_rank_ridge`, :meth:`ridge_refit`)."""
        u, v = self.factors()
        prior, rank = u.astype(np.float64) @ v, u.shape[1]
        fitted = self.ridge_refit(
            lambda gram, strength: solve_low_rank_ridge(gram.xtx, gram.xty, gram.rows, rank, prior, strength), prior, damping
        )
        return (u, v) if fitted is None else fitted

    def matrix(self, w) -> np.ndarray:
        return w[0].astype(np.float64) @ w[1] if isinstance(w, tuple) else w

    def apply(self, factors: tuple[np.ndarray, np.ndarray]) -> None:
        u, v = factors
        u_use = WeightUse(self.u_node, 1)
        set_weight(u_use, u_use.from_matrix(u), "recovered")  # from_matrix: back to the weight's dtype
        use = WeightUse(self.node, 1)
        set_weight(use, use.from_matrix((v / gemm_alpha(self.node)).astype(np.float32)), "recovered")


class _Binary:
    """``BinaryMatMul``/``XnorMatMul``: per column ``y ≈ α z + b`` with ``z`` the unit-α op output."""

    def __init__(self, node: ir.Node, original_bias: np.ndarray | None):
        self.node = node
        self.packed = packed_from_node(node)
        n = self.packed.N
        self.unit = dataclasses.replace(self.packed, inputs={**self.packed.inputs, "alpha": np.ones(n, np.float32)})
        self.original_bias = np.zeros(n) if original_bias is None else original_bias.astype(np.float64)
        self.halves = np.zeros((2, 6, n))  # per alternating half of the batches: zz, z, zt, t, tt, count
        self.batches = 0
        self.report: dict = {}

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])

    def accumulate(self, rows: np.ndarray, target: np.ndarray) -> None:
        z = ops.reference(self.unit, rows).astype(np.float64)
        t = target.astype(np.float64) + self.original_bias
        self.halves[self.batches % 2] += [(z * z).sum(0), z.sum(0), (z * t).sum(0), t.sum(0), (t * t).sum(0), np.full(z.shape[1], len(z))]
        self.batches += 1

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        bias_index = bias_input_index(self.node)
        has_bias = len(self.node.inputs) > bias_index and self.node.inputs[bias_index] is not None
        bias = constant_array(self.node.inputs[bias_index]) if has_bias else np.zeros(self.packed.N)
        return self.packed.inputs["alpha"].astype(np.float64), bias.astype(np.float64)

    def refit(self, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """Least squares α, b; the current ones when the fit on one half of the batches does not predict
        the other half better (nothing held out with one batch)."""
        fit, check = self.halves
        if fit[5].any() and check[5].any():
            before, after = self.error(self.current(), check), self.error(self._solve(fit, damping), check)
            self.report = {"held_out_before": round(before, 6), "held_out_after": round(min(before, after), 6)}
            if after >= before:
                return self.current()
        return self._solve(self.halves.sum(0), damping)

    def _solve(self, sums: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
        """Per column least squares α within ``BINARY_ALPHA_RANGE`` of the current α, then the best bias for it."""
        zz, z, zt, t, _, count = sums
        current_alpha, current_bias = self.current()
        det = zz * count - z * z
        ok = det > damping * np.maximum(zz * count, 1e-30)
        safe = np.where(ok, det, 1.0)
        alpha = np.where(ok, (zt * count - z * t) / safe, current_alpha)
        trusted = np.clip(alpha, current_alpha / BINARY_ALPHA_RANGE, current_alpha * BINARY_ALPHA_RANGE)
        alpha = np.where(current_alpha > 0, trusted, alpha)
        bias = np.where(ok, (t - alpha * z) / np.maximum(count, 1), current_bias)
        return alpha, bias

    def error(self, params: tuple[np.ndarray, np.ndarray], sums: np.ndarray | None = None) -> float:
        """Relative output error of ``params`` on ``sums`` (all batches when None)."""
        alpha, bias = params
        zz, z, zt, t, tt, count = self.halves.sum(0) if sums is None else sums
        residual = alpha**2 * zz + 2 * alpha * bias * z + count * bias**2 - 2 * alpha * zt - 2 * bias * t + tt
        target_energy = tt - 2 * self.original_bias * t + count * self.original_bias**2  # ‖X_o W_o‖²
        return float(max(residual.sum(), 0.0) / max(target_energy.sum(), 1e-30))

    def apply(self, params: tuple[np.ndarray, np.ndarray]) -> None:
        alpha, bias = (p.astype(np.float32) for p in params)
        graph = self.node.graph
        alpha_index = 1 + list(self.packed.inputs).index("alpha")
        old_alpha = self.node.inputs[alpha_index]
        self.node.replace_input_with(alpha_index, new_initializer(graph, f"{self.node.name}.alpha_recovered", alpha))
        drop_if_unused(old_alpha)
        bias_value = new_initializer(graph, f"{self.node.name}.bias_recovered", bias)
        bias_index = bias_input_index(self.node)
        if len(self.node.inputs) > bias_index:
            old_bias = self.node.inputs[bias_index]
            self.node.replace_input_with(bias_index, bias_value)
            if old_bias is not None:
                drop_if_unused(old_bias)
        else:
            inputs = list(self.node.inputs) + [None] * (bias_index - len(self.node.inputs)) + [bias_value]
            _set_inputs(self.node, inputs)


def _replace_packed_inputs(node: ir.Node, packed: ops.PackedWeight) -> None:
    for position, key in enumerate(ops._INPUT_NAMES[node.op_type], start=1):  # noqa: SLF001
        if key in packed.inputs:
            old = node.inputs[position]
            node.replace_input_with(position, new_initializer(node.graph, old.name, packed.inputs[key]))
            drop_if_unused(old)


def _set_inputs(node: ir.Node, inputs: list[ir.Value | None]) -> None:
    node.resize_inputs(len(inputs))
    for position, value in enumerate(inputs):
        node.replace_input_with(position, value)


def _identify(node: ir.Node, orig: WeightUse | None):
    """The re-fittable layer ``node`` (matched to ``orig`` in the original model) is, or None."""
    if orig is None:
        return None
    if node.domain == ops.DOMAIN and node.op_type == "SparseMatMul":
        return _Sparse(node)
    if node.domain == ops.DOMAIN and node.op_type == "SparseConv":
        return _SparseConv(node)
    if node.domain == ops.DOMAIN and node.op_type in ("BinaryMatMul", "XnorMatMul"):
        return _Binary(node, _orig_bias(orig))
    if node.op_type not in LAYER_OPS or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or (weight.const_value is None and ir.convenience.get_const_tensor(weight) is None):
        return None
    producer = node.inputs[0].producer()
    if producer is not None and producer.name == node.name + LOW_RANK_SUFFIX:
        return _SpatialSplit(node) if node.op_type == "Conv" else _LowRank(node, producer)
    current = WeightUse(node, 1).array()
    if current.shape == orig.array().shape and not np.array_equal(current, orig.array()) and np.any(current == 0):
        return _Masked(node)
    return None


def _weight_changed(node: ir.Node, orig: WeightUse) -> bool:
    """Whether ``node``, a layer op like its original, no longer holds the original's weight."""
    if node.op_type not in LAYER_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    tensor = constant_tensor(node.inputs[1])
    if tensor is None:  # the weight is computed now (a DequantizeLinear's output, ...)
        return True
    current, original = tensor.numpy(), orig.array()
    return current.shape != original.shape or not np.array_equal(current, original)


def _subgraph_layers(original: ir.Model, compressed: ir.Model, names: set[str] | None) -> dict[str, ir.Node]:
    """The compressed layers inside subgraphs, by label (``<container>/<attribute>/<name>``; matched to the
    original by label, not by name)."""
    reference = {u.label: u for u in scan_weights(original, LAYER_OPS).uses if u.scope}
    return {
        scope + node.name: node for scope, node in scoped_nodes(compressed.graph)
        if scope and (names is None or node.name in names) and _identify(node, reference.get(scope + node.name)) is not None
    }


UNRECOGNIZED_REASON = "compressed in a form recover does not re-fit (e.g. factored twice); left as is"
RESHAPED_REASON = ("its input or output width differs from the reference's (channels removed by prune-structured, "
                   "whose own recover re-fits its consumers); left as is")


def _reshaped(layer, orig: WeightUse) -> bool:
    """Whether ``layer`` no longer reads (K) or writes (N) as many channels as ``orig``; a spatial split's
    horizontal Conv reads the vertical one's channels, so only its N counts."""
    k, n = (layer.packed.K, layer.packed.N) if isinstance(layer, _Binary) else layer.matrix(layer.current()).shape
    k_orig, n_orig = orig.matrix().shape
    return n != n_orig or (k != k_orig and not isinstance(layer, _SpatialSplit))


def _orig_bias(orig: WeightUse) -> np.ndarray | None:
    return layer_bias(orig.node, orig.matrix().shape[1])


def recover_layers(
    original: ir.Model,
    compressed: ir.Model,
    data: Dataset,
    names: set[str] | None = None,
    samples: int = 128,
    damping: float = 1e-4,
    target: Literal["model", "layer"] = "model",
) -> dict[str, dict[str, float | str]]:
    """Re-fit the compressed layers of ``compressed`` (main graph, front to back) against ``original``.

    ``target``: ``model`` fits each layer to the original model's output of that layer (``X_o W_o``: the
    re-fit also undoes the drift of the layers before it); ``layer`` to the original layer applied to the
    compressed model's own input (``X_c W_o``: the layer's own error only). ``names`` restricts the work
    to those layers. Returns, per layer, the relative output error before and after and whether the
    re-fit was applied; compressed layers inside subgraphs are listed as skipped under their path
    (``<container node>/<attribute>/<name>``).
    """
    reference = {u.node.name: u for u in scan_weights(original, LAYER_OPS).uses if u.node.name and not u.scope}
    found, results = [], {}
    for node in list(compressed.graph):
        if names is None or node.name in names:
            layer = _identify(node, reference.get(node.name))
            if layer is not None and _reshaped(layer, reference[node.name]):
                results[node.name] = {"kind": "skipped", "reason": RESHAPED_REASON}
            elif layer is not None:
                found.append((node.name, layer, reference[node.name]))
            elif node.name in reference and _weight_changed(node, reference[node.name]):
                results[node.name] = {"kind": "skipped", "reason": UNRECOGNIZED_REASON}
    # Consecutive layers reading the same value (e.g. attention's Q, K, V) share one capture: re-fitting
    # one of them cannot change the others' input.
    for _, run in itertools.groupby(found, key=lambda entry: (entry[1].activation.name, entry[2].activation.name)):
        run = list(run)
        act_orig, act_comp = run[0][2].activation.name, run[0][1].activation.name
        targets = [orig.matrix() * np.float32(gemm_alpha(orig.node)) for _, _, orig in run]

        # target=layer needs only the compressed model's activations: the original model is not run
        models = [(compressed, [act_comp])] if target == "layer" else [(original, [act_orig]), (compressed, [act_comp])]

        def on_batch(outs, run=run, targets=targets, act_orig=act_orig, act_comp=act_comp):
            own = outs[-1][act_comp]
            reference_input = own if target == "layer" else outs[0][act_orig]
            for (_, layer, orig), target_matrix in zip(run, targets):
                layer.accumulate(layer.rows(own), layer_input_rows(orig, reference_input) @ target_matrix)

        capture_many(models, data.batches(original, 8, samples), on_batch)
        for name, layer, _ in run:
            current = layer.current()
            fitted = layer.refit(damping)
            before, after = layer.error(current), layer.error(fitted)
            applied = after < before
            if applied:
                layer.apply(fitted)
            results[name] = {
                "kind": type(layer).__name__.strip("_").lower(),
                "error_before": round(before, 6),
                "error_after": round(after if applied else before, 6),
                "applied": applied,
                **getattr(layer, "report", {}),
            }
    in_subgraphs = _subgraph_layers(original, compressed, names)
    for path in in_subgraphs:
        results[path] = {"kind": "skipped", "reason": SUBGRAPH_REASON}
    if names is not None:
        for name in sorted(names - set(results) - {node.name for node in in_subgraphs.values()}):
            results[name] = {"kind": "skipped", "reason": "not observable (unnamed or unmatched layer)"}
    return results


def require_data(data: Dataset | None, why: str) -> Dataset:
    if data is None:
        raise DataError(f"{why} needs calibration data (--data FILE)")
    return data


@register("recover", lossless=False)
class RecoverPass(ir.passes.InPlacePass):
    """Re-fit compressed layers to reproduce the original model's layer outputs (layer-wise distillation).

    Args:
        reference: Path of the original, uncompressed model; layers are matched by node name. In a
            pipeline it may be left out: the model as it was before the pipeline's first lossy pass
            is the reference then (so several lossy passes can be re-fitted once, together).
        samples: Calibration samples used to collect the layer statistics.
        damping: Ridge term, as a fraction of the mean diagonal of XᵀX/rows.
        target: ``model``: reproduce the original model's output of each layer, undoing the error of the
            layers before it too (best on the MNIST CNN: 0.982 against 0.894); ``layer``: reproduce the
            original layer on the compressed model's own input, its own error only (best where much
            upstream error reaches a residual stream: MiniLM's WordSim 0.643 against 0.423 at low-rank
            ratio 0.1, 0.569 against 0.377 at 95 % sparsity; bench/README.md compares both).
    """

    def __init__(self, reference: str = "", samples: int = 128, damping: float = 1e-4,
                 target: Literal["model", "layer"] = "model", data: Dataset | None = None,
                 original: ir.Model | None = None):
        super().__init__()
        if samples < 1 or damping < 0:
            raise ValueError("samples must be >= 1 and damping >= 0")
        if target not in ("model", "layer"):
            raise ValueError(f"target must be model or layer, got '{target}'")
        self.target = target
        self.reference = reference
        self.original = original  # the reference as a model (Python API)
        self.pipeline_original: ir.Model | None = None
        """Set by ``run_pipeline`` when neither is given: the model before its first other lossy pass."""
        self.samples = samples
        self.damping = damping
        self.data = data
        self.details: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        original = io.load(self.reference) if self.reference else self.original or self.pipeline_original
        if original is None:
            raise PassOptionError("recover needs the original model: reference=PATH, or run it in a pipeline "
                                  "after the lossy passes it re-fits")
        data = require_data(self.data, "recover")
        results = recover_layers(original, model, data, None, self.samples, self.damping, self.target)
        self.details = {"layers": results} if results else {"layers": "no compressed layer matched the reference"}
        name_uniquely(model)  # a subgraph's new initializers may reuse an outer graph's names
        return ir.passes.PassResult(model, any(r.get("applied") for r in results.values()))
