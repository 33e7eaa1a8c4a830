"""Pipelines of registered passes: parsing (CLI specs, recipe files), checked execution, reports.

After each pass the model is checked structurally (onnx checker + shape inference) and, unless
disabled, numerically against the model before the pass with onnxruntime on the user's data (or
synthesized inputs). A lossless pass that changes outputs beyond tolerance fails; ``on_error`` then
either stops (naming the pass and the first diverging value) or rolls the pass back.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import tomllib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import onnx
import onnx_ir as ir

from onnxopt import calibration, io, registry, signature, stats, validate
from onnxopt.errors import OnnxoptError, PassFailedError, PassOptionError
from onnxopt.filters import NodeFilter
from onnxopt.weights import name_layers, scan_weights


@dataclasses.dataclass
class PassSpec:
    """A pass by registered name with its options and an optional node filter."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    node_filter: NodeFilter | None = None

    @classmethod
    def parse(cls, text: str) -> PassSpec:
        """Parse ``name[:key=value,key=value]`` (list values joined with ``+``)."""
        name, _, rest = text.partition(":")
        options = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise PassOptionError(f"bad option '{item}' in '{text}': expected key=value")
            options[key.strip()] = value.strip()
        return cls(name.strip(), options)

    def create(self, data: calibration.Dataset | None = None) -> ir.passes.PassBase:
        return registry.get(self.name).create(self.options, data=data, node_filter=self.node_filter)


