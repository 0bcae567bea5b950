"""Shared memory between client and server, and Flight over a Unix domain socket.

Real servers (TCP on ephemeral loopback ports, and Unix sockets); a raw session (plain
``pyarrow.flight``) for the server's refusals; a client killed with SIGKILL in a
subprocess. Every wait is bounded; no fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import flight

from arrowinfer import events, tensors
from arrowinfer._ipc import SchemaCache
from arrowinfer.cli import parser
from arrowinfer.client import Client, FlightTransport, ShmTransport
from arrowinfer.client import _shm as client_shm
from arrowinfer.errors import InvalidInput, RequestError, ServerUnavailable
from arrowinfer.protocol import peer_is_local
from arrowinfer.server import Server
from arrowinfer.server._regions import Region, read_request, write_result
from arrowinfer.server._shm import check_peer

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["facile", "identity", "jet_tagger"]
DEADLINE = 30.0  # seconds any wait in this file may take before the test fails
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


# -- helpers ---------------------------------------------------------------------------------


def start_server(repository: Path, **kwargs: Any) -> Server:
    options: dict[str, Any] = {"port": 0, "kserve_port": None, "metrics_port": None}
    return Server(repository, models=MODELS, **{**options, **kwargs})


@pytest.fixture(scope="module")
def shm_server(example_repository: Path) -> Iterator[Server]:
    with start_server(example_repository) as running:
        yield running


@pytest.fixture
def fresh_server(example_repository: Path) -> Iterator[Server]:
    """A server of its own, for tests that count its mapped regions."""
    with start_server(example_repository) as running:
        yield running


@pytest.fixture(scope="module")
def unix_server(example_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("sock") / "arrowinfer.sock"
    with start_server(example_repository, unix_socket=str(path)) as running:
        yield running


def shm_url(server: Server) -> str:
    return server.location.replace("grpc", "shm", 1)


def shm_client(server: Server, **options: Any) -> Client:
    """A client that sends every request through shared memory, small ones included."""
    transport = ShmTransport(shm_url(server), min_shm_bytes=0, **options)
    return Client(server.location, transport=transport)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def hits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 15), dtype=np.float32)


def payload(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 1024), dtype=np.float32)


def requests() -> list[tuple[str, Any]]:
    """One request of each kind: small, ragged (jet_tagger) and 4 MB (identity)."""
    return [
        ("facile", {"hits": hits(1)}),
        ("facile", {"hits": hits(3000, seed=1)}),
        ("jet_tagger", events.synthetic_jet_constituents(40, seed=2)),
        ("identity", {"INPUT0": payload(1024, seed=3)}),
    ]


def same_bits(a: pa.RecordBatch, b: pa.RecordBatch) -> bool:
    """Equal schemas (but metadata), and every column's values equal bit for bit."""
    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns, strict=True):
        u, v = tensors.to_numpy(x), tensors.to_numpy(y)
        if u.dtype != v.dtype or u.shape != v.shape or u.tobytes() != v.tobytes():
            return False
    return True


def close(a: pa.RecordBatch, b: pa.RecordBatch) -> bool:
    """Equal schemas and rows, values equal within float32 rounding."""
    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    return all(
        np.allclose(tensors.to_numpy(x), tensors.to_numpy(y), rtol=1e-5, atol=1e-6)
        for x, y in zip(a.columns, b.columns, strict=True)
    )


def own_files(pid: int | None = None) -> list[str]:
    prefix = f"arrowinfer-{os.getpid() if pid is None else pid}-"
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def arrays_of(batch: pa.RecordBatch) -> list[np.ndarray]:
    """Numpy views of every column's values (ragged columns: their flat values)."""
    out = []
    for column in batch.columns:
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            out.append(tensors.ragged_to_numpy(column).values)
        else:
            out.append(tensors.to_numpy(column))
    return out


