"""The Flight protocol of DESIGN.md, spoken by plain ``pyarrow.flight`` clients.

Real servers on ephemeral loopback ports; the reference numbers come from onnxruntime run
directly on the model files. ``arrowinfer serve`` runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pyarrow import flight
from tritonclient.utils import InferenceServerException

import arrowinfer
from arrowinfer import tensors
from arrowinfer.cli import main
from arrowinfer.errors import ModelError, ModelNotFound
from arrowinfer.server import ACTIONS, Server
from arrowinfer.server._metrics import StatisticsCollector, metrics_registry, start_metrics_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["facile", "identity", "jet_tagger", "toptag_cnn", "track_sum"]
INPUTS = {
    "facile": ["hits"],
    "identity": ["INPUT0"],
    "jet_tagger": ["points", "features"],
    "toptag_cnn": ["image"],
    "track_sum": ["pt"],  # no offsets: the server makes that batch input
}
TIMES = ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")
DEADLINE = 30.0  # seconds any wait in this file may take before the test fails
CALL = flight.FlightCallOptions(timeout=DEADLINE)  # no raw Flight call can hang


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def fresh_server(example_repository: Path) -> Iterator[Server]:
    """A server of its own, for tests that count or change its state (load, unload)."""
    with Server(
        example_repository, port=0, kserve_port=0, metrics_port=0, model_control="explicit"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def facile_session(example_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(example_repository / "facile" / "1" / "model.onnx"))


@contextlib.contextmanager
def connect(server: Server | str) -> Iterator[flight.FlightClient]:
    location = server if isinstance(server, str) else server.location
    client = flight.FlightClient(location)
    try:
        yield client
    finally:
        client.close()


def hits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 15), dtype=np.float32)


def facile_batch(schema: pa.Schema, values: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([tensors.from_numpy(values)], schema=schema)


def energy(session: ort.InferenceSession, values: np.ndarray) -> np.ndarray:
    """facile's output, straight from onnxruntime."""
    return session.run(["energy"], {"hits": values})[0].reshape(-1)


def input_schema(client: flight.FlightClient, model: str) -> pa.Schema:
    return client.get_schema(flight.FlightDescriptor.for_path(model)).schema


def exchange(
    client: flight.FlightClient,
    path: list[str],
    schema: pa.Schema,
    requests: list[tuple[pa.RecordBatch, bytes | None]],
) -> list[tuple[pa.RecordBatch, dict[str, Any]]]:
    """Write every request before reading anything, then read until the server ends."""
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(*path), CALL)
    with writer:
        writer.begin(schema)
        for batch, meta in requests:
            if meta is None:
                writer.write_batch(batch)
            else:
                writer.write_with_metadata(batch, meta)
        writer.done_writing()
        out = []
        for chunk in reader:
            assert chunk.data is not None, "only results on a stream that is not stopping"
            meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else {}
            out.append((chunk.data, meta))
    return out


def action(client: flight.FlightClient, name: str, body: dict[str, Any] | None = None) -> Any:
    results = list(client.do_action(flight.Action(name, json.dumps(body or {}).encode())))
    assert len(results) == 1
    return json.loads(results[0].body.to_pybytes())


def flight_error_info(err: flight.FlightError) -> dict[str, Any]:
    info = json.loads(err.extra_info)
    assert isinstance(info, dict)
    return info


def check_facile_results(
    results: list[tuple[pa.RecordBatch, dict[str, Any]]],
    inputs: list[np.ndarray],
    session: ort.InferenceSession,
) -> None:
    assert len(results) == len(inputs)
    for (batch, meta), values in zip(results, inputs, strict=True):
        assert "error" not in meta, meta
        assert batch.num_rows == len(values)
        assert batch.schema.names == ["energy"]
        np.testing.assert_allclose(
            batch.column("energy").to_numpy(), energy(session, values), rtol=1e-5, atol=1e-6
        )


# -- discovery -------------------------------------------------------------------------------


def test_list_flights_one_per_model_version(server: Server) -> None:
    with connect(server) as client:
        infos = list(client.list_flights())
        paths = sorted(tuple(p.decode() for p in info.descriptor.path) for info in infos)
        assert paths == [(m, "1") for m in MODELS]
        for info in infos:
            model, version = (p.decode() for p in info.descriptor.path)
            assert info.descriptor.descriptor_type == flight.DescriptorType.PATH
            assert info.schema.names == INPUTS[model]  # inputs only: no mask for jet_tagger
            for path in ([model], [model, version]):
                descriptor = flight.FlightDescriptor.for_path(*path)
                assert client.get_schema(descriptor).schema.equals(info.schema, True)
                by_info = client.get_flight_info(descriptor)
                assert by_info.schema.equals(info.schema, check_metadata=True)
                assert [p.decode() for p in by_info.descriptor.path] == [model, version]


def test_schemas_are_canonical(server: Server) -> None:
    with connect(server) as client:
        facile = input_schema(client, "facile").field("hits")
        assert facile.type == pa.fixed_shape_tensor(pa.float32(), [15])
        image = input_schema(client, "toptag_cnn").field("image")
        assert image.type == pa.fixed_shape_tensor(pa.float32(), [1, 37, 37])
        jets = input_schema(client, "jet_tagger")
        assert jets.field("points").type == pa.list_(pa.list_(pa.float32(), 2))
        assert jets.field("features").type == pa.list_(pa.list_(pa.float32(), 7))