def load_recipe(path: str | pathlib.Path) -> list[PassSpec]:
    """Read a YAML or TOML recipe: a list ``passes`` of {name, options, op_types, name_regex, exclude}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PassOptionError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            content = tomllib.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as exc:
        raise PassOptionError(f"cannot parse recipe {path}: {str(exc).splitlines()[0]}") from None
    entries = content.get("passes") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PassOptionError(f"recipe {path} must contain a non-empty list 'passes'")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(PassSpec.parse(entry))
            continue
        if not isinstance(entry, dict) or "name" not in entry:
            raise PassOptionError(f"recipe {path}: each pass needs a 'name' (got {entry!r})")
        unknown = set(entry) - {"name", "options", "op_types", "name_regex", "exclude"}
        if unknown:
            raise PassOptionError(f"recipe {path}: unknown keys {sorted(unknown)} in pass '{entry['name']}'")
        try:
            filt = NodeFilter.from_mapping(entry) if {"op_types", "name_regex", "exclude"} & set(entry) else None
        except PassOptionError as exc:
            raise PassOptionError(f"recipe {path}, pass '{entry['name']}': {exc}") from None
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise PassOptionError(f"recipe {path}, pass '{entry['name']}': 'options' must be a mapping, got {options!r}")
        specs.append(PassSpec(entry["name"], dict(options), filt))
    return specs


@dataclasses.dataclass
class PassRecord:
    name: str
    status: Literal["ok", "rolled back", "failed"]
    seconds: float
    nodes: tuple[int, int]
    parameters: tuple[int, int]
    tensor_bytes: tuple[int, int]
    op_delta: dict[str, int]
    errors: list[validate.OutputError]
    """Outputs after the pass against those before it."""
    message: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    changed: bool = True
    """What the pass said (``PassResult.modified``): False when it found nothing to do, e.g. a filter or
    option that matches no node."""
    input_errors: list[validate.OutputError] = dataclasses.field(default_factory=list)
    """Outputs after the pass against the pipeline's input model's: where the passes so far have taken it
    (a ``recover`` shows here as the error it takes back)."""


@dataclasses.dataclass
class Report:
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {"passes": [dataclasses.asdict(r) for r in self.records], "notes": self.notes}, indent=2, default=str
        )

    def to_markdown(self) -> str:
        lines = [
            "| pass | status | time (s) | nodes | parameters | tensor bytes | max abs err | max rel err | cosine "
            "| max abs err vs input | cosine vs input |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.records:
            lines.append(
                f"| {r.name} | {r.status} | {r.seconds:.2f} | {r.nodes[0]} → {r.nodes[1]} | "
                f"{r.parameters[0]} → {r.parameters[1]} | {stats.human_bytes(r.tensor_bytes[0])} → "
                f"{stats.human_bytes(r.tensor_bytes[1])} | {_error_cells(r.errors, relative=True)} | "
                f"{_error_cells(r.input_errors, relative=False)} |"
            )
        for r in self.records:
            if r.op_delta or r.message or r.details:
                lines.append(f"\n**{r.name}**: {r.message}")
                if r.op_delta:
                    lines.append("op delta: " + ", ".join(f"{k} {v:+d}" for k, v in r.op_delta.items()))
                for key, value in r.details.items():
                    lines.append(f"- {key}: {value}")
        lines += [f"\nnote: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _error_cells(errors: list[validate.OutputError], relative: bool) -> str:
    """The largest max abs (and max rel) error and the lowest cosine over the outputs, as table cells."""
    if not errors:
        return " | ".join(["-"] * (3 if relative else 2))
    cells = [f"{max(e.max_abs for e in errors):.3g}", *([f"{max(e.max_rel for e in errors):.3g}"] if relative else []),
             f"{min(e.cosine for e in errors):.6f}"]
    return " | ".join(cells)


def structural_check(model: ir.Model) -> None:
    """onnx checker and strict shape inference; raises ValueError with the first problem.

    Checks the model's structure (:func:`io.structure_proto`): large weights are not read, so this
    costs little memory and works above 2 GB.
    """
    from onnxopt import ops  # registers the custom ops' and onnxruntime's RMSNorm's schemas with onnx

    ops.register_schemas()
    proto = io.structure_proto(model)
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ValueError(str(exc).strip().splitlines()[0][:300]) from None


def run_pipeline(
    model: ir.Model,
    passes: Sequence[PassSpec | str | ir.passes.PassBase],
    data: calibration.Dataset | None = None,
    *,
    check: bool = True,
    numeric_check: bool = True,
    on_error: Literal["stop", "skip"] = "stop",
    rtol: float = 1e-4,
    atol: float = 1e-5,
    on_record: Callable[[PassRecord], None] | None = None,
) -> tuple[ir.Model, Report]:
    """Run ``passes`` in order on ``model`` (modified in place where passes are in place).

    Returns the final model and a :class:`Report`. Raises :class:`PassFailedError` when a pass breaks
    the model and ``on_error == "stop"``.
    """
    specs = [PassSpec.parse(p) if isinstance(p, str) else p for p in passes]
    instances = [(s.name, s.create(data), registry.get(s.name).lossless) if isinstance(s, PassSpec) else
                 (type(s).__name__, s, False) for s in specs]
    report = Report()
    if check:
        try:
            structural_check(model)
        except ValueError as exc:  # judge passes by what they change, not by what the input already had
            check = False
            report.notes.append(f"structural checks off: the input model already fails them ({exc})")
    sess = _session(model) if numeric_check and data is None else None  # synthesized inputs must run in it
    feeds = validate.feeds_for(model, data, session=sess) if numeric_check else []
    previous_outputs = _outputs(model, feeds, report.notes, data is None, sess) if numeric_check else {}
    input_outputs, input_errors = previous_outputs, []
    # the model before the first other lossy pass: what a `recover` given no reference re-fits toward
    wants_reference = [hasattr(i, "pipeline_original") and not i.reference and i.original is None for _, i, _ in instances]
    reference = None
    for (name, instance, lossless), wants in zip(instances, wants_reference):
        if wants:
            instance.pipeline_original = reference  # None (nothing compressed before it): the pass says so
        elif not lossless and reference is None and any(wants_reference):
            name_layers(scan_weights(model, ("MatMul", "Gemm", "Conv")).uses)  # recover matches layers by name
            reference = io.clone(model)
        before, kept_before = stats.model_stats(model), signature.kept_entries(model)
        snapshot = io.clone(model) if (numeric_check or on_error == "skip") else None
        start = time.perf_counter()
        status, message, errors, changed = "ok", "", [], True
        try:
            result = instance(model)
            model, changed = result.model, result.modified
            if check:
                structural_check(model)
            if numeric_check:
                outputs = _outputs(model, feeds, report.notes)
                kept = signature.kept_entries(model)
                errors = validate.compare_outputs(previous_outputs, outputs, signature.since(kept_before, kept))
                bad = [e for e in errors if not e.within(rtol, atol)]
                if lossless and bad:
                    where = validate.first_divergence(snapshot, model, feeds[0], rtol, atol)
                    raise ValueError(
                        f"output '{bad[0].name}' changed by {bad[0].max_abs:.3g} (rel {bad[0].max_rel:.3g})"
                        + (f"; first diverging value: '{where}'" if where else "")
                    )
                previous_outputs = outputs
                input_errors = validate.compare_outputs(input_outputs, outputs, kept)
        except OnnxoptError:
            raise
        except Exception as exc:  # a broken pass result: roll back or stop
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if on_error == "stop" or snapshot is None:
                raise PassFailedError(name, message) from exc
            model, status = snapshot, "rolled back"
        after = stats.model_stats(model)
        record = PassRecord(
            name,
            status,
            time.perf_counter() - start,
            (before.nodes, after.nodes),
            (before.parameters, after.parameters),
            (before.tensor_bytes, after.tensor_bytes),
            stats.histogram_delta(before.op_histogram, after.op_histogram),
            errors,
            message,
            dict(getattr(instance, "details", {}) or {}),
            changed or status != "ok",
            input_errors,
        )
        report.records.append(record)
        if on_record:
            on_record(record)
    return model, report


def _session(model: ir.Model):
    from onnxopt import runtime

    return runtime.session(model)


def _outputs(model: ir.Model, feeds, notes: list[str] | None = None, synthesized: bool | None = None,
             sess=None) -> dict:
    """The model's outputs on ``feeds`` (run by ``sess``, the model's session, or a new one); what the session
    ran differently (``onnxopt_note``) goes to ``notes``. ``synthesized`` (True or False): the input model,
    which must run on the feeds (else DataError)."""
    sess = _session(model) if sess is None else sess
    note = getattr(sess, "onnxopt_note", None)
    if note and notes is not None and note not in notes:
        notes.append(note)
    if synthesized is not None:
        return validate.reference_outputs(sess, feeds, synthesized)
    return validate.run_all(sess, feeds)
