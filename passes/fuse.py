"""``fuse``: lossless operator fusion with onnxscript rewrite rules.

Conv/ConvTranspose/Gemm + BatchNormalization folding, optional MatMul+Add -> Gemm, and, for the
onnxruntime target, the transformer fusions of onnxscript's ORT rule sets (LayerNorm and
SkipLayerNorm, RMSNorm and SkipRMSNorm, GELU/BiasGelu, attention) into onnxruntime's contrib ops (in
``com.microsoft``, but RMSNorm's ``SimplifiedLayerNormalization``, which onnxruntime keeps in the ONNX
domain; :mod:`onnxopt.ops` registers its schema so that onnx's checker accepts it).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript import rewriter
from onnxscript.rewriter import _fusion_utils, _ir_utils, ort_fusions, pattern
from onnxscript.rewriter.ort_fusions import _core as ort_fusions_core
from onnxscript.rewriter.ort_fusions import mha
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


class MergedHeadsMultiHeadAttention(mha.MultiHeadAttention):
    """onnxscript's MultiHeadAttention rule, matched only where the heads are merged back to 3-D
    (batch, sequence, width) like the fused op's output. GPT-2's ``Conv1D`` export merges them to 2-D
    rows (b·s, width) for a Gemm: onnxscript's rule takes that Reshape as the output unchecked, and the
    fused node would hand the Gemm a 3-D input."""

    def check(self, context, attention_reshaped=None, **bindings):
        shape = attention_reshaped.shape if attention_reshaped is not None else None
        if shape is None or len(shape) != 3:
            return pattern.MatchResult().fail("heads not merged back to (batch, sequence, width)", attention_reshaped)
        return super().check(context, attention_reshaped=attention_reshaped, **bindings)


def _merged_heads_mha_fusion(has_past_present: bool):
    """onnxscript's rule set mha1 (with past keys and values) or mha2, each rule with the check above."""
    rules = [MergedHeadsMultiHeadAttention.rule(
                 f"MHA{'_Rotary' * rotary}{'_Past' * has_past_present}{'_CrossAttention' * cross}",
                 is_rotary=rotary, has_past_present=has_past_present, is_cross_attention=cross)
             for rotary in (False, True) for cross in ((False,) if has_past_present else (False, True))]
    return _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet(rules))


MERGED_HEADS_MHA = _merged_heads_mha_fusion(True), _merged_heads_mha_fusion(False)


@contextlib.contextmanager
def merged_heads_mha_rules():
    """Run onnxscript's ORT fusions with :class:`MergedHeadsMultiHeadAttention` as their MHA rules."""
    saved = ort_fusions_core.fuse_mha1, ort_fusions_core.fuse_mha2
    ort_fusions_core.fuse_mha1, ort_fusions_core.fuse_mha2 = MERGED_HEADS_MHA
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
        if self.target == "ort" and not hazard:
            with cleanup_as_ort_optimizer(), merged_heads_mha_rules():
                _, fused = ort_fusions.optimize_for_ort(model)
            counts.update({k: v for k, v in fused.items() if v})
        restore_layer_names(model, names)
        self.details = {k: v for k, v in counts.items() if v}
        if hazard:
            self.details["ort fusions"] = f"skipped: onnxscript's constant folder mishandles {hazard}"
        folded = nodes_before != sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))  # cleanup between the ORT fusions
        return ir.passes.PassResult(model, any(counts.values()) or folded)
