"""The KServe v2 HTTP/REST front end (Triton's HTTP endpoints), over the same core.

A Starlette application served by uvicorn (on uvloop) in a thread of its own; inference
requests skip Starlette's router and middlewares (:class:`_InferenceFirst`), and those of
one turn of the event loop are submitted together, run on its thread when quick
(:class:`_SameTurn`). Every endpoint adapts
the same :class:`~arrowinfer.server.InferenceCore` as Flight and KServe gRPC; an inference
request is turned into the :class:`~._v2request.InferRequest` the gRPC front end makes of
its protobuf, so that both share one path (:mod:`._v2`, :mod:`._v2tensors`,
:mod:`._v2memory`). ``tritonclient.http`` (sync and gevent/asyncio) and plain ``curl``
talk to it unchanged.

Endpoints (``VERSION`` optional everywhere, as in Triton)::

    GET  /v2/health/live, /v2/health/ready           200, or 400 when not ready
    GET  /v2                                         server metadata
    GET  /v2/models/NAME[/versions/V]                model metadata
    GET  /v2/models/NAME[/versions/V]/ready          200 or 400
    GET  /v2/models/NAME[/versions/V]/config         the model's config (JSON)
    GET  /v2/models[/NAME[/versions/V]]/stats        {"model_stats": [...]}
    POST /v2/models/NAME[/versions/V]/infer          inference
    POST /v2/repository/index                        [{"name","version","state","reason"}]
    POST /v2/repository/models/NAME/load, /unload
    GET  /v2/systemsharedmemory[/region/R]/status
    POST /v2/systemsharedmemory/region/R/register    {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/R]/unregister
    GET  /v2/cudasharedmemory[/region/R]/status      [] (R: not registered)
    POST /v2/cudasharedmemory[/region/R]/unregister  200 (none is ever registered)
    POST /v2/cudasharedmemory/region/R/register      501: not supported

Inference
---------
- Tensors come as JSON (``"data"``: a flat or nested list, row-major) or, with Triton's
  binary tensor data extension, as bytes after the JSON header: the header's length is in
  ``Inference-Header-Content-Length`` and each binary input says its
  ``parameters.binary_data_size``; the bytes follow in input order. An output is answered
  in binary when its request says ``parameters.binary_data: true`` (or the request says
  ``parameters.binary_data_output: true``), else as JSON ``data``; binary outputs follow
  the JSON header in the order of ``outputs``, and the response says the header's length
  in ``Inference-Header-Content-Length``. System shared memory as over gRPC.
- Request bodies may be compressed (``Content-Encoding: gzip`` or ``deflate``), and the
  response is compressed when ``Accept-Encoding`` asks for one of those. The body,
  compressed and decompressed, is bounded by ``max_request_bytes`` (the server passes the
  smaller of its ``--max-request-bytes`` and Triton's ``--http-max-input-size``).
- Errors are Triton's: a JSON body ``{"error": "message"}`` with the HTTP status Triton
  gives the same error (400 invalid argument, 404 not found, 503 unavailable or timed
  out, 501 not supported, 500 internal, 401 missing or bad bearer token).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..batching import Completed, DynamicBatcher
from ..errors import ArrowInferError, InvalidInput, Unsupported, grpc_status
from ..protocol import dump_json, parse_json
from ..schema import datatype
from ..tensors import ALIGNMENT
from . import _v2
from ._auth import ModelControl, TokenCheck
from ._core import MAX_REQUEST_BYTES, InferenceCore, LoadedModel
from ._v2memory import CUDA_UNSUPPORTED, NO_PEER, Peer, SystemRegions, cuda_status
from ._v2request import InferRequest, InputTensor, Parameter, RequestedOutput
from ._v2tensors import InferAnswer, named

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "HTTP_MAX_INPUT_SIZE",
    "HTTP_STATUS",
    "HttpServer",
    "start_http",
]

log = logging.getLogger(__name__)

#: The largest request body (compressed, and again decompressed) by default: the core's.
DEFAULT_MAX_REQUEST_BYTES = MAX_REQUEST_BYTES

#: Triton's ``--http-max-input-size`` default (64 MiB): the largest HTTP request body
HTTP_MAX_INPUT_SIZE = 64 << 20


#: The HTTP status of each gRPC status code, as Triton's HTTP server answers the same
#: errors (a request timeout is UNAVAILABLE in Triton: 503).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "ALREADY_EXISTS": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 503,
    "UNIMPLEMENTED": 501,
    "UNAUTHENTICATED": 401,
    "INTERNAL": 500,
}

_HEADER_LENGTH = "Inference-Header-Content-Length"

#: How long an idle connection stays open (uvicorn's default is 5 s; nginx's 75 s). A
#: client whose next POST crosses the server's close gets "connection closed", and
#: tritonclient.http does not retry a POST: with 5 s, clients that pause about that long
#: between requests (JSON tensors of 256 KB at 32 in flight, in the benchmark) failed.
_KEEP_ALIVE_S = 75

#: The longest the requests of one turn of the event loop may be expected to take
#: (:class:`_SameTurn`) to run on the loop's thread: a longer run gains little from saving
#: the thread hand-offs, and runs on the batcher's thread.
_LOOP_RUN_NS = 1_000_000

#: A model whose requests held the event loop longer than this (its time depends on its
#: data rather than its rows, say) never runs there again (:class:`_SameTurn`).
_LOOP_HELD_NS = 10 * _LOOP_RUN_NS


def _error_answer(err: BaseException, what: str) -> tuple[int, dict[str, str]]:
    """Triton's error answer: the HTTP status and the body ``{"error": message}``."""
    if not isinstance(err, ArrowInferError):
        log.error("HTTP %s failed", what, exc_info=err)
    code, message = grpc_status(err)
    return HTTP_STATUS.get(code, 400), {"error": message}


