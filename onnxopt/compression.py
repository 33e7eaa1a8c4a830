"""Shared helpers of the structural compression passes (prune, low-rank, binarize, recover).

* importance and masks: :func:`importance` (|W|, or Wanda's |W|·‖X_k‖), :func:`keep_mask` (per layer
  or per output column), :func:`nm_mask` (N:M along K), :func:`global_keep_masks`;
* shared weights: :func:`group_by_weight` and :func:`replace_weight` put one new tensor behind every
  consumer of a weight, so a weight shared by several layers stays shared;
* least squares: :func:`solve_masked` (re-fit of the surviving weights of a pruned layer) and
  :func:`solve_low_rank_ridge` (best rank-r factors under the activation metric), both optionally
  pulled toward a prior (ridge toward the current weights);
* :func:`lower_to_custom_op`: THE helper replacing a MatMul/Gemm by an ``ai.onnxopt`` node
  (Gemm ``alpha``/``beta``/``transB`` and its bias handled), with :func:`custom_op_blocker` saying why
  a layer cannot be lowered, :func:`absorb_relu` and :func:`absorb_maxpool` folding a following Relu /
  MaxPool into a sparse node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
import scipy.linalg

from onnxopt import io, ops
from onnxopt.weights import WeightUse, constant_array, constant_tensor, drop_if_unused, new_initializer, unique_name, value_names


# --------------------------------------------------------------------------- importance and masks


def importance(
    matrix: np.ndarray, column_norms: np.ndarray | None = None, work_rates: np.ndarray | None = None
) -> np.ndarray:
    """Score of each weight of a (K, N) matrix: |W|, times ‖X_k‖ when activation norms are given (Wanda),
    divided by ``work_rates[k]`` when given: the fraction of inputs in which row k's weights cost work (a
    row that never does scores 0)."""
    scores = np.abs(matrix.astype(np.float64))
    if column_norms is not None:
        scores *= column_norms[:, None]
    if work_rates is not None:
        rates = work_rates[:, None]
        scores = np.divide(scores, rates, out=np.zeros_like(scores), where=rates > 0)
    return scores


def keep_mask(scores: np.ndarray, sparsity: float, per_column: bool = False) -> np.ndarray:
    """Boolean mask keeping the highest scores, pruning ``round(sparsity × size)`` entries.

    ``per_column``: the same fraction is pruned in every output column (Wanda's comparison group).
    """
    if per_column:
        k = scores.shape[0]
        drop = int(round(sparsity * k))
        order = np.argsort(scores, axis=0, kind="stable")
        mask = np.ones_like(scores, dtype=bool)
        np.put_along_axis(mask, order[:drop], False, axis=0)
        return mask
    flat = scores.reshape(-1)
    drop = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    mask[np.argsort(flat, kind="stable")[:drop]] = False
    return mask.reshape(scores.shape)


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M mask of a (K, N) score matrix: in each group of ``m`` consecutive rows (along K) of a column,
    keep the ``n`` highest. A last partial group keeps ``ceil(n × size / m)``."""
    k = scores.shape[0]
    mask = np.zeros_like(scores, dtype=bool)
    for start in range(0, k, m):
        block = scores[start : start + m]
        keep = -(-n * block.shape[0] // m)
        top = np.argsort(-block, axis=0, kind="stable")[:keep]
        np.put_along_axis(mask[start : start + m], top, True, axis=0)
    return mask


def global_keep_masks(scores: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Masks keeping the highest scores of all layers ranked together: exactly ``round(sparsity × total)``
    entries pruned. Ties at the cut are broken by a seeded random order, so layers holding equal scores
    (e.g. already quantized weights) lose them in proportion, not first layer first."""
    if not scores:
        return []
    everything = np.concatenate([s.reshape(-1) for s in scores])
    drop = int(round(sparsity * everything.size))
    if drop == 0:
        flat = np.ones(everything.size, dtype=bool)
    else:
        cut = np.partition(everything, drop - 1)[drop - 1]
        flat = everything >= cut  # everything below the cut goes; then as many ties as still missing
        ties = np.flatnonzero(everything == cut)
        missing = drop - np.count_nonzero(~flat)
        flat[np.random.default_rng(0).choice(ties, missing, replace=False)] = False
    pieces = np.split(flat, np.cumsum([s.size for s in scores])[:-1])
    return [piece.reshape(s.shape) for piece, s in zip(pieces, scores)]


def sparsity(array: np.ndarray) -> float:
    return float(np.mean(array == 0)) if array.size else 0.0


# An ONNX sparse_initializer stores each nonzero as its value plus an int64 index.
def mark_sparse_storage(value: ir.Value) -> bool:
    """Flag ``value`` to be written as an ONNX sparse_initializer when that is smaller than dense."""
    array = value.const_value.numpy()
    pays = np.count_nonzero(array) * (array.itemsize + 8) < array.nbytes
    if pays:
        value.meta[io.SPARSE_META_KEY] = True
    else:
        value.meta.pop(io.SPARSE_META_KEY, None)
    return pays


# --------------------------------------------------------------------------- shared weights


def group_by_weight(uses: Sequence[WeightUse]) -> list[list[WeightUse]]:
    """Uses grouped by the weight they read and its layout (a shared weight is compressed once)."""
    groups: dict[tuple, list[WeightUse]] = {}
    for use in uses:
        layout = (use.node.op_type, use.node.attributes.get_int("transB", 0))
        groups.setdefault((id(use.value), layout), []).append(use)
    return list(groups.values())


def replace_weight(group: Sequence[WeightUse], array: np.ndarray, suffix: str) -> ir.Value:
    """Give every use of ``group`` (all reading one weight) a single new initializer holding ``array``.

    Consumers of the old weight outside ``group`` keep the old tensor.
    """
    old = group[0].value
    new = new_initializer(group[0].home, f"{old.name}_{suffix}", array)
    for use in group:
        use.node.replace_input_with(use.index, new)
    drop_if_unused(old)
    return new


# --------------------------------------------------------------------------- least squares


def _normalized(
    xtx: np.ndarray, xty: np.ndarray, rows: int, damping: float, prior: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of ``‖X W − Y‖² / rows + λ‖W − prior‖²`` (prior 0 when None), λ = ``damping`` ×
    the mean diagonal of XᵀX/rows: ``(H + λI, XᵀY/rows + λ prior)``."""
    h = xtx / max(rows, 1)
    lam = damping * max(float(np.mean(np.diag(h))), 1e-12)
    g = xty / max(rows, 1)
    return h + np.eye(h.shape[0]) * lam, g if prior is None else g + lam * prior


def solve_masked(
    xtx: np.ndarray, xty: np.ndarray, rows: int, mask: np.ndarray, damping: float = 1e-4, prior: np.ndarray | None = None
) -> np.ndarray:
    """``argmin_W ‖X W − Y‖²`` with ``W[~mask] = 0``: one solve per output column on its kept rows.

    ``xtx`` = XᵀX (K, K), ``xty`` = XᵀY (K, N); ``damping`` × mean diagonal is added for stability, as a
    pull toward ``prior`` (K, N) when given (ridge toward the current weights) else toward zero.
    Columns sharing the same kept rows are solved together.
    """
    h, g = _normalized(xtx, xty, rows, damping, prior)
    out = np.zeros(mask.shape, dtype=np.float64)
    patterns: dict[bytes, list[int]] = {}
    for col in range(mask.shape[1]):
        patterns.setdefault(np.packbits(mask[:, col]).tobytes(), []).append(col)
    for cols in patterns.values():
        rows_kept = np.flatnonzero(mask[:, cols[0]])
        if rows_kept.size == 0:
            continue
        sub = h[np.ix_(rows_kept, rows_kept)]
        out[np.ix_(rows_kept, cols)] = scipy.linalg.solve(sub, g[np.ix_(rows_kept, cols)], assume_a="pos")
    return out


def whitening(xtx: np.ndarray, rows: int, damping: float = 1e-4) -> np.ndarray:
    """Lower Cholesky factor L of the damped input covariance (H = L Lᵀ)."""
    h, _ = _normalized(xtx, np.zeros((xtx.shape[0], 1)), rows, damping)
    return np.linalg.cholesky(h)


def factorize(target: np.ndarray, rank: int, chol: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors ``U (K, r)``, ``V (r, N)`` of ``target``, in the metric ``‖Lᵀ(·)‖`` when
    ``chol`` = L is given (activation-aware SVD), else the plain Frobenius norm.

    Returns ``(U, V, singular values of the (whitened) target)``; factors are balanced (√σ each).
    """
    whitened = target if chol is None else chol.T @ target
    left, sigma, right = np.linalg.svd(whitened, full_matrices=False)
    root = np.sqrt(sigma[:rank])
    u = left[:, :rank] * root
    if chol is not None:
        u = scipy.linalg.solve_triangular(chol.T, u, lower=False)
    return u, root[:, None] * right[:rank], sigma


def solve_low_rank_ridge(
    xtx: np.ndarray, xty: np.ndarray, rows: int, rank: int, prior: np.ndarray, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """``argmin ‖X U V − Y‖² / rows + λ‖U V − prior‖²`` over rank-``rank`` factors, λ = ``strength`` × the
    mean diagonal of XᵀX/rows: least squares pulled toward ``prior`` (the un-recovered factorization).

    Exact: the objective is ``‖(H + λI)^½ (W − W*)‖²`` + const with ``W* = (H + λI)⁻¹(XᵀY/rows + λ prior)``,
    so the best rank-r ``W`` is the SVD of ``W*`` whitened by ``H + λI``. ``strength`` → 0 gives the
    rank-r least-squares fit; → ∞ gives ``prior`` (when it has rank ``rank``).
    """
    h, g = _normalized(xtx, xty, rows, strength, prior)
    chol = np.linalg.cholesky(h)
    optimum = scipy.linalg.cho_solve((chol, True), g)
    u, v, _ = factorize(optimum, rank, chol)
    return u, v


def relative_error(xtx: np.ndarray, xty: np.ndarray, yty: float, w: np.ndarray) -> float:
    """``‖X W − Y‖² / ‖Y‖²`` from the Gram statistics (float64)."""
    residual = float(np.einsum("kn,kn->", w, xtx @ w) - 2 * np.einsum("kn,kn->", w, xty) + yty)
    return max(residual, 0.0) / max(yty, 1e-30)


# --------------------------------------------------------------------------- custom-op lowering


def gemm_alpha(node: ir.Node) -> float:
    return float(node.attributes.get_float("alpha", 1.0)) if node.op_type == "Gemm" else 1.0


def layer_bias(node: ir.Node, n: int) -> np.ndarray | None:
    """The (N,) bias a Gemm adds (``beta × C``) or a Conv's B, None when it has none; ValueError if it
    is not a constant broadcastable to one value per output column."""
    if node.op_type not in ("Gemm", "Conv") or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = constant_tensor(node.inputs[2])
    if c is None:
        raise ValueError(f"{node.op_type} bias is not a constant")
    c = c.numpy().astype(np.float32)
    if node.op_type == "Conv":
        if c.size != n:
            raise ValueError("Conv bias is not one value per output channel")
        return c.reshape(n)
    if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
        raise ValueError(f"Gemm bias of shape {c.shape} is not one value per output column")
    return (np.broadcast_to(c.reshape(-1), (n,)) * float(node.attributes.get_float("beta", 1.0))).astype(np.float32)


def conv_geometry(node: ir.Node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(strides, pads, dilations)`` of a 2-D Conv as SparseConv takes them; ValueError if SparseConv
    can't run it (auto_pad SAME_*, not 2-D)."""
    attrs = node.attributes
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv auto_pad={auto_pad}")
    strides = tuple(attrs.get_ints("strides", [1, 1]))
    dilations = tuple(attrs.get_ints("dilations", [1, 1]))
    pads = tuple(attrs.get_ints("pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ValueError("Conv is not 2-D")
    return strides, pads, dilations


def custom_op_blocker(use: WeightUse) -> str | None:
    """Why ``use`` cannot become an ``ai.onnxopt`` node (None when it can; Conv: SparseConv only)."""
    node = use.node
    if node.op_type not in ("MatMul", "Gemm", "Conv"):
        return f"{node.op_type} has no onnxopt kernel"
    if node.op_type == "Conv":
        if use.array().ndim != 4:
            return "Conv is not 2-D"
        try:
            conv_geometry(node)
        except ValueError as exc:
            return str(exc)
    if constant_tensor(use.value).dtype != ir.DataType.FLOAT or use.activation.dtype not in (None, ir.DataType.FLOAT):
        return "not float32"
    if use.shared:
        return "weight shared by several nodes"
    if use.activation.shape is not None and len(use.activation.shape) < 1:
        return "scalar input"
    try:
        layer_bias(node, use.matrix().shape[1])
    except ValueError as exc:
        return str(exc)
    return None


def lower_to_custom_op(
    model: ir.Model, use: WeightUse, pack: Callable[[np.ndarray], ops.PackedWeight],
    bias: np.ndarray | None = None,
) -> ir.Node:
    """Replace the MatMul/Gemm/Conv of ``use`` by the ``ai.onnxopt`` node of ``pack(W)``; same name and output.

    ``W`` is the layer's (K, N) matrix with Gemm's ``alpha`` folded in; the bias input is ``bias`` if
    given, else Gemm's ``beta × C``. Check :func:`custom_op_blocker` first.
    """
    node, graph = use.node, use.graph
    matrix = use.matrix() * np.float32(gemm_alpha(node))
    packed = pack(matrix)
    if bias is None:
        bias = layer_bias(node, matrix.shape[1])
    bias_value = None if bias is None else new_initializer(graph, f"{node.name or use.value.name}.bias", bias)
    name = node.name or f"{packed.op_type}_{use.value.name}"
    new_node, inits = ops.make_node(packed, use.activation, bias_value, name=name)
    taken = value_names(model.graph)  # unique model-wide: a subgraph layer may be named like a main one
    for value in inits:
        value.name = unique_name(value.name, taken)
        taken.add(value.name)
        graph.register_initializer(value)
    old_inputs = [v for v in node.inputs if v is not None]
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new_node], node.outputs, new_node.outputs)
    new_node.name = name
    for value in old_inputs:
        drop_if_unused(value)
    model.opset_imports.setdefault(ops.DOMAIN, ops.OPSET_VERSION)
    return new_node


def absorb_relu(node: ir.Node) -> bool:
    """Fold the Relu that alone consumes a ``SparseMatMul``/``SparseConv`` output into the node
    (``activation="relu"``; one op and one pass over the output fewer). False when there is none."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output() or node.attributes.get_string("activation", "none") != "none":
        return False
    relu = uses[0].node
    if relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx") or relu.graph is not node.graph:
        return False
    node.attributes["activation"] = ir.AttrString("activation", "relu")
    ir.convenience.replace_nodes_and_values(node.graph, relu, [relu], [], relu.outputs, [out])
    return True


def absorb_maxpool(node: ir.Node) -> bool:
    """Fold the MaxPool that alone consumes a ``SparseConv`` output into the node (``maxpool_kernel_shape``,
    ``maxpool_strides``): the pooled planes are written directly, without the pre-pool tensor and, in
    onnxruntime, without the NCHWc reorders its own MaxPool would get. Only the MaxPools the kernel
    computes: 2-D, no pads, unit dilations, floor sizes, the Indices output unused. False otherwise."""
    out = node.outputs[0]
    uses = out.uses()
    if node.op_type != "SparseConv" or len(uses) != 1 or out.is_graph_output() or "maxpool_kernel_shape" in node.attributes:
        return False
    pool = uses[0].node
    if pool.op_type != "MaxPool" or pool.domain not in ("", "ai.onnx") or pool.graph is not node.graph:
        return False
    kernel = list(pool.attributes.get_ints("kernel_shape", []))
    if (len(kernel) != 2 or any(pool.attributes.get_ints("pads", [0])) or set(pool.attributes.get_ints("dilations", [1])) != {1}
            or pool.attributes.get_int("ceil_mode", 0) or pool.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
            or any(v.uses() or v.is_graph_output() for v in pool.outputs[1:])):
        return False
    node.attributes["maxpool_kernel_shape"] = ir.AttrInt64s("maxpool_kernel_shape", kernel)
    node.attributes["maxpool_strides"] = ir.AttrInt64s("maxpool_strides", list(pool.attributes.get_ints("strides", [1, 1])))
    out.shape = pool.outputs[0].shape
    ir.convenience.replace_nodes_and_values(node.graph, pool, [pool], [], pool.outputs[:1], [out])
    return True


def packed_from_node(node: ir.Node) -> ops.PackedWeight:
    """The :class:`ops.PackedWeight` an ``ai.onnxopt`` node holds (constant inputs after X, bias excluded)."""
    names = ops._INPUT_NAMES[node.op_type]  # noqa: SLF001 - layout owned by onnxopt.ops
    inputs = {}
    for key, value in zip(names, node.inputs[1:]):
        if key != "bias" and value is not None:
            inputs[key] = constant_array(value)
    return ops.PackedWeight(node.op_type, inputs, {k: a.value for k, a in node.attributes.items()})


def bias_input_index(node: ir.Node) -> int:
    """Input position of the optional bias of an ``ai.onnxopt`` node."""
    return len(ops._INPUT_NAMES[node.op_type])  # noqa: SLF001