@pytest.mark.parametrize("path", [["nope"], ["facil"], ["facile", "7"], ["facile", "x"]])
def test_unknown_model_or_version(server: Server, path: list[str]) -> None:
    descriptor = flight.FlightDescriptor.for_path(*path)
    with connect(server) as client:
        with pytest.raises(flight.FlightError) as info:
            client.get_flight_info(descriptor)
        error = flight_error_info(info.value)
        assert error["type"] == "ModelNotFound"
        assert "facile" in error["message"]  # the served models (or versions) are listed
        if path == ["nope"]:
            assert "available: facile, identity, jet_tagger, toptag_cnn" in error["message"]
        if len(path) == 2:
            assert "facile/1" in error["message"]
        # pyarrow's get_schema drops the Flight error class on the server (not
        # get_flight_info): the message still tells
        with pytest.raises(pa.ArrowException, match=r"is not served .*facile"):
            client.get_schema(descriptor)
        # the same answer to an exchange, and the connection goes on
        schema = input_schema(client, "facile")
        with pytest.raises(flight.FlightError) as info:
            exchange(client, path, schema, [(facile_batch(schema, hits(2)), None)])
        assert flight_error_info(info.value)["type"] == "ModelNotFound"
        assert action(client, "health") == {"live": True}


# -- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [["facile"], ["facile", "1"]])
def test_pipelined_requests_one_result_each_in_order(
    server: Server, facile_session: ort.InferenceSession, path: list[str]
) -> None:
    rng = np.random.default_rng(len(path))
    inputs = [hits(int(rng.integers(1, 80)), seed=i) for i in range(50)]
    with connect(server) as client:
        schema = input_schema(client, "facile")
        requests = [
            (facile_batch(schema, v), json.dumps({"id": f"r{i}"}).encode() if i % 2 else None)
            for i, v in enumerate(inputs)
        ]
        results = exchange(client, path, schema, requests)
    check_facile_results(results, inputs, facile_session)
    for i, (_, meta) in enumerate(results):
        assert all(isinstance(meta[key], int) and meta[key] >= 0 for key in TIMES), meta
        if i % 2:
            assert meta["id"] == f"r{i}"
        else:
            assert "id" not in meta


@settings(deadline=None, max_examples=10)
@given(rows=st.lists(st.integers(1, 200), min_size=1, max_size=12), ids=st.booleans())
def test_identity_returns_every_request_unchanged(
    server: Server, rows: list[int], ids: bool
) -> None:
    rng = np.random.default_rng(sum(rows))
    inputs = [rng.standard_normal((n, 1024), dtype=np.float32) for n in rows]
    with connect(server) as client:
        schema = input_schema(client, "identity")
        requests = [
            (
                pa.RecordBatch.from_arrays([tensors.from_numpy(v)], schema=schema),
                json.dumps({"id": i}).encode() if ids else None,
            )
            for i, v in enumerate(inputs)
        ]
        results = exchange(client, ["identity"], schema, requests)
    assert len(results) == len(inputs)
    for i, ((batch, meta), values) in enumerate(zip(results, inputs, strict=True)):
        np.testing.assert_array_equal(tensors.to_numpy(batch.column("OUTPUT0")), values)
        assert meta.get("id") == (i if ids else None)


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


def _with_nulls(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    flat = pa.array(values.reshape(-1))
    mask = np.zeros(len(values), dtype=bool)
    mask[1] = True
    storage = pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(mask))
    return pa.ExtensionArray.from_storage(type_, storage)


def _assert_invalid(batch: pa.RecordBatch, meta: dict[str, Any], *words: str) -> None:
    assert batch.num_rows == 0
    assert batch.schema.names == ["energy"]
    error = meta["error"]
    assert error["type"] == "InvalidInput", error
    assert "model 'facile'" in error["message"]
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_bad_requests_on_a_stream_get_empty_error_batches(
    server: Server, facile_session: ort.InferenceSession
) -> None:
    """Bad values and bad metadata on a good stream: the good requests around them succeed."""
    with connect(server) as client:
        schema = _nullable(input_schema(client, "facile"))
        good = hits(5, seed=1)
        nulls = pa.RecordBatch.from_arrays(
            [_with_nulls(hits(4), schema.field("hits").type)], schema=schema
        )
        requests = [
            (facile_batch(schema, good), b'{"id": 1}'),
            (nulls, b'{"id": 2}'),
            (facile_batch(schema, hits(0)), b'{"id": 3}'),  # zero rows: zero rows back
            (facile_batch(schema, good), b"not json"),
            (facile_batch(schema, good), b"[1, 2]"),  # JSON, but not an object
            (facile_batch(schema, good), b'{"id": 6}'),
        ]
        results = exchange(client, ["facile"], schema, requests)
    assert len(results) == 6
    check_facile_results([results[0], results[5]], [good, good], facile_session)
    assert [meta.get("id") for _, meta in results] == [1, 2, 3, None, None, 6]
    _assert_invalid(*results[1], "input 'hits'", "null")
    empty, empty_meta = results[2]
    assert "error" not in empty_meta
    assert empty.num_rows == 0
    assert empty.schema.names == ["energy"]
    assert empty_meta["model"] == "facile"
    assert len(empty_meta["model_sha256"]) == 64
    assert "metadata is not JSON" in results[3][1]["error"]["message"]
    assert results[3][0].num_rows == 0
    assert "JSON object" in results[4][1]["error"]["message"]
    assert results[4][0].num_rows == 0


