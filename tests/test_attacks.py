"""Attacks through the public interfaces, each beside a well-behaved client.

Every byte a client sends is untrusted. Each test sends one kind of hostile input (raw
pyarrow.flight, raw gRPC, raw shared memory) while :class:`GoodClient` runs beside it and
checks every one of its own results bit for bit: the attack must fail alone, with an
``InvalidInput`` (or the refusal its kind calls for), and the server must go on serving.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from pyarrow import flight
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from arrowinfer import tensors
from arrowinfer.client import Client
from arrowinfer.server import Server

WAIT = 30.0  # the longest any one answer may take: bounds every test
OPTIONS = flight.FlightCallOptions(timeout=WAIT)


# -- the well-behaved client ------------------------------------------------------------------


class GoodClient:
    """Identity requests in a loop on their own connection; every result is checked.

    Use as a context manager around an attack: on exit it stops, and the test fails if
    any of its requests failed or came back different, or if none ran at all.
    """

    def __init__(self, location: str, **options: Any):
        self.client = Client(location, **options)
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="good-client", daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        while not self._stop.is_set():
            rows = int(rng.integers(1, 9))
            data = rng.standard_normal((rows, 1024), dtype=np.float32)
            try:
                result = self.client.infer("identity", {"INPUT0": data})
                got = tensors.to_numpy(result.column("OUTPUT0"))
                if not np.array_equal(got.view(np.uint32), data.view(np.uint32)):
                    self.failures.append("a result differs from its request")
            except Exception as err:  # noqa: BLE001 -- every failure is the test's failure
                self.failures.append(f"{type(err).__name__}: {err}")
            self.done += 1

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def wait_some(self, count: int = 3) -> None:
        """Block until this many more requests have been answered."""
        target = self.done + count
        deadline = threading.Event()
        for _ in range(int(WAIT * 100)):
            if self.done >= target or self.failures:
                return
            deadline.wait(0.01)
        raise AssertionError("the good client made no progress")

    def __exit__(self, *exc: object) -> None:
        self.wait_some()
        self._stop.set()
        self._thread.join(WAIT)
        self.client.close()
        assert not self._thread.is_alive(), "the good client hangs"
        assert not self.failures, self.failures[:5]
        assert self.done > 0


# -- crafted Arrow IPC ------------------------------------------------------------------------


def ipc_messages(batch: pa.RecordBatch) -> tuple[bytes, bytes, bytes]:
    """A batch's IPC stream as ``(schema message, batch metadata, batch body)``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    reader = pa.BufferReader(sink.getvalue())
    schema = pa.ipc.read_message(reader)
    message = pa.ipc.read_message(reader)
    return (
        schema.serialize().to_pybytes(),
        message.metadata.to_pybytes(),
        message.body.to_pybytes(),
    )


def frame(metadata: bytes, body: bytes) -> bytes:
    """One encapsulated IPC message: continuation, length, padded metadata, body."""
    metadata += b"\0" * (-len(metadata) % 8)
    return struct.pack("<Ii", 0xFFFFFFFF, len(metadata)) + metadata + body


def crafted_stream(batch: pa.RecordBatch, metadata: bytes, body: bytes) -> bytes:
    """An IPC stream (schema, the given batch message, end) as a hostile client sends it."""
    schema, _, _ = ipc_messages(batch)
    return schema + frame(metadata, body) + struct.pack("<Ii", 0xFFFFFFFF, 0)


def unchecked_batch(schema: pa.Schema, metadata: bytes, body: bytes) -> pa.RecordBatch:
    """The record batch of a message, as Arrow reads it: nothing checked against the buffers."""
    message = pa.ipc.read_message(pa.BufferReader(frame(metadata, body)))
    return pa.ipc.read_record_batch(message, schema)


def longer(batch: pa.RecordBatch, rows: int) -> tuple[bytes, bytes]:
    """The batch's message claiming ``rows`` rows over its real buffers: ``(metadata, body)``."""
    _, metadata, body = ipc_messages(batch)
    real = struct.pack("<q", batch.num_rows)
    assert real in metadata
    return metadata.replace(real, struct.pack("<q", rows)), body


def wild_offsets(batch: pa.RecordBatch, value: int, at: int = -1) -> tuple[bytes, bytes]:
    """A ragged batch's message whose first column's list offset ``at`` is ``value``."""
    _, metadata, body = ipc_messages(batch)
    offsets = np.asarray(batch.column(0).offsets, dtype=np.int32)
    old = offsets.tobytes()
    assert old in body
    bad = offsets.copy()
    bad[at] = value
    return metadata, body.replace(old, bad.tobytes(), 1)


def payload(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1024), dtype=np.float32)


