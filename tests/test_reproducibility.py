"""Results a physicist can trust: the same bits on every path, never another request's rows.

Real servers on ephemeral loopback ports (Flight over TCP and a Unix socket, shared memory,
KServe v2 gRPC through tritonclient), the in-process core and the client's local fallback,
over small ONNX models built here for what each test needs:

- ``sum0``: ``ReduceSum`` over the batch axis (one row out, whatever comes in);
- ``twice``: ``Concat(x, x)`` over the batch axis (2N rows out for N in);
- ``gather``: looks its input up in a table of 10: an index out of range is an onnxruntime
  error (not one of arrowinfer's) for that request only;
- ``rsum257``: ``ReduceSum`` over 257 floats per row, and ``matmul``: ``x @ W`` with odd
  sizes (37 x 19): onnxruntime's vectorised kernels round differently for differently
  aligned inputs, so these show whether every path hands the model the same alignment.

Every attack runs with a second, well-behaved client beside it whose every result is checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import shutil
import threading
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pytest
import tritonclient.grpc as tg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from arrowinfer import tensors
from arrowinfer.client import (
    AsyncClient,
    Client,
    FallbackWarning,
    ShmTransport,
    TruncationWarning,
    provenance,
    truncation,
)
from arrowinfer.errors import InvalidInput, ModelError, ServerError
from arrowinfer.examples import IR_VERSION, OPSET, write_example_repository
from arrowinfer.server import Server

WAIT = 30.0  # seconds any one answer may take: bounds every test, never a sleep
DELAY_US = 50_000  # queue delay of the test models: concurrent requests merge
TRANSPORTS = ["flight", "unix", "shm", "kserve", "core", "local"]
REMOTE = ["flight", "unix", "shm", "kserve"]


# -- models --------------------------------------------------------------------------------


def _save(
    directory: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], **kw: Any
) -> None:
    graph = helper.make_graph(nodes, directory.name, inputs, outputs, **kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    (directory / "1").mkdir(parents=True)
    onnx.save(model, str(directory / "1" / "model.onnx"))


def _config(
    directory: Path, inputs: str, outputs: str, *, max_batch_size: int = 64, extra: str = ""
) -> None:
    (directory / "config.pbtxt").write_text(
        extra + "\n" + f'name: "{directory.name}"\nplatform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\ninput [ {{ {inputs} }} ]\noutput [ {{ {outputs} }} ]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}\n"
    )


def _float(name: str, *dims: Any) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def write_models(repository: Path) -> None:
    """The test models of this file, beside the example models."""
    axes0 = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    axes1 = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    d = repository / "sum0"
    _save(
        d,
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        [_float("x", "n", 4)],
        [_float("y", "one", 4)],
        initializer=[axes0],
    )
    _config(
        d,
        'name: "x" data_type: TYPE_FP32 dims: [ 4 ]',
        'name: "y" data_type: TYPE_FP32 dims: [ 4 ]',
    )
    d = repository / "twice"
    _save(
        d,
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
        [_float("x", "n", 4)],
        [_float("y", "m", 4)],
    )
    _config(
        d,
        'name: "x" data_type: TYPE_FP32 dims: [ 4 ]',
        'name: "y" data_type: TYPE_FP32 dims: [ 4 ]',
    )
    d = repository / "gather"
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], [float(i) for i in range(10)])
    _save(
        d,
        [helper.make_node("Gather", ["table", "i"], ["y"], axis=0)],
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["n", 1])],
        [_float("y", "n", 1)],
        initializer=[table],
    )
    _config(
        d,
        'name: "i" data_type: TYPE_INT64 dims: [ 1 ]',
        'name: "y" data_type: TYPE_FP32 dims: [ 1 ]',
    )
    invariant = 'parameters { key: "arrowinfer.batch_invariant" value: { string_value: "true" } }'
    for name, extra in (("rsum257", ""), ("rsum257_invariant", invariant)):
        d = repository / name
        _save(
            d,
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
            [_float("x", "n", 257)],
            [_float("y", "n", 1)],
            initializer=[axes1],
        )
        _config(
            d,
            'name: "x" data_type: TYPE_FP32 dims: [ 257 ]',
            'name: "y" data_type: TYPE_FP32 dims: [ 1 ]',
            extra=extra,
        )
    d = repository / "matmul"
    weights = np.random.default_rng(37).normal(size=(37, 19)).astype(np.float32)
    w = helper.make_tensor("w", TensorProto.FLOAT, [37, 19], weights.ravel().tolist())
    _save(
        d,
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_float("x", "n", 37)],
        [_float("y", "n", 19)],
        initializer=[w],
    )
    _config(
        d,
        'name: "x" data_type: TYPE_FP32 dims: [ 37 ]',
        'name: "y" data_type: TYPE_FP32 dims: [ 19 ]',
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_example_repository(tmp_path_factory.mktemp("repository"))
    write_models(path)
    return path


@pytest.fixture(scope="module")
def servers(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A TCP server (Flight, shm, KServe) and a Unix-socket server, both over ``repository``."""
    sock = tmp_path_factory.mktemp("sock") / "arrowinfer.sock"
    with (
        Server(repository, port=0, kserve_port=0, metrics_port=0) as tcp,
        Server(repository, unix_socket=str(sock), kserve_port=None, metrics_port=None) as unix,
    ):
        yield {"tcp": tcp, "unix": unix}


