"""Model IO: lazy loading with onnx_ir, normalization, atomic saving that onnxruntime accepts.

* :func:`load` keeps external data memory-mapped (onnx_ir's lazy tensors), checks that every
  external-data file exists, turns ``sparse_initializer`` entries into dense initializers
  (remembered in ``value.meta`` so :func:`save` writes them sparse again), and lifts weights held
  in ``Constant`` nodes to initializers, in every subgraph.
* :func:`save` writes to a temporary file beside the target and renames it into place, so a
  failure never leaves a half-written output; the IR version is capped to what onnxruntime reads.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxopt.errors import ModelLoadError, ModelSaveError

# onnxruntime 1.20+ reads IR 10 (opset <= 22); IR 11 is needed only for opset 23+.
MAX_IR_VERSION = 10
TWO_GB = 2**31
SPARSE_META_KEY = "onnxopt.sparse"
"""``value.meta`` flag: write this initializer as an ONNX ``sparse_initializer`` on save."""


def load(path: str | os.PathLike, *, lift_constants: bool = True) -> ir.Model:
    """Load an ONNX model without reading external data into memory.

    Raises :class:`ModelLoadError` with a one-line reason for any unreadable input.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"expected an .onnx file, got a directory: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"not a valid ONNX protobuf file: {path} ({type(exc).__name__})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"not a valid ONNX model (no graph or IR version): {path}")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"model IR version {proto.ir_version} is newer than this onnx ({onnx.IR_VERSION}) supports: {path}"
        )
    _check_external_files(proto.graph, path.parent)
    sparse_names = _densify_sparse_initializers(proto.graph)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc}") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            if name in sparse_names:
                value.meta[SPARSE_META_KEY] = True
    if lift_constants:
        normalize(model)
    return model


def normalize(model: ir.Model) -> ir.Model:
    """Lift weights held in Constant nodes to initializers (main graph and subgraphs), make initializers
    listed as graph inputs too (IR 3 style, overridable defaults) plain constants, and bypass Identity
    nodes of initializers, in place:
    passes replace weights, and onnxruntime neither folds an initializer that is an input nor runs a
    model whose weight became a required input."""
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    for value in [v for v in model.graph.inputs if v.is_initializer()]:
        model.graph.inputs.remove(value)
    _bypass_constant_identities(model)
    return model


def _bypass_constant_identities(model: ir.Model) -> None:
    """Let the readers of ``Identity(initializer)`` read the initializer: PyTorch's exporter shares equal
    tensors (HF's all-zero biases) through Identity nodes, which hid them from the passes as weights
    and hid that they are shared. An Identity whose output is a graph output stays."""
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        source, alias = node.inputs[0], node.outputs[0]
        if source is None or source.const_value is None or alias.is_graph_output():
            continue
        alias.replace_all_uses_with(source)
        node.graph.remove(node, safe=True)


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    external_threshold: int = TWO_GB,
) -> pathlib.Path:
    """Atomically save ``model``; external data (``<name>.data``) when asked, when the model was loaded
    with external data (unless ``external_data=False``), or when over ``external_threshold``.

    The model object is not modified. Raises :class:`ModelSaveError`; the target is then untouched.
    """
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise ModelSaveError(f"output directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise ModelSaveError(f"output directory is not writable: {directory}")
    if external_data is None:  # like the input, or forced by the 2 GB protobuf limit
        external_data = bool(_external_tensors(model)) or tensor_bytes(model) >= external_threshold
    data_name = path.name + ".data"
    try:
        tmp_dir = tempfile.mkdtemp(prefix=".onnxopt-", dir=directory)
    except OSError as exc:
        raise ModelSaveError(f"cannot write {path}: {exc.strerror or exc}") from None
    ir_version = model.ir_version
    model.ir_version = _output_ir_version(model)
    try:
        with _no_initializer_value_info(model):
            tmp_model = pathlib.Path(tmp_dir) / path.name
            sparse = _sparse_flagged(model)
            # ir.save keeps lazily loaded tensors pointing at the input's data file: a single-file output
            # must read them in, or it would depend on (a file named like) the input's data
            if sparse or (not external_data and _external_tensors(model)):
                proto = ir.to_proto(model)
                _sparsify_initializers(proto.graph, sparse)
                _inline_external(proto, model)
                _omit_default_domains(proto)
                onnx.save(
                    proto,
                    str(tmp_model),
                    save_as_external_data=external_data,
                    location=data_name,
                    size_threshold=1024,
                )
            elif external_data:
                ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
                structure = onnx.load(str(tmp_model), load_external_data=False)  # small: weights are in the data file
                _omit_default_domains(structure)
                onnx.save(structure, tmp_model)
            else:
                proto = ir.to_proto(model)
                _omit_default_domains(proto)
                onnx.save(proto, tmp_model)
        if external_data and (pathlib.Path(tmp_dir) / data_name).exists():
            os.replace(pathlib.Path(tmp_dir) / data_name, directory / data_name)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise ModelSaveError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        model.ir_version = ir_version
        with contextlib.suppress(OSError):
            for leftover in pathlib.Path(tmp_dir).iterdir():
                leftover.unlink()
            os.rmdir(tmp_dir)
    return path


def _omit_default_domains(proto: onnx.ModelProto) -> None:
    """Leave the default domain's name unset in opset imports, as exporters do: onnx_ir writes ``domain: ""``
    explicitly, 2 bytes per import, which made a plain load-save round trip grow the file."""
    for imports in (proto.opset_import, *(function.opset_import for function in proto.functions)):
        for entry in imports:
            if entry.HasField("domain") and not entry.domain:
                entry.ClearField("domain")


@contextlib.contextmanager
def _no_initializer_value_info(model: ir.Model):
    """Hide the type and shape of initializers while saving: onnx_ir writes them as ``value_info`` entries
    that repeat what each tensor already says (a few hundred bytes per model, more with many weights)."""
    hidden = [(value, value.type, value.shape) for graph in model.graphs() for value in graph.initializers.values()
              if value.const_value is not None and not value.is_graph_input() and not value.metadata_props
              and not value.doc_string]
    for value, _, _ in hidden:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def clone(model: ir.Model) -> ir.Model:
    """A copy of ``model`` sharing only its tensors. ``Model.clone()`` also shares the values' type
    objects, which ``Value.dtype = ...`` (onnx_ir's ShapeInferencePass does it) changes in place: a
    pass converting the copy would retype the original."""
    copy = model.clone()
    for graph in copy.graphs():
        for value in (*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)):
            if value.type is not None:
                value.type = copy_module.deepcopy(value.type)
    return copy


