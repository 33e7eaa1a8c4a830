"""``onnxopt.validate``'s latency helpers, on a fake clock (deterministic: no timing is asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import validate


@pytest.fixture
def fake_calls(monkeypatch):
    """Session i's call advances a fake clock by cost(i, call number); runner(sess) returns that call."""
    clock = [0.0]
    counts: dict[int, int] = {}

    def install(cost):
        def runner(sess, names, feed):
            def call():
                counts[sess] = counts.get(sess, 0) + 1
                clock[0] += cost(sess, counts[sess])
            return call

        monkeypatch.setattr(validate.runtime, "runner", runner)
        monkeypatch.setattr(validate.time, "perf_counter", lambda: clock[0])

    return install


def test_speedups_pair_the_sessions_round_by_round(fake_calls):
    # 2 warm-up calls, then 3 calls per round: the machine is 3x slower from round 4 on (calls > 2 + 3*3),
    # and session 1 is always 2x faster than session 0 in the same round
    fake_calls(lambda sess, n: (1.0 if n <= 11 else 3.0) * (2.0 if sess == 0 else 1.0))
    medians, speedups = validate.interleaved_speedups([0, 1], {}, rounds=7, repeat=3)
    assert speedups == [1.0, 2.0]
    assert medians == [6000.0, 3000.0]  # ms: most rounds were slow
    assert validate.interleaved_latency_ms([0, 1], {}, rounds=7, repeat=3) == medians


def test_several_feeds_are_taken_in_turn(monkeypatch):
    used = []

    def runner(sess, names, feed):
        return lambda: used.append((sess, feed["i"]))

    monkeypatch.setattr(validate.runtime, "runner", runner)
    validate.interleaved_latency_ms(["a", "b"], [{"i": 0}, {"i": 1}, {"i": 2}], rounds=2, repeat=4)
    timed = used[4:]  # after each session's two warm-up calls (feeds 0 and 1)
    assert used[:4] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert timed == [("a", 0), ("a", 1), ("a", 2), ("a", 0), ("b", 0), ("b", 1), ("b", 2), ("b", 0)] * 2


# ---------------------------------------------------------------- onnxopt_latency (C++ timing tool)


def _native_tool_or_skip():
    from onnxopt import kernels

    try:
        kernels.latency_tool_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _save(tmp_path, name, nodes, inputs, initializers=()):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _sparse_model(tmp_path, w):
    import onnx
    import onnx_ir as ir

    from onnxopt import ops

    x = ir.Value(name="X", shape=ir.Shape(["m", w.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    node, inits = ops.make_node(ops.pack_sparse_matmul(w), x, None, name="op")
    node.outputs[0].name = "Y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 17, ops.DOMAIN: 1}, name="g")
    for v in inits:
        graph.register_initializer(v)
    path = tmp_path / "sparse.onnx"
    onnx.save(ir.to_proto(ir.Model(graph, ir_version=10)), path)
    return path


def test_native_tool_runs_what_python_runs(tmp_path):
    """onnxopt_latency's sums of the first feed's outputs equal onnxruntime's from Python, for a float
    MatMul, onnxopt's SparseMatMul (custom-op library registered) and a model with an int64 input."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxopt import runtime

    _native_tool_or_skip()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 11)) * (rng.random((37, 11)) < 0.2)).astype(np.float32)
    x_info = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["m", 37])
    dense = _save(tmp_path, "dense", [helper.make_node("MatMul", ["X", "W"], ["Y"])], [x_info], [numpy_helper.from_array(w, "W")])
    sparse = _sparse_model(tmp_path, w)
    table = rng.standard_normal((9, 4)).astype(np.float32)
    gather = _save(tmp_path, "gather", [helper.make_node("Gather", ["T", "I"], ["Y"])],
                   [helper.make_tensor_value_info("I", onnx.TensorProto.INT64, [3])], [numpy_helper.from_array(table, "T")])
    feeds = [{"X": rng.standard_normal((2, 37)).astype(np.float32) * (rng.random((2, 37)) < 0.5)} for _ in range(3)]
    times = validate.native_rounds([dense, sparse], feeds, rounds=3, repeat=4)
    assert [len(r) for r in times.rounds_ms] == [3, 3] and all(t > 0 for r in times.rounds_ms for t in r)
    for path, total in zip((dense, sparse), times.output_sums):
        assert total == pytest.approx(float(runtime.session(str(path)).run(None, feeds[0])[0].sum(dtype=np.float64)), rel=1e-5)
    index = {"I": np.array([8, 0, 3], np.int64)}
    assert validate.native_rounds([gather], index, rounds=1, repeat=1).output_sums[0] == pytest.approx(float(table[[8, 0, 3]].sum()), rel=1e-6)
    medians, speedups = validate.native_speedups([dense, dense], feeds, rounds=3, repeat=4)
    assert len(medians) == 2 and speedups[0] == 1.0


def test_native_tool_failures_are_typed_one_line_errors(tmp_path, monkeypatch):
    from onnxopt import errors, kernels

    _native_tool_or_skip()
    feed = {"X": np.zeros((1, 3), np.float32)}
    with pytest.raises(errors.NativeRunError, match=r"^(?!.*\n).*missing\.onnx"):
        validate.native_rounds([tmp_path / "missing.onnx"], feed)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(errors.NativeRunError):
        validate.native_rounds([tmp_path / "broken.onnx"], feed)

    def absent():
        raise FileNotFoundError("onnxopt_latency is not built")

    monkeypatch.setattr(kernels, "latency_tool_path", absent)
    with pytest.raises(errors.RuntimeLibraryError, match="not built"):
        validate.native_rounds([tmp_path / "missing.onnx"], feed)
