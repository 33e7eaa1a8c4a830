"""The ``onnxopt`` command line: exit codes, one-line errors, reports, recipes, --on-error."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from onnxopt import cli, io, pipeline, runtime
from onnxopt.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
X = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)


def invoke(*args: str):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_usage_error(result, out: pathlib.Path, *expected: str) -> str:
    """Exit 2, exactly one ``error:`` line naming ``expected``, no traceback, no output file.

    Other stderr lines may only be per-pass progress lines (indented).
    """
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith("  ") for line in lines[:-1]), result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in errors[0], errors[0]
    assert not out.exists()
    if out.parent.is_dir():
        assert not list(out.parent.glob(".onnxopt-*"))
    return errors[0]


# --- bad input: exit 2, one line, nothing written, input untouched --------------------------------


def _truncated(path: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    bad = tmp / "truncated.onnx"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return bad


def _random_bytes(path: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    bad = tmp / "random.onnx"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return bad


def _newer_ir(path: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    proto = onnx.load(str(path))
    proto.ir_version = onnx.IR_VERSION + 1
    bad = tmp / "future.onnx"
    bad.write_bytes(proto.SerializeToString())
    return bad


def _missing_external_data(path: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    model = io.load(path)
    model.graph.initializers["big"] = ir.Value(name="big", const_value=ir.tensor(np.ones((64, 64), np.float32), name="big"))
    bad = io.save(model, tmp / "external.onnx", external_data=True)
    (tmp / "external.onnx.data").unlink()
    return bad


def _empty(path: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    bad = tmp / "empty.onnx"
    bad.touch()
    return bad


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (_truncated, "not a valid ONNX"),
        (_random_bytes, "not a valid ONNX"),
        (_newer_ir, "IR version"),
        (_missing_external_data, "external data file"),
        (_empty, "empty"),
    ],
    ids=["truncated", "random-bytes", "newer-ir", "missing-external-data", "empty-file"],
)
def test_unreadable_model(tmp_path, mlp_path, make_bad, expected):
    bad = make_bad(mlp_path, tmp_path)
    before = _digest(bad)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    assert_usage_error(invoke("optimize", bad, "-o", out, "-p", "cleanup"), out, expected)
    assert _digest(bad) == before


def test_model_onnxruntime_cannot_load(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")],
        "custom",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("example.custom", 1)]
    )
    proto.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(proto, str(path))
    out = tmp_path / "out.onnx"
    assert_usage_error(invoke("optimize", path, "-o", out, "-p", "cleanup"), out, "Frobnicate")
    assert_usage_error(invoke("validate", path, path), out, "Frobnicate")


def test_missing_model_file(tmp_path):
    out = tmp_path / "out.onnx"
    assert_usage_error(invoke("optimize", tmp_path / "nope.onnx", "-o", out, "-p", "cleanup"), out, "not found")
    assert_usage_error(invoke("inspect", tmp_path / "nope.onnx"), out, "not found")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("cleanup:no_such_option=1", "no option 'no_such_option'"),
        ("cleanup:iterations=many", "must be an integer"),
        ("cleanup:fold_constants=maybe", "must be true or false"),
        ("fuse:target=tensorrt", "must be one of"),
        ("cleanup:iterations", "expected key=value"),
        ("cleanup:iterations=0", "iterations"),
    ],
)
def test_bad_pass_spec(tmp_path, mlp_path, spec, expected):
    before = _digest(mlp_path)
    out = tmp_path / "out.onnx"
    line = assert_usage_error(invoke("optimize", mlp_path, "-o", out, "-p", spec), out, expected)
    if "unknown pass" in expected:
        assert "cleanup" in line and "fuse" in line, "the valid passes are listed"
    if "no option" in expected:
        assert "fold_size_limit" in line, "the valid options are listed"
    assert _digest(mlp_path) == before


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "proc"])
def test_unwritable_output(tmp_path, mlp_path, where):
    out = {
        "missing-dir": tmp_path / "missing" / "out.onnx",
        "under-a-file": mlp_path / "out.onnx",
        "proc": pathlib.Path("/proc/onnxopt-test-out.onnx"),  # writable by mode bits even for root, but not creatable
    }[where]
    before = _digest(mlp_path)
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--no-numeric-check")
    assert_usage_error(result, out, "does not exist" if where != "proc" else f"cannot write {out}")
    assert _digest(mlp_path) == before


def test_unwritable_report_fails_before_any_work(tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--report", tmp_path / "missing" / "r.json")
    assert_usage_error(result, out, "report directory does not exist")
    (tmp_path / "r.json").mkdir()
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--report", tmp_path / "r.json")
    assert_usage_error(result, out, "report path is a directory")


def test_output_equal_to_input_is_refused(mlp_path):
    before = _digest(mlp_path)
    result = invoke("optimize", mlp_path, "-o", mlp_path, "-p", "cleanup")
    assert result.exit_code == 2 and "never overwrites its input" in result.stderr
    assert _digest(mlp_path) == before


def _empty_npz(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "empty.npz"
    path.touch()
    return path


def _npz_without_arrays(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "none.npz"
    np.savez(path)
    return path


def _wrong_input_name(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "wrong_name.npz"
    np.savez(path, images=X)
    return path


def _wrong_rank(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "wrong_rank.npz"
    np.savez(path, x=X[:, :, None])
    return path


def _wrong_fixed_dim(tmp: pathlib.Path) -> pathlib.Path:
    """Onnxruntime's own message names neither the input nor the axis in its first line."""
    path = tmp / "d.npz"
    np.savez(path, x=np.zeros((4, 7), np.float32))
    return path


