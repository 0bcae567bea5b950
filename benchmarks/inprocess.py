"""In-process throughput of each example model by batch size: the reference for servers.

No server, no transport, no batcher: one backend (``arrowinfer.backends.create_backend``)
per model, and ``backend.execute([request])`` called in a loop on a synthetic request of
each batch size 1, 2, 4, ... up to the model's ``max_batch_size``. What a server reaches
over Flight, shared memory or KServe gRPC is compared with these numbers, measured on the
same machine.

A row is one batch entry, as the model's config counts them: an HCAL hit for ``facile``
(about 2000 per event), a jet for ``jet_tagger`` and ``toptag_cnn``, a 4 KiB payload for
``identity``. Inputs come from :mod:`arrowinfer.events`.

Each cell (model, batch size) gets two warm-up calls, then calls until ``--max-seconds``
have passed (at least three). A model's sweep stops growing once a call takes more than
``--max-call-seconds``. Run from the repository root::

    python -m benchmarks.inprocess                      # all models, results in benchmarks/results
    python -m benchmarks.inprocess --models jet_tagger --max-seconds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from arrowinfer.backends import create_backend
from arrowinfer.bench.machine import OtherLoad, describe, markdown
from arrowinfer.bench.requests import make_request
from arrowinfer.examples import EXAMPLE_MODELS, write_example_repository
from arrowinfer.repository import Repository

#: What one row (batch entry) of each example model is.
ROW = {"facile": "HCAL hit", "jet_tagger": "jet", "toptag_cnn": "jet", "identity": "4 KiB payload"}

WARMUP_CALLS = 2
MIN_CALLS = 3
NOISY_PERCENT = 5  # others' CPU share above which a cell is flagged


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch_size``, which is included even if not a power of 2."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max(max_batch_size, 1))
    return sizes


def _ms(ns: float) -> float:
    return round(ns / 1e6, 4)


def measure(backend: object, request: pa.RecordBatch, max_seconds: float) -> dict[str, object]:
    """Time ``backend.execute([request])`` for about ``max_seconds``; one result row."""
    execute = backend.execute  # type: ignore[attr-defined]
    for _ in range(WARMUP_CALLS):
        execute([request])
    calls: list[int] = []
    parts: list[tuple[int, int, int]] = []
    others = OtherLoad()
    start = time.perf_counter_ns()
    deadline = start + max_seconds * 1e9
    now = start
    while len(calls) < MIN_CALLS or now < deadline:
        t0 = time.perf_counter_ns()
        _, timings = execute([request])
        now = time.perf_counter_ns()
        calls.append(now - t0)
        parts.append(tuple(timings))
    elapsed = (now - start) / 1e9
    other_share = others.share()
    rows = request.num_rows
    median = statistics.median(calls)
    return {
        "batch_size": rows,
        "calls": len(calls),
        "seconds": round(elapsed, 4),
        "rows_per_s": round(rows / (median / 1e9), 1),
        "sustained_rows_per_s": round(rows * len(calls) / elapsed, 1),
        "input_mb_per_s": round(request.nbytes * len(calls) / elapsed / 1e6, 2),
        "call_ms_p50": _ms(median),
        "compute_input_ms_p50": _ms(statistics.median(p[0] for p in parts)),
        "compute_infer_ms_p50": _ms(statistics.median(p[1] for p in parts)),
        "compute_output_ms_p50": _ms(statistics.median(p[2] for p in parts)),
        "other_cpu_percent": None if other_share is None else round(100 * other_share, 1),
    }


def _noise(row: dict[str, object]) -> float:
    share = row["other_cpu_percent"]
    return 0.0 if share is None else float(share)  # type: ignore[arg-type]


def sweep(
    repository: Repository,
    model_name: str,
    *,
    max_seconds: float,
    max_call_seconds: float,
    retries: int = 0,
) -> list[dict[str, object]]:
    """One model's rows, batch size 1 up to its max (or until a call gets too slow).

    A cell during which other processes took more than ``NOISY_PERCENT`` of the CPUs is
    measured again, up to ``retries`` times; the quietest attempt is kept.
    """
    model = repository.load(model_name)[0]
    backend = create_backend(model)
    rows = []
    try:
        for size in batch_sizes(model.max_batch_size):
            request = make_request(model_name, size)
            attempts = [measure(backend, request, max_seconds)]
            while _noise(attempts[-1]) > NOISY_PERCENT and len(attempts) <= retries:
                attempts.append(measure(backend, request, max_seconds))
            row = {"model": model_name, **min(attempts, key=_noise), "attempts": len(attempts)}
            rows.append(row)
            if float(row["call_ms_p50"]) / 1e3 > max_call_seconds:  # type: ignore[arg-type]
                break
    finally:
        backend.close()
    return rows


COLUMNS = (
    ("batch_size", "batch"),
    ("calls", "calls"),
    ("rows_per_s", "rows/s"),
    ("sustained_rows_per_s", "sustained rows/s"),
    ("input_mb_per_s", "input MB/s"),
    ("call_ms_p50", "call ms p50"),
    ("compute_input_ms_p50", "input ms"),
    ("compute_infer_ms_p50", "infer ms"),
    ("compute_output_ms_p50", "output ms"),
    ("other_cpu_percent", "others' CPU %"),
)


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"
    return str(value)


def best(rows: Sequence[dict[str, object]]) -> dict[str, dict[str, object]]:
    """The row with the most rows/s of each model."""
    out: dict[str, dict[str, object]] = {}
    for row in rows:
        name = str(row["model"])
        if name not in out or float(row["rows_per_s"]) > float(out[name]["rows_per_s"]):  # type: ignore[arg-type]
            out[name] = row
    return out


def render(
    rows: Sequence[dict[str, object]], machine: dict[str, object], settings: dict[str, object]
) -> str:
    """The results as Markdown: a summary, one table per model, the machine."""
    lines = [
        "# In-process throughput of the example models",
        "",
        "`backend.execute([request])` in a loop, one onnxruntime CPU backend per model, no",
        "server, transport or batcher: the reference that server benchmarks are compared with.",
        "A row is one batch entry (facile: an HCAL hit, ~2000 per event; jet_tagger and",
        "toptag_cnn: a jet; identity: a 4 KiB payload). `rows/s` is the batch size over the",
        "median call time, `sustained rows/s` all rows over all the time; `input ms`,",
        "`infer ms` and `output ms` are the medians of the backend's `Timings` (Arrow -> model",
        "inputs, onnxruntime, outputs -> Arrow); `input MB/s` counts the request's Arrow",
        "buffers. `others' CPU %` is the CPU time other processes took while a cell ran, as",
        "a share of all CPU time: near 0 on a quiet machine.",
        "",
        f"Settings: {', '.join(f'{k} {v}' for k, v in settings.items())}.",
        "Reproduce with `python -m benchmarks.inprocess`.",
        "",
        "## Best throughput",
        "",
        "| model | row | best rows/s | at batch | call ms p50 |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in best(rows).items():
        lines.append(
            f"| {name} | {ROW.get(name, 'row')} | {_fmt(row['rows_per_s'])} | "
            f"{row['batch_size']} | {_fmt(row['call_ms_p50'])} |"
        )
    for name in dict.fromkeys(str(r["model"]) for r in rows):
        lines += [
            "",
            f"## {name}",
            "",
            "| " + " | ".join(title for _, title in COLUMNS) + " |",
            "|" + "---:|" * len(COLUMNS),
        ]
        for row in (r for r in rows if r["model"] == name):
            lines.append("| " + " | ".join(_fmt(row[key]) for key, _ in COLUMNS) + " |")
    noisy = [r for r in rows if float(r.get("other_cpu_percent") or 0) > NOISY_PERCENT]  # type: ignore[arg-type]
    if noisy:
        warning = (
            f"**Warning:** other processes took more than {NOISY_PERCENT} % of the CPUs during "
            f"{len(noisy)} of {len(rows)} cells; their numbers are low and noisy."
        )
        at = lines.index("## Best throughput")
        lines[at:at] = [warning, ""]
    lines += ["", "## Machine", "", markdown(machine), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inprocess",
        description="In-process rows/s of each example model by batch size.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        help="model repository holding the example models (default: written to a temp dir)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(EXAMPLE_MODELS),
        choices=EXAMPLE_MODELS,
        metavar="MODEL",
        help=f"models to run (default: all of {', '.join(EXAMPLE_MODELS)})",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=0.75, help="timed seconds per batch size (0.75)"
    )
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=1.0,
        help="stop growing a model's batch once one call takes longer (1.0)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a cell again when other processes took the CPUs meanwhile (2 times)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="where inprocess.json and inprocess.md go (benchmarks/results); '-' for nowhere",
    )
    args = parser.parse_args(argv)

    settings = {
        "max_seconds": args.max_seconds,
        "max_call_seconds": args.max_call_seconds,
        "warmup_calls": WARMUP_CALLS,
        "min_calls": MIN_CALLS,
        "retries": args.retries,
    }
    machine = describe()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="arrowinfer-examples-") as tmp:
        root = args.repository or write_example_repository(Path(tmp) / "models")
        repository = Repository(root)
        for name in args.models:
            rows += sweep(
                repository,
                name,
                max_seconds=args.max_seconds,
                max_call_seconds=args.max_call_seconds,
                retries=args.retries,
            )
    text = render(rows, machine, settings)
    print(text)
    if str(args.out) != "-":
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "inprocess", "settings": settings, "machine": machine, "rows": rows}
        (args.out / "inprocess.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "inprocess.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
