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
