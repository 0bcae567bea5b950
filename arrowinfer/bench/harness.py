"""Measurement with perf_analyzer's method, and the servers benchmarks run against.

- **Concurrency N** means N requests outstanding at all times (perf_analyzer's async
  mode): each completion records its latency and sends the next request.
- **Warm-up**, then **measurement windows**; the measurement is stable when the last
  three windows' throughputs agree within 10 % (at most ``max_windows`` windows).
- Reported: requests/s, rows/s, MB/s (request payload, 10^6 B), p50/p90/p95/p99
  latency in ms over the stable windows, and CPU microseconds per request over the same
  windows: the server's (``server_pids``: its processes and all their descendants, worker
  processes included, from their own /proc counters) and the client's (this process,
  ``getrusage``). CPU per request does not depend on how busy the machine is, which
  throughput on a shared machine does.

Servers run in their own processes (``arrowinfer serve``, or the bare Flight echo of
``echo_server.py``) so that client and server do not share a GIL.
"""

from __future__ import annotations

import math
import os
import queue
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

# Servers run as `python -m ...` with this copy of arrowinfer first on their path, clone or install.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

#: Sends one request; returns a future that completes with its result.
Submit = Callable[[], "Future[object]"]


@dataclass
class Measurement:
    """One cell of a benchmark: a setup at one concurrency."""

    name: str
    concurrency: int
    requests_per_s: float
    rows_per_s: float
    mb_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    windows: int
    stable: bool
    server_cpu_us: float = float("nan")  # per request; NaN when no server process was given
    client_cpu_us: float = float("nan")  # per request, this (client) process
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def median_us(run: Callable[..., object], repeat: int) -> float:
    """The median wall time of ``repeat`` calls of ``run``, in microseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def _process_cpu_s(pid: int) -> float:
    """utime + stime of one process, all its threads, in seconds (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """A process and every process below it (a server's workers), from /proc."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def server_cpu_s(pids: tuple[int, ...]) -> float:
    """CPU seconds used so far by these processes and all their descendants."""
    return sum(_process_cpu_s(p) for pid in pids for p in descendants(pid))


def client_cpu_s() -> float:
    """CPU seconds used so far by this process (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    name: str,
    submit: Submit,
    *,
    server_pids: tuple[int, ...] = (),
    concurrency: int = 1,
    rows: int = 1,
    payload_bytes: int = 0,
    warmup_s: float = 0.5,
    window_s: float = 1.0,
    max_windows: int = 6,
    tolerance: float = 0.10,
    blocking: bool = False,
) -> Measurement:
    """Keep ``concurrency`` requests in flight; measure windows until three agree.

    ``server_pids``: the server's processes, whose CPU time (with their descendants') is
    divided by the requests completed in the stable windows.
    ``blocking``: ``submit`` returns only when its request is done (its future already
    resolved), so each request in flight gets its own sending thread: a client whose
    threads each send a request and wait for it, in a loop, as the Triton peer's bench
    (../shared/peers/triton/bench.py) drives Triton. Otherwise up to 4 threads submit.
    """
    lock = threading.Lock()
    latencies: list[float] = []
    completions = [0]
    errors: list[BaseException] = []
    stop = threading.Event()
    tokens: queue.SimpleQueue[bool] = queue.SimpleQueue()

    def done(future: Future[object], start: float) -> None:
        elapsed = time.perf_counter() - start
        if future.exception() is not None:
            errors.append(future.exception())  # type: ignore[arg-type]
            stop.set()
        with lock:
            latencies.append(elapsed)
            completions[0] += 1
        tokens.put(True)  # a sender thread sends the next one, not the transport's reader

    def sender() -> None:
        while tokens.get() and not stop.is_set():
            start = time.perf_counter()
            try:
                future = submit()
            except Exception as err:  # noqa: BLE001 - reported after the run
                errors.append(err)
                stop.set()
                return
            future.add_done_callback(partial(done, start=start))

    threads = concurrency if blocking else min(concurrency, 4)
    senders = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for thread in senders:
        thread.start()
    for _ in range(concurrency):
        tokens.put(True)
    time.sleep(warmup_s)
    # slow cells (32 MB over gRPC) get windows long enough to hold several requests
    waited = time.monotonic()
    while completions[0] < concurrency and not stop.is_set():
        if time.monotonic() - waited > 120:
            stop.set()
            errors.append(TimeoutError(f"{name}: no request completed in 120 s"))
            break
        time.sleep(0.01)
    with lock:
        mean_latency = float(np.mean(latencies)) if latencies else 0.0
    window_s = max(window_s, 4 * mean_latency)
    # (rate, latencies, completions, server CPU s, client CPU s) per window
    windows: list[tuple[float, list[float], int, float, float]] = []
    stable = False
    while len(windows) < max_windows and not stop.is_set():
        with lock:
            latencies.clear()
            completions[0] = 0
        t0 = time.perf_counter()
        server0, client0 = server_cpu_s(server_pids), client_cpu_s()
        time.sleep(window_s)
        with lock:
            count, window_latencies = completions[0], list(latencies)
        server1, client1 = server_cpu_s(server_pids), client_cpu_s()
        windows.append(
            (
                count / (time.perf_counter() - t0),
                window_latencies,
                count,
                server1 - server0,
                client1 - client0,
            )
        )
        if len(windows) >= 3:
            rates = [w[0] for w in windows[-3:]]
            if max(rates) <= min(rates) * (1 + tolerance) and min(rates) > 0:
                stable = True
                break
    stop.set()
    for _ in senders:
        tokens.put(False)
    for thread in senders:
        thread.join(60)
    if errors:
        raise RuntimeError(f"{name}: a request failed: {errors[0]!r}") from errors[0]
    used = windows[-3:]
    rate = float(np.mean([w[0] for w in used]))
    lat = np.array([x for w in used for x in w[1]]) * 1e3
    if lat.size == 0:
        lat = np.array([float("nan")])
    p50, p90, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 90, 95, 99))
    completed = sum(w[2] for w in used)
    per_request = 1e6 / completed if completed else float("nan")
    server_us = sum(w[3] for w in used) * per_request if server_pids else float("nan")
    client_us = sum(w[4] for w in used) * per_request
    return Measurement(
        name,
        concurrency,
        rate,
        rate * rows,
        rate * payload_bytes / 1e6,
        p50,
        p90,
        p95,
        p99,
        len(windows),
        stable,
        server_us,
        client_us,
    )


