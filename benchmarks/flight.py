"""The Flight server against its limits: bare Flight echo, in-process onnxruntime, memory.

Targets (ratios measured in one run on the same machine):

1. large requests (4 MB and 32 MB, ``identity``): arrowinfer Flight throughput >= 0.8x the
   bare pyarrow Flight echo server;
2. one-row requests pipelined on one stream (``facile``): p50 round trip <= 2x the echo's;
3. dynamic batching: 32 concurrent clients sending one event's jets (1 to 8 rows) to
   ``jet_tagger`` reach >= 0.5x the rows/s of in-process onnxruntime at its best batch
   size, and more than the same load with batching off;
4. memory: server peak RSS while streaming 2 GB of 32 MB requests stays under its idle
   RSS + 4x one request.

Usage: ``python benchmarks/flight.py [--quick] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.backends import create_backend
from arrowinfer.bench.harness import (
    Measurement,
    arrowinfer_server,
    echo_server,
    markdown_table,
    measure,
    reset_peak_rss,
    rss_bytes,
)
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.bench.requests import make_request
from arrowinfer.client import Client, FlightTransport, conform
from arrowinfer.examples import write_example_repository
from arrowinfer.repository import Repository

MB = 10**6


def _identity_request(client: Client, rows: int) -> pa.RecordBatch:
    data = np.random.default_rng(0).random((rows, 1024), dtype=np.float32)
    return conform(
        pa.record_batch({"INPUT0": pa.FixedShapeTensorArray.from_numpy_ndarray(data)}),
        client.schema("identity"),
        model="identity",
    )


def large_requests(
    client: Client, echo: FlightTransport, cell: dict[str, float]
) -> list[Measurement]:
    out = []
    for rows, label in ((1024, "4 MB"), (8192, "32 MB")):
        batch = _identity_request(client, rows)
        size = batch.nbytes
        for concurrency in (1, 2):
            out.append(
                measure(
                    f"echo {label}",
                    lambda b=batch: echo.submit("echo", None, b),
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=size,
                    **cell,
                )
            )
            out.append(
                measure(
                    f"arrowinfer identity {label}",
                    lambda b=batch: client.infer_async("identity", b),
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=size,
                    **cell,
                )
            )
    return out


def one_row(client: Client, echo: FlightTransport, cell: dict[str, float]) -> list[Measurement]:
    """One-row requests, one at a time and 8 pipelined on one stream."""
    batch = conform(make_request("facile", 1), client.schema("facile"), model="facile")
    out = []
    for concurrency in (1, 8):
        out.append(
            measure(
                "echo 1 row",
                lambda: echo.submit("echo", None, batch),
                concurrency=concurrency,
                rows=1,
                payload_bytes=batch.nbytes,
                **cell,
            )
        )
        out.append(
            measure(
                "arrowinfer facile 1 row",
                lambda: client.infer_async("facile", batch),
                concurrency=concurrency,
                rows=1,
                payload_bytes=batch.nbytes,
                **cell,
            )
        )
    return out


def _jet_requests(schema: pa.Schema, count: int = 512) -> list[pa.RecordBatch]:
    """One event's jets per request: 1 to 8 jets, each with its constituents."""
    pool = make_request("jet_tagger", 8 * count)
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 9, count)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [
        conform(pool.slice(int(s), int(n)), schema, model="jet_tagger")
        for s, n in zip(starts, sizes, strict=True)
    ]


def batching(location: str, label: str, clients: int, cell: dict[str, float]) -> Measurement:
    """``clients`` clients, one request in flight each, round robin over their connections."""
    pool = [Client(location) for _ in range(clients)]
    try:
        requests = _jet_requests(pool[0].schema("jet_tagger"))
        mean_rows = float(np.mean([r.num_rows for r in requests]))
        cycle = itertools.cycle(zip(itertools.cycle(pool), itertools.cycle(requests)))
        lock = threading.Lock()

        def submit():  # type: ignore[no-untyped-def]
            with lock:
                client, request = next(cycle)
            return client.infer_async("jet_tagger", request)

        m = measure(label, submit, concurrency=clients, rows=1, **cell)
        m.rows_per_s = m.requests_per_s * mean_rows
        m.extra["mean_rows_per_request"] = mean_rows
        return m
    finally:
        for client in pool:
            client.close()


def inprocess_best(repository: Path, seconds: float) -> tuple[float, int]:
    """The best in-process jet_tagger rows/s over batch sizes, measured in this run."""
    model = Repository(repository).load("jet_tagger")[0]
    backend = create_backend(model)
    best = (0.0, 0)
    for size in (64, 128, 256, 512, 1024):
        request = make_request("jet_tagger", size)
        backend.execute([request])
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            backend.execute([request])
            calls += 1
        rate = calls * size / (time.perf_counter() - t0)
        best = max(best, (rate, size))
    return best


