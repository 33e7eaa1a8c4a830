"""onnxopt.io: lazy loading, normalization on load, atomic saving that onnxruntime accepts."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import errors, io, pipeline, runtime
from onnxopt.calibration import Dataset


def _run(model_or_path, feeds: dict) -> list[np.ndarray]:
    return runtime.session(model_or_path, threads=1).run(None, feeds)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".onnxopt-"))


X = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)


# --- atomic save --------------------------------------------------------------------------------


def _failing_save(written: list):
    """An ``onnx.save`` that writes half a file, then fails like a full disk."""

    def save(model, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x08\x07partial")
        written.append(path)
        raise OSError(28, "No space left on device")

    return save


def test_failed_save_leaves_no_file(tmp_path, mlp_path, monkeypatch):
    model = io.load(mlp_path)
    written = []
    monkeypatch.setattr(io.onnx, "save", _failing_save(written))
    target = tmp_path / "out.onnx"
    with pytest.raises(errors.ModelSaveError, match="No space left"):
        io.save(model, target)
    assert written, "the failure was not simulated inside save"
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_failed_save_keeps_existing_output(tmp_path, mlp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    io.save(io.load(mlp_path), target)
    before = _digest(target)
    monkeypatch.setattr(io.onnx, "save", _failing_save([]))
    with pytest.raises(errors.ModelSaveError):
        io.save(io.load(mlp_path), target)
    assert _digest(target) == before
    assert _leftovers(tmp_path) == []
    np.testing.assert_allclose(_run(target, {"x": X})[0], _run(mlp_path, {"x": X})[0])


def test_unexpected_error_during_save_also_cleans_up(tmp_path, mlp_path, monkeypatch):
    def explode(model, path, **kwargs):
        path.write_bytes(b"partial")
        raise RuntimeError("serializer bug")

    monkeypatch.setattr(io.onnx, "save", explode)
    with pytest.raises(RuntimeError, match="serializer bug"):
        io.save(io.load(mlp_path), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert _leftovers(tmp_path) == []


def test_save_into_missing_directory_is_a_typed_error(tmp_path, mlp_path):
    with pytest.raises(errors.ModelSaveError, match="does not exist"):
        io.save(io.load(mlp_path), tmp_path / "missing" / "out.onnx")


# --- external data and lazy loading ---------------------------------------------------------------


@pytest.fixture
def wide_path(tmp_path):
    """y = relu(x @ w1 + b1) @ w2 with 16 KB and 8 KB weights (io writes tensors >= 1 KB externally)."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((8, 512)).astype(np.float32),
        "b1": rng.standard_normal(512).astype(np.float32),
        "w2": rng.standard_normal((512, 4)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    path = tmp_path / "wide.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_external_data_round_trip_stays_lazy(tmp_path, wide_path):
    model = io.load(wide_path)
    expected = _run(wide_path, {"x": X})[0]
    # a 20 KB threshold stands in for 2 GB: the weights (26 KB) exceed it
    saved = io.save(model, tmp_path / "big.onnx", external_threshold=20_000)
    data_file = tmp_path / "big.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size >= (8 * 512 + 512 * 4) * 4
    assert saved.stat().st_size < 4096
    proto = onnx.load(str(saved), load_external_data=False)
    assert {t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"w1", "b1", "w2"}

    loaded = io.load(saved)
    w1 = loaded.graph.initializers["w1"].const_value
    assert isinstance(w1, ir.ExternalTensor), type(w1)
    np.testing.assert_array_equal(w1.numpy(), numpy_helper.to_array(onnx.load(str(wide_path)).graph.initializer[0]))
    np.testing.assert_allclose(_run(saved, {"x": X})[0], expected, rtol=1e-6)
    np.testing.assert_allclose(_run(loaded, {"x": X})[0], expected, rtol=1e-6)
    assert isinstance(loaded.graph.initializers["w1"].const_value, ir.ExternalTensor), "running materialized it"
    # save the lazily loaded model into another folder: the data is copied there, not lost
    other = tmp_path / "copy"
    other.mkdir()
    io.save(loaded, other / "again.onnx", external_data=True)
    np.testing.assert_allclose(_run(other / "again.onnx", {"x": X})[0], expected, rtol=1e-6)


@pytest.mark.parametrize("same_dir", [True, False])
def test_external_input_saved_under_threshold_is_self_contained(tmp_path, wide_path, same_dir):
    """A lazily loaded model saved as one file must not keep pointing at the input's data file."""
    src = io.save(io.load(wide_path), tmp_path / "src.onnx", external_data=True)
    expected = _run(src, {"x": X})[0]
    out_dir = tmp_path if same_dir else tmp_path / "elsewhere"
    out_dir.mkdir(exist_ok=True)
    out = io.save(io.load(src), out_dir / "out.onnx", external_data=False)
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    kept = io.save(io.load(src), out_dir / "kept.onnx")  # default: external data like the input
    assert (out_dir / "kept.onnx.data").is_file()
    (tmp_path / "src.onnx.data").unlink()
    np.testing.assert_allclose(_run(out, {"x": X})[0], expected, rtol=1e-6)
    np.testing.assert_allclose(_run(kept, {"x": X})[0], expected, rtol=1e-6)


def test_under_threshold_is_one_file(tmp_path, wide_path):
    io.save(io.load(wide_path), tmp_path / "small.onnx", external_threshold=1_000_000)
    assert not (tmp_path / "small.onnx.data").exists()


def test_loading_missing_external_data_is_a_typed_error(tmp_path, wide_path):
    saved = io.save(io.load(wide_path), tmp_path / "big.onnx", external_data=True)
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(errors.ModelLoadError, match="external data file"):
        io.load(saved)


# --- normalization on load ----------------------------------------------------------------------


def _constant_weight_model() -> onnx.ModelProto:
    weight = np.arange(32, dtype=np.float32).reshape(8, 4) / 10
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "two"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "const_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_constant_node_weights_become_initializers(tmp_path):
    path = tmp_path / "const.onnx"
    onnx.save(_constant_weight_model(), str(path))
    model = io.load(path)
    assert "w" in model.graph.initializers
    assert model.graph.initializers["w"].const_value.shape == (8, 4)
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1].is_initializer()
    np.testing.assert_allclose(_run(model, {"x": X})[0], _run(path, {"x": X})[0])
    raw = io.load(path, lift_constants=False)
    assert any(n.op_type == "Constant" and n.outputs[0].name == "w" for n in raw.graph)


