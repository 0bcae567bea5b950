"""``Client`` and ``AsyncClient``: one small surface, the same names sync and async.

>>> with Client("grpc://127.0.0.1:8815") as client:
...     result = client.infer("facile", {"hits": hits})       # pa.RecordBatch
...     future = client.infer_async("facile", {"hits": hits}) # concurrent.futures.Future
...     for result in client.stream("jet_tagger", batches):   # pipelined, in order
...         ...

A client is safe to share between threads: requests from every thread to one model are
pipelined on one Flight stream. Requests are checked against the model's signature (fetched
once and cached) before they are sent, so mistakes are reported locally with the server's
message.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import Timeout
from ._convert import conform, to_record_batch
from ._failover import FailoverTransport
from ._local import LocalTransport
from ._shm import make_transport
from ._transport import Transport

__all__ = ["DEFAULT_TIMEOUT", "USE_CLIENT_DEFAULT", "AsyncClient", "Client"]

#: Seconds a call waits for its answer unless told otherwise.
DEFAULT_TIMEOUT = 60.0

#: The server a client talks to when given none (and ``$ARROWINFER_SERVERS`` is unset).
DEFAULT_URL = "grpc://127.0.0.1:8815"


class _UseClientDefault:
    """The type of :data:`USE_CLIENT_DEFAULT` (``None`` already means "no limit")."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = _UseClientDefault()


def _split_name(model: str, version: str | int | None) -> tuple[str, str | None]:
    if version is None and "/" in model:
        model, version = model.split("/", 1)
    return model, (None if version in (None, "") else str(version))


def servers(urls: str | Sequence[str] | None) -> list[str]:
    """The server list: the argument, else ``$ARROWINFER_SERVERS``.

    Either may be one URL, several separated by commas or whitespace, or ``@FILE`` naming a
    file with one URL per line (``#`` comments allowed) — how batch jobs find servers that a
    Slurm or HTCondor job published.
    """
    if urls is None:
        urls = os.environ.get("ARROWINFER_SERVERS", "")
    if isinstance(urls, str):
        text = urls.strip()
        if text.startswith("@"):
            lines = Path(text[1:]).expanduser().read_text().splitlines()
            text = " ".join(line.split("#", 1)[0] for line in lines)
        urls = text.replace(",", " ").split()
    return list(urls)


class _BaseClient:
    """Configuration, schemas and request building, with no I/O of its own."""

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        compression: str | None = None,
        transport: Transport | None = None,
        shm: bool | str = False,
        retries: int = 2,
        attempt_timeout: float | None = None,
        health_interval: float = 2.0,
        fallback: str = "error",
        repository: str | os.PathLike[str] | None = None,
        token: str | None = None,
        **flight_options: Any,
    ):
        if token is not None:
            flight_options["token"] = token  # for FlightTransport, through make_transport
        if fallback not in ("error", "local"):
            raise ValueError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if fallback == "local" and repository is None:
            raise ValueError("fallback='local' needs repository=<model repository directory>")
        urls = [u for u in servers(url) if u != "local"]
        if not urls and fallback == "error":
            urls = [DEFAULT_URL]
        self.url = ",".join(urls) or "local"
        self.timeout = timeout
        if transport is None:
            members = [
                make_transport(u, shm=shm, compression=compression, **flight_options) for u in urls
            ]
            local = LocalTransport(repository) if fallback == "local" and repository else None
            if len(members) == 1 and local is None and retries == 0 and attempt_timeout is None:
                transport = members[0]
            else:
                transport = FailoverTransport(
                    members,
                    retries=retries,
                    attempt_timeout=attempt_timeout,
                    health_interval=health_interval,
                    fallback=local,
                )
        self._transport: Transport = transport
        self._schemas: dict[tuple[str, str | None], pa.Schema] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def transports(self) -> list[Transport]:
        """The transport to each server (Flight, shared memory), in the order given."""
        members = getattr(self._transport, "members", None)
        return list(members) if members is not None else [self._transport]

    @property
    def counters(self) -> dict[str, int]:
        """Requests, retries, fallbacks (calls run in this process) and failures so far."""
        return dict(getattr(self._transport, "counters", {}))

    def _input_schema(self, model: str, version: str | None) -> pa.Schema:
        key = (model, version)
        with self._lock:
            cached = self._schemas.get(key)
        if cached is None:
            cached = self._transport.schema(model, version, timeout=self.timeout)
            with self._lock:
                self._schemas[key] = cached
        return cached

    def _request(self, model: str, version: str | None, data: Any) -> pa.RecordBatch:
        schema = self._input_schema(model, version)
        return conform(to_record_batch(data), schema, model=model)

    def _wait(
        self, future: Future[pa.RecordBatch], timeout: float | None, model: str
    ) -> pa.RecordBatch:
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise Timeout(f"model {model!r}: no answer within {timeout} s") from None


