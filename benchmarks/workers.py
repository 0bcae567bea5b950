"""``arrowinfer serve --workers N``: many clients, small requests, N server processes.

Target: 16 clients with one small request each in flight (``facile``: 1 to 8 HCAL hits;
``jet_tagger``: one event's jets, 1 to 8) reach >= 1.5x the requests/s with ``--workers 2``
that they reach with ``--workers 1`` (one process, no relay).

The clients run in ``--client-processes`` processes of their own (16 clients split between
them), so that the clients' GIL is not the limit; every model gets one onnxruntime intra-op
thread, the same for every server. The requests/s of the client processes, measured at the
same time, add up. On a machine with few cores, clients, relay and workers share the
cores, and the ratio says as much about the machine as about the server: the results file
records the machine and how busy it was.

Usage: ``python benchmarks/workers.py [--quick] [--workers 1,2] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.harness import Measurement, arrowinfer_server, markdown_table, measure
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.bench.requests import make_request, one_intra_op_thread
from arrowinfer.client import Client, conform
from arrowinfer.examples import write_example_repository

MODELS = ("facile", "jet_tagger")

#: CPUs this benchmark may use.
CORES = len(os.sched_getaffinity(0))


def requests_for(model: str, schema: pa.Schema, count: int = 256) -> list[pa.RecordBatch]:
    """``count`` small requests of 1 to 8 rows (hits, or jets of one event)."""
    pool = make_request(model, 8 * count)
    sizes = np.random.default_rng(1).integers(1, 9, count)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [
        conform(pool.slice(int(s), int(n)), schema, model=model)
        for s, n in zip(starts, sizes, strict=True)
    ]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _busy_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


class CpuUse:
    """Cores busy in the server's processes (parent, workers) and in the whole machine."""

    def __init__(self, pid: int):
        self.pids = [pid, *_children(pid)]
        self._start = self._sample()

    def _sample(self) -> tuple[float, list[float], tuple[int, int]]:
        return time.perf_counter(), [_cpu_seconds(p) for p in self.pids], _busy_jiffies()

    def cores(self) -> dict[str, float]:
        t1, cpu1, (busy1, total1) = self._sample()
        t0, cpu0, (busy0, total0) = self._start
        wall = t1 - t0
        used = [(b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)]
        return {
            "server_cores": round(sum(used), 2),
            "parent_cores": round(used[0], 2) if len(used) > 1 else 0.0,
            "machine_busy": round((busy1 - busy0) / max(total1 - total0, 1), 2),
        }


def client_main(location: str, model: str, clients: int, cell: dict[str, float]) -> None:
    """One client process: ``clients`` clients, one request in flight each; prints JSON."""
    pool = [Client(location) for _ in range(clients)]
    try:
        requests = requests_for(model, pool[0].schema(model))
        mean_rows = float(np.mean([r.num_rows for r in requests]))
        cycle = zip(itertools.cycle(pool), itertools.cycle(requests))
        lock = threading.Lock()

        def submit():  # type: ignore[no-untyped-def]
            with lock:
                client, request = next(cycle)
            return client.infer_async(model, request)

        m = measure(model, submit, concurrency=clients, rows=1, **cell)
        m.rows_per_s = m.requests_per_s * mean_rows
        print(json.dumps(m.as_dict()), flush=True)
    finally:
        for client in pool:
            client.close()