def _error(err: BaseException, what: str) -> JSONResponse:
    status, body = _error_answer(err, what)
    return JSONResponse(body, status_code=status)


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(handler: Handler) -> Handler:
    """Run a handler; turn any exception into Triton's error answer."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log loudly
            log.debug("HTTP %s: the client went away", handler.__name__)
            return Response(status_code=400)
        except Exception as err:  # noqa: BLE001 -- the one place errors become HTTP statuses
            return _error(err, handler.__name__)

    run.__name__ = handler.__name__
    return run


def _peer(scope: Any) -> Peer:
    """The client of an ASGI ``scope`` as gRPC writes a peer (``ipv4:127.0.0.1:5000``),
    for the shm rules."""
    client = scope.get("client")
    if client is None:
        return NO_PEER
    host, port = client
    server = scope.get("server")
    address = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return Peer(address, int(server[1]) if server and server[1] else None)


# -- bodies -------------------------------------------------------------------------------


#: The request headers an inference request reads.
_INFER_HEADERS = frozenset(
    (b"content-length", b"content-encoding", b"accept-encoding", b"inference-header-content-length")
)


def _infer_headers(scope: Scope) -> dict[str, str]:
    """The headers of :data:`_INFER_HEADERS` an ASGI request has, each its first value, by
    lowercase name (ASGI's names are lowercase): one pass, where Starlette's ``Headers``
    scans them all for every lookup."""
    found: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in _INFER_HEADERS:
            found.setdefault(key.decode("latin-1"), value.decode("latin-1"))
    return found


def _length(text: str | None) -> int | None:
    """A length header's value; None when absent or not a plain ASCII decimal of at most 18
    digits (``str.isdigit`` alone admits ``²``, which ``int`` refuses; Python refuses very
    long ones too, and no body is that large)."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)


_TOO_LARGE = "the request body is too large (--http-max-input-size, --max-request-bytes)"


async def _body(
    headers: Mapping[str, str], receive: Receive, limit: int, align_at: int = 0
) -> bytes | memoryview:
    """The request body (its ``headers``, ASGI's ``receive``), decompressed; at most
    ``limit`` bytes either way.

    An uncompressed body is joined into one buffer whose byte ``align_at`` (where the
    binary tensor data starts) lies at a multiple of :data:`ALIGNMENT` bytes: onnxruntime
    then takes the tensors as they are, with no alignment copy
    (:func:`~arrowinfer.backends.base.aligned`). Memory is taken as the body arrives,
    never on the word of its Content-Length alone.

    Raises
    ------
    InvalidInput
        Too large, an unknown ``Content-Encoding``, or a body that does not decompress.
    ClientDisconnect
        The client went away before the whole body came.
    """
    declared = _length(headers.get("content-length"))
    if declared is not None and declared > limit:
        raise InvalidInput(_TOO_LARGE, expected=f"at most {limit} bytes", got=declared)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    chunks, size = [], 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise InvalidInput(_TOO_LARGE, expected=f"at most {limit} bytes")
        chunks.append(chunk)
    if encoding in ("", "identity"):
        return _aligned_join(chunks, size, align_at)
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInput(
            "unsupported Content-Encoding", expected="gzip, deflate or identity", got=encoding
        )
    inflate = zlib.decompressobj(wbits)
    try:
        data = inflate.decompress(b"".join(chunks), limit + 1)  # a bomb stops at limit + 1
    except zlib.error as err:
        raise InvalidInput(f"the {encoding} request body does not decompress: {err}") from None
    if len(data) > limit:
        raise InvalidInput("decompressed, " + _TOO_LARGE, expected=f"at most {limit} bytes")
    if not inflate.eof:
        raise InvalidInput(f"the {encoding} request body is truncated")
    if inflate.unused_data:
        raise InvalidInput(f"data after the end of the {encoding} request body")
    return data


def _aligned_join(chunks: list[bytes], size: int, align_at: int) -> memoryview:
    """``chunks`` (``size`` bytes) joined into one buffer, byte ``align_at`` 64-byte aligned.

    The buffer is from Arrow's pool, as every aligned copy (backends.base.aligned_empty):
    its blocks are reused, where a fresh numpy allocation of a large body page-faults anew.
    """
    raw = pa.allocate_buffer(size + ALIGNMENT)
    skip = -(raw.address + min(align_at, size)) % ALIGNMENT
    body = np.frombuffer(raw, dtype=np.uint8)[skip : skip + size].data
    at = 0
    for chunk in chunks:
        body[at : at + len(chunk)] = chunk
        at += len(chunk)
    return body


def _compressed(
    accept: str | None, parts: list[bytes | memoryview], headers: list[tuple[bytes, bytes]]
) -> list[bytes | memoryview]:
    """A body's ``parts`` compressed as the client's ``Accept-Encoding`` (``accept``) asks
    (gzip, then deflate), as one part; its ``Content-Encoding`` added to ``headers``."""
    if not accept:
        return parts
    accepted = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "gzip" in accepted:
        headers.append((b"content-encoding", b"gzip"))
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    elif "deflate" in accepted:
        headers.append((b"content-encoding", b"deflate"))
        compressor = zlib.compressobj()
    else:
        return parts
    return [b"".join([*map(compressor.compress, parts), compressor.flush()])]


# -- inference: JSON and binary <-> the v2 request ----------------------------------------

#: Dims and parameters are int64 (or uint64) in KServe: JSON's integers have no bound.
_INT64_END, _UINT64_END = 2**63, 2**64


def _carried(text: str) -> str:
    """``text``, if UTF-8 can carry it (JSON's ``\\ud800`` escapes make lone surrogates,
    which protobuf refuses and a gRPC client could not send).

    Raises
    ------
    UnicodeEncodeError
        When it cannot (:func:`infer_request` says so).
    """
    if not text.isascii():
        text.encode()
    return text


def _object(entry: dict[str, Any], what: str) -> dict[str, Any]:
    """``entry["parameters"]``: a JSON object, ``{}`` when absent or null.

    Raises
    ------
    InvalidInput
        Anything else (``false``, ``0`` and ``[]`` too).
    """
    params = entry.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(
            f"the parameters of the {what} must be a JSON object", got=type(params).__name__
        )
    return params


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false parameter (``binary_data``, ``binary_data_output``).

    Raises
    ------
    InvalidInput
        Another kind of value (the string "false" is not false).
    """
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {key!r} must be true or false", got=value)
    return value


def _parameters(
    params: dict[str, Any], what: str, skip: Iterable[str] = ()
) -> dict[str, Parameter]:
    """A JSON ``parameters`` object (:func:`_object`) as KServe's: bools, int64 or uint64,
    doubles, strings.

    Raises
    ------
    InvalidInput
        A value of another kind.
    ValueError
        An integer beyond 64 bits (:func:`infer_request` says so).
    """
    out: dict[str, Parameter] = {}
    for key, value in params.items():
        if key in skip:
            continue
        if isinstance(value, str):
            _carried(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -_INT64_END <= value < _UINT64_END:
                raise ValueError(f"parameter {key!r} does not fit in 64 bits")
        elif not isinstance(value, (bool, float)):
            raise InvalidInput(
                f"parameter {key!r} of the {what} must be a bool, number or string",
                got=type(value).__name__,
            )
        out[_carried(key)] = value
    return out


def _serialize_strings(values: np.ndarray) -> bytes:
    """BYTES tensor elements as Triton's raw layout: a 4-byte length, then the bytes."""
    parts = []
    for item in values.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def _json_data(tensor: dict[str, Any], kserve: str, shape: list[int]) -> bytes:
    """A JSON ``data`` list (flat or nested, row-major) as the tensor's raw bytes.

    Raises
    ------
    InvalidInput
        Not a list, the wrong number of values, values of the wrong kind (a float for an
        integer datatype, say) or out of range. The caller names the model and input.
    """
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InvalidInput("'data' must be a list (or send binary data)")
    try:
        dt = datatype(kserve)
    except (TypeError, ValueError):
        dt = None
    if kserve != "BYTES" and dt is None:
        raise InvalidInput("unknown datatype", got=kserve)
    try:
        values = np.array(data, dtype=object if kserve == "BYTES" else None)
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidInput(f"'data' is not a regular array of values: {err}") from None
    if kserve == "BYTES" and not all(isinstance(v, str) for v in values.reshape(-1)):
        raise InvalidInput("BYTES data must be strings")
    if values.size != math.prod(shape):
        raise InvalidInput(
            "'data' does not match the shape",
            expected=f"{math.prod(shape)} values ({shape})",
            got=f"{values.size} values",
        )
    if kserve == "BYTES":
        return _serialize_strings(values)
    assert dt is not None
    target = dt.numpy
    kinds = _JSON_KINDS[target.kind]
    if target.kind in "iu" and values.dtype.kind in "fO":  # UINT64 beyond int64 mixed with
        values = _integers(data, target, values)  # others: numpy made floats of them all
    kind = values.dtype.kind
    # numpy takes true/false among numbers for 1 and 0; Triton refuses them ("attempt to
    # access JSON non-number as double")
    bools = kind in kinds and target.kind != "b" and _has_bools(data)
    if values.size and (kind not in kinds or bools):
        got = "true/false" if bools else _KIND_NAMES.get(kind, "mixed values")
        wanted = _KIND_NAMES[target.kind]
        raise InvalidInput(f"values of the wrong kind for {kserve}", expected=wanted, got=got)
    # a float beyond the datatype's range becomes ±inf, as Triton's cast does
    with np.errstate(all="ignore"):
        cast = values.astype(target)
    if values.size and target.kind in "iu" and not np.array_equal(cast, values):
        raise InvalidInput(f"values out of range for {kserve}")
    return cast.astype(target.newbyteorder("<"), copy=False).tobytes()


def _has_bools(data: list[Any]) -> bool:
    """Whether a JSON list, nested or not, holds true or false (``type`` is mapped in C)."""
    types = set(map(type, data))
    if bool in types:
        return True
    return list in types and any(_has_bools(v) for v in data if type(v) is list)


def _integers(data: list[Any], target: np.dtype, values: np.ndarray) -> np.ndarray:
    """JSON integers as ``target`` when numpy's guess took them for floats or objects;
    ``values`` as they are when they are not all integers."""
    items = np.array(data, dtype=object)
    if not all(isinstance(v, int) for v in items.reshape(-1)):
        return values
    try:
        return np.array(items.tolist(), dtype=target)
    except OverflowError:
        raise InvalidInput(f"values out of range for {datatype(target).kserve}") from None


#: What JSON values of each numpy kind are called, in error messages
_KIND_NAMES = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}