def identity_batch(rows: int, seed: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([tensors.from_numpy(payload(rows, seed))], ["INPUT0"])


def jets(counts: list[int], seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    total = int(offsets[-1])
    return pa.RecordBatch.from_arrays(
        [
            tensors.ragged_from_numpy(offsets, rng.standard_normal((total, 2), dtype=np.float32)),
            tensors.ragged_from_numpy(offsets, rng.standard_normal((total, 7), dtype=np.float32)),
        ],
        ["points", "features"],
    )


# -- raw clients ------------------------------------------------------------------------------


def flight_exchange(
    location: str, path: list[str], batches: list[pa.RecordBatch], **headers: str
) -> list[dict[str, Any]]:
    """Each batch as one request on one raw Flight stream; each reply's ``app_metadata``."""
    client = flight.FlightClient(location)
    try:
        options = flight.FlightCallOptions(timeout=WAIT, headers=list(headers.items()))
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(*path), options)
        writer.begin(batches[0].schema)
        replies = []
        for batch in batches:
            writer.write_batch(batch)
            chunk = reader.read_chunk()
            replies.append(json.loads(chunk.app_metadata.to_pybytes()))
        writer.done_writing()
        with contextlib.suppress(StopIteration):
            while True:
                reader.read_chunk()
        writer.close()
        return replies
    finally:
        client.close()


class RawSession:
    """A shared-memory session spoken with plain pyarrow.flight, one request at a time."""

    def __init__(self, location: str):
        self.client = flight.FlightClient(location)
        self.writer, self.reader = self.client.do_exchange(
            flight.FlightDescriptor.for_path("arrowinfer.shm"), options=OPTIONS
        )

    def ask(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        self.writer.write_metadata(data)
        reply = json.loads(self.reader.read_chunk().app_metadata.to_pybytes())
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.writer.done_writing()
        with contextlib.suppress(StopIteration):
            while True:
                self.reader.read_chunk()
        self.writer.close()
        self.client.close()


@contextlib.contextmanager
def raw_session(server: Server) -> Iterator[RawSession]:
    session = RawSession(server.location)
    try:
        yield session
    finally:
        session.close()


@contextlib.contextmanager
def raw_region(size: int, mode: int = 0o600) -> Iterator[tuple[str, mmap.mmap]]:
    """A region made by hand in /dev/shm (what a foreign client would do)."""
    name = f"arrowinfer-attack-{os.getpid()}-{os.urandom(4).hex()}"
    path = os.path.join("/dev/shm", name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.ftruncate(fd, size)
        memory = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        yield name, memory
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        memory.close()


def shm_infer(
    session: RawSession, model: str, data: bytes, source: tuple[str, mmap.mmap], target: str
) -> dict[str, Any]:
    """Put ``data`` (an IPC stream) at the start of ``source`` and ask for an infer."""
    name, memory = source
    memory[: len(data)] = data
    return session.ask(
        {
            "op": "infer",
            "model": model,
            "input": {"region": name, "offset": 0, "length": len(data)},
            "output": {"region": target, "offset": 0, "size": 1 << 20},
        }
    )


def kserve_stub(server: Server) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}")
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def error_of(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    return str(reply["error"]["type"])


def no_internals(text: str) -> None:
    """Nothing of the server's insides in what a client sees."""
    for leak in ("Traceback", 'File "', "/arrowinfer/", ".py", "site-packages"):
        assert leak not in text, text


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(example_repository: Path) -> Iterator[Server]:
    """A server of this module's own (attacks must not disturb other modules' servers)."""
    with Server(example_repository, port=0, kserve_port=0, metrics_port=None) as running:
        yield running


# -- 1: Arrow data is validated before anything reads it --------------------------------------


def test_flight_batch_longer_than_its_buffers_is_invalid_input(target: Server) -> None:
    good = identity_batch(4)
    bad = [unchecked_batch(good.schema, *longer(good, rows)) for rows in (5, 64, 1 << 20)]
    with GoodClient(target.location) as beside:
        replies = flight_exchange(target.location, ["identity"], [*bad, good, bad[0]])
        beside.wait_some()
    for reply in (replies[0], replies[1], replies[2], replies[4]):
        assert error_of(reply) == "InvalidInput"
        assert "malformed" in reply["error"]["message"]
    assert "error" not in replies[3], "the stream goes on after a malformed request"


def test_flight_list_offsets_out_of_range_are_invalid_input(target: Server) -> None:
    good = jets([3, 5, 2])
    with GoodClient(target.location) as beside:
        # a middle offset: pyarrow's writer on the attacker's side slices the values by
        # the first and last offsets, and would itself read past them otherwise
        bad = [
            unchecked_batch(good.schema, *wild_offsets(good, value, at=1))
            for value in (11, 4096, 1 << 30, -5)
        ]
        replies = flight_exchange(target.location, ["jet_tagger"], [*bad, good])
        beside.wait_some()
    for reply in replies[:-1]:
        assert error_of(reply) == "InvalidInput"
    assert "error" not in replies[-1]


def test_shm_batch_longer_than_its_buffers_is_invalid_input(target: Server) -> None:
    good = identity_batch(4)
    with (
        GoodClient(target.location) as beside,
        raw_session(target) as session,
        raw_region(1 << 20) as source,
        raw_region(1 << 20) as (out, _),
    ):
        for name in (source[0], out):
            assert "registered" in session.ask({"op": "register", "name": name, "size": 1 << 20})
        for rows in (5, 4096, 1 << 40):
            data = crafted_stream(good, *longer(good, rows))
            assert error_of(shm_infer(session, "identity", data, source, out)) == "InvalidInput"
        jet = jets([2, 2])
        for value, at in ((1 << 20, -1), (-7, 1), (1 << 30, 1)):
            data = crafted_stream(jet, *wild_offsets(jet, value, at))
            reply = shm_infer(session, "jet_tagger", data, source, out)
            assert error_of(reply) == "InvalidInput"
        data = crafted_stream(good, *ipc_messages(good)[1:])
        assert "output" in shm_infer(session, "identity", data, source, out)
        beside.wait_some()


def test_flight_malformed_variable_shape_tensor_types_are_invalid_input(target: Server) -> None:
    """A column named ``arrow.variable_shape_tensor`` whose storage or metadata is not that
    type's ends its stream as InvalidInput: Arrow C++ checks them where it knows the type,
    arrowinfer.tensors' registered class where it does not (pyarrow 19)."""
    data = pa.array([[1.0, 2.0]], pa.list_(pa.float32()))
    tensor = pa.StructArray.from_arrays(
        [data, pa.array([[2]], pa.list_(pa.int32(), 1))], ["data", "shape"]
    )
    cases = [
        (pa.array([1, 2]), b"{}"),  # storage not a struct
        (tensor, b"\xff"),  # metadata not UTF-8
        (tensor, b"[1]"),  # not a JSON object
        (tensor, b'{"uniform_shape": [1, 2]}'),  # one entry per dimension
        (tensor, b'{"uniform_shape": ["a"]}'),
        (tensor, b'{"permutation": [3]}'),
    ]
    with GoodClient(target.location) as beside:
        for storage, metadata in cases:
            extension = {
                b"ARROW:extension:name": b"arrow.variable_shape_tensor",
                b"ARROW:extension:metadata": metadata,
            }
            batch = pa.record_batch(
                [storage], schema=pa.schema([pa.field("x", storage.type, metadata=extension)])
            )
            with pytest.raises(flight.FlightError) as caught:
                flight_exchange(target.location, ["identity"], [batch])
            assert b"InvalidInput" in (caught.value.extra_info or b""), metadata
            assert "malformed" in str(caught.value)
            no_internals(str(caught.value))
        beside.wait_some()


def test_kserve_raw_contents_that_do_not_match_are_invalid_input(target: Server) -> None:
    channel, stub = kserve_stub(target)
    with GoodClient(target.location) as beside, channel:
        for shape, size in (([4, 1024], 100), ([1 << 20, 1024], 4096), ([4, 1024], 1 << 20)):
            request = pb.ModelInferRequest(model_name="identity")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
            request.raw_input_contents.append(b"\0" * size)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=WAIT)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        beside.wait_some()


def test_check_data_covers_extension_types_and_nested_lists() -> None:
    from arrowinfer.errors import InvalidInput
    from arrowinfer.schema import check_data

    good = identity_batch(2)
    check_data(good)
    bad = unchecked_batch(good.schema, *longer(good, 3))
    assert isinstance(bad.column(0).type, pa.BaseExtensionType)
    with pytest.raises(InvalidInput, match="malformed"):
        check_data(bad)
    jet = jets([1, 2])
    check_data(jet)
    with pytest.raises(InvalidInput, match="malformed"):
        check_data(unchecked_batch(jet.schema, *wild_offsets(jet, 99)))
    # a nested field name that is not UTF-8 (pyarrow would raise wherever it is read)
    schema, metadata, body = ipc_messages(jet)
    bad_schema = schema.replace(b"item", b"\xfftem")
    assert bad_schema != schema
    message = pa.ipc.read_message(pa.BufferReader(bad_schema))
    renamed = unchecked_batch(pa.ipc.read_schema(message), metadata, body)
    with pytest.raises(InvalidInput, match="malformed"):
        check_data(renamed)


# -- 2: no request makes the server hold more than --max-request-bytes ------------------------

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a 1 MiB request bound; ``facile`` may take 8 MiB (its config says so)."""
    from arrowinfer.examples import write_example_repository

    repository = write_example_repository(
        tmp_path_factory.mktemp("bounded"), models=["identity", "facile"]
    )
    config = repository / "facile" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + '\nparameters { key: "arrowinfer.max_request_bytes" value { string_value: "8388608" } }\n'
    )
    with Server(
        repository, port=0, kserve_port=0, metrics_port=None, max_request_bytes=LIMIT
    ) as running:
        yield running


def test_flight_request_over_the_bound_is_invalid_input(bounded: Server) -> None:
    big = identity_batch(LIMIT // 4096 + 1)
    with GoodClient(bounded.location) as beside:
        replies = flight_exchange(bounded.location, ["identity"], [big, identity_batch(2)])
        beside.wait_some()
    assert error_of(replies[0]) == "InvalidInput"
    assert "max_request_bytes" in replies[0]["error"]["message"]
    assert "error" not in replies[1]


def test_flight_compressed_request_is_bounded_by_its_decompressed_size(bounded: Server) -> None:
    zeros = pa.RecordBatch.from_arrays(
        [tensors.from_numpy(np.zeros((1024, 1024), np.float32))], ["INPUT0"]
    )  # 4 MiB that zstd makes a few hundred bytes
    client = flight.FlightClient(bounded.location)
    with GoodClient(bounded.location) as beside:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("identity"), OPTIONS)
        writer.begin(zeros.schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
        writer.write_batch(zeros)
        reply = json.loads(reader.read_chunk().app_metadata.to_pybytes())
        writer.write_batch(identity_batch(3))
        good = reader.read_chunk()
        writer.done_writing()
        writer.close()
        beside.wait_some()
    client.close()
    assert error_of(reply) == "InvalidInput"
    assert "max_request_bytes" in reply["error"]["message"]
    assert good.data.num_rows == 3


def test_model_parameter_overrides_the_bound(bounded: Server) -> None:
    rows = (2 * LIMIT) // 60  # facile: 15 float32 per row, 2 MiB in all
    data = np.random.default_rng(3).standard_normal((rows, 15), dtype=np.float32)
    with Client(bounded.location) as client:
        assert client.infer("facile", {"hits": data}).num_rows == rows
    assert bounded.core.get("facile").max_request_bytes == 8 << 20
    assert bounded.core.get("identity").max_request_bytes == LIMIT


def _compressed_claiming(batch: pa.RecordBatch, size: int) -> bytes:
    """A zstd IPC stream whose first buffer claims ``size`` bytes once decompressed."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
    reader = pa.BufferReader(sink.getvalue())
    schema = pa.ipc.read_message(reader).serialize().to_pybytes()
    message = pa.ipc.read_message(reader)
    body = bytearray(message.body.to_pybytes())
    first = next(i for i in range(0, len(body), 8) if struct.unpack_from("<q", body, i)[0] > 0)
    struct.pack_into("<q", body, first, size)
    return (
        schema
        + frame(message.metadata.to_pybytes(), bytes(body))
        + struct.pack("<Ii", 0xFFFFFFFF, 0)
    )


def test_shm_compressed_request_is_refused_before_decompression(bounded: Server) -> None:
    from arrowinfer.server._regions import decoded_size

    zeros = pa.RecordBatch.from_arrays(
        [tensors.from_numpy(np.zeros((512, 1024), np.float32))], ["INPUT0"]
    )
    stream = _compressed_claiming(zeros, 1 << 40)  # a terabyte, were it decompressed
    reader = pa.BufferReader(stream)
    pa.ipc.read_message(reader)
    assert decoded_size(pa.ipc.read_message(reader)) >= 1 << 40
    with (
        GoodClient(bounded.location) as beside,
        raw_session(bounded) as session,
        raw_region(1 << 20) as source,
        raw_region(1 << 20) as (out, _),
    ):
        for name in (source[0], out):
            assert "registered" in session.ask({"op": "register", "name": name, "size": 1 << 20})
        reply = shm_infer(session, "identity", stream, source, out)
        assert error_of(reply) == "InvalidInput"
        assert "max_request_bytes" in reply["error"]["message"]
        plain = crafted_stream(zeros, *ipc_messages(zeros)[1:])  # 2 MiB > 1 MiB, plain
        assert len(plain) > LIMIT
        with raw_region(4 << 20) as large:
            session.ask({"op": "register", "name": large[0], "size": 4 << 20})
            assert error_of(shm_infer(session, "identity", plain, large, out)) == "InvalidInput"
        small = identity_batch(2)
        assert "output" in shm_infer(
            session, "identity", crafted_stream(small, *ipc_messages(small)[1:]), source, out
        )
        beside.wait_some()


def test_kserve_message_over_the_bound_is_refused_by_grpc(bounded: Server) -> None:
    channel, stub = kserve_stub(bounded)
    rows = LIMIT // 4096 + 512  # beyond the bound and its envelope
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 1024])
    request.raw_input_contents.append(b"\0" * (rows * 4096))
    with GoodClient(bounded.location) as beside, channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # under the gRPC bound but over the data bound: the core refuses it
        rows = LIMIT // 4096 + 1
        request = pb.ModelInferRequest(model_name="identity")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 1024])
        request.raw_input_contents.append(b"\0" * (rows * 4096))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        beside.wait_some()


