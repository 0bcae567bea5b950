"""One error mapping: every error class survives Flight, shared memory and KServe.

A real server runs the ``identity`` model with its backends made to raise the error a
request names (its first value is the index in ``ERRORS``): the error then travels as any
model error does, through the batcher and each front end, to a real client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import tritonclient.grpc as tg
from hypothesis import given
from hypothesis import strategies as st
from pyarrow import flight
from tritonclient.utils import InferenceServerException

from arrowinfer import errors, protocol, tensors
from arrowinfer.client import Client, FlightTransport
from arrowinfer.client._stream import map_flight_errors
from arrowinfer.dense import DenseBatch
from arrowinfer.errors import (
    STATUS_CODES,
    ArrowInferError,
    InvalidInput,
    ModelError,
    ModelNotFound,
    RegionNotFound,
    RequestError,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    Timeout,
    TransportError,
    Unauthenticated,
    Unsupported,
)
from arrowinfer.server import Server

WAIT = 30.0
ROWS = 2


class TooLong(InvalidInput):
    """A subclass the client does not know: it arrives as its nearest public class."""


#: One instance of every error class, with every field its constructor takes.
ERRORS: list[BaseException] = [
    ArrowInferError("something went wrong on purpose"),
    TransportError("the transport failed"),
    ServerUnavailable("the server is draining"),
    ServerBusy("the queue of 'identity' is full (max_queue_size 4)"),
    Timeout("no answer within 3 s"),
    RequestError("the request is wrong"),
    ModelNotFound("jets", ["facile", "jet_tagger", "identity"], version="7"),
    ModelNotFound("seq", ["facile"], reason="seq/config.pbtxt: sequence_batching: no"),
    RegionNotFound("system shared memory: no region 'input_data' is registered"),
    InvalidInput("wrong shape", model="identity", input="INPUT0", expected=[1024], got={"rows": 3}),
    InvalidInput("does not fit", model="identity", output="OUTPUT0", expected=64, got=8),
    Unauthenticated("a valid bearer token is needed"),
    Unsupported("CUDA shared memory is not supported"),
    ModelError("model.onnx: not a readable ONNX model"),
    ServerError("the server's log has it"),
    TooLong("too many items", model="identity", input="INPUT0", expected=10, got=12),
    RuntimeError("the model's own failure"),  # the batcher makes it a ServerError
]
IDS = [type(e).__name__ for e in ERRORS]


def test_every_public_error_class_is_in_the_list() -> None:
    public = {
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ArrowInferError)
    }
    assert public <= {type(e) for e in ERRORS}


def expected_class(err: BaseException) -> type[ArrowInferError]:
    return ServerError if not isinstance(err, ArrowInferError) else errors.public_class(err)


def fields(err: BaseException) -> dict[str, Any]:
    """What the client must see again: the public class's fields, JSON-shaped."""
    cls = expected_class(err)
    return {key: json.loads(json.dumps(getattr(err, key))) for key in cls.fields}


@pytest.fixture(scope="module")
def failing(example_repository: Path) -> Iterator[Server]:
    """A server whose ``identity`` model raises ``ERRORS[int(first value)]``."""
    with Server(example_repository, port=0, kserve_port=0, metrics_port=None) as server:
        model = server.core.get("identity", None)

        def execute(batch_list: Sequence[pa.RecordBatch | DenseBatch]) -> Any:
            column = batch_list[0].column("INPUT0")  # KServe's requests come dense
            values = column if isinstance(column, np.ndarray) else tensors.to_numpy(column)
            raise ERRORS[int(values[0, 0])]

        # fault injection at the backend: everything above it (batcher, front ends,
        # client) is the real path an error takes
        for backend in model.batcher._backends:
            backend.execute = execute  # type: ignore[method-assign,assignment]
        yield server


def request(index: int) -> dict[str, np.ndarray]:
    return {"INPUT0": np.full((ROWS, 1024), index, np.float32)}


