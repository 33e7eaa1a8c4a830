"""Shared test fixtures and the robustness-corpus summary printed at the end of a session."""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

# `models/` and `bench/` are repo-root folders, not part of the installed wheel.
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from onnxopt import registry  # noqa: E402

CORPUS_TEST = "test_corpus.py::"


@pytest.fixture
def mlp_proto() -> onnx.ModelProto:
    """A two-layer MLP (MatMul+Add+Relu, MatMul+Add) on input ``x`` [batch, 8], output ``y`` [batch, 4]."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 16)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 4)).astype(np.float32),
        "b2": rng.standard_normal(4).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def mlp_path(tmp_path, mlp_proto) -> pathlib.Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_proto, str(path))
    return path


# --- test-only passes ----------------------------------------------------------------------------

SEEN: list[dict] = []


class _RecordPass(ir.passes.InPlacePass):
    """Record the options and node filter it was given (test only).

    Args:
        scale: A float option.
        names: A list option.
    """

    def __init__(self, scale: float = 1.0, names: list[str] | None = None, node_filter=None):
        super().__init__()
        SEEN.append({"scale": scale, "names": names, "filter": node_filter})

    def call(self, model):
        return ir.passes.PassResult(model, False)


class _BreakWeightsPass(ir.passes.InPlacePass):
    """Double the first MatMul's weight while claiming to be lossless (test only)."""

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "MatMul")
        weight = node.inputs[1]
        weight.const_value = ir.tensor(weight.const_value.numpy() * 2, name=weight.name)
        return ir.passes.PassResult(model, True)


class _DanglingPass(ir.passes.InPlacePass):
    """Remove the Relu, leaving its consumer reading an undefined value (test only)."""

    def call(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(relu, safe=False)
        return ir.passes.PassResult(model, True)


@pytest.fixture
def test_passes() -> list[dict]:
    """Register the test-only passes for one test (then remove them); yields what test-record saw."""
    registry.all_passes()  # load the real passes first
    passes = {"test-record": _RecordPass, "test-break": _BreakWeightsPass, "test-dangling": _DanglingPass}
    for name, cls in passes.items():
        registry.register(name, lossless=True)(cls)
    SEEN.clear()
    yield SEEN
    for name in passes:
        registry._REGISTRY.pop(name, None)


def pytest_terminal_summary(terminalreporter, config):
    """Counts of the robustness corpus (passed / skipped by reason / failed), also as JSON."""
    outcomes: dict[str, list] = collections.defaultdict(list)
    notes = collections.Counter()
    for outcome in ("passed", "skipped", "xfailed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if CORPUS_TEST not in getattr(report, "nodeid", ""):
                continue
            test_id = report.nodeid.split("[", 1)[-1].rstrip("]")
            if outcome == "xfailed":
                outcomes[outcome].append((test_id, report.wasxfail))
            elif outcome == "skipped":
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                outcomes[outcome].append((test_id, reason.removeprefix("Skipped: ")))
            elif outcome == "failed" and report.when == "call":
                crash = getattr(report.longrepr, "reprcrash", None)
                message = str(crash.message if crash is not None else report.longrepr)
                outcomes[outcome].append((test_id, (message.splitlines() or [""])[0][:200]))
            elif outcome == "passed" and report.when == "call":
                outcomes[outcome].append((test_id, ""))
                notes.update(value for key, value in report.user_properties if key == "corpus_note")
    if not outcomes:
        return
    import _corpus_data

    write = terminalreporter.write_line
    terminalreporter.section("robustness corpus")
    write(", ".join(f"{k} {len(v)}" for k, v in outcomes.items()))
    for note, count in notes.items():
        write(f"  passed with note ({count}): {note}")
    for reason, count in collections.Counter(_reason_group(r) for _, r in outcomes["skipped"]).most_common():
        write(f"  skipped ({count}): {reason}")
    for test_id, reason in outcomes["xfailed"] + outcomes["failed"]:
        write(f"  {test_id}: {reason}")
    summary = {k: [{"test": t, "reason": r} for t, r in v] for k, v in outcomes.items()}
    path = _corpus_data.cache_dir() / "corpus-summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    write(f"details: {path}")


def _reason_group(reason: str) -> str:
    """Skip reasons without the model-specific parts, for counting."""
    import re

    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\d+", "N", reason)
    return reason[:150]