#: numpy's kind of a datatype -> the kinds of JSON values it takes
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


class BinaryOutputs(NamedTuple):
    """Which outputs go back as binary data: those named so, else the request's default."""

    default: bool
    named: dict[str, bool]

    def __call__(self, output: str) -> bool:
        return self.named.get(output, self.default)


def _input(
    entry: dict[str, Any],
    binary: memoryview,
    cursor: int,
    raw: list[bytes | memoryview],
) -> tuple[InputTensor, int]:
    """One JSON input, its data appended to ``raw`` (unless in shared memory); and the
    cursor in ``binary`` after its binary data."""
    shape = entry.get("shape")
    kserve = entry.get("datatype")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput("'shape' must be a list of sizes", got=shape)
    if any(d >= _INT64_END for d in shape):
        raise ValueError(f"a dim of {shape} does not fit in int64")
    if not isinstance(kserve, str):
        raise InvalidInput("'datatype' must be a string", got=kserve)
    tensor_params = _object(entry, "input")
    sources = [
        key
        for key, given in (
            ("'data'", "data" in entry),
            ("'binary_data_size'", "binary_data_size" in tensor_params),
            ("'shared_memory_region'", "shared_memory_region" in tensor_params),
        )
        if given
    ]
    if len(sources) > 1:  # Triton's rule: which would it take?
        raise InvalidInput(
            "an input's data is one of 'data', binary data ('binary_data_size') or shared "
            "memory ('shared_memory_region')",
            got=" and ".join(sources),
        )
    params = _parameters(tensor_params, "input", skip=("binary_data_size",))
    tensor = InputTensor(_carried(entry["name"]), _carried(kserve), tuple(shape), params)
    if "shared_memory_region" in tensor_params:
        return tensor, cursor  # read from the region
    size = tensor_params.get("binary_data_size")
    if size is None:
        raw.append(_json_data(entry, kserve, shape))
        return tensor, cursor
    if type(size) is not int or size < 0:
        raise InvalidInput("binary_data_size must be an integer >= 0", got=size)
    if cursor + size > len(binary):
        raise InvalidInput(
            "binary_data_size beyond the binary data",
            expected=f"at most {len(binary) - cursor}",
            got=size,
        )
    raw.append(binary[cursor : cursor + size])
    return tensor, cursor + size


