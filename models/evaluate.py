"""Evaluation helpers for the reference models (numpy + onnxruntime only).

Every function taking ``model`` accepts a path, an ``onnx.ModelProto``, a ready
``onnxruntime.InferenceSession`` or a zero-argument factory returning one.

- :func:`mnist_accuracy` — top-1 accuracy of the MNIST CNN on ``models/data/mnist_eval.npz``.
- :func:`word_similarity` — Spearman correlation between cosine similarity of mean-pooled MiniLM
  embeddings of word pairs and human scores (WordSim-353 / SimLex-999 from gensim's test data).
- :func:`minilm_inputs` / :func:`minilm_calibration` — latency feed and calibration feed
  (real text from gensim's Lee corpora, not the evaluation word lists).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from models._onnx import DATA_DIR, session as _session

MNIST_EVAL = DATA_DIR / "mnist_eval.npz"
MNIST_CALIB = DATA_DIR / "mnist_calib.npz"
WORD_DATASETS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


# ----------------------------------------------------------------------------- MNIST
def mnist_accuracy(model, batch: int = 500) -> float:
    sess = _session(model)
    data = np.load(MNIST_EVAL)
    x, y = data["x"], data["y"]
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(-1)
                           for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def mnist_calibration() -> dict[str, np.ndarray]:
    """The committed 256-sample calibration feed (input name -> N×1×28×28)."""
    with np.load(MNIST_CALIB) as d:
        return {k: d[k] for k in d.files}


# ----------------------------------------------------------------------------- text data
def gensim_test_data(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gensim is not installed (its wheel ships the word-similarity data)")
    p = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not p.exists():
        raise FileNotFoundError(p)
    return p


def word_pairs(dataset: str = "wordsim353") -> tuple[list[tuple[str, str]], np.ndarray]:
    if dataset not in WORD_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(WORD_DATASETS)}")
    pairs, scores = [], []
    for line in gensim_test_data(WORD_DATASETS[dataset]).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, s = line.split("\t")[:3]
        pairs.append((a, b))
        scores.append(float(s))
    return pairs, np.asarray(scores)


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), like scipy.stats.rankdata."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(a, b) -> float:
    ra, rb = _rank(np.asarray(a, dtype=np.float64)), _rank(np.asarray(b, dtype=np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _tokenizer():
    from models.tokenizer import WordPieceTokenizer

    global _TOK
    try:
        return _TOK
    except NameError:
        _TOK = WordPieceTokenizer.from_minilm_package()
        return _TOK


def _feed_for(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def embed(model, texts: list[str], batch: int = 64, max_length: int = 128) -> np.ndarray:
    """Attention-mask-weighted mean pooling of ``last_hidden_state`` (sentence-transformers style)."""
    sess = _session(model)
    tok = _tokenizer()
    out = []
    for i in range(0, len(texts), batch):
        feed = tok(texts[i:i + batch], max_length=max_length, padding="longest")
        h = sess.run(None, _feed_for(sess, feed))[0].astype(np.float64)
        m = feed["attention_mask"][..., None].astype(np.float64)
        out.append((h * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return np.concatenate(out)


def word_similarity(model, dataset: str = "wordsim353") -> float:
    """Spearman(cosine of pooled MiniLM embeddings of each word, human score)."""
    return spearman(word_cosines(model, dataset), word_pairs(dataset)[1])


def word_cosines(model, dataset: str = "wordsim353") -> np.ndarray:
    """Cosine of the pooled MiniLM embeddings of each pair of ``dataset``, in the list's order."""
    pairs, _ = word_pairs(dataset)
    words = sorted({w for p in pairs for w in p})
    emb = embed(model, words)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx = {w: i for i, w in enumerate(words)}
    return np.array([emb[idx[a]] @ emb[idx[b]] for a, b in pairs])


def similarity_drop_interval(reference: np.ndarray, candidate: np.ndarray, human, rounds: int = 2000,
                             seed: int = 0) -> tuple[float, float]:
    """95 % paired-bootstrap interval of Spearman(reference) − Spearman(candidate) over the word pairs
    (both cosine lists as :func:`word_cosines` gives them): how far the metric itself resolves a drop."""
    human = np.asarray(human, dtype=np.float64)
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(rounds):
        rows = rng.integers(0, len(human), len(human))
        drops.append(spearman(reference[rows], human[rows]) - spearman(candidate[rows], human[rows]))
    low, high = np.percentile(drops, [2.5, 97.5])
    return float(low), float(high)


# ----------------------------------------------------------------------------- MiniLM feeds
def _corpus_docs(name: str) -> list[str]:
    text = gensim_test_data(name).read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in text.splitlines() if d.strip()]


def _sentences(name: str) -> list[str]:
    sents = []
    for doc in _corpus_docs(name):
        sents += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", doc) if len(s.split()) >= 3]
    return sents


def minilm_inputs(batch: int = 1, seq: int = 128) -> dict[str, np.ndarray]:
    """Latency feed: real news paragraphs (gensim lee.cor) tokenized, truncated/padded to ``seq``."""
    docs = _corpus_docs("lee.cor")
    return _tokenizer()([docs[i % len(docs)] for i in range(batch)], max_length=seq, padding="max_length")


def minilm_calibration(n: int = 128, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration feed from gensim's lee_background.cor (news text, not the WordSim/SimLex
    word lists): ``n`` snippets of 1–6 consecutive sentences (seeded), padded to ``seq`` so the
    attention mask has real padding. Returns {input name: int64 [n, seq]}."""
    return _tokenizer()(news_snippets("lee_background.cor", n, seed), max_length=seq, padding="max_length")


def news_snippets(corpus: str, n: int, seed: int = 0) -> list[str]:
    """``n`` snippets of 1–6 consecutive sentences of one of gensim's test corpora (seeded)."""
    sents = _sentences(corpus)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        start, k = int(rng.integers(len(sents))), int(rng.integers(1, 7))
        texts.append(" ".join(sents[start:start + k]))
    return texts


def save_minilm_calibration(path: str | os.PathLike, n: int = 128, seq: int = 128) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **minilm_calibration(n=n, seq=seq))
    return path


def minilm_latency(model, threads: int = 1, batch: int = 1, seq: int = 128,
                   warmup: int = 5, runs: int = 30) -> float:
    """Median latency in ms of one run on :func:`minilm_inputs` (path -> session with ``threads``)."""
    sess = model if not isinstance(model, (str, os.PathLike)) else _session(model, threads=threads)
    sess = _session(sess)
    feed = _feed_for(sess, minilm_inputs(batch, seq))
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