@pytest.mark.parametrize(
    ("column", "words"),
    [
        (pa.array(np.ones(3, np.float32)).cast(pa.float32()), ["input 'hits'", "shape"]),
        (tensors.from_numpy(np.ones((3, 15), np.float64)), ["input 'hits'", "element type"]),
        (tensors.from_numpy(np.ones((3, 14), np.float32)), ["input 'hits'", "float[15]"]),
        (tensors.from_numpy(np.ones((3, 3, 5), np.float32)), ["input 'hits'", "float[3, 5]"]),
        (
            tensors.ragged_from_numpy(np.array([0, 1, 2, 3], np.int32), np.ones(3, np.float32)),
            ["input 'hits'", "fixed shape"],
        ),
        (pa.array(["a", "b", "c"]), ["input 'hits'", "element type", "string"]),
        (pa.array([{"x": 1}, {"x": 2}, {"x": 3}]), ["input 'hits'", "not a tensor"]),
    ],
    ids=["scalar", "float64", "shape14", "shape3x5", "ragged", "string", "struct"],
)
def test_a_stream_of_the_wrong_type_gets_an_error_per_request(
    server: Server, facile_session: ort.InferenceSession, column: pa.Array, words: list[str]
) -> None:
    """One IPC stream has one schema: a stream whose schema is wrong answers every request."""
    batch = pa.RecordBatch.from_arrays([column], names=["hits"])
    with connect(server) as client:
        results = exchange(client, ["facile"], batch.schema, [(batch, None)] * 3)
        assert len(results) == 3
        for result in results:
            _assert_invalid(*result, *words)
        schema = input_schema(client, "facile")
        good = hits(3, seed=2)
        check_facile_results(
            exchange(client, ["facile"], schema, [(facile_batch(schema, good), None)]),
            [good],
            facile_session,
        )


@pytest.mark.parametrize("names", [["hit"], ["hits", "extra"], ["hits", "hits"]])
def test_wrong_column_names_name_the_model_and_the_inputs(server: Server, names: list[str]) -> None:
    columns = [tensors.from_numpy(hits(2))] * len(names)
    batch = pa.RecordBatch.from_arrays(columns, names=names)
    with connect(server) as client:
        results = exchange(client, ["facile"], batch.schema, [(batch, None)] * 2)
    assert len(results) == 2
    for result in results:
        _assert_invalid(*result, "hits")