def infer_request(
    model: str, version: str, header: dict[str, Any], binary: memoryview
) -> tuple[InferRequest, BinaryOutputs]:
    """The request a JSON inference header (and its binary part) describes.

    As :func:`_infer_request`; a value KServe cannot carry (a string with a lone UTF-16
    surrogate, which JSON allows and UTF-8 does not; an integer beyond 64 bits) is the
    client's error, as over gRPC, where protobuf refuses it.
    """
    try:
        return _infer_request(model, version, header, binary)
    except InvalidInput:
        raise
    except (ValueError, UnicodeEncodeError) as err:
        raise InvalidInput(
            f"the inference request has a value KServe cannot carry: {err}", model=model
        ) from None


def _infer_request(
    model: str, version: str, header: dict[str, Any], binary: memoryview
) -> tuple[InferRequest, BinaryOutputs]:
    """The request a JSON inference header (and its binary part) describes, and which
    outputs go back as binary data. Its ``raw`` holds each input's data not in shared
    memory, in order: binary data as views of ``binary``, not copies; JSON data as bytes.

    Raises
    ------
    InvalidInput
        A malformed header, binary sizes that do not add up, or bad JSON data.
    """
    request_id = header.get("id", "")
    if not isinstance(request_id, str):  # KServe's id is a string (gRPC can send no other)
        raise InvalidInput("'id' must be a string", got=type(request_id).__name__)
    params = _object(header, "request")
    parameters = _parameters(params, "request", skip=("binary_data_output",))
    binary_default = _flag(params, "binary_data_output", False)
    entries = header.get("inputs")
    if not isinstance(entries, list):
        raise InvalidInput("the request needs 'inputs', a list of tensors")
    inputs: list[InputTensor] = []
    raw: list[bytes | memoryview] = []
    cursor = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("every input needs a 'name'")
        try:
            tensor, cursor = _input(entry, binary, cursor, raw)
        except InvalidInput as err:
            raise named(err, model, entry["name"]) from None
        inputs.append(tensor)
    if cursor != len(binary):
        raise InvalidInput(
            "binary data left over after the inputs",
            expected=f"{cursor} bytes",
            got=f"{len(binary)} bytes",
        )
    binary_outputs: dict[str, bool] = {}
    outputs: list[RequestedOutput] = []
    entries = header.get("outputs") or []
    if not isinstance(entries, list):
        raise InvalidInput("'outputs' must be a list")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("every requested output needs a 'name'")
        name = _carried(entry["name"])
        what = f"output {name!r}"
        out_params = _object(entry, what)
        outputs.append(RequestedOutput(name, _parameters(out_params, what, ("binary_data",))))
        binary_outputs[name] = _flag(out_params, "binary_data", binary_default)
    request = InferRequest(model, version, _carried(request_id), parameters, inputs, outputs, raw)
    return request, BinaryOutputs(binary_default, binary_outputs)