class Client(_BaseClient):
    """A client of one or several arrowinfer servers, with an optional local fallback.

    Parameters
    ----------
    url
        A server: ``grpc://host:port`` (Flight over TCP), ``grpc+tls://host:port``,
        ``grpc+unix:///path/to/socket``, or ``shm://host:port`` / ``shm+unix:///path``
        (shared memory with a server on this host; results are views of it). Several
        servers: a list, a comma-separated string, or ``"@FILE"`` (one URL per line).
        Default: ``$ARROWINFER_SERVERS``, else ``grpc://127.0.0.1:8815`` (none with
        ``fallback="local"``: laptop mode).
    timeout
        Seconds each call waits for its answer (None: no limit).
    compression
        ``"zstd"`` or ``"lz4"``: compress the Arrow buffers both ways (slow links).
    transport
        Use this transport instead of one made from ``url``.
    shm
        ``"auto"``: shared memory when the server is on this host, else Flight (decided
        once, here); True: shared memory or an error. See ``arrowinfer.client._shm``.
    retries
        More tries, on other servers, for a request that failed in transport (connection
        refused or reset, server gone, ``attempt_timeout``); never for a bad request.
    attempt_timeout
        Seconds one try may take before the request moves to another server (None: no
        limit, so a server that hangs holds a ``stream()`` forever: set it in production).
    health_interval
        Seconds between background health checks of the servers.
    fallback
        ``"error"`` (default): raise ``ServerUnavailable`` naming the servers tried when
        none can run a request. ``"local"``: run the model in this process from
        ``repository``, with a ``FallbackWarning`` and a count in :attr:`counters`.
    repository
        The model repository for ``fallback="local"``.
    token
        A bearer token for servers that ask for one (``arrowinfer serve
        --auth-token-file``); sent on every call. Use TLS, or it travels in clear text.
    **flight_options
        Passed to ``pyarrow.flight.FlightClient`` (``tls_root_certs``, ...).
    """

    def models(self) -> dict[str, pa.Schema]:
        """The served models and their input schemas (latest version of each)."""
        listing = self._transport.models(timeout=self.timeout)
        return {
            name: versions[max(versions, key=int)] for name, versions in sorted(listing.items())
        }

    def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """The model's inputs, outputs and versions (KServe ModelMetadata) and its config."""
        name, ver = _split_name(model, version)
        body = {"model": name, "version": ver}
        meta = self._transport.action("model.metadata", body, timeout=self.timeout)
        meta["config"] = self._transport.action("model.config", body, timeout=self.timeout)
        return dict(meta)

    def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """The model's input signature (cached)."""
        return self._input_schema(*_split_name(model, version))

    def infer(
        self,
        model: str,
        data: Any,
        *,
        version: str | int | None = None,
        timeout: float | _UseClientDefault | None = USE_CLIENT_DEFAULT,
    ) -> pa.RecordBatch:
        """Run a model over a batch of events; one result row per input row.

        Parameters
        ----------
        model
            Model name (``"name/version"`` also works).
        data
            ``pa.RecordBatch``, ``pa.Table``, dict of numpy arrays / ``Ragged`` / Arrow
            arrays, or an awkward record array, one column per model input.
        version
            A model version (default: the latest).
        timeout
            Seconds to wait (default: the client's).

        Returns
        -------
        pyarrow.RecordBatch
            One column per model output. The server-side times of the request are in its
            schema metadata (see :func:`arrowinfer.client.server_times`).
        """
        name, _ = _split_name(model, version)
        wait = self.timeout if isinstance(timeout, _UseClientDefault) else timeout
        return self._wait(self.infer_async(model, data, version=version), wait, name)

    def infer_async(
        self, model: str, data: Any, *, version: str | int | None = None
    ) -> Future[pa.RecordBatch]:
        """Like :meth:`infer`, but returns at once with a ``concurrent.futures.Future``."""
        name, ver = _split_name(model, version)
        return self._transport.submit(name, ver, self._request(name, ver, data))

    def stream(
        self,
        model: str,
        data: Iterable[Any],
        *,
        version: str | int | None = None,
        window: int = 16,
    ) -> Iterator[pa.RecordBatch]:
        """Pipeline many requests on one stream; yields their results in order.

        At most ``window`` requests are in flight at once.
        """
        name, ver = _split_name(model, version)
        requests = (self._request(name, ver, d) for d in data)
        return self._transport.stream(name, ver, requests, window)

    def close(self) -> None:
        """Close the streams and the connection."""
        if not self._closed:
            self._closed = True
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same names, as coroutines.

    Nothing blocks the event loop: requests are pipelined by the same machinery as
    :class:`Client`, and their futures are awaited.
    """

    def __init__(self, url: str = "grpc://127.0.0.1:8815", **kwargs: Any):
        self._client = Client(url, **kwargs)

    async def _run(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: func(*args, **kwargs))

    async def models(self) -> dict[str, pa.Schema]:
        """See :meth:`Client.models`."""
        return await self._run(self._client.models)  # type: ignore[no-any-return]

    async def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """See :meth:`Client.metadata`."""
        return await self._run(self._client.metadata, model, version=version)  # type: ignore[no-any-return]

    async def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """See :meth:`Client.schema`."""
        return await self._run(self._client.schema, model, version=version)

    async def infer(
        self,
        model: str,
        data: Any,
        *,
        version: str | int | None = None,
        timeout: float | _UseClientDefault | None = USE_CLIENT_DEFAULT,
    ) -> pa.RecordBatch:
        """See :meth:`Client.infer`."""
        wait = self._client.timeout if isinstance(timeout, _UseClientDefault) else timeout
        # the schema lookup may do I/O the first time: off the loop
        future = await self._run(self._client.infer_async, model, data, version=version)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), wait)
        except asyncio.TimeoutError:
            raise Timeout(f"model {model!r}: no answer within {wait} s") from None

    async def stream(
        self, model: str, data: Iterable[Any], *, version: str | int | None = None, window: int = 16
    ) -> AsyncIterator[pa.RecordBatch]:
        """See :meth:`Client.stream`: results in order, at most ``window`` in flight."""
        in_flight: deque[asyncio.Future[pa.RecordBatch]] = deque()
        for item in data:
            if len(in_flight) >= window:
                yield await in_flight.popleft()
            future = await self._run(self._client.infer_async, model, item, version=version)
            in_flight.append(asyncio.wrap_future(future))
        while in_flight:
            yield await in_flight.popleft()

    async def close(self) -> None:
        """See :meth:`Client.close`."""
        await self._run(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