def region_of(transport: ShmTransport, result: pa.RecordBatch) -> Any:
    """The client region whose memory the result's first column is a view of."""
    values = arrays_of(result)[0]
    for region in list(transport._regions):
        memory = np.frombuffer(region.view, np.uint8)
        if np.shares_memory(values, memory):
            return region
    return None


def read_line(stream: IO[str], timeout: float = DEADLINE) -> str:
    """The next line of a child's output, waiting at most ``timeout`` seconds."""
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).strip()
    except queue.Empty:
        return ""


@contextlib.contextmanager
def raw_region(size: int) -> Iterator[tuple[str, mmap.mmap]]:
    """A region made by hand in /dev/shm (what a foreign client would do)."""
    name = f"arrowinfer-test-{os.getpid()}-{os.urandom(4).hex()}"
    path = os.path.join("/dev/shm", name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
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


def write_request(memory: mmap.mmap, batch: pa.RecordBatch) -> int:
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(memory))
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return int(sink.tell())


class RawSession:
    """A shared-memory session spoken with plain pyarrow.flight, one request at a time."""

    def __init__(self, location: str):
        self.client = flight.FlightClient(location)
        options = flight.FlightCallOptions(timeout=DEADLINE)
        self.writer, self.reader = self.client.do_exchange(
            flight.FlightDescriptor.for_path("arrowinfer.shm"), options=options
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


def error_type(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    return str(reply["error"]["type"])


# -- selection -------------------------------------------------------------------------------


def test_shm_url_and_auto_select_shared_memory(shm_server: Server) -> None:
    with Client(shm_url(shm_server)) as client:
        assert isinstance(client.transports[0], ShmTransport)
        assert client.transports[0].location == shm_server.location
    with Client(shm_server.location, shm="auto") as client:
        assert isinstance(client.transports[0], ShmTransport)
    with Client(shm_server.location) as client:  # the default stays Flight
        assert isinstance(client.transports[0], FlightTransport)
    with pytest.raises(ValueError, match="shm must be"):
        Client(shm_server.location, shm="yes")


def test_auto_falls_back_to_flight(shm_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # not on this host: decided from the URL alone, nothing is tried
    with Client("grpc://192.0.2.1:8815", shm="auto") as client:
        assert isinstance(client.transports[0], FlightTransport)
    assert not client_shm.is_local("grpc+tls://example.org:443")
    assert client_shm.is_local("grpc://localhost:1")
    assert client_shm.is_local("grpc://[::1]:1")
    assert client_shm.is_local("grpc+unix:///tmp/x.sock")

    # on this host, but the server cannot see the client's regions (say, another
    # container): the test registration fails, and Flight it is
    class Elsewhere(client_shm._Region):
        def __init__(self, size: int):
            super().__init__(size)
            self.name = self.name + "-not-there"

    monkeypatch.setattr(client_shm, "_Region", Elsewhere)
    with Client(shm_server.location, shm="auto") as client:
        assert isinstance(client.transports[0], FlightTransport)
        result = client.infer("facile", {"hits": hits(2)})
        assert result.num_rows == 2
    with pytest.raises(InvalidInput, match="no shared-memory region"):
        Client(shm_url(shm_server))
    monkeypatch.undo()
    assert not own_files(), "a failed probe leaves no region behind"


def test_auto_falls_back_when_nothing_listens(tmp_path: Path) -> None:
    with Client(f"grpc+unix://{tmp_path}/none.sock", shm="auto") as client:
        assert isinstance(client.transports[0], FlightTransport)


# -- correctness -----------------------------------------------------------------------------


def test_requests_reach_onnxruntime_without_an_alignment_copy(shm_server: Server) -> None:
    """The client places each stream so that its batch body lies at a multiple of 64 bytes
    of the region, and the server reads it in the same phase: onnxruntime takes the input
    as it is (the model's `alignment_copies` do not grow), small batches (serialized
    first) and large ones (streamed into the region) alike."""
    statistics = shm_server.core.get("identity").statistics
    before = statistics.as_dict()["arrowinfer"]["alignment_copies"]
    with shm_client(shm_server) as shm:
        for rows in (1, 3, 64, 100, 1024):  # 4 KiB ... 4 MiB: both sides of SMALL_BATCH
            data = payload(rows, seed=rows)
            result = shm.infer("identity", {"INPUT0": data})
            assert tensors.to_numpy(result.column("OUTPUT0")).tobytes() == data.tobytes()
    assert statistics.as_dict()["arrowinfer"]["alignment_copies"] == before


def test_results_equal_flight_bit_for_bit(shm_server: Server) -> None:
    with Client(shm_server.location) as flight_client, shm_client(shm_server) as shm:
        for model, data in requests():
            expected = flight_client.infer(model, data)
            got = shm.infer(model, data)
            assert same_bits(got, expected), model
            assert set(got.schema.metadata) >= {b"queue_ns", b"compute_infer_ns"}


def test_stream_many_pipelined_requests(shm_server: Server) -> None:
    # identity is exact whatever the dynamic batcher merges; models are not bit for bit
    # (merged batches take other onnxruntime kernels): those within float32 rounding
    inputs = [{"INPUT0": payload(1 + i % 7, seed=i)} for i in range(300)]
    with Client(shm_server.location) as flight_client, shm_client(shm_server) as shm:
        got = list(shm.stream("identity", inputs, window=32))
        assert len(got) == len(inputs)
        for result, data in zip(got, inputs, strict=True):
            assert tensors.to_numpy(result.column(0)).tobytes() == data["INPUT0"].tobytes()
        expected = list(flight_client.stream("identity", inputs, window=32))
        assert all(same_bits(g, e) for g, e in zip(got, expected, strict=True))
        del got, expected
        for model, data in [
            ("facile", [{"hits": hits(1 + i % 7, seed=i)} for i in range(200)]),
            (
                "jet_tagger",
                [events.synthetic_jet_constituents(1 + i % 5, seed=i) for i in range(40)],
            ),
        ]:
            got = list(shm.stream(model, data, window=16))
            expected = list(flight_client.stream(model, data, window=16))
            assert all(close(g, e) for g, e in zip(got, expected, strict=True)), model


def test_infer_async_from_several_threads(shm_server: Server) -> None:
    work = [(t, i) for t in range(4) for i in range(25)]
    inputs = {(t, i): {"INPUT0": payload(1 + i % 9, seed=100 * t + i)} for t, i in work}
    futures: dict[tuple[int, int], Future[pa.RecordBatch]] = {}
    lock = threading.Lock()
    with shm_client(shm_server) as shm:

        def send(t: int) -> None:
            for i in range(25):
                future = shm.infer_async("identity", inputs[(t, i)])
                with lock:
                    futures[(t, i)] = future

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert len(futures) == len(work)
        for key, future in futures.items():
            result = future.result(DEADLINE)
            assert tensors.to_numpy(result.column(0)).tobytes() == inputs[key]["INPUT0"].tobytes()


def test_output_region_grows_when_a_result_does_not_fit(shm_server: Server) -> None:
    with shm_client(shm_server) as shm, Client(shm_server.location) as flight_client:
        transport = shm.transports[0]
        assert isinstance(transport, ShmTransport)
        transport._output_size = lambda key, rows, length: 16  # type: ignore[method-assign]
        data = {"INPUT0": payload(300, seed=5)}
        assert same_bits(shm.infer("identity", data), flight_client.infer("identity", data))
        assert transport.statistics["retries"] == 1


def test_small_requests_go_over_flight_by_default(shm_server: Server) -> None:
    seen: list[int] = []
    shm_server.shm.on_request = lambda batch, region: seen.append(batch.num_rows)
    try:
        with Client(shm_url(shm_server)) as shm, Client(shm_server.location) as tcp:
            transport = shm.transports[0]
            assert isinstance(transport, ShmTransport)
            small, large = {"INPUT0": payload(2)}, {"INPUT0": payload(64)}  # 8 KiB, 256 KiB
            assert same_bits(shm.infer("identity", small), tcp.infer("identity", small))
            assert same_bits(shm.infer("identity", large), tcp.infer("identity", large))
            assert seen == [64]
            assert transport.statistics["flight_requests"] == 1
            assert transport.statistics["requests"] == 1
    finally:
        shm_server.shm.on_request = None


def test_errors_come_back_as_through_flight(shm_server: Server) -> None:
    with shm_client(shm_server) as shm:
        transport = shm.transports[0]
        bad = pa.record_batch({"hits": pa.array([1.0, 2.0], pa.float32())})
        with pytest.raises(InvalidInput, match="facile"):
            transport.submit("facile", None, bad).result(DEADLINE)
        with pytest.raises(KeyError, match="not served"):
            shm.infer("nope", {"hits": hits(1)})
        assert shm.infer("facile", {"hits": hits(2)}).num_rows == 2  # the session goes on


# -- zero copy -------------------------------------------------------------------------------


def test_server_reads_requests_by_copy_never_mapping_them(shm_server: Server) -> None:
    # a mapping of a client's region would die with SIGBUS once the client shrinks the file
    seen: list[tuple[str, int]] = []

    def look(batch: pa.RecordBatch, region: Region) -> None:
        assert region.mapping is None
        maps = Path("/proc/self/maps").read_text()
        seen.append((batch.schema.names[0], maps.count(region.name)))

    shm_server.shm.on_request = look
    try:
        with shm_client(shm_server) as shm:
            for model, data in requests():
                shm.infer(model, data)
    finally:
        shm_server.shm.on_request = None
    assert [name for name, _ in seen] == ["hits", "hits", "points", "INPUT0"]
    # the client (this process too) maps each region once; the server never does
    assert all(count <= 1 for _, count in seen), seen


@pytest.mark.parametrize("rows", [1, 64, 65, 2048])  # small (serialized) and large (streamed)
def test_ipc_in_place_is_a_plain_stream_and_zero_copy(rows: int) -> None:
    batch = pa.record_batch({"x": tensors.from_numpy(payload(rows))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    reference = sink.getvalue()
    schemas = SchemaCache()
    with raw_region(16 << 20) as (_, memory):
        length = write_result(pa.py_buffer(memory), batch)
        assert memory[:length] == reference.to_pybytes()  # what any Arrow reader reads
        whole = np.frombuffer(memory, np.uint8)
        view = pa.py_buffer(memory).slice(0, length)
        for cache in (None, schemas, schemas):
            got = read_request(view, cache)
            values = tensors.to_numpy(got.column(0))
            assert np.shares_memory(values, whole)
            assert values.tobytes() == payload(rows).tobytes()
        with pytest.raises(InvalidInput, match="does not fit"):
            write_result(pa.py_buffer(memoryview(memory)[0 : length - 1]), batch)
        for cache in (None, schemas):
            with pytest.raises(InvalidInput, match="no valid Arrow IPC"):
                read_request(view.slice(8, 64), cache)
        del values, got, view, whole


def test_results_are_views_of_the_client_region(shm_server: Server) -> None:
    with shm_client(shm_server) as shm:
        transport = shm.transports[0]
        assert isinstance(transport, ShmTransport)
        result = shm.infer("identity", {"INPUT0": payload(1024)})
        region = region_of(transport, result)
        assert region is not None, "the result is a view of an output region"
        free = transport.statistics["free"]
        assert region not in transport._free  # busy while the result lives
        del result
        transport._collect_returned()
        assert region in transport._free
        assert transport.statistics["free"] == free + 1


def test_copy_results_frees_the_region_at_once(shm_server: Server) -> None:
    transport = ShmTransport(shm_url(shm_server), copy_results=True, min_shm_bytes=0)
    with Client(shm_server.location, transport=transport) as shm:
        data = {"INPUT0": payload(256, seed=9)}
        result = shm.infer("identity", data)
        assert region_of(transport, result) is None
        assert np.array_equal(tensors.to_numpy(result.column(0)), data["INPUT0"])
        transport._collect_returned()
        assert transport.statistics["free"] == transport.statistics["regions"]


# -- regions and cleanup ---------------------------------------------------------------------


def test_client_regions_are_private_and_unlinked() -> None:
    region = client_shm._Region(100_000)
    try:
        path = os.path.join("/dev/shm", region.name)
        assert re.fullmatch(rf"arrowinfer-{os.getpid()}-[0-9a-f]{{16}}", region.name)
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        assert info.st_size == 100_000
    finally:
        region.close()
    assert not os.path.exists(path)
    orphan = client_shm._Region(65536)
    path = os.path.join("/dev/shm", orphan.name)
    del orphan  # the finalizer unlinks a region nobody closed
    assert not os.path.exists(path)


def test_close_leaves_nothing_behind(fresh_server: Server) -> None:
    shm = shm_client(fresh_server)
    result = shm.infer("identity", {"INPUT0": payload(100)})
    assert fresh_server.shm.mapped() >= 2
    assert not own_files(), "files are unlinked once the server has mapped them"
    shm.close()
    wait_for(lambda: fresh_server.shm.mapped() == 0, "the session's regions unmapped")
    assert fresh_server.shm.status()["sessions"] == 0
    # a result that outlives its client stays valid: its mapping goes with it
    assert np.array_equal(tensors.to_numpy(result.column(0)), payload(100))


def test_killed_client_is_cleaned_up(fresh_server: Server) -> None:
    script = (
        "import sys, numpy as np\n"
        "from arrowinfer.client import Client\n"
        "client = Client(sys.argv[1])\n"
        "client.infer('identity', {'INPUT0': np.ones((128, 1024), np.float32)})\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, shm_url(fresh_server)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        assert read_line(child.stdout) == "ready", "the child client did not start"
        assert fresh_server.shm.mapped() >= 2
        child.send_signal(signal.SIGKILL)
        child.wait(DEADLINE)
        wait_for(lambda: fresh_server.shm.mapped() == 0, "a killed client's regions unmapped")
        assert not own_files(child.pid), "nothing of the killed client is left in /dev/shm"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(DEADLINE)
        for name in own_files(child.pid):
            os.unlink(os.path.join("/dev/shm", name))
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    # the server goes on serving others
    with Client(shm_url(fresh_server)) as shm:
        assert shm.infer("facile", {"hits": hits(3)}).num_rows == 3


def test_server_stop_ends_sessions_and_unmaps(example_repository: Path) -> None:
    server = start_server(example_repository)
    shm = shm_client(server)
    try:
        assert shm.infer("facile", {"hits": hits(2)}).num_rows == 2
        assert server.shm.mapped() >= 1
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(DEADLINE)
        assert not stopper.is_alive(), "an open shm session does not hold the server"
        assert server.shm.mapped() == 0
        with pytest.raises(ServerUnavailable):
            shm.infer("facile", {"hits": hits(2)})
    finally:
        shm.close()
        server.stop()


# -- the server's refusals (a raw session) ---------------------------------------------------


def test_register_refuses_bad_names_and_files(fresh_server: Server, tmp_path: Path) -> None:
    link = f"arrowinfer-test-link-{os.getpid()}"
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 4096)
    os.symlink(target, os.path.join("/dev/shm", link))
    try:
        with raw_session(fresh_server) as session, raw_region(4096) as (name, _):
            for bad in ["../etc/passwd", "/tmp/x", "a/b", "", ".hidden", "..", 7, None]:
                reply = session.ask({"op": "register", "name": bad, "size": 4096})
                assert error_type(reply) == "InvalidInput", bad
            reply = session.ask({"op": "register", "name": "no-such-region-xyz", "size": 4096})
            assert error_type(reply) == "InvalidInput"
            assert "no shared-memory region" in reply["error"]["message"]
            reply = session.ask({"op": "register", "name": link, "size": 4096})
            assert error_type(reply) == "InvalidInput", "symlinks are refused"
            reply = session.ask({"op": "register", "name": name, "size": 8192})
            assert "smaller than its registered size" in reply["error"]["message"]
            for size in [0, -1, "4096", True]:
                reply = session.ask({"op": "register", "name": name, "size": size})
                assert error_type(reply) == "InvalidInput", size
            assert fresh_server.shm.mapped() == 0
            assert session.ask({"op": "register", "name": name, "size": 4096, "id": 1}) == {
                "registered": name,
                "id": 1,
            }
            assert error_type(session.ask({"op": "register", "name": name, "size": 4096}))
            assert fresh_server.shm.mapped() == 1
            assert error_type(session.ask({"op": "explode"})) == "InvalidInput"
            assert error_type(session.ask(b"not json")) == "InvalidInput"
            assert session.ask({"op": "unregister", "name": name}) == {"unregistered": name}
            assert fresh_server.shm.mapped() == 0
            assert error_type(session.ask({"op": "unregister", "name": name})) == "InvalidInput"
    finally:
        os.unlink(os.path.join("/dev/shm", link))


def test_infer_refuses_places_outside_regions(fresh_server: Server) -> None:
    batch = pa.RecordBatch.from_arrays([tensors.from_numpy(hits(4))], ["hits"])
    with (
        raw_session(fresh_server) as session,
        raw_region(65536) as (source, source_memory),
        raw_region(65536) as (target, target_memory),
    ):
        length = write_request(source_memory, batch)
        for name in (source, target):
            assert "registered" in session.ask({"op": "register", "name": name, "size": 65536})

        def infer(inp: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
            return session.ask({"op": "infer", "model": "facile", "input": inp, "output": out})

        good_in = {"region": source, "offset": 0, "length": length}
        good_out = {"region": target, "offset": 0, "size": 65536}
        bad_inputs = [
            {"region": source, "offset": 65000, "length": length},
            {"region": source, "offset": 0, "length": 65537},
            {"region": source, "offset": -8, "length": length},
            {"region": source, "offset": 0, "length": 0},
            {"region": source, "offset": "0", "length": length},
            {"region": "unknown", "offset": 0, "length": length},
            {"region": source, "offset": 8, "length": length - 8},  # not an IPC stream
        ]
        for place in bad_inputs:
            assert error_type(infer(place, good_out)) == "InvalidInput", place
        bad_outputs = [
            {"region": target, "offset": 65000, "size": 1000},
            {"region": target, "offset": 0, "size": 1 << 40},
            {"region": target, "offset": -1, "size": 100},
            {"region": "unknown", "offset": 0, "size": 100},
        ]
        for place in bad_outputs:
            assert error_type(infer(good_in, place)) == "InvalidInput", place
        small = infer(good_in, {"region": target, "offset": 0, "size": 64})
        assert error_type(small) == "InvalidInput"
        assert small["needed"] > 64
        assert error_type(session.ask({"op": "infer", "model": "nope"})) == "ModelNotFound"
        # after all that, the session and the server still serve
        reply = infer(good_in, {"region": target, "offset": 4096, "size": 60000})
        place = reply["output"]
        assert place["region"] == target
        assert place["offset"] == 4096
        view = pa.py_buffer(target_memory).slice(place["offset"], place["length"])
        result = pa.ipc.open_stream(view).read_next_batch()
        assert result.num_rows == 4
        assert result.schema.names == ["energy"]
        del result, view
    with Client(fresh_server.location) as flight_client:
        assert flight_client.infer("facile", {"hits": hits(4)}).num_rows == 4
    wait_for(lambda: fresh_server.shm.mapped() == 0, "the raw session's regions unmapped")


def test_shm_status_action(shm_server: Server) -> None:
    client = flight.FlightClient(shm_server.location)
    try:
        results = list(client.do_action(flight.Action("shm.status", b"{}")))
        status = json.loads(results[0].body.to_pybytes())
        assert {"sessions", "regions", "bytes", "allow_remote"} <= set(status)
        assert status["allow_remote"] is False
    finally:
        client.close()


def test_remote_peers_need_allow_client_shm(example_repository: Path) -> None:
    for peer in ["ipv4:127.0.0.1:5000", "ipv4:127.1.2.3:5000", "ipv6:[::1]:5000", "unix:"]:
        assert peer_is_local(peer), peer
        check_peer(peer, allow_remote=False)
    for peer in ["ipv4:10.1.2.3:5000", "ipv6:[2001:db8::1]:5000", "ipv4:192.0.2.1:1", "x"]:
        assert not peer_is_local(peer), peer
        with pytest.raises(RequestError, match="allow-client-shm"):
            check_peer(peer, allow_remote=False)
        check_peer(peer, allow_remote=True)
    assert parser().parse_args(["serve", "--allow-client-shm"]).allow_client_shm
    assert not parser().parse_args(["serve"]).allow_client_shm
    with start_server(example_repository, allow_client_shm=True) as server:
        assert server.shm.allow_remote


def test_a_server_without_shared_memory_has_no_sessions(example_repository: Path) -> None:
    # what a worker behind the relay runs when it cannot tell local clients from remote
    with start_server(example_repository, shared_memory=False) as server:
        client = flight.FlightClient(server.location)
        try:
            with pytest.raises(flight.FlightError, match=r"arrowinfer\.shm"):
                RawSession(server.location).ask({"op": "register", "name": "x", "size": 1})
            status = client.do_action(flight.Action("shm.status", b"{}"))
            assert json.loads(next(iter(status)).body.to_pybytes()) == {
                "sessions": 0,
                "regions": 0,
            }
            # Flight itself serves on
            info = client.get_flight_info(flight.FlightDescriptor.for_path("identity"))
            assert info.schema.names == ["INPUT0"]
        finally:
            client.close()


# -- Flight over a Unix domain socket --------------------------------------------------------


def test_flight_over_unix_socket(unix_server: Server, shm_server: Server) -> None:
    assert unix_server.location.startswith("grpc+unix:///")
    with Client(unix_server.location) as unix, Client(shm_server.location) as tcp:
        assert isinstance(unix.transports[0], FlightTransport)
        assert set(unix.models()) == set(MODELS)
        for model, data in requests():
            assert same_bits(unix.infer(model, data), tcp.infer(model, data)), model
        inputs = [{"hits": hits(1 + i % 5, seed=i)} for i in range(100)]
        got = list(unix.stream("facile", inputs, window=16))
        expected = list(tcp.stream("facile", inputs, window=16))
        assert all(same_bits(g, e) for g, e in zip(got, expected, strict=True))


def test_shm_over_unix_socket(unix_server: Server, shm_server: Server) -> None:
    path = unix_server.location.removeprefix("grpc+unix://")
    with (
        Client(f"shm+unix://{path}") as default,
        shm_client(unix_server) as shm,
        Client(unix_server.location, shm="auto") as auto,
        Client(shm_server.location) as tcp,
    ):
        assert isinstance(shm.transports[0], ShmTransport)
        assert isinstance(auto.transports[0], ShmTransport)
        for model, data in requests():
            expected = tcp.infer(model, data)
            assert same_bits(shm.infer(model, data), expected), model
            assert same_bits(auto.infer(model, data), expected), model
            assert same_bits(default.infer(model, data), expected), model
        inputs = [{"hits": hits(2, seed=i)} for i in range(50)]
        got = list(shm.stream("facile", inputs, window=8))
        assert all(
            same_bits(g, e)
            for g, e in zip(got, tcp.stream("facile", inputs, window=8), strict=True)
        )
        assert isinstance(default.transports[0], ShmTransport)
        assert unix_server.shm.status()["sessions"] == 3
