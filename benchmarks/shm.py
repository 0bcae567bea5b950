"""Shared memory against Flight (TCP and Unix socket), and against one numpy copy.

One run, one machine, client and servers in separate processes:

- ``identity`` with 4 MB and 32 MB requests (1024 and 8192 rows of 4 KiB), at 1 and 2
  requests in flight: Flight over TCP, Flight over a Unix domain socket, shared memory
  (its control channel over TCP), and ``np.copyto`` of the same payload between two
  preallocated arrays (what one copy costs here);
- one-row ``facile`` requests, one at a time: ``shm`` is the shared-memory transport as
  it comes (requests under 256 KiB go over its Flight connection), ``shm only`` sends
  every request through shared memory (``min_shm_bytes=0``).

Targets (ratios of numbers measured in this run):

1. shared-memory throughput >= 5x Flight TCP, at 4 MB and at 32 MB;
2. shared-memory round trip (p50, one in flight) <= 4x one numpy copy of the payload;
3. one row: shared-memory p50 <= Flight TCP p50.

Usage: ``python benchmarks/shm.py [--quick] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.harness import Measurement, arrowinfer_server, markdown_table, measure
from arrowinfer.bench.machine import OtherLoad, describe, markdown
from arrowinfer.bench.requests import make_request, one_intra_op_thread
from arrowinfer.client import Client, ShmTransport, conform
from arrowinfer.examples import write_example_repository

SIZES = ((1024, "4 MB"), (8192, "32 MB"))


def _copy(src: np.ndarray, dst: np.ndarray) -> Future[object]:
    np.copyto(dst, src)
    done: Future[object] = Future()
    done.set_result(None)
    return done


def numpy_copy(rows: int, label: str, cell: dict[str, float]) -> Measurement:
    """One ``np.copyto`` of the payload between two preallocated (warm) arrays."""
    src = np.random.default_rng(0).random((rows, 1024), dtype=np.float32)
    dst = np.empty_like(src)
    return measure(
        f"numpy copy {label}",
        lambda: _copy(src, dst),
        rows=rows,
        payload_bytes=src.nbytes,
        **cell,
    )


def transports(
    clients: dict[str, Client], cell: dict[str, float], pids: dict[str, tuple[int, ...]]
) -> tuple[list[Measurement], dict[str, int]]:
    """identity 4 MB / 32 MB at 1 and 2 in flight, and one-row facile, per transport.

    ``pids``: the server processes each transport's requests cost CPU in.
    """
    any_client = next(iter(clients.values()))
    out: list[Measurement] = []
    sizes: dict[str, int] = {}
    for rows, label in SIZES:
        batch = conform(make_request("identity", rows), any_client.schema("identity"), model="x")
        sizes[label] = batch.nbytes
        for name, client in clients.items():
            if name == "shm only":
                continue  # the same path as "shm" at these sizes
            transport = client._transport
            out.extend(
                measure(
                    f"{name} identity {label}",
                    lambda b=batch, t=transport: t.submit("identity", None, b),
                    server_pids=pids[name],
                    concurrency=concurrency,
                    rows=rows,
                    payload_bytes=batch.nbytes,
                    **cell,
                )
                for concurrency in (1, 2)
            )
        out.append(numpy_copy(rows, label, cell))
    one = conform(make_request("facile", 1), any_client.schema("facile"), model="facile")
    for name, client in clients.items():
        transport = client._transport
        out.append(
            measure(
                f"{name} facile 1 row",
                lambda t=transport: t.submit("facile", None, one),
                server_pids=pids[name],
                rows=1,
                payload_bytes=one.nbytes,
                **cell,
            )
        )
    return out, sizes


def check_results(clients: dict[str, Client]) -> None:
    """Every transport gives the same result before anything is timed."""
    data = {"INPUT0": make_request("identity", 64).column(0)}
    results = {
        name: client.infer("identity", pa.record_batch(data)) for name, client in clients.items()
    }
    first = next(iter(results.values()))
    for name, result in results.items():
        if not result.equals(first):
            raise RuntimeError(f"{name}: a different result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short measurement windows")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    cell = (
        {"warmup_s": 0.3, "window_s": 0.5, "max_windows": 4}
        if args.quick
        else {"warmup_s": 1.0, "window_s": 1.5, "max_windows": 8}
    )
    scratch = Path(tempfile.mkdtemp())
    repository = one_intra_op_thread(write_example_repository(scratch / "repo"))
    socket = scratch / "arrowinfer.sock"
    models = ("--model", "identity", "--model", "facile")
    load = OtherLoad()
    with (
        arrowinfer_server(repository, *models) as (tcp_server, tcp),
        arrowinfer_server(repository, *models, "--unix-socket", str(socket)) as (
            unix_server,
            unix,
        ),
    ):
        pids = {
            "Flight TCP": (tcp_server.pid,),
            "Flight unix": (unix_server.pid,),
            "shm": (tcp_server.pid,),
            "shm only": (tcp_server.pid,),
        }
        clients = {
            "Flight TCP": Client(tcp),
            "Flight unix": Client(unix),
            "shm": Client(tcp.replace("grpc://", "shm://", 1)),
            "shm only": Client(
                tcp, transport=ShmTransport(tcp.replace("grpc://", "shm://", 1), min_shm_bytes=0)
            ),
        }
        try:
            check_results(clients)
            rows, sizes = transports(clients, cell, pids)
        finally:
            for client in clients.values():
                client.close()
    others = load.share()

    def by(name: str, concurrency: int = 1) -> Measurement:
        return next(m for m in rows if m.name == name and m.concurrency == concurrency)

    targets: dict[str, float] = {}
    for _, label in SIZES:
        for concurrency in (1, 2):
            shm = by(f"shm identity {label}", concurrency).mb_per_s
            tcp_rate = by(f"Flight TCP identity {label}", concurrency).mb_per_s
            targets[f"identity {label}, {concurrency} in flight: shm / Flight TCP MB/s (>= 5)"] = (
                shm / tcp_rate
            )
    for _, label in SIZES:
        targets[f"identity {label}: shm p50 / one numpy copy p50 (<= 4)"] = (
            by(f"shm identity {label}").p50_ms / by(f"numpy copy {label}").p50_ms
        )
    targets["facile 1 row: shm p50 / Flight TCP p50 (<= 1)"] = (
        by("shm facile 1 row").p50_ms / by("Flight TCP facile 1 row").p50_ms
    )
    targets["facile 1 row: shm only (min_shm_bytes=0) p50 / Flight TCP p50"] = (
        by("shm only facile 1 row").p50_ms / by("Flight TCP facile 1 row").p50_ms
    )
    targets["facile 1 row: Flight unix p50 / Flight TCP p50"] = (
        by("Flight unix facile 1 row").p50_ms / by("Flight TCP facile 1 row").p50_ms
    )
    report: dict[str, object] = {
        "machine": describe(),
        "others_cpu_share": others,
        "payload_bytes": sizes,
        "targets": targets,
        "rows": [m.as_dict() for m in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shm.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Shared memory vs Flight",
        "",
        (
            f"`python benchmarks/shm.py{' --quick' if args.quick else ''}`. One client "
            "process; two `arrowinfer serve` processes (TCP, and a Unix domain socket) serving "
            "`identity` and `facile`; shared memory is a session on the TCP server. "
            "Concurrency = requests in flight (perf_analyzer's async mode); stable = three "
            "windows within 10 %. `numpy copy` is `np.copyto` of the same payload between two "
            "preallocated arrays, in the client process. Server/client CPU: microseconds per "
            "request from the processes' own counters over the same windows. Requests are conformed once, before "
            "timing; shared-memory results are views, dropped at once (their regions reused). "
            "Both models run with one onnxruntime intra-op thread (`intra_op_thread_count`). "
            "`shm` is the shared-memory transport as it comes (requests under 256 KiB ride its "
            "Flight connection); `shm only` sends every request through shared memory."
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
        (
            "Other processes' CPU share during the run: "
            f"{'n/a' if others is None else f'{others:.1%}'}."
        ),
        "",
        "## Machine",
        "",
        markdown(report["machine"]),  # type: ignore[arg-type]
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "shm.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
