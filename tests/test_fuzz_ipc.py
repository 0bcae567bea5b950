"""Fuzzing: mutated Arrow IPC messages over Flight, shared memory and KServe raw contents.

Hypothesis mutates valid request messages (the bytes of their metadata, which hold
lengths, null counts, buffer offsets and sizes and, in the schema, the types and field
metadata; the list offsets in their bodies; the body's length) and sends them while a
well-behaved client runs beside. Whatever comes back: the server never dies, a request
that succeeds returns only bytes of its own data (``identity`` returns its input), and the
good client gets every one of its results right.

Flight requests go as raw gRPC ``FlightData`` messages (built here, field by field), so
that no client-side Arrow code reads the mutated buffers. Each test is bounded in examples
and time (``slow``: CI runs them, a quick local run may skip them).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attacks import (
    WAIT,
    GoodClient,
    RawSession,
    frame,
    identity_batch,
    ipc_messages,
    jets,
    kserve_stub,
    no_internals,
)
from tritonclient.grpc import service_pb2 as pb

from arrowinfer.server import Server

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a failure is reproducible
)

# -- raw Flight: FlightData protobufs written by hand ---------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def flight_data(
    header: bytes, body: bytes = b"", path: list[str] | None = None, app: bytes = b""
) -> bytes:
    """A ``FlightData`` message: descriptor (1), data_header (2), app_metadata (3), body (1000)."""
    out = b""
    if path is not None:
        descriptor = _varint(1 << 3 | 0) + _varint(1)  # type = PATH
        descriptor += b"".join(_field(3, p.encode()) for p in path)
        out += _field(1, descriptor)
    out += _field(2, header)
    if app:
        out += _field(3, app)
    if body:
        out += _field(1000, body)
    return out


def _parse(message: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (the last of each number)."""
    fields: dict[int, bytes] = {}
    i = 0
    while i < len(message):
        key, shift = 0, 0
        while True:
            byte = message[i]
            i += 1
            key |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        length, shift = 0, 0
        while True:
            byte = message[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        fields[key >> 3] = message[i : i + length]
        i += length
    return fields


def raw_exchange(channel: grpc.Channel, messages: list[bytes]) -> list[dict[int, bytes]]:
    """One DoExchange call with these FlightData messages; every reply's fields."""
    call = channel.stream_stream(
        "/arrow.flight.protocol.FlightService/DoExchange",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    return [_parse(reply) for reply in call(iter(messages), timeout=WAIT)]


def _metadata_only(raw: bytes) -> bytes:
    """The IPC metadata of a stream's messages (no continuation/length prefix)."""
    return raw[8:]


# -- mutations ------------------------------------------------------------------------------

_VALUES = st.sampled_from([0, 1, 2, 3, 7, 8, 255, 4096, 1 << 20, 1 << 31, -1, -8, 1 << 62])


@st.composite
def mutations(draw: st.DrawFn, sizes: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """1 to 3 writes ``(part, position, width, value)`` into the schema, metadata or body."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(sorted(sizes)))
        width = draw(st.sampled_from([1, 4, 8]))
        position = draw(st.integers(0, max(sizes[part] - width, 0)))
        out.append((part, position, width, draw(_VALUES)))
    return out


def mutate(parts: dict[str, bytes], changes: list[tuple[str, int, int, int]]) -> dict[str, bytes]:
    out = {k: bytearray(v) for k, v in parts.items()}
    for part, position, width, value in changes:
        data = out[part]
        if position + width > len(data):
            continue
        fmt = {1: "<B", 4: "<I", 8: "<Q"}[width]
        struct.pack_into(fmt, data, position, value % (1 << (8 * width)))
    return {k: bytes(v) for k, v in out.items()}


def _parts(batch: pa.RecordBatch) -> dict[str, bytes]:
    schema, metadata, body = ipc_messages(batch)
    return {"schema": _metadata_only(schema), "metadata": metadata, "body": body}


IDENTITY = _parts(identity_batch(2, seed=21))
JETS = _parts(jets([2, 3], seed=22))
CASES = {"identity": IDENTITY, "jet_tagger": JETS}


def _check_reply(fields: dict[int, bytes], sent: dict[str, bytes], model: str, schema: Any) -> None:
    meta = json.loads(fields.get(3, b"{}") or b"{}")
    if "error" in meta:
        assert meta["error"]["type"] in ("InvalidInput", "ServerUnavailable"), meta
        no_internals(json.dumps(meta))
        return
    if model == "identity" and 1000 in fields:
        message = pa.ipc.read_message(pa.BufferReader(frame(fields[2], fields[1000])))
        result = pa.ipc.read_record_batch(message, schema)
        values = result.column(0).storage.values.to_numpy(zero_copy_only=False).tobytes()
        assert values in sent["body"], "a result holds bytes its request did not send"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(example_repository: Path) -> Iterator[tuple[Server, GoodClient]]:
    """One server for all the fuzzing, with a good client beside it the whole time."""
    with Server(example_repository, port=0, kserve_port=0, metrics_port=None) as server:
        beside = GoodClient(server.location)
        with beside:
            yield server, beside
        # the server is alive and still right after everything
        with GoodClient(server.location) as after:
            after.wait_some()


OUTPUT_SCHEMA = pa.schema([("OUTPUT0", pa.fixed_shape_tensor(pa.float32(), [1024]))])


@FUZZ
@given(model=st.sampled_from(sorted(CASES)), data=st.data())
def test_fuzz_flight(fuzzed: tuple[Server, GoodClient], model: str, data: st.DataObject) -> None:
    server, beside = fuzzed
    parts = CASES[model]
    sent = mutate(parts, data.draw(mutations({k: len(v) for k, v in parts.items()})))
    channel = grpc.insecure_channel(server.location.removeprefix("grpc://"))
    try:
        replies = raw_exchange(
            channel,
            [
                flight_data(sent["schema"], path=[model]),
                flight_data(sent["metadata"], sent["body"]),
            ],
        )
    except grpc.RpcError as err:  # the stream refused as a whole: fine, if it says why
        code, refused = err.code(), str(err.details())
    else:
        code, refused = grpc.StatusCode.OK, None
        for fields in replies:
            _check_reply(fields, sent, model, OUTPUT_SCHEMA)
    finally:
        channel.close()
    if refused is not None:
        # Flight sends InvalidInput as UNKNOWN (it has no INVALID_ARGUMENT error class) with
        # arrowinfer's JSON beside; Arrow's own checks answer INVALID_ARGUMENT
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN), code
        assert "internal error" not in refused, refused
        no_internals(refused)
    assert not beside.failures, beside.failures[:3]


@pytest.fixture(scope="module")
def fuzz_session(fuzzed: tuple[Server, GoodClient]) -> Iterator[tuple[RawSession, Any, Any]]:
    server, _ = fuzzed
    session = RawSession(server.location)
    regions = []
    for _ in range(2):
        name = f"arrowinfer-fuzz-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, 1 << 20)
        regions.append((name, mmap.mmap(fd, 1 << 20)))
        os.close(fd)
        assert "registered" in session.ask({"op": "register", "name": name, "size": 1 << 20})
    yield session, regions[0], regions[1]
    session.close()
    for name, memory in regions:
        memory.close()
        os.unlink(f"/dev/shm/{name}")


@FUZZ
@given(model=st.sampled_from(sorted(CASES)), data=st.data())
def test_fuzz_shm(
    fuzzed: tuple[Server, GoodClient],
    fuzz_session: tuple[RawSession, Any, Any],
    model: str,
    data: st.DataObject,
) -> None:
    _, beside = fuzzed
    session, (source, memory), (target, output) = fuzz_session
    parts = CASES[model]
    sent = mutate(parts, data.draw(mutations({k: len(v) for k, v in parts.items()})))
    stream = (
        frame(sent["schema"], b"")
        + frame(sent["metadata"], sent["body"])
        + struct.pack("<Ii", -1 & 0xFFFFFFFF, 0)
    )
    memory[: len(stream)] = stream
    reply = session.ask(
        {
            "op": "infer",
            "model": model,
            "input": {"region": source, "offset": 0, "length": len(stream)},
            "output": {"region": target, "offset": 0, "size": 1 << 20},
        }
    )
    if "error" in reply:
        assert reply["error"]["type"] in ("InvalidInput", "ServerUnavailable"), reply
        no_internals(json.dumps(reply))
    elif model == "identity":
        place = reply["output"]
        result = pa.ipc.open_stream(
            pa.py_buffer(output).slice(place["offset"], place["length"])
        ).read_next_batch()
        values = result.column(0).storage.values.to_numpy(zero_copy_only=False).tobytes()
        assert values in sent["body"], "a result holds bytes its request did not send"
        del result
    assert not beside.failures, beside.failures[:3]


@FUZZ
@given(
    shape=st.lists(st.integers(-2, 1 << 40), min_size=0, max_size=3),
    size=st.sampled_from([0, 1, 4095, 4096, 8192, 12288]),
    datatype=st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "BOOL", ""]),
    typed=st.booleans(),
)
def test_fuzz_kserve_raw_contents(
    fuzzed: tuple[Server, GoodClient], shape: list[int], size: int, datatype: str, typed: bool
) -> None:
    server, beside = fuzzed
    raw = np.random.default_rng(size).bytes(size)
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    if typed:
        tensor.contents.fp32_contents.extend([1.0] * 3)
    request.raw_input_contents.append(raw)
    channel, stub = kserve_stub(server)
    with channel:
        try:
            response = stub.ModelInfer(request, timeout=WAIT)
        except grpc.RpcError as err:
            code, details = err.code(), str(err.details())
        else:
            code, details = grpc.StatusCode.OK, ""
            assert response.raw_output_contents[0] == raw
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ), (code, details)
    no_internals(details)
    assert not beside.failures, beside.failures[:3]


def test_the_fuzz_harness_sends_what_a_client_sends(fuzzed: tuple[Server, GoodClient]) -> None:
    """Unmutated, the raw messages are served: the fuzzing reaches the models."""
    server, _ = fuzzed
    channel = grpc.insecure_channel(server.location.removeprefix("grpc://"))
    try:
        replies = raw_exchange(
            channel,
            [
                flight_data(IDENTITY["schema"], path=["identity"]),
                flight_data(IDENTITY["metadata"], IDENTITY["body"]),
            ],
        )
    finally:
        channel.close()
    results = [f for f in replies if 1000 in f]
    assert len(results) == 1
    message = pa.ipc.read_message(pa.BufferReader(frame(results[0][2], results[0][1000])))
    batch = pa.ipc.read_record_batch(message, OUTPUT_SCHEMA)
    expected = identity_batch(2, seed=21).column(0).storage.values.to_numpy()
    assert batch.column(0).storage.values.to_numpy().tobytes() == expected.tobytes()