def test_good_and_bad_clients_at_once(server: Server, facile_session: ort.InferenceSession) -> None:
    """Bad requests and abandoned streams next to good ones: every good result is right."""

    def good(seed: int) -> None:
        inputs = [hits(int(n), seed=seed * 100 + i) for i, n in enumerate(range(1, 31))]
        with connect(server) as client:
            schema = input_schema(client, "facile")
            requests = [(facile_batch(schema, v), None) for v in inputs]
            check_facile_results(
                exchange(client, ["facile"], schema, requests), inputs, facile_session
            )

    def bad(seed: int) -> None:
        wrong = pa.RecordBatch.from_arrays(
            [tensors.from_numpy(hits(3, seed).astype(np.float64))], names=["hits"]
        )
        with connect(server) as client:
            for _ in range(5):
                results = exchange(client, ["facile"], wrong.schema, [(wrong, None)] * 5)
                assert all("error" in meta for _, meta in results)
                # a stream dropped with requests in flight, results never read
                writer, _reader = client.do_exchange(
                    flight.FlightDescriptor.for_path("facile"), CALL
                )
                schema = input_schema(client, "facile")
                writer.begin(schema)
                for _ in range(5):
                    writer.write_batch(facile_batch(schema, hits(50, seed)))
                with contextlib.suppress(pa.ArrowException):
                    writer.close()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(good, s) for s in range(3)]
        futures += [pool.submit(bad, s) for s in range(3)]
        for future in futures:
            future.result(timeout=DEADLINE)


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(4096),
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 50,
    ],
    ids=["random", "http1", "bad-http2-frames"],
)
def test_garbage_on_the_flight_port_does_not_stop_the_server(
    server: Server, facile_session: ort.InferenceSession, garbage: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as raw:
        raw.sendall(garbage)
        raw.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while raw.recv(65536):  # the server answers what it can, then hangs up
                pass
    # a connection that sends half a preface and stays open meanwhile
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as idle:
        idle.sendall(b"PRI * HTTP/2.0\r\n")
        with connect(server) as client:
            schema = input_schema(client, "facile")
            values = hits(7, seed=3)
            results = exchange(client, ["facile"], schema, [(facile_batch(schema, values), None)])
        check_facile_results(results, [values], facile_session)


# -- actions ---------------------------------------------------------------------------------


def test_health_ready_and_server_metadata(server: Server) -> None:
    with connect(server) as client:
        assert action(client, "health") == {"live": True}
        assert action(client, "ready") == {"ready": True}
        assert action(client, "ready", {"model": "facile"}) == {"ready": True}
        assert action(client, "ready", {"model": "facile", "version": "1"}) == {"ready": True}
        assert action(client, "ready", {"model": "facile", "version": "2"}) == {"ready": False}
        assert action(client, "ready", {"model": "nope"}) == {"ready": False}
        meta = action(client, "server.metadata")
        assert meta["name"] == "arrowinfer"
        assert meta["version"] == arrowinfer.__version__
        assert "statistics" in meta["extensions"]
        assert sorted(name for name, _ in client.list_actions()) == sorted(ACTIONS)


def test_repository_index(server: Server) -> None:
    with connect(server) as client:
        index = action(client, "repository.index")
    assert index == [{"name": m, "version": "1", "state": "READY", "reason": ""} for m in MODELS]


def test_model_config_is_tritons_json(server: Server) -> None:
    with connect(server) as client:
        facile = action(client, "model.config", {"model": "facile"})
        jets = action(client, "model.config", {"model": "jet_tagger", "version": "1"})
    assert facile["name"] == "facile"
    assert facile["platform"] == "onnxruntime_onnx"
    assert facile["max_batch_size"] == 16384
    # every field at its default too, as Triton's JSON (clients index them); fields newer
    # than the oldest tritonclient supported (is_non_linear_format_io) are not asserted
    (hits,) = facile["input"]
    assert {k: hits[k] for k in ("name", "data_type", "format", "dims", "optional")} == {
        "name": "hits",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [15],
        "optional": False,
    }
    assert hits["is_shape_tensor"] is hits["allow_ragged_batch"] is False
    (energy,) = facile["output"]
    assert {k: energy[k] for k in ("name", "data_type", "dims", "label_filename")} == {
        "name": "energy",
        "data_type": "TYPE_FP32",
        "dims": [1],
        "label_filename": "",
    }
    assert "dynamic_batching" in facile
    assert facile["instance_group"][0]["kind"] == "KIND_CPU"
    assert [i["name"] for i in jets["input"]] == ["points", "features", "mask"]
    assert jets["max_batch_size"] == 1024
    assert jets["parameters"]["arrowinfer.mask_input"] == {"string_value": "mask"}


def test_local_fallback_answers_the_same_model_metadata(
    server: Server, example_repository: Path
) -> None:
    from arrowinfer.client._local import LocalTransport

    local = LocalTransport(example_repository)
    try:
        with connect(server) as client:
            for model in ("facile", "jet_tagger"):
                body = {"model": model}
                assert local.action("model.metadata", body) == action(
                    client, "model.metadata", body
                )
    finally:
        local.close()


def test_model_metadata_is_kserve_like(server: Server) -> None:
    with connect(server) as client:
        facile = action(client, "model.metadata", {"model": "facile"})
        jets = action(client, "model.metadata", {"model": "jet_tagger"})
        cnn = action(client, "model.metadata", {"model": "toptag_cnn", "version": "1"})
    assert facile == {
        "name": "facile",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "hits", "datatype": "FP32", "shape": [-1, 15]}],
        "outputs": [{"name": "energy", "datatype": "FP32", "shape": [-1, 1]}],
    }
    assert [(i["name"], i["shape"]) for i in jets["inputs"]] == [
        ("points", [-1, 100, 2]),
        ("features", [-1, 100, 7]),
    ]  # the mask is the server's business
    assert jets["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]
    assert cnn["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 37, 37]}]


@pytest.mark.parametrize(
    ("name", "body", "error_type", "words"),
    [
        ("nope.action", {}, "InvalidInput", ["unknown action", "model.statistics"]),
        ("model.config", {"model": "nope"}, "ModelNotFound", ["facile"]),
        ("model.metadata", {"model": "facile", "version": "3"}, "ModelNotFound", ["facile/1"]),
        ("model.statistics", {"model": "nope"}, "ModelNotFound", ["facile"]),
        # model control is off by default (Triton's mode none): refused before the body is
        # read; explicit mode's errors are in test_security's fenced-server tests
        ("model.load", {}, "RequestError", ["model control mode is 'none'"]),
        ("model.load", {"model": "nope"}, "RequestError", ["--model-control-mode explicit"]),
        ("model.unload", {"model": "facile"}, "RequestError", ["model control"]),
    ],
)
def test_action_errors(
    server: Server, name: str, body: dict[str, Any], error_type: str, words: list[str]
) -> None:
    with connect(server) as client:
        with pytest.raises(flight.FlightError) as info:
            action(client, name, body)
        error = flight_error_info(info.value)
        assert error["type"] == error_type, error
        for word in words:
            assert word in error["message"]
        with pytest.raises(flight.FlightError):  # a body that is not JSON
            list(client.do_action(flight.Action("model.config", b"{not json")))
        assert action(client, "health") == {"live": True}


def _stats(client: flight.FlightClient, model: str) -> dict[str, Any]:
    (stats,) = action(client, "model.statistics", {"model": model})["model_stats"]
    return stats  # type: ignore[no-any-return]


def test_model_statistics_count_requests(fresh_server: Server) -> None:
    with connect(fresh_server) as client:
        everything = action(client, "model.statistics")["model_stats"]
        assert [(s["name"], s["version"]) for s in everything] == [(m, "1") for m in MODELS]
        before = _stats(client, "facile")
        assert set(before) == {
            "name",
            "version",
            "last_inference",
            "inference_count",
            "execution_count",
            "inference_stats",
            "response_stats",
            "batch_stats",
            "memory_usage",
            "arrowinfer",
        }
        assert set(before["inference_stats"]) == {
            "success",
            "fail",
            "queue",
            "compute_input",
            "compute_infer",
            "compute_output",
            "cache_hit",
            "cache_miss",
        }
        assert before["inference_count"] == 0
        assert before["inference_stats"]["success"] == {"count": 0, "ns": 0}
        schema = input_schema(client, "facile")
        for i in range(3):  # one after the other: three executions
            exchange(client, ["facile"], schema, [(facile_batch(schema, hits(4, i)), None)])
        after = _stats(client, "facile")
        one = action(client, "model.statistics", {"model": "facile", "version": "1"})
        assert one["model_stats"][0]["inference_count"] == after["inference_count"]
    assert after["inference_count"] == 12
    assert after["execution_count"] == 3
    assert after["inference_stats"]["success"]["count"] == 3
    assert after["inference_stats"]["fail"]["count"] == 0
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][key]["ns"] > 0
    assert after["last_inference"] > 0
    assert after["batch_stats"][0]["batch_size"] == 4
    assert after["batch_stats"][0]["compute_infer"]["count"] == 3


def test_unload_and_load_a_model(fresh_server: Server) -> None:
    with connect(fresh_server) as client:
        schema = input_schema(client, "facile")
        request = [(facile_batch(schema, hits(2)), None)]
        assert action(client, "model.unload", {"model": "facile"}) == {}
        assert "facile" not in {info.descriptor.path[0].decode() for info in client.list_flights()}
        assert action(client, "ready", {"model": "facile"}) == {"ready": False}
        facile_state = [e for e in action(client, "repository.index") if e["name"] == "facile"]
        assert [e["state"] for e in facile_state] == ["UNAVAILABLE"]
        with pytest.raises(flight.FlightError) as info:
            exchange(client, ["facile"], schema, request)
        error = flight_error_info(info.value)
        assert error["type"] == "ModelNotFound"
        assert "identity" in error["message"]  # what is still served
        assert len(exchange(client, ["identity"], *_identity_request(client))) == 1

        assert action(client, "model.load", {"model": "facile"}) == {"loaded": [1]}
        assert action(client, "ready", {"model": "facile"}) == {"ready": True}
        ((batch, meta),) = exchange(client, ["facile"], schema, request)
        assert "error" not in meta
        assert batch.num_rows == 2
        assert action(client, "model.load", {"model": "facile"}) == {"loaded": [1]}  # reload


def _identity_request(
    client: flight.FlightClient,
) -> tuple[pa.Schema, list[tuple[pa.RecordBatch, None]]]:
    schema = input_schema(client, "identity")
    values = np.ones((1, 1024), np.float32)
    return schema, [(pa.RecordBatch.from_arrays([tensors.from_numpy(values)], schema=schema), None)]


class OpenStream:
    """One exchange stream, used one request at a time (write, then read its answer)."""

    def __init__(self, client: flight.FlightClient, model: str, schema: pa.Schema):
        descriptor = flight.FlightDescriptor.for_path(model)
        self.writer, self.reader = client.do_exchange(descriptor, CALL)
        self.writer.begin(schema)
        self.schema = schema

    def ask(self, values: np.ndarray) -> tuple[pa.RecordBatch, dict[str, Any]]:
        self.writer.write_batch(facile_batch(self.schema, values))
        chunk = self.reader.read_chunk()
        return chunk.data, json.loads(chunk.app_metadata.to_pybytes())

    def close(self) -> None:
        self.writer.done_writing()
        assert list(self.reader) == []  # the server ends the stream cleanly
        self.writer.close()


def test_open_streams_follow_model_reloads(
    fresh_server: Server, facile_session: ort.InferenceSession
) -> None:
    """A stream opened before ``model.load``/``model.unload`` is served by the model as it is
    now: never by the queue of the model instance that was replaced."""
    values = hits(3, seed=4)
    with connect(fresh_server) as client:
        stream = OpenStream(client, "facile", input_schema(client, "facile"))
        check_facile_results([stream.ask(values)], [values], facile_session)
        assert action(client, "model.load", {"model": "facile"}) == {"loaded": [1]}
        check_facile_results([stream.ask(values)], [values], facile_session)
        action(client, "model.unload", {"model": "facile"})
        batch, meta = stream.ask(values)
        assert batch.num_rows == 0
        assert meta["error"]["type"] == "ModelNotFound"
        action(client, "model.load", {"model": "facile"})
        check_facile_results([stream.ask(values)], [values], facile_session)
        stream.close()


def test_a_model_reloaded_with_other_outputs_ends_open_streams(
    example_repository: Path, tmp_path: Path, facile_session: ort.InferenceSession
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(example_repository, repository, ignore=shutil.ignore_patterns("jet*", "top*"))
    values = hits(3, seed=5)
    with (
        Server(
            repository, port=0, kserve_port=None, metrics_port=None, model_control="explicit"
        ) as server,
        connect(server) as client,
    ):
        stream = OpenStream(client, "facile", input_schema(client, "facile"))
        check_facile_results([stream.ask(values)], [values], facile_session)
        # "facile" becomes another model, with other inputs and outputs
        config = (repository / "identity" / "config.pbtxt").read_text()
        (repository / "facile" / "config.pbtxt").write_text(
            config.replace('name: "identity"', 'name: "facile"')
        )
        shutil.copy(repository / "identity" / "1" / "model.onnx", repository / "facile" / "1")
        action(client, "model.load", {"model": "facile"})
        assert input_schema(client, "facile").names == ["INPUT0"]

        batch, meta = stream.ask(values)
        assert batch.num_rows == 0
        assert meta["error"]["type"] == "ServerUnavailable"
        assert "reloaded with other outputs" in meta["error"]["message"]
        assert list(stream.reader) == []  # and the server ends the stream
        stream.writer.close()
        assert action(client, "health") == {"live": True}


# -- metrics ---------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as r:
        assert r.status == 200
        return r.read().decode()  # type: ignore[no-any-return]


def test_prometheus_metrics_under_tritons_names(fresh_server: Server) -> None:
    assert fresh_server.metrics_port
    with connect(fresh_server) as client:
        schema = input_schema(client, "facile")
        for i in range(3):  # one after the other: three executions of 4 rows
            exchange(client, ["facile"], schema, [(facile_batch(schema, hits(4, i)), None)])
    text = scrape(fresh_server.metrics_port)
    lines = set(text.splitlines())
    labels = '{model="facile",version="1"}'
    for line in [
        f"nv_inference_request_success{labels} 3.0",
        f"nv_inference_request_failure{labels} 0.0",
        f"nv_inference_count{labels} 12.0",
        f"nv_inference_exec_count{labels} 3.0",
        f"nv_inference_pending_request_count{labels} 0.0",
        'nv_inference_request_success{model="identity",version="1"} 0.0',
        'arrowinfer_batch_size_bucket{le="2",model="facile",version="1"} 0.0',
        'arrowinfer_batch_size_bucket{le="4",model="facile",version="1"} 3.0',
        'arrowinfer_batch_size_bucket{le="+Inf",model="facile",version="1"} 3.0',
        f"arrowinfer_batch_size_count{labels} 3.0",
        f"arrowinfer_batch_size_sum{labels} 12.0",
    ]:
        assert line in lines, line
    for name in ("queue", "compute_infer", "request"):
        assert re.search(
            rf"^nv_inference_{name}_duration_us{re.escape(labels)} [0-9.e+]+$", text, re.MULTILINE
        )
    names = {line.split("{")[0].split(" ")[0] for line in lines if line.startswith("nv_")}
    assert not [name for name in names if name.endswith("_total")]  # no counter suffix

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "nv_inference_request_success",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
        "arrowinfer_batch_size",
    } <= set(families)
    values = {
        (s.name, s.labels.get("model")): s.value
        for f in families.values()
        for s in f.samples
        if s.labels.get("version") == "1" and "le" not in s.labels
    }
    assert values["nv_inference_queue_duration_us", "facile"] > 0
    assert values["nv_inference_compute_infer_duration_us", "facile"] > 0
    assert values["nv_inference_queue_duration_us", "toptag_cnn"] == 0
    assert families["nv_inference_pending_request_count"].type == "gauge"
    # Triton's host gauges, from /proc: utilization a fraction, memory what /proc says
    host = {name: families[name].samples[0].value for name in families if "_cpu_" in name}
    assert 0.0 <= host["nv_cpu_utilization"] <= 1.0
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)[1]) * 1024
    assert host["nv_cpu_memory_total_bytes"] == total
    assert 0 < host["nv_cpu_memory_used_bytes"] < total
    assert families["arrowinfer_batch_size"].type == "histogram"

    # counted at scrape time: a new request shows on the next scrape
    with connect(fresh_server) as client:
        exchange(client, ["facile"], schema, [(facile_batch(schema, hits(1)), None)])
    assert f"nv_inference_request_success{labels} 4.0" in scrape(fresh_server.metrics_port)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host cannot bind ::1")
