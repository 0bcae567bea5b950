"""The Flight server against its limits: bare Flight echo, in-process onnxruntime, memory.

Targets (ratios measured in one run on the same machine; every cell also reports the
server's and the client's CPU microseconds per request, from the processes' own counters):

0. server CPU per request (``facile``, 1 and 100 rows, 1 and 8 in flight on one stream)
   <= 3x the bare echo's; for 10,000-row requests <= the echo's + 1.25x the in-process
   CPU of computing them;
1. large requests (4 MB and 32 MB, ``identity``): arrowinfer Flight throughput >= 0.8x the
   bare pyarrow Flight echo server;
2. one-row requests pipelined on one stream (``facile``): p50 round trip <= 2x the echo's;
3. dynamic batching: 32 concurrent clients sending one event's jets (1 to 8 rows) to
   ``jet_tagger``: the server's CPU per row <= 1.5x in-process onnxruntime's CPU per row
   at the batch sizes the batcher formed (from the model's ``batch_stats``); rows/s
   against in-process onnxruntime at its best batch size (0.5 was the first target), and
   more than the same load with batching off;
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
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import flight

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
    client: Client, echo: FlightTransport, cell: dict[str, Any]
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
                    **cell["echo"],
                )
            )
            out.append(
                measure(
                    f"arrowinfer identity {label}",
                    lambda b=batch: client.infer_async("identity", b),
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=size,
                    **cell["arrowinfer"],
                )
            )
    return out


SMALL_ROWS = (1, 100, 10_000)


def small_requests(
    client: Client, echo: FlightTransport, cell: dict[str, Any]
) -> list[Measurement]:
    """``facile`` requests of 1, 100 and 10,000 rows, one at a time and 8 on one stream."""
    pool = make_request("facile", max(SMALL_ROWS))
    out = []
    for rows in SMALL_ROWS:
        batch = conform(pool.slice(0, rows), client.schema("facile"), model="facile")
        for concurrency in (1, 8):
            out.append(
                measure(
                    f"echo {rows} row",
                    lambda b=batch: echo.submit("echo", None, b),
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=batch.nbytes,
                    **cell["echo"],
                )
            )
            out.append(
                measure(
                    f"arrowinfer facile {rows} row",
                    lambda b=batch: client.infer_async("facile", b),
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=batch.nbytes,
                    **cell["arrowinfer"],
                )
            )
    return out


def inprocess_cpu_us(
    repository: Path, model: str, sizes: list[int], seconds: float
) -> dict[int, float]:
    """CPU microseconds (every thread of this process) of one in-process ``execute`` per size."""
    backend = create_backend(Repository(repository).load(model)[0])
    pool = make_request(model, max(sizes))
    out = {}
    try:
        for size in sizes:
            request = pool.slice(0, size)
            backend.execute([request])  # warm
            calls, t0, cpu0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds or calls < 3:
                backend.execute([request])
                calls += 1
            out[size] = (time.process_time() - cpu0) / calls * 1e6
    finally:
        backend.close()
    return out


def batch_sizes_formed(location: str, model: str) -> dict[int, int]:
    """Executions per batch size so far, from the server's ``batch_stats``."""
    client = flight.FlightClient(location)
    try:
        body = json.dumps({"model": model}).encode()
        result = next(iter(client.do_action(flight.Action("model.statistics", body))))
    finally:
        client.close()
    stats = json.loads(result.body.to_pybytes())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}


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


