"""Every transport, one model, one run: what Arrow transports buy over gRPC/protobuf.

Transports (client and servers in separate processes on this machine):

- ``in-process``: the model run in the client process (``LocalTransport``), no transport;
- ``flight-tcp`` / ``flight-unix``: arrowinfer over Arrow Flight, TCP or a Unix socket;
- ``shm``: arrowinfer over shared memory (control over Flight TCP);
- ``kserve-grpc``: the same server's KServe v2 endpoint, driven by ``tritonclient.grpc``
  (as SONIC does today), including ``set_data_from_numpy`` and ``as_numpy``;
- ``kserve-http``: its KServe v2 HTTP/REST endpoint, driven by ``tritonclient.http`` (one
  client per thread) with Triton's binary tensor data extension; ``kserve-http-json``: the
  same with JSON tensors (up to 256 KB: beyond, JSON numbers cost far more than transport);
- references: ``flight-echo`` (a bare pyarrow Flight echo server, the Flight limit) and
  ``numpy-copy`` (one ``np.copyto`` of the payload, the memory limit);
- with ``--triton-url``: the real NVIDIA Triton (``../shared/peers/triton``) over gRPC
  (``triton-grpc``) and over gRPC + system shared memory (``triton-shm``); with
  ``--triton-http-url`` over HTTP with binary tensor data (``triton-http``).

The sweep: ``identity`` with 1, 64, 1024 and 8192 rows of 4 KiB (4 KB to 32 MB per
request) at 1 to 32 requests in flight (perf_analyzer's async concurrency), and one-row
``facile`` requests one at a time. Writes ``transports.json``, ``transports.md`` and two
PNG plots into ``--out`` (default ``./arrowinfer-bench-results``); with ``--update-readme``
also the summary table into README.md between its markers (a clone's; the maintainers'
``make bench`` passes ``--out benchmarks/results --update-readme``).

Usage: ``arrowinfer bench [--quick] [--triton-url HOST:PORT] [--triton-http-url HOST:PORT]
[--out DIR] [--update-readme]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from .. import tensors
from ..client import Client, FlightTransport, LocalTransport, conform
from ..examples import write_example_repository
from .harness import Measurement, arrowinfer_server, echo_server, markdown_table, measure
from .machine import describe, markdown
from .requests import make_request, one_intra_op_thread

#: Where results go unless ``--out`` says otherwise: a new directory under the current one,
#: never the tracked ``benchmarks/results`` of a clone.
RESULTS = Path("arrowinfer-bench-results")
ROW_BYTES = 4096
SIZES = {"4 KB": 1, "256 KB": 64, "4 MB": 1024, "32 MB": 8192}
QUICK_SIZES = ("4 KB", "4 MB", "32 MB")
CONCURRENCY = (1, 4, 16, 32)
QUICK_CONCURRENCY = (1, 4)
MAX_IN_FLIGHT_BYTES = 512 * 2**20  # 32 requests of 32 MB would be 1 GB in flight, per copy
JSON_SIZES = ("4 KB", "256 KB")  # beyond, JSON tensors measure number formatting only
README_BEGIN = "<!-- transports:begin -->"
README_END = "<!-- transports:end -->"

Submit = Callable[[], "Future[object]"]
_REGIONS = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _done(value: object = None) -> Future[object]:
    future: Future[object] = Future()
    future.set_result(value)
    return future


def _checked(submit: Submit, check: Callable[[object], None]) -> Submit:
    """Run one request and check its result before the submit function is timed."""
    check(submit().result(timeout=120))
    return submit


def _kserve(
    url: str, model: str, x: np.ndarray, output: str, *, shm: bool = False
) -> tuple[Submit, Callable[[], None]]:
    """tritonclient.grpc async_infer, as SONIC's clients do (optionally with system shm)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    out = grpcclient.InferRequestedOutput(output)
    cleanup = client.close
    if shm:
        import tritonclient.utils.shared_memory as shmlib

        tag = f"arrowinfer-bench-{os.getpid()}-{next(_REGIONS)}"  # one pair of regions per cell
        h_in = shmlib.create_shared_memory_region(tag + "-in", "/" + tag + "-in", x.nbytes)
        h_out = shmlib.create_shared_memory_region(tag + "-out", "/" + tag + "-out", x.nbytes)
        client.register_system_shared_memory(tag + "-in", "/" + tag + "-in", x.nbytes)
        client.register_system_shared_memory(tag + "-out", "/" + tag + "-out", x.nbytes)
        inp.set_shared_memory(tag + "-in", x.nbytes)
        out.set_shared_memory(tag + "-out", x.nbytes)

        def cleanup() -> None:
            client.unregister_system_shared_memory(tag + "-in")
            client.unregister_system_shared_memory(tag + "-out")
            shmlib.destroy_shared_memory_region(h_in)
            shmlib.destroy_shared_memory_region(h_out)
            client.close()

    def submit() -> Future[object]:
        future: Future[object] = Future()
        if shm:
            shmlib.set_shared_memory_region(h_in, [x])
        else:
            inp.set_data_from_numpy(x)

        def callback(result: Any, error: Any) -> None:
            if error is not None:
                future.set_exception(error)
            elif shm:
                future.set_result(shmlib.get_contents_as_numpy(h_out, np.float32, x.shape))
            else:
                future.set_result(result.as_numpy(output))

        client.async_infer(model, [inp], callback, outputs=[out])
        return future

    return submit, cleanup


