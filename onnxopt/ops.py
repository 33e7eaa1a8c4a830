"""Custom operators of the ``ai.onnxopt`` domain: schemas, weight packing, numpy references.

Four MatMul ops, all ``Y = X @ W (+ bias)`` with ``X`` float32 ``(..., K)`` (leading dims flattened
to M rows) and ``Y`` float32 ``(..., N)``, and ``SparseConv``; every op takes an optional float32
``bias`` of shape ``(N,)`` as its last input. The C++ kernels live in ``kernels/`` (see ``kernels/README.md``),
the library is located by :func:`onnxopt.kernels.library_path`.

Weight layouts (all arrays are C-contiguous, little-endian; padding bits/bytes are zero):

``BinaryMatMul``  inputs ``X, bits, alpha[, bias]``; attributes ``K, N``.
    ``bits``: uint32 ``(ceil(N/16), ceil(K/32), 16)``; bit ``j`` of ``bits[c, w, l]`` is 1 when
    ``W[32*w + j, 16*c + l] >= 0`` (sign +1), else 0 (sign -1). ``alpha``: float32 ``(N,)``.
    ``Y = X @ (alpha * sign(W))``. Float activations.

``XnorMatMul``  inputs ``X, bits, alpha[, bias]``; attributes ``K, N``.
    ``bits``: uint64 ``(ceil(N/8), ceil(K/64), 8)``; bit ``j`` of ``bits[c, w, l]`` is 1 when
    ``W[64*w + j, 8*c + l] >= 0``. Activations are binarized per row on the fly:
    ``xa = (x >= 0)``, ``beta = mean(|x|)`` over K; ``Y = beta * alpha * (K - 2*popcount(xa ^ wb))``.

``SparseMatMul``  inputs ``X, values, indices, col_ptr, scales[, bias]``; attributes ``K, N[, activation]``.
    Compressed sparse columns (CSC) of ``W``: column ``n`` holds entries
    ``col_ptr[n] : col_ptr[n+1]``; entry ``j`` is ``W[indices[j], n] = values[j] * scales[n]``
    (absolute row indices, ascending within a column). ``col_ptr`` int32 ``(N + 1,)``,
    ``indices`` uint16 ``(nnz,)`` when ``K <= 65536`` else uint32, ``values`` float32 / float16 /
    int8 ``(nnz,)``, ``scales`` float32 ``(N,)`` (ones unless int8). ``activation``: ``"none"``
    (default) or ``"relu"``, applied to ``Y`` (a following Relu folded into the op).

``SparseConv``  inputs ``X, values, indices, col_ptr, scales[, bias]``; attributes ``K, N,
    kernel_shape, strides, pads, dilations`` (as Conv's, 2-D, group 1) and ``activation`` (as
    SparseMatMul's). ``X`` float32
    ``(B, C, H, W)``, ``Y`` ``(B, N, OH, OW)``. The weight ``(N, C, kh, kw)`` is stored as
    SparseMatMul's CSC of its GEMM view ``W[(c*kh + i)*kw + j, n]`` (``K = C*kh*kw``).
    Optional ``maxpool_kernel_shape``, ``maxpool_strides`` (default 1, as MaxPool's): a MaxPool
    without pads or dilations (floor sizes) applied after the activation, i.e. a following MaxPool
    folded into the op (``Y`` is then the pooled ``(B, N, PH, PW)``).

``QuantMatMul``  inputs ``X, weights, scales[, zero_points][, bias]``;
    attributes ``K, N, bits (4|8), block_size (32|64|128)``.
    Unsigned codes ``q`` with dequantized ``W[k, n] = (q[k, n] - zp[b, n]) * scale[b, n]``,
    ``b = k // block_size``; symmetric weights have no ``zero_points`` input and an implicit
    zero point of 8 (int4) / 128 (int8). Column blocks of 16 (``NB = ceil(N/16)``),
    ``nb = ceil(K/block_size)``: ``weights`` uint8 ``(NB, nb, block_size*2*bits)``, each
    (column block, K block) laid out as groups of ``32/bits`` K rows x 16 columns x 4 bytes: int8: byte ``i`` of lane ``l`` in group ``g`` = ``q[b*bs + 4g + i, 16c + l]``;
    int4: the byte holds ``q[b*bs + 8g + i]`` in its low nibble and ``q[b*bs + 8g + 4 + i]`` in its
    high nibble. ``scales`` float32/float16 ``(NB, nb, 16)``, ``zero_points`` uint8 ``(NB, nb, 16)``.
    The kernel quantizes activations to int8 per row and K block (``sx = max|x|/127``,
    ``xq = rint(x * (127/max|x|))``) and accumulates integer dot products (VNNI where present);
    :func:`reference` reproduces that.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx_ir

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "OP_TYPES",
    "PackedWeight",
    "pack_binary_matmul",
    "pack_xnor_matmul",
    "pack_sparse_matmul",
    "pack_sparse_conv",
    "pack_quant_matmul",
    "reference",
    "dense_weight",
    "conv_output_size",
    "im2col",
    "make_node",
    "register_schemas",
]

DOMAIN = "ai.onnxopt"
OPSET_VERSION = 1
OP_TYPES = ("BinaryMatMul", "XnorMatMul", "SparseMatMul", "SparseConv", "QuantMatMul")

# Names of the node inputs after X, in order, bias last (all ops).
_INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "BinaryMatMul": ("bits", "alpha", "bias"),
    "XnorMatMul": ("bits", "alpha", "bias"),
    "SparseMatMul": ("values", "indices", "col_ptr", "scales", "bias"),
    "SparseConv": ("values", "indices", "col_ptr", "scales", "bias"),
    "QuantMatMul": ("weights", "scales", "zero_points", "bias"),
}

# Largest K whose row indices fit uint16 (else the packer emits uint32 indices).
SPARSE_UINT16_MAX_K = 1 << 16


@dataclass(frozen=True)
class PackedWeight:
    """A packed weight ready to become the initializers and attributes of one node.

    ``inputs``: the node inputs after ``X`` (ordered, excluding bias; optional inputs that are
    absent are simply missing). ``attributes``: node attributes. ``has_bias_input``: whether the
    op takes an optional bias as its last input (True for all four ops).
    """

    op_type: str
    inputs: dict[str, np.ndarray]
    attributes: dict[str, int | float | str | tuple[int, ...]]
    has_bias_input: bool = True
    # Not part of the node; kept for convenience (e.g. original shape). Excluded from eq/hash.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.attributes["K"])

    @property
    def N(self) -> int:  # noqa: N802
        return int(self.attributes["N"])

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.inputs.values()))


def _as_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (K, N), got shape {w.shape}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"weight must be non-empty, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)
    return np.ascontiguousarray(w, dtype=np.float32)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _alpha(w: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    N = w.shape[1]
    if alpha is None:
        return np.ascontiguousarray(np.abs(w).mean(axis=0), dtype=np.float32)
    a = np.asarray(alpha, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.full(N, a[0], dtype=np.float32)
    if a.shape != (N,):
        raise ValueError(f"alpha must have shape ({N},), got {np.shape(alpha)}")
    return np.ascontiguousarray(a)


def _pack_sign_bits(w: np.ndarray, col_block: int, word_bits: int) -> np.ndarray:
    """bits[c, w, l] bit j = (W[word_bits*w + j, col_block*c + l] >= 0); zero padding."""
    K, N = w.shape
    NB, KW = _ceil(N, col_block), _ceil(K, word_bits)
    b = np.zeros((KW * word_bits, NB * col_block), dtype=bool)
    b[:K, :N] = w >= 0
    b = b.reshape(KW, word_bits, NB, col_block).transpose(2, 0, 3, 1)  # (NB, KW, cb, bits)
    packed = np.packbits(np.ascontiguousarray(b), axis=-1, bitorder="little")  # (NB,KW,cb,bits/8)
    dt = np.dtype("<u4") if word_bits == 32 else np.dtype("<u8")
    return np.ascontiguousarray(packed).view(dt).reshape(NB, KW, col_block).astype(dt.newbyteorder("="))


def _unpack_sign_bits(bits: np.ndarray, K: int, N: int, word_bits: int) -> np.ndarray:
    NB, KW, cb = bits.shape
    u8 = np.ascontiguousarray(bits.astype(bits.dtype.newbyteorder("<"))).view(np.uint8)
    u8 = u8.reshape(NB, KW, cb, word_bits // 8)
    b = np.unpackbits(u8, axis=-1, bitorder="little")  # (NB, KW, cb, word_bits)
    b = b.transpose(1, 3, 0, 2).reshape(KW * word_bits, NB * cb)
    return np.where(b[:K, :N] != 0, np.float32(1), np.float32(-1))


def pack_binary_matmul(w: np.ndarray, alpha: np.ndarray | None = None) -> PackedWeight:
    """Pack ``W (K, N)`` for ``BinaryMatMul``: sign bits + per-column alpha (default mean|W|)."""
    w = _as_weight(w)
    K, N = w.shape
    return PackedWeight(
        "BinaryMatMul",
        {"bits": _pack_sign_bits(w, 16, 32), "alpha": _alpha(w, alpha)},
        {"K": K, "N": N},
        True,
    )


def pack_xnor_matmul(w: np.ndarray, alpha: np.ndarray | None = None) -> PackedWeight:
    """Pack ``W (K, N)`` for ``XnorMatMul``: sign bits in 64-bit words + per-column alpha."""
    w = _as_weight(w)
    K, N = w.shape
    return PackedWeight(
        "XnorMatMul",
        {"bits": _pack_sign_bits(w, 8, 64), "alpha": _alpha(w, alpha)},
        {"K": K, "N": N},
        True,
    )


def pack_sparse_matmul(w: np.ndarray, value_dtype: str = "float32") -> PackedWeight:
    """Pack ``W (K, N)`` for ``SparseMatMul`` (zeros are the pruned entries).

    ``value_dtype``: ``"float32"``, ``"float16"`` or ``"int8"`` (symmetric per-column scale
    ``max|W[:, n]| / 127``; entries that round to 0 stay stored).
    """
    w = _as_weight(w)
    K, N = w.shape
    if value_dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"value_dtype must be float32, float16 or int8, got {value_dtype!r}")
    wt = w.T  # (N, K)
    nz_n, nz_k = np.nonzero(wt)  # sorted by column n, then row k
    vals = wt[nz_n, nz_k]
    col_ptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(np.bincount(nz_n, minlength=N), out=col_ptr[1:])
    if col_ptr[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many nonzeros for int32 col_ptr")
    indices = nz_k.astype(np.uint16 if K <= SPARSE_UINT16_MAX_K else np.uint32)
    scales = np.ones(N, dtype=np.float32)
    if value_dtype == "float32":
        values = vals.astype(np.float32)
    elif value_dtype == "float16":
        values = vals.astype(np.float16)
    else:
        amax = np.abs(w).max(axis=0)
        scales = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        values = np.clip(np.rint(vals / scales[nz_n]), -127, 127).astype(np.int8)
    return PackedWeight(
        "SparseMatMul",
        {
            "values": np.ascontiguousarray(values),
            "indices": np.ascontiguousarray(indices),
            "col_ptr": col_ptr.astype(np.int32),
            "scales": scales,
        },
        {"K": K, "N": N},
        True,
    )


def pack_sparse_conv(
    w: np.ndarray,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    value_dtype: str = "float32",
) -> PackedWeight:
    """Pack a Conv weight ``(N, C, kh, kw)`` (zeros are the pruned entries) for ``SparseConv``."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"Conv weight must be 4-D (N, C, kh, kw), got shape {w.shape}")
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ValueError("SparseConv is 2-D: strides and dilations need 2 values, pads 4")
    matrix = pack_sparse_matmul(w.reshape(w.shape[0], -1).T, value_dtype)
    attributes = {**matrix.attributes, "kernel_shape": tuple(int(d) for d in w.shape[2:]),
                  "strides": tuple(map(int, strides)), "pads": tuple(map(int, pads)), "dilations": tuple(map(int, dilations))}
    return PackedWeight("SparseConv", matrix.inputs, attributes, True)


