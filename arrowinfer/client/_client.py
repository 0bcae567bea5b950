"""``Client`` and ``AsyncClient``: one small surface, the same names sync and async.

>>> with Client("grpc://127.0.0.1:8815") as client:
...     result = client.infer("facile", {"hits": hits})       # pa.RecordBatch
...     future = client.infer_async("facile", {"hits": hits}) # concurrent.futures.Future
...     for result in client.stream("jet_tagger", batches):   # pipelined, in order
...         ...

>>> async with AsyncClient("grpc://127.0.0.1:8815") as client:
...     result = await client.infer("facile", {"hits": hits})

A client is safe to share between threads: requests from every thread to one model are
pipelined on one Flight stream. Requests are checked against the model's signature (fetched
once and cached) before they are sent, so mistakes are reported locally with the server's
message.

Both clients share :class:`BaseClient`, which does no I/O: the configuration and its
checks (unknown options are refused), the server list, the schema cache, request building
and the failover policy (the transport it makes). ``Client`` does its I/O on the calling
thread; ``AsyncClient`` hands each blocking step (connecting, a first schema lookup, writing
a request) to one I/O thread of its own and awaits the answer, bridged to the event loop
with ``call_soon_threadsafe``: no thread per request, no default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from ..errors import Timeout
from ._convert import conform, to_record_batch
from ._failover import FailoverTransport
from ._shm import SHM_OPTIONS, check_shm, make_transport
from ._transport import FLIGHT_OPTIONS, Transport, check_compression, check_options, check_token

__all__ = [
    "CLIENT_OPTIONS",
    "DEFAULT_TIMEOUT",
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "BaseClient",
    "Client",
]

_T = TypeVar("_T")

#: Seconds a call waits for its answer unless told otherwise.
DEFAULT_TIMEOUT = 60.0

#: The server a client talks to when given none (and ``$ARROWINFER_SERVERS`` is unset).
DEFAULT_URL = "grpc://127.0.0.1:8815"

#: The keyword options a client takes besides its own parameters: those of
#: ``pyarrow.flight.FlightClient`` (TLS and others) and of shared memory, by name.
CLIENT_OPTIONS = FLIGHT_OPTIONS | SHM_OPTIONS


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


class BaseClient:
    """What :class:`Client` and :class:`AsyncClient` share, with no I/O of its own.

    The configuration and its checks, the server list, the schema cache, building and
    checking requests, and the failover policy (the transport :meth:`_make_transport`
    makes, which the subclasses call where their I/O may happen). The parameters are
    :class:`Client`'s.

    Raises
    ------
    TypeError
        An unknown keyword option (pass TLS and Flight options by their documented names,
        :data:`CLIENT_OPTIONS`).
    ValueError
        A bad value of ``compression``, ``shm``, ``fallback`` or ``token``.
    """

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
        **options: Any,
    ):
        check_options(type(self).__name__, options, CLIENT_OPTIONS)
        check_compression(compression)
        check_shm(shm)
        if token is not None:
            check_token(token)
            options["token"] = token  # for FlightTransport, through make_transport
        if fallback not in ("error", "local"):
            raise ValueError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if fallback == "local" and repository is None:
            raise ValueError("fallback='local' needs repository=<model repository directory>")
        urls = [u for u in servers(url) if u != "local"]
        if not urls and fallback == "error":
            urls = [DEFAULT_URL]
        self.url = ",".join(urls) or "local"
        self.timeout = timeout
        self._urls = urls
        self._given = transport
        self._shm = shm
        self._compression = compression
        self._options = options
        self._retries = retries
        self._attempt_timeout = attempt_timeout
        self._health_interval = health_interval
        self._repository = repository if fallback == "local" else None
        self._transport: Transport | None = None
        self._schemas: dict[tuple[str, str | None], pa.Schema] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._start()

    def _start(self) -> None:
        """Make the transport, where the subclass does its I/O (the last step of __init__)."""
        raise NotImplementedError

    def _make_transport(self) -> Transport:
        """The transport the configuration asks for (may do I/O: a shared-memory probe).

        One server without retries is its own transport; otherwise a
        :class:`~arrowinfer.client.FailoverTransport` over all of them, with the local
        fallback (onnxruntime, imported only then) when asked for.
        """
        if self._given is not None:
            return self._given
        members = [
            make_transport(u, shm=self._shm, compression=self._compression, **self._options)
            for u in self._urls
        ]
        local = None
        if self._repository is not None:
            from ._local import LocalTransport  # onnxruntime and onnx: only for the fallback

            local = LocalTransport(self._repository)
        simple = self._retries == 0 and self._attempt_timeout is None
        if len(members) == 1 and local is None and simple:
            return members[0]
        return FailoverTransport(
            members,
            retries=self._retries,
            attempt_timeout=self._attempt_timeout,
            health_interval=self._health_interval,
            fallback=local,
        )

    @property
    def transports(self) -> list[Transport]:
        """The transport to each server (Flight, shared memory), in the order given."""
        if self._transport is None:
            return []
        members = getattr(self._transport, "members", None)
        return list(members) if members is not None else [self._transport]

    @property
    def counters(self) -> dict[str, int]:
        """Requests, retries, fallbacks (calls run in this process) and failures so far."""
        return dict(getattr(self._transport, "counters", {}))

    def _cached_schema(self, model: str, version: str | None) -> pa.Schema | None:
        with self._lock:
            return self._schemas.get((model, version))

    def _remember_schema(self, model: str, version: str | None, schema: pa.Schema) -> pa.Schema:
        with self._lock:
            self._schemas[(model, version)] = schema
        return schema

    @staticmethod
    def _request(model: str, data: Any, schema: pa.Schema) -> pa.RecordBatch:
        """The request for ``data``, checked against and shaped to the model's ``schema``."""
        return conform(to_record_batch(data), schema, model=model)

    @staticmethod
    def _latest(listing: dict[str, dict[str, pa.Schema]]) -> dict[str, pa.Schema]:
        """Each model's latest version's schema, by name."""
        return {
            name: versions[max(versions, key=int)] for name, versions in sorted(listing.items())
        }

    def _wait_for(self, timeout: float | _UseClientDefault | None) -> float | None:
        return self.timeout if isinstance(timeout, _UseClientDefault) else timeout


