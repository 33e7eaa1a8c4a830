"""Numerical comparison and latency of two models in onnxruntime."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import calibration, kernels, runtime, signature
from onnxopt.errors import DataError, NativeRunError, RuntimeLibraryError


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


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    kept: Mapping[str, signature.Kept] | None = None) -> list[OutputError]:
    """Errors of the outputs both have; ``kept``: the candidate's cut-down outputs (the reference's are cut alike)."""
    reference = signature.fit(reference, kept or {})
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
    return medians, _paired_speedups([[statistics.median(times) for times in per_round] for per_round in samples])


def _paired_speedups(round_medians: list[list[float]]) -> list[float]:
    """Per model, the median over rounds of the first model's median in that round over its own."""
    return [statistics.median(b / t for b, t in zip(round_medians[0], own)) for own in round_medians]


@dataclasses.dataclass
class NativeTimes:
    """What onnxopt_latency measured: per model, its median call time (ms) in each round, and the sum of
    its outputs on the first feed (to check it ran what Python runs)."""

    rounds_ms: list[list[float]]
    output_sums: list[float]


def native_rounds(
    models: Sequence[str | os.PathLike], feed: Feeds, threads: int = 1, rounds: int = 7, repeat: int = 10
) -> NativeTimes:
    """Models timed in interleaved rounds by the C++ tool onnxopt_latency, without Python's ~8 us per
    call; feeds are taken in turn and onnxopt's kernel library is registered, as in :func:`_interleaved_rounds`.

    Raises RuntimeLibraryError when the tool or onnxruntime's shared library is missing, NativeRunError
    when the tool fails (its one-line message)."""
    try:
        tool = kernels.latency_tool_path()
    except FileNotFoundError as exc:
        raise RuntimeLibraryError(str(exc)) from None
    found = sorted(pathlib.Path(ort.__file__).parent.glob("capi/libonnxruntime.so*"))
    if not found:
        raise RuntimeLibraryError(f"onnxruntime's shared library is not in {pathlib.Path(ort.__file__).parent / 'capi'}")
    feeds = [feed] if isinstance(feed, dict) else list(feed)
    with tempfile.TemporaryDirectory(prefix="onnxopt-latency-") as tmp:
        lines = [f"threads {threads}", f"rounds {rounds}", f"repeat {repeat}", f"custom_ops {runtime.kernel_library()}"]
        lines += [f"model {pathlib.Path(m).resolve()}" for m in models]
        for i, f in enumerate(feeds):
            lines.append("feed")
            for j, (name, array) in enumerate(f.items()):
                array = np.ascontiguousarray(array)
                data = pathlib.Path(tmp) / f"{i}_{j}.bin"
                array.tofile(data)
                element_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                lines.append(" ".join(["input", name, str(element_type), str(array.ndim), *map(str, array.shape), str(data)]))
        spec = pathlib.Path(tmp) / "spec.txt"
        spec.write_text("\n".join(lines) + "\n")
        done = subprocess.run([str(tool), str(found[-1]), str(spec)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()
        raise NativeRunError(message[-1] if message else f"onnxopt_latency exited with status {done.returncode}")
    per_model: list[list[float]] = [[] for _ in models]
    sums = [0.0] * len(models)
    for line in done.stdout.splitlines():
        words = line.split()
        if words[0] == "round":
            for m, us in enumerate(words[2:]):
                per_model[m].append(float(us) / 1e3)
        elif words[0] == "check":
            sums[int(words[1])] = float(words[2])
    return NativeTimes(per_model, sums)


def native_speedups(
    models: Sequence[str | os.PathLike], feed: Feeds, threads: int = 1, rounds: int = 7, repeat: int = 10
) -> tuple[list[float], list[float]]:
    """:func:`interleaved_speedups` measured by onnxopt_latency (:func:`native_rounds`): median ms of each
    model over the rounds, and the median over rounds of each round's ratio to the first model."""
    per_model = native_rounds(models, feed, threads, rounds, repeat).rounds_ms
    return [statistics.median(times) for times in per_model], _paired_speedups(per_model)


SYNTHESIZED = "synthesized inputs (give real ones: --data, or data= in Python)"


def from_onnxruntime(exc: BaseException) -> bool:
    """Whether onnxruntime raised ``exc`` (its bindings' errors: bad input for it, not a bug of ours)."""
    return type(exc).__module__.startswith("onnxruntime")


def reference_outputs(sess: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]], synthesized: bool,
                      what: str = "the input model") -> dict[str, np.ndarray]:
    """:func:`run_all` on the model the others are compared with; DataError when onnxruntime fails on
    the feeds (they are the user's data, or synthesized)."""
    try:
        return run_all(sess, feeds)
    except Exception as exc:
        if not from_onnxruntime(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        on = SYNTHESIZED if synthesized else "the given data"
        raise DataError(f"{what} fails in onnxruntime on {on}: {type(exc).__name__}: {first}") from exc


def feeds_for(model: ir.Model, data: calibration.Dataset | None, max_batches: int = 4, batch: int = 8,
              session: ort.InferenceSession | None = None):
    """Validation feeds: up to ``max_batches`` batches of the user's data, or one synthesized batch (one
    that ``session``, the model's, runs: :func:`runnable_synthesized`)."""
    if data is None:
        return [runnable_synthesized(model, session, batch=2)]
    return list(data.batches(model, batch_size=batch, limit=max_batches * batch))


def runnable_synthesized(model: ir.Model, session: ort.InferenceSession | None, batch: int) -> dict[str, np.ndarray]:
    """Synthesized inputs with every free dimension 16; where ``session`` fails on them, the first variant
    it runs with one named dimension empty instead (a decoder's past length: its mask covers past + new
    tokens, which 16 + 16 does not match). None runs: the first, whose failure the caller reports."""
    feed = calibration.synthesize_inputs(model, batch=batch)
    if session is None or _runs(session, feed):
        return feed
    names = dict.fromkeys(str(d) for v in model.graph.inputs for d in (v.shape or []) if not isinstance(d, int))
    for name in names:
        variant = calibration.synthesize_inputs(model, batch=batch, empty=frozenset([name]))
        if _runs(session, variant):
            return variant
    return feed


def _runs(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> bool:
    try:
        runtime.run(session, None, feed)
    except Exception as exc:
        if not from_onnxruntime(exc):
            raise
        return False
    return True


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
