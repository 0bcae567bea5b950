"""The supervisor: worker processes started, restarted and balanced over, behind one set of ports.

See the package docstring for how ports, balancing, supervision and metrics work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pyarrow import flight

from .._metrics import start_metrics_server
from ._child import COMMAND
from ._collector import PoolCollector, Scrape, WorkerState
from ._relay import Relay, listen
from ._statistics import merge_statistics

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

#: A worker that dies within this many seconds of its start counts as failing at once.
_QUICK_DEATH_S = 10.0

#: The longest pause before a worker that keeps dying is started again.
_MAX_RESTART_DELAY_S = 30.0

#: Seconds the parent waits for one worker's statistics at a scrape.
_STATS_TIMEOUT_S = 5.0


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0
    ready: bool = False
    starts: int = 0
    flight_target: str | tuple[str, int] | None = None
    kserve_target: tuple[str, int] | None = None
    client: flight.FlightClient | None = None
    connections: int = 0
    last_stats: list[dict[str, Any]] = field(default_factory=list)


class WorkerPool:
    """``workers`` server processes behind one Flight port, one KServe port and one metrics port.

    The same surface as :class:`~arrowinfer.server.Server` for the command line:
    :attr:`location`, :attr:`port`, :meth:`wait`, :meth:`stop`, and a context manager. The
    constructor returns once every worker is ready (models loaded).

    Parameters
    ----------
    repository
        The model repository directory.
    workers
        Number of worker processes (each loads every model).
    host, port, kserve_port, metrics_port
        As for :class:`~arrowinfer.server.Server`; port 0 picks a free port (the parent
        binds it, so the workers need not share it). ``kserve_port``/``metrics_port`` None
        disable them.
    start_timeout
        Seconds a worker may take to load its models before the start fails.
    **server_options
        Passed to every worker's :class:`~arrowinfer.server.Server` as JSON:
        ``allow_client_shm``, ``device``, ``models``, ``tls_cert``, ``tls_key``,
        ``auth_tokens`` (file paths as strings, tokens as strings).

    Raises
    ------
    OSError
        If a public port cannot be bound.
    RuntimeError
        If a worker exits, or is not ready in time, while the pool starts.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        workers: int,
        host: str = "127.0.0.1",
        port: int = 8815,
        kserve_port: int | None = 8001,
        metrics_port: int | None = 8002,
        start_timeout: float = 600.0,
        **server_options: Any,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.repository = str(repository)
        self.host = host
        self._options = {k: _jsonable(v) for k, v in server_options.items()}
        tls = server_options.get("tls_cert") is not None
        allow_shm = bool(server_options.get("allow_client_shm", False))
        # a worker sees the relay, not the client: it cannot learn the client's uid, so it
        # cannot check that a region is the client's own (docs/security.md); shared memory
        # through workers only where the operator trusts every client (allow_client_shm)
        self._shm = allow_shm
        tokens = sorted(server_options.get("auth_tokens") or [])
        self._call_options = flight.FlightCallOptions(
            timeout=_STATS_TIMEOUT_S,
            headers=[(b"authorization", f"Bearer {tokens[0]}".encode())] if tokens else None,
        )
        self._tls = tls
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._started = False
        self._failure: str | None = None
        self._retired: list[dict[str, Any]] = []
        self._relays: set[Relay] = set()
        self._next = 0
        self._dir = tempfile.mkdtemp(prefix="arrowinfer-workers-")
        self._listeners: list[socket.socket] = []
        self._metrics_server: Any = None
        self._threads: list[threading.Thread] = []
        self.workers = [_Worker(i) for i in range(workers)]
        try:
            self._flight_listener = listen(host, port)
            self._listeners.append(self._flight_listener)
            self.kserve_port: int | None = None
            self._kserve_listener: socket.socket | None = None
            if kserve_port is not None:
                self._kserve_listener = listen(host, kserve_port)
                self._listeners.append(self._kserve_listener)
                self.kserve_port = self._kserve_listener.getsockname()[1]
            self.metrics_port: int | None = None
            if metrics_port is not None:  # before the workers: /v2/health/ready says 503
                registry = CollectorRegistry(auto_describe=False)
                registry.register(PoolCollector(self.scrape))
                self._metrics_server, self.metrics_port = start_metrics_server(
                    registry, host, metrics_port, ready=self.ready
                )
            for worker in self.workers:
                thread = threading.Thread(
                    target=self._supervise, args=(worker,), name=f"worker-{worker.index}"
                )
                thread.start()
                self._threads.append(thread)
            self._wait_started(start_timeout)
        except BaseException:
            self.stop()
            raise
        for listener, kind in (
            (self._flight_listener, "flight"),
            (self._kserve_listener, "kserve"),
        ):
            if listener is not None:
                threading.Thread(
                    target=self._accept, args=(listener, kind), name=f"accept-{kind}", daemon=True
                ).start()
        scheme = "grpc+tls" if tls else "grpc"
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.location = f"{scheme}://{shown}:{self.port}"
        log.info("%d workers behind Flight %s", workers, self.location)
        if self.kserve_port is not None:
            log.info("KServe v2 gRPC listening on %s:%d", host, self.kserve_port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    @property
    def port(self) -> int:
        """The public Flight TCP port."""
        return int(self._flight_listener.getsockname()[1])

    def ready(self) -> bool:
        """Every worker has started once, one serves now, and the pool is not stopping."""
        with self._lock:
            serving = any(w.ready for w in self.workers)
        return self._started and serving and not self._stopping.is_set()

    # -- supervision ---------------------------------------------------------------------

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(w.ready for w in self.workers):
                if self._failure is not None:
                    raise RuntimeError(self._failure)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the workers were not ready after {timeout} s")
                self._changed.wait(min(left, 1.0))
            self._started = True

    def _worker_config(self, worker: _Worker) -> dict[str, Any]:
        if self._tls:  # Flight has no TLS over Unix sockets
            flight_listen: dict[str, Any] = {"port": 0}
        else:
            flight_listen = {"unix_socket": os.path.join(self._dir, f"worker-{worker.index}.sock")}
        return {
            "index": worker.index,
            "repository": self.repository,
            "listen": {
                **flight_listen,
                "kserve_port": 0 if self._kserve_listener is not None else None,
            },
            "shm": self._shm,
            "options": self._options,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }

    def _spawn(self, worker: _Worker) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[3])  # arrowinfer importable from a clone
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-c", COMMAND],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C goes to the parent only
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(self._worker_config(worker)).encode() + b"\n")
        process.stdin.flush()
        return process

    def _run_once(self, worker: _Worker) -> tuple[bool, int]:
        """Start a worker, serve through it until it exits; (was it ever ready, exit status)."""
        with self._lock:
            if self._stopping.is_set():
                return False, 0
            process = self._spawn(worker)
            worker.process, worker.pid = process, process.pid
            worker.starts += 1
        assert process.stdout is not None
        line = process.stdout.readline()
        ready = False
        if line:
            try:
                info = json.loads(line)
                client = self._stats_client(info["location"])
            except (ValueError, KeyError, flight.FlightError) as err:
                log.error("worker %d: unexpected start message %r: %s", worker.index, line, err)
                process.terminate()
            else:
                location = info["location"]
                with self._changed:
                    worker.client = client
                    worker.flight_target = (
                        location.removeprefix("grpc+unix://")
                        if location.startswith("grpc+unix://")
                        else ("127.0.0.1", int(location.rsplit(":", 1)[1]))
                    )
                    kport = info.get("kserve_port")
                    worker.kserve_target = ("127.0.0.1", int(kport)) if kport else None
                    worker.ready = ready = True
                    self._changed.notify_all()
                log.info("worker %d (pid %d) ready", worker.index, process.pid)
            process.stdout.read()  # until the worker exits (it writes nothing more)
        status = process.wait()
        with self._changed:
            worker.ready = False
            worker.flight_target = worker.kserve_target = None
            if worker.last_stats:  # keep its counts: counters must not go down
                self._retired = merge_statistics([self._retired, worker.last_stats])
                worker.last_stats = []
            client, worker.client = worker.client, None
            self._changed.notify_all()
        if client is not None:
            client.close()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        return ready, status

    def _supervise(self, worker: _Worker) -> None:
        quick_deaths = 0
        while not self._stopping.is_set():
            began = time.monotonic()
            ready, status = self._run_once(worker)
            if self._stopping.is_set():
                return
            if not self._started:
                with self._changed:
                    self._failure = (
                        f"worker {worker.index} exited with status {status} "
                        f"{'after' if ready else 'before'} it was ready (see its log above)"
                    )
                    self._changed.notify_all()
                return
            quick = time.monotonic() - began < _QUICK_DEATH_S
            quick_deaths = quick_deaths + 1 if quick else 0
            delay = min(_MAX_RESTART_DELAY_S, 0.25 * 2 ** max(quick_deaths - 1, 0))
            log.error(
                "worker %d (pid %d) exited with status %d; restarting it in %.2g s",
                worker.index,
                worker.pid,
                status,
                delay,
            )
            if self._stopping.wait(delay):
                return

    def _stats_client(self, location: str) -> flight.FlightClient:
        if location.startswith("grpc+tls://"):
            # our own child on loopback, whatever name its certificate carries
            return flight.FlightClient(location, disable_server_verification=True)
        return flight.FlightClient(location)

    # -- relay ---------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, kind: str) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.warning("accept on the %s port failed: %s", kind, err)
                time.sleep(0.1)  # out of file descriptors, say: let some close
                continue
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._route(conn, kind)

    def _candidates(self, kind: str) -> list[tuple[_Worker, str | tuple[str, int]]]:
        with self._lock:
            n = len(self.workers)
            self._next = (self._next + 1) % n
            ordered = self.workers[self._next :] + self.workers[: self._next]
            ready = [
                (w, target)
                for w in ordered
                if w.ready
                and (target := w.flight_target if kind == "flight" else w.kserve_target) is not None
            ]
            return sorted(ready, key=lambda item: item[0].connections)  # stable: ties rotate

    def _route(self, conn: socket.socket, kind: str) -> None:
        for worker, target in self._candidates(kind):
            try:
                if isinstance(target, str):
                    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    upstream.connect(target)
                else:
                    upstream = socket.create_connection(target)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as err:
                log.debug("worker %d refused a connection: %s", worker.index, err)
                continue
            with self._lock:
                worker.connections += 1
                if self._stopping.is_set():
                    worker.connections -= 1
                    upstream.close()
                    break

                def closed(relay: Relay, worker: _Worker = worker) -> None:
                    with self._lock:
                        worker.connections -= 1
                        self._relays.discard(relay)

                self._relays.add(Relay(conn, upstream, closed))
            return
        conn.close()  # no worker serves now: the client sees the connection close

    # -- statistics ----------------------------------------------------------------------

    def _worker_statistics(self) -> dict[int, list[dict[str, Any]]]:
        """Each serving worker's statistics now (its last ones if it does not answer)."""
        with self._lock:
            serving = [(w, w.client) for w in self.workers if w.ready and w.client is not None]
        out = {}
        action = flight.Action("model.statistics", b"{}")
        for worker, client in serving:
            try:
                result = next(iter(client.do_action(action, options=self._call_options)))
                stats = json.loads(result.body.to_pybytes())["model_stats"]
            except (flight.FlightError, OSError, StopIteration, ValueError, KeyError) as err:
                log.warning("worker %d gave no statistics: %s", worker.index, err)
                stats = worker.last_stats
            else:
                with self._lock:
                    if worker.client is client:
                        worker.last_stats = stats
            out[worker.index] = stats
        return out

    def statistics(self) -> list[dict[str, Any]]:
        """Triton statistics of every model version, summed over the workers."""
        return self.scrape()[1]

    def scrape(self) -> Scrape:
        """What one metrics scrape shows, read once.

        Returns
        -------
        per_worker, total, workers
            Each serving worker's statistics by its index; the statistics summed over
            every worker (those that died included: counters do not go down); and each
            worker's state now.
        """
        per_worker = self._worker_statistics()
        with self._lock:
            retired = self._retired
            workers = [
                WorkerState(w.index, w.pid, w.ready, w.starts, w.connections) for w in self.workers
            ]
        return per_worker, merge_statistics([retired, *per_worker.values()]), workers

    # -- lifecycle -----------------------------------------------------------------------

    def wait(self) -> None:
        """Block until :meth:`stop` has finished."""
        while not self._stopped.wait(0.2):
            pass

    def stop(self) -> None:
        """Stop: not ready, no new connections, SIGTERM to every worker, wait for them."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopping.set()
            for listener in self._listeners:
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
                listener.close()
            with self._changed:
                processes = [w.process for w in self.workers if w.process is not None]
                self._changed.notify_all()
            for process in processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
            for thread in self._threads:
                thread.join()
            with self._lock:
                relays = list(self._relays)
            for relay in relays:  # the workers are gone: nothing more comes through
                relay.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._stopped.set()
            log.info("server stopped")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value