def _strings(raw: bytes) -> list[str]:
    out, at = [], 0
    while at + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + length].decode("utf-8", "replace"))
        at += 4 + length
    return out


def infer_answer(
    answer: InferAnswer, binary: BinaryOutputs
) -> tuple[list[bytes | memoryview], int | None]:
    """The HTTP body of an answer: JSON header, then the binary outputs; header length.

    The body is returned as its parts, the outputs as they are (views: they are written to
    the socket, not joined). The length is None when no output is binary (the body is the
    JSON alone).
    """
    header: dict[str, Any] = {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
    }
    if answer.id:
        header["id"] = answer.id
    header["parameters"] = answer.parameters
    outputs, blobs = [], []
    for tensor, raw in zip(answer.outputs, answer.payloads, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if tensor.parameters:  # where it lies in shared memory
            entry["parameters"] = tensor.parameters
        elif binary(tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = _strings(bytes(raw))
        else:
            dt = datatype(tensor.datatype).numpy.newbyteorder("<")
            entry["data"] = np.frombuffer(raw, dtype=dt).tolist()
        outputs.append(entry)
    header["outputs"] = outputs
    text = dump_json(header)
    return [text, *blobs], (len(text) if blobs else None)


#: A response body at most this large is sent in one piece (JSON header and outputs
#: joined: a copy of a few KiB costs less than a write per part); a larger one part by part.
_JOIN_BELOW = 64 * 1024


class _Answer(NamedTuple):
    """An HTTP answer: status, headers besides Content-Length, and the body as its parts."""

    status: int
    headers: list[tuple[bytes, bytes]]
    parts: list[bytes | memoryview]

    async def send_to(self, send: Send) -> None:
        size = sum(len(part) for part in self.parts)
        headers = [(b"content-length", b"%d" % size), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        parts = self.parts
        if len(parts) > 1 and size <= _JOIN_BELOW:
            parts = [b"".join(parts)]
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


_JSON_TYPE = (b"content-type", b"application/json")

#: /v2/cudasharedmemory/ + [region/NAME/] + an action
_CUDA_PATH = re.compile(r"^(?:region/([^/]+)/)?(status|register|unregister)$")


def _json_answer(status: int, body: Any) -> _Answer:
    return _Answer(status, [_JSON_TYPE], [dump_json(body)])


# -- the application ----------------------------------------------------------------------


class _SameTurn:
    """The inference requests converted in one turn of the event loop, submitted together.

    Handing a request to the batcher's thread and its result back to the loop costs two
    thread hand-offs (in-process, ~80 us of CPU per 4 KB request at 16 in flight; over
    sockets, running a turn's requests together on the loop raised requests/s by 15-40 %
    at 16 in flight and cost ~7 % more CPU at 1: performance.md, eighth session). So each request converted in this turn of the loop waits for the
    turn's end (the first yields once), and then they are submitted together
    (:meth:`InferenceCore.submit_many`): if the model should take under
    :data:`_LOOP_RUN_NS` for all their rows (its latest execution's time per row) and one
    of its instances is idle with nothing queued, they run now, on the loop's thread,
    merged into batches as the queue would merge them; else they are queued for the
    batcher's threads. A slow model, or one that has not run yet, never holds the loop:
    health checks and other connections do not wait for it. The estimate can be wrong: a
    model whose time depends on its data rather than its rows, a merged batch that fails
    and is re-run request by request, many shapes in one turn. A model whose requests held
    the loop for over :data:`_LOOP_HELD_NS` never runs there again.
    """

    def __init__(self, core: InferenceCore):
        self.core = core
        self._waiting: list[tuple[_v2.Prepared, asyncio.Future[Future[Completed]]]] = []
        self._held: weakref.WeakSet[DynamicBatcher] = weakref.WeakSet()

    async def submit(self, prepared: _v2.Prepared) -> Future[Completed]:
        """The request's future in the core, once this turn of the loop has ended."""
        mine: asyncio.Future[Future[Completed]] = asyncio.get_running_loop().create_future()
        self._waiting.append((prepared, mine))
        if len(self._waiting) > 1:
            return await mine  # the turn's first request submits them all
        try:
            await asyncio.sleep(0)  # the requests ready in this turn join
        except asyncio.CancelledError:  # its client went away
            mine.cancel()
            raise
        finally:
            self._flush()
        return mine.result()

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        by_model: dict[int, list[tuple[_v2.Prepared, asyncio.Future[Future[Completed]]]]] = {}
        for prepared, submitted in waiting:
            if not submitted.cancelled():  # else its client went away meanwhile
                by_model.setdefault(id(prepared.model), []).append((prepared, submitted))
        for items in by_model.values():
            try:
                futures = self._submit(items[0][0].model, [prepared for prepared, _ in items])
            except Exception as err:  # noqa: BLE001 -- each request's handler raises it
                for _, submitted in items:
                    submitted.set_exception(err)
                continue
            for (_, submitted), future in zip(items, futures, strict=True):
                submitted.set_result(future)

    def _submit(self, model: LoadedModel, requests: list[_v2.Prepared]) -> list[Future[Completed]]:
        """One model's requests of this turn: on the loop's thread when they are quick."""
        rows = sum(prepared.submission.batch.num_rows for prepared in requests)
        expected = model.batcher.expected_ns(rows)
        inline = (
            expected is not None and expected < _LOOP_RUN_NS and model.batcher not in self._held
        )
        start = time.perf_counter_ns()
        futures = self.core.submit_many(
            model, [prepared.submission for prepared in requests], inline=inline
        )
        held = time.perf_counter_ns() - start
        if inline and held > _LOOP_HELD_NS:
            self._held.add(model.batcher)
            log.warning(
                "model %r held the event loop for %.0f ms (expected %.2f ms): its HTTP "
                "requests run on the batcher's thread from now on",
                model.version.name,
                held / 1e6,
                (expected or 0) / 1e6,
            )
        return futures


class _Api:
    """The endpoints, over one core and one set of shared-memory regions."""

    def __init__(
        self,
        core: InferenceCore,
        regions: SystemRegions | None,
        max_request_bytes: int,
        control: ModelControl,
    ):
        self.core = core
        self.regions = regions
        self.limit = max_request_bytes
        self.control = control
        self._together = _SameTurn(core)

    def _check_control(self, action: str, request: Request) -> None:
        self.control.check(action, request.headers.getlist("authorization"))

    def _regions(self) -> SystemRegions:
        if self.regions is None:
            raise Unsupported("system shared memory is not served by this server")
        return self.regions

    async def _json(self, request: Request, what: str) -> dict[str, Any]:
        body = await _body(request.headers, request.receive, self.limit)
        return parse_json(body, what, max_bytes=self.limit)

    def _model(self, request: Request) -> Any:
        return self._get(request.path_params)

    def _get(self, params: dict[str, Any]) -> LoadedModel:
        return self.core.get(params["model"], params.get("version") or None)

    # health and metadata

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.core.server_ready() else 400)

    async def model_ready(self, request: Request) -> Response:
        # not ready is 400 with an error body, as Triton's ("Model version not ready")
        try:
            self._model(request)
        except ArrowInferError as err:
            return JSONResponse({"error": str(err)}, 400)
        if not self.core.ready:
            return JSONResponse(
                {"error": "the server is not ready (starting or shutting down)"}, 400
            )
        return Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(_v2.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        path = request.path_params
        return JSONResponse(self.core.metadata(path["model"], path.get("version")))

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(self.core.config(self._model(request)))

    async def statistics(self, request: Request) -> Response:
        params = request.path_params
        stats = self.core.statistics(params.get("model") or None, params.get("version") or None)
        return JSONResponse({"model_stats": stats})

    # repository

    async def index(self, request: Request) -> Response:
        body = await self._json(request, "the index request")
        return JSONResponse(_v2.index(self.core, bool(body.get("ready", False))))

    async def load(self, request: Request) -> Response:
        name = request.path_params["model"]
        self._check_control("load", request)
        body = await self._json(request, "the load request")
        try:
            params = _object(body, "load request")
        except InvalidInput as err:
            raise named(err, name) from None
        _v2.check_load_parameters(name, params)
        await asyncio.to_thread(self.core.load, name)  # loading takes seconds: not on the loop
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        self._check_control("unload", request)
        await self._json(request, "the unload request")
        await asyncio.to_thread(self.core.unload, request.path_params["model"])
        return Response(status_code=200)

    # system shared memory

    async def shm_status(self, request: Request) -> Response:
        name = request.path_params.get("region")
        return JSONResponse(self._regions().status(_peer(request.scope), name))

    async def shm_register(self, request: Request) -> Response:
        body = await self._json(request, "the register request")
        regions = self._regions()
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str):
            raise InvalidInput("register: 'key' must be a string", got=key)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)):
            raise InvalidInput(
                "register: 'offset' and 'byte_size' must be integers", got=[offset, size]
            )
        assert isinstance(offset, int)  # for the type checker
        assert isinstance(size, int)
        regions.register(_peer(request.scope), request.path_params["region"], key, offset, size)
        return Response(status_code=200)

    async def shm_unregister(self, request: Request) -> Response:
        self._regions().unregister(_peer(request.scope), request.path_params.get("region"))
        return Response(status_code=200)

    async def cuda_shm(self, request: Request) -> Response:
        match = _CUDA_PATH.match(request.path_params["rest"])
        name, action = match.groups() if match else (None, "")
        if action == "status" and request.method == "GET":
            return JSONResponse(cuda_status(name))
        if action == "unregister" and request.method == "POST":
            return Response(status_code=200)  # none is ever registered
        raise Unsupported(CUDA_UNSUPPORTED)

    # inference

    async def infer(self, scope: Scope, receive: Receive, path: dict[str, str]) -> _Answer:
        """One inference request: ``path`` holds ``model`` (and ``version``, if given)."""
        model = self._get(path)  # an unknown model is 404 whatever the body (Triton)
        headers = _infer_headers(scope)
        try:  # the body's errors too name the model
            length_text = headers.get("inference-header-content-length")
            declared = _length(length_text)
            body = await _body(headers, receive, self.limit, declared or 0)
            if length_text is None:
                length = len(body)
            elif declared is not None and declared <= len(body):
                length = declared
            else:
                raise InvalidInput(
                    f"{_HEADER_LENGTH} must be a length within the body",
                    expected=f"at most {len(body)}",
                    got=length_text,
                )
            view = memoryview(body)
            # NaN and ±Infinity as tensor data, both ways, as Triton reads and writes them
            # (rapidjson's kParseNanAndInfFlag, triton-inference-server/server#3870). JSON is
            # parsed (and answered) on the event loop: json's C parser holds the GIL for the
            # whole text (~20 ms per MB), so another thread would not free the loop;
            # --http-max-input-size bounds it (docs/security.md).
            header = parse_json(
                view[:length], "the inference request", max_bytes=self.limit, allow_nan=True
            )
            request, binary = infer_request(
                path["model"], path.get("version", ""), header, view[length:]
            )
        except InvalidInput as err:
            raise named(err, path["model"]) from None
        peer = _peer(scope)
        prepared = _v2.prepare(
            self.core, request, None, model=model, regions=self.regions, peer=peer
        )
        pending = prepared.submitted(await self._together.submit(prepared))
        if any("classification" in output.parameters for output in request.outputs):
            # one string per row and class, in Python: seconds for a large output, which
            # would hold the loop (and every other client) throughout; a thread lets go of
            # the GIL every few ms
            parts, header_length = await asyncio.to_thread(
                self._classification_answer, pending, binary, peer
            )
        else:
            if pending.future.done():
                answer = _v2.wait_result(pending, regions=self.regions, peer=peer)
            else:
                answer = await _v2.wait_result_async(pending, regions=self.regions, peer=peer)
            parts, header_length = infer_answer(answer, binary)
        if header_length is None:
            out = [_JSON_TYPE]
        else:
            out = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", b"%d" % header_length),
            ]
        parts = _compressed(headers.get("accept-encoding"), parts, out)
        return _Answer(200, out, parts)

    def _classification_answer(
        self, pending: _v2.Pending, binary: BinaryOutputs, peer: Peer
    ) -> tuple[list[bytes | memoryview], int | None]:
        """:func:`infer_answer` of the request's result, for a worker thread."""
        return infer_answer(_v2.wait_result(pending, regions=self.regions, peer=peer), binary)