def _if_loop_model() -> onnx.ModelProto:
    """``y = If(sum(x) > 0, x @ W_then, x @ W_else)`` then a 3-step Loop adding a Constant bias."""
    rng = np.random.default_rng(2)

    def branch(name, weight):
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight)),
                helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_out"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [3, 4])],
        )

    bias = rng.standard_normal(4).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["bias"], value=numpy_helper.from_array(bias)),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "bias"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3, 4]),
        ],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node(
            "If",
            ["positive"],
            ["branch_out"],
            then_branch=branch("then", rng.standard_normal((8, 4)).astype(np.float32)),
            else_branch=branch("else", rng.standard_normal((8, 4)).astype(np.float32)),
        ),
        helper.make_node("Constant", [], ["trips"], value=numpy_helper.from_array(np.array(3, np.int64))),
        helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["trips", "true", "branch_out"], ["y"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "if_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_loop_subgraphs_survive_load_save_and_cleanup(tmp_path, sign):
    path = tmp_path / "if_loop.onnx"
    onnx.save(_if_loop_model(), str(path))
    x = np.abs(X) * sign
    expected = _run(path, {"x": x})[0]
    model = io.load(path)
    lifted = [v for g in model.graph.subgraphs() for v in g.initializers.values()]
    assert [tuple(v.const_value.shape) for v in lifted].count((8, 4)) == 2, "branch weights were not lifted"
    saved = io.save(model, tmp_path / "saved.onnx")
    np.testing.assert_allclose(_run(saved, {"x": x})[0], expected, rtol=1e-6)
    optimized, _ = pipeline.run_pipeline(io.load(path), ["cleanup", "fuse"], Dataset.from_arrays({"x": x}))
    np.testing.assert_allclose(_run(optimized, {"x": x})[0], expected, rtol=1e-5)


def test_save_writes_no_value_info_for_initializers(tmp_path):
    """onnx_ir writes every initializer's type and shape again as value_info: a file that no pass changed
    came out bigger than it went in. The model in memory keeps them."""
    path = tmp_path / "if_loop.onnx"
    onnx.save(_if_loop_model(), str(path))
    model = io.load(path)
    saved = io.save(model, tmp_path / "saved.onnx")
    proto = onnx.load(str(saved))
    for graph in (proto.graph, *(a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)):
        assert not {v.name for v in graph.value_info} & {t.name for t in graph.initializer}
    assert saved.stat().st_size <= path.stat().st_size
    assert all(v.type is not None for g in model.graphs() for v in g.initializers.values())
    x = np.abs(X)
    np.testing.assert_allclose(_run(saved, {"x": x})[0], _run(path, {"x": x})[0], rtol=1e-6)


@pytest.mark.parametrize("external", [False, True])
def test_round_trip_keeps_the_size_of_an_exporters_file(tmp_path, wide_path, external):
    """Exporters leave the default domain's name unset in opset imports; onnx_ir writes it (2 bytes):
    a load-save round trip must not grow the file."""
    proto = onnx.load(str(wide_path))
    proto.opset_import[0].ClearField("domain")  # as PyTorch writes it (onnx's make_opsetid sets "")
    source = tmp_path / "source.onnx"
    onnx.save(proto, str(source), save_as_external_data=external, location="source.onnx.data", size_threshold=1024)
    saved = io.save(io.load(source), tmp_path / "saved.onnx")
    assert not onnx.load(str(saved), load_external_data=False).opset_import[0].HasField("domain")
    if external:  # the same tensors, each referenced by a data-file name one character shorter
        assert (tmp_path / "saved.onnx.data").stat().st_size == (tmp_path / "source.onnx.data").stat().st_size
        assert saved.stat().st_size == source.stat().st_size - 3
    else:
        assert saved.stat().st_size == source.stat().st_size
    np.testing.assert_allclose(_run(saved, {"x": X})[0], _run(source, {"x": X})[0])


def _sparse_model() -> tuple[onnx.ModelProto, np.ndarray]:
    dense = np.zeros((8, 4), np.float32)
    dense[[0, 3, 5, 7], [1, 0, 2, 3]] = [1.5, -2.0, 0.25, 4.0]
    (flat,) = np.nonzero(dense.reshape(-1))
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.reshape(-1)[flat], "w"),
        numpy_helper.from_array(flat.astype(np.int64), "w_indices"),
        dense.shape,
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    graph.sparse_initializer.append(sparse)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), dense