# -- 3: model control is closed unless the operator opens it ----------------------------------


def flight_action(location: str, name: str, body: dict[str, Any], token: str | None = None) -> Any:
    """Run one Flight action; its JSON result, or the arrowinfer error it raised."""
    from arrowinfer.errors import from_flight

    client = flight.FlightClient(location)
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    try:
        options = flight.FlightCallOptions(timeout=WAIT, headers=headers)
        results = list(client.do_action(flight.Action(name, json.dumps(body).encode()), options))
        return json.loads(results[0].body.to_pybytes())
    except flight.FlightError as err:
        return from_flight(err)
    finally:
        client.close()


def kserve_unload(server: Server, model: str, token: str | None = None) -> grpc.StatusCode:
    channel, stub = kserve_stub(server)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with channel:
        try:
            stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=model), timeout=WAIT, metadata=metadata
            )
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_model_control_none_refuses_load_and_unload(target: Server) -> None:
    from arrowinfer.errors import RequestError

    with GoodClient(target.location) as beside:
        for action in ("model.unload", "model.load"):
            error = flight_action(target.location, action, {"model": "identity"})
            assert isinstance(error, RequestError)
            assert "model control mode is 'none'" in str(error)
        assert kserve_unload(target, "identity") == grpc.StatusCode.INVALID_ARGUMENT
        beside.wait_some()
    assert target.core.get("identity") is not None


