"""One exception hierarchy for client and server, and one table mapping it to status codes.

::

    ArrowInferError
    ├── TransportError          the request may not have reached a model: safe to retry elsewhere
    │   ├── ServerUnavailable   connection refused or reset, server gone or shutting down
    │   │   └── ServerBusy      the model's queue is full (max_queue_size); try later or elsewhere
    │   └── Timeout             the deadline passed before an answer came
    ├── RequestError            the request itself is wrong: never retried
    │   ├── ModelNotFound       (also a KeyError) no such model or version
    │   ├── InvalidInput        (also a ValueError) wrong columns, dtype, shape, nulls, rows
    │   └── Unauthenticated     missing or wrong token
    ├── ModelError              a model in the repository cannot be loaded (bad config or ONNX)
    └── ServerError             anything else that went wrong inside the server

Every class has one gRPC status code (``STATUS_CODES``); the server raises with it and the
client maps the code plus the class name it carries back to the same class.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

import grpc
from pyarrow import flight

__all__ = [
    "STATUS_CODES",
    "ArrowInferError",
    "InvalidInput",
    "ModelError",
    "ModelNotFound",
    "RequestError",
    "ServerBusy",
    "ServerError",
    "ServerUnavailable",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "error_class",
    "error_from_dict",
    "error_to_dict",
    "from_flight",
    "to_flight",
]


class ArrowInferError(Exception):
    """Base of every error arrowinfer raises on purpose."""


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
    """No model (or version) of that name; the message lists the ones that exist."""

    def __init__(self, model: str, available: Iterable[str] = (), *, version: str | None = None):
        self.model = model
        self.version = version
        self.available = sorted(available)
        what = f"model {model!r}" + (f" version {version}" if version else "")
        close = difflib.get_close_matches(model, self.available, n=3)
        known = ", ".join(close or self.available) or "none"
        hint = "did you mean" if close else "available"
        super().__init__(f"{what} is not served ({hint}: {known})")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidInput(RequestError, ValueError):
    """A request that does not fit the model's signature.

    The message names the model, the input, what was expected and what came.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        input: str | None = None,
        expected: object = None,
        got: object = None,
    ):
        self.model = model
        self.input = input
        self.expected = expected
        self.got = got
        where = []
        if model is not None:
            where.append(f"model {model!r}")
        if input is not None:
            where.append(f"input {input!r}")
        text = ", ".join(where) + ": " + message if where else message
        if expected is not None or got is not None:
            text += f" (expected {expected}, got {got})"
        super().__init__(text)


class Unauthenticated(RequestError):
    """The server wants a valid bearer token."""


class ModelError(ArrowInferError):
    """A model in the repository cannot be loaded: the message names the file and the problem."""


class ServerError(ArrowInferError):
    """Something went wrong inside the server; its log has the details."""


#: The gRPC status code each error travels as, as Triton uses them.
STATUS_CODES: dict[type[ArrowInferError], grpc.StatusCode] = {
    ServerBusy: grpc.StatusCode.UNAVAILABLE,
    ServerUnavailable: grpc.StatusCode.UNAVAILABLE,
    Timeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
    ServerError: grpc.StatusCode.INTERNAL,
    TransportError: grpc.StatusCode.UNAVAILABLE,
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ArrowInferError: grpc.StatusCode.INTERNAL,
}

_BY_NAME: dict[str, type[ArrowInferError]] = {cls.__name__: cls for cls in STATUS_CODES}
_BY_CODE: dict[grpc.StatusCode, type[ArrowInferError]] = {}
for _cls, _code in STATUS_CODES.items():
    _BY_CODE.setdefault(_code, _cls)


def error_class(code: grpc.StatusCode, name: str | None = None) -> type[ArrowInferError]:
    """The error class for a status code, refined by the class name the server sent with it."""
    cls = _BY_NAME.get(name or "")
    if cls is not None and STATUS_CODES[cls] == code:
        return cls
    return _BY_CODE.get(code, ServerError)


def error_to_dict(err: BaseException) -> dict[str, Any]:
    """An error as JSON-able data for the wire: its class name, message and context."""
    if not isinstance(err, ArrowInferError):
        err = ServerError(f"internal error: {type(err).__name__}")
    out: dict[str, Any] = {"type": type(err).__name__, "message": str(err)}
    for key in ("model", "input"):
        value = getattr(err, key, None)
        if value is not None:
            out[key] = value
    return out


def error_from_dict(data: dict[str, Any], code: grpc.StatusCode | None = None) -> ArrowInferError:
    """The error :func:`error_to_dict` described, as the same class (a plain message)."""
    name = str(data.get("type", ""))
    cls = _BY_NAME.get(name) or (error_class(code) if code is not None else ServerError)
    err = cls.__new__(cls)
    Exception.__init__(err, str(data.get("message", name)))
    for key in ("model", "input"):
        setattr(err, key, data.get(key))
    return err


_FLIGHT_ERRORS: dict[grpc.StatusCode, type[flight.FlightError]] = {
    grpc.StatusCode.UNAVAILABLE: flight.FlightUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: flight.FlightTimedOutError,
    grpc.StatusCode.UNAUTHENTICATED: flight.FlightUnauthenticatedError,
    grpc.StatusCode.INTERNAL: flight.FlightInternalError,
}


def to_flight(err: BaseException) -> flight.FlightError:
    """The Flight error a server raises for ``err``; the class travels in ``extra_info``.

    Flight has no INVALID_ARGUMENT or NOT_FOUND error class, so request errors travel as
    ``FlightServerError`` and the client restores the class from ``extra_info``.
    """
    data = error_to_dict(err)
    code = STATUS_CODES.get(type(err), grpc.StatusCode.INTERNAL)  # type: ignore[call-overload]
    cls = _FLIGHT_ERRORS.get(code, flight.FlightServerError)
    return cls(data["message"], json.dumps(data).encode())


def from_flight(exc: flight.FlightError) -> ArrowInferError:
    """The arrowinfer error for a Flight error a client received."""
    info = getattr(exc, "extra_info", b"") or b""
    try:
        data = json.loads(info) if info else {}
    except ValueError:
        data = {}
    if isinstance(data, dict) and "type" in data:
        return error_from_dict(data)
    message = str(exc).split(". Detail:", 1)[0]
    if isinstance(exc, flight.FlightUnavailableError):
        return ServerUnavailable(message)
    if isinstance(exc, flight.FlightTimedOutError):
        return Timeout(message)
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return Unauthenticated(message)
    return ServerError(message)
