"""One exception hierarchy for client and server, and one table mapping it to status codes.

::

    ArrowInferError
    ├── TransportError          the request may not have reached a model: safe to retry elsewhere
    │   ├── ServerUnavailable   connection refused or reset, server gone or shutting down
    │   │   └── ServerBusy      the model's queue is full (max_queue_size); try later or elsewhere
    │   └── Timeout             the deadline passed before an answer came
    ├── RequestError            the request itself is wrong: never retried
    │   ├── ModelNotFound       (also a KeyError) no such model or version
    │   ├── RegionNotFound      (also a KeyError) no shared-memory region of that name
    │   ├── InvalidInput        (also a ValueError) wrong columns, dtype, shape, nulls, rows
    │   ├── Unsupported         a protocol feature this server does not implement
    │   └── Unauthenticated     missing or wrong token
    ├── ModelError              a model in the repository cannot be loaded (bad config or ONNX)
    └── ServerError             anything else that went wrong inside the server

Every class has one gRPC status code (:data:`STATUS_CODES`, by name, so that this module
needs no ``grpc``); a subclass defined elsewhere travels as its nearest class of this table
(the most specific one wins: the class hierarchy is walked). On the wire an error is a JSON
object (:func:`error_to_dict`): its ``type``, its ``message`` and every field its
constructor takes (``model``, ``input``, ``expected``, ``got``, ``available``, ...); the
client rebuilds it with that constructor (:func:`error_from_dict`), fields included.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import pyarrow as pa
from pyarrow import flight

__all__ = [
    "STATUS_CODES",
    "ArrowInferError",
    "InvalidInput",
    "ModelError",
    "ModelNotFound",
    "RegionNotFound",
    "RequestError",
    "ServerBusy",
    "ServerError",
    "ServerUnavailable",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "Unsupported",
    "error_class",
    "error_from_dict",
    "error_to_dict",
    "from_exception",
    "from_flight",
    "grpc_status",
    "public_class",
    "to_flight",
]


class ArrowInferError(Exception):
    """Base of every error arrowinfer raises on purpose.

    ``fields`` names the constructor's keyword arguments that are kept as attributes of
    the same name; they travel with the error (:func:`error_to_dict`).
    """

    fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _rebuild(cls, message: str, fields: Mapping[str, Any]) -> ArrowInferError:
        """The error from its wire message and fields (its real constructor)."""
        return cls(message)


class TransportError(ArrowInferError):
    """The request may not have reached a model; another server may answer it."""


class ServerUnavailable(TransportError):
    """The server cannot be reached, or is not serving (starting, draining, gone)."""


class ServerBusy(ServerUnavailable):
    """The model's queue is full (``max_queue_size`` in its config): nothing was queued."""


class Timeout(TransportError):
    """No answer before the deadline."""


class RequestError(ArrowInferError):
    """The request itself is wrong; sending it again, anywhere, gives the same error."""


class ModelNotFound(RequestError, KeyError):
    """No model (or version) of that name; the message lists the ones that exist, and why
    the model is not served when it failed to load.

    Attributes ``model`` (str), ``available`` (sorted list of str), ``version`` (str or
    None), ``reason`` (str or None: its load error, as the repository index gives it).
    """

    fields = ("model", "available", "version", "reason")

    def __init__(
        self,
        model: str,
        available: Iterable[str] = (),
        *,
        version: str | None = None,
        reason: str | None = None,
    ):
        self.model = model
        self.version = version
        self.available = sorted(available)
        self.reason = reason
        what = f"model {model!r}" + (f" version {version}" if version else "")
        close = difflib.get_close_matches(model, self.available, n=3)
        known = f"available: {', '.join(self.available) or 'none'}"
        hint = f"did you mean: {', '.join(close)}; {known}" if close else known
        why = f": it failed to load: {reason}" if reason else ""
        super().__init__(f"{what} is not served{why} ({hint})")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

    @classmethod
    def _rebuild(cls, message: str, fields: Mapping[str, Any]) -> ArrowInferError:
        return cls(
            str(fields["model"]),
            [str(name) for name in fields.get("available") or ()],
            version=None if fields.get("version") is None else str(fields["version"]),
            reason=None if fields.get("reason") is None else str(fields["reason"]),
        )


