"""Is an event's result the same whether it runs alone or merged with other clients' events?

For each model (the example models, plus ``rsum257``: a ``ReduceSum`` over 257 floats, and
``matmul``: ``x @ W`` with odd sizes 37 x 19), a target request (1 row, and 3 rows) runs:

- alone: ``backend.execute([target])``, as the batcher runs a request that found nobody
  to share its execution with;
- merged: ``backend.execute([target, others])`` and ``backend.execute([others, target])``,
  exactly what the dynamic batcher does when it merges requests, for execution batch
  sizes from 1 (or 3) up to the model's ``max_batch_size`` (1, 2, 3, 4, 5, 7, 8, 9, ...:
  every power of two, one below and one above it, and ``max_batch_size``), the others'
  rows drawn at random.

The largest difference, in units in the last place (ULP) of float32, between the target's
rows merged and alone is the table's cell; 0 means bit-identical for every composition
tried. Each model is measured as served by default, and with the per-model switch
``arrowinfer.batch_invariant``: ``"true"`` (every execution has ``max_batch_size`` rows) and
``"32"`` (every execution has 32 rows); its cost is the median time of one ``execute`` of a
request of 1, 16 and the largest number of rows tried, alone.

The backend is called directly (in-process) because it is what the batcher calls with the
merged requests; tests/test_reproducibility.py shows that every transport gives the backend
the same bits. Run from the repository root::

    python -m benchmarks.batch_invariance                  # results in benchmarks/results
    python -m benchmarks.batch_invariance --models rsum257 matmul --max-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
from onnx import TensorProto, helper

from arrowinfer import tensors
from arrowinfer.backends.ort import OnnxRuntimeBackend
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.bench.requests import make_request as example_request
from arrowinfer.examples import EXAMPLE_MODELS, IR_VERSION, OPSET, write_example_repository
from arrowinfer.repository import ModelVersion, Repository

EXTRA_MODELS = ("rsum257", "matmul")
#: How each model is measured: its label and its ``arrowinfer.batch_invariant`` setting.
VARIANTS = (("default", None), ("invariant_max", "true"), ("invariant_32", "32"))
TIMED_CALLS = 5


def write_extra_models(repository: Path) -> None:
    """``rsum257`` and ``matmul`` (max_batch_size 256), beside the example models."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    weights = np.random.default_rng(37).normal(size=(37, 19)).astype(np.float32)
    w = helper.make_tensor("w", TensorProto.FLOAT, [37, 19], weights.ravel().tolist())
    for name, width, out, node, init in [
        ("rsum257", 257, 1, helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1), axes),
        ("matmul", 37, 19, helper.make_node("MatMul", ["x", "w"], ["y"]), w),
    ]:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])
        graph = helper.make_graph([node], name, [x], [y], initializer=[init])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        (repository / name / "1").mkdir(parents=True)
        onnx.save(model, str(repository / name / "1" / "model.onnx"))
        (repository / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 256\n'
            f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {width} ] }} ]\n'
            f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {out} ] }} ]\n'
            "dynamic_batching { }\n"
        )


def make_request(model: str, rows: int, seed: int) -> pa.RecordBatch:
    """Synthetic rows of a model's input; wide dynamic range for the two small models."""
    if model in EXTRA_MODELS:
        width = 257 if model == "rsum257" else 37
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(rows, width)) * 10.0 ** rng.integers(-3, 4, (rows, width))
        return pa.RecordBatch.from_arrays([tensors.from_numpy(x.astype(np.float32))], ["x"])
    return example_request(model, rows, seed=seed)