def check_rebuilt(got: BaseException, sent: BaseException) -> None:
    cls = expected_class(sent)
    assert type(got) is cls
    if isinstance(sent, ArrowInferError):
        assert str(got) == str(sent)
    else:
        assert "'identity': execution failed" in str(got)
    for key, value in fields(sent).items():
        assert getattr(got, key) == value, key


@pytest.mark.parametrize("index", range(len(ERRORS)), ids=IDS)
@pytest.mark.parametrize("transport", ["flight", "shm"])
def test_every_error_round_trips_with_its_fields(
    failing: Server, transport: str, index: int
) -> None:
    url = failing.location
    options: dict[str, Any] = {}
    if transport == "shm":
        url = url.replace("grpc", "shm", 1)
        options["min_shm_bytes"] = 0  # every request through shared memory
    # retries=0: one server, no failover wrapping the transport errors
    with Client(url, timeout=WAIT, retries=0, **options) as client:
        with pytest.raises(ArrowInferError) as caught:
            client.infer("identity", request(index))
        check_rebuilt(caught.value, ERRORS[index])
        if transport == "shm":
            assert client.transports[0].statistics["requests"] >= 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("index", range(len(ERRORS)), ids=IDS)
def test_every_error_over_kserve_has_its_status_and_names_its_fields(
    failing: Server, index: int
) -> None:
    sent = ERRORS[index]
    values = request(index)["INPUT0"]
    entry = tg.InferInput("INPUT0", list(values.shape), "FP32")
    entry.set_data_from_numpy(values)
    client = tg.InferenceServerClient(f"127.0.0.1:{failing.kserve_port}")
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("identity", [entry], client_timeout=WAIT)
    finally:
        client.close()
    code = STATUS_CODES[expected_class(sent)]
    assert str(caught.value.status()) == f"StatusCode.{code}"
    message = caught.value.message()
    if not isinstance(sent, ArrowInferError):
        assert "'identity': execution failed" in message
        return
    assert message == str(sent)
    for key, value in fields(sent).items():
        if value is None or key == "reason":
            continue
        for item in value if isinstance(value, list) else [value]:
            assert str(item) in message, key


def test_a_subclass_travels_as_its_nearest_class_everywhere() -> None:
    """The status code of a subclass is its base class's, over Flight as over KServe."""
    sent = TooLong("too many items", expected=10, got=12)
    assert errors.grpc_status(sent) == ("INVALID_ARGUMENT", str(sent))
    assert errors.error_to_dict(sent)["type"] == "InvalidInput"
    raised = errors.to_flight(sent)
    assert type(raised) is flight.FlightServerError  # as InvalidInput, not INTERNAL
    got = errors.from_flight(raised)
    assert type(got) is InvalidInput
    assert (got.expected, got.got) == (10, 12)


def test_errors_of_calls_keep_their_fields(failing: Server) -> None:
    """Schema lookups and actions (Flight errors, not replies) rebuild the same way."""
    transport = FlightTransport(failing.location)
    try:
        with pytest.raises(ModelNotFound) as missing:
            transport.schema("jets", None, timeout=WAIT)
        assert "identity" in missing.value.available
        assert missing.value.model == "jets"
        with pytest.raises(InvalidInput) as unknown:
            transport.action("no.such.action", {}, timeout=WAIT)
        assert unknown.value.got == "no.such.action"
        assert isinstance(unknown.value.expected, list)  # the list the server sent
        assert "health" in unknown.value.expected
    finally:
        transport.close()


# -- every exception of the client's dependencies is mapped ----------------------------------


def _flight_errors() -> list[type[BaseException]]:
    return [
        c for c in vars(flight).values() if isinstance(c, type) and issubclass(c, BaseException)
    ]


def _arrow_errors() -> list[type[BaseException]]:
    return [
        c
        for name, c in vars(pa).items()
        if name.startswith("Arrow") and isinstance(c, type) and issubclass(c, BaseException)
    ]