def test_sparse_initializer_round_trip(tmp_path):
    proto, dense = _sparse_model()
    path = tmp_path / "sparse.onnx"
    onnx.save(proto, str(path))
    model = io.load(path)
    value = model.graph.initializers["w"]
    assert value.meta.get(io.SPARSE_META_KEY) is True
    np.testing.assert_array_equal(value.const_value.numpy(), dense)
    np.testing.assert_allclose(_run(model, {"x": X})[0], X @ dense, rtol=1e-6)

    saved = onnx.load(str(io.save(model, tmp_path / "out.onnx")))
    assert [s.values.name for s in saved.graph.sparse_initializer] == ["w"]
    assert not any(t.name == "w" for t in saved.graph.initializer)
    assert numpy_helper.to_array(saved.graph.sparse_initializer[0].values).size == 4
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", {"x": X})[0], X @ dense, rtol=1e-6)


@pytest.mark.parametrize("ir_version", [11, 13, onnx.IR_VERSION])
def test_new_ir_version_is_capped_on_save(tmp_path, mlp_proto, ir_version):
    mlp_proto.ir_version = ir_version
    path = tmp_path / "new_ir.onnx"
    onnx.save(mlp_proto, str(path))
    model = io.load(path)
    saved = io.save(model, tmp_path / "out.onnx")
    assert onnx.load(str(saved)).ir_version <= io.MAX_IR_VERSION
    assert model.ir_version == ir_version, "save must not modify the model"
    mlp_proto.ir_version = 8
    expected = runtime.session(mlp_proto).run(None, {"x": X})[0]
    np.testing.assert_allclose(_run(saved, {"x": X})[0], expected, rtol=1e-6)


def test_ir3_model_written_valid_after_fuse(tmp_path, mlp_proto):
    """IR 3 needs initializers listed as inputs; onnxscript's fusions drop them, so onnxopt writes IR >= 4."""
    mlp_proto.ir_version = 3
    mlp_proto.opset_import[0].version = 9
    for init in mlp_proto.graph.initializer:
        mlp_proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    path = tmp_path / "ir3.onnx"
    onnx.save(mlp_proto, str(path))
    model, _ = pipeline.run_pipeline(io.load(path), ["cleanup", "fuse"], numeric_check=False)
    saved = onnx.load(str(io.save(model, tmp_path / "out.onnx")))
    onnx.checker.check_model(saved)
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", {"x": X})[0], _run(path, {"x": X})[0], rtol=1e-6)