def _wrong_dtype(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "wrong_dtype.npz"
    np.savez(path, x=np.array([["a"] * 8] * 2))
    return path


@pytest.mark.parametrize(
    "make_data, expected",
    [
        (_empty_npz, "not a readable .npz"),
        (_npz_without_arrays, "no arrays"),
        (_wrong_input_name, "no array for model input 'x'"),
        (_wrong_rank, "rank 3"),
        (_wrong_fixed_dim, "model expects 8 on axis 1"),
        (_wrong_dtype, "model expects float32"),
        (lambda tmp: tmp / "missing.npz", "not found"),
    ],
    ids=["empty-file", "no-arrays", "wrong-name", "wrong-rank", "wrong-dim", "wrong-dtype", "missing"],
)
def test_bad_data(tmp_path, mlp_path, make_data, expected):
    data = make_data(tmp_path)
    out = tmp_path / "out.onnx"
    before = _digest(mlp_path)
    assert_usage_error(invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--data", data), out, expected)
    assert _digest(mlp_path) == before


def _lengths_off_by_two(tmp_path) -> pathlib.Path:
    """y = Concat(x, [[0, 0]], axis=1) + z: z's length must be x's plus two, which no 16 or 0 synthesized
    lengths give (batch 1: the Concat needs one row)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "zero"], ["longer"], axis=1), helper.make_node("Add", ["longer", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "a"]),
              helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((1, 2), np.float32), "zero")])
    path = tmp_path / "off_by_two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def test_a_model_that_fails_on_synthesized_inputs_asks_for_data(tmp_path):
    model = _lengths_off_by_two(tmp_path)
    out = tmp_path / "out.onnx"
    error = assert_usage_error(invoke("optimize", model, "-o", out, "-p", "cleanup"), out,
                               "IN (off_by_two.onnx) fails in onnxruntime on synthesized inputs", "--data")
    assert "Traceback" not in error
    error = assert_usage_error(invoke("validate", model, model), out, "REF (off_by_two.onnx) fails")
    with pytest.raises(DataError, match="the input model fails in onnxruntime on synthesized inputs"):
        pipeline.run_pipeline(io.load(model), ["cleanup"])


def test_a_decoder_step_runs_on_synthesized_inputs_with_an_empty_past(tmp_path):
    """A decoder step with a cache: its mask spans past + new tokens, which 16 + 16 random ones do not
    match; the synthesized inputs then leave one named dimension empty, here the past."""
    from onnxopt import calibration, validate

    model = ROOT / "models" / "gpt2_cache_tiny_ts.onnx"
    feed = validate.runnable_synthesized(io.load(model), runtime.session(model), batch=2)
    assert feed["past_key_0"].shape == (2, 4, 0, 8) and feed["attention_mask"].shape == (2, 16)
    assert calibration.synthesize_inputs(io.load(model), batch=2)["past_key_0"].shape == (2, 4, 16, 8)
    out = tmp_path / "out.onnx"
    result = invoke("optimize", model, "-o", out, "-p", "prune-structured:heads=true,kv_cache=true,op_types=,ratio=0.5")
    assert result.exit_code == 0, result.output
    result = invoke("validate", model, out)
    assert result.exit_code == 0, result.output
    assert "present_key_1" in result.output


def test_entry_point_one_line_and_debug_traceback(tmp_path):
    """Through ``python -m onnxopt``: one line by default, the traceback with --debug."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "onnxopt", "optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "cleanup"]
    plain = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and plain.stderr.startswith("error: "), plain.stderr
    debug = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "model file not found" in debug.stderr


# --- the commands ---------------------------------------------------------------------------------


def test_optimize_prints_table_and_writes_reports(tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    before = _digest(mlp_path)
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "-p", "fuse:matmul_add_to_gemm=true",
                    "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert _digest(mlp_path) == before
    for row in ("file size", "nodes", "parameters", "latency (ms, median)", "output max abs error"):
        assert row in result.stdout
    ref = runtime.session(mlp_path).run(None, {"x": X})[0]
    np.testing.assert_allclose(runtime.session(out).run(None, {"x": X})[0], ref, rtol=1e-5, atol=1e-6)

    report = json.loads((tmp_path / "report.json").read_text())
    records = report["passes"]
    assert [r["name"] for r in records] == ["cleanup", "fuse"]
    for record in records:
        assert record["status"] == "ok"
        assert {"seconds", "nodes", "parameters", "tensor_bytes", "op_delta", "errors"} <= record.keys()
        assert record["errors"] and record["errors"][0]["max_abs"] < 1e-4
    assert records[1]["op_delta"] == {"Add": -2, "Gemm": 2, "MatMul": -2}
    assert records[1]["nodes"] == [5, 3]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("| pass | status |") and "| fuse | ok |" in markdown and "Gemm +2" in markdown


def test_report_by_extension(tmp_path, mlp_path):
    result = invoke("optimize", mlp_path, "-o", tmp_path / "out.onnx", "-p", "cleanup", "--report", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.md").is_file() and not (tmp_path / "r.json").exists()


def test_passes_lists_cleanup_and_fuse_with_options():
    result = invoke("passes")
    assert result.exit_code == 0
    text = result.stdout
    assert "cleanup  (lossless)" in text and "fuse  (lossless)" in text
    for option in ("fold_constants (bool, default True)", "fold_size_limit (int, default 1024)",
                   "target (ort|onnx, default 'ort')", "matmul_add_to_gemm (bool, default False)"):
        assert option in text
    for name in ("node_filter", "data ("):
        assert name not in text, "injected parameters are not options"


def test_inspect(tmp_path, mlp_path):
    result = invoke("inspect", mlp_path)
    assert result.exit_code == 0, result.output
    assert "IR 8" in result.stdout and "opsets {'': 17}" in result.stdout
    assert "x: float32 ['batch', 8]" in result.stdout.replace("FLOAT", "float32")
    assert "MatMul 2" in result.stdout and "Add 2" in result.stdout and "Relu 1" in result.stdout
    info = json.loads(invoke("inspect", mlp_path, "--json").stdout)
    assert info["nodes"] == 5
    assert info["parameters"] == 8 * 16 + 16 + 16 * 4 + 4
    assert info["tensor_bytes"] == 4 * info["parameters"]
    assert info["op_histogram"] == {"MatMul": 2, "Add": 2, "Relu": 1}
    assert info["external_tensors"] == 0 and info["custom_domains"] == []


def test_inspect_counts_external_tensors(tmp_path, mlp_path):
    model = io.load(mlp_path)
    model.graph.initializers["big"] = ir.Value(name="big", const_value=ir.tensor(np.ones((64, 64), np.float32), name="big"))
    path = io.save(model, tmp_path / "ext.onnx", external_data=True)
    info = json.loads(invoke("inspect", path, "--json").stdout)
    assert info["external_tensors"] == 1
    assert info["file_bytes"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert info["bytes_by_op"]["(unused)"] == 64 * 64 * 4


def test_sizes_count_external_data_of_any_name(tmp_path, mlp_path):
    """A model exported with its weights in 'weights.bin' (not onnxopt's '<name>.data'): the before/after
    table once compared 1 KB of graph with the optimized model's graph and weights."""
    proto = onnx.load(str(mlp_path))
    path = tmp_path / "exported.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    total = path.stat().st_size + (tmp_path / "weights.bin").stat().st_size
    assert json.loads(invoke("inspect", path, "--json").stdout)["file_bytes"] == total
    out = tmp_path / "out.onnx"
    result = invoke("optimize", path, "-o", out, "-p", "cleanup", "--external-data", "--no-numeric-check")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("file size")]
    assert 0.5 < float(line.split()[-1]) < 1.5, line


def _perturbed(mlp_path: pathlib.Path, tmp: pathlib.Path, scale: float) -> pathlib.Path:
    proto = onnx.load(str(mlp_path))
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0]) * scale
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    path = tmp / f"scaled_{scale}.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_pass_that_changes_nothing_says_so(tmp_path, mlp_path):
    """A filter or option that matches no node used to look like any other run (exit 0, unchanged model)."""
    data = tmp_path / "data.npz"
    np.savez(data, x=X)
    result = invoke("optimize", mlp_path, "-o", tmp_path / "out.onnx", "-p", "quantize-int8:op_types=Foo",
                    "-p", "quantize-dynamic", "--data", data, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("  quantize")]
    assert "(no change)" in lines[0] and "(no change)" not in lines[1]
    assert "cosine vs IN 1.000000" in lines[0] and float(lines[1].split("cosine vs IN ")[1].split()[0]) < 1
    assert [r["changed"] for r in json.loads((tmp_path / "r.json").read_text())["passes"]] == [False, True]


def test_validate_refuses_a_candidate_that_is_no_model(tmp_path, mlp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model")
    assert_usage_error(invoke("validate", mlp_path, bad), tmp_path / "none.onnx", "not a valid ONNX protobuf file")


def test_validate_threshold_exit_codes(tmp_path, mlp_path):
    candidate = _perturbed(mlp_path, tmp_path, 1.01)
    ok = invoke("validate", mlp_path, candidate, "--repeat", "5", "--max-rel", "0.5")
    assert ok.exit_code == 0, ok.output
    assert "latency ms" in ok.stdout and "file size" in ok.stdout and "cosine" in ok.stdout
    over = invoke("validate", mlp_path, candidate, "--repeat", "5", "--max-abs", "1e-6")
    assert over.exit_code == 1 and "threshold exceeded on: y" in over.stderr
    low_cosine = invoke("validate", mlp_path, _perturbed(mlp_path, tmp_path, -1.0), "--repeat", "5", "--min-cosine", "0.99")
    assert low_cosine.exit_code == 1
    same = invoke("validate", mlp_path, mlp_path, "--repeat", "5", "--max-abs", "0")
    assert same.exit_code == 0, same.output


def test_bf16_output_is_checked_through_emulation(tmp_path, mlp_path):
    """onnxruntime's CPU provider has no bf16 MatMul: the output used to be refused as failing in
    onnxruntime; it is now checked with the bf16 ops run in float32, and a note says so."""
    out = tmp_path / "bf16.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", "convert-bf16")
    assert result.exit_code == 0, result.output
    assert f"note: {runtime.BFLOAT16_NOTE}" in result.stderr and "output cosine" in result.stdout
    checked = invoke("validate", mlp_path, out, "--repeat", "5", "--min-cosine", "0.999")
    assert checked.exit_code == 0 and f"note: {runtime.BFLOAT16_NOTE}" in checked.stderr, checked.output


@pytest.mark.parametrize("half", ["convert-fp16", "convert-bf16"])
def test_half_precision_inputs_are_checked_with_float32_data(tmp_path, mlp_path, half):
    """keep_io_types=false: the model takes half-precision inputs; the float32 data is cast for the checks
    (onnxruntime refused the float32 feeds)."""
    data = tmp_path / "data.npz"
    np.savez(data, x=X)
    out = tmp_path / "half.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", f"{half}:keep_io_types=false", "--data", data)
    assert result.exit_code == 0, result.output
    checked = invoke("validate", mlp_path, out, "--data", data, "--repeat", "5", "--min-cosine", "0.999")
    assert checked.exit_code == 0, checked.output