def test_every_front_end_serves_on_ipv6_loopback(example_repository: Path) -> None:
    """``serve --host ::1``: the Flight location is written with brackets (it failed to
    start with ``Cannot parse URI: 'grpc://::1:0'``), and every front end answers there."""
    import tritonclient.grpc as tg

    from arrowinfer.client import Client

    with Server(
        example_repository,
        host="::1",
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=None,
        models=["facile"],
    ) as server:
        assert server.location == f"grpc://[::1]:{server.port}"
        batch = facile_batch(server.core.get("facile").version.inputs, hits(3))
        with Client(server.location) as client:
            assert client.infer("facile", batch).num_rows == 3
        triton = tg.InferenceServerClient(f"[::1]:{server.kserve_port}")
        try:
            assert triton.is_model_ready("facile")
        finally:
            triton.close()
        url = f"http://[::1]:{server.http_port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            assert response.status == 200


def test_metrics_address_family_follows_the_host() -> None:
    from arrowinfer.server._metrics import address_family

    assert address_family("127.0.0.1", 0) == socket.AF_INET
    assert address_family("::1", 0) == socket.AF_INET6
    assert address_family("::", 0) == socket.AF_INET6


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host cannot bind ::1")
def test_metrics_and_health_on_ipv6_loopback() -> None:
    ready = [False]
    registry = metrics_registry(StatisticsCollector(list, dict))
    server, port = start_metrics_server(registry, "::1", 0, ready=lambda: ready[0])
    try:
        assert server.socket.family == socket.AF_INET6

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://[::1]:{port}{path}", timeout=DEADLINE) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, ""

        status, text = get("/metrics")
        assert status == 200
        assert "# TYPE nv_inference_pending_request_count gauge" in text
        assert get("/v2/health/live")[0] == 200
        assert get("/v2/health/ready")[0] == 503
        ready[0] = True
        assert get("/v2/health/ready")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_servers_have_their_own_metrics(fresh_server: Server, server: Server) -> None:
    assert fresh_server.metrics_port != server.metrics_port
    with connect(server) as client:
        schema = input_schema(client, "facile")
        exchange(client, ["facile"], schema, [(facile_batch(schema, hits(1)), None)])
    text = scrape(fresh_server.metrics_port)  # the other server's request is not here
    assert 'nv_inference_request_success{model="facile",version="1"} 0.0' in text


