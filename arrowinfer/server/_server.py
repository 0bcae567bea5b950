"""The server: one core behind Flight (with shared memory), KServe v2 gRPC and HTTP, metrics.

This module wires the front ends, which know nothing of each other, to one
:class:`InferenceCore`: Flight serves the core and takes the shared-memory sessions as one
of its exchange handlers; KServe gRPC and KServe HTTP serve the same core on their own
ports and share one set of Triton system shared-memory regions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc

from ..errors import ModelError
from ..protocol import host_port
from ..repository import Repository
from ._auth import (
    BearerTokenInterceptor,
    BearerTokenMiddleware,
    ModelControl,
    TokenCheck,
    read_tls,
)
from ._core import MAX_REQUEST_BYTES, InferenceCore
from ._flight import ACTIONS as FLIGHT_ACTIONS
from ._flight import FlightService
from ._http import HTTP_MAX_INPUT_SIZE, HttpServer, start_http
from ._kserve import start_kserve
from ._metrics import StatisticsCollector, metrics_registry, start_metrics_server
from ._shm import SHM_ACTIONS, SHM_DESCRIPTOR, SHM_STATUS, ShmService
from ._v2memory import SystemRegions

__all__ = ["ACTIONS", "Server"]

log = logging.getLogger(__name__)

#: Every model directory's files (path, mtime in ns, size); None: it could not be walked.
_Snapshot = dict[str, tuple[tuple[str, int, int], ...] | None]

#: Every Flight action of a :class:`Server`, with its description.
ACTIONS: dict[str, str] = {**FLIGHT_ACTIONS, **SHM_ACTIONS}


class Server:
    """A running server: models loaded, Flight and KServe v2 gRPC listening, metrics served.

    Parameters
    ----------
    repository
        A Triton-layout model repository directory.
    host, port
        Where Flight listens (TCP). Port 0 picks a free port; see :attr:`port`.
    unix_socket
        Listen on this Unix domain socket instead of TCP (``grpc+unix://PATH``).
    kserve_port
        KServe v2 gRPC port on ``host`` (Triton's protocol, for ``tritonclient.grpc``);
        None disables it, 0 picks a free one (see :attr:`kserve_port`).
    http_port
        KServe v2 HTTP/REST port on ``host`` (Triton's, for ``tritonclient.http`` and
        curl); None (the default here; ``arrowinfer serve`` listens on 8000 as Triton does)
        disables it, 0 picks a free one (see :attr:`http_port`).
    allow_client_shm
        Accept shared memory from clients that are not on this host's loopback or a Unix
        socket (they must share this host's ``/dev/shm``): arrowinfer's own sessions, and
        Triton's system shared-memory regions over KServe gRPC and HTTP (registering
        files of the server's own user). Off by default: then only local clients use
        shared memory, each with files of its own user.
    shared_memory
        Serve shared memory at all (default). False: the session descriptor is unknown,
        as any unknown model is, and clients use Flight (a worker behind a relay, which
        cannot see its clients' addresses); the KServe system shared-memory calls answer
        UNIMPLEMENTED (HTTP 501).
    metrics_port
        Prometheus ``/metrics`` port on ``host``; None disables it, 0 picks a free one.
    device
        ``"cpu"`` or ``"cuda:N"`` for every model, overriding their instance groups.
    models
        Load only these models at start (None: every model of the repository).
    exit_on_error
        Triton's ``--exit-on-error``: raise :class:`~arrowinfer.errors.ModelError` (and
        start nothing) when a model fails to load at start. False (the default here;
        ``arrowinfer serve`` defaults to True, as tritonserver): the others serve.
    strict_readiness
        Triton's ``--strict-readiness``: the server is ready (health, ``ServerReady``) only
        while no model has failed to load. False (the default here; ``arrowinfer serve``
        defaults to True, as tritonserver): ready whenever it accepts requests.
    tls_cert, tls_key
        PEM files of the server's certificate (chain) and private key: Flight then listens
        on ``grpc+tls://`` and KServe gRPC with TLS too. Clients need the certificate, or
        the CA that signed it (``Client(url, tls_root_certs=...)``).
    auth_tokens
        Accept only calls (Flight and KServe) with the header ``authorization: Bearer
        <token>`` for one of these tokens; others get UNAUTHENTICATED and run nothing.
        None (default): no check. Send tokens over TLS only.
    max_request_bytes
        The most bytes of data one request may make the server hold (default 1 GiB); a
        model's config parameter ``arrowinfer.max_request_bytes`` overrides it for that
        model. KServe messages beyond it are refused by gRPC before they are read, and
        HTTP bodies beyond it, compressed or once decompressed, by the HTTP front end; see
        ``docs/security.md`` for what each transport bounds, and when.
    http_max_input_size
        Triton's ``--http-max-input-size``: the largest HTTP request body, compressed and
        once decompressed (default 64 MiB, Triton's); ``max_request_bytes`` bounds it too.
        A JSON tensor takes about 10 times its text's size once parsed, and binary tensor
        data none: larger tensors belong in binary data, or on gRPC or Flight.
    model_control
        Triton's ``--model-control-mode``: ``none`` (default: the repository is loaded at
        start, load/unload calls are refused), ``explicit`` (the calls are allowed; with
        ``admin_tokens``, or when ``auth_tokens`` are on, only with an admin token) or
        ``poll`` (models whose files change are reloaded every ``repository_poll_secs``;
        the calls are refused).
    admin_tokens
        The tokens that may load and unload models in ``explicit`` mode.
    repository_poll_secs
        How often ``poll`` mode looks at the repository.
    exit_timeout
        Seconds :meth:`stop` waits for open streams to finish (Triton's
        ``--exit-timeout-secs``, default 30); then it cancels what it can (KServe calls,
        queued requests), stops the models and returns, with :attr:`clean` False when a
        Flight stream was still open (the process should exit then: ``arrowinfer serve``
        does). None waits for ever.
    flight_options
        Passed to ``pyarrow.flight.FlightServerBase`` (middleware, ...).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | Repository,
        *,
        host: str = "127.0.0.1",
        port: int = 8815,
        unix_socket: str | None = None,
        kserve_port: int | None = 8001,
        http_port: int | None = None,
        metrics_port: int | None = 8002,
        allow_client_shm: bool = False,
        shared_memory: bool = True,
        device: str | None = None,
        models: list[str] | None = None,
        exit_on_error: bool = False,
        strict_readiness: bool = False,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        auth_tokens: Iterable[str] | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        http_max_input_size: int = HTTP_MAX_INPUT_SIZE,
        model_control: str = "none",
        admin_tokens: Iterable[str] | None = None,
        repository_poll_secs: float = 15.0,
        exit_timeout: float | None = 30.0,
        flight_options: dict[str, Any] | None = None,
    ):
        tls = read_tls(tls_cert, tls_key)
        check = TokenCheck(auth_tokens) if auth_tokens is not None else None
        control = ModelControl(
            model_control,
            TokenCheck(admin_tokens) if admin_tokens is not None else None,
            tokens_on=check is not None,
        )
        self.exit_timeout = exit_timeout
        #: False when :meth:`stop` gave up waiting for an open stream (``exit_timeout``).
        self.clean = True
        options = dict(flight_options or {})
        if tls is not None:
            options["tls_certificates"] = [tls]
        if check is not None:
            options["middleware"] = {
                **options.get("middleware", {}),
                "arrowinfer.auth": BearerTokenMiddleware(check),
            }
        repo = repository if isinstance(repository, Repository) else Repository(repository)
        self.core = InferenceCore(
            repo,
            device=device,
            models=models,
            max_request_bytes=max_request_bytes,
            strict_readiness=strict_readiness,
        )
        # every part started is stopped again, in reverse, if a later one cannot start
        with contextlib.ExitStack() as undo:
            undo.callback(self.core.close)
            failed = self.core.failed
            if exit_on_error and failed:
                raise ModelError(
                    "failed to load all models (--exit-on-error): "
                    + "; ".join(f"{name}: {reason}" for name, reason in sorted(failed.items()))
                )
            scheme = "grpc+tls" if tls is not None else "grpc"
            location = (
                f"grpc+unix://{unix_socket}"
                if unix_socket
                else f"{scheme}://{host_port(host, port)}"
            )
            self.shm = ShmService(self.core, allow_remote=allow_client_shm)
            undo.callback(self.shm.close)
            self.regions = SystemRegions(allow_remote=allow_client_shm) if shared_memory else None
            self._shared_memory = shared_memory
            exchanges = {SHM_DESCRIPTOR: self.shm.session} if shared_memory else {}

            def shm_status(body: dict[str, Any]) -> dict[str, Any]:
                return self.shm.status() if shared_memory else {"sessions": 0, "regions": 0}

            self.flight = FlightService(
                self.core,
                location,
                exchanges=exchanges,
                actions={SHM_STATUS: (SHM_ACTIONS[SHM_STATUS], shm_status)},
                model_control=control,
                **options,
            )
            undo.callback(self.flight.shutdown)
            self.shm.server_port = None if unix_socket else int(self.flight.port)
            self.shm.unix_socket = unix_socket
            self.host = host
            self.location = (
                f"grpc+unix://{unix_socket}"
                if unix_socket
                else f"{scheme}://{host_port(host, self.flight.port)}"
            )
            self._kserve: grpc.Server | None = None
            self.kserve_port: int | None = None
            if kserve_port is not None:
                self._kserve, self.kserve_port = start_kserve(
                    self.core,
                    host,
                    kserve_port,
                    max_request_bytes=max_request_bytes,
                    tls=tls,
                    interceptors=[BearerTokenInterceptor(check)] if check is not None else [],
                    model_control=control,
                    regions=self.regions,
                )
                undo.callback(self._kserve.stop, None)
            self._http: HttpServer | None = None
            self.http_port: int | None = None
            if http_port is not None:
                self._http = start_http(
                    self.core,
                    host,
                    http_port,
                    regions=self.regions,
                    max_request_bytes=min(max_request_bytes, http_max_input_size),
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                    check=check,
                    model_control=control,
                )
                undo.callback(self._http.stop, 0)
                self.http_port = self._http.port
            self._metrics_server = None
            self.metrics_port: int | None = None
            if metrics_port is not None:
                collector = StatisticsCollector(self.core.statistics, self._pending)
                self._metrics_server, self.metrics_port = start_metrics_server(
                    metrics_registry(collector), host, metrics_port, ready=self.core.server_ready
                )
            undo.pop_all()  # all started: they stop with stop()
        self._stopped = threading.Event()
        self._stopping = threading.Lock()
        self._poller: threading.Thread | None = None
        if model_control == "poll":
            # The first snapshot is taken here, not in the thread: a change made right after
            # the constructor returns must be seen as a change.
            try:
                first: _Snapshot | None = self._snapshot()
            except OSError:  # the repository cannot be read now: the poller takes it later
                log.exception("repository poll")
                first = None
            self._poller = threading.Thread(
                target=self._poll,
                args=(repository_poll_secs, first),
                name="repository-poll",
                daemon=True,
            )
            self._poller.start()
        log.info("Flight listening on %s", self.location)
        if self.kserve_port is not None:
            log.info("KServe v2 gRPC listening on %s:%d", host, self.kserve_port)
        if self.http_port is not None:
            log.info("KServe v2 HTTP listening on %s:%d", host, self.http_port)
        if self.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    @property
    def port(self) -> int:
        """The Flight TCP port (the real one when asked for port 0)."""
        return int(self.flight.port)

    def _pending(self) -> dict[tuple[str, str], int]:
        return {
            (m.version.name, str(m.version.version)): m.batcher.queued for m in self.core.served()
        }

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        # Wake up now and then: the kernel may hand SIGTERM to any thread (gRPC's, say),
        # and its Python handler runs only when the main thread runs Python code again.
        while not self._stopped.wait(0.2):
            pass

    def stop(self) -> None:
        """Stop: not ready, finish the requests in flight, unload every model.

        Clients with open streams are asked to finish them (``goaway``); this returns once
        they have, and every request read so far has its result.
        """
        with self._stopping:
            if self._stopped.is_set():
                return
            self._stop()

    def _poll(self, seconds: float, seen: _Snapshot | None) -> None:
        """``poll`` mode: reload models whose files changed, load new ones, unload gone ones.

        ``seen`` is the repository when the server started (None: it could not be read;
        then the first snapshot that can be is the starting point).
        """
        while not self._stopped.wait(seconds):
            try:
                now = self._snapshot()
            except OSError:  # the repository itself is being changed: look again later
                log.exception("repository poll")
                continue
            if seen is None:
                seen = now
                continue
            for name in sorted(set(seen) | set(now)):
                if name in now and now[name] is None:  # unreadable now: decide next time
                    now[name] = seen.get(name)
                    continue
                if seen.get(name) == now.get(name):
                    continue
                try:
                    if name in now:
                        self.core.load(name)
                    else:
                        self.core.unload(name)
                except Exception:  # a bad model must not stop the polling
                    log.exception("repository poll: model %s", name)
            seen = now

    def _snapshot(self) -> _Snapshot:
        """Every model directory's files with their modification times and sizes.

        None for a directory that could not be walked (it changed meanwhile).
        """
        out: dict[str, tuple[tuple[str, int, int], ...] | None] = {}
        root = self.core.repository.path
        for name in self.core.repository.names():
            files = []
            try:  # a directory may change (or go) while it is walked: seen next time
                for path in sorted((root / name).rglob("*")):
                    info = path.stat()
                    files.append((str(path.relative_to(root)), info.st_mtime_ns, info.st_size))
            except OSError:
                out[name] = None
                continue
            out[name] = tuple(files)
        return out

    def _stop(self) -> None:
        self.core.ready = False
        # else an idle client stream would hold shutdown() forever
        self.flight.drain()
        if self._shared_memory:
            self.shm.drain()
        # KServe: refuse new RPCs at once, give the ones in progress (and open streams)
        # until the exit timeout, then cancel them
        grace = self.exit_timeout if self.exit_timeout is not None else 365 * 86400.0
        kserve_stopped = self._kserve.stop(grace=grace) if self._kserve is not None else None
        if self._http is not None:  # the same for HTTP: requests in progress get the time
            self._http.stop(grace=self.exit_timeout)
        # open streams finish first (their clients were asked to, and gRPC stops reading
        # them once shutdown begins); a client that ignores goaway would hold the server
        # for ever, so it is waited for only until the exit timeout
        started = time.monotonic()
        idle = self.flight.wait_idle(self.exit_timeout)
        finished = threading.Event()

        def shutdown() -> None:
            self.flight.shutdown()
            finished.set()

        threading.Thread(target=shutdown, name="flight-shutdown", daemon=True).start()
        left = None
        if self.exit_timeout is not None:
            left = max(self.exit_timeout - (time.monotonic() - started), 0.0)
        if not (finished.wait(left if idle else 0.5) and idle):
            self.clean = False
            log.warning(
                "streams still open %s s after the stop began: cancelling them",
                self.exit_timeout,
            )
        self.shm.close()
        if kserve_stopped is not None:
            kserve_stopped.wait()
        if self.regions is not None:
            self.regions.close()
        self.core.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._stopped.set()
        log.info("server stopped")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
