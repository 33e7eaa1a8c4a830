"""Wall time and peak RSS of ``cleanup`` + ``fuse`` on a ~1 GB external-data model, against onnxsim
and onnxoptimizer on the same file.

    python bench/pipeline.py [--layers 64] [--hidden 2048] [--workdir DIR] [--keep]

The model: ``layers`` blocks of MatMul (hidden x hidden float32 weights) + Add + Relu, every 4th block
followed by a primitive LayerNorm chain (ReduceMean/Sub/Pow/Sqrt/Div, fused by ``fuse``); every 8th
block reuses the bytes of the block before under a new name (duplicate initializers for ``cleanup``),
and each block's bias goes through a foldable Constant subgraph (bias * 1.0 + 0). Weights are written
straight into the external-data file, so building needs little memory.

Each tool runs in its own child process; peak RSS is that child's ``ru_maxrss`` (``os.wait4``).
Goal for onnxopt: peak RSS < 1.5x the model's bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_model(path: pathlib.Path, layers: int, hidden: int, seed: int = 0) -> int:
    """Write the synthetic model and its ``.data`` file; returns the total bytes of both."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    initializers, nodes = [], []
    offset = 0
    scale = np.float32(1.0 / np.sqrt(hidden))
    with open(path.parent / data_name, "wb") as data:

        def external(name: str, array: np.ndarray) -> None:
            nonlocal offset
            raw = np.ascontiguousarray(array).tobytes()
            data.write(raw)
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            offset += len(raw)

        previous_weight = None
        x = "x"
        for i in range(layers):
            if i % 8 == 7 and previous_weight is not None:
                weight = previous_weight  # same bytes, new name: a duplicate initializer
            else:
                weight = (rng.random((hidden, hidden), dtype=np.float32) - 0.5) * 2 * scale
            previous_weight = weight
            external(f"w{i}", weight)
            initializers.append(numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.01, f"b{i}"))
            nodes += [
                helper.make_node("Constant", [], [f"one{i}"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
                helper.make_node("Constant", [], [f"zero{i}"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
                helper.make_node("Mul", [f"b{i}", f"one{i}"], [f"bs{i}"]),  # foldable
                helper.make_node("Add", [f"bs{i}", f"zero{i}"], [f"bias{i}"]),  # foldable
                helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]),
                helper.make_node("Add", [f"mm{i}", f"bias{i}"], [f"add{i}"]),
                helper.make_node("Relu", [f"add{i}"], [f"h{i}"]),
            ]
            x = f"h{i}"
            if i % 4 == 3:
                nodes += _layer_norm(i, x, hidden, initializers)
                x = f"ln{i}"
    graph = helper.make_graph(
        nodes,
        "bench_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path.stat().st_size + offset


def _layer_norm(i: int, x: str, hidden: int, initializers: list) -> list:
    """Primitive LayerNorm over the last axis, as exporters write it."""
    initializers += [
        numpy_helper.from_array(np.array([-1], np.int64), f"ln_axes{i}"),
        numpy_helper.from_array(np.array(2.0, np.float32), f"ln_two{i}"),
        numpy_helper.from_array(np.array(1e-5, np.float32), f"ln_eps{i}"),
        numpy_helper.from_array(np.ones(hidden, np.float32), f"ln_gamma{i}"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), f"ln_beta{i}"),
    ]
    p = f"ln{i}_"
    return [
        helper.make_node("ReduceMean", [x], [p + "mean"], axes=[-1]),
        helper.make_node("Sub", [x, p + "mean"], [p + "d"]),
        helper.make_node("Pow", [p + "d", f"ln_two{i}"], [p + "sq"]),
        helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1]),
        helper.make_node("Add", [p + "var", f"ln_eps{i}"], [p + "ve"]),
        helper.make_node("Sqrt", [p + "ve"], [p + "std"]),
        helper.make_node("Div", [p + "d", p + "std"], [p + "n"]),
        helper.make_node("Mul", [p + "n", f"ln_gamma{i}"], [p + "g"]),
        helper.make_node("Add", [p + "g", f"ln_beta{i}"], [f"ln{i}"]),
    ]