def test_model_control_explicit_needs_an_admin_token(example_repository: Path) -> None:
    from arrowinfer.errors import Unauthenticated

    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        metrics_port=None,
        auth_tokens={"user-token", "admin-token"},
        admin_tokens={"admin-token"},
        model_control="explicit",
    ) as server:
        with GoodClient(server.location, token="user-token") as beside:
            for token in ("user-token", None, "admin-token-x"):
                error = flight_action(server.location, "model.unload", {"model": "facile"}, token)
                assert isinstance(error, Unauthenticated), (token, error)
                assert kserve_unload(server, "facile", token) == grpc.StatusCode.UNAUTHENTICATED
            assert server.core.get("facile") is not None
            reply = flight_action(server.location, "model.load", {"model": "facile"}, "admin-token")
            assert reply == {"loaded": [1]}
            assert kserve_unload(server, "facile", "admin-token") == grpc.StatusCode.OK
            beside.wait_some()
        assert [m.version.name for m in server.core.served()].count("facile") == 0


def test_model_control_explicit_with_tokens_and_no_admin_list_refuses(
    example_repository: Path,
) -> None:
    from arrowinfer.errors import Unauthenticated

    with Server(
        example_repository,
        port=0,
        kserve_port=None,
        metrics_port=None,
        auth_tokens={"user-token"},
        model_control="explicit",
    ) as server:
        error = flight_action(server.location, "model.unload", {"model": "facile"}, "user-token")
        assert isinstance(error, Unauthenticated)
        assert "admin" in str(error)


def polling_server(repository: Path) -> Server:
    return Server(
        repository,
        port=0,
        kserve_port=None,
        metrics_port=None,
        model_control="poll",
        repository_poll_secs=0.1,
    )


def change_and_wait_for_reload(server: Server, repository: Path) -> None:
    """Change facile's config file; wait until the poller has loaded it anew."""
    before = server.core.get("facile")
    config = repository / "facile" / "config.pbtxt"
    config.write_text(config.read_text() + "\n# changed\n")
    wait_until(lambda: server.core.get("facile") is not before, "facile reloaded")