def _kserve_http(
    url: str,
    model: str,
    x: np.ndarray,
    input_name: str,
    output: str,
    *,
    binary: bool,
    pool: bool = True,
) -> tuple[Submit, Callable[[], None]]:
    """tritonclient.http infer, one client per thread (as the Triton peer's bench does).

    ``binary``: Triton's binary tensor data extension both ways, else JSON tensors. No
    compression (tritonclient.http asks for none unless told). ``pool``: each request is
    handed to a pool of 32 threads; else it runs in the submitting thread, and the future
    returned is already resolved (``measure(..., blocking=True)``).
    """
    import tritonclient.http as httpclient

    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()
    executor = (
        ThreadPoolExecutor(max_workers=max(CONCURRENCY), thread_name_prefix="kserve-http")
        if pool
        else None
    )

    def one() -> np.ndarray:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpclient.InferenceServerClient(url)
            with lock:
                clients.append(client)
        inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput(output, binary_data=binary)
        return client.infer(model, [inp], outputs=[out]).as_numpy(output)

    def inline() -> Future[object]:
        future: Future[object] = Future()
        try:
            future.set_result(one())
        except Exception as err:  # noqa: BLE001 - the harness reports it, as a pool's would
            future.set_exception(err)
        return future

    def cleanup() -> None:
        if executor is not None:
            executor.shutdown(wait=True)
        for client in clients:
            client.close()

    return (inline if executor is None else lambda: executor.submit(one)), cleanup