# --- recipes and test-only passes ------------------------------------------------------------------

RECIPES = {
    "recipe.yaml": """
passes:
  - cleanup
  - name: test-record
    options: {scale: 0.5, names: [a, b]}
    op_types: [MatMul, Gemm]
    name_regex: "^fc"
    exclude: [fc2]
  - name: fuse
    options:
      matmul_add_to_gemm: true
""",
    "recipe.toml": """
[[passes]]
name = "cleanup"

[[passes]]
name = "test-record"
options = { scale = 0.5, names = ["a", "b"] }
op_types = ["MatMul", "Gemm"]
name_regex = "^fc"
exclude = ["fc2"]

[[passes]]
name = "fuse"
options = { matmul_add_to_gemm = true }
""",
}


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_recipe_options_and_node_filters(tmp_path, mlp_path, test_passes, recipe_name):
    seen = test_passes
    recipe = tmp_path / recipe_name
    recipe.write_text(RECIPES[recipe_name])
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "--recipe", recipe, "-p", "test-record:scale=2",
                    "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads((tmp_path / "r.json").read_text())["passes"]] == [
        "cleanup", "test-record", "fuse", "test-record"]
    from_recipe = next(s for s in seen if s["scale"] == 0.5)
    assert from_recipe["names"] == ["a", "b"]
    node_filter = from_recipe["filter"]
    assert node_filter.op_types == ("MatMul", "Gemm") and node_filter.exclude == ("fc2",)
    model = io.load(mlp_path)
    selected = sorted(n.name for n in model.graph if node_filter(n))
    assert selected == ["fc1"]
    assert any(s["scale"] == 2.0 and s["filter"] is None for s in seen), "-p passes run after the recipe"
    assert [n.op_type for n in io.load(out).graph].count("Gemm") == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("passes: []\n", "non-empty list 'passes'"),
        ("passes:\n  - name: cleanup\n    colour: blue\n", "unknown keys ['colour']"),
        ("passes:\n  - options: {}\n", "needs a 'name'"),
        ("passes: [unclosed\n", "cannot parse recipe"),
        ("passes:\n  - name: cleanup\n    options: {iterations: lots}\n", "must be an integer"),
        ("passes:\n  - name: prune\n    name_regex: 'fc[1'\n", "'name_regex' pattern 'fc[1' is not a regular expression"),
        ("passes:\n  - name: prune\n    name_regex: 5\n", "'name_regex' must be a string"),
        ("passes:\n  - name: prune\n    exclude: ['fc[1']\n", "'exclude' pattern 'fc[1' is not a regular expression"),
        ("passes:\n  - name: prune\n    op_types: {MatMul: 1}\n", "'op_types' must be a string or a list"),
        ("passes:\n  - name: cleanup\n    options: 3\n", "'options' must be a mapping"),
    ],
)
def test_bad_recipe(tmp_path, mlp_path, test_passes, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out.onnx"
    assert_usage_error(invoke("optimize", mlp_path, "-o", out, "--recipe", recipe), out, expected)


@pytest.mark.parametrize("broken", ["test-break", "test-dangling"])
def test_on_error_skip_rolls_back(tmp_path, mlp_path, test_passes, broken):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", broken, "-p", "fuse:matmul_add_to_gemm=true",
                    "--on-error", "skip", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "r.json").read_text())["passes"]
    assert [(r["name"], r["status"]) for r in records] == [(broken, "rolled back"), ("fuse", "ok")]
    assert records[0]["message"]
    ref = runtime.session(mlp_path).run(None, {"x": X})[0]
    np.testing.assert_allclose(runtime.session(out).run(None, {"x": X})[0], ref, rtol=1e-5, atol=1e-6)