# -- `arrowinfer serve` ----------------------------------------------------------------------


class Serve:
    """``arrowinfer serve`` in a subprocess; its stdout lines in a queue, its log in a file."""

    def __init__(self, repository: Path | None, log: Path, *args: str):
        """``repository`` None: ``args`` name it (as ``--model-repository``)."""
        self.log = log
        self._log_file = log.open("w")
        named = [str(repository)] if repository else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "arrowinfer.cli", "serve", *named, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def location(self) -> str:
        """The Flight location from the line ``arrowinfer serving REPO on LOCATION``."""
        try:
            line = self.lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no location line; log:\n{self.log.read_text()}") from None
        found = re.fullmatch(r"arrowinfer serving (.+) on (grpc://127\.0\.0\.1:(\d+))\n", line)
        assert found, line
        assert int(found.group(3)) > 0
        return found.group(2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log_file.close()


@pytest.fixture
def serve(example_repository: Path, tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        started.append(Serve(example_repository, tmp_path / f"serve{len(started)}.log", *args))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.stop()


def test_serve_stops_on_sigterm_after_answering_every_request_sent(
    serve: Callable[..., Serve], facile_session: ort.InferenceSession
) -> None:
    running = serve("--port", "0", "--kserve-port", "0", "--http-port", "0", "--metrics-port", "0")
    location = running.location()
    log = running.log.read_text()
    for model in MODELS:
        assert len(re.findall(rf"loaded model {model} version 1\b", log)) == 1, log
    metrics = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
    assert metrics, log
    assert "nv_inference_request_success" in scrape(int(metrics.group(1)))

    inputs = [hits(200, seed=i) for i in range(60)]
    results: list[tuple[pa.RecordBatch, dict[str, Any]]] = []
    goaway: list[dict[str, Any]] = []
    with connect(location) as client:
        schema = input_schema(client, "facile")
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("facile"), CALL)
        with writer:
            writer.begin(schema)
            for values in inputs:
                writer.write_batch(facile_batch(schema, values))
            # one answer first: the stream is open on the server (a stream that reaches it
            # after the stop began is refused, which is not what this test is about)
            first = reader.read_chunk()
            results.append((first.data, json.loads(first.app_metadata.to_pybytes())))
            running.process.send_signal(signal.SIGTERM)
            for chunk in reader:
                meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else {}
                if chunk.data is None:  # the server asks us to finish the stream
                    goaway.append(meta)
                    writer.done_writing()
                else:
                    results.append((chunk.data, meta))
    assert running.process.wait(timeout=DEADLINE) == 0
    assert goaway == [{"goaway": "the server is shutting down"}]
    check_facile_results(results, inputs, facile_session)
    log = running.log.read_text()
    assert "SIGTERM: finishing requests in flight" in log
    assert "server stopped" in log


def test_serve_exits_on_a_second_sigterm_when_a_client_keeps_its_stream(
    serve: Callable[..., Serve], facile_session: ort.InferenceSession
) -> None:
    """A client that ignores ``goaway`` holds a graceful stop; a second signal ends it."""
    running = serve(
        "--port", "0", "--kserve-port", "-1", "--http-port", "-1", "--metrics-port", "-1"
    )
    values = hits(2)
    with connect(running.location()) as client:
        stream = OpenStream(client, "facile", input_schema(client, "facile"))
        check_facile_results([stream.ask(values)], [values], facile_session)
        running.process.send_signal(signal.SIGTERM)
        chunk = stream.reader.read_chunk()  # the server is stopping: it asks us to finish
        assert chunk.data is None
        assert json.loads(chunk.app_metadata.to_pybytes()) == {
            "goaway": "the server is shutting down"
        }
        check_facile_results([stream.ask(values)], [values], facile_session)  # still served
        assert running.process.poll() is None  # waiting for our stream, which we keep open
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=DEADLINE) == 1
        with contextlib.suppress(pa.ArrowException):
            stream.writer.close()
    assert "SIGTERM again: exiting without waiting for open streams" in running.log.read_text()