def run_clients(
    location: str, model: str, clients: int, processes: int, cell: dict[str, float], label: str
) -> Measurement:
    """``clients`` clients split over ``processes`` processes; their rates add up."""
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                location,
                model,
                str(n),
                json.dumps(cell),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in shares
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a client process failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    weights = [r["requests_per_s"] for r in results]
    total = sum(weights)

    def weighted(key: str) -> float:
        return float(sum(r[key] * w for r, w in zip(results, weights, strict=True)) / total)

    return Measurement(
        label,
        clients,
        total,
        sum(r["rows_per_s"] for r in results),
        0.0,
        weighted("p50_ms"),
        weighted("p90_ms"),
        weighted("p95_ms"),
        weighted("p99_ms"),
        max(r["windows"] for r in results),
        all(r["stable"] for r in results),
        {"client_processes": processes},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="clients (default: %(default)s)")
    parser.add_argument(
        "--client-processes", type=int, default=2, help="client processes (default: %(default)s)"
    )
    parser.add_argument("--models", default=",".join(MODELS), help="default: %(default)s")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of every setting, alternating (default: 2)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="workers", help="results file name (no suffix)")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        location, model, clients, cell = args.client
        client_main(location, model, int(clients), json.loads(cell))
        return 0

    cell = (
        {"warmup_s": 0.5, "window_s": 0.5, "max_windows": 4}
        if args.quick
        else {"warmup_s": 1.5, "window_s": 1.5, "max_windows": 8}
    )
    counts = [int(n) for n in args.workers.split(",")]
    models = args.models.split(",")
    repository = one_intra_op_thread(
        write_example_repository(Path(tempfile.mkdtemp()) / "repo"), tuple(models)
    )
    model_flags = [flag for m in models for flag in ("--model", m)]
    load_before = os.getloadavg()
    rows: list[Measurement] = []
    for repeat, workers in itertools.product(range(args.repeat), counts):
        with arrowinfer_server(repository, *model_flags, "--workers", str(workers)) as (
            server,
            loc,
        ):
            for model in models:
                cpu = CpuUse(server.pid)
                m = run_clients(
                    loc,
                    model,
                    args.clients,
                    args.client_processes,
                    cell,
                    f"{model}, --workers {workers} (run {repeat + 1})",
                )
                m.extra.update(cpu.cores())
                m.extra["server_cpu_ms_per_request"] = round(
                    1e3 * m.extra["server_cores"] / m.requests_per_s, 3
                )
                m.extra["machine_cpu_ms_per_request"] = round(
                    1e3 * m.extra["machine_busy"] * CORES / m.requests_per_s, 3
                )
                m.extra["workers"] = workers
                m.extra["model"] = model
                rows.append(m)
                print(markdown_table([m]).splitlines()[-1], flush=True)

    def rate(model: str, workers: int) -> float:
        """The median over the runs (the runs alternate worker counts: load drifts)."""
        return float(
            np.median(
                [
                    m.requests_per_s
                    for m in rows
                    if m.extra["model"] == model and m.extra["workers"] == workers
                ]
            )
        )

    base = min(counts)
    ratios = {
        f"{model}: --workers {n} / --workers {base} requests/s": rate(model, n) / rate(model, base)
        for model in models
        for n in counts
        if n != base
    }
    machine = describe()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "settings": {
                    **cell,
                    "clients": args.clients,
                    "processes": args.client_processes,
                    "repeat": args.repeat,
                },
                "load_average_before": load_before,
                "ratios": ratios,
                "measurements": [m.as_dict() for m in rows],
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        "# Multi-process server: `arrowinfer serve --workers N`",
        "",
        (
            f"`python benchmarks/workers.py{' --quick' if args.quick else ''}`. {args.clients} "
            f"clients in {args.client_processes} client processes, one request in flight each "
            "(perf_analyzer's async mode), 1 to 8 rows per request (facile: HCAL hits; jet_tagger: "
            "one event's jets). `--workers 1` is the plain single-process server; with more, a "
            "parent process relays each client connection to a worker (see "
            "`arrowinfer/server/workers/`). One onnxruntime intra-op thread per model. "
            "Stable = three windows within 10 %."
        ),
        "",
        "## Target: >= 1.5x requests/s with 2 workers",
        "",
        (
            f"Medians of {args.repeat} runs of each setting; the runs alternate between worker "
            "counts, so that a change in the machine's load hits both."
        ),
        "",
        "| ratio | measured |",
        "|---|---:|",
        *(f"| {name} | {value:.2f} |" for name, value in ratios.items()),
        "",
        *(
            [
                (
                    f"**Few cores:** this machine has {CORES}. The client processes need more CPU per "
                    "request than the server (see below), every core is busy with one worker "
                    "already, and a second worker can only take CPU from the clients: the ratio "
                    "measures the machine, not the server, and moves with other load. The target "
                    "needs a machine with cores to spare for the workers."
                ),
                "",
            ]
            if CORES < 6
            else []
        ),
        "## Measurements",
        "",
        markdown_table(rows),
        "",
        "## Where the CPU went",
        "",
        (
            "Cores busy while each cell's clients ran (warm-up included): in the server's "
            "processes together, in its parent (the relay, with workers), and the share of the "
            "whole machine's CPU time that was busy (clients included). `server CPU ms/request` = "
            "server cores / requests/s; `machine CPU ms/request` = busy cores of the whole "
            "machine / requests/s, clients included. With every core busy, no number of workers "
            "can serve more than cores / machine CPU per request: "
            f"{CORES} cores here."
        ),
        "",
        (
            "| name | server cores | parent (relay) cores | machine busy | server CPU ms/request "
            "| machine CPU ms/request | bound: requests/s at 100 % CPU |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {m.name} | {m.extra['server_cores']:.2f} | {m.extra['parent_cores']:.2f} | "
            f"{100 * float(m.extra['machine_busy']):.0f} % | "  # type: ignore[arg-type]
            f"{m.extra['server_cpu_ms_per_request']:.3f} | "
            f"{m.extra['machine_cpu_ms_per_request']:.3f} | "
            f"{1e3 * CORES / float(m.extra['machine_cpu_ms_per_request']):,.0f} |"  # type: ignore[arg-type]
            for m in rows
        ),
        "",
        "## Machine",
        "",
        markdown(machine),
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
