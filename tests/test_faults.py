"""Faults a production job meets, and how the client gets through them (SONIC's resilience).

Real server processes (``arrowinfer serve``) on loopback ports, killed, frozen, restarted and
impersonated; every process is stopped in a ``finally`` (``benchmarks.harness``), every wait
has a deadline, and results are compared bit for bit with the model run in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import flight

from arrowinfer import tensors
from arrowinfer.client import (
    Client,
    FallbackWarning,
    FlightTransport,
    LocalTransport,
    conform,
    to_record_batch,
)
from arrowinfer.client._client import servers
from arrowinfer.errors import InvalidInput, ServerUnavailable, Timeout
from arrowinfer.repository import Repository
from arrowinfer.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import arrowinfer_server, rss_bytes

WAIT = 30.0  # the longest any one answer or condition may take
MODELS = ["facile", "identity", "jet_tagger", "toptag_cnn", "track_sum"]

# Synthetic jets have up to ~150 constituents and jet_tagger takes 100: the truncation is
# incidental to these tests (test_reproducibility.py checks its warning and counts).
pytestmark = pytest.mark.filterwarnings("ignore::arrowinfer.client.TruncationWarning")


# -- helpers -------------------------------------------------------------------------------


def hits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 15), dtype=np.float32)


def jets(counts: list[int], seed: int = 0) -> pa.RecordBatch:
    """Ragged jets: points and features as list<fixed_size_list> per jet."""
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


def example_inputs(seed: int = 0) -> dict[str, Any]:
    """One request for every example model (jet_tagger's ragged: 0 to 150 particles)."""
    rng = np.random.default_rng(seed)
    return {
        "facile": {"hits": hits(33, seed)},
        "identity": {"INPUT0": rng.standard_normal((5, 1024), dtype=np.float32)},
        "jet_tagger": jets([0, 1, 17, 100, 150, 3], seed),
        "toptag_cnn": {"image": rng.random((4, 1, 37, 37), dtype=np.float32)},
    }


def same_bits(got: pa.RecordBatch, expected: pa.RecordBatch) -> None:
    """The same columns with the same bytes (server-time metadata aside)."""
    assert got.schema.names == expected.schema.names
    for name in expected.schema.names:
        a = np.asarray(tensors.to_numpy(got.column(name)))
        b = np.asarray(tensors.to_numpy(expected.column(name)))
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"column {name!r} differs"


def local_results(repository: Path, model: str, requests: list[Any]) -> list[pa.RecordBatch]:
    """The model run in this process on the same requests (the reference)."""
    local = LocalTransport(repository)
    try:
        schema = local.schema(model, None)
        batches = [conform(to_record_batch(r), schema, model=model) for r in requests]
        return list(local.stream(model, None, batches, 16))
    finally:
        local.close()


def free_port() -> int:
    """A port nobody listens on now (bound and released: good enough on loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        threading.Event().wait(0.01)


def kill(proc: Any, sig: int = signal.SIGKILL) -> None:
    os.kill(proc.pid, sig)
    proc.wait(WAIT)


def health(client: Client) -> dict[str, bool]:
    return client._transport.health()  # type: ignore[attr-defined,no-any-return]


def statistics(location: str, model: str) -> dict[str, Any]:
    with flight.connect(location) as raw:
        body = json.dumps({"model": model}).encode()
        options = flight.FlightCallOptions(timeout=WAIT)
        (result,) = raw.do_action(flight.Action("model.statistics", body), options=options)
    (stats,) = json.loads(result.body.to_pybytes())["model_stats"]
    return stats  # type: ignore[no-any-return]


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so no one else gets it), not listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"grpc://127.0.0.1:{bound.getsockname()[1]}"


@pytest.fixture
def refused_urls() -> Iterator[list[str]]:
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        yield [f"grpc://127.0.0.1:{s.getsockname()[1]}" for s in (one, two)]


class StalledServer(flight.FlightServerBase):
    """Lists facile and answers health, but never answers a request (a hung model)."""

    def __init__(self, schema: pa.Schema):
        super().__init__("grpc://127.0.0.1:0")
        self.schema = schema
        self.release = threading.Event()
        self.exchanges = 0
        self.url = f"grpc://127.0.0.1:{self.port}"

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        descriptor = flight.FlightDescriptor.for_path("facile", "1")
        yield flight.FlightInfo(self.schema, descriptor, [], -1, -1)

    def get_flight_info(self, context: Any, descriptor: Any) -> flight.FlightInfo:
        return flight.FlightInfo(self.schema, descriptor, [], -1, -1)

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        yield b'{"live": true}'

    def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        self.exchanges += 1
        self.release.wait(WAIT)  # reads nothing, answers nothing


@contextlib.contextmanager
def stalled_server(repository: Path) -> Iterator[StalledServer]:
    server = StalledServer(Repository(repository).load("facile")[0].inputs)
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()


@contextlib.contextmanager
def garbage_peer() -> Iterator[str]:
    """A TCP server that answers every connection with bytes that are not HTTP/2."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()
    rng = np.random.default_rng(99)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + rng.bytes(512))

    thread = threading.Thread(target=serve, name="garbage-peer", daemon=True)
    thread.start()
    try:
        yield f"grpc://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(WAIT)
        listener.close()