def test_serve_takes_the_repository_by_tritons_flag(
    example_repository: Path, tmp_path: Path
) -> None:
    """``arrowinfer serve --model-repository REPO``, as ``tritonserver --model-repository``."""
    running = Serve(
        None,
        tmp_path / "serve.log",
        *("--model-repository", str(example_repository)),
        *("--port", "0", "--kserve-port", "-1", "--http-port", "-1", "--metrics-port", "0"),
    )
    try:
        with connect(running.location()) as client:
            input_schema(client, "facile")  # served from it
    finally:
        running.stop()
    log = running.log.read_text()
    for model in MODELS:
        assert len(re.findall(rf"loaded model {model} version 1\b", log)) == 1, log


def test_serve_in_explicit_mode_loads_only_the_named_models(serve: Callable[..., Serve]) -> None:
    """As tritonserver --model-control-mode explicit: no model loads at start unless
    --load-model names it; the index lists the others by name only (Triton 2.51 answers
    ``[{"name": ...}]`` so) until a client loads them."""
    ports = ("--port", "0", "--kserve-port", "-1", "--http-port", "-1", "--metrics-port", "-1")
    running = serve(*ports, "--model-control-mode", "explicit", "--load-model", "identity")
    with connect(running.location()) as client:
        assert [info.descriptor.path for info in client.list_flights()] == [[b"identity", b"1"]]
        index = {e["name"]: e for e in action(client, "repository.index")}
        assert index["identity"]["state"] == "READY"
        assert index["facile"] == {"name": "facile"}
        assert action(client, "model.load", {"model": "facile"}) == {"loaded": [1]}
        ready = [e["name"] for e in action(client, "repository.index") if "state" in e]
        assert ready == ["facile", "identity"]
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=DEADLINE) == 0
    assert "loaded model jet_tagger" not in running.log.read_text()


@pytest.fixture
def broken_repository(example_repository: Path, tmp_path: Path) -> Path:
    """The example repository plus ``broken``, a model whose ONNX file is not one."""
    repo = tmp_path / "repository"
    shutil.copytree(example_repository, repo)
    config = repo / "identity" / "config.pbtxt"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(
        config.read_text().replace('"identity"', '"broken"')
    )
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX model")
    return repo


def test_serve_exits_when_a_model_fails_to_load(broken_repository: Path, tmp_path: Path) -> None:
    """tritonserver's default (--exit-on-error=true): a model that does not load stops the
    server at start, with one line saying which model and why; not a half-served repository."""
    running = Serve(
        broken_repository,
        tmp_path / "serve.log",
        *("--port", "0", "--kserve-port", "-1", "--http-port", "-1", "--metrics-port", "-1"),
    )
    try:
        assert running.process.wait(timeout=DEADLINE) == 1
    finally:
        running.stop()
    log = running.log.read_text()
    assert "arrowinfer serve: failed to load all models (--exit-on-error): broken: " in log
    assert "not a readable ONNX model" in log
    assert "Traceback" not in log
    assert running.lines.empty()  # it never said it was serving


@pytest.mark.parametrize(("strict", "ready"), [([], False), (["--strict-readiness=false"], True)])
def test_serve_with_exit_on_error_false_serves_the_other_models(
    broken_repository: Path, tmp_path: Path, strict: list[str], ready: bool
) -> None:
    """tritonserver --exit-on-error=false: the others serve; the server is ready only with
    --strict-readiness=false (tritonserver's default is true: not ready while a model
    failed), while each served model is ready either way."""
    running = Serve(
        broken_repository,
        tmp_path / "serve.log",
        *("--port", "0", "--kserve-port", "-1", "--http-port", "-1", "--metrics-port", "-1"),
        *("--exit-on-error=false", *strict),
    )
    try:
        with connect(running.location()) as client:
            input_schema(client, "facile")
            assert action(client, "ready") == {"ready": ready}
            assert action(client, "ready", {"model": "facile"}) == {"ready": True}
            assert action(client, "ready", {"model": "broken"}) == {"ready": False}
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("ON", True), ("1", True), ("False", False), ("0", False)]
)
def test_serve_reads_booleans_as_tritonserver(text: str, value: bool) -> None:
    from arrowinfer.cli import parser

    args = parser().parse_args(["serve", f"--exit-on-error={text}", "--strict-readiness", text])
    assert args.exit_on_error is value
    assert args.strict_readiness is value
    bare = parser().parse_args(["serve", "--exit-on-error", "--strict-readiness"])
    assert bare.exit_on_error is bare.strict_readiness is True