# -- one request list through one path -------------------------------------------------------

Outcome = dict[str, np.ndarray] | Exception


def _arrays(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    return {name: tensors.to_numpy(batch.column(name)) for name in batch.schema.names}


def _client(kind: str, servers: dict[str, Server], repository: Path) -> Client:
    tcp = servers["tcp"]
    if kind == "flight":
        return Client(tcp.location)
    if kind == "unix":
        return Client(servers["unix"].location)
    if kind == "shm":
        shm_url = tcp.location.replace("grpc", "shm", 1)
        return Client(tcp.location, transport=ShmTransport(shm_url, min_shm_bytes=0))
    if kind == "local":  # laptop mode: no server at all
        return Client(fallback="local", repository=repository)
    raise ValueError(kind)


def run(
    kind: str,
    servers: dict[str, Server],
    repository: Path,
    model: str,
    requests: list[dict[str, np.ndarray]],
    *,
    metadata: list[dict[str, str]] | None = None,
) -> list[Outcome]:
    """Send every request at once (so that the batcher may merge them); their outcomes.

    ``metadata``, when given, receives each result's metadata (provenance, times).
    """
    if kind == "kserve":
        return _run_kserve(servers["tcp"], model, requests, metadata)
    if kind == "core":
        core = servers["tcp"].core
        loaded = core.get(model)
        futures = [core.submit(loaded, tensors.batch_from_numpy(r)) for r in requests]
        out: list[Outcome] = []
        for future in futures:
            try:
                done = future.result(WAIT)
            except Exception as err:  # noqa: BLE001 - the outcome under test
                out.append(err)
                continue
            out.append(_arrays(done.batch))
            if metadata is not None:
                metadata.append({k: str(v) for k, v in done.metadata.items()})
        return out
    with _client(kind, servers, repository) as client:
        pending = [client.infer_async(model, r) for r in requests]
        out = []
        for answer in pending:
            try:
                batch = answer.result(WAIT)
            except Exception as err:  # noqa: BLE001 - the outcome under test
                out.append(err)
                continue
            out.append(_arrays(batch))
            if metadata is not None:
                metadata.append(
                    {k.decode(): v.decode() for k, v in (batch.schema.metadata or {}).items()}
                )
        return out


def _run_kserve(
    server: Server,
    model: str,
    requests: list[dict[str, np.ndarray]],
    metadata: list[dict[str, str]] | None,
) -> list[Outcome]:
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    try:
        for i, request in enumerate(requests):
            inputs = []
            for name, array in request.items():
                kind = {"float32": "FP32", "int64": "INT64"}[array.dtype.name]
                tensor = tg.InferInput(name, list(array.shape), kind)
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)

            def callback(result: Any, error: Any, i: int = i) -> None:
                answers.put((i, result, error))

            client.async_infer(model, inputs, callback)
        got = {i: (r, e) for i, r, e in (answers.get(timeout=WAIT) for _ in requests)}
    finally:
        client.close()
    out: list[Outcome] = []
    for i in range(len(requests)):
        result, error = got[i]
        if error is not None:
            out.append(ServerError(error.message()))
            continue
        response = result.get_response()
        out.append({o.name: result.as_numpy(o.name) for o in response.outputs})
        if metadata is not None:
            metadata.append(
                {k: str(p.string_param or p.int64_param) for k, p in response.parameters.items()}
            )
    return out


