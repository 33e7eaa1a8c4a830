"""Robustness corpus: every onnx backend test model survives ``cleanup``, then ``fuse``, and every model with
weights (MatMul/Gemm/Conv/Gather) each compression and quantization pass.

For each model, onnxruntime outputs of the optimized model must match the original's on the test's
own inputs (or synthesized ones) within 1e-4 relative to max|reference| (2 ulp for 16/8-bit floats),
the result must not be bigger than the original (``value_info`` shape annotations and node names aside), and a model the onnx checker accepts must still be accepted. Models onnxruntime
cannot load or run are skipped with the reason; known upstream bugs are strict xfails. A summary (counts, skip reasons) is printed
at the end of the session and written to ``corpus-summary.json`` beside the regenerated node tests.
Set ``ONNXOPT_CORPUS_NODE=0`` to leave out the ~1900 regenerated node tests.
"""

from __future__ import annotations

import os
import re

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import _corpus_data
from onnxopt import calibration, io, pipeline, registry, runtime
from onnxopt.errors import OnnxoptError

RTOL = 1e-4  # for float16/bfloat16/float8 outputs: 2 ulp (1e-4 is below their resolution)
ATOL = 1e-7  # outputs that are exactly zero
_NODE_DIR = None if os.environ.get("ONNXOPT_CORPUS_NODE") == "0" else _corpus_data.ensure_node_tests()
CORPUS = _corpus_data.collect(_NODE_DIR)


def _session(source) -> ort.InferenceSession:
    """As users get it (bfloat16 ops emulated in float32), one thread, onnxruntime's optimizations off."""
    return runtime.session(source, threads=1, optimize=False)


def _feeds(entry: _corpus_data.CorpusModel, proto: onnx.ModelProto, session: ort.InferenceSession) -> dict:
    wanted = [i.name for i in session.get_inputs()]
    if not entry.input_paths:
        synthesized = calibration.synthesize_inputs(io.load(entry.model_path, lift_constants=False))
        return {name: synthesized[name] for name in wanted}
    initializers = {t.name for t in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    feeds = {}
    for j, path in enumerate(entry.input_paths):
        info = graph_inputs[j]
        feeds[info.name] = _corpus_data.read_input(path, info.type)
    return {k: v for k, v in feeds.items() if k in wanted}


def _run(session: ort.InferenceSession, feeds: dict) -> dict:
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, runtime.run(session, names, feeds)))  # bfloat16/float8 in and out included
    except ValueError as exc:  # int4 inputs: onnxruntime's Python API wants packed bits
        pytest.skip(str(exc))


def _mismatch(reference, candidate, where: str) -> str | None:
    """Why ``candidate`` differs from ``reference`` (arrays, sequences, maps, None), or None."""
    if isinstance(reference, (list, tuple)):
        if not isinstance(candidate, (list, tuple)) or len(reference) != len(candidate):
            return f"{where}: sequence length/type changed"
        return next(filter(None, (_mismatch(r, c, f"{where}[{i}]") for i, (r, c) in enumerate(zip(reference, candidate)))), None)
    if isinstance(reference, dict):
        if not isinstance(candidate, dict) or reference.keys() != candidate.keys():
            return f"{where}: map keys changed"
        return next(filter(None, (_mismatch(reference[k], candidate[k], f"{where}[{k!r}]") for k in reference)), None)
    if reference is None or candidate is None:
        return None if reference is candidate else f"{where}: optional presence changed"
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape or ref.dtype != cand.dtype:
        return f"{where}: {ref.dtype}{list(ref.shape)} -> {cand.dtype}{list(cand.shape)}"
    if ref.dtype.kind in "OSUb" or ref.size == 0:
        return None if np.array_equal(ref, cand) else f"{where}: values changed"
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    special = ~np.isfinite(ref64) | ~np.isfinite(cand64)
    if not np.array_equal(ref64[special], cand64[special], equal_nan=True):
        return f"{where}: inf/nan pattern changed"
    diff = np.abs(ref64[~special] - cand64[~special])
    scale = float(np.max(np.abs(ref64[~special]), initial=0.0))
    worst = float(diff.max(initial=0.0))
    rtol = max(RTOL, 2 * _eps(ref.dtype))
    if worst > rtol * scale + ATOL:
        return f"{where}: max abs diff {worst:.3g} > {rtol:g} x max|ref| {scale:.3g}"
    return None


def _eps(dtype: np.dtype) -> float:
    try:
        return float(ml_dtypes.finfo(dtype).eps)
    except ValueError:  # integer types
        return 0.0


