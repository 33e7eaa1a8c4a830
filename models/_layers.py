"""Graph fragments shared by the transformer block and MiniLM builders.

Ops are deliberately primitive (as exporters emit them) so fusion passes have
something to match: LayerNorm = ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add,
GELU = x * 0.5 * (1 + Erf(x / sqrt(2))), attention = MatMul/Div/Add(mask)/Softmax/MatMul.
Opset 17 semantics (ReduceMean axes as attribute).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from models._onnx import GraphBuilder

F32 = np.float32


def scalar(v) -> np.ndarray:
    return np.array(v, dtype=F32)


def layer_norm(b: GraphBuilder, x: ir.Value, gamma: np.ndarray, beta: np.ndarray, eps: float,
               prefix: str) -> ir.Value:
    mean = b.op("ReduceMean", x, axes=[-1], keepdims=1)
    diff = b.op("Sub", x, mean)
    var = b.op("ReduceMean", b.op("Pow", diff, scalar(2.0)), axes=[-1], keepdims=1)
    std = b.op("Sqrt", b.op("Add", var, scalar(eps)))
    normed = b.op("Div", diff, std)
    return b.op("Add", b.op("Mul", normed, b.const(gamma.astype(F32), f"{prefix}.weight")),
                b.const(beta.astype(F32), f"{prefix}.bias"))


def linear(b: GraphBuilder, x: ir.Value, w_in_out: np.ndarray, bias: np.ndarray, prefix: str) -> ir.Value:
    """MatMul with a (in, out) weight + Add bias, as torch exports nn.Linear on 3-D inputs."""
    y = b.op("MatMul", x, b.const(np.ascontiguousarray(w_in_out.astype(F32)), f"{prefix}.weight"))
    return b.op("Add", y, b.const(bias.astype(F32), f"{prefix}.bias"))


def gelu_erf(b: GraphBuilder, x: ir.Value) -> ir.Value:
    e = b.op("Erf", b.op("Div", x, scalar(np.sqrt(2.0))))
    return b.op("Mul", b.op("Mul", x, b.op("Add", e, scalar(1.0))), scalar(0.5))


def self_attention(b: GraphBuilder, x: ir.Value, w: dict[str, np.ndarray], n_heads: int, prefix: str,
                   mask_add: ir.Value | None = None) -> ir.Value:
    """Multi-head self-attention; ``w`` has q/k/v/o weights (in, out) and biases.

    ``mask_add`` (optional) is the additive mask broadcastable to [B, H, S, S].
    Returns the output projection (without residual).
    """
    hidden = w["q.weight"].shape[0]
    hd = hidden // n_heads
    split_shape = np.array([0, 0, n_heads, hd], dtype=np.int64)

    def heads(name, perm):
        y = linear(b, x, w[f"{name}.weight"], w[f"{name}.bias"], f"{prefix}.{name}")
        return b.op("Transpose", b.op("Reshape", y, split_shape), perm=perm)

    q = heads("q", [0, 2, 1, 3])  # B,H,S,hd
    k = heads("k", [0, 2, 3, 1])  # B,H,hd,S
    v = heads("v", [0, 2, 1, 3])
    scores = b.op("Div", b.op("MatMul", q, k), scalar(np.sqrt(hd)))
    if mask_add is not None:
        scores = b.op("Add", scores, mask_add)
    probs = b.op("Softmax", scores, axis=-1)
    ctx = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", ctx, np.array([0, 0, hidden], dtype=np.int64))
    return linear(b, ctx, w["o.weight"], w["o.bias"], f"{prefix}.o")


# ----------------------------------------------------------------------------- numpy references
def np_layer_norm(x, g, bta, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + bta


def np_gelu(x):
    from math import erf, sqrt

    return x * 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def np_attention(x, w, n_heads, mask_add=None):
    B, S, H = x.shape
    hd = H // n_heads

    def proj(n):
        return (x @ w[f"{n}.weight"] + w[f"{n}.bias"]).reshape(B, S, n_heads, hd).transpose(0, 2, 1, 3)

    q, k, v = proj("q"), proj("k"), proj("v")
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if mask_add is not None:
        s = s + mask_add
    s = np.exp(s - s.max(-1, keepdims=True))
    p = s / s.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, S, H)
    return ctx @ w["o.weight"] + w["o.bias"]
