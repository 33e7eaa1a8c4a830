"""Shared numerics of the quantization passes.

* Affine quantization: integer ranges, scale/zero-point from a real range, quantize/dequantize
  (per tensor or per channel).
* Block-wise weight quantization along K of a ``(K, N)`` matrix (``y = x @ W``), with the same
  conventions as :func:`onnxopt.ops.pack_quant_matmul` and onnxruntime's MatMulNBits quantizer:
  symmetric int4 maps the value of largest magnitude to -8 (signed scale), symmetric int8 uses
  ``max|w| / 127``, asymmetric uses ``(max - min) / (2**bits - 1)`` with a zero point.
* Int4 nibble packing (element ``2i`` in the low nibble of byte ``i``).
* Streaming range calibrators (``minmax | percentile | entropy | mse``): running min/max and a
  fixed-size histogram of ``|x|`` whose range doubles (merging bin pairs, exactly) when a larger
  value arrives, so memory does not depend on the number of samples.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import numpy as np

from onnxopt.errors import OnnxoptError

IntType = Literal["int8", "uint8", "int4", "uint4"]
INT_RANGES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
STORAGE = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")


def raise_opset(model, version: int, purpose: str, notes: list[str]) -> bool:
    """Convert ``model`` (onnx_ir) to default opset ``version`` if it is older (onnxscript's version converter,
    onnx's as fallback), noting it; True when converted (the graphs may be new objects: scan them again)."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    from onnxscript import version_converter

    # the fallback (onnx's C converter) rebuilds the graphs: carry the initializers' metadata (sparse storage)
    meta = {name: dict(v.meta) for g in model.graphs() for name, v in g.initializers.items() if v.meta}
    version_converter.convert_version(model, version, fallback=True)
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            value.meta.update(meta.get(name, {}))
    if model.opset_imports.get("", 1) < version:
        raise OnnxoptError(f"{purpose} needs opset {version}; converting the model from opset {current} failed")
    notes.append(f"default opset {current} -> {version} for {purpose}")
    return True


def int_range(dtype: str, reduce_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of ``dtype``; ``reduce_range`` drops one bit (7-bit int8/uint8, as on non-VNNI CPUs)."""
    if dtype not in INT_RANGES:
        raise ValueError(f"unknown integer type '{dtype}' (valid: {', '.join(INT_RANGES)})")
    qmin, qmax = INT_RANGES[dtype]
    if reduce_range:
        qmin, qmax = (qmin // 2, qmax // 2) if qmin < 0 else (0, qmax // 2)
    return qmin, qmax


@functools.cache
def u8s8_saturates() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels may saturate on this CPU.

    On x86 without VNNI they multiply with ``vpmaddubsw``, whose int16 pair sums clip; 7-bit weights
    (``reduce_range``) keep every pair sum in range. Other CPUs, or an unreadable ``/proc/cpuinfo``: False.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not {"avx512_vnni", "avx_vnni", "avx_vnni_int8"} & set(flags)


def resolve_reduce_range(reduce_range: bool | None, activation_type: str, weight_type: str) -> bool:
    """``reduce_range`` as given, or (None) on exactly when uint8 x int8 products saturate on this CPU."""
    if reduce_range is not None:
        return reduce_range
    return activation_type == "uint8" and weight_type == "int8" and u8s8_saturates()


def scale_zero_point(
    rmin: np.ndarray | float, rmax: np.ndarray | float, dtype: str, symmetric: bool, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``dtype`` storage) mapping ``[rmin, rmax]`` (widened to hold 0)."""
    qmin, qmax = int_range(dtype, reduce_range)
    rmin = np.minimum(np.asarray(rmin, np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, np.float64), 0.0)
    if symmetric:
        zero = 0 if qmin < 0 else (qmin + qmax + 1) // 2
        scale = np.maximum(-rmin, rmax) / (qmax - zero)
        zp = np.full(scale.shape, zero, np.float64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - rmin / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp.astype(STORAGE[dtype])


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str, axis: int | None = None,
    reduce_range: bool = False,
) -> np.ndarray:
    """``clip(rint(x / scale) + zp)`` like ONNX QuantizeLinear (round half to even)."""
    qmin, qmax = int_range(dtype, reduce_range)
    scale, zero_point = _broadcast(scale, x.ndim, axis), _broadcast(zero_point, x.ndim, axis)
    q = np.rint(x.astype(np.float32) / scale) + zero_point.astype(np.float32)
    return np.clip(q, qmin, qmax).astype(STORAGE[dtype])


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``(q - zp) * scale`` like ONNX DequantizeLinear."""
    scale, zero_point = _broadcast(scale, q.ndim, axis), _broadcast(zero_point, q.ndim, axis)
    return ((q.astype(np.float32) - zero_point.astype(np.float32)) * scale).astype(np.float32)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def channel_ranges(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``w`` per index of ``axis`` (over everything when ``axis`` is None)."""
    if axis is None:
        return np.asarray(w.min()), np.asarray(w.max())
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    return w.min(axis=other), w.max(axis=other)


# --------------------------------------------------------------------------- block-wise weights


@dataclasses.dataclass
class BlockQuantized:
    """``W (K, N)`` quantized in blocks of ``block_size`` rows: ``W[k, n] ≈ (codes - zp) * scale``.

    Symmetric: signed codes (int8 storage), no zero point. Asymmetric: unsigned codes and zero points.
    ``scales`` and ``zero_points`` have shape ``(ceil(K / block_size), N)``.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def unsigned_codes(self) -> np.ndarray:
        """Codes shifted to ``[0, 2**bits)`` (symmetric: implicit zero point ``2**(bits-1)``)."""
        offset = 1 << (self.bits - 1) if self.symmetric else 0
        return (self.codes.astype(np.int16) + offset).astype(np.uint8)

    def unsigned_zero_points(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        rows = self.codes.shape[0]
        scale = np.repeat(self.scales, self.block_size, axis=0)[:rows]
        zp = 0.0 if self.zero_points is None else np.repeat(self.zero_points, self.block_size, axis=0)[:rows]
        return ((self.codes.astype(np.float32) - zp) * scale).astype(np.float32)


def block_params(block: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point when asymmetric) per column of one ``(rows, N)`` block."""
    block = block.astype(np.float32)
    if symmetric:
        if bits == 8:
            scale = np.abs(block).max(axis=0) / np.float32(127)
        else:
            extreme = np.take_along_axis(block, np.abs(block).argmax(axis=0)[None, :], axis=0)[0]
            scale = extreme / np.float32(-(1 << (bits - 1)))
        return scale.astype(np.float32), None
    qmax = (1 << bits) - 1
    low, high = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
    scale = ((high - low) / np.float32(qmax)).astype(np.float32)
    safe = np.where(scale != 0, scale, 1).astype(np.float32)
    zp = np.where(scale != 0, np.clip(np.rint(-low / safe), 0, qmax), 0).astype(np.uint8)
    return scale, zp


def quantize_rows(rows: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes of ``rows (r, N)`` under per-column ``scale``/``zero_point`` (signed when no zero point)."""
    safe = np.where(scale != 0, scale, 1).astype(np.float32)
    if zero_point is None:
        half = 1 << (bits - 1)
        q = np.where(scale != 0, np.rint(rows / safe), 0)
        return np.clip(q, -half, half - 1).astype(np.int8)
    q = np.where(scale != 0, np.rint(rows / safe) + zero_point, zero_point)
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    zp = 0.0 if zero_point is None else zero_point.astype(np.float32)
    return ((codes.astype(np.float32) - zp) * scale).astype(np.float32)


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuantized:
    """Round-to-nearest block quantization of ``w (K, N)`` along K."""
    check_block_options(bits, block_size)
    w = np.asarray(w, np.float32)
    k = w.shape[0]
    codes = np.empty(w.shape, np.int8 if symmetric else np.uint8)
    scales, zps = [], []
    for start in range(0, k, block_size):
        block = w[start : start + block_size]
        scale, zp = block_params(block, bits, symmetric)
        codes[start : start + block_size] = quantize_rows(block, scale, zp, bits)
        scales.append(scale)
        zps.append(zp)
    return BlockQuantized(codes, np.stack(scales), None if symmetric else np.stack(zps), bits, block_size)


def check_block_options(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"block_size must be one of 16, 32, 64, 128, 256, got {block_size}")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (0..15, uint8) along the last axis, two per byte, low nibble first."""
    codes = np.asarray(codes, np.uint8) & 0x0F
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``count`` values of the last axis."""
    packed = np.asarray(packed, np.uint8)
    both = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


# --------------------------------------------------------------------------- calibration

HISTOGRAM_BINS = 2048


class RangeCalibrator:
    """Streaming statistics of one tensor: running min/max, non-finite count, optional histogram of |x|."""

    def __init__(self, method: str = "minmax", percentile: float = 99.999, bins: int = HISTOGRAM_BINS):
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got '{method}'")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.method = method
        self.percentile = percentile
        self.minimum = np.inf
        self.maximum = -np.inf
        self.nonfinite = 0
        self.count = 0
        self.hist = np.zeros(bins, np.int64) if method != "minmax" else None
        self.edge = 0.0  # the histogram covers |x| in (0, edge]
        self.zeros = 0  # exact zeros are counted apart: they quantize exactly whatever the range

    @property
    def absmax(self) -> float:
        return float(max(abs(self.minimum), abs(self.maximum))) if self.count else 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        x = x.astype(np.float32, copy=False).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
            if x.size == 0:
                return
        self.count += x.size
        self.minimum = min(self.minimum, float(x.min()))
        self.maximum = max(self.maximum, float(x.max()))
        if self.hist is not None:
            self._add_to_histogram(np.abs(x))

    def _add_to_histogram(self, magnitude: np.ndarray) -> None:
        nonzero = magnitude[magnitude > 0]
        self.zeros += magnitude.size - nonzero.size
        if nonzero.size == 0:
            return
        magnitude = nonzero
        top = float(magnitude.max())
        if self.edge == 0.0:
            self.edge = top
        elif top > self.edge:
            # Double the covered range until it fits; merging bin pairs keeps counts exact.
            doublings = int(np.ceil(np.log2(top / self.edge)))
            bins = self.hist.size
            for _ in range(min(doublings, int(np.log2(bins)) + 1)):
                self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(bins // 2, np.int64)])
            self.edge *= 2.0**doublings
        width = self.edge / self.hist.size
        index = np.minimum((magnitude / width).astype(np.int64), self.hist.size - 1)
        self.hist += np.bincount(index, minlength=self.hist.size)

    def range(self, levels: int = 256, symmetric: bool = True) -> tuple[float, float]:
        """The calibrated (low, high) range; raises ValueError when nothing finite was seen.

        ``levels`` (integer values of the target type) and ``symmetric`` describe the quantization the
        range is for: clipping methods weigh rounding noise with the step the range will really get.
        """
        if self.count == 0:
            raise ValueError("no finite values observed")
        if self.method == "minmax" or self.edge == 0.0:
            return self.minimum, self.maximum
        threshold = min(self._threshold(levels, symmetric), self.absmax)
        return max(self.minimum, -threshold), min(self.maximum, threshold)

    def _levels_below(self, threshold: float, levels: int, symmetric: bool) -> float:
        """Quantization steps covering ``[0, threshold]`` of |x| when the range is clipped at ``threshold``.

        Symmetric: half of them. Asymmetric: the share of ``[low, high]`` that ``[0, threshold]`` is, so a
        one-sided tensor (a ReLU output) gets all of them.
        """
        if symmetric:
            return levels / 2
        span = min(self.maximum, threshold) + min(-min(self.minimum, 0.0), threshold)
        return (levels - 1) * threshold / max(span, threshold)

    def _threshold(self, levels: int, symmetric: bool) -> float:
        width = self.edge / self.hist.size
        if self.method == "percentile":
            cumulative = (self.zeros + np.cumsum(self.hist)) / (self.zeros + self.hist.sum())
            return float(np.searchsorted(cumulative, self.percentile / 100.0) + 1) * width
        steps = lambda keep: self._levels_below(keep * width, levels, symmetric)  # noqa: E731
        if self.method == "entropy":
            return float(_entropy_threshold_bins(self.hist, steps)) * width
        return float(_mse_threshold_bins(self.hist, steps)) * width


def _threshold_candidates(hist: np.ndarray, first: int, stride: int) -> list[int]:
    """Bin counts to try as the clipping threshold: from ``first`` up to the last non-empty bin."""
    occupied = np.flatnonzero(hist)
    top = int(occupied[-1]) + 1 if occupied.size else hist.size
    return [*range(min(first, top), top, stride), top]


def _entropy_threshold_bins(hist: np.ndarray, steps: Callable[[int], float], stride: int = 8) -> int:
    """Number of bins to keep minimizing KL(P || Q) (TensorRT's method).

    P is the histogram clipped at the candidate threshold (the clipped mass piled into its last bin);
    Q is the part below the threshold merged into the ``steps(keep)`` quantization levels it gets and
    spread back over P's nonzero bins, so mass that clipping moves shows up as divergence.
    """
    hist = hist.astype(np.float64)
    best, best_kl = hist.size, np.inf
    for keep in _threshold_candidates(hist, 128, stride):
        levels = int(min(keep, max(1, round(steps(keep)))))
        p = hist[:keep].copy()
        p[-1] += hist[keep:].sum()
        support = p > 0
        level = np.arange(keep) * levels // keep
        mass = np.bincount(level, hist[:keep], levels)
        spread = np.bincount(level, support, levels)
        q = np.where(support, mass[level] / np.maximum(spread[level], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best, best_kl = keep, kl
    return best


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL divergence of two histograms over P's support; bins Q lost (clipped mass) count as ``eps``.

    Bins empty in both do not matter: smoothing them would penalize wide ranges (many empty bins).
    """
    if q.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / np.maximum(q[support], eps))))


def _mse_threshold_bins(hist: np.ndarray, steps: Callable[[int], float], stride: int = 4) -> int:
    """Number of bins to keep minimizing the expected squared error (rounding noise + clipping)."""
    hist = hist.astype(np.float64)
    centers = np.arange(hist.size) + 0.5
    best, best_err = hist.size, np.inf
    for keep in _threshold_candidates(hist, stride, stride):
        step = keep / steps(keep)
        inside = hist[:keep].sum() * step * step / 12.0
        clipped = np.sum(hist[keep:] * (centers[keep:] - keep) ** 2)
        if inside + clipped < best_err:
            best, best_err = keep, inside + clipped
    return best


def progress(items: Iterable, total: int | None, desc: str) -> Iterator:
    """Iterate with a progress bar (tqdm when installed, else a few plain lines on stderr)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr)
        return
    step = max(1, (total or 10) // 10)
    for i, item in enumerate(items, 1):
        if i % step == 0 or i == total:
            print(f"{desc}: {i}/{total if total else '?'}", file=sys.stderr)
        yield item


def quantize_tensor(
    w: np.ndarray, dtype: str = "int8", axis: int | None = None, symmetric: bool = True, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a weight per tensor or per channel (``axis``): returns (codes, scale, zero_point)."""
    low, high = channel_ranges(w, axis)
    scale, zp = scale_zero_point(low, high, dtype, symmetric, reduce_range)
    return quantize(w, scale, zp, dtype, axis, reduce_range), scale, zp


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    """``‖ref - approx‖ / ‖ref‖`` (0 for an all-zero reference reproduced exactly)."""
    norm = float(np.linalg.norm(reference))
    diff = float(np.linalg.norm(reference.astype(np.float64) - approximation))
    return diff / norm if norm > 0 else diff


def inverse_hessian_factor(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) and the mask of dead inputs (zero diagonal)."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def gptq_quantize(
    w: np.ndarray, inverse_factor: tuple[np.ndarray, np.ndarray], bits: int, block_size: int,
    symmetric: bool = True, batch: int = 128,
) -> BlockQuantized:
    """GPTQ block quantization of ``w (K, N)`` given :func:`inverse_hessian_factor` of its inputs.

    Rows (input features) are quantized in order; each row's rounding error is spread over the
    rows not yet quantized through the upper Cholesky factor of ``H⁻¹``, updates being applied
    lazily in batches of ``batch`` rows. Block scales are chosen from the compensated weights
    when a block starts, exactly as in RTN, so the result has RTN's storage format.
    """
    check_block_options(bits, block_size)
    hinv, dead = inverse_factor
    w = np.array(w, dtype=np.float64)
    k = w.shape[0]
    if hinv.shape != (k, k):
        raise ValueError(f"Hessian factor shape {hinv.shape} does not match weight rows {k}")
    w[dead] = 0.0
    batch = max(block_size, batch // block_size * block_size)
    codes = np.empty(w.shape, np.int8 if symmetric else np.uint8)
    scales, zps = [], []
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        rows = w[start:stop].copy()
        errors = np.zeros_like(rows)
        inv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            if (start + i) % block_size == 0:
                scale, zp = block_params(rows[i : i + block_size], bits, symmetric)
                scales.append(scale)
                zps.append(zp)
            q = quantize_rows(rows[i : i + 1].astype(np.float32), scale, zp, bits)
            codes[start + i] = q[0]
            err = (rows[i] - dequantize_rows(q, scale, zp)[0]) / inv_block[i, i]
            rows[i:] -= np.outer(inv_block[i, i:], err)
            errors[i] = err
        w[stop:] -= hinv[start:stop, stop:].T @ errors
    return BlockQuantized(codes, np.stack(scales), None if symmetric else np.stack(zps), bits, block_size)