def pack_quant_matmul(
    w: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    scale_dtype: str = "float32",
) -> PackedWeight:
    """Block-quantize ``W (K, N)`` along K for ``QuantMatMul``.

    Symmetric int4 uses the value of largest magnitude mapped to -8 (as onnxruntime's
    MatMulNBits quantizer does); symmetric int8 uses ``max|w|/127``. Asymmetric uses
    ``(max - min) / (2**bits - 1)`` with a uint8 zero point (range always includes 0).
    ``scale_dtype="float16"`` stores per block the fp16 neighbour of that scale (nearest, one step
    below or above) whose codes give the least squared weight error; float32 is the default so
    re-packing already-quantized weights reproduces them exactly.
    """
    w = _as_weight(w)
    K, N = w.shape
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size not in (32, 64, 128):
        raise ValueError(f"block_size must be 32, 64 or 128, got {block_size}")
    if scale_dtype not in ("float32", "float16"):
        raise ValueError(f"scale_dtype must be float32 or float16, got {scale_dtype!r}")
    bs = block_size
    nb = _ceil(K, bs)
    NB = _ceil(N, 16)
    Kp, Np = nb * bs, NB * 16
    qmax = (1 << bits) - 1
    wp = np.zeros((Kp, Np), dtype=np.float32)
    wp[:K, :N] = w
    wb = wp.reshape(nb, bs, Np)  # (nb, bs, Np)
    mn = None
    if symmetric:
        if bits == 4:
            idx = np.abs(wb).argmax(axis=1)  # (nb, Np)
            mx = np.take_along_axis(wb, idx[:, None, :], axis=1)[:, 0, :]
            scale = (mx / np.float32(-8)).astype(np.float32)
        else:
            scale = (np.abs(wb).max(axis=1) / np.float32(127)).astype(np.float32)
    else:
        mn = np.minimum(wb.min(axis=1), 0)
        mx = np.maximum(wb.max(axis=1), 0)
        scale = ((mx - mn) / np.float32(qmax)).astype(np.float32)
    if scale_dtype == "float32":
        q, zp = _block_codes(wb, scale, bits, symmetric, mn)
    else:
        scale, q, zp = _best_half_scales(wb, scale, bits, symmetric, mn)
    q = q.astype(np.uint8)  # (nb, bs, Np)
    # -> (NB, nb, bs, 16)
    qc = q.reshape(nb, bs, NB, 16).transpose(2, 0, 1, 3)
    if bits == 8:
        # groups of 4 K rows: (NB, nb, bs/4, 4, 16) -> (NB, nb, bs/4, 16, 4)
        packed = qc.reshape(NB, nb, bs // 4, 4, 16).transpose(0, 1, 2, 4, 3)
    else:
        g = qc.reshape(NB, nb, bs // 8, 2, 4, 16)  # [.., g, half, i, l]
        lo, hi = g[:, :, :, 0], g[:, :, :, 1]  # (NB, nb, bs/8, 4, 16)
        packed = (lo | (hi << 4)).astype(np.uint8).transpose(0, 1, 2, 4, 3)
    weights = np.ascontiguousarray(packed).reshape(NB, nb, bs * 2 * bits)
    sc = scale.reshape(nb, NB, 16).transpose(1, 0, 2)
    inputs = {"weights": weights, "scales": np.ascontiguousarray(sc.astype(scale_dtype))}
    if zp is not None:
        inputs["zero_points"] = np.ascontiguousarray(zp.reshape(nb, NB, 16).transpose(1, 0, 2))
    return PackedWeight(
        "QuantMatMul",
        inputs,
        {"K": K, "N": N, "bits": bits, "block_size": bs},
        True,
    )


def _block_codes(wb, scale, bits, symmetric, mn):
    """Codes (nb, bs, Np) and zero points (nb, Np) or None of blocks ``wb`` for ``scale``."""
    qmax = (1 << bits) - 1
    safe = np.where(scale != 0, scale, 1).astype(np.float32)
    if symmetric:
        inv = np.where(scale != 0, np.float32(1) / safe, 0).astype(np.float32)
        return np.clip(np.rint(wb * inv[:, None, :]) + (1 << (bits - 1)), 0, qmax), None
    zpf = np.clip(np.rint(-mn / safe), 0, qmax)
    zpf = np.where(scale != 0, zpf, 0)
    q = np.clip(np.rint(wb / safe[:, None, :]) + zpf[:, None, :], 0, qmax)
    return np.where(scale[:, None, :] != 0, q, zpf[:, None, :]), zpf.astype(np.uint8)


def _best_half_scales(wb, scale, bits, symmetric, mn):
    """float16 scales: per block the fp16 neighbour of ``scale`` (nearest, one step below or
    above) whose codes reconstruct the block with the least squared error. The search keeps the
    output error at or below fp32 scales' (rounding alone to the nearest half was measured 0.03%
    worse relative RMS on a 4096x4096 int4 GEMV)."""
    near = scale.astype(np.float16)
    cands = [near, np.nextafter(near, np.float16(-np.inf)), np.nextafter(near, np.float16(np.inf))]
    best = None
    for c in cands:
        c32 = c.astype(np.float32)
        q, zp = _block_codes(wb, c32, bits, symmetric, mn)
        z = (1 << (bits - 1)) if zp is None else zp.astype(np.float32)[:, None, :]
        err = (((q - z) * c32[:, None, :] - wb) ** 2).sum(axis=1)
        if best is None:
            best = [err, c, q, zp]
            continue
        take = err < best[0]
        best[0] = np.where(take, err, best[0])
        best[1] = np.where(take, c, best[1])
        best[2] = np.where(take[:, None, :], q, best[2])
        if zp is not None:
            best[3] = np.where(take, zp, best[3])
    return best[1], best[2], best[3]


def _quant_codes(packed: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (q (Kp, Np) float32 codes, scale (nb, Np), zp (nb, Np))."""
    a = packed.attributes
    bits, bs = int(a["bits"]), int(a["block_size"])
    wts = packed.inputs["weights"]
    NB, nb = wts.shape[0], wts.shape[1]
    if bits == 8:
        qc = wts.reshape(NB, nb, bs // 4, 16, 4).transpose(0, 1, 2, 4, 3).reshape(NB, nb, bs, 16)
    else:
        g = wts.reshape(NB, nb, bs // 8, 16, 4).transpose(0, 1, 2, 4, 3)  # (NB,nb,g,i,l)
        lo, hi = g & 0xF, g >> 4
        qc = np.stack([lo, hi], axis=3).reshape(NB, nb, bs, 16)
    q = qc.transpose(1, 2, 0, 3).reshape(nb * bs, NB * 16).astype(np.float32)
    scale = packed.inputs["scales"].astype(np.float32).transpose(1, 0, 2).reshape(nb, NB * 16)
    if "zero_points" in packed.inputs:
        zp = packed.inputs["zero_points"].astype(np.float32).transpose(1, 0, 2).reshape(nb, NB * 16)
    else:
        zp = np.full((nb, NB * 16), float(1 << (bits - 1)), dtype=np.float32)
    return q, scale, zp


def dense_weight(packed: PackedWeight) -> np.ndarray:
    """The (K, N) float32 weight the op effectively multiplies by."""
    K, N = packed.K, packed.N
    op = packed.op_type
    if op in ("BinaryMatMul", "XnorMatMul"):
        wb = 32 if op == "BinaryMatMul" else 64
        s = _unpack_sign_bits(packed.inputs["bits"], K, N, wb)
        return (s * packed.inputs["alpha"][None, :]).astype(np.float32)
    if op in ("SparseMatMul", "SparseConv"):
        n = np.repeat(np.arange(N), np.diff(packed.inputs["col_ptr"].astype(np.int64)))
        k = packed.inputs["indices"].astype(np.int64)
        out = np.zeros((K, N), dtype=np.float32)
        out[k, n] = packed.inputs["values"].astype(np.float32) * packed.inputs["scales"][n]
        return out
    if op == "QuantMatMul":
        bs = int(packed.attributes["block_size"])
        q, scale, zp = _quant_codes(packed)
        nb = scale.shape[0]
        d = (q.reshape(nb, bs, -1) - zp[:, None, :]) * scale[:, None, :]
        return np.ascontiguousarray(d.reshape(nb * bs, -1)[:K, :N], dtype=np.float32)
    raise ValueError(f"unknown op_type {op!r}")


def _quantize_rows(x2: np.ndarray, bs: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel's activation quantization: per row & K block, int8 codes and scales."""
    M = x2.shape[0]
    nb = _ceil(K, bs)
    xp = np.zeros((M, nb * bs), dtype=np.float32)
    xp[:, :K] = x2
    xb = xp.reshape(M, nb, bs)
    amax = np.abs(xb).max(axis=2)  # (M, nb)
    safe = np.where(amax > 0, amax, np.float32(1)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    xq = np.rint(xb * inv[:, :, None]).astype(np.float32)
    sx = (amax / np.float32(127)).astype(np.float32)
    return xq, sx


def conv_output_size(size: int, axis: int, attributes: dict) -> int:
    """Output length of SparseConv along spatial ``axis`` (0: H, 1: W) for an input of ``size``."""
    kernel, stride = attributes["kernel_shape"][axis], attributes.get("strides", (1, 1))[axis]
    dilation, pads = attributes.get("dilations", (1, 1))[axis], attributes.get("pads", (0, 0, 0, 0))
    return (size + pads[axis] + pads[axis + 2] - dilation * (kernel - 1) - 1) // stride + 1


def pooled_size(size: int, axis: int, attributes: dict) -> int:
    """Length along ``axis`` after SparseConv's folded MaxPool (``size`` itself without one)."""
    pool = attributes.get("maxpool_kernel_shape")
    if not pool:
        return size
    return (size - pool[axis]) // attributes.get("maxpool_strides", (1, 1))[axis] + 1


def sparse_conv_output_size(size: int, axis: int, attributes: dict) -> int:
    """Output length of SparseConv along spatial ``axis``, the folded MaxPool included."""
    return pooled_size(conv_output_size(size, axis, attributes), axis, attributes)


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """(N, C, H, W) -> (N·OH·OW, C·kh·kw) rows of 2-D conv patches, window in (C, kh, kw) order."""
    (kh, kw), dil = kernel, dilations
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wdt = x.shape
    oh = (h - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wdt - dil[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dil[0], j * dil[1]
            patch = x[:, :, hs : hs + strides[0] * oh : strides[0], ws : ws + strides[1] * ow : strides[1]]
            cols[..., i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)


def _conv_reference(packed: PackedWeight, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``SparseConv`` by im2col: ``X (B, C, H, W) -> (B, N, OH, OW)``."""
    a = packed.attributes
    oh, ow = conv_output_size(x.shape[2], 0, a), conv_output_size(x.shape[3], 1, a)
    rows = im2col(np.asarray(x, dtype=np.float64), a["kernel_shape"], a["strides"], a["pads"], a["dilations"])
    y = rows @ dense_weight(packed).astype(np.float64)  # (B*OH*OW, N)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(1, -1)
    y = _activation(packed, y).reshape(x.shape[0], oh, ow, packed.N).transpose(0, 3, 1, 2)
    pool = a.get("maxpool_kernel_shape")
    if pool:
        (ph, pw), (sh, sw) = pool, a.get("maxpool_strides", (1, 1))
        rows = [[y[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw].max(axis=(2, 3))
                 for j in range(pooled_size(ow, 1, a))] for i in range(pooled_size(oh, 0, a))]
        y = np.array(rows).transpose(2, 3, 0, 1).reshape(x.shape[0], packed.N, len(rows), -1)
    return y.astype(np.float32)


def _activation(packed: PackedWeight, y: np.ndarray) -> np.ndarray:
    activation = packed.attributes.get("activation", "none")
    if activation not in ("none", "relu"):
        raise ValueError(f"activation must be 'none' or 'relu', got {activation!r}")
    return np.maximum(y, 0.0) if activation == "relu" else y


def reference(packed: PackedWeight, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Numpy reference of what the kernel computes: ``X (..., K) -> (..., N)`` float32
    (``SparseConv``: ``(B, C, H, W) -> (B, N, OH, OW)``)."""
    if packed.op_type == "SparseConv":
        return _conv_reference(packed, x, bias)
    x = np.asarray(x, dtype=np.float32)
    K, N = packed.K, packed.N
    if x.shape[-1] != K:
        raise ValueError(f"X last dim {x.shape[-1]} != K={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).astype(np.float64)
    op = packed.op_type
    if op == "XnorMatMul":
        beta = np.abs(x2).mean(axis=1) if K > 0 else np.zeros(x2.shape[0])
        xs = np.where(x2 >= 0, 1.0, -1.0)
        s = _unpack_sign_bits(packed.inputs["bits"], K, N, 64).astype(np.float64)
        y = beta[:, None] * (xs @ s) * packed.inputs["alpha"].astype(np.float64)[None, :]
    elif op == "QuantMatMul":
        bs = int(packed.attributes["block_size"])
        q, scale, zp = _quant_codes(packed)
        nb = scale.shape[0]
        xq, sx = _quantize_rows(x2.astype(np.float32), bs, K)  # (M, nb, bs), (M, nb)
        qb = q.reshape(nb, bs, -1).astype(np.float64)  # (nb, bs, Np)
        dot = np.einsum("mbk,bkn->mbn", xq.astype(np.float64), qb)
        sumx = xq.sum(axis=2).astype(np.float64)  # (M, nb)
        corr = dot - sumx[:, :, None] * zp[None].astype(np.float64)
        y = np.einsum("mbn,mb,bn->mn", corr, sx.astype(np.float64), scale.astype(np.float64))[:, :N]
    else:
        y = x2 @ dense_weight(packed).astype(np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(N)[None, :]
    return _activation(packed, y).astype(np.float32).reshape(*lead, N)


# --------------------------------------------------------------------------- onnx_ir node

_counter = itertools.count()


def make_node(
    packed: PackedWeight,
    x: "onnx_ir.Value",
    bias: "onnx_ir.Value | None" = None,
    name: str = "",
) -> tuple["onnx_ir.Node", list["onnx_ir.Value"]]:
    """Build the ``ai.onnxopt`` node for ``packed`` applied to ``x`` (and optional ``bias``).

    Returns the node and the new initializer Values (the caller registers them with
    ``graph.register_initializer``). The output is float32 with shape ``x.shape[:-1] + (N,)``
    when x's shape is known.
    """
    import onnx_ir as ir

    base = name or f"{packed.op_type}_{next(_counter)}"
    names = _INPUT_NAMES[packed.op_type]
    unknown = set(packed.inputs) - set(names)
    if unknown:
        raise ValueError(f"unexpected inputs {sorted(unknown)} for {packed.op_type}")
    inits: list[ir.Value] = []
    node_inputs: list[ir.Value | None] = [x]
    for key in names:
        if key == "bias":
            node_inputs.append(bias)
            continue
        arr = packed.inputs.get(key)
        if arr is None:
            node_inputs.append(None)
            continue
        t = ir.tensor(np.ascontiguousarray(arr), name=f"{base}.{key}")
        v = ir.Value(name=f"{base}.{key}", shape=ir.Shape(arr.shape), type=ir.TensorType(t.dtype), const_value=t)
        inits.append(v)
        node_inputs.append(v)
    while node_inputs and node_inputs[-1] is None:
        node_inputs.pop()
    attrs = []
    for k, v in packed.attributes.items():
        if isinstance(v, (bool, int, np.integer)):
            attrs.append(ir.AttrInt64(k, int(v)))
        elif isinstance(v, (tuple, list)):
            attrs.append(ir.AttrInt64s(k, [int(i) for i in v]))
        elif isinstance(v, (float, np.floating)):
            attrs.append(ir.AttrFloat32(k, float(v)))
        else:
            attrs.append(ir.AttrString(k, str(v)))
    node = ir.Node(DOMAIN, packed.op_type, node_inputs, attrs, name=base, version=OPSET_VERSION)
    out = node.outputs[0]
    out.name = f"{base}.Y"
    out.type = ir.TensorType(ir.DataType.FLOAT)
    if x.shape is not None and packed.op_type == "SparseConv":
        batch, _, *spatial = list(x.shape)
        out.shape = ir.Shape([batch, packed.N, *(sparse_conv_output_size(d, a, packed.attributes) if isinstance(d, int) else None
                                                 for a, d in enumerate(spatial))])
    elif x.shape is not None:
        out.shape = ir.Shape([*list(x.shape)[:-1], packed.N])
    return node, inits


# --------------------------------------------------------------------------- ONNX schemas


def _infer(op_type: str):
    import onnx

    def fn(ctx) -> None:
        n_attr = ctx.get_attribute("N")
        k_attr = ctx.get_attribute("K")
        if n_attr is None or k_attr is None:
            raise RuntimeError(f"{op_type}: attributes K and N are required")
        N, K = int(n_attr.i), int(k_attr.i)
        if N < 1 or K < 1:
            raise RuntimeError(f"{op_type}: K and N must be >= 1 (K={K}, N={N})")
        out = onnx.TypeProto()
        out.tensor_type.elem_type = onnx.TensorProto.FLOAT
        t = ctx.get_input_type(0)
        if op_type == "SparseConv":
            _infer_conv(ctx, t, out, K, N)
        elif t is not None and t.tensor_type.HasField("shape"):
            dims = t.tensor_type.shape.dim
            if len(dims) < 1:
                raise RuntimeError(f"{op_type}: X must have rank >= 1")
            last = dims[len(dims) - 1]
            if last.HasField("dim_value") and last.dim_value != K:
                raise RuntimeError(f"{op_type}: X last dim {last.dim_value} != K={K}")
            shape = out.tensor_type.shape
            for d in list(dims)[:-1]:
                shape.dim.add().CopyFrom(d)
            shape.dim.add().dim_value = N
        ctx.set_output_type(0, out)

    return fn


def _infer_conv(ctx, t, out, K: int, N: int) -> None:
    """SparseConv: (B, C, H, W) -> (B, N, OH, OW), C = K / (kh*kw)."""
    kernel = list(ctx.get_attribute("kernel_shape").ints)

    def ints(name: str, default: list[int]) -> list[int]:
        attr = ctx.get_attribute(name)
        return list(attr.ints) if attr is not None else default

    attributes = {"kernel_shape": kernel, "strides": ints("strides", [1, 1]), "dilations": ints("dilations", [1, 1]),
                  "pads": ints("pads", [0, 0, 0, 0]), "maxpool_kernel_shape": ints("maxpool_kernel_shape", [])}
    if attributes["maxpool_kernel_shape"]:
        attributes["maxpool_strides"] = ints("maxpool_strides", [1, 1])
    if len(kernel) != 2 or K % (kernel[0] * kernel[1]):
        raise RuntimeError(f"SparseConv: K={K} is not channels x kernel_shape {kernel}")
    if t is None or not t.tensor_type.HasField("shape"):
        return
    dims = t.tensor_type.shape.dim
    if len(dims) != 4:
        raise RuntimeError("SparseConv: X must be (batch, channels, H, W)")
    channels = K // (kernel[0] * kernel[1])
    if dims[1].HasField("dim_value") and dims[1].dim_value != channels:
        raise RuntimeError(f"SparseConv: X has {dims[1].dim_value} channels, the weight {channels}")
    shape = out.tensor_type.shape
    shape.dim.add().CopyFrom(dims[0])
    shape.dim.add().dim_value = N
    for axis in (0, 1):
        dim = shape.dim.add()
        if dims[2 + axis].HasField("dim_value"):
            dim.dim_value = sparse_conv_output_size(dims[2 + axis].dim_value, axis, attributes)


def _schema(op_type: str, doc: str, inputs, attrs, type_constraints):
    import onnx.defs as d
    from onnx.helper import make_attribute

    FP = d.OpSchema.FormalParameter
    Opt = d.OpSchema.FormalParameterOption
    params = []
    for nm, ty, desc, optional in inputs:
        params.append(FP(nm, ty, desc, param_option=Opt.Optional if optional else Opt.Single))
    # required attributes: INT, or INTS when their "default" says "ints"; optional ones without a
    # default value: req None, INTS
    kinds = {None: d.OpSchema.AttrType.INT, "ints": d.OpSchema.AttrType.INTS}
    attributes = [d.OpSchema.Attribute(a, kinds[default_value], desc) if req else
                  d.OpSchema.Attribute(a, d.OpSchema.AttrType.INTS, desc, required=False) if req is None else
                  d.OpSchema.Attribute(a, make_attribute(a, default_value), desc)
                  for a, desc, req, default_value in attrs]
    s = d.OpSchema(
        op_type,
        DOMAIN,
        OPSET_VERSION,
        doc,
        inputs=params,
        outputs=[FP("Y", "T", "float32 (..., N)")],
        type_constraints=[("T", ["tensor(float)"], "float32"), *type_constraints],
        attributes=attributes,
    )
    s.set_type_and_shape_inference_function(_infer(op_type))
    return s


def _schemas():
    KN = [("K", "reduction size", True, None), ("N", "output columns", True, None)]
    bias = ("bias", "T", "optional float32 (N,)", True)
    activation = ("activation", "none or relu, applied to Y", False, "none")
    yield _schema(
        "BinaryMatMul",
        "Y = X @ (alpha * sign(W)); sign bits uint32 (ceil(N/16), ceil(K/32), 16).",
        [("X", "T", "float32 (..., K)", False), ("bits", "TB", "uint32 packed sign bits", False),
         ("alpha", "T", "float32 (N,)", False), bias],
        KN,
        [("TB", ["tensor(uint32)"], "")],
    )
    yield _schema(
        "XnorMatMul",
        "Y = beta*alpha*(K - 2 popcount(sign(X) xor sign(W))); bits uint64 (ceil(N/8), ceil(K/64), 8).",
        [("X", "T", "float32 (..., K)", False), ("bits", "TB", "uint64 packed sign bits", False),
         ("alpha", "T", "float32 (N,)", False), bias],
        KN,
        [("TB", ["tensor(uint64)"], "")],
    )
    yield _schema(
        "SparseMatMul",
        "Y = X @ W, W in compressed sparse columns (see onnxopt.ops).",
        [("X", "T", "float32 (..., K)", False), ("values", "TV", "nonzero values (nnz,)", False),
         ("indices", "TI", "uint16 (K <= 65536) or uint32 row indices (nnz,)", False),
         ("col_ptr", "TP", "int32 (N+1,)", False),
         ("scales", "T", "float32 per-column scale (N,)", False), bias],
        [*KN, activation],
        [("TV", ["tensor(float)", "tensor(float16)", "tensor(int8)"], ""),
         ("TI", ["tensor(uint16)", "tensor(uint32)"], ""), ("TP", ["tensor(int32)"], "")],
    )
    yield _schema(
        "SparseConv",
        "2-D Conv (group 1), weight as SparseMatMul's CSC of its GEMM view (see onnxopt.ops).",
        [("X", "T", "float32 (B, C, H, W)", False), ("values", "TV", "nonzero values (nnz,)", False),
         ("indices", "TI", "uint16 (K <= 65536) or uint32 rows (c*kh + i)*kw + j (nnz,)", False),
         ("col_ptr", "TP", "int32 (N+1,)", False),
         ("scales", "T", "float32 per-output-channel scale (N,)", False), bias],
        [*KN, ("kernel_shape", "(kh, kw)", True, "ints"), ("strides", "(sh, sw)", False, [1, 1]),
         ("pads", "(top, left, bottom, right)", False, [0, 0, 0, 0]), ("dilations", "(dh, dw)", False, [1, 1]),
         activation, ("maxpool_kernel_shape", "(ph, pw) of a MaxPool applied after the activation", None, None),
         ("maxpool_strides", "(sh, sw) of that MaxPool; default 1, 1 (as MaxPool's)", None, None)],
        [("TV", ["tensor(float)", "tensor(float16)", "tensor(int8)"], ""),
         ("TI", ["tensor(uint16)", "tensor(uint32)"], ""), ("TP", ["tensor(int32)"], "")],
    )
    yield _schema(
        "QuantMatMul",
        "Y = X @ dequant(W), block-quantized int4/int8 weights (see onnxopt.ops).",
        [("X", "T", "float32 (..., K)", False), ("weights", "TW", "uint8 packed codes", False),
         ("scales", "TS", "float32/float16 (ceil(N/16), nb, 16)", False),
         ("zero_points", "TW", "optional uint8 (ceil(N/16), nb, 16)", True), bias],
        [*KN, ("bits", "4 or 8", False, 4), ("block_size", "32, 64 or 128", False, 32)],
        [("TW", ["tensor(uint8)"], ""), ("TS", ["tensor(float)", "tensor(float16)"], "")],
    )


def _simplified_layer_norm_schema():
    """onnxruntime's RMSNorm (``fuse`` writes it: onnxscript's RMSNormalization fusion), an op onnxruntime
    registers in the ONNX domain, where onnx has no op of that name: its checker would refuse the model."""
    import onnx
    import onnx.defs as d
    from onnx.helper import make_attribute

    FP, Opt = d.OpSchema.FormalParameter, d.OpSchema.FormalParameterOption
    floats = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    s = d.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        "onnxruntime's RMSNorm over the axes from `axis`: Y = X / sqrt(mean(X^2) + epsilon) * scale.",
        inputs=[FP("X", "T", ""), FP("scale", "V", "")],
        outputs=[FP("Y", "V", ""), FP("inv_std_var", "U", "", param_option=Opt.Optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[d.OpSchema.Attribute(name, make_attribute(name, value), "")
                    for name, value in (("axis", -1), ("epsilon", 1e-5), ("stash_type", 1))],
    )

    def infer(ctx) -> None:  # Y: X's shape, scale's element type
        x, scale = ctx.get_input_type(0), ctx.get_input_type(1)
        if x is None or scale is None:
            return
        y = onnx.TypeProto()
        y.tensor_type.elem_type = scale.tensor_type.elem_type
        if x.tensor_type.HasField("shape"):
            y.tensor_type.shape.CopyFrom(x.tensor_type.shape)
        ctx.set_output_type(0, y)

    s.set_type_and_shape_inference_function(infer)
    return s


def register_schemas() -> None:
    """Register the ai.onnxopt schemas with onnx, and onnxruntime's ONNX-domain RMSNorm (idempotent)."""
    import onnx.defs as d

    for s in [*_schemas(), _simplified_layer_norm_schema()]:
        if not d.has(s.name, s.domain):
            d.register_schema(s)


register_schemas()