def test_on_error_stop_names_pass_and_first_divergence(tmp_path, mlp_path, test_passes):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", "test-break")
    line = assert_usage_error(result, out, "pass 'test-break' failed", "output 'y' changed")
    assert "first diverging value: 'h0'" in line, line


def test_on_error_stop_structural(tmp_path, mlp_path, test_passes):
    out = tmp_path / "out.onnx"
    assert_usage_error(invoke("optimize", mlp_path, "-o", out, "-p", "test-dangling"), out, "pass 'test-dangling' failed")


def test_recover_with_nothing_to_refit_toward(tmp_path, mlp_path):
    """`-p recover` with no reference and no lossy pass before it: exit 2, one line, nothing written."""
    data = tmp_path / "data.npz"
    np.savez(data, x=X)
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "-p", "recover", "--data", data)
    assert_usage_error(result, out, "recover needs the original model")


def test_output_failing_in_onnxruntime_is_not_written(tmp_path, mlp_path, monkeypatch):
    """A model that onnxruntime refuses after saving leaves neither it, its report nor a scratch file; an
    earlier output stays."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"earlier output")
    files = sorted(tmp_path.iterdir())

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed")

    monkeypatch.setattr(cli, "_measure_output", refuse)
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--no-numeric-check", "--report", tmp_path / "r")
    assert result.exit_code == 2 and f"{out} not written" in result.stderr and "Load model failed" in result.stderr
    assert out.read_bytes() == b"earlier output"
    assert sorted(tmp_path.iterdir()) == files


def test_single_file_output_replaces_an_external_data_output(tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    for flag in ("--external-data", "--no-external-data"):
        result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", flag, "--no-numeric-check")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "out.onnx.data").exists() == (flag == "--external-data")  # no stale data file left
    assert runtime.session(out).run(None, {"x": X})[0].shape[0] == X.shape[0]


def test_report_with_another_extension_is_refused_before_any_work(tmp_path, mlp_path):
    out = tmp_path / "out.onnx"
    result = invoke("optimize", mlp_path, "-o", out, "-p", "cleanup", "--report", tmp_path / "r.txt")
    assert_usage_error(result, out, "name a .json or .md file")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mlp_path.name])
