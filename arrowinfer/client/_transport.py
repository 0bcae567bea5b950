"""Transports: the client's only I/O boundary.

A transport sends conformed request batches to one server and gives back result batches.
:class:`FlightTransport` speaks the Flight protocol of DESIGN.md: each (model, version) has
one long-lived ``do_exchange`` stream on which requests from every thread are pipelined; a
reader thread resolves their futures in order.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import pyarrow as pa
from pyarrow import flight

from ..errors import ArrowInferError, error_from_dict
from ..protocol import dump_json, result_metadata
from ._stream import OrderedStream, Reply, map_flight_errors

__all__ = [
    "FLIGHT_OPTIONS",
    "FlightTransport",
    "Transport",
    "check_compression",
    "check_options",
    "check_token",
    "check_url",
    "error_from_reply",
    "in_order",
    "map_flight_errors",
]

log = logging.getLogger(__name__)
log = logging.getLogger(__name__)

#: The URL schemes a client reaches a server by (``shm``: shared memory, see ``_shm``).
URL_SCHEMES = ("grpc", "grpc+tcp", "grpc+tls", "grpc+unix", "shm", "shm+unix")


def check_url(url: str) -> None:
    """Refuse a server URL no transport can use, before any I/O.

    Raises
    ------
    ValueError
        Naming the URL, the schemes there are, and a URL that would do.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in URL_SCHEMES and rest:
        return
    hint = f"e.g. grpc://{url if not sep else '127.0.0.1:8815'}"
    if scheme in ("http", "https"):
        hint = "a KServe/Triton HTTP port answers tritonclient.http, not this client; " + hint
    raise ValueError(
        f"bad server URL {url!r}: expected SCHEME://HOST:PORT with SCHEME one of "
        f"{', '.join(URL_SCHEMES)} ({hint})"
    )


#: The options of ``pyarrow.flight.FlightClient`` a client passes on, by their documented
#: names (TLS: ``tls_root_certs``, ``cert_chain``, ``private_key``, ``override_hostname``,
#: ``disable_server_verification``).
FLIGHT_OPTIONS = frozenset(
    {
        "tls_root_certs",
        "cert_chain",
        "private_key",
        "override_hostname",
        "disable_server_verification",
        "middleware",
        "write_size_limit_bytes",
        "generic_options",
    }
)


def check_options(owner: str, options: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse keyword options ``owner`` does not know, naming the first and the known ones.

    Raises
    ------
    TypeError
        As Python does for an unexpected keyword argument, with a suggestion.
    """
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    bad = unknown[0]
    close = difflib.get_close_matches(bad, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(
        f"{owner}() got an unexpected keyword argument {bad!r}{hint}; "
        f"its Flight and shared-memory options are: {', '.join(sorted(known))}"
    )


class Transport(Protocol):
    """What a client needs from a connection to one server."""

    @property
    def location(self) -> str:
        """The server (or servers), for messages."""
        ...

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


def check_compression(compression: str | None) -> None:
    """Raises ValueError unless ``compression`` is None, ``"zstd"`` or ``"lz4"``."""
    if compression not in (None, "zstd", "lz4"):
        raise ValueError(f"compression must be None, 'zstd' or 'lz4', got {compression!r}")


def check_token(token: object) -> None:
    """Raises ValueError unless ``token`` is a non-empty string without whitespace."""
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ValueError("token must be a non-empty string without whitespace")


def _result(reply: Reply) -> pa.RecordBatch:
    """A result batch with its server times as schema metadata, or the request's error."""
    if "error" in reply.meta:
        raise error_from_reply(reply.meta)
    batch = reply.data
    assert batch is not None  # a metadata-only message is not a reply on a data stream
    times = result_metadata(reply.meta)
    return (
        batch.replace_schema_metadata({**(batch.schema.metadata or {}), **times})
        if times
        else batch
    )


def error_from_reply(reply: Mapping[str, Any]) -> ArrowInferError:
    """The error of a reply ``{"error": {...}, ...}`` (Flight or shared memory)."""
    data = reply.get("error")
    return error_from_dict(data if isinstance(data, dict) else {"message": str(data)})


def _submit(stream: OrderedStream, batch: pa.RecordBatch) -> Future[pa.RecordBatch]:
    """Send one request on a model's stream; its future."""
    future: Future[pa.RecordBatch] = Future()
    future.set_running_or_notify_cancel()  # pipelined: a request cannot be taken back

    def on_reply(reply: Reply | ArrowInferError) -> None:
        if isinstance(reply, ArrowInferError):
            future.set_exception(reply)
            return
        try:
            future.set_result(_result(reply))
        except ArrowInferError as err:
            future.set_exception(err)

    stream.request(on_reply, batch)
    return future


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
        Passed to ``pyarrow.flight.FlightClient``: only the names of :data:`FLIGHT_OPTIONS`
        (``tls_root_certs``, ``cert_chain``, ``private_key``, ``override_hostname``, ...).

    Raises
    ------
    TypeError
        An option that is not one of :data:`FLIGHT_OPTIONS`.
    ValueError
        A bad ``compression`` or ``token``.
    """

    def __init__(
        self,
        location: str,
        *,
        compression: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ):
        check_options("FlightTransport", kwargs, FLIGHT_OPTIONS)
        check_compression(compression)
        if token is not None:
            check_token(token)
            kwargs["middleware"] = [*(kwargs.get("middleware") or []), _BearerToken(token)]
        self.location = location
        self._client = flight.FlightClient(location, **kwargs)
        self._compression = compression
        self._options = pa.ipc.IpcWriteOptions(compression=compression)
        self._first = dump_json({"compression": compression}) if compression else b""
        self._streams: dict[tuple[str, str | None], OrderedStream] = {}
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
        payload = dump_json(body or {})
        with map_flight_errors(self.location):
            results = list(
                self._client.do_action(
                    flight.Action(name, payload), options=self._options_for(timeout)
                )
            )
        return json.loads(results[0].body.to_pybytes()) if results else None

    def _open(self, model: str, version: str | None, schema: pa.Schema) -> OrderedStream:
        path = [model] if version is None else [model, version]
        return OrderedStream(
            self._client,
            flight.FlightDescriptor.for_path(*path),
            self.location,
            name=f"flight-{model}",
            schema=schema,
            options=self._options,
            first_metadata=self._first,
        )

    def _stream_for(self, model: str, version: str | None, schema: pa.Schema) -> OrderedStream:
        """The model's shared stream: opened again when broken or for another schema."""
        key = (model, version)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None or stream.broken is not None or not schema.equals(stream.schema):
                if stream is not None:
                    stream.close()
                stream = self._streams[key] = self._open(model, version, schema)
            return stream

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        return _submit(self._stream_for(model, version, batch.schema), batch)

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        """A stream of its own: at most ``window`` requests in flight, results in order."""
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            return
        stream = self._open(model, version, first.schema)
        try:
            yield from in_order(
                lambda b: _submit(stream, b), itertools.chain([first], iterator), window
            )
        finally:
            stream.close()

    def close(self) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
        with contextlib.suppress(pa.ArrowException, OSError, flight.FlightError):
            self._client.close()