def _routes(api: _Api) -> list[Route]:
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    infer = _Infer(api)
    # POST never reaches these (_InferenceFirst answers it); other methods get 405
    out = [
        Route(path, infer, methods=["POST"]) for path in (model + "/infer", versioned + "/infer")
    ]
    routes = [
        ("/v2/health/live", api.live, ["GET"]),
        ("/v2/health/ready", api.ready, ["GET"]),
        ("/v2", api.server_metadata, ["GET"]),
        ("/v2/models/stats", api.statistics, ["GET"]),
        ("/v2/repository/index", api.index, ["POST"]),
        ("/v2/repository/models/{model}/load", api.load, ["POST"]),
        ("/v2/repository/models/{model}/unload", api.unload, ["POST"]),
        ("/v2/systemsharedmemory/status", api.shm_status, ["GET"]),
        ("/v2/systemsharedmemory/region/{region}/status", api.shm_status, ["GET"]),
        ("/v2/systemsharedmemory/region/{region}/register", api.shm_register, ["POST"]),
        ("/v2/systemsharedmemory/unregister", api.shm_unregister, ["POST"]),
        ("/v2/systemsharedmemory/region/{region}/unregister", api.shm_unregister, ["POST"]),
        ("/v2/cudasharedmemory/{rest:path}", api.cuda_shm, ["GET", "POST"]),
    ]
    for prefix in (model, versioned):
        routes += [
            (prefix, api.model_metadata, ["GET"]),
            (prefix + "/ready", api.model_ready, ["GET"]),
            (prefix + "/config", api.model_config, ["GET"]),
            (prefix + "/stats", api.statistics, ["GET"]),
        ]
    return out + [Route(path, _endpoint(fn), methods=methods) for path, fn, methods in routes]