def to_bytes(model: ir.Model) -> bytes:
    """Serialize a model under 2 GB (external tensors are read) for onnxruntime or onnx.checker."""
    ir_version = model.ir_version
    model.ir_version = _output_ir_version(model)
    try:
        with _no_initializer_value_info(model):
            proto = ir.to_proto(model)
    finally:
        model.ir_version = ir_version
    _sparsify_initializers(proto.graph, _sparse_flagged(model))
    _inline_external(proto, model)
    _omit_default_domains(proto)
    return proto.SerializeToString()


def structure_proto(model: ir.Model, max_inline_bytes: int = 1 << 16) -> onnx.ModelProto:
    """The model as a proto for onnx's checker and shape inference, without the bulk of its weights.

    Main-graph initializers over ``max_inline_bytes`` become graph inputs of the same type and shape
    (their values do not matter to either check); smaller external ones are read in. Lazily loaded
    weights are not read, so checking a large model costs little memory.
    """
    ir_version = model.ir_version
    model.ir_version = _output_ir_version(model)
    try:
        proto = ir.to_proto(model)  # external tensors stay references here
    finally:
        model.ir_version = ir_version
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    keep = []
    for tensor in graph.initializer:
        value = model.graph.initializers.get(tensor.name)
        if value is None or value.const_value is None or value.const_value.nbytes <= max_inline_bytes:
            keep.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _inline_external(proto, model)  # sparse-flagged weights stay dense: their structure is what is checked
    return proto


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by initializers of all graphs (the bulk of a model's file size)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _max_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", 0)


def _output_ir_version(model: ir.Model) -> int:
    """The IR version to write: one onnxruntime reads (<= 10; 11 for opset 23+), and at least 4.

    IR 3 requires every initializer to be a graph input; passes (onnxscript's ORT fusions) drop
    initializers from the inputs, which IR 4 allows with the same meaning (a constant).
    """
    if _max_opset(model) > 22:
        return 11
    return max(min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION), 4)


def file_size(path: str | os.PathLike) -> int:
    """Bytes a model takes on disk: its file and every external data file its tensors name, whatever
    those files are called (not only onnxopt's ``<name>.data``)."""
    path = pathlib.Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {_location(tensor) for tensor in _all_initializer_protos(proto.graph)} - {None}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations
                                     if (path.parent / name).is_file())