def test_model_control_poll_reloads_changed_models(tmp_path: Path) -> None:
    from arrowinfer.errors import RequestError
    from arrowinfer.examples import write_example_repository

    repository = write_example_repository(tmp_path / "repo", models=["identity", "facile"])
    with polling_server(repository) as server:
        with GoodClient(server.location) as beside:
            change_and_wait_for_reload(server, repository)
            error = flight_action(server.location, "model.unload", {"model": "identity"})
            assert isinstance(error, RequestError)
            assert "'poll'" in str(error)
            beside.wait_some()
        import shutil

        shutil.rmtree(repository / "facile")
        wait_until(
            lambda: "facile" not in [m.version.name for m in server.core.served()],
            "facile unloaded once its directory is gone",
        )


def test_model_control_poll_survives_a_repository_unreadable_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository that cannot be read when the server starts (an OSError from the file
    system, injected here) neither stops the start nor the polling: the first snapshot the
    poller can take is where it starts from, and later changes reload as usual."""
    from arrowinfer.examples import write_example_repository

    repository = write_example_repository(tmp_path / "repo", models=["facile"])
    snapshot = Server._snapshot
    calls: list[int] = []

    def unreadable_first(self: Server) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise PermissionError("the repository cannot be read now")
        return snapshot(self)

    monkeypatch.setattr(Server, "_snapshot", unreadable_first)
    with polling_server(repository) as server:
        wait_until(lambda: len(calls) >= 3, "two polls after the failed start")
        change_and_wait_for_reload(server, repository)


def wait_until(condition: Any, what: str) -> None:
    stop = threading.Event()
    for _ in range(int(WAIT * 20)):
        if condition():
            return
        stop.wait(0.05)
    raise AssertionError(f"timed out waiting: {what}")


# -- 4: a client that ignores goaway cannot hold a stopping server ----------------------------


def serve_process(repository: Path, log: Any, *extra: str) -> subprocess.Popen[str]:
    """``arrowinfer serve`` on free Flight and KServe ports (no HTTP, no metrics), its log
    to ``log``, its stdout piped (the first line names its location)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arrowinfer.cli",
            "serve",
            str(repository),
            *("--port", "0", "--kserve-port", "0", "--http-port", "-1", "--metrics-port", "-1"),
            *extra,
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )


def test_exit_timeout_ends_a_server_held_by_an_idle_stream(
    example_repository: Path, tmp_path: Path
) -> None:
    import re
    import signal
    import time

    log = (tmp_path / "serve.log").open("w")
    process = serve_process(example_repository, log, "--exit-timeout-secs", "1")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r" on (grpc://\S+)", line)
        assert found, line
        location = found.group(1)
        port = re.search(
            r"KServe v2 gRPC listening on \S+:(\d+)", (tmp_path / "serve.log").read_text()
        )
        assert port
        holder = flight.FlightClient(location)
        channel = grpc.insecure_channel(f"127.0.0.1:{port.group(1)}")
        idle = threading.Event()

        def nothing() -> Iterator[pb.ModelInferRequest]:
            idle.wait(WAIT)  # a KServe stream that sends nothing, and never ends
            return
            yield

        with GoodClient(location) as beside:
            # the attackers: one request, then never read, never finish, ignore goaway
            writer, _ = holder.do_exchange(flight.FlightDescriptor.for_path("identity"))
            writer.begin(identity_batch(1).schema)
            writer.write_batch(identity_batch(1))
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            kserve_call = stub.ModelStreamInfer(nothing())
            beside.wait_some()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
        assert time.monotonic() - started < 15
        idle.set()
        kserve_call.cancel()
        channel.close()
        holder.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        if process.stdout is not None:
            process.stdout.close()
        log.close()
    assert "streams still open" in (tmp_path / "serve.log").read_text()


# -- 5: a client that does not read its results cannot make the server hold them ---------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _flood_flight(location: str, kserve_port: int, sent: list[int], keep: list[Any]) -> None:
    request = identity_batch(1024)  # 4 MiB
    client = flight.FlightClient(location)
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("identity"))
    keep.extend((client, writer, reader))  # the call stays open, never read
    writer.begin(request.schema)
    with contextlib.suppress(pa.ArrowException, OSError):
        for _ in range(150):
            writer.write_batch(request)  # and never a read
            sent[0] += 1