#: What each exception a client's I/O can raise becomes (most specific class first).
MAPPED: dict[type[BaseException], type[ArrowInferError]] = {
    flight.FlightUnavailableError: ServerUnavailable,
    flight.FlightCancelledError: ServerUnavailable,
    flight.FlightTimedOutError: Timeout,
    flight.FlightUnauthenticatedError: Unauthenticated,
    flight.FlightUnauthorizedError: Unauthenticated,
    flight.FlightWriteSizeExceededError: InvalidInput,
    flight.FlightInternalError: ServerError,
    flight.FlightServerError: ServerError,
    flight.FlightError: ServerError,
    OSError: ServerUnavailable,  # also pa.ArrowIOError: a reset, a refused connection
    ConnectionResetError: ServerUnavailable,
    ConnectionRefusedError: ServerUnavailable,
    BrokenPipeError: ServerUnavailable,
    TimeoutError: ServerUnavailable,
    EOFError: ServerUnavailable,
}


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is flight.FlightWriteSizeExceededError:
        return cls("the batch is larger than write_size_limit_bytes", 10, 20)
    if issubclass(cls, flight.FlightError):
        return cls("what the server said", b"")
    return cls("what went wrong")


@pytest.mark.parametrize("cls", _flight_errors() + _arrow_errors() + list(MAPPED), ids=repr)
def test_every_dependency_exception_is_mapped(cls: type[BaseException]) -> None:
    exc = _instance(cls)
    if cls in _flight_errors():
        assert cls in MAPPED, f"{cls.__name__}: a new Flight error class; map it on purpose"
    expected = MAPPED.get(cls, ServerUnavailable)  # other Arrow errors: the stream broke
    assert type(errors.from_exception(exc, "grpc://somewhere:1")) is expected
    with pytest.raises(ArrowInferError) as caught, map_flight_errors("grpc://somewhere:1"):
        raise exc
    assert type(caught.value) is expected
    assert caught.value.__cause__ is exc


def test_a_refused_connection_is_server_unavailable() -> None:
    with socket_refusing() as refused, Client(refused, timeout=WAIT, retries=0) as client:
        with pytest.raises(ServerUnavailable) as caught:
            client.models()
        assert refused.removeprefix("grpc://") in str(caught.value)


@contextlib.contextmanager
def socket_refusing() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening: connections are refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"grpc://127.0.0.1:{bound.getsockname()[1]}"


# -- the protocol's JSON parsing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        (b'{"a": NaN}', "not JSON"),
        (b'{"a": ', "not JSON"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "too deeply"),
        (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
        (b'{"a": ' + b"[" * 40 + b"}", "brackets do not pair"),
        (b'{"a": "' + b"x" * protocol.MAX_JSON_BYTES + b'"}', "too large"),
    ],
    ids=["list", "string", "bytes", "utf16", "nan", "cut", "deep", "deeper", "unpaired", "large"],
)
def test_bad_json_metadata_is_invalid_input(data: bytes, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        protocol.parse_json(data, "metadata")
    with pytest.raises(InvalidInput, match=words):
        protocol.parse_json(pa.py_buffer(data), "metadata")


def _nesting(value: Any) -> int:
    """A JSON value's nesting depth, recursively: the reference for parse_json's limit."""
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}x"\\', max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=60,
)


@given(value=_JSON, data=st.data())
def test_json_depth_limit_is_exact(value: Any, data: st.DataObject) -> None:
    """Refused exactly when nested deeper than MAX_JSON_DEPTH (lists and objects alike),
    whatever brackets its strings hold (parse_json reads the depth from the text, before
    decoding)."""
    around = data.draw(st.integers(0, protocol.MAX_JSON_DEPTH + 2))  # depths near the limit
    wraps = data.draw(st.lists(st.sampled_from("[{"), min_size=around, max_size=around))
    for bracket in wraps:
        value = [value] if bracket == "[" else {"k": value}
    message = {"a": value}
    data = json.dumps(message).encode()
    if _nesting(message) > protocol.MAX_JSON_DEPTH:
        with pytest.raises(InvalidInput, match="too deeply"):
            protocol.parse_json(data)
    else:
        assert protocol.parse_json(data) == message


