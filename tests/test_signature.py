"""Recorded cuts of model inputs and outputs (onnxopt.signature)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import runtime, signature
from onnxopt.errors import ModelLoadError
from onnxopt.signature import Kept


def _model() -> ir.Model:
    x = ir.Value(name="cache", shape=ir.Shape(["b", 4, "t"]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Identity", [x], outputs=[ir.Value(name="out", shape=ir.Shape(["b", 4, "t"]),
                                                     type=ir.TensorType(ir.DataType.FLOAT))])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


def test_a_second_cut_is_recorded_in_the_original_indices():
    model = _model()
    signature.record_kept(model, "cache", 1, 4, [0, 2, 3])
    signature.record_kept(model, "cache", 1, 3, [0, 2])  # of the three left: original 0 and 3
    assert signature.kept_entries(model) == {"cache": Kept(1, 4, (0, 3))}


def test_fit_cuts_only_arrays_of_the_original_size():
    kept = {"cache": Kept(1, 4, (0, 3))}
    full, cut = np.arange(24.0).reshape(2, 4, 3), np.zeros((2, 2, 3))
    fitted = signature.fit({"cache": full, "other": full}, kept)
    np.testing.assert_array_equal(fitted["cache"], full[:, [0, 3]])
    assert fitted["other"] is full
    assert signature.fit({"cache": cut}, kept)["cache"] is cut


def test_since_gives_one_step_relative_to_the_model_before():
    before = {"cache": Kept(1, 4, (0, 2, 3))}
    after = {"cache": Kept(1, 4, (0, 3)), "new": Kept(0, 5, (1,))}
    assert signature.since(before, after) == {"cache": Kept(1, 3, (0, 2)), "new": Kept(0, 5, (1,))}
    assert signature.since(after, after) == {}


def test_the_runner_feeds_a_cut_model_the_original_arrays():
    """The cut is read from the session's model metadata: onnxruntime sees a (b, 2, t) array."""
    model = _model()
    for value in (model.graph.inputs[0], model.graph.outputs[0]):
        value.shape = ir.Shape(["b", 2, "t"])
        signature.record_kept(model, value.name, 1, 4, [1, 2])
    sess = runtime.session(model)
    full = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    (out,) = runtime.run(sess, None, {"cache": full})
    np.testing.assert_array_equal(out, full[:, 1:3])
    assert signature.kept_entries(sess) == signature.kept_entries(model)


@pytest.mark.parametrize("text", ["{", '{"cache": {"axis": 1}}', '["cache"]', '{"cache": {"axis": 1, "of": 4, "kept": 3}}'])
def test_malformed_metadata_is_a_typed_error(text):
    model = _model()
    model.metadata_props[signature.KEPT_ENTRIES] = text
    with pytest.raises(ModelLoadError, match="metadata 'onnxopt.kept_entries' is malformed"):
        signature.kept_entries(model)