def _flood_kserve(location: str, kserve_port: int, sent: list[int], keep: list[Any]) -> None:
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1024, 1024])
    request.raw_input_contents.append(payload(1024).tobytes())  # 4 MiB

    def requests() -> Iterator[pb.ModelInferRequest]:
        for _ in range(150):
            yield request
            sent[0] += 1

    channel = grpc.insecure_channel(f"127.0.0.1:{kserve_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    keep.append(channel)
    keep.append(stub.ModelStreamInfer(requests()))  # the call stays open, never read


@pytest.mark.parametrize("flood", [_flood_flight, _flood_kserve], ids=["flight", "kserve"])
def test_a_client_that_never_reads_is_not_read_either(
    example_repository: Path, tmp_path: Path, flood: Any
) -> None:
    import re
    import time

    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    process = serve_process(example_repository, log, "--model", "identity")
    sent = [0]
    keep: list[Any] = []
    try:
        assert process.stdout is not None
        found = re.search(r" on (grpc://\S+)", process.stdout.readline())
        assert found
        location = found.group(1)
        port = re.search(r"KServe v2 gRPC listening on \S+:(\d+)", log_path.read_text())
        assert port, log_path.read_text()
        with GoodClient(location) as beside:
            beside.wait_some(5)
            baseline = _rss_bytes(process.pid)
            threading.Thread(
                target=flood, args=(location, int(port.group(1)), sent, keep), daemon=True
            ).start()
            # wait until the attacker is stalled (the server stopped reading it)
            last, still = -1, 0
            deadline = time.monotonic() + WAIT
            while still < 60 and sent[0] < 150 and time.monotonic() < deadline:
                still = still + 1 if sent[0] == last else 0
                last = sent[0]
                threading.Event().wait(0.05)
            grown = _rss_bytes(process.pid) - baseline
            beside.wait_some(5)  # and the good client is served all along
        assert sent[0] < 150, "the server read every request of a client that reads nothing"
        assert grown < 400 << 20, f"the server grew by {grown >> 20} MiB"
    finally:
        process.kill()
        process.wait(WAIT)
        process.stdout.close() if process.stdout is not None else None
        log.close()


# -- 6: malformed requests fail alone, and never show the server's insides --------------------


def test_malformed_stream_metadata_fails_that_request_only(target: Server) -> None:
    client = flight.FlightClient(target.location)
    good = identity_batch(2)
    deep = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    bad_metadata = [deep, b"\xff\xfe{}", b"[1, 2]", b'{"id": NaN}', b"{" * 100_000]
    with GoodClient(target.location) as beside:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("identity"), OPTIONS)
        writer.begin(good.schema)
        for metadata in bad_metadata:
            writer.write_with_metadata(good, metadata)
            reply = json.loads(reader.read_chunk().app_metadata.to_pybytes())
            assert error_of(reply) == "InvalidInput", metadata[:20]
            no_internals(reply["error"]["message"])
            writer.write_batch(good)  # the stream goes on
            chunk = reader.read_chunk()
            assert chunk.data.num_rows == 2
        writer.done_writing()
        writer.close()
        beside.wait_some()
    client.close()


WRONG_BODIES = [
    ("model.config", {"model": "identity", "version": [1]}),
    ("model.config", {"model": ["identity"]}),
    ("model.metadata", {"model": "identity", "version": True}),
    ("model.statistics", {"model": 5}),
    ("model.statistics", {"model": "identity", "version": {"x": 1}}),
    ("model.config", {"model": "identity", "version": 1e300}),
]