def _shapes(outputs: dict) -> dict:
    def describe(v):
        if isinstance(v, (list, tuple)):
            return [describe(x) for x in v]
        if isinstance(v, dict):
            return {k: describe(x) for k, x in v.items()}
        return None if v is None else (np.asarray(v).dtype.str, np.asarray(v).shape)

    return {k: describe(v) for k, v in outputs.items()}


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return f"{type(exc).__name__}: {text[:160]}"


def _size_without_annotations(proto: onnx.ModelProto) -> int:
    """Serialized size, not counting shape annotations of intermediate values (~30 bytes each) and node names
    (onnxscript's rewriter names the nodes it writes)."""
    names = sum(len(node.name.encode()) + 2 for node in _nodes(proto.graph) if node.name)
    return proto.ByteSize() - sum(v.ByteSize() + 2 for v in proto.graph.value_info) - names


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from _nodes(subgraph)


def _checker_accepts(proto: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(proto)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("entry", CORPUS, ids=[e.test_id for e in CORPUS])
def test_cleanup_fuse_preserves_outputs(entry, record_property):
    original = entry.model_path.read_bytes()
    proto = onnx.load_from_string(original)
    try:
        ref_session = _session(original)
    except Exception as exc:
        pytest.skip(f"onnxruntime cannot load the original: {_short(exc)}")
    feeds = _feeds(entry, proto, ref_session)
    try:
        reference = _run(ref_session, feeds)
    except Exception as exc:
        pytest.skip(f"onnxruntime cannot run the original: {_short(exc)}")
    deterministic = _mismatch(reference, _run(ref_session, feeds), "rerun") is None

    model = io.load(entry.model_path)
    size_before = _size_without_annotations(proto)
    for name in ("cleanup", "fuse"):  # checked after each: fuse once repaired what cleanup broke in Scan bodies
        model, report = pipeline.run_pipeline(model, [name], check=False, numeric_check=False)
        assert report.records[0].status == "ok"
        optimized = io.to_bytes(model)
        size_after = _size_without_annotations(onnx.load_from_string(optimized))
        assert size_after <= size_before, f"{name}: grew from {size_before} to {size_after} bytes"
        if _checker_accepts(proto):
            onnx.checker.check_model(onnx.load_from_string(optimized))
        candidate = _run(_session(optimized), feeds)
        assert candidate.keys() == reference.keys()
        if deterministic:
            problems = [p for out in reference if (p := _mismatch(reference[out], candidate[out], out))]
            assert not problems, f"{name}: " + "; ".join(problems)
        else:
            assert _shapes(candidate) == _shapes(reference)
    if not deterministic:
        record_property("corpus_note", "nondeterministic original: shapes and dtypes compared")


WEIGHT_OPS = {"MatMul", "Gemm", "Conv", "Gather"}
LOSSY_PASSES = {
    "quantize-dynamic": {},
    "quantize-int8": {},
    "quantize-weights-int4": {"bits": "4", "block_size": "16", "min_elements": "1"},
    "quantize-weights-onnx": {"bits": "8", "format": "onnx", "block_size": "16", "min_elements": "1"},
    "convert-fp16": {},
    "convert-bf16": {},
    "prune": {"sparsity": "0.5", "min_elements": "1"},
    "prune-structured": {"ratio": "0.25"},
    "low-rank": {"rank": "1", "min_elements": "1"},
    "binarize": {"keep_first_last": "false", "min_elements": "1"},
}


def _op_types(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found |= _op_types(sub)
    return found


WEIGHTED = [e for e in CORPUS if _op_types(onnx.load(str(e.model_path), load_external_data=False).graph) & WEIGHT_OPS]


@pytest.mark.parametrize("pass_name", sorted(LOSSY_PASSES))
@pytest.mark.parametrize("entry", WEIGHTED, ids=[e.test_id for e in WEIGHTED])
def test_lossy_passes_keep_models_runnable(entry, pass_name):
    """Every compression/quantization pass leaves a model onnxruntime loads and runs with the original's
    output names, dtypes and shapes (or refuses with a typed error). Calibration data: the test's own inputs."""
    original = entry.model_path.read_bytes()
    proto = onnx.load_from_string(original)
    try:
        ref_session = _session(original)
        feeds = _feeds(entry, proto, ref_session)
        reference = _run(ref_session, feeds)
    except Exception as exc:
        pytest.skip(f"onnxruntime cannot run the original: {_short(exc)}")
    data = calibration.Dataset.from_arrays(feeds) if feeds else None
    model = io.load(entry.model_path)
    pass_ = registry.get(pass_name.removesuffix("-int4").removesuffix("-onnx")).create(LOSSY_PASSES[pass_name], data=data)
    try:
        pass_(model)
    except OnnxoptError as exc:
        pytest.skip(f"refused: {exc}")
    candidate = _run(_session(model), feeds)
    assert _shapes(candidate) == _shapes(reference)
