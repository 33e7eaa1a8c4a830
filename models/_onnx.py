"""Shared helpers for building and saving the reference ONNX models (no torch here).

Every file written by ``models`` goes through :func:`save_model`, which pins the IR
version to 10 (onnxruntime refuses the IR 14 that onnx 1.23 writes by default),
checks the default-domain opset is <= 21, runs the onnx checker and a smoke run
in onnxruntime.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import tape as ir_tape

IR_VERSION = 10
MAX_OPSET = 21
PKG_DIR = Path(__file__).resolve().parent
DATA_DIR = PKG_DIR / "data"
OUT_DIR = PKG_DIR / "out"


class GraphBuilder:
    """Tiny convenience layer over :class:`onnx_ir.tape.Tape`.

    ``b.op("MatMul", x, w)`` returns the output value; numpy arrays passed as inputs
    become (named or auto-named) initializers.
    """

    def __init__(self, opset: int = 17):
        self.opset = opset
        self.tape = ir_tape.Tape()
        self._n_const = 0

    def const(self, array: np.ndarray, name: str | None = None) -> ir.Value:
        if name is None:
            name = f"const_{self._n_const}"
            self._n_const += 1
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)

    def op(self, op_type: str, *inputs, name: str | None = None, **attrs) -> ir.Value:
        vals = [self.const(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in inputs]
        return self.tape.op(op_type, vals, attrs or None, name=name)

    def ops(self, op_type: str, *inputs, num_outputs: int, name: str | None = None, **attrs):
        vals = [self.const(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in inputs]
        return self.tape.op_multi_out(op_type, vals, attrs or None, num_outputs=num_outputs, name=name)

    def build(self, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], graph_name: str,
              producer: str = "onnxopt.models") -> ir.Model:
        graph = ir.Graph(
            inputs=list(inputs),
            outputs=list(outputs),
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": self.opset},
            name=graph_name,
        )
        return ir.Model(graph, ir_version=IR_VERSION, producer_name=producer)


def input_value(name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def name_output(value: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    value.name = name
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(list(shape))
    return value


def finalize_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Pin IR version 10, validate opsets, run shape inference + checker."""
    proto.ir_version = IR_VERSION
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            raise ValueError(f"default-domain opset {imp.version} > {MAX_OPSET}")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_model(model: ir.Model | onnx.ModelProto, path: str | os.PathLike,
               smoke_feed: dict[str, np.ndarray] | None = None) -> Path:
    """Atomically write ``model`` with IR version 10 and check that onnxruntime runs it."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    proto = finalize_proto(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        if smoke_feed is not None:
            import onnxruntime as ort

            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            sess.run(None, smoke_feed)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def session(model, threads: int | None = None):
    """onnxruntime session from a path / ModelProto / ready session (returned as is); onnxopt's
    custom-op library is registered when the model uses it."""
    import onnxruntime as ort

    from onnxopt import runtime

    if isinstance(model, ort.InferenceSession):
        return model
    if callable(model) and not isinstance(model, (str, os.PathLike)):
        return model()
    return runtime.session(model, threads=threads)
