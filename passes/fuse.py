"""``fuse``: lossless operator fusion with onnxscript rewrite rules.

Conv/ConvTranspose/Gemm + BatchNormalization folding, optional MatMul+Add -> Gemm, and, for the
onnxruntime target, the transformer fusions of onnxscript's ORT rule sets (LayerNorm and
SkipLayerNorm, GELU/BiasGelu, attention) into ``com.microsoft`` contrib ops.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript import rewriter
from onnxscript.rewriter import _ir_utils, ort_fusions, pattern
from onnxscript.rewriter.ort_fusions import _core as ort_fusions_core
from onnxscript.rewriter.rules import common as rules
from onnxscript.rewriter.rules.fusion import _layer_norm

from onnxopt.passes.cleanup import CleanupPass, folding_hazard, layer_names_by_output, restore_layer_names
from onnxopt.io import no_new_annotations
from onnxopt.registry import register


class LayerNormAxesAttributeFusion(_layer_norm.LayerNormFusion):
    """onnxscript's LayerNorm chain as written below opset 18, where ReduceMean takes ``axes`` as an
    attribute; the exponent of ``Pow`` may be any one-element constant equal to 2."""

    def pattern(self, op, x, scale, epsilon, exponent):
        deviation = op.Sub(x, op.ReduceMean(x, axes=[-1], keepdims=1))
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, exponent)])
        std_dev = op.Sqrt(op.Add(op.ReduceMean(squared, axes=[-1], keepdims=1), epsilon))
        normalized = pattern.OrValue([op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)])
        return op.Mul(normalized, scale)

    def check(self, context, x, epsilon, exponent=None, **_):
        if exponent is not None and _ir_utils.get_singleton_value(exponent) != 2:
            return pattern.MatchResult().fail("Pow exponent is not 2.", exponent)
        return super().check(context, x, epsilon)


LAYER_NORM_RULES = pattern.RewriteRuleSet(
    [LayerNormAxesAttributeFusion.rule(), *_layer_norm.layer_normalization_rules]
)


@contextlib.contextmanager
def cleanup_as_ort_optimizer():
    """Let onnxscript's ORT fusions simplify the model between rule sets with ``cleanup`` (functions
    inlined first) instead of onnxscript's optimizer, which folds results of up to 256K elements (an
    Expand of one scalar grew a 145-byte model to 1 MB), turns Flatten into Reshape and names every node."""

    def optimize(model: ir.Model, *args, **kwargs) -> ir.Model:
        common_passes.InlinePass()(model)
        CleanupPass()(model)
        return model

    original = ort_fusions_core.optimize
    ort_fusions_core.optimize = optimize
    try:
        yield
    finally:
        ort_fusions_core.optimize = original


def rows_reshape_after_heads(model: ir.Model) -> str | None:
    """The name of a Reshape of attention heads (after their Transpose) to other than 3-D, e.g. GPT-2's
    (b·s, D) rows for its 2-D ``Conv1D`` Gemm; None if there is none. onnxscript's MultiHeadAttention rules
    (mha1/mha2) take that Reshape as the (B, S, D) output without checking it: the fused node would
    hand the Gemm a 3-D input."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        source = node.inputs[0].producer() if node.op_type == "Reshape" and node.inputs[0] is not None else None
        if source is not None and source.op_type == "Transpose" and list(source.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
            shape = node.outputs[0].shape
            if shape is None or len(shape) != 3:
                return node.name or node.outputs[0].name
    return None


@contextlib.contextmanager
def without_mha_rules():
    """Run onnxscript's ORT fusions without its MultiHeadAttention rules (SDPA still becomes MHA)."""
    saved = ort_fusions_core.fuse_mha1, ort_fusions_core.fuse_mha2
    ort_fusions_core.fuse_mha1 = ort_fusions_core.fuse_mha2 = lambda model, **_: 0
    try:
        yield
    finally:
        ort_fusions_core.fuse_mha1, ort_fusions_core.fuse_mha2 = saved


@register("fuse", lossless=True)
class FusePass(ir.passes.InPlacePass):
    """Fold BatchNorm into Conv/Gemm, fuse LayerNorm, GELU and attention patterns.

    Args:
        target: ``ort`` adds onnxruntime contrib-op fusions (Gelu, SkipLayerNormalization, attention);
            ``onnx`` keeps standard ONNX ops only.
        matmul_add_to_gemm: Also turn 2-D MatMul + bias Add into Gemm.
        layer_norm: Fuse ReduceMean/Sub/Pow/Sqrt/Div chains into LayerNormalization (opset >= 17).
    """

    def __init__(self, target: Literal["ort", "onnx"] = "ort", matmul_add_to_gemm: bool = False, layer_norm: bool = True):
        super().__init__()
        self.target = target
        self.matmul_add_to_gemm = matmul_add_to_gemm
        self.layer_norm = layer_norm
        self.details: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with no_new_annotations(model):
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        common_passes.ShapeInferencePass()(model)  # the rules check dtypes of intermediate values
        counts = {}
        ruleset = [
            rules.fuse_batchnorm_into_conv_rule,
            rules.fuse_batchnorm_into_conv_transpose_rule,
            rules.fuse_batchnorm_into_gemm_rule,
        ]
        if self.matmul_add_to_gemm:
            ruleset += [
                rules.matmul_add_to_gemm_rule,
                rules.transpose_a_matmul_add_to_gemm_rule,
                rules.transpose_b_matmul_add_to_gemm_rule,
                rules.transpose_ab_matmul_add_to_gemm_rule,
            ]
        names = layer_names_by_output(model)
        nodes_before = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
        counts["batchnorm/gemm"] = rewriter.RewriteRuleSet(ruleset).apply_to_model(model)
        if self.layer_norm and model.opset_imports.get("", 0) >= 17:
            counts["layer_norm"] = LAYER_NORM_RULES.apply_to_model(model)
        hazard = folding_hazard(model) if self.target == "ort" else None
        rows_reshape = rows_reshape_after_heads(model) if self.target == "ort" and not hazard else None
        if self.target == "ort" and not hazard:
            with cleanup_as_ort_optimizer(), without_mha_rules() if rows_reshape else contextlib.nullcontext():
                _, fused = ort_fusions.optimize_for_ort(model)
            counts.update({k: v for k, v in fused.items() if v})
        restore_layer_names(model, names)
        self.details = {k: v for k, v in counts.items() if v}
        if rows_reshape:
            self.details["mha rules"] = (f"skipped: onnxscript's would turn Reshape '{rows_reshape}' of the heads "
                                         "to rows into a 3-D output")
        if hazard:
            self.details["ort fusions"] = f"skipped: onnxscript's constant folder mishandles {hazard}"
        folded = nodes_before != sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))  # cleanup between the ORT fusions
        return ir.passes.PassResult(model, any(counts.values()) or folded)