@contextmanager
def process(
    args: list[str], ready: str, *, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[str], re.Match[str]]]:
    """Start a server process; wait for a stdout line matching ``ready``; stop it after.

    The server gets its own session, as a service (or the Triton peer, started apart) has.
    Linux's scheduler shares CPU fairly between sessions (``sched_autogroup``), then between
    the threads of each: a server in the client's session competes with each of the
    client's 32 threads one for one. That cost arrowinfer's HTTP server 40 % of its
    requests/s at 16-32 in flight (4 KB: ~2,750 against 4,300-4,900) and raised the client's
    CPU per request from ~200 to ~320 us, while Triton, in its own session, kept its share.
    """
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p
            ),
            **(env or {}),
        },
    )
    drain: threading.Thread | None = None
    try:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.search(ready, line)
            if match:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args}: not ready after {timeout} s")
        else:
            raise RuntimeError(f"{args}: exited with {proc.wait()} before it was ready")
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # keep the pipe drained
        drain.start()
        yield proc, match
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.join(5)  # EOF: the process is gone
        if proc.stdout is not None and (drain is None or not drain.is_alive()):
            proc.stdout.close()


@contextmanager
def arrowinfer_server(repository: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``arrowinfer serve REPO`` on a free port; yields the process and its location."""
    args = [
        sys.executable,
        "-m",
        "arrowinfer.cli",
        "serve",
        str(repository),
        "--port",
        "0",
        "--kserve-port",
        "-1",
        "--http-port",
        "-1",
        "--metrics-port",
        "-1",
        *extra,
    ]
    with process(args, r"serving .* on (\S+)") as (proc, match):
        yield proc, match.group(1)


@contextmanager
def echo_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The bare pyarrow Flight echo server (no arrowinfer code); yields process, location."""
    with process([sys.executable, "-m", "arrowinfer.bench.echo_server"], r"listening on (\S+)") as (
        proc,
        match,
    ):
        yield proc, match.group(1)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss(pid: int) -> None:
    """Start a new peak-RSS measurement (Linux: clear_refs 5 resets VmHWM)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def markdown_table(
    rows: list[Measurement],
    columns: tuple[str, ...] = (
        "concurrency",
        "requests_per_s",
        "rows_per_s",
        "mb_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "server_cpu_us",
        "client_cpu_us",
        "stable",
    ),
) -> str:
    """Measurements as a Markdown table."""
    head = "| name | " + " | ".join(columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    body = []
    for m in rows:
        cells = []
        for c in columns:
            v = getattr(m, c)
            if isinstance(v, float):
                if math.isnan(v):
                    cells.append("")
                else:
                    cells.append(f"{v:,.0f}" if c.endswith("_us") else f"{v:,.2f}")
            else:
                cells.append(str(v))
        body.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
