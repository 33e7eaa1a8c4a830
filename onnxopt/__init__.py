"""onnxopt: an ONNX model-compression optimizer built on onnx_ir, onnxscript and onnxruntime."""

import pathlib as _pathlib

# Run from a source checkout without an install, ``onnxopt.passes`` is the top-level ``passes/``
# folder (an install maps it there through pyproject's wheel.packages table).
_source_root = _pathlib.Path(__file__).resolve().parent.parent
if (_source_root / "passes" / "__init__.py").is_file() and not (_pathlib.Path(__file__).parent / "passes").exists():
    __path__.append(str(_source_root))

from onnxopt.errors import (  # noqa: E402
    DataError,
    ModelLoadError,
    ModelSaveError,
    OnnxoptError,
    PassFailedError,
    PassOptionError,
    RuntimeLibraryError,
)
from onnxopt.io import load, save  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "ModelLoadError",
    "ModelSaveError",
    "OnnxoptError",
    "PassFailedError",
    "PassOptionError",
    "RuntimeLibraryError",
    "load",
    "optimize",
    "save",
]


def optimize(model, passes, **kwargs):
    """Run a pipeline of registered passes on ``model`` (see :func:`onnxopt.pipeline.run_pipeline`)."""
    from onnxopt.pipeline import run_pipeline

    return run_pipeline(model, passes, **kwargs)