def test_serve_refuses_a_boolean_it_cannot_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--exit-on-error=maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_a_model_named_at_start_that_does_not_exist_says_so_once(
    example_repository: Path,
) -> None:
    """--load-model of a name the repository lacks: a failed load (as Triton), whose
    message says why once, not wrapped in itself."""
    with Server(
        example_repository, port=0, kserve_port=None, metrics_port=None, models=["nosuch"]
    ) as server:
        assert server.core.failed == {"nosuch": "no such model in the repository"}
        with pytest.raises(ModelNotFound) as caught:
            server.core.get("nosuch")
    assert str(caught.value).count("is not served") == 1
    assert "failed to load: no such model in the repository" in str(caught.value)


def test_strict_readiness_follows_the_failed_models(broken_repository: Path) -> None:
    """With strict_readiness the server is not ready while a model has failed to load, on
    every health endpoint; unloading that model makes it ready, and a failed load (explicit
    mode) makes it not ready again (Triton 2.51 answers so, checked)."""
    import tritonclient.grpc as tg

    with pytest.raises(ModelError, match=r"failed to load all models.*broken: .*ONNX"):
        Server(broken_repository, port=0, kserve_port=None, metrics_port=None, exit_on_error=True)
    with Server(
        broken_repository,
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=0,
        strict_readiness=True,
        model_control="explicit",
    ) as server:
        grpc_client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")

        def readiness() -> tuple[int, int, bool]:
            http = f"http://127.0.0.1:{server.http_port}/v2/health/ready"
            metrics = f"http://127.0.0.1:{server.metrics_port}/v2/health/ready"
            codes = []
            for url in (http, metrics):
                try:
                    with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
                        codes.append(answer.status)
                except urllib.error.HTTPError as err:
                    codes.append(err.code)
            return codes[0], codes[1], grpc_client.is_server_ready()

        try:
            assert readiness() == (400, 503, False)
            assert grpc_client.is_model_ready("facile")
            grpc_client.unload_model("broken")
            assert readiness() == (200, 200, True)
            with pytest.raises(InferenceServerException, match="not a readable ONNX model"):
                grpc_client.load_model("broken")
            assert readiness() == (400, 503, False)
            index = {e.name: e for e in grpc_client.get_model_repository_index().models}
            assert index["broken"].state == "UNAVAILABLE"
            assert "not a readable ONNX model" in index["broken"].reason
        finally:
            grpc_client.close()


def test_serve_takes_tritons_allow_flags(serve: Callable[..., Serve]) -> None:
    """tritonserver --allow-http=false --allow-grpc=false --allow-metrics=false: those
    ports are not opened (Flight is arrowinfer's own and stays); --log-verbose=1 logs
    debug messages."""
    running = serve(
        *("--port", "0", "--kserve-port", "0", "--http-port", "0", "--metrics-port", "0"),
        *("--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"),
        *("--log-verbose=1", "--model", "identity"),
    )
    with connect(running.location()) as client:
        assert [info.descriptor.path for info in client.list_flights()] == [[b"identity", b"1"]]
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=DEADLINE) == 0
    log = running.log.read_text()
    assert "Flight listening on" in log
    for absent in ("KServe v2 gRPC listening", "KServe v2 HTTP listening", "metrics on"):
        assert absent not in log
    assert " DEBUG " in log


@pytest.mark.parametrize("flag", ["--port", "--kserve-port", "--http-port", "--metrics-port"])
def test_serve_says_which_port_is_in_use(
    example_repository: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """A port already taken (a Triton, or a second `make serve`) is one line naming it and
    how to choose another, not a traceback."""
    ports = {"--port": "0", "--kserve-port": "0", "--http-port": "0", "--metrics-port": "0"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports[flag] = str(taken.getsockname()[1])
        with pytest.raises(SystemExit) as info:
            main(
                [
                    "serve",
                    str(example_repository),
                    "--model",
                    "identity",
                    *chain.from_iterable(ports.items()),
                ]
            )
    message = str(info.value.code)
    assert message.startswith("arrowinfer serve: ")
    assert "cannot listen on " in message
    assert ports[flag] in message
    assert "choose another with --port, --kserve-port, --http-port or --metrics-port" in message
    assert "Traceback" not in capsys.readouterr().err


def test_a_server_that_cannot_start_stops_what_it_started(example_repository: Path) -> None:
    """The metrics port (the last part started) taken: the Flight port it had opened is
    free again, and the exception says which port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        flight_port = probe.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics cannot listen on 127.0.0.1:{busy}"):
            Server(example_repository, port=flight_port, kserve_port=0, metrics_port=busy)
    with Server(example_repository, port=flight_port, kserve_port=None, metrics_port=None):
        pass  # the port was let go


def test_serve_stops_on_sigterm_when_idle(serve: Callable[..., Serve]) -> None:
    running = serve(
        "--port",
        "0",
        "--kserve-port",
        "-1",
        "--http-port",
        "-1",
        "--metrics-port",
        "-1",
        "--model",
        "identity",
    )
    location = running.location()
    with connect(location) as client:
        assert [info.descriptor.path for info in client.list_flights()] == [[b"identity", b"1"]]
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=DEADLINE) == 0
    log = running.log.read_text()
    assert "metrics on" not in log
    assert "loaded model identity" in log
    assert "loaded model facile" not in log


def test_serve_help_describes_the_repository_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "REPO/<model>/config.pbtxt" in text
    assert "REPO/<model>/<version>/model.onnx" in text
    assert "--metrics-port" in text
