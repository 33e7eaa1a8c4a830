"""The robustness corpus: onnx's backend test models, with their input ``.pb`` files.

The installed onnx wheel ships ``light``, ``pytorch-converted``, ``pytorch-operator`` and ``simple``
(``real`` only holds download URLs). onnx >= 1.23 no longer ships ``node``; it is regenerated once from
onnx's own node test cases into a cache directory outside the repository::

    python -m tests._corpus_data            # writes $ONNXOPT_CORPUS_DIR or ~/.cache/onnxopt/onnx-node-tests

Layout as in onnx: ``<kind>/<test name>/model.onnx`` + ``test_data_set_0/input_<j>.pb`` (``light`` keeps
``light_<name>.onnx`` files and has no inputs: they are synthesized).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

SHIPPED_KINDS = ("light", "pytorch-converted", "pytorch-operator", "simple")
SHIPPED_DIR = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data"
_STAMP = "onnx-version.txt"


@dataclasses.dataclass(frozen=True)
class CorpusModel:
    kind: str
    name: str
    model_path: pathlib.Path
    input_paths: tuple[pathlib.Path, ...]

    @property
    def test_id(self) -> str:
        return f"{self.kind}/{self.name}"


def cache_dir() -> pathlib.Path:
    """Where the regenerated ``node`` tests live (``$ONNXOPT_CORPUS_DIR`` overrides)."""
    default = pathlib.Path.home() / ".cache" / "onnxopt" / "onnx-node-tests"
    return pathlib.Path(os.environ.get("ONNXOPT_CORPUS_DIR", default))


def ensure_node_tests(root: pathlib.Path | None = None) -> pathlib.Path:
    """Write onnx's node test cases under ``root/node`` unless already there for this onnx version."""
    root = root or cache_dir()
    stamp = root / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == onnx.__version__ and (root / "node").is_dir():
        return root / "node"
    from onnx.backend.test.case import node as node_cases

    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".node-", dir=root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators divide by zero on purpose
        cases = node_cases.collect_testcases()
    for case in cases:
        _write_case(case, staging / case.name)
    shutil.rmtree(root / "node", ignore_errors=True)
    staging.rename(root / "node")
    stamp.write_text(onnx.__version__)
    return root / "node"


def _write_case(case, directory: pathlib.Path) -> None:
    """Same files as ``onnx.backend.test.cmd_tools generate-data`` writes (which skips node cases)."""
    data_dir = directory / "test_data_set_0"
    data_dir.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(case.model.SerializeToString())
    inputs, _ = case.data_sets[0]
    for j, value in enumerate(inputs):
        info = case.model.graph.input[j]
        (data_dir / f"input_{j}.pb").write_bytes(_to_proto(value, info.name, info.type).SerializeToString())


def _to_proto(value, name: str, type_proto: onnx.TypeProto):
    if isinstance(value, onnx.TensorProto):
        return value
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(value, name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, name)
    if kind == "map_type":
        return numpy_helper.from_dict(value, name)
    return numpy_helper.from_array(np.asarray(value), name)


def read_input(path: pathlib.Path, type_proto: onnx.TypeProto):
    """An input ``.pb`` as what onnxruntime takes: array, list of arrays, dict, or None."""
    kind = type_proto.WhichOneof("value")
    data = path.read_bytes()
    if kind == "sequence_type":
        return numpy_helper.to_list(onnx.SequenceProto.FromString(data))
    if kind == "optional_type":
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(data))
    if kind == "map_type":
        return numpy_helper.to_dict(onnx.MapProto.FromString(data))
    return numpy_helper.to_array(onnx.TensorProto.FromString(data))


def collect(node_dir: pathlib.Path | None) -> list[CorpusModel]:
    """Every corpus model: the shipped kinds plus ``node`` from ``node_dir`` when given."""
    models = []
    for kind in SHIPPED_KINDS:
        kind_dir = SHIPPED_DIR / kind
        if kind == "light":
            models += [CorpusModel(kind, p.stem, p, ()) for p in sorted(kind_dir.glob("*.onnx"))]
        else:
            models += _collect_dirs(kind, kind_dir)
    if node_dir is not None:
        models += _collect_dirs("node", node_dir)
    return models


def _collect_dirs(kind: str, kind_dir: pathlib.Path) -> list[CorpusModel]:
    models = []
    for test_dir in sorted(p for p in kind_dir.iterdir() if (p / "model.onnx").is_file()):
        inputs = sorted((test_dir / "test_data_set_0").glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        models.append(CorpusModel(kind, test_dir.name, test_dir / "model.onnx", tuple(inputs)))
    return models


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(ensure_node_tests(target))