class RegionNotFound(RequestError, KeyError):
    """No shared-memory region of that name is registered for this client's user (Triton
    answers NOT_FOUND too: ``Unable to find shared memory region``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidInput(RequestError, ValueError):
    """A request that does not fit the model's signature.

    The message names the model, the input (or the requested output), what was expected
    and what came; so do the attributes ``reason`` (the message as given), ``model``,
    ``input``, ``output``, ``expected``, ``got``.
    """

    fields = ("reason", "model", "input", "output", "expected", "got")

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        input: str | None = None,
        output: str | None = None,
        expected: object = None,
        got: object = None,
    ):
        self.reason = message
        self.model = model
        self.input = input
        self.output = output
        self.expected = expected
        self.got = got
        where = []
        if model is not None:
            where.append(f"model {model!r}")
        if input is not None:
            where.append(f"input {input!r}")
        if output is not None:
            where.append(f"output {output!r}")
        text = ", ".join(where) + ": " + message if where else message
        said = [f"{k} {v}" for k, v in (("expected", expected), ("got", got)) if v is not None]
        if said:
            text += f" ({', '.join(said)})"
        super().__init__(text)

    @classmethod
    def _rebuild(cls, message: str, fields: Mapping[str, Any]) -> ArrowInferError:
        model, input_, output = fields.get("model"), fields.get("input"), fields.get("output")
        return cls(
            str(fields.get("reason", message)),
            model=None if model is None else str(model),
            input=None if input_ is None else str(input_),
            output=None if output is None else str(output),
            expected=fields.get("expected"),
            got=fields.get("got"),
        )


class Unauthenticated(RequestError):
    """The server wants a valid bearer token."""


class Unsupported(RequestError):
    """A protocol feature (a Triton extension, say) that this server does not implement."""


class ModelError(ArrowInferError):
    """A model in the repository cannot be loaded: the message names the file and the problem."""


class ServerError(ArrowInferError):
    """Something went wrong inside the server; its log has the details."""


#: The gRPC status code (a ``grpc.StatusCode`` name) each class travels as, as Triton uses
#: them. A class not listed travels as its nearest listed base class.
STATUS_CODES: dict[type[ArrowInferError], str] = {
    ServerBusy: "UNAVAILABLE",
    ServerUnavailable: "UNAVAILABLE",
    Timeout: "DEADLINE_EXCEEDED",
    ModelNotFound: "NOT_FOUND",
    RegionNotFound: "NOT_FOUND",
    InvalidInput: "INVALID_ARGUMENT",
    Unauthenticated: "UNAUTHENTICATED",
    Unsupported: "UNIMPLEMENTED",
    ModelError: "FAILED_PRECONDITION",
    ServerError: "INTERNAL",
    TransportError: "UNAVAILABLE",
    RequestError: "INVALID_ARGUMENT",
    ArrowInferError: "INTERNAL",
}

_BY_NAME: dict[str, type[ArrowInferError]] = {cls.__name__: cls for cls in STATUS_CODES}
#: The class a bare status code means (the first listed with it).
_BY_CODE: dict[str, type[ArrowInferError]] = {}
for _cls, _code in STATUS_CODES.items():
    _BY_CODE.setdefault(_code, _cls)


def public_class(err: BaseException) -> type[ArrowInferError]:
    """The most specific class of :data:`STATUS_CODES` that ``err`` is an instance of.

    Anything that is not an :class:`ArrowInferError` is a :class:`ServerError`.
    """
    for cls in type(err).__mro__:
        if cls in STATUS_CODES:
            return cls
    return ServerError


def grpc_status(err: BaseException) -> tuple[str, str]:
    """The gRPC status (a ``grpc.StatusCode`` name) and message an exception travels as.

    Anything that is not an :class:`ArrowInferError` is INTERNAL with a generic message:
    its text may hold server details, so log it rather than send it.
    """
    if not isinstance(err, ArrowInferError):
        return "INTERNAL", f"internal error ({type(err).__name__}); the server log has the details"
    return STATUS_CODES[public_class(err)], str(err)


def _code_name(code: Any) -> str:
    """A status code's name, from a name or an enum member (``grpc.StatusCode.NOT_FOUND``)."""
    return code if isinstance(code, str) else str(getattr(code, "name", code))


def error_class(code: Any, name: str | None = None) -> type[ArrowInferError]:
    """The error class for a status code, refined by the class name the server sent with it.

    ``code`` is a ``grpc.StatusCode`` or its name.
    """
    code = _code_name(code)
    cls = _BY_NAME.get(name or "")
    if cls is not None and STATUS_CODES[cls] == code:
        return cls
    return _BY_CODE.get(code, ServerError)


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can carry it as it is, else its text (what its message shows)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    with contextlib.suppress(TypeError, ValueError):
        return json.loads(json.dumps(value, allow_nan=False))
    return str(value)


def error_to_dict(err: BaseException) -> dict[str, Any]:
    """An error as JSON-able data for the wire: ``type``, ``message`` and every field.

    ``type`` is the most specific class of :data:`STATUS_CODES` (:func:`public_class`);
    the fields are that class's (``ModelNotFound``: ``model``, ``available``, ``version``;
    ``InvalidInput``: ``reason``, ``model``, ``input``, ``expected``, ``got``). An exception
    that is not an :class:`ArrowInferError` is a ``ServerError`` with a generic message.
    """
    if not isinstance(err, ArrowInferError):
        err = ServerError(f"internal error: {type(err).__name__}")
    cls = public_class(err)
    out: dict[str, Any] = {"type": cls.__name__, "message": str(err)}
    for key in cls.fields:
        out[key] = _jsonable(getattr(err, key, None))
    return out