@dataclasses.dataclass
class Result:
    tool: str
    seconds: float
    peak_rss: int
    output_bytes: int | None
    status: str
    log: list[str]


def measure(tool: str, argv: list[str], output: pathlib.Path, timeout: float) -> Result:
    """Run ``argv`` as a child; its own peak RSS comes from ``os.wait4``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=output.parent)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    log = child.stdout.read().decode(errors="replace").strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    if time.perf_counter() > deadline:
        state = f"timeout after {timeout:.0f}s"
    elif code != 0:
        state = f"exit {code}: " + (log[-1][:120] if log else "")
    else:
        state = "ok"
    size = _model_bytes(output) if output.exists() and code == 0 else None
    return Result(tool, seconds, usage.ru_maxrss * 1024, size, state, log)


def _model_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def _run_api(src: str, dst: str) -> None:
    """Child: onnxopt's API with the structural check (the CLI adds before/after ORT sessions)."""
    from onnxopt import io, pipeline

    model, report = pipeline.run_pipeline(io.load(src), ["cleanup", "fuse"], numeric_check=False)
    io.save(model, dst, external_data=True)
    for record in report.records:
        print(record.name, record.status, f"{record.seconds:.1f}s", record.nodes, record.tensor_bytes, record.details)


def _run_onnxoptimizer(src: str, dst: str) -> None:
    import onnxoptimizer

    model = onnxoptimizer.optimize(onnx.load(src))
    onnx.save(model, dst, save_as_external_data=True, location=pathlib.Path(dst).name + ".data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="Keep the model files.")
    parser.add_argument("--tools", default="onnxopt-api,onnxopt-cli,onnxsim,onnxoptimizer")
    args = parser.parse_args()
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="onnxopt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "model.onnx"
    start = time.perf_counter()
    model_bytes = build_model(src, args.layers, args.hidden)
    print(f"built {src}: {model_bytes / 2**30:.2f} GiB in {time.perf_counter() - start:.1f}s", flush=True)

    commands = {
        "onnxopt-api": [sys.executable, __file__, "--child-api"],
        "onnxopt-cli": [sys.executable, "-m", "onnxopt", "optimize", "SRC", "-o", "DST", "-p", "cleanup", "-p", "fuse",
                        "--no-numeric-check"],
        "onnxsim": [shutil.which("onnxsim") or "onnxsim", "SRC", "DST", "--save-as-external-data"],
        "onnxoptimizer": [sys.executable, __file__, "--child-onnxoptimizer"],
    }
    results = []
    for tool in args.tools.split(","):
        out_dir = workdir / tool
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        dst = out_dir / "out.onnx"
        argv = [str(src) if a == "SRC" else str(dst) if a == "DST" else a for a in commands[tool]]
        if tool in ("onnxopt-api", "onnxoptimizer"):
            argv += [str(src), str(dst)]
        result = measure(tool, argv, dst, args.timeout)
        results.append(result)
        print(f"{tool}: {result.status}, {result.seconds:.1f}s, peak RSS {result.peak_rss / 2**30:.2f} GiB", flush=True)
        print("\n".join(f"    {line}" for line in result.log[-6:]), flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)

    print(f"\nmodel: {args.layers} layers of {args.hidden}x{args.hidden} float32, {model_bytes / 2**30:.3f} GiB")
    print(f"| tool | wall s | peak RSS GiB | RSS / model bytes | output GiB | status |")
    print("|---|---|---|---|---|---|")
    for r in results:
        out = f"{r.output_bytes / 2**30:.3f}" if r.output_bytes else "-"
        print(f"| {r.tool} | {r.seconds:.1f} | {r.peak_rss / 2**30:.2f} | {r.peak_rss / model_bytes:.2f} | {out} | {r.status} |")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child-api":
        _run_api(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--child-onnxoptimizer":
        _run_onnxoptimizer(sys.argv[2], sys.argv[3])
    else:
        main()