class _Infer:
    """ASGI: the inference endpoint, without Starlette's request and response objects
    (work on every request that this route does not need); errors become Triton's as in
    :func:`_endpoint`."""

    def __init__(self, api: _Api):
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await self.api.infer(scope, receive, scope["path_params"])
        except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log loudly
            log.debug("HTTP infer: the client went away")
            return
        except Exception as err:  # noqa: BLE001 -- the one place its errors become statuses
            answer = _json_answer(*_error_answer(err, "infer"))
        await answer.send_to(send)


_INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class _InferenceFirst:
    """ASGI: an inference request goes straight to its endpoint; everything else through
    Starlette's router.

    Starlette's error middlewares and its route matching cost ~100 us per request, as
    much as a small model's run; the endpoint catches its own errors (:class:`_Infer`),
    so the inference route needs neither. Its path parameters are what the router's
    would be (``model``, and ``version`` when given).
    """

    def __init__(self, app: Any, infer: _Infer):
        self.app = app
        self.infer = infer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {k: v for k, v in match.groupdict().items() if v}
                await self.infer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Auth:
    """ASGI middleware: every HTTP request needs a valid bearer token (401 otherwise)."""

    def __init__(self, app: Any, check: TokenCheck):
        self.app = app
        self.check = check

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            if not self.check(values):
                denied = JSONResponse(
                    {"error": "missing or invalid bearer token (send 'Authorization: Bearer')"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await denied(scope, receive, send)
                return
        await self.app(scope, receive, send)


def application(
    core: InferenceCore,
    *,
    regions: SystemRegions | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    check: TokenCheck | None = None,
    model_control: ModelControl | None = None,
) -> Any:
    """The ASGI application serving ``core`` (see the module's endpoints)."""
    api = _Api(core, regions, max_request_bytes, model_control or ModelControl())
    app = Starlette(routes=_routes(api))
    app.router.redirect_slashes = False  # a path with a trailing / is 404, as Triton's

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no endpoint {request.method} {request.url.path}"}, 404)

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"{request.method} is not served here"}, 405)

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)
    first = _InferenceFirst(app, _Infer(api))
    return _Auth(first, check) if check is not None else first