def _deepest_before_an_error(text: str) -> int:
    """How deep json's decoder nests reading ``text`` before it stops (at its end, or at
    the first character that cannot be JSON: a backslash or a quote out of place is
    enough). A reference scanner, character by character."""
    depth = deepest = 0
    inside = escaped = False
    for char in text:
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        elif char == "\\":
            break  # not JSON outside a string: the decoder stops here
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
            if depth < 0:
                break
    return deepest


@given(
    prefix=st.integers(protocol.MAX_JSON_DEPTH - 4, protocol.MAX_JSON_DEPTH + 4),
    text=st.text(alphabet='[]{}"\\x,:', max_size=120),
)
def test_json_that_passes_the_depth_check_never_nests_deeper(prefix: int, text: str) -> None:
    """Any text at all, JSON or not: if the check lets it through, the decoder never nests
    deeper than MAX_JSON_DEPTH before it stops, so it cannot reach the recursion limit."""
    body = ("[" * prefix + text).encode()
    try:
        protocol._check_nesting(body, "metadata")
    except InvalidInput:
        return
    assert _deepest_before_an_error(body.decode()) <= protocol.MAX_JSON_DEPTH


JSON_BOMB = 4 * 1024 * 1024  # MAX_JSON_BYTES: the most any caller of parse_json takes


@pytest.mark.parametrize(
    "body",
    [
        # a string that never closes, of escaped quotes: each was once a new match attempt
        b'{"a":' + b"[]" * 40 + b'"' + b'\\"' * (JSON_BOMB // 2 - 64),
        b'{"a":[' + b'"",' * (JSON_BOMB // 3 - 64) + b"]" + b"[]" * 40 + b"}",
        b'{"a":[' + b'"[",[],' * (JSON_BOMB // 7 - 64) + b"]}",
        (b"[" * 30 + b"]" * 30 + b",") * (JSON_BOMB // 61),
    ],
    ids=["unclosed-escapes", "empty-strings", "strings-and-brackets", "nested-30"],
)
def test_the_depth_check_costs_the_texts_length(body: bytes) -> None:
    """Texts built to make a string-skipping scan quadratic: each is checked in a child
    process that must finish within a minute (linear: a fraction of a second; the
    quadratic scan took about 45 minutes for 1 MiB)."""
    code = (
        "import sys; from arrowinfer import protocol, errors\n"
        "try: protocol.parse_json(sys.stdin.buffer.read(), 'body')\n"
        "except errors.InvalidInput as err: print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=body, capture_output=True, timeout=60, check=True
    )
    assert done.stdout  # refused, each for its own reason, none for its size
    assert b"too large" not in done.stdout


def test_json_with_too_many_arrays_is_refused_before_decoding() -> None:
    rows = b"[]," * protocol.MAX_JSON_CONTAINERS
    with pytest.raises(InvalidInput, match="too many arrays and objects") as caught:
        protocol.parse_json(b'{"a":[' + rows + b"[]]}", max_bytes=len(rows) + 64)
    assert caught.value.expected == f"at most {protocol.MAX_JSON_CONTAINERS}"


def test_json_metadata_and_control_messages() -> None:
    assert protocol.parse_json(None) == {}
    assert protocol.parse_json(b"") == {}
    nested = {"a": [[{"b": [1]}]], "c": "é"}
    assert protocol.parse_json(protocol.dump_json(nested)) == nested
    message = protocol.parse_json(protocol.goaway("the server is shutting down"))
    assert protocol.goaway_reason(message) == "the server is shutting down"
    assert protocol.goaway_reason({"queue_ns": 1}) is None
    assert protocol.result_metadata({"queue_ns": 5, "other": 1}) == {b"queue_ns": b"5"}
    assert protocol.result_metadata({"model_sha256": "ab", "truncated_items": 3}) == {
        b"model_sha256": b"ab",
        b"truncated_items": b"3",
    }


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.4.5.6", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, local: bool) -> None:
    assert protocol.is_loopback_host(host) is local


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/socket", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv4:localhost:5000", False),  # gRPC peers are addresses, never names
        ("weird", False),
    ],
)
def test_peers_on_this_host(peer: str, local: bool) -> None:
    assert protocol.peer_is_local(peer) is local
