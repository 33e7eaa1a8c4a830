"""The ``onnxopt`` command line: optimize, inspect, validate, passes.

Exit codes: 0 ok, 1 validation threshold exceeded, 2 bad input or usage. Errors print one line;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import pathlib
import shutil
import sys
import tempfile

import click
from onnxopt import calibration, io, pipeline, registry, runtime, signature, stats, validate
from onnxopt.errors import OnnxoptError

EXIT_THRESHOLD, EXIT_USAGE = 1, 2
LARGE_MODEL_BYTES = 256 * 2**20


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def handle_errors(func):
    """One-line message and exit code 2 for bad input; the traceback only with --debug."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except OnnxoptError as exc:
            if debug:
                raise
            _fail(str(exc))
        except Exception as exc:
            # onnxruntime's errors (Fail, InvalidGraph, ...) derive from Exception only
            expected = isinstance(exc, (OSError, ValueError, RuntimeError)) or validate.from_onnxruntime(exc)
            if debug or not expected:
                raise
            _fail(f"{type(exc).__name__}: {_first_line(exc)}")

    return wrapper


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """onnxopt: compress and optimize ONNX models for onnxruntime."""


def _existing_file(path: str, what: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.exists():
        raise OnnxoptError(f"{what} not found: {p}")
    return p


def _require_writable_dir(path: pathlib.Path, what: str) -> None:
    """Fail before any work when ``path`` could not be written at the end."""
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if path.is_dir():
        raise OnnxoptError(f"{what} path is a directory: {path}")
    if not parent.is_dir():
        raise OnnxoptError(f"{what} directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OnnxoptError(f"{what} directory is not writable: {parent}")


def _load_data(path: str | None) -> calibration.Dataset | None:
    return calibration.Dataset.load(path) if path else None


@main.command()
@click.argument("model_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output .onnx path (written atomically).")
@click.option("-p", "--pass", "pass_specs", multiple=True, help="PASS[:key=value,...]; repeatable, run in order.")
@click.option("--recipe", help="YAML or TOML recipe file (run before any -p passes).")
@click.option("--data", help=".npz file (one array per input, batch on axis 0) or a directory of them.")
@click.option("--report", help="Write the per-pass report to FILE.json or FILE.md; FILE without extension writes both.")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="When a pass breaks the model: stop, or roll the pass back and go on.")
@click.option("--check/--no-check", default=True, show_default=True, help="onnx checker + shape inference after each pass.")
@click.option("--numeric-check/--no-numeric-check", default=True, show_default=True,
              help="Compare outputs with onnxruntime after each pass.")
@click.option("--external-data/--no-external-data", default=None, help="Force (or forbid) external data; default: as the input, or over 2 GB.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="intra-op threads for the latency measurement.")
@handle_errors
def optimize(model_path, output, pass_specs, recipe, data, report, on_error, check, numeric_check, external_data, threads):
    """Run a pipeline of passes on IN and write OUT; prints a before/after table."""
    src = _existing_file(model_path, "model file")
    out = pathlib.Path(output)
    if out.exists() and out.resolve() == src.resolve():
        raise OnnxoptError("output path is the input file; onnxopt never overwrites its input")
    specs = (pipeline.load_recipe(recipe) if recipe else []) + [pipeline.PassSpec.parse(s) for s in pass_specs]
    if not specs:
        raise OnnxoptError("no passes given: use -p PASS or --recipe FILE (see `onnxopt passes`)")
    dataset = _load_data(data)
    for spec in specs:  # unknown passes and bad options fail here, before any work
        spec.create(dataset)
    _require_writable_dir(out, "output")
    if report:
        if pathlib.Path(report).suffix not in ("", *REPORT_FORMATS):
            raise OnnxoptError(f"--report {report}: name a .json or .md file, or give no extension for both")
        _require_writable_dir(pathlib.Path(report), "report")
    model = io.load(src)
    if dataset is not None:
        dataset.check(model)
    before = stats.model_stats(model)
    sess = runtime.session(src)
    feeds = validate.feeds_for(model, dataset, max_batches=1, batch=1, session=sess)
    reference = validate.reference_outputs(sess, feeds, dataset is None, f"IN ({src.name})")

    def progress(record: pipeline.PassRecord) -> None:
        cosine = f"  cosine vs IN {min(e.cosine for e in record.input_errors):.6f}" if record.input_errors else ""
        unchanged = "" if record.changed else "  (no change)"
        click.echo(f"  {record.name:<18} {record.status:<11} {record.seconds:6.2f}s  nodes {record.nodes[0]} → {record.nodes[1]}"
                   f"{cosine}{unchanged}", err=True)

    model, rep = pipeline.run_pipeline(
        model, specs, dataset, check=check, numeric_check=numeric_check, on_error=on_error, on_record=progress
    )
    after = stats.model_stats(model)
    with _staging_dir(out) as staging:
        staged = io.save(model, staging / out.name, external_data=external_data)
        del model  # the sessions below hold their own copies of the weights: unmap ours first
        gc.collect()
        try:
            errors, lat, notes = _measure_output(src, staged, reference, feeds, threads, one_at_a_time=before.tensor_bytes > LARGE_MODEL_BYTES)
        except Exception as exc:
            if not (validate.from_onnxruntime(exc) or isinstance(exc, RuntimeError)):
                raise
            raise OnnxoptError(f"the optimized model fails in onnxruntime, {out} not written: {_first_line(exc)}") from exc
        size_in, size_out = io.file_size(src), io.file_size(staged)
        _publish(staged, out)
    if report:  # only for a written model: a failed run leaves no file behind
        _write_report(rep, pathlib.Path(report))
    worst = max(errors, key=lambda e: e.max_abs, default=None)
    click.echo(f"\n{'':<22}{'before':>14}{'after':>14}{'ratio':>9}")
    click.echo(f"{'file size':<22}{stats.human_bytes(size_in):>14}{stats.human_bytes(size_out):>14}{size_out / size_in:>9.3f}")
    click.echo(f"{'nodes':<22}{before.nodes:>14}{after.nodes:>14}{after.nodes / max(before.nodes, 1):>9.3f}")
    click.echo(f"{'parameters':<22}{before.parameters:>14}{after.parameters:>14}{after.parameters / max(before.parameters, 1):>9.3f}")
    click.echo(f"{'latency (ms, median)':<22}{lat[0]:>14.3f}{lat[1]:>14.3f}{lat[1] / lat[0]:>9.3f}")
    if worst is not None:
        click.echo(f"{'output max abs error':<22}{'':>14}{worst.max_abs:>14.3g}")
        click.echo(f"{'output cosine':<22}{'':>14}{min(e.cosine for e in errors):>14.6f}")
        source = "the first sample of --data" if dataset is not None else "synthesized inputs"
        click.echo(f"(output error against IN on {source}; --report gives each pass's error against the model before it and against IN)")
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {out}")


def _measure_output(src, out, reference, feeds, threads, one_at_a_time: bool):
    """Output errors of OUT, the latency of both models (interleaved, or one session at a time for large
    models so that peak memory holds a single copy of the weights) and the sessions' notes."""
    if one_at_a_time:
        lat, notes = [], []
        for path in (src, out):
            sess = runtime.session(path, threads=threads)
            lat.append(validate.latency_ms(sess, feeds[0], warmup=1, repeat=5))
            notes += _session_notes(sess)
            if path is out:
                errors = validate.compare_outputs(reference, validate.run_all(sess, feeds), signature.kept_entries(sess))
            del sess
        return errors, lat, notes
    sessions = [runtime.session(src, threads=threads), runtime.session(out, threads=threads)]
    errors = validate.compare_outputs(reference, validate.run_all(sessions[1], feeds), signature.kept_entries(sessions[1]))
    single = validate.latency_ms(sessions[0], feeds[0], warmup=2, repeat=5) / 1e3
    repeat = int(min(1000, max(10, 0.05 / max(single, 1e-6))))  # rounds of ~50 ms: sub-ms models need many runs
    return errors, validate.interleaved_latency_ms(sessions, feeds, rounds=5, repeat=repeat), _session_notes(*sessions)


def _session_notes(*sessions) -> list[str]:
    """What a session ran differently from the model as written (:data:`runtime.BFLOAT16_NOTE`)."""
    return list(dict.fromkeys(note for sess in sessions if (note := getattr(sess, "onnxopt_note", None))))


@contextlib.contextmanager
def _staging_dir(out: pathlib.Path):
    """A scratch directory beside ``out`` (same file system, so publishing is a rename), removed on exit."""
    try:
        staging = tempfile.mkdtemp(prefix=".onnxopt-", dir=out.parent)
    except OSError as exc:
        raise OnnxoptError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        yield pathlib.Path(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staged: pathlib.Path, out: pathlib.Path) -> None:
    """Move a checked model (and its external data) from the staging directory to ``out``; the data file of
    an earlier external-data ``out`` goes when the new one has none."""
    data, out_data = staged.with_name(staged.name + ".data"), out.with_name(out.name + ".data")
    if data.exists():
        os.replace(data, out_data)
    elif out_data.exists():
        out_data.unlink()
    os.replace(staged, out)


REPORT_FORMATS = {".json": pipeline.Report.to_json, ".md": pipeline.Report.to_markdown}


def _write_report(rep: pipeline.Report, path: pathlib.Path) -> None:
    """FILE.json or FILE.md by extension; both beside each other for a FILE without one."""
    for suffix, render in REPORT_FORMATS.items():
        if path.suffix in ("", suffix):
            path.with_suffix(suffix).write_text(render(rep))


@main.command()
@click.argument("model_path", metavar="IN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--kernels", is_flag=True, help="Also show onnxopt's kernel library and its ISA level.")
@handle_errors
def inspect(model_path, as_json, kernels):
    """Opsets, IR version, inputs/outputs, op histogram, parameters and bytes by op and dtype."""
    src = _existing_file(model_path, "model file")
    model = io.load(src, lift_constants=False)
    st = stats.model_stats(model)
    info = {
        "file": str(src),
        "file_bytes": io.file_size(src),
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "custom_domains": sorted(d for d in model.opset_imports if d not in ("", "ai.onnx", "ai.onnx.ml")),
        "inputs": [_value_info(v) for v in model.graph.inputs],
        "outputs": [_value_info(v) for v in model.graph.outputs],
        "nodes": st.nodes,
        "parameters": st.parameters,
        "tensor_bytes": st.tensor_bytes,
        "external_tensors": st.external_tensors,
        "op_histogram": st.op_histogram,
        "bytes_by_dtype": st.bytes_by_dtype,
        "bytes_by_op": st.bytes_by_op,
    }
    if kernels:
        info["kernels"] = _kernel_info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}: {stats.human_bytes(info['file_bytes'])}, IR {info['ir_version']}, opsets {info['opsets']}")
    if info["custom_domains"]:
        click.echo(f"custom domains: {', '.join(info['custom_domains'])}")
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for v in info[kind]:
            click.echo(f"  {v['name']}: {v['dtype']} {v['shape']}")
    click.echo(f"nodes {st.nodes}, parameters {st.parameters}, tensor bytes {stats.human_bytes(st.tensor_bytes)}"
               f" ({st.external_tensors} external)")
    click.echo("ops: " + ", ".join(f"{k} {v}" for k, v in st.op_histogram.items()))
    click.echo("bytes by dtype: " + ", ".join(f"{k} {stats.human_bytes(v)}" for k, v in st.bytes_by_dtype.items()))
    click.echo("bytes by consumer op: " + ", ".join(f"{k} {stats.human_bytes(v)}" for k, v in st.bytes_by_op.items()))
    if kernels:
        click.echo(f"kernels: {info['kernels']}")


def _kernel_info() -> dict:
    try:
        from onnxopt import kernels as k

        return {"library": str(k.library_path()), "isa": k.isa_level()}
    except Exception as exc:  # report, do not fail inspect
        return {"library": None, "error": str(exc).splitlines()[0]}


def _value_info(value) -> dict:
    shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
    return {"name": value.name, "dtype": str(value.dtype).split(".")[-1] if value.dtype else None, "shape": shape}


@main.command(name="validate")
@click.argument("reference_path", metavar="REF")
@click.argument("candidate_path", metavar="CANDIDATE")
@click.option("--data", help=".npz inputs (default: synthesized from REF's inputs).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="intra-op threads for both sessions.")
@click.option("--repeat", type=int, default=20, show_default=True, help="Timed runs per model.")
@click.option("--max-abs", type=float, default=None, help="Exit 1 if any output's max abs error exceeds this.")
@click.option("--max-rel", type=float, default=None, help="Exit 1 if any output's max relative error exceeds this.")
@click.option("--min-cosine", type=float, default=None, help="Exit 1 if any output's cosine similarity is below this.")
@handle_errors
def validate_cmd(reference_path, candidate_path, data, threads, repeat, max_abs, max_rel, min_cosine):
    """Run REF and CANDIDATE in onnxruntime: per-output errors, latency, file sizes."""
    ref_path = _existing_file(reference_path, "reference model")
    cand_path = _existing_file(candidate_path, "candidate model")
    ref_model = io.load(ref_path, lift_constants=False)
    io.load(cand_path, lift_constants=False)  # a file that is no model: a typed error, not onnxruntime's traceback
    dataset = _load_data(data)
    ref_sess, cand_sess = runtime.session(ref_path, threads=threads), runtime.session(cand_path, threads=threads)
    feeds = validate.feeds_for(ref_model, dataset, session=ref_sess)
    reference = validate.reference_outputs(ref_sess, feeds, dataset is None, f"REF ({ref_path.name})")
    errors = validate.compare_outputs(reference, validate.run_all(cand_sess, feeds), signature.kept_entries(cand_sess))
    rounds = max(1, repeat // 5)
    lat = validate.interleaved_latency_ms([ref_sess, cand_sess], feeds, rounds=rounds, repeat=5)
    click.echo(f"{'output':<28}{'max abs':>12}{'max rel':>12}{'mean abs':>12}{'cosine':>12}")
    for e in errors:
        click.echo(f"{e.name[:27]:<28}{e.max_abs:>12.4g}{e.max_rel:>12.4g}{e.mean_abs:>12.4g}{e.cosine:>12.6f}")
    click.echo(f"latency ms (median, threads={threads or 'default'}): reference {lat[0]:.3f}, candidate {lat[1]:.3f}, "
               f"ratio {lat[1] / lat[0]:.3f}")
    click.echo(f"file size: reference {stats.human_bytes(io.file_size(ref_path))}, candidate {stats.human_bytes(io.file_size(cand_path))}")
    failed = [e.name for e in errors if (max_abs is not None and e.max_abs > max_abs)
              or (max_rel is not None and e.max_rel > max_rel) or (min_cosine is not None and e.cosine < min_cosine)]
    for note in _session_notes(ref_sess, cand_sess):
        click.echo(f"note: {note}", err=True)
    if failed:
        click.echo(f"threshold exceeded on: {', '.join(failed)}", err=True)
        sys.exit(EXIT_THRESHOLD)


@main.command(name="passes")
def list_passes():
    """Every registered pass with its options."""
    for info in registry.all_passes():
        kind = "lossless" if info.lossless else "lossy"
        data = ", uses --data" if info.uses_data else ""
        click.echo(f"{info.name}  ({kind}{data})\n    {info.summary}")
        for opt in info.options.values():
            click.echo(f"    {opt.name} ({opt.type_name}, default {opt.default!r}): {opt.doc}")
        click.echo("")


if __name__ == "__main__":
    main()