def test_initializers_listed_as_inputs_become_constants(tmp_path):
    """IR 3 style: every initializer is also a graph input. Passes replace weights; the output must not
    ask the user to feed the weight they dropped."""
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", ["B", 16]), ("W", [16, 16]))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16])], [numpy_helper.from_array(w, "W")])
    src = tmp_path / "ir3.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=3), src)
    model = io.load(src)
    assert [v.name for v in model.graph.inputs] == ["x"]
    model, _ = pipeline.run_pipeline(model, ["low-rank:rank=2,min_elements=1"])
    out = io.save(model, tmp_path / "out.onnx")
    sess = runtime.session(str(out))
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert sess.run(None, {"x": np.ones((2, 16), np.float32)})[0].shape == (2, 16)


def test_optimize_never_touches_input_files(tmp_path, wide_path):
    external = io.save(io.load(wide_path), tmp_path / "in.onnx", external_data=True)
    data_file = tmp_path / "in.onnx.data"
    before = (_digest(external), _digest(data_file))
    model, _ = pipeline.run_pipeline(io.load(external), ["cleanup", "fuse"])
    io.save(model, tmp_path / "out.onnx", external_data=True)
    assert (_digest(external), _digest(data_file)) == before
    np.testing.assert_allclose(_run(tmp_path / "out.onnx", {"x": X})[0], _run(wide_path, {"x": X})[0], rtol=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"\x00\xff garbage \x13\x37" * 10, "not a valid ONNX")],
)
def test_unreadable_files_are_typed_errors(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(errors.ModelLoadError, match=message):
        io.load(path)


def test_tensor_bytes_counts_subgraph_weights():
    model = ir.serde.deserialize_model(_if_loop_model())
    io.normalize(model)
    assert io.tensor_bytes(model) == 2 * 8 * 4 * 4  # the 4-element Loop bias stays a Constant node


def test_bfloat16_models_run_with_bfloat16_inputs_and_outputs(tmp_path):
    """A bf16 model (input, weight, output) runs on onnxruntime's CPU provider: its MatMul (no CPU kernel)
    in float32 on bf16-rounded tensors, the arrays crossing as ml_dtypes bfloat16 both ways; calibration
    data saved with np.savez (raw 2-byte records) reads back as bfloat16."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    x, w = (rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for shape in ((5, 8), (8, 3)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["B", 8])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["B", 3])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    sess = runtime.session(path)
    assert sess.onnxopt_note == runtime.BFLOAT16_NOTE
    (y,) = runtime.run(sess, None, {"x": x})
    expected = np.maximum(x.astype(np.float32) @ w.astype(np.float32), 0).astype(ml_dtypes.bfloat16)
    assert y.dtype == ml_dtypes.bfloat16 and np.array_equal(y, expected)
    assert np.array_equal(runtime.run(sess, None, {"x": np.asfortranarray(x)})[0], expected)  # strides honoured
    assert np.array_equal(runtime.run(sess, None, {"x": x.astype(np.float32)})[0], expected)  # cast to the input's type
    np.savez(tmp_path / "data.npz", x=x)
    (batch,) = Dataset.load(tmp_path / "data.npz").batches(io.load(path), batch_size=8)
    assert batch["x"].dtype == ml_dtypes.bfloat16 and np.array_equal(batch["x"], x)
    half_input = io.load(path)
    half_input.graph.inputs[0].type = ir.TensorType(ir.DataType.FLOAT16)  # bf16 records are read as bf16, then cast
    (batch,) = Dataset.load(tmp_path / "data.npz").batches(half_input, batch_size=8)
    assert batch["x"].dtype == np.float16 and np.array_equal(batch["x"], x.astype(np.float16))


def test_clone_shares_no_type_objects(mlp_path):
    """onnx_ir's Model.clone() shares the values' type objects, which `Value.dtype = ...` changes in place:
    converting the model retyped its clone (a pipeline's recover reference turned float16)."""
    model = io.load(mlp_path)
    copy = io.clone(model)
    model.graph.outputs[0].dtype = ir.DataType.FLOAT16
    model.graph.inputs[0].dtype = ir.DataType.FLOAT16
    assert copy.graph.outputs[0].dtype == ir.DataType.FLOAT and copy.graph.inputs[0].dtype == ir.DataType.FLOAT
    assert next(iter(copy.graph.initializers.values())).const_value is next(iter(model.graph.initializers.values())).const_value
