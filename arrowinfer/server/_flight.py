"""The Arrow Flight front end (the protocol of DESIGN.md).

- ``list_flights``/``get_flight_info``/``get_schema``: one flight per ready model version,
  descriptor path ``[model, version]``, schema = the model's input signature.
- ``do_exchange`` on ``[model]`` or ``[model, version]``: each record batch the client
  writes is one request; the server writes exactly one result batch per request, in order.
  Requests are pipelined: the stream is read while earlier requests run. A failed request
  gets an empty batch whose ``app_metadata`` holds the error; a good one's ``app_metadata``
  holds the server-side times (``queue_ns``, ``compute_input_ns``, ...) and the result's
  provenance (``model``, ``model_version``, ``model_sha256``, ``execution_provider``).
  When the server stops it writes a metadata-only message ``{"goaway": reason}`` on every
  open stream, after the results of the requests it has read: the client finishes its
  writing (half-close), reads the remaining results, and opens no more requests there.
- ``do_action``: ``health``, ``ready``, ``server.metadata``, ``repository.index``,
  ``model.load``, ``model.unload``, ``model.config``, ``model.metadata``,
  ``model.statistics``, and those the server adds (:class:`FlightService` ``actions``).
  Bodies and results are JSON.
- ``do_exchange`` on a one-element path named in the service's ``exchanges`` table: that
  handler serves the stream (the server plugs shared-memory sessions in there).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import pyarrow as pa
from pyarrow import flight

from .. import __version__
from ..batching import Completed
from ..errors import ArrowInferError, InvalidInput, ServerUnavailable, error_to_dict, to_flight
from ..protocol import SERVER_TIMES, dump_json, parse_json
from ._auth import HEADERS_MIDDLEWARE, HeadersMiddleware, ModelControl, flight_authorization
from ._core import InferenceCore, LoadedModel, unexpected
from ._ordered import OrderedReplies, Reply, read_chunks

__all__ = ["ACTIONS", "Action", "Exchange", "FlightService"]

log = logging.getLogger(__name__)

ACTIONS: dict[str, str] = {
    "health": "Is the server live? -> {live}",
    "ready": "Is the server (or {model, version}) ready? -> {ready}",
    "server.metadata": "Name, version and extensions of the server",
    "repository.index": "Every model in the repository, its versions and state",
    "model.load": "{model}: load or reload a model",
    "model.unload": "{model}: stop serving a model",
    "model.config": "{model, version?}: the model's complete config (Triton JSON)",
    "model.metadata": "{model, version?}: inputs and outputs (KServe ModelMetadata)",
    "model.statistics": "{model?, version?}: Triton statistics -> {model_stats}",
}

#: Serves one ``do_exchange`` stream: ``(context, reader, writer)``.
Exchange = Callable[[Any, flight.MetadataRecordBatchReader, flight.MetadataRecordBatchWriter], None]

#: An action added from outside: its description and its handler (JSON body -> JSON result).
Action = tuple[str, Callable[[dict[str, Any]], Any]]


_Call = TypeVar("_Call", bound=Callable[..., Any])


def _guarded(method: _Call) -> _Call:
    """Every exception of a Flight call reaches the client as arrowinfer's error JSON.

    pyarrow would send any other exception's text and traceback (server paths) to the
    client: an unexpected one becomes a generic ``ServerError`` whose details are logged.
    """

    @functools.wraps(method)
    def call(self: FlightService, context: Any, *args: Any) -> Any:
        try:
            return method(self, context, *args)
        except flight.FlightError:
            raise
        except ArrowInferError as err:
            raise to_flight(err) from None
        except Exception as err:  # noqa: BLE001 -- the one place Flight calls hide internals
            raise to_flight(unexpected(err, f"Flight {method.__name__}")) from None

    return call  # type: ignore[return-value]


def _descriptor_model(descriptor: flight.FlightDescriptor) -> tuple[str, str | None]:
    try:
        path = [p.decode() if isinstance(p, bytes) else p for p in (descriptor.path or [])]
    except UnicodeDecodeError:
        raise InvalidInput("a descriptor path must be UTF-8") from None
    if descriptor.descriptor_type != flight.DescriptorType.PATH or not 1 <= len(path) <= 2:
        raise InvalidInput(
            "a model is named by a path descriptor [model] or [model, version]",
            got=f"{descriptor!r}",
        )
    return path[0], (path[1] if len(path) == 2 else None)


class FlightService(flight.FlightServerBase):
    """Serves an :class:`InferenceCore` over Arrow Flight.

    Parameters
    ----------
    core
        The models to serve.
    location
        Where to listen, e.g. ``grpc://127.0.0.1:8815`` (port 0 picks a free one) or
        ``grpc+unix:///path/to.sock``.
    exchanges
        Handlers of other ``do_exchange`` streams, by the one element of their descriptor
        path (the server's shared-memory sessions, say); they take precedence over models.
    actions
        More actions, by name: ``(description, handler)``.
    model_control
        Who may ``model.load``/``model.unload`` (default: nobody, Triton's mode ``none``).
    **kwargs
        Passed to ``pyarrow.flight.FlightServerBase`` (TLS certificates, middleware, ...).
    """

    def __init__(
        self,
        core: InferenceCore,
        location: str,
        *,
        exchanges: Mapping[str, Exchange] | None = None,
        actions: Mapping[str, Action] | None = None,
        model_control: ModelControl | None = None,
        **kwargs: Any,
    ):
        # every call's headers stay readable by the handlers (the admin token)
        kwargs["middleware"] = {
            **kwargs.get("middleware", {}),
            HEADERS_MIDDLEWARE: HeadersMiddleware(),
        }
        try:
            super().__init__(location, **kwargs)
        except pa.ArrowException as err:  # pyarrow says only "Server did not start properly"
            raise OSError(f"Flight cannot listen on {location} (in use?)") from err
        self.core = core
        self.control = model_control or ModelControl()
        self._exchanges = dict(exchanges or {})
        self._descriptions = {**ACTIONS, **{k: d for k, (d, _) in (actions or {}).items()}}
        self._streams: set[OrderedReplies] = set()
        self._streams_lock = threading.Lock()
        self._open = 0  # do_exchange calls in progress (inference and other exchanges)
        self._idle = threading.Condition(self._streams_lock)
        self._draining = False
        self._actions: dict[str, Callable[[dict[str, Any]], Any]] = {
            "health": lambda body: {"live": True},
            "ready": self._ready,
            "server.metadata": lambda body: {
                "name": "arrowinfer",
                "version": __version__,
                "extensions": ["model_repository", "statistics", "arrow_flight"],
            },
            "repository.index": lambda body: self.core.index(),
            "model.load": lambda body: {
                "loaded": [m.version.version for m in self.core.load(_required(body, "model"))]
            },
            "model.unload": self._unload,
            "model.config": lambda body: self.core.config(self._model(body)),
            "model.metadata": lambda body: self.core.metadata(
                _required(body, "model"), body.get("version")
            ),
            "model.statistics": lambda body: {
                "model_stats": self.core.statistics(body.get("model"), body.get("version"))
            },
            **{name: handler for name, (_, handler) in (actions or {}).items()},
        }

    # -- discovery -----------------------------------------------------------------------

    def _info(self, model: LoadedModel) -> flight.FlightInfo:
        version = model.version
        descriptor = flight.FlightDescriptor.for_path(version.name, str(version.version))
        return flight.FlightInfo(version.inputs, descriptor, [], -1, -1)

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        for model in self.core.served():
            yield self._info(model)

    @_guarded
    def get_flight_info(
        self, context: Any, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._info(self._lookup(descriptor))

    @_guarded
    def get_schema(self, context: Any, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self._lookup(descriptor).version.inputs)

    def _lookup(self, descriptor: flight.FlightDescriptor) -> LoadedModel:
        try:
            return self._lookup_model(descriptor)
        except ArrowInferError as err:
            raise to_flight(err) from None

    def _lookup_model(self, descriptor: flight.FlightDescriptor) -> LoadedModel:
        return self.core.get(*_descriptor_model(descriptor))

    # -- inference -----------------------------------------------------------------------

    def drain(self) -> None:
        """Ask the client of every open stream to finish it (``{"goaway": ...}``).

        Call before :meth:`shutdown`, which waits for every call to end: a client that
        keeps an idle stream open would otherwise hold the server forever.
        """
        with self._streams_lock:
            self._draining = True
            streams = list(self._streams)
        for replies in streams:
            replies.goaway()

    def _exchange(self, descriptor: flight.FlightDescriptor) -> Exchange | None:
        """The handler of a descriptor in the exchanges table, if it names one."""
        path = descriptor.path or []
        if descriptor.descriptor_type != flight.DescriptorType.PATH or len(path) != 1:
            return None
        name = path[0].decode(errors="replace") if isinstance(path[0], bytes) else path[0]
        return self._exchanges.get(name)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no ``do_exchange`` call is open (at most ``timeout`` s); True if none.

        The server waits here after :meth:`drain` and before :meth:`shutdown`: gRPC stops
        reading open streams once shutdown begins, and their clients' last requests would
        be cancelled rather than answered.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._open == 0, timeout)

    @_guarded
    def do_exchange(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        with self._idle:
            self._open += 1
        try:
            self._do_exchange(context, descriptor, reader, writer)
        finally:
            with self._idle:
                self._open -= 1
                self._idle.notify_all()

    def _do_exchange(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        exchange = self._exchange(descriptor)
        if exchange is not None:
            exchange(context, reader, writer)
            return
        model = self._lookup(descriptor)  # an unknown model fails the stream at once
        name, version = _descriptor_model(descriptor)  # parsed once per stream
        opened = model.version
        outputs = opened.outputs
        empty: list[pa.RecordBatch] = []  # the failed requests' batch, made once

        def finish(item: tuple[Future[Completed] | BaseException, Any]) -> Reply:
            return _result(item, outputs, empty)

        replies = OrderedReplies(writer, finish, name="flight-writer")
        with self._streams_lock:
            if self._draining:
                raise to_flight(ServerUnavailable("the server is shutting down"))
            self._streams.add(replies)
        try:
            for chunk in read_chunks(reader):
                if chunk.data is None:
                    continue  # a metadata-only message asks for nothing
                try:
                    request_meta = parse_json(chunk.app_metadata)
                except InvalidInput as err:
                    request_meta = {"error": err}
                if not replies.started:
                    compression = request_meta.get("compression")
                    if compression not in (None, "zstd", "lz4_frame", "lz4"):
                        compression = None
                    compression = "lz4_frame" if compression == "lz4" else compression
                    options = pa.ipc.IpcWriteOptions(compression=compression)
                    writer.begin(outputs, options=options)
                    replies.start()
                future: Future[Completed] | BaseException
                stale = False
                # nothing of this stream pending: run the request in this thread if an
                # instance is idle, and write its reply from here too (no hand-offs)
                inline = replies.idle
                try:
                    if "error" in request_meta:
                        raise request_meta["error"]
                    # looked up for each request: a model reloaded (or unloaded) since the
                    # stream opened is served as it is now, never through its closed queue
                    model = self.core.get(name, version)
                    # a reload makes a new version object: compare schemas only then
                    if model.version is not opened and not model.version.outputs.equals(outputs):
                        stale = True  # answer, then end the stream: the client reopens it
                        raise ServerUnavailable(
                            f"model {model.version.name!r} was reloaded with other outputs; "
                            "open a new stream"
                        )
                    # an open stream is served to its end, even while the server stops:
                    # new streams are refused then, and this one was asked to finish
                    future = self.core.submit(
                        model,
                        chunk.data,
                        draining=True,
                        priority=_meta_int(request_meta, "priority"),
                        timeout_us=_meta_int(request_meta, "timeout"),
                        inline=inline,
                    )
                except ArrowInferError as err:
                    future = err
                # the buffers' sizes, not nbytes: that would read unchecked offsets
                size = chunk.data.get_total_buffer_size()
                # a refused request's data (its error's traceback holds it too) goes once its
                # reply is written, not when the next request comes
                del chunk
                item = (future, request_meta.get("id"))
                if inline and (isinstance(future, BaseException) or future.done()):
                    replies.write_now(item, size)
                else:
                    replies.put(
                        item, size, ready=None if isinstance(future, BaseException) else future
                    )
                del item, future  # hold no result while reading the next request
                if replies.failure is not None or stale:
                    break
        finally:
            with self._streams_lock:
                self._streams.discard(replies)
            replies.close()
        if replies.failure is not None:
            raise to_flight(replies.failure)

    # -- actions -------------------------------------------------------------------------

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return list(self._descriptions.items())

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        handler = self._actions.get(action.type)
        try:
            if handler is None:
                raise InvalidInput(
                    f"unknown action {action.type!r}",
                    expected=sorted(self._descriptions),
                    got=action.type,
                )
            if action.type in ("model.load", "model.unload"):
                self.control.check(action.type.partition(".")[2], flight_authorization(context))
            body = parse_json(
                action.body.to_pybytes() if action.body is not None else None, "the action body"
            )
            result = handler(body)
        except ArrowInferError as err:
            raise to_flight(err) from None
        except Exception as err:  # noqa: BLE001 -- its text may hold server internals
            raise to_flight(unexpected(err, f"action {action.type}")) from None
        yield dump_json(result)

    def _ready(self, body: dict[str, Any]) -> dict[str, bool]:
        if body.get("model"):
            try:
                self.core.get(body["model"], body.get("version"))
            except ArrowInferError:
                return {"ready": False}
            return {"ready": self.core.ready}
        return {"ready": self.core.server_ready()}

    def _unload(self, body: dict[str, Any]) -> dict[str, Any]:
        self.core.unload(_required(body, "model"))
        return {}

    def _model(self, body: dict[str, Any]) -> LoadedModel:
        return self.core.get(_required(body, "model"), body.get("version"))


def _result(
    item: tuple[Future[Completed] | BaseException, Any],
    outputs: pa.Schema,
    empty: list[pa.RecordBatch],
) -> Reply:
    """A request's reply: its result batch and times, or an empty batch and its error."""
    outcome, request_id = item
    meta: dict[str, Any] = {} if request_id is None else {"id": request_id}
    try:
        if isinstance(outcome, BaseException):
            raise outcome
        done = outcome.result()
    except Exception as err:  # noqa: BLE001 -- the request's error, for its client
        if not isinstance(err, ArrowInferError):
            err = unexpected(err, "request")
        if not empty:
            empty.append(pa.RecordBatch.from_pylist([], schema=outputs))
        meta["error"] = error_to_dict(err)
        return empty[0], meta
    meta.update({key: getattr(done, key) for key in SERVER_TIMES})
    meta.update(done.metadata)  # provenance, truncation
    return done.batch, meta


def _meta_int(meta: dict[str, Any], key: str) -> int:
    """A request's ``priority`` or ``timeout`` (microseconds) from its app_metadata; 0: none."""
    value = meta.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"request metadata {key!r} must be a non-negative integer", got=repr(value)[:40]
        )
    return value


def _required(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"the action needs {{{key!r}: ...}} in its JSON body", got=body)
    return value