def batching(location: str, label: str, clients: int, cell: dict[str, Any]) -> Measurement:
    """``clients`` clients, one request in flight each, round robin over their connections.

    ``extra["batches"]``: executions per batch size the batcher formed during the run.
    """
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

        before = batch_sizes_formed(location, "jet_tagger")
        m = measure(label, submit, concurrency=clients, rows=1, **cell)
        after = batch_sizes_formed(location, "jet_tagger")
        m.rows_per_s = m.requests_per_s * mean_rows
        m.extra["mean_rows_per_request"] = mean_rows
        m.extra["server_cpu_us_per_row"] = m.server_cpu_us / mean_rows
        m.extra["batches"] = {
            size: count - before.get(size, 0)
            for size, count in after.items()
            if count > before.get(size, 0)
        }
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
    """Peak RSS of the server while one client streams 32 MB requests, two in flight."""
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
    timing: dict[str, Any] = (
        {"warmup_s": 0.3, "window_s": 0.5, "max_windows": 4}
        if args.quick
        else {"warmup_s": 1.0, "window_s": 1.5, "max_windows": 8}
    )
    repository = write_example_repository(Path(tempfile.mkdtemp()) / "repo")
    rows: list[Measurement] = []
    report: dict[str, Any] = {"machine": describe()}
    with (
        echo_server() as (echo_proc, echo_location),
        arrowinfer_server(repository) as (
            proc,
            location,
        ),
    ):
        cell = {
            "echo": {**timing, "server_pids": (echo_proc.pid,)},
            "arrowinfer": {**timing, "server_pids": (proc.pid,)},
        }
        echo = FlightTransport(echo_location)
        with Client(location) as client:
            print("large requests ...", flush=True)
            rows += large_requests(client, echo, cell)
            print("1, 100, 10,000-row requests ...", flush=True)
            rows += small_requests(client, echo, cell)
        print("dynamic batching ...", flush=True)
        batched = batching(location, "jet_tagger 32 clients, batching on", 32, cell["arrowinfer"])
        rows.append(batched)
        print("memory ...", flush=True)
        report["memory"] = memory(location, proc.pid, (512 if args.quick else 2048) * 2**20)
        echo.close()
    with arrowinfer_server(without_batching(repository)) as (proc, location):
        unbatched = batching(
            location,
            "jet_tagger 32 clients, batching off",
            32,
            {**timing, "server_pids": (proc.pid,)},
        )
        rows.append(unbatched)
    print("in-process ...", flush=True)
    seconds = 0.5 if args.quick else 1.5
    best_rate, best_size = inprocess_best(repository, seconds)
    facile_cpu = inprocess_cpu_us(repository, "facile", [10_000], seconds)[10_000]
    formed: dict[int, int] = batched.extra["batches"]  # type: ignore[assignment]
    jet_cpu = inprocess_cpu_us(repository, "jet_tagger", sorted(formed), min(seconds, 0.2))
    # in-process CPU per row at the batches formed, weighted by the rows each size ran
    formed_rows = sum(size * count for size, count in formed.items())
    jet_cpu_per_row = sum(jet_cpu[size] * count for size, count in formed.items()) / formed_rows

    def by(name: str, concurrency: int = 1) -> Measurement:
        return next(m for m in rows if m.name == name and m.concurrency == concurrency)

    mem = report["memory"]
    targets = {}
    for n in SMALL_ROWS:
        for c in (1, 8):
            ours, bare = by(f"arrowinfer facile {n} row", c), by(f"echo {n} row", c)
            if n < 10_000:
                targets[f"{n} row, {c} in flight: server CPU / bare echo's (<= 3)"] = (
                    ours.server_cpu_us / bare.server_cpu_us
                )
            else:
                targets[
                    f"{n} rows, {c} in flight: server CPU / (echo's + 1.25x in-process "
                    f"compute {facile_cpu:,.0f} us) (<= 1)"
                ] = ours.server_cpu_us / (bare.server_cpu_us + 1.25 * facile_cpu)
    targets["one row, one at a time: p50 / bare echo p50 (<= 2)"] = (
        by("arrowinfer facile 1 row").p50_ms / by("echo 1 row").p50_ms
    )
    targets["one row, 8 pipelined on one stream: p50 / bare echo p50"] = (
        by("arrowinfer facile 1 row", 8).p50_ms / by("echo 1 row", 8).p50_ms
    )
    targets[
        f"jet_tagger 32 clients: server CPU per row / in-process CPU per row at the batches "
        f"formed ({jet_cpu_per_row:,.1f} us) (<= 1.5)"
    ] = batched.server_cpu_us / batched.extra["mean_rows_per_request"] / jet_cpu_per_row  # type: ignore[operator]
    targets[
        f"jet_tagger 32 clients: rows/s / in-process best ({best_rate:,.0f} rows/s at batch {best_size}) (0.5 was the first target)"
    ] = batched.rows_per_s / best_rate
    targets["jet_tagger 32 clients: batching on / off (> 1)"] = (
        batched.rows_per_s / unbatched.rows_per_s
    )
    for label in ("4 MB", "32 MB"):
        best_ai = max(by(f"arrowinfer identity {label}", c).mb_per_s for c in (1, 2))
        best_echo = max(by(f"echo {label}", c).mb_per_s for c in (1, 2))
        targets[f"identity {label}: Flight / bare echo throughput (>= 0.8)"] = best_ai / best_echo
    targets["memory: peak - idle RSS, in 32 MB requests (< 4)"] = mem["growth_in_requests"]
    report["targets"] = targets
    report["inprocess_best"] = {"rows_per_s": best_rate, "batch_size": best_size}
    report["inprocess_cpu_us"] = {
        "facile_10000_rows": facile_cpu,
        "jet_tagger_per_row_at_batches_formed": jet_cpu_per_row,
        "jet_tagger_per_batch": jet_cpu,
    }
    report["rows"] = [m.as_dict() for m in rows]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flight.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Flight server benchmark",
        "",
        (
            f"`python benchmarks/flight.py{' --quick' if args.quick else ''}`. Client and "
            "server in separate processes on the same machine; concurrency = requests in "
            "flight (perf_analyzer's async mode); stable = three windows within 10 %; "
            "server/client CPU = CPU microseconds per request from the processes' own "
            "counters over the same windows (the server's summed over all its processes)."
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
        "Batches the batcher formed for jet_tagger (size: executions): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(formed.items())),
        "",
        "## Memory",
        "",
        *(f"- {k}: {v:,.2f}" for k, v in mem.items()),
        "",
        markdown(report["machine"]),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "flight.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
