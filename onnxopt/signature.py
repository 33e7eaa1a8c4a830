"""Model inputs and outputs that a pass cut down, e.g. a KV cache that lost attention heads.

The pass records what it kept in the model's metadata (``onnxopt.kept_entries``), indices into the
original model's axis. onnxopt then feeds such a model the original's arrays (:func:`fit` in
``runtime.runner`` and ``Dataset.batches``) and compares its outputs with the original's, sliced alike.
Deployment code feeds the cut-down shapes itself, e.g. a decoder's ``present`` outputs as its next ``past``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import ModelLoadError

KEPT_ENTRIES = "onnxopt.kept_entries"


@dataclasses.dataclass(frozen=True)
class Kept:
    """Entries ``indices`` kept of the ``of`` entries along ``axis`` of one model input or output."""

    axis: int
    of: int
    indices: tuple[int, ...]


def kept_entries(model: ir.Model | ort.InferenceSession) -> dict[str, Kept]:
    """The recorded cuts of ``model`` (or of the model a session runs), by input or output name."""
    if isinstance(model, ort.InferenceSession):
        text = model.get_modelmeta().custom_metadata_map.get(KEPT_ENTRIES)
    else:
        text = model.metadata_props.get(KEPT_ENTRIES)
    if not text:
        return {}
    try:
        return {name: Kept(int(e["axis"]), int(e["of"]), tuple(int(i) for i in e["kept"])) for name, e in json.loads(text).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"the model's metadata '{KEPT_ENTRIES}' is malformed ({type(exc).__name__}: {exc})") from None


def record_kept(model: ir.Model, name: str, axis: int, of: int, kept: Sequence[int]) -> None:
    """Note that input or output ``name`` of ``model`` now holds entries ``kept`` of the ``of`` it had along
    ``axis``; after an earlier cut of the same tensor, the indices are composed with it."""
    entries = kept_entries(model)
    if name in entries:
        earlier = entries[name]
        kept, of = [earlier.indices[i] for i in kept], earlier.of
    entries[name] = Kept(axis, of, tuple(int(i) for i in kept))
    model.metadata_props[KEPT_ENTRIES] = json.dumps(
        {n: {"axis": k.axis, "of": k.of, "kept": list(k.indices)} for n, k in sorted(entries.items())})


def fit(arrays: Mapping[str, np.ndarray], kept: Mapping[str, Kept]) -> dict[str, np.ndarray]:
    """``arrays`` by name, each one still of the original size (``of`` entries) cut down to the kept ones."""
    def cut(name: str, array: np.ndarray) -> np.ndarray:
        k = kept.get(name)
        if k is None or not isinstance(array, np.ndarray) or array.ndim <= k.axis or array.shape[k.axis] != k.of:
            return array
        return np.take(array, k.indices, axis=k.axis)

    return {name: cut(name, array) for name, array in arrays.items()}


def since(before: Mapping[str, Kept], after: Mapping[str, Kept]) -> dict[str, Kept]:
    """The cuts of one step, from a model whose cuts were ``before`` to one whose cuts are ``after``."""
    step = {}
    for name, now in after.items():
        earlier = before.get(name)
        if earlier is None:
            step[name] = now
        elif earlier != now:
            step[name] = Kept(now.axis, len(earlier.indices), tuple(earlier.indices.index(i) for i in now.indices))
    return step