# -- a server dies -------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_stream_loses_and_duplicates_nothing(example_repository: Path) -> None:
    values = hits(10_000, seed=1)
    requests = [{"hits": values[i : i + 50]} for i in range(0, len(values), 50)]
    expected = local_results(example_repository, "facile", requests)
    with (
        arrowinfer_server(example_repository, "--model", "facile") as (first, url_a),
        arrowinfer_server(example_repository, "--model", "facile") as (_, url_b),
        Client([url_a, url_b], retries=4, timeout=WAIT) as client,
    ):
        results = []
        for result in client.stream("facile", requests, window=16):
            results.append(result)
            if len(results) == 40:  # 16 requests in flight, on both servers
                assert statistics(url_a, "facile")["inference_count"] > 0
                kill(first)
        assert health(client)[url_a] is False
        counters = client.counters
    assert len(results) == len(requests)
    for got, want in zip(results, expected, strict=True):
        same_bits(got, want)
    energies = np.concatenate([tensors.to_numpy(r.column("energy")) for r in results])
    assert energies.shape == (10_000,)
    assert counters["requests"] == len(requests)
    assert counters["retries"] >= 1  # some were in flight on the killed server
    assert counters.get("failures", 0) == 0
    assert counters.get("fallbacks", 0) == 0


@pytest.mark.slow
def test_every_server_dies_during_a_stream_the_fallback_finishes_it(
    example_repository: Path,
) -> None:
    events = jets(list(np.random.default_rng(12).integers(0, 160, size=3000)), seed=12)
    requests = [events.slice(i, 30) for i in range(0, events.num_rows, 30)]
    expected = local_results(example_repository, "jet_tagger", requests)
    with (
        arrowinfer_server(example_repository, "--model", "jet_tagger") as (one, url_a),
        arrowinfer_server(example_repository, "--model", "jet_tagger") as (two, url_b),
        Client(
            [url_a, url_b],
            fallback="local",
            repository=example_repository,
            retries=1,
            timeout=WAIT,
        ) as client,
    ):

        def consume() -> list[pa.RecordBatch]:
            results = []
            for result in client.stream("jet_tagger", requests, window=8):
                results.append(result)
                if len(results) == 20:
                    kill(one)
                    kill(two)
            return results

        with pytest.warns(FallbackWarning, match="jet_tagger"):
            results = consume()
        counters = client.counters
    assert len(results) == len(requests)
    for got, want in zip(results, expected, strict=True):
        same_bits(got, want)
    assert counters["fallbacks"] >= len(requests) - 20 - 8
    assert counters.get("failures", 0) == 0


@pytest.mark.slow
def test_client_started_before_its_servers(example_repository: Path) -> None:
    ports = [free_port(), free_port()]
    urls = [f"grpc://127.0.0.1:{port}" for port in ports]
    values = hits(64, seed=2)
    (expected,) = local_results(example_repository, "facile", [{"hits": values}])
    with Client(urls, retries=10, timeout=WAIT) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.infer, "facile", {"hits": values})
        # the client has tried both servers and found them down
        wait_for(lambda: not any(health(client).values()), "both servers marked down")
        assert not pending.done()
        with (
            arrowinfer_server(example_repository, "--model", "facile", "--port", str(ports[0])),
            arrowinfer_server(example_repository, "--model", "facile", "--port", str(ports[1])),
        ):
            same_bits(pending.result(WAIT), expected)
            results = list(client.stream("facile", [{"hits": values}] * 20))
            for result in results:
                same_bits(result, expected)
        assert client.counters.get("failures", 0) == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_server_restarted_on_the_same_port(example_repository: Path, how: int) -> None:
    port = free_port()
    values = hits(16, seed=3)
    (expected,) = local_results(example_repository, "facile", [{"hits": values}])
    with Client(f"grpc://127.0.0.1:{port}", retries=10, timeout=WAIT) as client:
        with arrowinfer_server(example_repository, "--model", "facile", "--port", str(port)) as (
            proc,
            url,
        ):
            assert url == f"grpc://127.0.0.1:{port}"
            same_bits(client.infer("facile", {"hits": values}), expected)  # a stream is open
            kill(proc, how)
        # down now: this request waits for the new server, retrying
        pending = client.infer_async("facile", {"hits": values})
        with arrowinfer_server(example_repository, "--model", "facile", "--port", str(port)):
            same_bits(pending.result(WAIT), expected)
            for _ in range(5):
                same_bits(client.infer("facile", {"hits": values}), expected)
        assert client.counters.get("failures", 0) == 0


