"""Numerical comparison and latency of two models in onnxruntime."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import calibration, runtime


@dataclasses.dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float

    def within(self, rtol: float, atol: float) -> bool:
        return self.max_abs <= atol or self.max_rel <= rtol


def compare(reference: np.ndarray, candidate: np.ndarray, name: str = "") -> OutputError:
    """Error statistics of ``candidate`` against ``reference`` (non-finite values compared for equality)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"output '{name}' shape changed: {reference.shape} -> {candidate.shape}")
    if reference.dtype == np.bool_ or reference.dtype.kind in "OSU":
        diff = float(np.mean(reference != candidate))
        return OutputError(name, diff, diff, diff, 1.0 - diff)
    ref = reference.astype(np.float64).reshape(-1)
    cand = candidate.astype(np.float64).reshape(-1)
    finite = np.isfinite(ref) & np.isfinite(cand)
    mismatched_special = np.any(~finite & ~((ref == cand) | (np.isnan(ref) & np.isnan(cand))))
    if mismatched_special:
        return OutputError(name, float("inf"), float("inf"), float("inf"), float("nan"))
    ref, cand = ref[finite], cand[finite]
    if ref.size == 0:
        return OutputError(name, 0.0, 0.0, 0.0, 1.0)
    diff = np.abs(ref - cand)
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    norm = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    cosine = float(ref @ cand / norm) if norm > 0 else float(np.array_equal(ref, cand))
    return OutputError(name, float(diff.max()), float(diff.max() / scale), float(diff.mean()), cosine)


def run_all(sess: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs of ``sess`` over all feeds, concatenated along axis 0 (outputs keyed by name)."""
    names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        wanted = {i.name for i in sess.get_inputs()}
        for name, array in zip(names, runtime.run(sess, names, {k: v for k, v in feed.items() if k in wanted})):
            collected[name].append(np.asarray(array))
    return {n: (np.concatenate(a) if a[0].ndim and len(a) > 1 else a[0]) for n, a in collected.items()}


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> list[OutputError]:
    return [compare(reference[name], candidate[name], name) for name in reference if name in candidate]


def latency_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int = 3, repeat: int = 20) -> float:
    """Median wall time of one run, in milliseconds."""
    call = runtime.runner(sess, None, feed)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


Feeds = dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]]


def _interleaved_rounds(sessions: Sequence[ort.InferenceSession], feed: Feeds, rounds: int, repeat: int) -> list[list[list[float]]]:
    """Call times (ms) per session and round: every round runs each session ``repeat`` times in turn.

    Several feeds are taken in turn, call by call: one input repeated lets the CPU learn its data-dependent
    branches (the row walk of a post-ReLU SparseMatMul ran ~5 % faster on one repeated MNIST image than on 64
    different ones), which deployment does not see."""
    feeds = [feed] if isinstance(feed, dict) else list(feed)
    samples: list[list[list[float]]] = [[] for _ in sessions]
    calls = [[runtime.runner(sess, None, f) for f in feeds] for sess in sessions]
    for per_feed in calls:  # two warm-up calls
        for r in range(2):
            per_feed[r % len(per_feed)]()
    for _ in range(rounds):
        for i, per_feed in enumerate(calls):
            times = []
            for r in range(repeat):
                call = per_feed[r % len(per_feed)]
                start = time.perf_counter()
                call()
                times.append((time.perf_counter() - start) * 1e3)
            samples[i].append(times)
    return samples


def interleaved_latency_ms(sessions: Sequence[ort.InferenceSession], feed: Feeds, rounds: int = 5, repeat: int = 10) -> list[float]:
    """Medians for several sessions measured in interleaved rounds (fair on a noisy machine)."""
    return [statistics.median(t for times in per_round for t in times) for per_round in _interleaved_rounds(sessions, feed, rounds, repeat)]


def interleaved_speedups(
    sessions: Sequence[ort.InferenceSession], feed: Feeds, rounds: int = 7, repeat: int = 10
) -> tuple[list[float], list[float]]:
    """Medians (ms) of each session over all rounds, and each session's speedup over the first one: the
    median over rounds of that round's ratio of medians. Pairing by round keeps a machine whose load
    changes between rounds (a neighbour's phases) from mixing fast and slow times into one ratio."""
    samples = _interleaved_rounds(sessions, feed, rounds, repeat)
    medians = [statistics.median(t for times in per_round for t in times) for per_round in samples]
    base = [statistics.median(times) for times in samples[0]]
    speedups = [statistics.median(b / statistics.median(times) for b, times in zip(base, per_round)) for per_round in samples]
    return medians, speedups


def feeds_for(model: ir.Model, data: calibration.Dataset | None, max_batches: int = 4, batch: int = 8):
    """Validation feeds: up to ``max_batches`` batches of the user's data, or one synthesized batch."""
    if data is None:
        return [calibration.synthesize_inputs(model, batch=2)]
    return list(data.batches(model, batch_size=batch, limit=max_batches * batch))


def first_divergence(
    reference: ir.Model, candidate: ir.Model, feed: dict[str, np.ndarray], rtol: float = 1e-4, atol: float = 1e-5
) -> str | None:
    """Name of the first value (in the reference's order) present in both models that diverges."""
    ref_values = [v for node in reference.graph for v in node.outputs if v.name]
    cand_names = {v.name: v for node in candidate.graph for v in node.outputs if v.name}
    shared = [v.name for v in ref_values if v.name in cand_names and v.dtype == cand_names[v.name].dtype]
    if not shared:
        return None
    got: dict[str, dict[str, np.ndarray]] = {}
    for key, model in (("ref", reference), ("cand", candidate)):
        calibration.capture(model, shared, iter([feed]), lambda out, key=key: got.__setitem__(key, out))
    for name in shared:
        ref, cand = got["ref"][name], got["cand"][name]
        if ref.shape != cand.shape or not compare(ref, cand, name).within(rtol, atol):
            return name
    return None


def session_pair(reference, candidate, threads: int | None = None):
    return runtime.session(reference, threads=threads), runtime.session(candidate, threads=threads)
