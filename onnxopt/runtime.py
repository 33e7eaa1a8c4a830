"""onnxruntime sessions for onnxopt models: registers onnxopt's custom-op library when needed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import tempfile
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt import io, signature
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
    options.log_severity_level = 4  # errors reach the caller as exceptions: no second copy on stderr
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


def run(sess: ort.InferenceSession, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``sess.run``, also where numpy cannot cross onnxruntime's Python API by itself: inputs of ml_dtypes
    types (bfloat16, float8) go in by their bit pattern, and such outputs come back as ml_dtypes arrays."""
    return runner(sess, names, feed)()


def runner(sess: ort.InferenceSession, names: list[str] | None, feed: dict[str, np.ndarray]) -> Callable[[], list[np.ndarray]]:
    """:func:`run` as a call without arguments, its way chosen once (for timing loops). Float arrays are
    cast to the float type the session's input has (a model whose inputs became float16 or bfloat16 is
    checked with the float32 data of the original), and inputs a pass cut down are cut alike (a KV cache
    that lost heads: :mod:`onnxopt.signature`)."""
    feed = signature.fit(feed, _kept_entries(sess))
    feed = {**feed, **_float_casts(sess, feed)}
    outputs = [o for o in sess.get_outputs() if names is None or o.name in names]
    plain = not any(isinstance(a, np.ndarray) and a.dtype.type.__module__ == "ml_dtypes" for a in feed.values())
    if plain and all(o.type not in _NUMPYLESS for o in outputs):  # also sequence and map inputs and outputs
        return lambda: sess.run(names, feed)
    values = {k: _ort_value(a) for k, a in feed.items()}
    wanted = names or [o.name for o in outputs]
    return lambda: [_array(v) for v in sess.run_with_ort_values(wanted, values)]


def _kept_entries(sess: ort.InferenceSession) -> dict[str, signature.Kept]:
    if not hasattr(sess, "onnxopt_kept"):
        sess.onnxopt_kept = signature.kept_entries(sess)
    return sess.onnxopt_kept


_ELEMENT_TYPES = {f"tensor({name.lower()})": number for name, number in onnx.TensorProto.DataType.items() if number}
_NUMPYLESS = {f"tensor({t})" for t in ("bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz", "float8e8m0",
                                       "int4", "uint4", "int2", "uint2", "float4e2m1")}


_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": ml_dtypes.bfloat16}


def _float_casts(sess: ort.InferenceSession, feed: dict) -> dict[str, np.ndarray]:
    casts = {}
    for model_input in sess.get_inputs():
        array, wanted = feed.get(model_input.name), _FLOAT_INPUTS.get(model_input.type)
        if wanted is None or not isinstance(array, np.ndarray) or array.dtype == wanted:
            continue
        if array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16:
            casts[model_input.name] = array.astype(wanted)
    return casts


def _ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype.type.__module__ != "ml_dtypes":
        return ort.OrtValue.ortvalue_from_numpy(array)
    element_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    if np.dtype(array.dtype).itemsize == 1 and "int" in array.dtype.name:  # int4/int2: onnxruntime wants packed bits
        raise ValueError(f"onnxruntime's Python API cannot take a {array.dtype} input")
    bits = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")  # the bytes are read as laid out, strides ignored
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, element_type)


def _array(value: ort.OrtValue) -> np.ndarray:
    if value.data_type() not in _NUMPYLESS:
        return value.numpy()
    tensor = onnx.TensorProto(dims=value.shape(), data_type=_ELEMENT_TYPES[value.data_type()])
    tensor.raw_data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return onnx.numpy_helper.to_array(tensor)  # onnx reads every type it defines, packed sub-byte ones included


BFLOAT16_NOTE = ("onnxruntime has no bfloat16 kernel here for some ops: they ran in float32 on bfloat16-rounded "
                 "inputs and outputs (what a GPU's bfloat16 kernel computes); their latency is not the target's")
"""Set as ``onnxopt_note`` on a session that runs a model's bfloat16 ops so (see :func:`emulate_bfloat16`)."""

_KEEP_TYPED = {"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike"}  # the type is their attribute's


def emulate_bfloat16(model: str | os.PathLike | ir.Model | onnx.ModelProto | bytes) -> ir.Model | None:
    """A copy of ``model`` where each op reading or writing bfloat16 tensors reads float32 casts of them and
    writes float32 results cast to bfloat16: onnxruntime's CPU provider can check a model meant for a GPU's
    bfloat16 kernels (which accumulate in float32 too). None when no op computes in bfloat16."""
    if isinstance(model, ir.Model):
        copy = io.clone(model)
    elif isinstance(model, (onnx.ModelProto, bytes)):
        copy = ir.from_proto(model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model))
    else:
        copy = io.load(model)
    try:
        ShapeInferencePass()(copy)  # a Constant's or an untyped value's bfloat16 shows only after inference
    except Exception:  # noqa: BLE001 - emulate with the types the model states
        pass
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
                    name = value.name
                    ir.convenience.replace_all_uses_with(value, cast.outputs[0], replace_graph_outputs=True)
                    cast.replace_input_with(0, value)  # replace_all_uses_with moved the cast's own input too
                    value.name = None
                    value.type = ir.TensorType(ir.DataType.FLOAT)
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