# -- a server hangs ------------------------------------------------------------------------


@pytest.mark.slow
def test_stalled_server_fails_over_after_attempt_timeout(example_repository: Path) -> None:
    values = hits(8, seed=4)
    (expected,) = local_results(example_repository, "facile", [{"hits": values}])
    with (
        stalled_server(example_repository) as stalled,
        arrowinfer_server(example_repository, "--model", "facile") as (_, good),
    ):
        # the stalled server comes first: the first request goes to it. It answers health
        # checks, so without a long health_interval it would be back in two seconds.
        client = Client(
            [stalled.url, good], attempt_timeout=2.0, retries=4, health_interval=60, timeout=WAIT
        )
        try:
            start = time.monotonic()
            for _ in range(10):
                same_bits(client.infer("facile", {"hits": values}), expected)
            futures = [client.infer_async("facile", {"hits": values}) for _ in range(20)]
            for future in futures:
                same_bits(future.result(WAIT), expected)
            assert time.monotonic() - start < WAIT
            assert stalled.exchanges >= 1
            assert client.counters["retries"] >= 1
            assert client.counters.get("failures", 0) == 0
        finally:
            start = time.monotonic()
            client.close()  # must not wait for the stalled server
            assert time.monotonic() - start < 15


@pytest.mark.slow
def test_only_a_stalled_server_is_a_timeout(example_repository: Path) -> None:
    with stalled_server(example_repository) as stalled:
        client = Client([stalled.url], attempt_timeout=0.3, retries=1, timeout=WAIT)
        try:
            start = time.monotonic()
            with pytest.raises(Timeout, match=stalled.url):
                client.infer("facile", {"hits": hits(2)})
            assert time.monotonic() - start < 5
            assert client.counters["failures"] == 1
        finally:
            client.close()


@pytest.mark.slow
def test_frozen_server_process_is_left_behind(example_repository: Path) -> None:
    """SIGSTOP: the process holds its port and connections but answers nothing."""
    values = hits(5, seed=5)
    (expected,) = local_results(example_repository, "facile", [{"hits": values}])
    with (
        arrowinfer_server(example_repository, "--model", "facile") as (frozen, url_a),
        arrowinfer_server(example_repository, "--model", "facile") as (_, url_b),
    ):
        warm = Client([url_a, url_b], attempt_timeout=2.0, retries=4, timeout=WAIT)
        try:
            for future in [warm.infer_async("facile", {"hits": values}) for _ in range(8)]:
                future.result(WAIT)  # streams open to both
            os.kill(frozen.pid, signal.SIGSTOP)
            futures = [warm.infer_async("facile", {"hits": values}) for _ in range(40)]
            for future in futures:
                same_bits(future.result(WAIT), expected)
            assert health(warm)[url_a] is False
            # a client made while it is frozen
            with Client([url_a, url_b], attempt_timeout=2.0, retries=4, timeout=WAIT) as fresh:
                for _ in range(5):
                    same_bits(fresh.infer("facile", {"hits": values}), expected)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
            warm.close()


# -- a stranger on the port ----------------------------------------------------------------


@pytest.mark.slow
def test_garbage_peer_is_skipped_or_named(example_repository: Path) -> None:
    values = hits(3, seed=6)
    (expected,) = local_results(example_repository, "facile", [{"hits": values}])
    with (
        garbage_peer() as garbage,
        arrowinfer_server(example_repository, "--model", "facile") as (_, good),
    ):
        with Client([garbage, good], retries=2, timeout=WAIT) as client:
            for _ in range(10):
                same_bits(client.infer("facile", {"hits": values}), expected)
            assert health(client) == {garbage: False, good: True}
        start = time.monotonic()
        with (
            Client([garbage], retries=1, timeout=WAIT) as client,
            pytest.raises(ServerUnavailable, match=garbage),
        ):
            client.infer("facile", {"hits": values})
        assert time.monotonic() - start < 10


# -- the local fallback --------------------------------------------------------------------