def sizes(max_batch_size: int, smallest: int, limit: int) -> list[int]:
    """Execution batch sizes: powers of two and their neighbours, and the largest."""
    top = min(max_batch_size, limit)
    out = {smallest, top}
    power = 1
    while power <= top:
        out.update(s for s in (power - 1, power, power + 1) if smallest <= s <= top)
        power *= 2
    return sorted(out)


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance in float32 units in the last place between two arrays."""
    if a.dtype != np.float32:
        return 0 if a.tobytes() == b.tobytes() else -1
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    # map the sign-magnitude bit patterns onto a line where adjacent floats differ by 1
    oa = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ob = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.abs(oa - ob).max()) if a.size else 0


def _outputs(batch: pa.RecordBatch) -> list[np.ndarray]:
    return [np.ascontiguousarray(tensors.to_numpy(c)) for c in batch.columns]


def measure_model(version: ModelVersion, limit: int) -> dict[str, object]:
    """Max ULP per target size and composition, default and batch-invariant; and times."""
    row: dict[str, object] = {"model": version.name, "max_batch_size": version.max_batch_size}
    for label, setting in VARIANTS:
        model = version
        if setting is not None:
            model = dataclasses.replace(version, config=type(version.config)())
            model.config.CopyFrom(version.config)
            model.config.parameters["arrowinfer.batch_invariant"].string_value = setting
        backend = OnnxRuntimeBackend(model)
        worst = 0
        compositions = 0
        for target_rows in (1, 3):
            target = make_request(version.name, target_rows, seed=1000 + target_rows)
            alone = _outputs(backend.execute([target])[0][0])
            for size in sizes(version.max_batch_size, target_rows, limit):
                others_rows = size - target_rows
                if others_rows == 0:
                    continue
                others = make_request(version.name, others_rows, seed=size)
                for first in (True, False):
                    merged = [target, others] if first else [others, target]
                    results, _ = backend.execute(merged)
                    got = _outputs(results[0 if first else 1])
                    worst = max(worst, *(ulps(g, a) for g, a in zip(got, alone, strict=True)))
                    compositions += 1
        row[f"{label}_max_ulp"] = worst
        row[f"{label}_compositions"] = compositions
        row[f"{label}_ms"] = {
            str(s): _time(backend, make_request(version.name, s, seed=7))
            for s in sorted(
                {1, min(16, version.max_batch_size), min(version.max_batch_size, limit)}
            )
        }
        backend.close()
    return row


def _time(backend: OnnxRuntimeBackend, request: pa.RecordBatch) -> float:
    backend.execute([request])  # warm-up
    calls = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter_ns()
        backend.execute([request])
        calls.append(time.perf_counter_ns() - start)
    return round(statistics.median(calls) / 1e6, 3)


def table(rows: Sequence[dict[str, object]]) -> str:
    """The results as markdown tables: max ULP, then the time of one execution."""
    labels = [label for label, _ in VARIANTS]
    lines = [
        "| model | max_batch_size | compositions | "
        + " | ".join(f"max ULP ({label})" for label in labels)
        + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    lines.extend(
        f"| {r['model']} | {r['max_batch_size']} | {r['default_compositions']} | "
        + " | ".join(str(r[f"{label}_max_ulp"]) for label in labels)
        + " |"
        for r in rows
    )
    lines += [
        "",
        "| model | rows in the request | "
        + " | ".join(f"ms per execution ({label})" for label in labels)
        + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for r in rows:
        default_ms: dict[str, float] = r["default_ms"]  # type: ignore[assignment]
        for size in default_ms:
            cells = " | ".join(
                str(r[f"{label}_ms"][size])  # type: ignore[index]
                for label in labels
            )
            lines.append(f"| {r['model']} | {size} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[*EXAMPLE_MODELS, *EXTRA_MODELS])
    parser.add_argument(
        "--max-size", type=int, default=1024, help="largest execution batch size tried"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_example_repository(Path(tmp) / "repository")
        write_extra_models(path)
        repository = Repository(path)
        rows = []
        for name in args.models:
            (version,) = repository.load(name)[-1:]
            rows.append(measure_model(version, args.max_size))
            print(json.dumps(rows[-1]), file=sys.stderr)
    machine = describe()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_invariance.json").write_text(
        json.dumps({"machine": machine, "max_size": args.max_size, "rows": rows}, indent=1) + "\n"
    )
    text = f"{table(rows)}\n\n{markdown(machine)}\n"
    (args.out / "batch_invariance.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