class Bench:
    """The servers, clients and submit functions of one run."""

    def __init__(
        self,
        repository: Path,
        stack: contextlib.ExitStack,
        triton_url: str | None,
        triton_http_url: str | None = None,
    ):
        self.repository = repository
        self.kserve_port = _free_port()
        self.http_port = _free_port()
        tcp_server, self.tcp = stack.enter_context(
            arrowinfer_server(
                repository,
                *("--kserve-port", str(self.kserve_port), "--http-port", str(self.http_port)),
            )
        )
        self.triton_http_url = triton_http_url
        self.socket = Path(tempfile.mkdtemp()) / "flight.sock"
        unix_server, _ = stack.enter_context(
            arrowinfer_server(repository, "--unix-socket", str(self.socket))
        )
        echo, self.echo = stack.enter_context(echo_server())
        #: whose CPU a transport's requests cost (the real Triton's runs elsewhere: none)
        self.server_pids = {
            "flight-tcp": (tcp_server.pid,),
            "shm": (tcp_server.pid,),
            "kserve-grpc": (tcp_server.pid,),
            "kserve-http": (tcp_server.pid,),
            "kserve-http-json": (tcp_server.pid,),
            "flight-unix": (unix_server.pid,),
            "flight-echo": (echo.pid,),
        }
        self.triton_url = triton_url
        self.clients = {
            "flight-tcp": stack.enter_context(Client(self.tcp, retries=0)),
            "flight-unix": stack.enter_context(Client(f"grpc+unix://{self.socket}", retries=0)),
            "shm": stack.enter_context(Client(self.tcp.replace("grpc://", "shm://"), retries=0)),
        }
        self.local = LocalTransport(repository)
        stack.callback(self.local.close)
        self.echo_transport = FlightTransport(self.echo)
        stack.callback(self.echo_transport.close)
        self.cleanups: list[Callable[[], None]] = []
        stack.callback(lambda: [c() for c in self.cleanups])

    def transports(self) -> list[str]:
        names = ["in-process", "flight-tcp", "flight-unix", "shm", "kserve-grpc", "kserve-http"]
        names.append("kserve-http-json")
        if self.triton_url:
            names += ["triton-grpc", "triton-shm"]
        if self.triton_http_url:
            names.append("triton-http")
        return [*names, "flight-echo", "numpy-copy"]

    def identity(self, transport: str, rows: int) -> Submit:
        """A checked submit function sending ``rows`` rows of 4 KiB to ``identity``."""
        x = np.random.default_rng(rows).random((rows, ROW_BYTES // 4), dtype=np.float32)
        batch = conform(
            pa.record_batch({"INPUT0": tensors.from_numpy(x)}),
            self.local.schema("identity", None),
            model="identity",
        )

        def same(result: object) -> None:
            got = result if isinstance(result, np.ndarray) else tensors.to_numpy(result.column(0))  # type: ignore[attr-defined]
            if not np.array_equal(np.asarray(got).reshape(x.shape), x):
                raise AssertionError(f"{transport}: identity returned different values")

        if transport == "numpy-copy":
            dst = np.empty_like(x)

            def copy() -> Future[object]:
                np.copyto(dst, x)
                return _done(dst)

            return copy
        if transport == "in-process":
            return _checked(lambda: self.local.submit("identity", None, batch), same)
        if transport == "flight-echo":
            return _checked(lambda: self.echo_transport.submit("echo", None, batch), same)
        if transport in self.clients:
            client = self.clients[transport]
            return _checked(lambda: client.infer_async("identity", batch), same)
        if transport == "kserve-grpc":
            submit, cleanup = _kserve(f"127.0.0.1:{self.kserve_port}", "identity", x, "OUTPUT0")
        elif transport.startswith("kserve-http"):
            submit, cleanup = _kserve_http(
                f"127.0.0.1:{self.http_port}",
                "identity",
                x,
                "INPUT0",
                "OUTPUT0",
                binary=transport == "kserve-http",
            )
        elif transport == "triton-http":  # one flat FP32 tensor, as for its gRPC rows
            assert self.triton_http_url is not None
            submit, cleanup = _kserve_http(
                self.triton_http_url, "identity", x.reshape(-1), "INPUT0", "OUTPUT0", binary=True
            )
        else:  # the real Triton's identity takes one flat FP32 tensor (max_batch_size 0)
            assert self.triton_url is not None
            submit, cleanup = _kserve(
                self.triton_url, "identity", x.reshape(-1), "OUTPUT0", shm=transport == "triton-shm"
            )
        self.cleanups.append(cleanup)
        return _checked(submit, same)

    def facile(self, transport: str) -> Submit | None:
        """One-row facile requests (no facile on the Triton peer, nor echo/copy rows)."""
        request = make_request("facile", 1)
        batch = conform(request, self.local.schema("facile", None), model="facile")
        if transport == "in-process":
            return lambda: self.local.submit("facile", None, batch)
        if transport in self.clients:
            client = self.clients[transport]
            return lambda: client.infer_async("facile", batch)
        if transport == "kserve-grpc":
            x = tensors.to_numpy(batch.column(0))
            submit, cleanup = _kserve_facile(f"127.0.0.1:{self.kserve_port}", x)
            self.cleanups.append(cleanup)
            return submit
        if transport.startswith("kserve-http"):
            x = tensors.to_numpy(batch.column(0))
            submit, cleanup = _kserve_http(
                f"127.0.0.1:{self.http_port}",
                "facile",
                x,
                "hits",
                "energy",
                binary=transport == "kserve-http",
            )
            self.cleanups.append(cleanup)
            return submit
        return None


def _kserve_facile(url: str, x: np.ndarray) -> tuple[Submit, Callable[[], None]]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("hits", list(x.shape), "FP32")

    def submit() -> Future[object]:
        future: Future[object] = Future()
        inp.set_data_from_numpy(x)

        def callback(result: Any, error: Any) -> None:  # tritonclient passes keywords
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result.as_numpy("energy"))

        client.async_infer("facile", [inp], callback)
        return future

    return submit, client.close


def _cells(bench: Bench, quick: bool) -> Iterator[tuple[str, str, int, int]]:
    sizes = QUICK_SIZES if quick else tuple(SIZES)
    for label in sizes:
        # --quick: one concurrency sweep (at 4 MB, for the latency plot), one in flight elsewhere
        levels = (QUICK_CONCURRENCY if label == "4 MB" else (1,)) if quick else CONCURRENCY
        for concurrency in levels:
            if concurrency * SIZES[label] * ROW_BYTES > MAX_IN_FLIGHT_BYTES:
                continue
            for transport in bench.transports():
                if transport == "numpy-copy" and concurrency > 1:
                    continue
                if transport == "kserve-http-json" and label not in JSON_SIZES:
                    continue
                yield transport, label, SIZES[label], concurrency


def run(args: argparse.Namespace) -> dict[str, Any]:
    cell: dict[str, Any] = (
        {"warmup_s": 0.2, "window_s": 0.4, "max_windows": 4}
        if args.quick
        else {"warmup_s": 0.5, "window_s": 1.0, "max_windows": 6}
    )
    repository = one_intra_op_thread(write_example_repository(Path(tempfile.mkdtemp()) / "repo"))
    rows: list[Measurement] = []
    with contextlib.ExitStack() as stack:
        bench = Bench(repository, stack, args.triton_url, args.triton_http_url)
        cells = list(_cells(bench, args.quick))
        latency = [
            t
            for t in bench.transports()
            if t not in ("flight-echo", "numpy-copy", "triton-grpc", "triton-shm", "triton-http")
        ]
        with tqdm(total=len(cells) + len(latency), unit="cell", desc="transports") as bar:
            for transport, label, n, concurrency in cells:
                bar.set_postfix_str(f"{transport} {label} x{concurrency}")
                m = measure(
                    f"{transport} identity {label}",
                    bench.identity(transport, n),
                    server_pids=bench.server_pids.get(transport, ()),
                    concurrency=concurrency,
                    rows=n,
                    payload_bytes=n * ROW_BYTES,
                    **cell,
                )
                m.extra.update(transport=transport, size=label, model="identity")
                rows.append(m)
                bar.update()
            for transport in latency:
                submit = bench.facile(transport)
                if submit is not None:
                    m = measure(
                        f"{transport} facile 1 row",
                        submit,
                        server_pids=bench.server_pids.get(transport, ()),
                        rows=1,
                        **cell,
                    )
                    m.extra.update(transport=transport, size="1 row", model="facile")
                    rows.append(m)
                bar.update()
    return {
        "machine": describe(),
        "quick": args.quick,
        "triton_url": args.triton_url,
        "triton_http_url": args.triton_http_url,
        "rows": [m.as_dict() for m in rows],
        "targets": targets(rows),
    }


def _find(
    rows: list[Measurement], transport: str, size: str, concurrency: int = 1
) -> Measurement | None:
    return next(
        (
            m
            for m in rows
            if m.extra.get("transport") == transport
            and m.extra.get("size") == size
            and m.concurrency == concurrency
        ),
        None,
    )


def _best(rows: list[Measurement], transport: str, size: str) -> float | None:
    values = [
        m.mb_per_s
        for m in rows
        if m.extra.get("transport") == transport and m.extra.get("size") == size
    ]
    return max(values) if values else None


def targets(rows: list[Measurement]) -> dict[str, float]:
    """The issue's ratios, from numbers measured in this run (best over concurrency)."""
    out: dict[str, float] = {}

    def ratio(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b:
            out[name] = a / b

    for size in ("4 MB", "32 MB"):
        kserve = _best(rows, "kserve-grpc", size)
        ratio(
            f"{size}: flight-tcp / kserve-grpc throughput (>= 2)",
            _best(rows, "flight-tcp", size),
            kserve,
        )
        ratio(f"{size}: shm / kserve-grpc throughput (>= 10)", _best(rows, "shm", size), kserve)
        ratio(
            f"{size}: shm / flight-tcp throughput (>= 5)",
            _best(rows, "shm", size),
            _best(rows, "flight-tcp", size),
        )
        ratio(
            f"{size}: flight-tcp / bare flight-echo (share of the Flight limit, >= 0.8)",
            _best(rows, "flight-tcp", size),
            _best(rows, "flight-echo", size),
        )
        ratio(
            f"{size}: shm / one numpy copy (share of the memory limit; >= 0.25 is <= 4 copies)",
            _best(rows, "shm", size),
            _best(rows, "numpy-copy", size),
        )
        ratio(
            f"{size}: kserve-grpc / real Triton gRPC (>= 0.7)",
            kserve,
            _best(rows, "triton-grpc", size),
        )
        ratio(
            f"{size}: shm / real Triton gRPC + shm (>= 1)",
            _best(rows, "shm", size),
            _best(rows, "triton-shm", size),
        )
    for size in SIZES:  # the HTTP target holds for every payload
        ratio(
            f"{size}: kserve-http / real Triton HTTP, binary tensor data (>= 1)",
            _best(rows, "kserve-http", size),
            _best(rows, "triton-http", size),
        )
    flight_1, kserve_1 = _find(rows, "flight-tcp", "1 row"), _find(rows, "kserve-grpc", "1 row")
    if flight_1 and kserve_1:
        out["facile 1 row: flight-tcp p50 / kserve-grpc p50 (<= 1)"] = (
            flight_1.p50_ms / kserve_1.p50_ms
        )
    return out


def table(report: dict[str, Any]) -> str:
    """The README table: MB/s by transport and payload at one request in flight, and 1-row p50."""
    rows = [Measurement(**r) for r in report["rows"]]
    transports = list(dict.fromkeys(str(m.extra["transport"]) for m in rows))
    sizes = [s for s in SIZES if any(m.extra.get("size") == s for m in rows)]
    lines = [
        "| transport | " + " | ".join(f"{s} MB/s" for s in sizes) + " | 1-row p50 ms |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    for t in transports:
        cells = []
        for s in sizes:
            m = _find(rows, t, s)
            cells.append(f"{m.mb_per_s:,.0f}" if m else "")
        one = _find(rows, t, "1 row")
        cells.append(f"{one.p50_ms:.2f}" if one else "")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(fig: Any, ax: Any, path: Path, **labels: str) -> Path:
    """Log-log axes with ``labels``, a legend and a grid; the figure written to ``path``."""
    ax.set(xscale="log", yscale="log", **labels)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib not installed: no plots (pip install 'arrowinfer[bench]')\n")
        return []
    rows = [Measurement(**r) for r in report["rows"]]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in dict.fromkeys(str(m.extra["transport"]) for m in rows):
        points = [(SIZES[s] * ROW_BYTES, m.mb_per_s) for s in SIZES if (m := _find(rows, t, s))]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=t)
    written.append(
        _save(
            fig,
            ax,
            out / "transports_throughput.png",
            xlabel="request payload (bytes)",
            ylabel="MB/s (one request in flight)",
            title="identity: throughput vs payload",
        )
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in dict.fromkeys(str(m.extra["transport"]) for m in rows):
        points = [
            (m.concurrency, m.p50_ms)
            for m in rows
            if m.extra.get("transport") == t and m.extra.get("size") == "4 MB"
        ]
        if len(points) > 1:
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=t)
    written.append(
        _save(
            fig,
            ax,
            out / "transports_latency.png",
            xlabel="requests in flight",
            ylabel="p50 latency (ms)",
            title="identity 4 MB: latency vs concurrency",
        )
    )
    return written


def write(report: dict[str, Any], out: Path, readme: Path | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "transports.json").write_text(json.dumps(report, indent=2))
    rows = [Measurement(**r) for r in report["rows"]]
    command = (
        "arrowinfer bench"
        + (" --quick" if report["quick"] else "")
        + (" --triton-url URL" if report["triton_url"] else "")
    )
    summary = "\n".join(
        [
            (
                f"`{command}` on the machine below. MB/s counts the request payload once "
                "(10^6 B), one request in flight; 1-row p50 is `facile` with one 15-feature "
                "hit, one request at a time."
            ),
            "",
            table(report),
            "",
            "| target (ratios measured in the same run, best over concurrency) | measured |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in report["targets"].items()),
        ]
    )
    text = "\n".join(
        [
            "# Transport comparison",
            "",
            summary,
            "",
            "## Every cell",
            "",
            markdown_table(rows),
            "",
            markdown(report["machine"]),
            "",
        ]
    )
    (out / "transports.md").write_text(text)
    plots(report, out)
    if readme is not None and readme.exists():
        current = readme.read_text()
        if README_BEGIN in current and README_END in current:
            machine = report["machine"]
            block = (
                f"{README_BEGIN}\n{summary}\n\nMachine: {machine.get('cpu')}, "
                f"{machine.get('cores')} cores; full table and plots in "
                f"`{_shown(out / 'transports.md', readme.parent)}`.\n{README_END}"
            )
            readme.write_text(
                re.sub(
                    re.escape(README_BEGIN) + ".*?" + re.escape(README_END),
                    lambda _: block,
                    current,
                    flags=re.DOTALL,
                )
            )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arrowinfer bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer cells and short windows: a first look in under two minutes",
    )
    parser.add_argument(
        "--triton-http-url",
        metavar="HOST:PORT",
        help="also measure a real Triton server's HTTP endpoint, binary tensor data",
    )
    parser.add_argument(
        "--triton-url",
        metavar="HOST:PORT",
        help="also measure a real Triton server's gRPC endpoint (see ../shared/peers/triton)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="results directory, created if missing (default: ./%(default)s)",
    )
    parser.add_argument(
        "--update-readme",
        metavar="README",
        nargs="?",
        const=Path("README.md"),
        type=Path,
        help="also write the summary table into this README.md (default: ./README.md) "
        "between its transports markers; nothing outside --out is written without it",
    )
    args = parser.parse_args(argv)
    if args.update_readme is not None and not args.update_readme.is_file():
        parser.error(f"--update-readme: no such file {str(args.update_readme)!r}")
    report = run(args)
    sys.stdout.write(write(report, args.out, args.update_readme) + "\n")
    return 0


def _shown(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when it is under it (what a README links)."""
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