def test_local_fallback_matches_the_server_bit_for_bit(
    server: Server, example_repository: Path, refused_url: str
) -> None:
    inputs = example_inputs(seed=7)
    with Client(server.location, timeout=WAIT) as remote:
        expected = {model: remote.infer(model, data) for model, data in inputs.items()}
    with Client(
        [refused_url], fallback="local", repository=example_repository, retries=1, timeout=WAIT
    ) as client:
        for model, data in inputs.items():
            with pytest.warns(FallbackWarning, match=f"model '{model}'.*{refused_url}") as said:
                got = client.infer(model, data)
            assert "debug context" not in str(said[0].message)  # gRPC's, for its own logs
            same_bits(got, expected[model])
        assert client.counters["fallbacks"] == len(inputs)
        # later calls: counted, warned about once per model only (no warning here)
        for model, data in inputs.items():
            same_bits(client.infer(model, data), expected[model])
        results = list(client.stream("jet_tagger", [inputs["jet_tagger"]] * 5))
        for result in results:
            same_bits(result, expected["jet_tagger"])
        assert client.counters["fallbacks"] == 2 * len(inputs) + 5
        assert client.counters.get("failures", 0) == 0


def test_fallback_when_a_server_dies(example_repository: Path) -> None:
    inputs = example_inputs(seed=8)
    with (
        arrowinfer_server(example_repository) as (proc, url),
        Client(url, fallback="local", repository=example_repository, timeout=WAIT) as client,
    ):
        expected = {model: client.infer(model, data) for model, data in inputs.items()}
        assert client.counters.get("fallbacks", 0) == 0
        kill(proc)
        for model, data in inputs.items():
            with pytest.warns(FallbackWarning, match=url):
                got = client.infer(model, data)
            same_bits(got, expected[model])
        assert client.counters["fallbacks"] == len(inputs)


def test_laptop_mode_without_servers(
    server: Server, example_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARROWINFER_SERVERS", raising=False)
    inputs = example_inputs(seed=9)
    with Client(server.location, timeout=WAIT) as remote:
        expected = {model: remote.infer(model, data) for model, data in inputs.items()}
    # no servers at all: no warning (filterwarnings = error would fail the test)
    with Client(fallback="local", repository=example_repository, timeout=WAIT) as client:
        assert client.url == "local"
        assert set(client.models()) == set(MODELS)
        for model, data in inputs.items():
            same_bits(client.infer(model, data), expected[model])
        assert client.counters["fallbacks"] == len(inputs)


def test_no_fallback_names_every_server_tried(refused_urls: list[str]) -> None:
    start = time.monotonic()
    with Client(refused_urls, retries=1, timeout=WAIT) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.infer("facile", {"hits": hits(1)})
        for url in refused_urls:
            assert url in str(info.value)
    assert time.monotonic() - start < 10


def test_request_errors_are_not_retried_nor_run_locally(
    server: Server, example_repository: Path, refused_url: str
) -> None:
    with Client(
        [server.location, refused_url],
        fallback="local",
        repository=example_repository,
        timeout=WAIT,
    ) as client:
        assert client.infer("facile", {"hits": hits(2)}).num_rows == 2
        before = client.counters
        with pytest.raises(InvalidInput, match="hits"):
            client.infer("facile", {"hits": np.zeros((2, 14), np.float32)})
        with pytest.raises(InvalidInput):
            client.infer("facile", {"energy": np.zeros((2, 15), np.float32)})
        assert client.counters == before  # nothing sent, retried or run locally


def test_warnings_as_errors_fail_the_request_instead_of_hanging(
    example_repository: Path, refused_url: str
) -> None:
    """Under ``-W error`` (as in this test suite) the FallbackWarning is the request's error."""
    with Client(
        [refused_url], fallback="local", repository=example_repository, retries=1, timeout=WAIT
    ) as client:
        with pytest.raises(FallbackWarning):
            client.infer("facile", {"hits": hits(1)})
        # the warning is given once per model: later calls just run locally
        assert client.infer("facile", {"hits": hits(1)}).num_rows == 1


# -- many clients --------------------------------------------------------------------------


@pytest.mark.slow
def test_16_clients_at_once_server_memory_is_bounded(example_repository: Path) -> None:
    inputs = example_inputs(seed=10)

    def work(seed: int, rounds: int) -> int:
        done = 0
        for _ in range(rounds):  # a new client each round: streams open and close
            with Client(url, timeout=WAIT) as client:
                for model in ("facile", "jet_tagger", "facile", "identity"):
                    for _ in range(5):
                        done += client.infer(model, inputs[model]).num_rows
        return done

    def run(rounds: int) -> None:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(work, seed, rounds) for seed in range(16)]
            assert all(f.result(timeout=60) > 0 for f in futures)

    with arrowinfer_server(
        example_repository, "--model", "facile", "--model", "jet_tagger", "--model", "identity"
    ) as (proc, url):
        run(2)  # warm-up: thread pools, arenas, onnxruntime buffers
        before, _ = rss_bytes(proc.pid)
        run(6)
        after, _ = rss_bytes(proc.pid)
        assert proc.poll() is None
        stats = statistics(url, "facile")
        assert stats["inference_stats"]["fail"]["count"] == 0
    assert after - before < 50 * 2**20, f"server RSS grew {(after - before) / 2**20:.1f} MiB"