def test_actions_with_wrong_json_types_are_invalid_input(target: Server) -> None:
    from arrowinfer.errors import InvalidInput

    with GoodClient(target.location) as beside:
        for name, body in WRONG_BODIES:
            error = flight_action(target.location, name, body)
            assert isinstance(error, InvalidInput), (name, body, error)
            no_internals(str(error))
        for raw in (b"\xff", b"[]", b'{"model": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
            client = flight.FlightClient(target.location)
            with pytest.raises(flight.FlightError) as caught:
                list(client.do_action(flight.Action("model.config", raw), OPTIONS))
            client.close()
            no_internals(str(caught.value))
            assert b"InvalidInput" in (caught.value.extra_info or b"")
        beside.wait_some()


def test_shm_requests_with_wrong_json_types_are_invalid_input(target: Server) -> None:
    requests: list[Any] = [
        {"op": "infer", "model": "identity", "version": [1], "input": {}, "output": {}},
        {"op": "infer", "model": 7, "input": {}, "output": {}},
        {"op": 5},
        {"op": "register", "name": 5, "size": "x"},
        {"op": "register", "name": "x", "size": 1e300},
        {"op": "unregister", "name": {"a": 1}},
        {"op": "infer", "model": "identity", "input": {"region": [1]}, "output": {}},
        {"op": "infer", "model": "identity", "input": [], "output": None},
        ["not", "an", "object"],
    ]
    with GoodClient(target.location) as beside, raw_session(target) as session:
        for request in requests:
            reply = session.ask(request)
            assert error_of(reply) == "InvalidInput", (request, reply)
            no_internals(json.dumps(reply))
        for raw in (b"\xff\xfe", b'{"op": ' + b"[" * 3000 + b"]" * 3000 + b"}", b"{"):
            reply = session.ask(raw)
            assert error_of(reply) == "InvalidInput"
        assert session.ask({"op": "unregister", "name": "nothing"})["error"]["type"]
        beside.wait_some()


def test_invalid_utf8_descriptors_fail_without_harm(target: Server) -> None:
    client = flight.FlightClient(target.location)
    with GoodClient(target.location) as beside:
        for path in ([b"\xff\xfe"], [b"identity", b"\xff"]):
            with pytest.raises(flight.FlightError) as caught:
                client.get_flight_info(flight.FlightDescriptor.for_path(*path), OPTIONS)
            no_internals(str(caught.value))
        beside.wait_some()
    client.close()


def test_an_unexpected_server_error_shows_only_an_incident_id(
    target: Server, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(batch: pa.RecordBatch, region: Any) -> None:
        raise RuntimeError("secret detail in /opt/server/internal.py")

    good = identity_batch(2)
    data = crafted_stream(good, *ipc_messages(good)[1:])
    target.shm.on_request = explode
    try:
        with (
            GoodClient(target.location) as beside,
            raw_session(target) as session,
            raw_region(1 << 20) as source,
            raw_region(1 << 20) as (out, _),
        ):
            for name in (source[0], out):
                session.ask({"op": "register", "name": name, "size": 1 << 20})
            reply = shm_infer(session, "identity", data, source, out)
            assert error_of(reply) == "ServerError"
            message = reply["error"]["message"]
            assert "secret" not in message
            no_internals(message)
            incident = message.split("incident ")[1].split(")")[0]
            assert any(incident in r.getMessage() for r in caplog.records)
            target.shm.on_request = None
            assert "output" in shm_infer(session, "identity", data, source, out)
            beside.wait_some()
    finally:
        target.shm.on_request = None


# -- 7: shared memory reaches only memory the client owns --------------------------------------

OTHER_UID = 65534  # nobody


def _as_other_user(location: str, victims: dict[str, str], answers: Any) -> None:
    """Runs in a spawned child: drops to ``nobody``, then attacks over a shm session.

    Modules are imported before the uid changes: the new user cannot read root's files.
    """
    import encodings.idna  # noqa: F401 -- grpc resolves names with it
    import mmap as mmap_module

    results: dict[str, Any] = {}
    try:
        os.setgid(OTHER_UID)
        os.setuid(OTHER_UID)
        session = RawSession(location)
        for label, name in victims.items():
            results[label] = session.ask({"op": "register", "name": name, "size": 4096})
        # its own regions: accepted, and they work
        own = f"arrowinfer-attack-own-{os.getpid()}"
        sizes = {own + "-in": 1 << 20, own + "-out": 1 << 20, own + "-open": 4096}
        memories = {}
        for name, size in sizes.items():
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
            memories[name] = (fd, mmap_module.mmap(fd, size))
        os.fchmod(memories[own + "-open"][0], 0o644)  # its own, but others may read it
        for name, size in sizes.items():
            results[name.rsplit("-", 1)[1]] = session.ask(
                {"op": "register", "name": name, "size": size}
            )
        batch = identity_batch(3, seed=4)
        data = crafted_stream(batch, *ipc_messages(batch)[1:])
        source = (own + "-in", memories[own + "-in"][1])
        results["infer"] = shm_infer(session, "identity", data, source, own + "-out")
        # shrink the input region under the server: its next read must fail, not SIGBUS
        os.ftruncate(memories[own + "-in"][0], 64)
        results["shrunk"] = session.ask(
            {
                "op": "infer",
                "model": "identity",
                "input": {"region": own + "-in", "offset": 0, "length": len(data)},
                "output": {"region": own + "-out", "offset": 0, "size": 1 << 20},
            }
        )
        os.ftruncate(memories[own + "-out"][0], 0)  # and the output region, to nothing
        os.ftruncate(memories[own + "-in"][0], 1 << 20)
        memories[own + "-in"][1][: len(data)] = data
        results["shrunk_output"] = shm_infer(session, "identity", data, source, own + "-out")
        session.close()
        for name, (fd, memory) in memories.items():
            memory.close()
            os.close(fd)
            os.unlink(f"/dev/shm/{name}")
    except BaseException as err:  # noqa: BLE001 -- reported to the test, which fails on it
        results["crash"] = f"{type(err).__name__}: {err}"
    answers.put(results)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_shm_regions_of_other_users_are_refused(target: Server) -> None:
    import multiprocessing

    secret = b"root's secret " * 64
    victims = {}
    paths = []
    for label, mode in (("private", 0o600), ("world", 0o666)):
        name = f"arrowinfer-victim-{label}-{os.getpid()}"
        path = Path("/dev/shm") / name
        path.write_bytes(secret.ljust(4096, b"\0"))
        os.chmod(path, mode)
        victims[label] = name
        paths.append(path)
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    try:
        with GoodClient(target.location) as beside:
            child = context.Process(target=_as_other_user, args=(target.location, victims, answers))
            child.start()
            results = answers.get(timeout=120)
            child.join(WAIT)
            beside.wait_some()
        assert "crash" not in results, results
        for label in victims:
            assert error_of(results[label]) == "InvalidInput", results[label]
            no_internals(json.dumps(results[label]))
        assert "registered" in results["in"]
        assert "registered" in results["out"]
        assert error_of(results["open"]) == "InvalidInput"  # mode 0644: not private
        assert "output" in results["infer"], results["infer"]
        assert error_of(results["shrunk"]) == "InvalidInput"
        assert "shrank" in results["shrunk"]["error"]["message"]
        assert "output" in results["shrunk_output"], results["shrunk_output"]
        for path in paths:  # untouched
            assert path.read_bytes() == secret.ljust(4096, b"\0")
    finally:
        for path in paths:
            path.unlink()


def test_shm_own_regions_are_accepted_and_a_shrink_fails_alone(target: Server) -> None:
    good = identity_batch(2)
    data = crafted_stream(good, *ipc_messages(good)[1:])
    with (
        GoodClient(target.location) as beside,
        raw_session(target) as session,
        raw_region(1 << 20) as source,
        raw_region(1 << 20) as (out, _),
        raw_region(4096, mode=0o640) as (shared, _),
    ):
        for name in (source[0], out):
            assert "registered" in session.ask({"op": "register", "name": name, "size": 1 << 20})
        reply = session.ask({"op": "register", "name": shared, "size": 4096})
        assert error_of(reply) == "InvalidInput", "group may read it: not private"
        assert "output" in shm_infer(session, "identity", data, source, out)
        os.truncate(f"/dev/shm/{source[0]}", 16)
        request = {
            "op": "infer",
            "model": "identity",
            "input": {"region": source[0], "offset": 0, "length": len(data)},
            "output": {"region": out, "offset": 0, "size": 1 << 20},
        }
        assert error_of(session.ask(request)) == "InvalidInput"
        beside.wait_some()


def test_repository_errors_name_files_inside_the_repository_only(tmp_path: Path) -> None:
    from arrowinfer.errors import ModelError
    from arrowinfer.examples import write_example_repository

    repository = write_example_repository(tmp_path / "secret-place", models=["identity"])
    (repository / "broken").mkdir()
    (repository / "broken" / "config.pbtxt").write_text("garbage {")
    with (
        Server(
            repository, port=0, kserve_port=None, metrics_port=None, model_control="explicit"
        ) as server,
        GoodClient(server.location) as beside,
    ):
        index = flight_action(server.location, "repository.index", {})
        (broken,) = [e for e in index if e["name"] == "broken"]
        assert broken["reason"].startswith("broken/config.pbtxt: invalid model config")
        error = flight_action(server.location, "model.load", {"model": "broken"})
        assert isinstance(error, ModelError)
        for text in (json.dumps(index), str(error)):
            assert "secret-place" not in text
            assert str(tmp_path) not in text
        beside.wait_some()


# -- the serve command's security flags -------------------------------------------------------


def test_serve_flags_and_their_defaults(tmp_path: Path) -> None:
    from arrowinfer.cli import main, parser

    args = parser().parse_args(["serve"])
    assert args.max_request_bytes == 1 << 30
    assert args.model_control_mode == "none"
    assert args.admin_token_file is None
    assert args.exit_timeout_secs == 30.0
    tokens = tmp_path / "admin.txt"
    tokens.write_text("admin-token\n")
    for argv, words in (
        (["--admin-token-file", str(tokens)], "needs --model-control-mode explicit"),
        (["--max-request-bytes", "0"], "--max-request-bytes must be positive"),
        (["--exit-timeout-secs", "-1"], "--exit-timeout-secs"),
        (
            ["--model-control-mode", "explicit", "--admin-token-file", str(tmp_path / "none")],
            "--admin-token-file",
        ),
    ):
        with pytest.raises(SystemExit, match=words):
            main(["serve", str(tmp_path), *argv])
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--model-control-mode", "open"])


# -- 3: a request that fails inside a merged batch fails alone ---------------------------------

TABLE = np.arange(10, dtype=np.float32) * 1.5


def _write_lookup_model(root: Path) -> Path:
    """``lookup``: OUT = TABLE[INDEX]; an index out of range fails inside onnxruntime."""
    import onnx
    from onnx import TensorProto, helper

    from arrowinfer.examples import IR_VERSION, OPSET

    graph = helper.make_graph(
        [helper.make_node("Gather", ["TABLE", "INDEX"], ["OUT"], axis=0)],
        "lookup",
        inputs=[helper.make_tensor_value_info("INDEX", TensorProto.INT64, ["batch", 1])],
        outputs=[helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("TABLE", TensorProto.FLOAT, [10], TABLE.tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    (root / "lookup" / "1").mkdir(parents=True)
    onnx.save(model, root / "lookup" / "1" / "model.onnx")
    (root / "lookup" / "config.pbtxt").write_text(
        'name: "lookup"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
        'input [ { name: "INDEX" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
    )
    return root


def test_a_request_failing_in_onnxruntime_fails_alone(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    repository = _write_lookup_model(tmp_path)
    with Server(repository, port=0, kserve_port=None, metrics_port=None) as server:
        good_failures: list[str] = []
        bad_outcomes: list[str] = []

        def good(i: int) -> None:
            with Client(server.location) as client:
                for j in range(10):
                    index = np.array([[(i + j) % 10]], dtype=np.int64)
                    try:
                        out = client.infer("lookup", {"INDEX": index}).column("OUT")
                        if tensors.to_numpy(out)[0] != TABLE[index[0, 0]]:
                            good_failures.append("wrong value")
                    except Exception as err:  # noqa: BLE001 -- every failure counts
                        good_failures.append(f"{type(err).__name__}: {err}")

        def bad() -> None:
            with Client(server.location, retries=0) as client:
                for _ in range(10):
                    try:
                        client.infer("lookup", {"INDEX": np.array([[1000]], dtype=np.int64)})
                        bad_outcomes.append("answered")
                    except Exception as err:  # noqa: BLE001 -- the attacker's own error
                        bad_outcomes.append(type(err).__name__)

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(good, i) for i in range(4)] + [pool.submit(bad)]
            for future in futures:
                future.result(WAIT * 4)
        stats = server.core.get("lookup").statistics.as_dict()
        assert not good_failures, good_failures[:5]
        assert bad_outcomes == ["ServerError"] * 10, bad_outcomes
        # the attacker's requests were merged with others, and those batches run again
        # request by request (the batcher's count of such batches)
        assert stats.get("arrowinfer", {}).get("isolated_batches", 0) > 0, stats


def test_json_bombs_and_repeated_outputs_harm_no_client_beside(example_repository: Path) -> None:
    """The eleventh session's HTTP attacks, with a good Flight client beside them: strings
    of escaped quotes that never close (a quadratic scan once), arrays nested past the
    limit, too many arrays, and one output asked for a thousand times. Each gets its 400
    or its one answer; the good client's results stay right."""
    import gzip
    import urllib.error
    import urllib.request

    from arrowinfer.protocol import MAX_JSON_CONTAINERS

    one_row = {"name": "INPUT0", "shape": [1, 1024], "datatype": "FP32", "data": [0.5] * 1024}
    bodies = [
        b'{"inputs":' + b"[]" * 40 + b'"' + b'\\"' * (1 << 20),
        b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"inputs":[' + b"[]," * MAX_JSON_CONTAINERS + b"[]]}",
    ]
    repeated = {"inputs": [one_row], "outputs": [{"name": "OUTPUT0"}] * 1000}
    with (
        Server(
            example_repository, port=0, kserve_port=None, http_port=0, metrics_port=None
        ) as server,
        GoodClient(server.location) as beside,
    ):
        url = f"http://127.0.0.1:{server.http_port}/v2/models/identity/infer"

        def post(body: bytes) -> tuple[int, dict[str, Any]]:
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            request = urllib.request.Request(url, gzip.compress(body), headers)
            try:
                with urllib.request.urlopen(request, timeout=WAIT) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        for body in bodies:
            status, answer = post(body)
            assert status == 400, answer
            assert "Traceback" not in answer["error"]
            beside.wait_some()
        status, answer = post(json.dumps(repeated).encode())
        assert status == 200
        assert [o["name"] for o in answer["outputs"]] == ["OUTPUT0"]
        beside.wait_some()
