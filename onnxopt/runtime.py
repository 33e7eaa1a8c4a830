"""onnxruntime sessions for onnxopt models: registers onnxopt's custom-op library when needed."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import io
from onnxopt.errors import ModelLoadError, RuntimeLibraryError
from onnxopt.weights import name_uniquely

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
    with contextlib.ExitStack() as stack:
        if isinstance(model, ir.Model):
            domains = set(model.opset_imports)
            source = stack.enter_context(_serialized(model))
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
        providers = providers or ["CPUExecutionProvider"]
        try:
            return ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:
            emulated = emulate_bfloat16(model) if type(exc).__name__ == "NotImplemented" else None
            if emulated is None:
                raise
        with _serialized(emulated) as source:
            sess = ort.InferenceSession(source, sess_options=options, providers=providers)
        sess.onnxopt_note = BFLOAT16_NOTE
        return sess


@contextlib.contextmanager
def _serialized(model: ir.Model):
    """``model`` as bytes, or as a temporary external-data file when it is too large for one protobuf."""
    if io.tensor_bytes(model) < _SERIALIZE_LIMIT:
        yield io.to_bytes(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as folder:
        yield str(io.save(model, pathlib.Path(folder) / "model.onnx", external_data=True))


BFLOAT16_NOTE = ("onnxruntime has no bfloat16 kernel here for some ops: they ran in float32 on bfloat16-rounded "
                 "inputs and outputs (what a GPU's bfloat16 kernel computes); their latency is not the target's")
"""Set as ``onnxopt_note`` on a session that runs a model's bfloat16 ops so (see :func:`emulate_bfloat16`)."""

_KEEP_TYPED = {"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike"}  # the type is their attribute's


def emulate_bfloat16(model: str | os.PathLike | ir.Model | onnx.ModelProto | bytes) -> ir.Model | None:
    """A copy of ``model`` where each op reading or writing bfloat16 tensors reads float32 casts of them and
    writes float32 results cast to bfloat16: onnxruntime's CPU provider can check a model meant for a GPU's
    bfloat16 kernels (which accumulate in float32 too). None when no op computes in bfloat16."""
    if isinstance(model, ir.Model):
        copy = model.clone()
    elif isinstance(model, (onnx.ModelProto, bytes)):
        copy = ir.from_proto(model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model))
    else:
        copy = io.load(model)
    changed = False
    for graph in copy.graphs():
        for node in list(graph):
            if node.op_type in _KEEP_TYPED or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                continue
            for index, value in enumerate(node.inputs):
                if _is_bfloat16(value):
                    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT})
                    cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                    graph.insert_before(node, cast)
                    node.replace_input_with(index, cast.outputs[0])
                    changed = True
            for value in node.outputs:
                if _is_bfloat16(value):
                    cast = ir.node("Cast", [value], {"to": ir.DataType.BFLOAT16})
                    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.BFLOAT16), value.shape
                    graph.insert_after(node, cast)
                    ir.convenience.replace_all_uses_with(value, cast.outputs[0])
                    cast.replace_input_with(0, value)  # replace_all_uses_with moved the cast's own input too
                    for i, output in enumerate(graph.outputs):
                        if output is value:
                            graph.outputs[i] = cast.outputs[0]
                    name, value.name = value.name, None
                    value.type = ir.TensorType(ir.DataType.FLOAT)  # a new type object: the clone shares the old one
                    cast.outputs[0].name = name
                    changed = True
    if not changed:
        return None
    name_uniquely(copy)  # names the new float32 values
    return copy


def _is_bfloat16(value: ir.Value | None) -> bool:
    return value is not None and isinstance(value.type, ir.TensorType) and value.dtype == ir.DataType.BFLOAT16


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
