"""onnxruntime sessions for onnxopt models: registers onnxopt's custom-op library when needed."""

from __future__ import annotations

import os
import pathlib
import tempfile

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import io
from onnxopt.errors import ModelLoadError, RuntimeLibraryError

ONNXOPT_DOMAIN = "ai.onnxopt"
_SERIALIZE_LIMIT = 1_800_000_000


def session(
    model: str | os.PathLike | ir.Model | onnx.ModelProto | bytes,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimize: bool = True,
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for a path, onnx_ir model, ModelProto or serialized bytes.

    Args:
        model: The model.
        providers: Execution providers (default: CPU).
        threads: ``intra_op_num_threads`` (default: onnxruntime's choice).
        optimize: Apply onnxruntime's graph optimizations (off to inspect values as written).
        session_options: Start from these options instead of fresh ones.
    """
    options = session_options or ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    keep_alive = None
    if isinstance(model, ir.Model):
        domains = set(model.opset_imports)
        if io.tensor_bytes(model) < _SERIALIZE_LIMIT:
            source = io.to_bytes(model)
        else:
            keep_alive = tempfile.TemporaryDirectory(prefix="onnxopt-session-")
            source = str(io.save(model, pathlib.Path(keep_alive.name) / "model.onnx", external_data=True))
    elif isinstance(model, onnx.ModelProto):
        domains = {o.domain for o in model.opset_import}
        source = model.SerializeToString()
    elif isinstance(model, bytes):
        domains = {o.domain for o in onnx.load_from_string(model).opset_import}
        source = model
    else:
        path = pathlib.Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        domains = {o.domain for o in onnx.load(str(path), load_external_data=False).opset_import}
        source = str(path)
    if ONNXOPT_DOMAIN in domains:
        options.register_custom_ops_library(str(kernel_library()))
    try:
        sess = ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    finally:
        if keep_alive is not None:
            keep_alive.cleanup()
    return sess


def kernel_library() -> pathlib.Path:
    """Path of onnxopt's custom-op library; RuntimeLibraryError if it was not built."""
    try:
        from onnxopt.kernels import library_path
    except ImportError:
        raise RuntimeLibraryError("onnxopt's custom-op library is not part of this build") from None
    try:
        return library_path()
    except FileNotFoundError as exc:
        raise RuntimeLibraryError(str(exc)) from None
