"""Streaming statistics of the activations that multiply weights, for data-aware passes.

GPTQ needs the Hessian ``XᵀX`` of a layer's inputs, Wanda the column norms ``‖X_k‖``, activation-aware
SVD the covariance, and layer-wise recovery the cross term ``X_cᵀ X_o`` between the compressed and the
original model's inputs to the same layer. All of them are sums over rows, accumulated batch by batch
(:class:`Gram`), so memory is ``O(K²)`` per layer whatever the number of samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calibration import Dataset, capture, capture_many
from onnxopt.errors import DataError
from onnxopt.ops import im2col
from onnxopt.weights import WeightUse


@dataclasses.dataclass
class Gram:
    """Running ``XᵀX`` (float64) and ``XᵀY`` of row vectors (``Y`` optional), and how many rows hold each
    feature nonzero."""

    xtx: np.ndarray
    xty: np.ndarray | None = None
    rows: int = 0
    nonzero: np.ndarray | None = None

    @classmethod
    def empty(cls, k: int, n: int | None = None) -> Gram:
        return cls(np.zeros((k, k)), None if n is None else np.zeros((k, n)), nonzero=np.zeros(k, np.int64))

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.xtx += x.T @ x
        if y is not None:
            self.xty += x.T @ y.reshape(-1, y.shape[-1]).astype(np.float64)
        if self.nonzero is not None:
            self.nonzero += np.count_nonzero(x, axis=0)
        self.rows += x.shape[0]

    @property
    def column_norms(self) -> np.ndarray:
        """``‖X_k‖₂`` per input feature (Wanda's activation norm)."""
        return np.sqrt(np.maximum(np.diag(self.xtx), 0.0))

    @property
    def nonzero_rates(self) -> np.ndarray:
        """Fraction of the rows in which each feature is nonzero."""
        return self.nonzero / max(self.rows, 1)

    def hessian(self, damping: float = 0.01) -> np.ndarray:
        """``XᵀX / rows`` with ``damping × mean diagonal`` added, positive definite for Cholesky."""
        h = self.xtx / max(self.rows, 1)
        return h + np.eye(h.shape[0]) * damping * max(float(np.mean(np.diag(h))), 1e-8)


def layer_input_rows(use: WeightUse, x: np.ndarray) -> np.ndarray:
    """The rows that multiply the (K, N) weight matrix of ``use``: (..., K) -> (rows, K); Conv via im2col."""
    node = use.node
    if node.op_type == "Conv":
        return _im2col(x, use)
    if node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
        x = x.T
    return x.reshape(-1, x.shape[-1])


def _im2col(x: np.ndarray, use: WeightUse) -> np.ndarray:
    """Patches of a Conv's NCHW input as rows (kernel window flattened in the weight's (C, kh, kw) order)."""
    attrs = use.node.attributes
    if "auto_pad" in attrs and attrs["auto_pad"].value not in ("NOTSET", b"NOTSET"):
        raise DataError(f"{use.label}: auto_pad convolutions are not supported for activation statistics")
    return im2col(x, use.array().shape[2:], attrs.get_ints("strides", (1, 1)), attrs.get_ints("pads", (0, 0, 0, 0)),
                  attrs.get_ints("dilations", (1, 1)))


def input_grams(
    model: ir.Model, uses: Sequence[WeightUse], data: Dataset, limit: int | None = 256, batch_size: int = 8
) -> dict[str, Gram]:
    """``XᵀX`` of the inputs of each weight use, keyed by the use's activation value name.

    Only layers of the main graph can be observed; uses inside subgraphs are left out of the result.
    """
    readers: dict[str, WeightUse] = {}  # one per activation: layers reading the same input count it once
    for use in _observable(model, uses):
        readers.setdefault(use.activation.name, use)
    grams: dict[str, Gram] = {}

    def on_batch(outputs: dict[str, np.ndarray]) -> None:
        for name, use in readers.items():
            rows = layer_input_rows(use, outputs[name])
            grams.setdefault(name, Gram.empty(rows.shape[1])).update(rows)

    if readers:
        capture(model, list(readers), data.batches(model, batch_size, limit), on_batch)
    return grams


def cross_gram(
    original: ir.Model, original_use: WeightUse, compressed: ir.Model, use: WeightUse, data: Dataset,
    limit: int | None = 256, batch_size: int = 8,
) -> Gram:
    """``X_cᵀX_c`` and ``X_cᵀ(X_o W_o)`` for re-fitting ``use``'s weight in ``compressed``.

    ``original_use`` is the same layer in the original model (input ``X_o``, weight ``W_o``); ``X_c`` is
    the compressed model's own input to the layer. Both models run in lockstep on the same batches, so
    rows are aligned and only one batch is held at a time.
    """
    if original_use.activation is None or use.activation is None:
        raise DataError(f"{use.label}: layer has no activation input to observe")
    w_orig = original_use.matrix()
    gram = Gram.empty(w_orig.shape[0], w_orig.shape[1])
    a_orig, a_comp = original_use.activation.name, use.activation.name

    def on_batch(outs: list[dict[str, np.ndarray]]) -> None:
        target = layer_input_rows(original_use, outs[0][a_orig]) @ w_orig
        gram.update(layer_input_rows(use, outs[1][a_comp]), target)

    capture_many([(original, [a_orig]), (compressed, [a_comp])], data.batches(original, batch_size, limit), on_batch)
    return gram


def _observable(model: ir.Model, uses: Sequence[WeightUse]) -> list[WeightUse]:
    return [u for u in uses if u.graph is model.graph and u.activation is not None]