class GoodClient:
    """A well-behaved client beside an attack: ``identity`` requests, every result checked."""

    def __init__(self, server: Server):
        self._server = server
        self._stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, name="good-client")

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        with Client(self._server.location) as client:
            # until stopped, and at least 3 results (unless it keeps failing: the test fails)
            while not self._stop.is_set() or (self.done < 3 and len(self.failures) < 3):
                x = rng.normal(size=(5, 1024)).astype(np.float32)
                try:
                    y = tensors.to_numpy(client.infer("identity", {"INPUT0": x}).column(0))
                except Exception as err:  # noqa: BLE001 - counted, and the test fails on it
                    self.failures.append(repr(err))
                    continue
                if not np.array_equal(x, y):
                    self.failures.append("wrong result")
                self.done += 1

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()
        assert self.failures == []
        assert self.done >= 3


def _statistics(servers: dict[str, Server], model: str, kind: str = "flight") -> dict[str, int]:
    """arrowinfer's counters of ``model`` in the server that ``kind`` of request goes to."""
    (stats,) = servers["unix" if kind == "unix" else "tcp"].core.statistics(model)
    return stats["arrowinfer"]


# -- 1. the batch dimension, and any failure, belong to one request ---------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_merged_requests_of_a_reducing_model_each_get_their_own_rows(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    """``sum0`` keeps one row: alone, a 1-row request is right; merged it would get the sum
    of every request's rows. Merged batches are re-run request by request."""
    before = _statistics(servers, "sum0", kind)["isolated_batches"]
    rng = np.random.default_rng(1)
    requests = [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(12)]
    with GoodClient(servers["tcp"]):
        outcomes = run(kind, servers, repository, "sum0", requests)
    for request, outcome in zip(requests, outcomes, strict=True):
        assert not isinstance(outcome, Exception), outcome
        assert np.array_equal(outcome["y"].reshape(1, 4), request["x"])  # its own row only
    if kind in [*REMOTE, "core"]:  # the server's batcher merged some, and split them again
        assert _statistics(servers, "sum0", kind)["isolated_batches"] > before


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize(("model", "rows_out"), [("sum0", 1), ("twice", 6)])
def test_an_output_without_the_batch_dimension_fails_only_its_request(
    kind: str, model: str, rows_out: int, servers: dict[str, Server], repository: Path
) -> None:
    rng = np.random.default_rng(2)
    bad = {"x": rng.normal(size=(3, 4)).astype(np.float32)}
    good = {"x": rng.normal(size=(1, 4)).astype(np.float32)}
    requests = [good, bad, good] if model == "sum0" else [bad]
    with GoodClient(servers["tcp"]):
        outcomes = run(kind, servers, repository, model, requests)
    failed = outcomes[1] if model == "sum0" else outcomes[0]
    assert isinstance(failed, ServerError), failed
    message = str(failed)
    for word in [f"model {model!r}", "failed to split the output tensor 'y'", "3 rows"]:
        assert word in message, message
    assert f"first dimension is {rows_out}" in message
    if model == "sum0":
        for outcome in (outcomes[0], outcomes[2]):
            assert not isinstance(outcome, Exception), outcome
            assert np.array_equal(outcome["y"].reshape(1, 4), good["x"])


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_an_onnxruntime_error_fails_only_its_request(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    """An index out of the model's table: onnxruntime's own error, for that request only."""
    requests = [{"i": np.array([[i % 10], [(i + 3) % 10]], np.int64)} for i in range(10)]
    requests[4] = {"i": np.array([[1], [99]], np.int64)}
    with GoodClient(servers["tcp"]):
        outcomes = run(kind, servers, repository, "gather", requests)
    for i, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        if i == 4:
            assert isinstance(outcome, ServerError), outcome
            assert "gather" in str(outcome)
        else:
            assert not isinstance(outcome, Exception), outcome
            assert np.array_equal(outcome["y"].ravel(), request["i"].ravel().astype(np.float32))


# -- 2. the same bits on every path ------------------------------------------------------------


@settings(
    max_examples=6,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    model=st.sampled_from(["rsum257", "matmul"]),
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_path_gives_the_same_bits(
    servers: dict[str, Server], repository: Path, model: str, rows: list[int], seed: int
) -> None:
    width = 257 if model == "rsum257" else 37
    rng = np.random.default_rng(seed)
    # wide dynamic range: a different summation order shows in the last bits
    requests = [
        {
            "x": (rng.normal(size=(n, width)) * 10.0 ** rng.integers(-3, 4, (n, width))).astype(
                np.float32
            )
        }
        for n in rows
    ]
    # one request at a time, so each runs alone: which requests share a batch is another
    # question (test_batch_invariance), here only the path differs
    outcomes = {
        kind: [run(kind, servers, repository, model, [r])[0] for r in requests]
        for kind in TRANSPORTS
    }
    reference = outcomes["core"]
    for kind, got in outcomes.items():
        for want, outcome in zip(reference, got, strict=True):
            assert not isinstance(outcome, Exception), (kind, outcome)
            assert isinstance(want, dict)
            # bits, not values: NaN and -0.0 included
            assert outcome["y"].reshape(want["y"].shape).tobytes() == want["y"].tobytes(), kind


def _misaligned(array: np.ndarray, shift: int) -> np.ndarray:
    """The same values at an address ``shift`` bytes past a multiple of 64."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + shift
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    assert out.ctypes.data % 64 == shift
    return out


def test_unaligned_arrow_buffers_are_copied_once_aligned_and_counted(
    servers: dict[str, Server],
) -> None:
    core = servers["tcp"].core
    loaded = core.get("rsum257")
    x = np.random.default_rng(5).normal(size=(3, 257)).astype(np.float32)
    before = loaded.statistics.as_dict()["arrowinfer"]["alignment_copies"]
    aligned = tensors.batch_from_numpy({"x": _misaligned(x, 0)})
    want = core.submit(loaded, aligned).result(WAIT)
    for shift in (4, 20, 44):
        batch = tensors.batch_from_numpy({"x": _misaligned(x, shift)})
        got = core.submit(loaded, batch).result(WAIT)
        assert got.batch.column("y").to_numpy().tobytes() == (
            want.batch.column("y").to_numpy().tobytes()
        )
    copies = loaded.statistics.as_dict()["arrowinfer"]["alignment_copies"] - before
    assert copies == 3  # the aligned request was not copied, each shifted one once


@pytest.mark.parametrize("model", ["rsum257_invariant", "matmul"])
def test_batch_invariant_models_give_each_request_the_bits_it_gets_alone(
    servers: dict[str, Server], repository: Path, model: str
) -> None:
    """With ``arrowinfer.batch_invariant`` (rsum257) or a kernel that is invariant anyway
    (matmul, docs/reproducibility.md), merging changes no bit of any request's result."""
    width = 257 if model.startswith("rsum") else 37
    rng = np.random.default_rng(11)
    requests = [
        {
            "x": (rng.normal(size=(n, width)) * 10.0 ** rng.integers(-3, 4, (n, width))).astype(
                np.float32
            )
        }
        for n in [1, 2, 3, 1, 5, 1, 1, 2, 7, 1, 1, 3]
    ]
    alone = [run("flight", servers, repository, model, [r])[0] for r in requests]
    before = servers["tcp"].core.statistics(model)[0]["execution_count"]
    merged = run("flight", servers, repository, model, requests)
    executions = servers["tcp"].core.statistics(model)[0]["execution_count"] - before
    assert executions < len(requests)  # some requests did share an execution
    laptop = [run("local", servers, repository, model, [r])[0] for r in requests]
    for want, got, local in zip(alone, merged, laptop, strict=True):
        assert isinstance(want, dict)
        assert isinstance(got, dict)
        assert isinstance(local, dict)
        assert got["y"].tobytes() == want["y"].tobytes()
        assert local["y"].tobytes() == want["y"].tobytes()


# -- 3. empty events ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_zero_row_request_gets_zero_rows_of_the_output_schema(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    stats = servers["tcp"].core.statistics("facile")[0]
    before = stats["execution_count"]
    successes = stats["inference_stats"]["success"]["count"]
    requests = [
        {"hits": np.zeros((0, 15), np.float32)},
        {"hits": np.ones((2, 15), np.float32)},
    ]
    outcomes = run(kind, servers, repository, "facile", requests)
    empty, full = outcomes
    assert not isinstance(empty, Exception), empty
    assert not isinstance(full, Exception), full
    assert set(empty) == {"energy"}
    assert empty["energy"].shape[0] == 0
    assert empty["energy"].dtype == np.float32
    assert full["energy"].shape[0] == 2
    if kind in ("flight", "shm", "kserve", "core"):  # the model ran once, for the 2 rows
        after = servers["tcp"].core.statistics("facile")[0]
        assert after["execution_count"] == before + 1
        assert after["inference_stats"]["success"]["count"] == successes + 2  # both answered


def _jets(counts: list[int], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return {
        "points": tensors.Ragged(offsets, rng.normal(size=(offsets[-1], 2)).astype(np.float32)),
        "features": tensors.Ragged(offsets, rng.normal(size=(offsets[-1], 7)).astype(np.float32)),
    }


@pytest.mark.parametrize("kind", ["flight", "unix", "shm", "core", "local"])
def test_jets_without_constituents_are_padded_and_masked_as_usual(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    counts = [3, 0, 5, 0]
    with_empty = run(kind, servers, repository, "jet_tagger", [_jets(counts, 9)])[0]
    assert not isinstance(with_empty, Exception), with_empty
    # each jet alone gives the same bits (the zero-item jets included)
    alone = [
        run(kind, servers, repository, "jet_tagger", [_jets([c], 100 + i)])[0]
        for i, c in enumerate(counts)
        if c == 0
    ]
    probabilities = with_empty["probabilities"]
    assert probabilities.shape == (4, 5)
    for outcome in alone:
        assert not isinstance(outcome, Exception), outcome
        # an empty jet's output does not depend on its (absent) constituents
        assert outcome["probabilities"][0].tobytes() == probabilities[1].tobytes()
        assert probabilities[1].tobytes() == probabilities[3].tobytes()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# -- 4. provenance -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_every_result_names_the_model_file_and_provider_that_made_it(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    sha = hashlib.sha256((repository / "facile" / "1" / "model.onnx").read_bytes()).hexdigest()
    metadata: list[dict[str, str]] = []
    requests = [{"hits": np.ones((n, 15), np.float32)} for n in (2, 0)]
    outcomes = run(kind, servers, repository, "facile", requests, metadata=metadata)
    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    assert len(metadata) == 2  # the empty request's result too
    for meta in metadata:
        assert meta["model"] == "facile"
        assert meta["model_version"] == "1"
        assert meta["model_sha256"] == sha
        assert meta["execution_provider"] == "CPUExecutionProvider"


def _changed_copy(repository: Path, target: Path, model: str) -> Path:
    """A copy of ``model`` whose file differs (its doc string) but computes the same."""
    shutil.copytree(repository / model, target / model)
    graph = onnx.load(str(target / model / "1" / "model.onnx"))
    graph.doc_string = "a rebuilt copy"
    onnx.save(graph, str(target / model / "1" / "model.onnx"))
    return target


def test_the_fallback_refuses_a_model_file_other_than_the_servers(
    repository: Path, tmp_path: Path
) -> None:
    other = _changed_copy(repository, tmp_path / "other", "facile")
    sha = hashlib.sha256((repository / "facile" / "1" / "model.onnx").read_bytes()).hexdigest()
    local_sha = hashlib.sha256((other / "facile" / "1" / "model.onnx").read_bytes()).hexdigest()
    assert sha != local_sha
    hits = {"hits": np.ones((2, 15), np.float32)}
    server = Server(repository, port=0, kserve_port=None, metrics_port=None, models=["facile"])
    with server:
        location = server.location
        strict = Client(location, fallback="local", repository=other, retries=0, timeout=WAIT)
        lenient = Client(
            location,
            fallback="local",
            repository=other,
            retries=0,
            timeout=WAIT,
            verify_fallback=False,
        )
        for client in (strict, lenient):  # each learns the server's sha256 from a result
            assert provenance(client.infer("facile", hits))["model_sha256"] == sha
    with strict, lenient:
        with pytest.raises(ModelError, match=f"sha256 {local_sha}.*sha256 {sha}"):
            strict.infer("facile", hits)
        with pytest.raises(ModelError, match="differs from the server's"):  # named version too
            strict.infer("facile", hits, version=1)
        assert strict.counters["fallbacks_refused"] == 2
        assert strict.counters.get("fallbacks", 0) == 0
        with pytest.warns(FallbackWarning, match="facile"):
            result = lenient.infer("facile", hits)
        assert provenance(result)["model_sha256"] == local_sha  # and says whose it is
        assert lenient.counters["fallbacks"] == 1


def test_the_fallback_runs_the_same_model_file(repository: Path) -> None:
    hits = {"hits": np.ones((2, 15), np.float32)}
    server = Server(repository, port=0, kserve_port=None, metrics_port=None, models=["facile"])
    with server:
        client = Client(
            server.location, fallback="local", repository=repository, retries=0, timeout=WAIT
        )
        remote = client.infer("facile", hits)
    with client, pytest.warns(FallbackWarning, match="facile"):
        local = client.infer("facile", hits)
    assert provenance(local) == provenance(remote)
    assert local.column(0).to_numpy().tobytes() == remote.column(0).to_numpy().tobytes()


# -- 5. one bad event does not lose the others ---------------------------------------------------


def _stream_inputs() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {"x": rng.normal(size=(1, 4)).astype(np.float32)},
        {"x": rng.normal(size=(1, 3)).astype(np.float32)},  # refused by the client: shape
        {"x": rng.normal(size=(3, 4)).astype(np.float32)},  # fails in the server: 1 row out
        {"x": np.zeros((0, 4), np.float32)},  # empty: zero rows back
        {"x": rng.normal(size=(1, 4)).astype(np.float32)},
    ]


def _check_outcomes(outcomes: list[Any], inputs: list[dict[str, np.ndarray]]) -> None:
    assert len(outcomes) == len(inputs)
    assert isinstance(outcomes[1], InvalidInput)
    assert isinstance(outcomes[2], ServerError)
    assert "failed to split" in str(outcomes[2])
    for i in (0, 3, 4):
        assert isinstance(outcomes[i], pa.RecordBatch), outcomes[i]
        got = tensors.to_numpy(outcomes[i].column("y")).reshape(-1, 4)
        assert got.tobytes() == inputs[i]["x"].tobytes()  # sum0 of one row is that row


@pytest.mark.parametrize("kind", ["flight", "shm", "local"])
def test_stream_errors_return_yields_each_result_or_exception_in_order(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    inputs = _stream_inputs()
    with _client(kind, servers, repository) as client:
        outcomes = list(client.stream("sum0", inputs, errors="return", window=2))
        _check_outcomes(outcomes, inputs)
        with pytest.raises(InvalidInput):  # the default raises, at the first failure
            list(client.stream("sum0", inputs))
        with pytest.raises(ValueError, match="errors must be"):
            client.stream("sum0", inputs, errors="ignore")


def test_async_stream_errors_return(servers: dict[str, Server]) -> None:
    inputs = _stream_inputs()

    async def main() -> list[Any]:
        async with AsyncClient(servers["tcp"].location) as client:
            with pytest.raises(ServerError):  # the default raises (here: the server's error)
                async for _ in client.stream("sum0", [inputs[0], inputs[2], inputs[4]]):
                    pass
            return [o async for o in client.stream("sum0", inputs, errors="return", window=2)]

    _check_outcomes(asyncio.run(main()), inputs)


# -- 6. silent changes to the data ---------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
        return str(r.read().decode())


@pytest.mark.parametrize("kind", ["flight", "shm", "local"])
def test_truncated_jets_are_counted_and_warned_about_once(
    kind: str, servers: dict[str, Server], repository: Path
) -> None:
    before = _statistics(servers, "jet_tagger")
    jets = _jets([120, 3, 100, 101], 4)  # the model takes 100 constituents: 2 jets cut
    with _client(kind, servers, repository) as client:
        with pytest.warns(TruncationWarning, match=r"jet_tagger.*2 entries.*21 items"):
            first = client.infer("jet_tagger", jets)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model: no second warning
            second = client.infer("jet_tagger", jets)
            fine = client.infer("jet_tagger", _jets([5, 100], 5))
    assert truncation(first) == (2, 21)
    assert truncation(second) == (2, 21)
    assert truncation(fine) == (0, 0)
    if kind != "local":
        after = _statistics(servers, "jet_tagger")
        assert after["truncated_entries"] - before["truncated_entries"] == 4
        assert after["truncated_items"] - before["truncated_items"] == 42
        port = servers["tcp"].metrics_port
        assert port
        line = next(
            line
            for line in _scrape(port).splitlines()
            if line.startswith('arrowinfer_truncated_items{model="jet_tagger"')
        )
        assert float(line.split()[-1]) == after["truncated_items"]


def test_float64_is_refused_unless_a_same_kind_cast_is_asked_for(
    servers: dict[str, Server],
) -> None:
    wide = np.random.default_rng(8).normal(size=(4, 15))
    with Client(servers["tcp"].location) as client:
        with pytest.raises(InvalidInput, match="element type"):
            client.infer("facile", {"hits": wide})
        cast = client.infer("facile", {"hits": wide}, cast="same_kind")
        narrow = client.infer("facile", {"hits": wide.astype(np.float32)})
        assert cast.column(0).to_numpy().tobytes() == narrow.column(0).to_numpy().tobytes()
        # same_kind never turns floats into integers
        with pytest.raises(InvalidInput, match="element type"):
            client.infer("gather", {"i": np.ones((2, 1))}, cast="same_kind")
        with pytest.raises(ValueError, match="cast must be"):
            client.infer("facile", {"hits": wide}, cast="unsafe")
        outcomes = list(
            client.stream("facile", [{"hits": wide}], cast="same_kind", errors="return")
        )
        assert isinstance(outcomes[0], pa.RecordBatch)