# -- routing and server lists --------------------------------------------------------------


@pytest.mark.slow
def test_requests_go_only_to_servers_that_have_the_model(example_repository: Path) -> None:
    inputs = example_inputs(seed=11)
    with (
        arrowinfer_server(example_repository, "--model", "facile") as (_, small),
        arrowinfer_server(example_repository, "--model", "facile", "--model", "jet_tagger") as (
            big_proc,
            big,
        ),
        Client([small, big], timeout=WAIT) as client,
    ):
        for _ in range(10):
            assert client.infer("jet_tagger", inputs["jet_tagger"]).num_rows == 6
        futures = [client.infer_async("jet_tagger", inputs["jet_tagger"]) for _ in range(20)]
        assert all(f.result(WAIT).num_rows == 6 for f in futures)
        for _ in range(10):
            assert client.infer("facile", inputs["facile"]).num_rows == 33
        assert client.counters.get("retries", 0) == 0  # never sent to the wrong server
        assert statistics(big, "jet_tagger")["inference_count"] == 30 * 6
        assert statistics(small, "facile")["inference_count"] > 0  # it takes its share
        # the only server with the model dies: no other server is asked to run it
        kill(big_proc)
        with pytest.raises(ServerUnavailable, match="jet_tagger"):
            client.infer("jet_tagger", inputs["jet_tagger"])
        assert client.infer("facile", inputs["facile"]).num_rows == 33


def test_server_lists_from_environment_and_files(
    server: Server, refused_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "servers.txt"
    listing.write_text(f"# published by the job\n\n{refused_url}   # down\n{server.location}\n")
    assert servers(f"@{listing}") == [refused_url, server.location]
    assert servers(f"{refused_url}, {server.location}") == [refused_url, server.location]
    values = {"hits": hits(4)}
    for value in (f"{refused_url},{server.location}", f" {refused_url}\n{server.location} "):
        monkeypatch.setenv("ARROWINFER_SERVERS", value)
        with Client(timeout=WAIT) as client:
            assert client.url == f"{refused_url},{server.location}"
            assert client.infer("facile", values).num_rows == 4
    monkeypatch.setenv("ARROWINFER_SERVERS", f"@{listing}")
    with Client(timeout=WAIT) as client:
        assert client.url == f"{refused_url},{server.location}"
        assert client.infer("facile", values).num_rows == 4
    monkeypatch.delenv("ARROWINFER_SERVERS")
    with Client(f"@{listing}", timeout=WAIT) as client:
        assert client.infer("facile", values).num_rows == 4


# -- the pipeline itself -------------------------------------------------------------------


class _BrokenWriter:
    def write_with_metadata(self, batch: pa.RecordBatch, metadata: bytes) -> None:
        raise OSError("connection reset by peer")

    def done_writing(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_failed_write_breaks_the_stream_without_deadlock(server: Server) -> None:
    transport = FlightTransport(server.location)
    try:
        schema = transport.schema("facile", None)
        batch = conform(to_record_batch({"hits": hits(2)}), schema, model="facile")
        assert transport.submit("facile", None, batch).result(WAIT).num_rows == 2
        pipe = transport._streams[("facile", None)]
        real_writer, pipe.writer = pipe.writer, _BrokenWriter()
        outcome: list[BaseException] = []

        def submit() -> None:
            try:
                transport.submit("facile", None, batch)
            except ServerUnavailable as err:
                outcome.append(err)

        thread = threading.Thread(target=submit, daemon=True)
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive(), "submit() deadlocked on a failed write"
        assert outcome
        assert "connection reset" in str(outcome[0])
        real_writer.done_writing()  # the server ends the real stream: close() is quick
        pipe.writer = real_writer
        assert pipe.broken is not None
        # a new stream is opened for the next request
        assert transport.submit("facile", None, batch).result(WAIT).num_rows == 2
    finally:
        transport.close()
