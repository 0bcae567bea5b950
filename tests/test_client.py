"""``arrowinfer.client``: Client and AsyncClient against real servers on loopback ports.

Every data form a user may hand ``infer`` must give the same result; the reference numbers
come from onnxruntime run directly on the model files (jet_tagger's padding and mask built
here with numpy, independently of the server).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyarrow import flight

import arrowinfer
from arrowinfer import events, tensors
from arrowinfer.client import (
    AsyncClient,
    Client,
    FlightTransport,
    ShmTransport,
    server_times,
    to_awkward,
    truncation,
)
from arrowinfer.errors import (
    ArrowInferError,
    InvalidInput,
    ModelNotFound,
    RequestError,
    ServerUnavailable,
    Timeout,
    TransportError,
)
from arrowinfer.server import Server

MODELS = ["facile", "identity", "jet_tagger", "toptag_cnn", "track_sum"]
TIMES = {"queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns"}
DEADLINE = 30.0
CALL = flight.FlightCallOptions(timeout=DEADLINE)  # no raw Flight call can hang
PARTICLES = 100  # jet_tagger pads or truncates to this many constituents


# -- fixtures and references -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.location, timeout=DEADLINE) as shared:
        yield shared


@pytest.fixture(scope="module")
def sessions(example_repository: Path) -> dict[str, ort.InferenceSession]:
    return {
        name: ort.InferenceSession(str(example_repository / name / "1" / "model.onnx"))
        for name in MODELS
    }


def hits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 15), dtype=np.float32)


def energy(sessions: dict[str, ort.InferenceSession], values: np.ndarray) -> np.ndarray:
    return sessions["facile"].run(["energy"], {"hits": values})[0].reshape(-1)


def jets(counts: list[int], seed: int = 0) -> pa.RecordBatch:
    """Jets with exactly these constituent counts, canonical types (list<fixed_size_list>)."""
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


def jet_probabilities(
    sessions: dict[str, ort.InferenceSession], batch: pa.RecordBatch
) -> np.ndarray:
    """jet_tagger run by onnxruntime on jets padded (and truncated) to 100 here."""
    points = tensors.ragged_to_numpy(batch.column("points"))
    features = tensors.ragged_to_numpy(batch.column("features"))
    counts = np.minimum(points.counts, PARTICLES)
    inputs = {
        "points": tensors.pad(points, PARTICLES),
        "features": tensors.pad(features, PARTICLES),
        "mask": (np.arange(PARTICLES) < counts[:, None]).astype(np.float32)[..., None],
    }
    return sessions["jet_tagger"].run(["probabilities"], inputs)[0]


def column(result: pa.RecordBatch, name: str) -> np.ndarray:
    return np.asarray(tensors.to_numpy(result.column(name)))


def statistics(server: Server, model: str) -> dict[str, Any]:
    with flight.connect(server.location) as raw:
        body = json.dumps({"model": model}).encode()
        (result,) = raw.do_action(flight.Action("model.statistics", body))
    (stats,) = json.loads(result.body.to_pybytes())["model_stats"]
    return stats  # type: ignore[no-any-return]


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so no one else gets it), not listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"grpc://127.0.0.1:{bound.getsockname()[1]}"


# -- discovery -------------------------------------------------------------------------------


def test_models_metadata_schema(client: Client) -> None:
    models = client.models()
    assert list(models) == MODELS
    assert models["jet_tagger"].names == ["points", "features"]
    assert models["facile"].field("hits").type == pa.fixed_shape_tensor(pa.float32(), [15])
    assert client.schema("toptag_cnn").equals(models["toptag_cnn"], check_metadata=True)
    assert client.schema("facile", version=1).names == ["hits"]
    assert client.schema("facile/1").names == ["hits"]
    meta = client.metadata("jet_tagger")
    assert [i["name"] for i in meta["inputs"]] == ["points", "features"]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]
    assert meta["config"]["max_batch_size"] == 1024


# -- every data form gives the same result ---------------------------------------------------


def test_facile_data_forms(client: Client, sessions: dict[str, ort.InferenceSession]) -> None:
    values = hits(40, seed=1)
    batch = pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["hits"])
    fixed_size_list = tensors.from_numpy(values, tensor_type="fixed_size_list")
    forms: dict[str, Any] = {
        "record batch": batch,
        "table, 3 chunks": pa.Table.from_batches(
            [batch.slice(0, 7), batch.slice(7, 20), batch.slice(27)]
        ),
        "numpy": {"hits": values},
        "fixed_size_list": {"hits": fixed_size_list},
        "chunked array": {"hits": pa.chunked_array([fixed_size_list[:5], fixed_size_list[5:]])},
        "awkward": ak.Array({"hits": ak.from_numpy(values)}),
        "awkward from arrow": ak.from_arrow(pa.table({"hits": fixed_size_list})),
        "non-contiguous numpy": {"hits": np.asfortranarray(values)},
    }
    expected = energy(sessions, values)
    results = {name: client.infer("facile", data) for name, data in forms.items()}
    for name, result in results.items():
        assert result.num_rows == 40, name
        assert result.schema.names == ["energy"], name
        np.testing.assert_allclose(column(result, "energy"), expected, rtol=1e-5, atol=1e-6)
        # one request each, alone on the server: the same batch, so bit for bit the same
        np.testing.assert_array_equal(column(result, "energy"), column(results["numpy"], "energy"))


def test_jet_tagger_data_forms(client: Client, sessions: dict[str, ort.InferenceSession]) -> None:
    batch = events.synthetic("jet_constituents", 30, seed=2).select(["points", "features"])
    points = tensors.ragged_to_numpy(batch.column("points"))
    features = tensors.ragged_to_numpy(batch.column("features"))

    def large(name: str) -> pa.Array:
        col = batch.column(name)
        return col.cast(pa.large_list(col.type.value_field))

    forms: dict[str, Any] = {
        "record batch": batch,
        "table, 2 chunks": pa.Table.from_batches([batch.slice(0, 11), batch.slice(11)]),
        "Ragged": {"points": points, "features": features},
        "(offsets, values)": {
            "points": (points.offsets, points.values),
            "features": (features.offsets.astype(np.int64), features.values),
        },
        "large_list": {"points": large("points"), "features": large("features")},
        "awkward": ak.from_arrow(batch),
        "awkward fields": {
            "points": ak.from_arrow(batch.column("points")),
            "features": ak.from_arrow(batch.column("features")),
        },
        "columns in another order": {"features": features, "points": points},
    }
    expected = jet_probabilities(sessions, batch)
    results = {name: client.infer("jet_tagger", data) for name, data in forms.items()}
    for name, result in results.items():
        assert result.num_rows == 30, name
        got = column(result, "probabilities")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(got, column(results["record batch"], "probabilities"))


def test_toptag_cnn_data_forms(client: Client, sessions: dict[str, ort.InferenceSession]) -> None:
    images = tensors.to_numpy(events.synthetic("jet_images", 12, seed=3).column("image"))
    images = images.reshape(12, 1, 37, 37)
    forms: dict[str, Any] = {
        "numpy": {"image": images},
        "fixed_shape_tensor": {"image": tensors.from_numpy(images)},
        "nested fixed_size_list": {
            "image": tensors.from_numpy(images, tensor_type="fixed_size_list")
        },
        "awkward": ak.Array({"image": ak.from_numpy(images)}),
    }
    expected = sessions["toptag_cnn"].run(["probabilities"], {"image": images})[0]
    results = {name: client.infer("toptag_cnn", data) for name, data in forms.items()}
    for name, result in results.items():
        got = column(result, "probabilities")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(got, column(results["numpy"], "probabilities"))


# the client warns once per model; what was cut is checked here in each result's metadata
@pytest.mark.filterwarnings("ignore::arrowinfer.client.TruncationWarning")
@settings(deadline=None, max_examples=20)
@given(counts=st.lists(st.integers(0, 130), min_size=1, max_size=8), seed=st.integers(0, 99))
def test_ragged_jets_are_padded_and_truncated_like_numpy(
    client: Client, sessions: dict[str, ort.InferenceSession], counts: list[int], seed: int
) -> None:
    batch = jets(counts, seed)
    result = client.infer("jet_tagger", batch)
    got = column(result, "probabilities")
    np.testing.assert_allclose(got, jet_probabilities(sessions, batch), rtol=1e-5, atol=1e-6)
    cut = [c - 100 for c in counts if c > 100]  # the model takes 100 constituents
    assert truncation(result) == (len(cut), sum(cut))


@settings(deadline=None, max_examples=20)
@given(rows=st.integers(1, 3000), seed=st.integers(0, 99))
def test_facile_matches_onnxruntime(
    client: Client, sessions: dict[str, ort.InferenceSession], rows: int, seed: int
) -> None:
    values = hits(rows, seed)
    got = column(client.infer("facile", {"hits": values}), "energy")
    np.testing.assert_allclose(got, energy(sessions, values), rtol=1e-5, atol=1e-6)


# -- results ---------------------------------------------------------------------------------


def test_result_helpers(client: Client) -> None:
    result = client.infer("jet_tagger", jets([3, 0, 150, 12]))
    arrays = tensors.batch_to_numpy(result)
    assert list(arrays) == ["probabilities"]
    probabilities = arrays["probabilities"]
    assert isinstance(probabilities, np.ndarray)
    assert probabilities.shape == (4, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert np.shares_memory(probabilities, column(result, "probabilities"))

    array = to_awkward(result)
    assert str(array.type) == "4 * {probabilities: 5 * float32}"
    np.testing.assert_array_equal(ak.to_numpy(array.probabilities), probabilities)
    table = to_awkward(pa.Table.from_batches([result.slice(0, 1), result.slice(1)]))
    assert ak.to_list(table) == ak.to_list(array)

    times = server_times(result)
    assert set(times) == TIMES
    assert all(isinstance(t, int) and t >= 0 for t in times.values())
    assert times["compute_infer_ns"] > 0


# -- many requests at once -------------------------------------------------------------------


def test_infer_async_200_at_once(client: Client) -> None:
    rng = np.random.default_rng(4)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 5)), 1024), dtype=np.float32) for _ in range(200)
    ]
    futures = [client.infer_async("identity", {"INPUT0": v}) for v in inputs]
    assert all(isinstance(f, Future) for f in futures)
    for future, values in zip(futures, inputs, strict=True):
        np.testing.assert_array_equal(column(future.result(DEADLINE), "OUTPUT0"), values)


@pytest.mark.parametrize("window", [1, 4, 64])
def test_stream_yields_in_order(client: Client, window: int) -> None:
    rng = np.random.default_rng(window)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 30)), 1024), dtype=np.float32) for _ in range(100)
    ]
    results = list(client.stream("identity", ({"INPUT0": v} for v in inputs), window=window))
    assert len(results) == 100
    for result, values in zip(results, inputs, strict=True):
        np.testing.assert_array_equal(column(result, "OUTPUT0"), values)


def test_stream_of_nothing(client: Client) -> None:
    assert list(client.stream("identity", [])) == []
    assert list(client.stream("identity", iter(()))) == []


def test_one_client_shared_by_threads(
    client: Client, sessions: dict[str, ort.InferenceSession]
) -> None:
    def work(thread: int) -> int:
        for i in range(30):
            values = hits(1 + (thread * 30 + i) % 17, seed=thread * 100 + i)
            got = column(client.infer("facile", {"hits": values}), "energy")
            np.testing.assert_allclose(got, energy(sessions, values), rtol=1e-5, atol=1e-6)
        return thread

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(work, range(8), timeout=DEADLINE * 2)) == list(range(8))


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compression_gives_the_same_results(
    server: Server, client: Client, compression: str
) -> None:
    identity = np.random.default_rng(5).standard_normal((64, 1024), dtype=np.float32)
    batch = jets([5, 100, 0, 33], seed=5)
    with Client(server.location, compression=compression, timeout=DEADLINE) as packed:
        got = packed.infer("identity", {"INPUT0": identity})
        np.testing.assert_array_equal(column(got, "OUTPUT0"), identity)
        np.testing.assert_array_equal(
            column(packed.infer("jet_tagger", batch), "probabilities"),
            column(client.infer("jet_tagger", batch), "probabilities"),
        )
        streamed = list(packed.stream("identity", [{"INPUT0": identity}] * 3))
        for result in streamed:
            np.testing.assert_array_equal(column(result, "OUTPUT0"), identity)


def test_unknown_compression_is_refused_at_once(server: Server) -> None:
    with pytest.raises(ValueError, match="compression"):
        Client(server.location, compression="gzip")
    with pytest.raises(ValueError, match="compression"):
        AsyncClient(server.location, compression="gzip")


@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_unknown_options_are_refused_at_the_door(server: Server, make: type[Any]) -> None:
    """A typo is a TypeError naming it, before anything is made; never swallowed."""
    threads = set(threading.enumerate())
    with pytest.raises(TypeError, match=r"'tls_root_cert'.*did you mean 'tls_root_certs'"):
        make(server.location, tls_root_cert=b"")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'timout'"):
        make(server.location, timout=3)
    with pytest.raises(TypeError, match="'retry'"):
        make(server.location, fallback="local", repository=".", retry=1)  # no server needed
    # nothing was started (other tests' threads may have ended meanwhile)
    assert set(threading.enumerate()) <= threads


@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_a_url_no_transport_takes_is_refused_at_the_door(make: type[Any]) -> None:
    """As the CLI says it: not pyarrow's "Cannot parse URI" at the first call."""
    with pytest.raises(ValueError, match=r"bad server URL '127.0.0.1:8815'.*grpc://127.0.0.1:8815"):
        make("127.0.0.1:8815")
    with pytest.raises(ValueError, match=r"HTTP port answers tritonclient\.http, not this client"):
        make("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="bad server URL 'grpc://'"):
        make("grpc://127.0.0.1:8815,grpc://")


def test_documented_options_are_passed_on(server: Server) -> None:
    for bad in ({"timeout_s": 3}, {"copy_result": True}):
        with pytest.raises(TypeError, match=f"'{next(iter(bad))}'"):
            FlightTransport(server.location, **bad)
    with pytest.raises(TypeError, match="'copy_result'"):
        ShmTransport(server.location, copy_result=True)
    # Flight options by name, and shared-memory options that Flight does not need
    with Client(
        server.location,
        timeout=DEADLINE,
        write_size_limit_bytes=1024,
        generic_options=[("grpc.max_receive_message_length", 1 << 26)],
        copy_results=True,
    ) as client:
        assert client.infer("facile", {"hits": hits(3)}).num_rows == 3
        with pytest.raises(InvalidInput, match=r"write_size_limit_bytes|exceed"):
            client.infer("identity", {"INPUT0": np.ones((4, 1024), np.float32)})


def test_top_package_exports_the_clients() -> None:
    assert arrowinfer.Client is Client
    assert arrowinfer.AsyncClient is AsyncClient
    assert "Client" in arrowinfer.__all__
    assert arrowinfer.__version__[:1].isdigit()


# -- a lean client: pyarrow and numpy only -------------------------------------------------

HEAVY = ("onnxruntime", "onnx", "grpc", "google.protobuf", "tritonclient", "tqdm")

#: Refuses the heavy modules outright, then runs a real request.
LEAN = """
import importlib.abc, json, sys
HEAVY = tuple(json.loads(sys.argv[3]))
def heavy(name):
    return any(name == h or name.startswith(h + ".") for h in HEAVY)
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if heavy(name):
            raise ImportError(f"{name} is not installed here")
if sys.argv[2] == "refuse":
    sys.meta_path.insert(0, Refuse())
import numpy as np
import arrowinfer.client
from arrowinfer.client import Client
import arrowinfer
loaded = sorted(m for m in sys.modules if heavy(m))
with arrowinfer.Client(sys.argv[1], timeout=30) as client:
    rows = client.infer("facile", {"hits": np.ones((3, 15), np.float32)}).num_rows
print(json.dumps({"loaded": loaded, "rows": rows}))
"""


def run_python(script: str, *args: str) -> Any:
    """Run a script in a fresh interpreter with this checkout first; its JSON output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["look", "refuse"])
def test_the_client_imports_none_of_the_server_dependencies(server: Server, mode: str) -> None:
    """``look``: none is in sys.modules after the import; ``refuse``: none is installed."""
    out = run_python(LEAN, server.location, mode, json.dumps(HEAVY))
    assert out == {"loaded": [], "rows": 3}


def test_the_local_fallback_loads_onnxruntime_when_used(example_repository: Path) -> None:
    script = """
import json, sys, warnings
import numpy as np
from arrowinfer.client import Client
with Client(fallback="local", repository=sys.argv[1], timeout=30) as client:
    before = "onnxruntime" in sys.modules
    rows = client.infer("facile", {"hits": np.ones((3, 15), np.float32)}).num_rows
print(json.dumps([before, rows, "onnxruntime" in sys.modules]))
"""
    assert run_python(script, str(example_repository)) == [False, 3, True]


# -- AsyncClient -----------------------------------------------------------------------------


def test_async_client(server: Server, sessions: dict[str, ort.InferenceSession]) -> None:
    async def main() -> None:
        async with AsyncClient(server.location, timeout=DEADLINE) as client:
            assert list(await client.models()) == MODELS
            meta = await client.metadata("facile")
            assert meta["inputs"][0]["name"] == "hits"

            values = hits(9, seed=6)
            result = await client.infer("facile", {"hits": values})
            np.testing.assert_allclose(
                column(result, "energy"), energy(sessions, values), rtol=1e-5, atol=1e-6
            )

            inputs = [hits(i + 1, seed=i) for i in range(50)]
            results = await asyncio.gather(*(client.infer("facile", {"hits": v}) for v in inputs))
            for got, values in zip(results, inputs, strict=True):
                np.testing.assert_allclose(
                    column(got, "energy"), energy(sessions, values), rtol=1e-5, atol=1e-6
                )

            streamed = [
                r async for r in client.stream("facile", ({"hits": v} for v in inputs), window=8)
            ]
            assert [r.num_rows for r in streamed] == [len(v) for v in inputs]
            assert [r async for r in client.stream("facile", [])] == []

            with pytest.raises(ModelNotFound):
                await client.infer("nope", {"hits": values})
            with pytest.raises(InvalidInput):
                await client.infer("facile", {"hits": values[:, :3]})

    asyncio.run(main())


def test_async_client_does_not_block_the_event_loop(server: Server) -> None:
    """The loop runs other tasks while a request is in flight, before the server answers."""
    big = {"image": np.ones((256, 1, 37, 37), np.float32)}  # long enough to compute
    small = {"image": np.ones((8, 1, 37, 37), np.float32)}

    def answered() -> int:
        return int(statistics(server, "toptag_cnn")["inference_stats"]["success"]["count"])

    async def main() -> None:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async with AsyncClient(server.location, timeout=DEADLINE) as client:
            await client.schema("toptag_cnn")  # the schema lookup is behind us
            before = answered()
            request = asyncio.create_task(client.infer("toptag_cnn", big))
            await asyncio.sleep(0)  # the request task runs up to its first await
            # a blocking infer would have come back only with the server's answer
            assert not request.done()
            assert answered() == before
            ticking = asyncio.create_task(ticker())
            result = await request
            assert result.num_rows == 256
            assert ticks > 0  # the ticker ran while we waited

            results = await asyncio.gather(*(client.infer("toptag_cnn", small) for _ in range(20)))
            assert [r.num_rows for r in results] == [8] * 20
            stop.set()
            await ticking

    asyncio.run(main())


#: 200 requests at once on one AsyncClient, in a process of its own (the server's threads
#: are not the client's): the most threads seen, and what the default executor ran.
CONCURRENT = """
import asyncio, concurrent.futures, json, os, sys, threading
import numpy as np
from arrowinfer import AsyncClient

class Counting(concurrent.futures.ThreadPoolExecutor):
    submitted = 0
    def submit(self, *args, **kwargs):
        Counting.submitted += 1
        return super().submit(*args, **kwargs)

def threads():
    return max(threading.active_count(), len(os.listdir("/proc/self/task")))

async def main():
    asyncio.get_running_loop().set_default_executor(Counting(max_workers=1))
    most = threads()
    async with AsyncClient(sys.argv[1], timeout=60) as client:
        inputs = [np.full((i % 7 + 1, 15), i / 200, np.float32) for i in range(200)]
        tasks = [asyncio.create_task(client.infer("facile", {"hits": v})) for v in inputs]
        while not all(t.done() for t in tasks):
            most = max(most, threads())
            await asyncio.sleep(0.001)
        energies = [t.result().column("energy").to_pylist() for t in tasks]
    print(json.dumps({"most": most, "executor": Counting.submitted, "energies": energies}))

asyncio.run(main())
"""


def test_200_concurrent_infers_take_no_thread_per_request(server: Server, client: Client) -> None:
    out = run_python(CONCURRENT, server.location)
    assert out["most"] < 40
    assert out["executor"] == 0
    for i, got in enumerate(out["energies"]):
        values = np.full((i % 7 + 1, 15), i / 200, np.float32)
        want = column(client.infer("facile", {"hits": values}), "energy")
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_async_client_uses_arrowinfer_servers_and_closes(
    server: Server, refused_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def io_threads() -> int:
        return sum(t.name == "arrowinfer-async-io" for t in threading.enumerate())

    async def main() -> None:
        before = io_threads()
        monkeypatch.setenv("ARROWINFER_SERVERS", server.location)
        client = AsyncClient(timeout=DEADLINE)
        assert client.url == server.location
        assert io_threads() == before + 1
        result = await client.infer("facile", {"hits": hits(2)})
        assert result.num_rows == 2
        assert client.transports[0].location == server.location
        await client.aclose()
        await client.aclose()  # again: nothing happens
        deadline = time.monotonic() + DEADLINE
        while io_threads() > before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert io_threads() == before

        # a transport that cannot be made: async with raises it, every call too
        broken = AsyncClient(refused_url.replace("grpc", "shm", 1), timeout=DEADLINE)
        with pytest.raises(ArrowInferError):
            await broken.models()
        with pytest.raises(ArrowInferError):
            async with broken:
                pass
        deadline = time.monotonic() + DEADLINE  # the failed async with closed it
        while io_threads() > before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert io_threads() == before

    asyncio.run(main())


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"hits": np.ones((3, 15), np.float64)}, ["input 'hits'", "element type"]),
        ({"hits": np.ones((3, 14), np.float32)}, ["input 'hits'", "shape"]),
        ({"hit": np.ones((3, 15), np.float32)}, ["missing input", "hits"]),
        # zero rows is a valid request (test_reproducibility), but its types are still checked
        ({"hits": np.ones((0, 15), np.float64)}, ["input 'hits'", "element type"]),
        ({"hits": np.ones((3, 15), np.float32), "x": np.ones(3, np.float32)}, ["unexpected"]),
    ],
    ids=["dtype", "shape", "name", "empty", "extra"],
)
def test_invalid_input_is_found_locally_with_the_servers_message(
    server: Server, client: Client, data: dict[str, np.ndarray], words: list[str]
) -> None:
    before = statistics(server, "facile")
    with pytest.raises(InvalidInput) as local:
        client.infer("facile", data)
    with pytest.raises(InvalidInput):
        client.infer_async("facile", data)
    assert isinstance(local.value, ValueError)
    assert isinstance(local.value, RequestError)
    message = str(local.value)
    assert message.startswith("model 'facile'")
    for word in words:
        assert word in message
    assert statistics(server, "facile") == before  # nothing reached the server

    # the server, asked directly, says the same
    batch = tensors.batch_from_numpy(data)
    with flight.connect(server.location) as raw:
        writer, reader = raw.do_exchange(flight.FlightDescriptor.for_path("facile"), CALL)
        with writer:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            chunk = reader.read_chunk()
    assert json.loads(chunk.app_metadata.to_pybytes())["error"]["message"] == message


def test_unknown_model_or_version(client: Client) -> None:
    with pytest.raises(ModelNotFound) as info:
        client.infer("nope", {"hits": hits(1)})
    assert isinstance(info.value, KeyError)
    assert str(info.value) == (
        "model 'nope' is not served (available: facile, identity, jet_tagger, toptag_cnn, track_sum)"
    )
    with pytest.raises(ModelNotFound, match="did you mean: facile"):
        client.schema("facil")
    with pytest.raises(ModelNotFound, match="facile/1"):
        client.infer("facile", {"hits": hits(1)}, version=4)
    with pytest.raises(ModelNotFound):
        client.metadata("nope")
    assert client.infer("facile", {"hits": hits(1)}).num_rows == 1  # still usable


def test_no_server_is_a_quick_transport_error(refused_url: str) -> None:
    start = time.monotonic()
    with Client(refused_url, timeout=DEADLINE) as nowhere:
        with pytest.raises(ServerUnavailable) as info:
            nowhere.infer("facile", {"hits": hits(1)})
        assert isinstance(info.value, TransportError)
        with pytest.raises(ServerUnavailable):
            nowhere.models()
    assert time.monotonic() - start < 10


def test_timeout_leaves_the_client_usable(client: Client) -> None:
    images = np.random.default_rng(7).random((256, 1, 37, 37), dtype=np.float32)
    with pytest.raises(Timeout, match="toptag_cnn") as info:
        client.infer("toptag_cnn", {"image": images}, timeout=1e-4)
    assert isinstance(info.value, TransportError)
    # the late answer must not be taken for the next request's
    small = images[:3]
    result = client.infer("toptag_cnn", {"image": small})
    assert result.num_rows == 3
    again = client.infer("toptag_cnn", {"image": small})
    np.testing.assert_array_equal(column(result, "probabilities"), column(again, "probabilities"))
    values = hits(2)
    assert client.infer("facile", {"hits": values}).num_rows == 2


def test_bad_arguments_fail_before_any_io(client: Client) -> None:
    with pytest.raises(TypeError, match="data must be"):
        client.infer("facile", [1, 2, 3])
    with pytest.raises(TypeError):
        client.infer("facile", {"hits": hits(1)}, 5)  # type: ignore[misc]


def test_stopped_server_gives_server_unavailable(example_repository: Path) -> None:
    """A server stopped under a client's open stream: an error at once, never a hang."""
    first = Server(
        example_repository, port=0, kserve_port=None, metrics_port=None, models=["identity"]
    )
    values = {"INPUT0": np.ones((2, 1024), np.float32)}
    try:
        with Client(first.location, timeout=DEADLINE) as old:
            assert old.infer("identity", values).num_rows == 2  # the stream is open now
            stopper = threading.Thread(target=first.stop)
            stopper.start()
            stopper.join(DEADLINE)
            assert not stopper.is_alive(), "stop() waits for the client's idle stream"
            start = time.monotonic()
            with pytest.raises(ServerUnavailable):
                old.infer("identity", values)
            with pytest.raises(ServerUnavailable):
                old.infer_async("identity", values).result(DEADLINE)
            assert time.monotonic() - start < 10
    finally:
        first.stop()
    with (
        Server(
            example_repository, port=0, kserve_port=None, metrics_port=None, models=["identity"]
        ) as second,
        Client(second.location, timeout=DEADLINE) as new,
    ):
        np.testing.assert_array_equal(
            column(new.infer("identity", values), "OUTPUT0"), values["INPUT0"]
        )


def test_requests_in_flight_when_the_server_stops_get_their_results(
    example_repository: Path,
) -> None:
    server = Server(
        example_repository, port=0, kserve_port=None, metrics_port=None, models=["identity"]
    )
    rng = np.random.default_rng(8)
    inputs = [rng.standard_normal((50, 1024), dtype=np.float32) for _ in range(100)]
    try:
        with Client(server.location, timeout=DEADLINE) as client:
            futures = [client.infer_async("identity", {"INPUT0": v}) for v in inputs]
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            for future, values in zip(futures, inputs, strict=True):
                np.testing.assert_array_equal(column(future.result(DEADLINE), "OUTPUT0"), values)
            stopper.join(DEADLINE)
            assert not stopper.is_alive()
    finally:
        server.stop()


def test_a_client_follows_model_reloads(example_repository: Path) -> None:
    values = {"hits": hits(4, seed=9)}
    with (
        Server(
            example_repository,
            port=0,
            kserve_port=None,
            metrics_port=None,
            model_control="explicit",
        ) as server,
        Client(server.location, timeout=DEADLINE) as client,
        flight.connect(server.location) as raw,
    ):
        first = client.infer("facile", values)  # the client's stream to facile is open now

        def act(name: str) -> None:
            list(raw.do_action(flight.Action(name, b'{"model": "facile"}')))

        act("model.load")  # a reload: the model's queue and instances are new
        np.testing.assert_array_equal(
            column(client.infer("facile", values), "energy"), column(first, "energy")
        )
        act("model.unload")
        with pytest.raises(ModelNotFound, match="available: identity, jet_tagger"):
            client.infer("facile", values)
        act("model.load")
        np.testing.assert_array_equal(
            column(client.infer("facile", values), "energy"), column(first, "energy")
        )