class HttpServer:
    """A running HTTP front end: uvicorn on its own thread and event loop."""

    def __init__(self, server: Any, thread: threading.Thread, port: int):
        self._server = server
        self._thread = thread
        self.port = port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting; give the requests in progress ``grace`` seconds (None: all the
        time they take), then close."""
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        self._thread.join()


def start_http(
    core: InferenceCore,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    regions: SystemRegions | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    check: TokenCheck | None = None,
    model_control: ModelControl | None = None,
) -> HttpServer:
    """Serve ``core`` over KServe v2 HTTP/REST on ``host:port`` (0: a free port).

    Parameters
    ----------
    regions
        The server's system shared-memory regions (shared with gRPC); None: the
        shared-memory endpoints answer 501.
    max_request_bytes
        The largest request body, compressed and decompressed.
    tls_cert, tls_key
        PEM files: serve HTTPS.
    check
        Require a bearer token (401 without).
    model_control
        Who may load and unload models (default: nobody), as over gRPC.

    Raises
    ------
    OSError
        If the address cannot be bound (in use, say), or the server does not start.
    """
    import uvicorn
    import uvloop  # libuv's event loop: less CPU per request than asyncio's own

    from ._request_head import BoundedHeadProtocol

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: without, the response body waits for the client's
        # delayed ACK of the headers (Nagle), 40 ms per request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise OSError(f"KServe HTTP cannot listen on {host}:{port}: {err.strerror}") from err
    app = application(
        core,
        regions=regions,
        max_request_bytes=max_request_bytes,
        check=check,
        model_control=model_control,
    )
    config = uvicorn.Config(
        app,
        http=BoundedHeadProtocol,  # httptools, its requests' heads bounded
        lifespan="off",
        log_config=None,
        access_log=False,
        # no proxy's backend: the peer is its socket's (the shm rules go by it), never what
        # an X-Forwarded-For header that any local client can write says
        proxy_headers=False,
        ssl_certfile=os.fspath(tls_cert) if tls_cert is not None else None,
        ssl_keyfile=os.fspath(tls_key) if tls_key is not None else None,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=_KEEP_ALIVE_S,
        # Triton sends neither; each is a header to check and write on every response
        server_header=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    started = threading.Event()

    def run() -> None:
        async def serve() -> None:
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)  # uvicorn has no start callback
            started.set()
            await task

        try:
            uvloop.run(serve())
        finally:
            started.set()
            sock.close()

    thread = threading.Thread(target=run, name="kserve-http", daemon=True)
    thread.start()
    started.wait()
    if not server.started:
        thread.join()
        raise OSError(f"KServe HTTP did not start on {host}:{port}; the log says why")
    return HttpServer(server, thread, sock.getsockname()[1])