class Client(BaseClient):
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
    **options
        Only these names (:data:`CLIENT_OPTIONS`); any other is a TypeError. TLS and the
        rest of ``pyarrow.flight.FlightClient``: ``tls_root_certs``, ``cert_chain``,
        ``private_key``, ``override_hostname``, ``disable_server_verification``,
        ``middleware``, ``write_size_limit_bytes``, ``generic_options``. Shared memory:
        ``copy_results``, ``min_shm_bytes``, ``max_free_regions``, ``probe_timeout`` (see
        :class:`~arrowinfer.client.ShmTransport`).
    """

    def _start(self) -> None:
        self._transport = self._make_transport()

    @property
    def _live(self) -> Transport:
        assert self._transport is not None  # made in __init__
        return self._transport

    def models(self) -> dict[str, pa.Schema]:
        """The served models and their input schemas (latest version of each)."""
        return self._latest(self._live.models(timeout=self.timeout))

    def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """The model's inputs, outputs and versions (KServe ModelMetadata) and its config."""
        return _metadata(self._live, self.timeout, *_split_name(model, version))

    def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """The model's input signature (cached)."""
        return self._schema(*_split_name(model, version))

    def _schema(self, model: str, version: str | None) -> pa.Schema:
        cached = self._cached_schema(model, version)
        if cached is not None:
            return cached
        schema = self._live.schema(model, version, timeout=self.timeout)
        return self._remember_schema(model, version, schema)

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

        Raises
        ------
        InvalidInput
            Before anything is sent, when ``data`` does not fit the model's signature.
        ModelNotFound, TransportError, ServerError
            From the server (see :mod:`arrowinfer.errors`).
        """
        name, _ = _split_name(model, version)
        wait = self._wait_for(timeout)
        future = self.infer_async(model, data, version=version)
        try:
            return future.result(wait)
        except FutureTimeout:
            future.cancel()
            raise Timeout(f"model {name!r}: no answer within {wait} s") from None

    def infer_async(
        self, model: str, data: Any, *, version: str | int | None = None
    ) -> Future[pa.RecordBatch]:
        """Like :meth:`infer`, but returns at once with a ``concurrent.futures.Future``."""
        name, ver = _split_name(model, version)
        return self._live.submit(name, ver, self._request(name, data, self._schema(name, ver)))

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
        requests = (self._request(name, d, self._schema(name, ver)) for d in data)
        return self._live.stream(name, ver, requests, window)

    def close(self) -> None:
        """Close the streams and the connection."""
        if not self._closed:
            self._closed = True
            self._live.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metadata(
    transport: Transport, timeout: float | None, model: str, version: str | None
) -> dict[str, Any]:
    body = {"model": model, "version": version}
    meta = transport.action("model.metadata", body, timeout=timeout)
    meta["config"] = transport.action("model.config", body, timeout=timeout)
    return dict(meta)


class _IOThread:
    """One thread that runs an :class:`AsyncClient`'s blocking steps, in order.

    Each step's outcome goes back to the awaiting event loop with ``call_soon_threadsafe``.
    Steps are short: opening a connection or a stream, a schema lookup, writing a request
    (which waits only when the server does not keep up); waiting for results happens on
    the event loop, on futures the transport's reader threads resolve.
    """

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            job = None

    def put(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread, after every job put before it."""
        self._jobs.put(job)

    def call(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
        """``func(*args, **kwargs)`` on the thread; a future of the running loop for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def job() -> None:
            try:
                result = func(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
                _settle(loop, future, None, err)
            else:
                _settle(loop, future, result, None)

        self.put(job)
        return future

    def stop(self) -> None:
        """End the thread once the jobs put before are done."""
        self._jobs.put(None)


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    """Resolve an asyncio future from another thread (unless it was cancelled meanwhile)."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it any more
        loop.call_soon_threadsafe(settle)


class AsyncClient(BaseClient):
    """The asyncio twin of :class:`Client`: the same parameters, the same names as coroutines.

    Nothing blocks the event loop, and no thread is taken per request: the blocking steps
    (connecting, a first schema lookup, writing a request) run in order on one I/O thread
    of this client, and results are awaited on the futures the transport's reader threads
    resolve, bridged to the loop. The transport is made on that thread too (a
    shared-memory probe may take a moment); ``async with`` waits for it, and raises its
    error. Close with ``await client.aclose()`` or ``async with``.
    """

    def _start(self) -> None:
        self._io = _IOThread("arrowinfer-async-io")
        # a client dropped without aclose() does not keep its thread waiting forever
        weakref.finalize(self, self._io.stop)
        self._made: Future[Transport] = Future()
        self._io.put(self._make)

    def _make(self) -> None:
        try:
            self._transport = self._make_transport()
        except BaseException as err:  # noqa: BLE001 - every call of the client raises it
            self._made.set_exception(err)
        else:
            self._made.set_result(self._transport)

    def _live(self) -> Transport:
        """The transport (on the I/O thread, after it was made), or the error making it."""
        return self._made.result()

    async def _call(self, func: Callable[[Transport], _T]) -> _T:
        """``func(transport)`` on the I/O thread, awaited."""
        return await self._io.call(lambda: func(self._live()))

    async def models(self) -> dict[str, pa.Schema]:
        """See :meth:`Client.models`."""
        return self._latest(await self._call(lambda t: t.models(timeout=self.timeout)))

    async def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """See :meth:`Client.metadata`."""
        name, ver = _split_name(model, version)
        return await self._call(lambda t: _metadata(t, self.timeout, name, ver))

    async def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """See :meth:`Client.schema`."""
        return await self._schema(*_split_name(model, version))

    async def _schema(self, model: str, version: str | None) -> pa.Schema:
        cached = self._cached_schema(model, version)
        if cached is not None:
            return cached
        schema = await self._call(lambda t: t.schema(model, version, timeout=self.timeout))
        return self._remember_schema(model, version, schema)

    async def _submit(
        self, name: str, ver: str | None, data: Any
    ) -> asyncio.Future[pa.RecordBatch]:
        """Check and send one request; an asyncio future of its result."""
        batch = self._request(name, data, await self._schema(name, ver))
        sent = await self._call(lambda t: t.submit(name, ver, batch))
        return asyncio.wrap_future(sent)  # its callback settles it on this loop: no thread

    async def infer(
        self,
        model: str,
        data: Any,
        *,
        version: str | int | None = None,
        timeout: float | _UseClientDefault | None = USE_CLIENT_DEFAULT,
    ) -> pa.RecordBatch:
        """See :meth:`Client.infer`."""
        name, ver = _split_name(model, version)
        wait = self._wait_for(timeout)
        result = await self._submit(name, ver, data)
        try:
            return await asyncio.wait_for(result, wait)
        except asyncio.TimeoutError:
            raise Timeout(f"model {name!r}: no answer within {wait} s") from None

    async def stream(
        self, model: str, data: Iterable[Any], *, version: str | int | None = None, window: int = 16
    ) -> AsyncIterator[pa.RecordBatch]:
        """See :meth:`Client.stream`: results in order, at most ``window`` in flight."""
        name, ver = _split_name(model, version)
        in_flight: deque[asyncio.Future[pa.RecordBatch]] = deque()
        for item in data:
            if len(in_flight) >= window:
                yield await in_flight.popleft()
            in_flight.append(await self._submit(name, ver, item))
        while in_flight:
            yield await in_flight.popleft()

    async def aclose(self) -> None:
        """Close the streams and the connection; the I/O thread ends."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._made.exception() is None:
                self._made.result().close()

        try:
            await self._io.call(close)
        finally:
            self._io.stop()

    async def __aenter__(self) -> AsyncClient:
        try:
            await self._io.call(self._made.result)  # the transport is made, or its error
        except BaseException:
            await self.aclose()  # __aexit__ will not run: end the I/O thread here
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