def memory(location: str, pid: int, total_bytes: int) -> dict[str, float]:
    with Client(location) as client:
        batch = _identity_request(client, 8192)
        client.infer("identity", batch.slice(0, 1))  # warm: streams, sessions
        idle, _ = rss_bytes(pid)
        reset_peak_rss(pid)
        count = max(1, total_bytes // batch.nbytes)
        for result in client.stream("identity", itertools.repeat(batch, count), window=2):
            assert result.num_rows == batch.num_rows
        _, peak = rss_bytes(pid)
    return {
        "request_mb": batch.nbytes / MB,
        "streamed_gb": count * batch.nbytes / 1e9,
        "idle_rss_mb": idle / MB,
        "peak_rss_mb": peak / MB,
        "growth_in_requests": (peak - idle) / batch.nbytes,
    }


def without_batching(repository: Path) -> Path:
    """A copy of the repository whose jet_tagger has no dynamic_batching block."""
    copy = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(repository, copy)
    config = copy / "jet_tagger" / "config.pbtxt"
    text = config.read_text()
    start = text.index("dynamic_batching")
    end = text.index("}", start) + 1
    config.write_text(text[:start] + text[end:])
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows, 0.5 GB for memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    cell = (
        {"warmup_s": 0.3, "window_s": 0.5, "max_windows": 4}
        if args.quick
        else {"warmup_s": 1.0, "window_s": 1.5, "max_windows": 8}
    )
    repository = write_example_repository(Path(tempfile.mkdtemp()) / "repo")
    rows: list[Measurement] = []
    report: dict[str, object] = {"machine": describe()}
    with echo_server() as echo_location, arrowinfer_server(repository) as (proc, location):
        echo = FlightTransport(echo_location)
        with Client(location) as client:
            print("large requests ...", flush=True)
            rows += large_requests(client, echo, cell)
            print("one-row requests ...", flush=True)
            rows += one_row(client, echo, cell)
        print("dynamic batching ...", flush=True)
        batched = batching(location, "jet_tagger 32 clients, batching on", 32, cell)
        rows.append(batched)
        print("memory ...", flush=True)
        report["memory"] = memory(location, proc.pid, (512 if args.quick else 2048) * 2**20)
        echo.close()
    with arrowinfer_server(without_batching(repository)) as (_, location):
        unbatched = batching(location, "jet_tagger 32 clients, batching off", 32, cell)
        rows.append(unbatched)
    best_rate, best_size = inprocess_best(repository, 0.5 if args.quick else 1.5)

    def by(name: str, concurrency: int = 1) -> Measurement:
        return next(m for m in rows if m.name == name and m.concurrency == concurrency)

    mem = report["memory"]
    targets = {}
    for label in ("4 MB", "32 MB"):
        best_ai = max(by(f"arrowinfer identity {label}", c).mb_per_s for c in (1, 2))
        best_echo = max(by(f"echo {label}", c).mb_per_s for c in (1, 2))
        targets[f"identity {label}: Flight / bare echo throughput (>= 0.8)"] = best_ai / best_echo
    targets["one row, 8 pipelined on one stream: p50 / bare echo p50 (<= 2)"] = (
        by("arrowinfer facile 1 row", 8).p50_ms / by("echo 1 row", 8).p50_ms
    )
    targets["one row, one at a time: p50 / bare echo p50"] = (
        by("arrowinfer facile 1 row").p50_ms / by("echo 1 row").p50_ms
    )
    targets[
        f"jet_tagger 32 clients: rows/s / in-process best ({best_rate:,.0f} rows/s at batch {best_size}) (>= 0.5)"
    ] = batched.rows_per_s / best_rate
    targets["jet_tagger 32 clients: batching on / off (> 1)"] = (
        batched.rows_per_s / unbatched.rows_per_s
    )
    targets["memory: peak - idle RSS, in 32 MB requests (< 4)"] = mem["growth_in_requests"]  # type: ignore[index]
    report["targets"] = targets
    report["inprocess_best"] = {"rows_per_s": best_rate, "batch_size": best_size}
    report["rows"] = [m.as_dict() for m in rows]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flight.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Flight server benchmark",
        "",
        (
            f"`python benchmarks/flight.py{' --quick' if args.quick else ''}`. Client and "
            "server in separate processes on the same machine; concurrency = requests in "
            "flight (perf_analyzer's async mode); stable = three windows within 10 %."
        ),
        "",
        "## Targets",
        "",
        "| target | measured |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in targets.items()),
        "",
        "## Measurements",
        "",
        markdown_table(rows),
        "",
        "## Memory",
        "",
        *(f"- {k}: {v:,.2f}" for k, v in mem.items()),  # type: ignore[attr-defined]
        "",
        markdown(report["machine"]),  # type: ignore[arg-type]
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "flight.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
