"""The arrowinfer server: one inference core behind Flight (and metrics) front ends.

>>> with Server("path/to/repository", port=0, metrics_port=None) as server:
...     print(server.location)  # grpc://127.0.0.1:<port>
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..repository import Repository
from ._core import InferenceCore, LoadedModel
from ._flight import ACTIONS, FlightService
from ._metrics import StatisticsCollector, metrics_registry, start_metrics_server

__all__ = ["ACTIONS", "FlightService", "InferenceCore", "LoadedModel", "Server"]

log = logging.getLogger(__name__)


class Server:
    """A running server: models loaded, Flight listening, metrics served.

    Parameters
    ----------
    repository
        A Triton-layout model repository directory.
    host, port
        Where Flight listens (TCP). Port 0 picks a free port; see :attr:`port`.
    unix_socket
        Listen on this Unix domain socket instead of TCP (``grpc+unix://PATH``).
    metrics_port
        Prometheus ``/metrics`` port on ``host``; None disables it, 0 picks a free one.
    device
        ``"cpu"`` or ``"cuda:N"`` for every model, overriding their instance groups.
    models
        Load only these models at start.
    flight_options
        Passed to ``pyarrow.flight.FlightServerBase`` (TLS, middleware, ...).
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | Repository,
        *,
        host: str = "127.0.0.1",
        port: int = 8815,
        unix_socket: str | None = None,
        metrics_port: int | None = 8002,
        device: str | None = None,
        models: list[str] | None = None,
        flight_options: dict[str, Any] | None = None,
    ):
        repo = repository if isinstance(repository, Repository) else Repository(repository)
        self.core = InferenceCore(repo, device=device, models=models)
        location = f"grpc+unix://{unix_socket}" if unix_socket else f"grpc://{host}:{port}"
        self.flight = FlightService(self.core, location, **(flight_options or {}))
        self.host = host
        self.location = (
            f"grpc+unix://{unix_socket}" if unix_socket else f"grpc://{host}:{self.flight.port}"
        )
        self._metrics_server = None
        self.metrics_port: int | None = None
        if metrics_port is not None:
            collector = StatisticsCollector(self.core.statistics, self._pending)
            self._metrics_server, self.metrics_port = start_metrics_server(
                metrics_registry(collector), host, metrics_port, ready=lambda: self.core.ready
            )
        self._stopped = threading.Event()
        self._stopping = threading.Lock()
        log.info("Flight listening on %s", self.location)
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
        self._stopped.wait()

    def stop(self) -> None:
        """Stop: not ready, finish the requests in flight, unload every model.

        Clients with open streams are asked to finish them (``goaway``); this returns once
        they have, and every request read so far has its result.
        """
        with self._stopping:
            if self._stopped.is_set():
                return
            self._stop()

    def _stop(self) -> None:
        self.core.ready = False
        self.flight.drain()  # else an idle client stream would hold shutdown() forever
        self.flight.shutdown()  # returns once the calls in progress have finished
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
