"""Input data for calibration and validation, and streaming capture of intermediate activations.

Data format: an ``.npz`` file with one array per model input, samples stacked along axis 0, or a
directory of such files (read one at a time). :func:`capture` runs the model in onnxruntime batch by
batch and hands the requested intermediate tensors to a callback, so statistics can be accumulated
with memory independent of the number of samples.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt import signature
from onnxopt.errors import DataError

NUMPY_DTYPE = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.BOOL: np.bool_,
}


class Dataset:
    """Samples for the model's inputs: ``.npz`` files read lazily one at a time, or arrays in memory."""

    def __init__(self, sources: Sequence[pathlib.Path | Mapping[str, np.ndarray]]):
        self.sources = list(sources)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dataset:
        path = pathlib.Path(path)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"no .npz files in data directory: {path}")
        for file in files:
            try:
                with np.load(file) as npz:
                    _check_arrays(npz, f"data file {file}")
            except (OSError, ValueError, zipfile.BadZipFile, EOFError):
                raise DataError(f"not a readable .npz file: {file}") from None
        return cls(files)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Dataset:
        """An in-memory dataset of one source (the arrays are not copied)."""
        arrays = {name: np.asarray(array) for name, array in arrays.items()}
        _check_arrays(arrays, "the in-memory data")
        return cls([arrays])

    def check(self, model: ir.Model) -> None:
        """Raise DataError unless every model input has an array of compatible dtype and rank (inputs a
        pass cut down may have the original's size: :mod:`onnxopt.signature`)."""
        kept = signature.kept_entries(model)
        with _open(self.sources[0]) as arrays:
            for value in model.graph.inputs:
                if value.name not in arrays:
                    raise DataError(f"data has no array for model input '{value.name}' (has: {', '.join(arrays)})")
                array = signature.fit({value.name: _restore_records(arrays[value.name])}, kept)[value.name]
                if value.shape is not None and array.ndim != len(value.shape):
                    raise DataError(
                        f"data for input '{value.name}' has rank {array.ndim}, model expects {len(value.shape)}"
                    )
                fixed = [(axis, dim) for axis, dim in enumerate(value.shape or []) if axis and isinstance(dim, int)]
                wrong = [(axis, dim) for axis, dim in fixed if array.shape[axis] != dim]
                if wrong:
                    axis, dim = wrong[0]
                    raise DataError(f"data for input '{value.name}' has shape {tuple(array.shape)}, model expects "
                                    f"{dim} on axis {axis} ({_shape_text(value.shape)})")
                expected = NUMPY_DTYPE.get(value.dtype)
                if expected is not None and not np.can_cast(array.dtype, expected, "same_kind"):
                    raise DataError(f"data for input '{value.name}' is {array.dtype}, model expects {np.dtype(expected)}")

    def batches(self, model: ir.Model, batch_size: int = 8, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of up to ``batch_size`` samples, at most ``limit`` samples in all.

        Where the model's inputs fix their leading dim to d, batches hold exactly d samples (the rest of a
        source is dropped; one batch even when ``limit`` < d); where they fix it to different sizes, axis 0
        is no batch axis and every source is fed whole (``limit`` then counts whole sources' samples).
        """
        self.check(model)
        kept = signature.kept_entries(model)
        fixed = {v.shape[0] for v in model.graph.inputs if v.shape is not None and len(v.shape) and isinstance(v.shape[0], int)}
        exact = len(fixed) == 1
        step = fixed.pop() if exact else batch_size
        served = 0
        for source in self.sources:
            with _open(source) as stored:
                arrays = signature.fit({v.name: _cast(stored[v.name], v.dtype) for v in model.graph.inputs}, kept)
            count = _samples(arrays.values())
            if len(fixed) > 1:  # several fixed sizes: the source is one feed
                if limit is not None and served >= limit:
                    return
                yield arrays
                served += count
                continue
            for start in range(0, count, step):
                if limit is not None and (served >= limit or exact and served and served + step > limit):
                    return
                stop = min(start + step, count)
                if exact and stop - start < step:
                    break
                if not exact and limit is not None:
                    stop = min(stop, start + limit - served)
                yield {k: a[start:stop] if a.ndim else a for k, a in arrays.items()}  # scalars go whole
                served += stop - start
        if served == 0 and exact:
            raise DataError(f"the model fixes its batch to {step} samples; no data file has that many")

    def num_samples(self) -> int:
        total = 0
        for source in self.sources:
            with _open(source) as arrays:
                total += _samples(arrays[k] for k in arrays)
        return total


@contextlib.contextmanager
def _open(source: pathlib.Path | Mapping[str, np.ndarray]) -> Iterator[Mapping[str, np.ndarray]]:
    """The arrays of one source: an ``.npz`` file opened for the block, or an in-memory mapping."""
    if isinstance(source, pathlib.Path):
        with np.load(source) as npz:
            yield npz
    else:
        yield source


def _check_arrays(arrays: Mapping[str, np.ndarray], origin: str) -> None:
    if not len(arrays):
        raise DataError(f"{origin} has no arrays")
    if any(arrays[k].ndim and arrays[k].shape[0] == 0 for k in arrays):  # scalars are fed whole
        raise DataError(f"{origin} has an empty array")


def _shape_text(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def _samples(arrays: Iterable[np.ndarray]) -> int:
    """Samples in one file: the shortest first dimension; scalar inputs (an If condition, a step count)
    are fed whole with every batch and do not count."""
    return min((a.shape[0] for a in arrays if a.ndim), default=1)


def _cast(array: np.ndarray, dtype: ir.DataType | None) -> np.ndarray:
    target = NUMPY_DTYPE.get(dtype)
    array = _restore_records(array)
    return array if target is None or array.dtype == target else array.astype(target)


def _restore_records(array: np.ndarray) -> np.ndarray:
    """np.savez stores bfloat16 arrays as raw 2-byte records (the only ml_dtypes type onnxopt reads):
    read them as bfloat16 again."""
    return array.view(ml_dtypes.bfloat16) if array.dtype.kind == "V" and array.dtype.itemsize == 2 else array


def synthesize_inputs(model: ir.Model, batch: int = 1, seq: int = 16, seed: int = 0,
                      empty: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Random feeds respecting dtypes, fixed dims and id ranges (indices stay below the table size); free
    dimensions are ``batch`` first, else ``seq``, or 0 for the named ones in ``empty``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        dims = []
        for i, dim in enumerate(value.shape or []):
            free = 0 if str(dim) in empty else batch if i == 0 else seq
            dims.append(dim if isinstance(dim, int) else free)
        dtype = NUMPY_DTYPE.get(value.dtype, np.float32)
        name = value.name.lower()
        if value.dtype == ir.DataType.STRING:
            feeds[value.name] = rng.choice(np.array(["a", "b", "c"], dtype=object), size=dims)
        elif dtype == np.bool_:
            feeds[value.name] = np.asarray(rng.random(dims) > 0.5)  # a 0-d comparison gives a numpy scalar
        elif np.issubdtype(dtype, np.integer):
            if "mask" in name:
                feeds[value.name] = np.ones(dims, dtype)
            elif "type" in name or "segment" in name:
                feeds[value.name] = np.zeros(dims, dtype)
            else:
                high = _index_bound(value) or 2
                feeds[value.name] = rng.integers(0, high, size=dims).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def _index_bound(value: ir.Value) -> int | None:
    """Size of the table a Gather indexes with ``value`` (so synthesized ids stay in range)."""
    bounds = []
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0].shape is not None:
            axis = node.attributes.get("axis")
            dim = node.inputs[0].shape[axis.value if axis is not None else 0]
            if isinstance(dim, int):
                bounds.append(dim)
    return min(bounds) if bounds else None


@contextlib.contextmanager
def _model_with_outputs(model: ir.Model, names: Sequence[str]):
    """Temporarily expose main-graph values ``names`` as extra graph outputs."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    values.update(model.graph.initializers)
    existing = {v.name for v in model.graph.outputs}
    added = []
    for name in names:
        if name not in values:
            raise DataError(f"cannot capture '{name}': not a value of the main graph")
        if name not in existing:
            model.graph.outputs.append(values[name])
            added.append(values[name])
            existing.add(name)
    try:
        yield
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def capture(
    model: ir.Model,
    names: Sequence[str],
    feeds: Iterator[dict[str, np.ndarray]],
    on_batch: Callable[[dict[str, np.ndarray]], None],
    threads: int | None = None,
) -> int:
    """Run ``model`` on each feed and call ``on_batch({name: array})`` for the captured values.

    Returns the number of batches run. Memory holds one batch at a time.
    """
    return capture_many([(model, names)], feeds, lambda outs: on_batch(outs[0]), threads)


def capture_many(
    specs: Sequence[tuple[ir.Model, Sequence[str]]],
    feeds: Iterator[dict[str, np.ndarray]],
    on_batch: Callable[[list[dict[str, np.ndarray]]], None],
    threads: int | None = None,
) -> int:
    """Like :func:`capture` for several models run in lockstep on the same feeds (rows stay aligned)."""
    from onnxopt import runtime

    sessions = []
    for model, names in specs:
        names = list(dict.fromkeys(names))
        with _model_with_outputs(model, names):
            sessions.append((runtime.session(model, threads=threads, optimize=False), names))
    count = 0
    for feed in feeds:
        on_batch([dict(zip(names, runtime.run(sess, names, feed))) for sess, names in sessions])
        count += 1
    if count == 0:
        raise DataError("no data: the calibration set is empty")
    return count