def error_from_dict(data: Mapping[str, Any], code: Any = None) -> ArrowInferError:
    """The error :func:`error_to_dict` described, made again by its class's constructor.

    An unknown ``type`` falls back to the class of the status ``code`` (a
    ``grpc.StatusCode`` or its name), else :class:`ServerError`. The message is the one the
    server sent, even where the rebuilt fields would print differently (a tuple sent as a
    list). Fields that do not fit the constructor leave a plain error of the class.
    """
    name = str(data.get("type", ""))
    cls = _BY_NAME.get(name) or (error_class(code) if code is not None else ServerError)
    message = str(data.get("message", name))
    try:
        err = cls._rebuild(message, data)
    except (KeyError, TypeError, ValueError):  # fields the constructor cannot take
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        for key in cls.fields:
            setattr(err, key, data.get(key))
    if str(err) != message:
        err.args = (message,)
    return err


#: The Flight error class each status code travels as; Flight has none for
#: INVALID_ARGUMENT, NOT_FOUND or FAILED_PRECONDITION: those go as ``FlightServerError``
#: and the client restores the class from ``extra_info``.
_FLIGHT_ERRORS: dict[str, type[flight.FlightError]] = {
    "UNAVAILABLE": flight.FlightUnavailableError,
    "DEADLINE_EXCEEDED": flight.FlightTimedOutError,
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "INTERNAL": flight.FlightInternalError,
}


def to_flight(err: BaseException) -> flight.FlightError:
    """The Flight error a server raises for ``err``; the error's JSON travels in ``extra_info``."""
    data = error_to_dict(err)
    code = STATUS_CODES[_BY_NAME[data["type"]]]
    cls = _FLIGHT_ERRORS.get(code, flight.FlightServerError)
    return cls(data["message"], json.dumps(data).encode())


#: What a Flight error without arrowinfer's JSON means (another server, or the transport).
_FLIGHT_CLASSES: tuple[tuple[type[Exception], type[ArrowInferError]], ...] = (
    # raised by the client itself: a batch over ``write_size_limit_bytes``, anywhere
    (flight.FlightWriteSizeExceededError, InvalidInput),
    (flight.FlightUnavailableError, ServerUnavailable),
    (flight.FlightTimedOutError, Timeout),
    (flight.FlightCancelledError, ServerUnavailable),
    (flight.FlightUnauthenticatedError, Unauthenticated),
    (flight.FlightUnauthorizedError, Unauthenticated),
)

#: The most ``extra_info`` read as JSON: an error's JSON is small.
_MAX_INFO_BYTES = 1024 * 1024


def from_flight(exc: flight.FlightError | flight.FlightWriteSizeExceededError) -> ArrowInferError:
    """The arrowinfer error for a Flight error a client received.

    ``extra_info`` holding an error's JSON gives the error itself; otherwise the Flight
    class decides (unavailable, timed out, cancelled, unauthenticated, else server error).
    """
    info = getattr(exc, "extra_info", b"") or b""
    data: Any = None
    if 0 < len(info) <= _MAX_INFO_BYTES:
        # lenient on purpose: a reply that is not arrowinfer's JSON still maps by class
        with contextlib.suppress(ValueError, RecursionError):
            data = json.loads(info.decode("utf-8"))
    if isinstance(data, dict) and "type" in data:
        return error_from_dict(data)
    message = str(exc).split(". Detail:", 1)[0]
    for flight_class, cls in _FLIGHT_CLASSES:
        if isinstance(exc, flight_class):
            return cls(message)
    return ServerError(message)


#: gRPC's UNIMPLEMENTED "Method not found" (pyarrow: ArrowNotImplementedError) at a Flight
#: call: the server speaks gRPC, not Flight.
_NOT_FLIGHT = (
    "(not an Arrow Flight server: a KServe/Triton gRPC port answers so; arrowinfer's "
    "Flight port is `arrowinfer serve --port`, 8815 by default)"
)


def from_exception(exc: BaseException, where: str) -> ArrowInferError:
    """The arrowinfer error for any exception a client's I/O raised (``where``: the server).

    Flight errors map as :func:`from_flight`; every other Arrow or socket error (a reset
    connection, a stream that ended mid-message) means the server cannot be reached, as
    ``ServerUnavailable``; an arrowinfer error stays what it is. Anything else is a
    ``ServerError`` naming its type.
    """
    if isinstance(exc, ArrowInferError):
        return exc
    if isinstance(exc, flight.FlightError | flight.FlightWriteSizeExceededError):
        return from_flight(exc)  # the second is an ArrowInvalid, not a FlightError
    if isinstance(exc, pa.ArrowException | OSError | EOFError):
        if isinstance(exc, pa.ArrowNotImplementedError) and "Method not found" in str(exc):
            return ServerUnavailable(f"{where}: {exc} {_NOT_FLIGHT}")
        return ServerUnavailable(f"{where}: {exc}")
    return ServerError(f"{where}: {type(exc).__name__}: {exc}")
