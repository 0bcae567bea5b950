"""Transports: the client's only I/O boundary.

A transport sends conformed request batches to one server and gives back result batches.
:class:`FlightTransport` speaks the Flight protocol of DESIGN.md: each (model, version) has
one long-lived ``do_exchange`` stream on which requests from every thread are pipelined; a
reader thread resolves their futures in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol

import pyarrow as pa
from pyarrow import flight

from ..errors import (
    ArrowInferError,
    ServerUnavailable,
    error_from_dict,
    from_flight,
)
from ._convert import SERVER_TIMES

__all__ = ["FlightTransport", "Transport", "in_order", "map_flight_errors"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What a client needs from a connection to one server."""

    location: str

    def models(self, timeout: float | None = None) -> dict[str, dict[str, pa.Schema]]:
        """Input schemas by model name and version."""
        ...

    def schema(self, model: str, version: str | None, timeout: float | None = None) -> pa.Schema:
        """One model version's input signature."""
        ...

    def action(
        self, name: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a management action; its JSON result."""
        ...

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        """Send one request; the future gives its result."""
        ...

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        """Pipeline requests on one stream; results in order."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def map_flight_errors(where: str) -> Iterator[None]:
    """Re-raise Flight and socket errors as arrowinfer errors."""
    try:
        yield
    except flight.FlightError as err:
        raise from_flight(err) from err
    except (pa.ArrowException, OSError) as err:
        raise ServerUnavailable(f"{where}: {err}") from err


def in_order(
    submit: Callable[[pa.RecordBatch], Future[pa.RecordBatch]],
    batches: Iterable[pa.RecordBatch],
    window: int,
) -> Iterator[pa.RecordBatch]:
    """Submit requests with at most ``window`` in flight; yield their results in order."""
    in_flight: deque[Future[pa.RecordBatch]] = deque()
    for batch in batches:
        if len(in_flight) >= window:
            yield in_flight.popleft().result()
        in_flight.append(submit(batch))
    while in_flight:
        yield in_flight.popleft().result()


def _result(chunk: flight.FlightStreamChunk) -> pa.RecordBatch:
    """A result batch with its server times as schema metadata, or the request's error."""
    meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else {}
    if "error" in meta:
        raise error_from_dict(meta["error"])
    times = {k.encode(): str(meta[k]).encode() for k in SERVER_TIMES if k in meta}
    batch = chunk.data
    return (
        batch.replace_schema_metadata({**(batch.schema.metadata or {}), **times})
        if times
        else batch
    )


class _Pipeline:
    """One ``do_exchange`` stream shared by many callers; results come back in order."""

    def __init__(
        self,
        client: flight.FlightClient,
        model: str,
        version: str | None,
        schema: pa.Schema,
        options: pa.ipc.IpcWriteOptions,
        first_metadata: bytes,
        where: str,
    ):
        path = [model] if version is None else [model, version]
        with map_flight_errors(where):
            self.writer, self.reader = client.do_exchange(flight.FlightDescriptor.for_path(*path))
            self.writer.begin(schema, options=options)
        self.schema = schema
        self.where = where
        self._first_metadata: bytes | None = first_metadata
        self._pending: deque[Future[pa.RecordBatch]] = deque()
        # Two locks: writers queue on _write_lock (a write can block on flow control), while
        # _lock guards only the pending queue, so the reader can always take its futures
        # and keep reading; one lock for both deadlocks once the stream's buffers fill.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._finish = False  # done_writing is due once the current write returns
        self.broken: ArrowInferError | None = None
        self._thread = threading.Thread(target=self._read, name=f"flight-{model}", daemon=True)
        self._thread.start()

    def submit(self, batch: pa.RecordBatch) -> Future[pa.RecordBatch]:
        future: Future[pa.RecordBatch] = Future()
        future.set_running_or_notify_cancel()
        with self._write_lock:
            with self._lock:
                if self.broken is not None:
                    raise self.broken
                meta, self._first_metadata = self._first_metadata or b"", None
                self._pending.append(future)
            try:
                with map_flight_errors(self.where):
                    self.writer.write_with_metadata(batch, meta)
            except ArrowInferError as err:
                with self._lock:
                    if self._pending and self._pending[-1] is future:
                        self._pending.pop()
                failed = err
            else:
                if self._finish:
                    self._done_writing()
                return future
        self._break(failed)
        raise failed

    def _done_writing(self) -> None:
        """Half-close the stream (under _write_lock)."""
        self._finish = False
        with contextlib.suppress(pa.ArrowException, OSError):
            self.writer.done_writing()

    def _read(self) -> None:
        try:
            while True:
                with map_flight_errors(self.where):
                    chunk = self.reader.read_chunk()
                if chunk.data is None:  # a control message, not a result
                    self._control(chunk.app_metadata)
                    continue
                with self._lock:
                    future = self._pending.popleft() if self._pending else None
                if future is None:
                    log.warning("%s: a result came that no request waits for", self.where)
                    continue
                try:
                    future.set_result(_result(chunk))
                except ArrowInferError as err:
                    future.set_exception(err)
        except StopIteration:
            self._break(ServerUnavailable(f"{self.where}: the server closed the stream"))
        except ArrowInferError as err:
            self._break(err)

    def _control(self, metadata: pa.Buffer | None) -> None:
        """A metadata-only message: ``{"goaway": reason}`` asks us to finish the stream."""
        try:
            meta = json.loads(metadata.to_pybytes()) if metadata else {}
        except ValueError:
            meta = {}
        if not isinstance(meta, dict) or "goaway" not in meta:
            return
        with self._lock:
            # no new requests here; those in flight still get their results
            if self.broken is None:
                self.broken = ServerUnavailable(f"{self.where}: {meta['goaway']}")
        if self._write_lock.acquire(blocking=False):
            try:
                self._done_writing()
            finally:
                self._write_lock.release()
        else:
            self._finish = True  # the writer in progress half-closes when its write returns

    def _break(self, err: ArrowInferError) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = err
            pending, self._pending = list(self._pending), deque()
        for future in pending:
            if not future.done():
                future.set_exception(err)

    def close(self) -> None:
        with self._lock:
            closing = self.broken is None
            if closing:
                self.broken = ServerUnavailable(f"{self.where}: the client is closed")
        if closing and self._write_lock.acquire(timeout=5):  # a write stuck on a stalled
            try:  # server must not hang close(): the cancel below ends it
                self._done_writing()
            finally:
                self._write_lock.release()
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            # the server does not finish the stream (stalled, frozen): cancel it, or
            # writer.close() below would wait for the server as long as it stalls
            log.warning("%s: the stream did not finish; cancelling it", self.where)
            with contextlib.suppress(pa.ArrowException, OSError):
                self.reader.cancel()
            self._thread.join(timeout=5)
        with contextlib.suppress(pa.ArrowException, OSError):
            self.writer.close()


class _BearerToken(flight.ClientMiddlewareFactory):
    """Adds ``authorization: Bearer <token>`` to every call of a FlightClient."""

    def __init__(self, token: str):
        super().__init__()
        self._header = _HeaderMiddleware({"authorization": f"Bearer {token}"})

    def start_call(self, info: Any) -> flight.ClientMiddleware:
        return self._header


class _HeaderMiddleware(flight.ClientMiddleware):
    def __init__(self, headers: dict[str, str]):
        super().__init__()
        self._headers = headers

    def sending_headers(self) -> dict[str, str]:
        return self._headers


class FlightTransport:
    """A connection to one arrowinfer server over Arrow Flight (TCP, TLS or Unix socket).

    Parameters
    ----------
    location
        ``grpc://host:port``, ``grpc+tls://host:port`` or ``grpc+unix:///path``.
    compression
        ``"zstd"`` or ``"lz4"`` to compress the Arrow IPC buffers both ways.
    token
        A bearer token, sent as ``authorization: Bearer <token>`` on every call.
    **kwargs
        Passed to ``pyarrow.flight.FlightClient`` (``tls_root_certs``, ...).
    """

    def __init__(
        self,
        location: str,
        *,
        compression: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ):
        if compression not in (None, "zstd", "lz4"):
            raise ValueError(f"compression must be None, 'zstd' or 'lz4', got {compression!r}")
        if token is not None:
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise ValueError("token must be a non-empty string without whitespace")
            kwargs["middleware"] = [*(kwargs.get("middleware") or []), _BearerToken(token)]
        self.location = location
        self._client = flight.FlightClient(location, **kwargs)
        self._compression = compression
        self._options = pa.ipc.IpcWriteOptions(compression=compression)
        self._first = json.dumps({"compression": compression}).encode() if compression else b""
        self._pipelines: dict[tuple[str, str | None], _Pipeline] = {}
        self._lock = threading.Lock()

    def _options_for(self, timeout: float | None) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(timeout=timeout)

    def models(self, timeout: float | None = None) -> dict[str, dict[str, pa.Schema]]:
        out: dict[str, dict[str, pa.Schema]] = {}
        with map_flight_errors(self.location):
            for info in self._client.list_flights(options=self._options_for(timeout)):
                name, version = (p.decode() for p in info.descriptor.path)
                out.setdefault(name, {})[version] = info.schema
        return out

    def schema(self, model: str, version: str | None, timeout: float | None = None) -> pa.Schema:
        path = [model] if version is None else [model, version]
        # get_flight_info, not get_schema: pyarrow loses a FlightError's class and
        # extra_info when get_schema raises it on the server
        with map_flight_errors(self.location):
            return self._client.get_flight_info(
                flight.FlightDescriptor.for_path(*path), options=self._options_for(timeout)
            ).schema

    def action(
        self, name: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        payload = json.dumps(body or {}).encode()
        with map_flight_errors(self.location):
            results = list(
                self._client.do_action(
                    flight.Action(name, payload), options=self._options_for(timeout)
                )
            )
        return json.loads(results[0].body.to_pybytes()) if results else None

    def _pipeline(self, model: str, version: str | None, schema: pa.Schema) -> _Pipeline:
        key = (model, version)
        with self._lock:
            pipe = self._pipelines.get(key)
            if pipe is None or pipe.broken is not None or not pipe.schema.equals(schema):
                if pipe is not None:
                    pipe.close()
                pipe = _Pipeline(
                    self._client, model, version, schema, self._options, self._first, self.location
                )
                self._pipelines[key] = pipe
            return pipe

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        return self._pipeline(model, version, batch.schema).submit(batch)

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        """A stream of its own: at most ``window`` requests in flight, results in order."""
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            return
        pipe = _Pipeline(
            self._client, model, version, first.schema, self._options, self._first, self.location
        )
        try:
            in_flight: deque[Future[pa.RecordBatch]] = deque([pipe.submit(first)])
            for batch in iterator:
                if len(in_flight) >= window:
                    yield in_flight.popleft().result()
                in_flight.append(pipe.submit(batch))
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            pipe.close()

    def close(self) -> None:
        with self._lock:
            pipes, self._pipelines = list(self._pipelines.values()), {}
        for pipe in pipes:
            pipe.close()
        with contextlib.suppress(pa.ArrowException, OSError):
            self._client.close()