def _location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _check_external_files(graph: onnx.GraphProto, base: pathlib.Path) -> None:
    for tensor in _all_initializer_protos(graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = _location(tensor)
        if location is None or not (base / location).is_file():
            raise ModelLoadError(f"external data file for tensor '{tensor.name}' not found: {base / str(location)}")


def _graph_protos(graph: onnx.GraphProto):
    """``graph`` and its subgraphs (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_protos(g)


def _all_initializer_protos(graph: onnx.GraphProto):
    for g in _graph_protos(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices


def _densify_sparse_initializers(graph: onnx.GraphProto) -> list[str]:
    """onnx_ir drops ``sparse_initializer``: turn them (in every graph) into dense initializers before
    deserializing."""
    names = []
    for g in _graph_protos(graph):
        for sparse in list(g.sparse_initializer):
            dense = _sparse_to_dense(sparse)
            g.initializer.append(dense)
            names.append(dense.name)
        del g.sparse_initializer[:]
    return names


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if indices.ndim == 2:  # coordinate list (NNZ, rank)
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    dense[indices] = values
    return onnx.numpy_helper.from_array(dense.reshape(dims), sparse.values.name)


def _sparse_flagged(model: ir.Model) -> set[str]:
    return {
        name
        for graph in (model.graph, *model.graph.subgraphs())
        for name, v in graph.initializers.items()
        if v.meta.get(SPARSE_META_KEY)
    }


def _sparsify_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    if names:
        for g in _graph_protos(graph):
            _sparsify_graph_initializers(g, names)


def _sparsify_graph_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = []
    for tensor in graph.initializer:
        if tensor.name not in names:
            keep.append(tensor)
            continue
        dense = onnx.numpy_helper.to_array(tensor)
        flat = dense.reshape(-1)
        (nz,) = np.nonzero(flat)
        values = onnx.numpy_helper.from_array(flat[nz], tensor.name)
        indices = onnx.numpy_helper.from_array(nz.astype(np.int64), tensor.name + "__indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, dense.shape))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    kept_info = [v for v in graph.value_info if v.name not in names]  # a sparse tensor is not a dense value
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def _inline_external(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Replace external-data references in ``proto`` by raw data read through the IR's lazy tensors."""
    tensors = _external_tensors(model)
    if not tensors:
        return
    for tensor in _all_initializer_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name in tensors:
            tensor.raw_data = tensors[tensor.name].tobytes()
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def _external_tensors(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    """Initializers (all graphs) still backed by an external-data file."""
    return {
        name: value.const_value
        for graph in (model.graph, *model.graph.subgraphs())
        for name, value in graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


PROVENANCE_TAGS = ("pkg.onnxscript.optimizer.folded_from", "pkg.onnxscript.rewriter.rule_name")
"""``metadata_props`` keys onnxscript's constant folder and rewriter write on what they create: the names
of the folded inputs and the rule applied, tens of bytes per value or node in the saved file."""


@contextlib.contextmanager
def no_new_annotations(model: ir.Model):
    """Drop what a pass annotated on its way and the model does not need: shapes and types inferred
    for intermediate values, graph outputs' declarations as the model had them (a pass that changes an
    output's dtype keeps its own), and onnxscript's provenance tags (:data:`PROVENANCE_TAGS`).

    Shape inference annotates every intermediate value; written out as ``value_info`` these make
    the file bigger although the model is the same, and onnxruntime infers them again at load. Tags
    the model carried before the pass stay. The values and nodes themselves are held (not their
    ``id()``, which an object created meanwhile could reuse).
    """
    bare = {v for node in ir.traversal.RecursiveGraphIterator(model.graph) for v in node.outputs
            if v.type is None and v.shape is None}
    tagged = {item for item in _annotated(model) if any(tag in item.metadata_props for tag in PROVENANCE_TAGS)}
    declared = [(value.type, value.shape) for value in model.graph.outputs]
    yield
    graph_outputs = set(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value in bare and value not in graph_outputs and not value.is_graph_output():
                value.type, value.shape = None, None
    for value, (type_, shape) in zip(model.graph.outputs, declared):
        if type_ is None or value.type == type_:  # inferred shapes (``unk__0`` for ``?``) would only add bytes
            value.type, value.shape = type_, shape
    for item in _annotated(model):
        if item not in tagged:
            for tag in PROVENANCE_TAGS:
                item.metadata_props.pop(tag, None)


def _annotated(model: ir.Model):
    """Every node, node output and initializer of all graphs."""
    for graph in model.graphs():
        yield from graph.initializers.values()
        for node in graph:
            yield node
            yield from node.outputs
