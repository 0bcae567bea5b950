"""The KServe v2 HTTP/REST front end: tritonclient.http (sync, async) and raw JSON.

Real servers on ephemeral loopback ports, no mocks. Every inference result is compared
with onnxruntime running the same model file; every error with the HTTP status Triton's
HTTP server gives the same error (400 invalid argument, 404 not found, 503 unavailable,
501 not supported), with Triton's JSON error body ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.http as th
import tritonclient.http.aio as th_aio
from _pbparams import set_parameter
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from arrowinfer.config import config_json
from arrowinfer.errors import InvalidInput
from arrowinfer.protocol import parse_json
from arrowinfer.schema import DATATYPES
from arrowinfer.server import Server
from arrowinfer.server._http import HTTP_MAX_INPUT_SIZE, infer_request

WAIT = 30.0  # seconds any one answer may take: bounds every test, never a sleep
TOKEN = "http-test-token"

rng = np.random.default_rng(20261130)

#: One request per model: its inputs (batch first).
REQUESTS: dict[str, dict[str, np.ndarray]] = {
    "facile": {"hits": rng.normal(size=(7, 15)).astype(np.float32)},
    "toptag_cnn": {"image": np.abs(rng.normal(size=(3, 1, 37, 37))).astype(np.float32)},
    "identity": {"INPUT0": rng.normal(size=(4, 1024)).astype(np.float32)},
}


# -- helpers -----------------------------------------------------------------------------


def onnxruntime_outputs(server: Server, model: str, arrays: dict[str, np.ndarray]) -> dict:
    """What onnxruntime computes for ``arrays`` with the model file the server serves."""
    session = ort.InferenceSession(str(server.core.get(model).version.path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, arrays), strict=True))


@pytest.fixture
def client(server: Server) -> Iterator[th.InferenceServerClient]:
    triton = th.InferenceServerClient(
        f"127.0.0.1:{server.http_port}", connection_timeout=WAIT, network_timeout=WAIT
    )
    try:
        yield triton
    finally:
        triton.close()


def http_server(repository: Path, **options: Any) -> Server:
    """A real server with only its HTTP front end, on an ephemeral loopback port."""
    return Server(repository, port=0, kserve_port=None, http_port=0, metrics_port=None, **options)


def infer_inputs(arrays: dict[str, np.ndarray], *, binary: bool) -> list[th.InferInput]:
    out = []
    for name, array in arrays.items():
        tensor = th.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


def call(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    scheme: str = "http",
    context: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request, as curl would send it: status, headers, body."""
    url = f"{scheme}://127.0.0.1:{server.http_port}{path}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def error_of(body: bytes) -> str:
    """Triton's error body: a JSON object with one string, ``error``."""
    data = json.loads(body)
    assert list(data) == ["error"]
    assert isinstance(data["error"], str)
    return data["error"]


# -- health, metadata, config, statistics, repository -------------------------------------


def test_health_and_metadata(server: Server, client: th.InferenceServerClient) -> None:
    import arrowinfer

    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("facile")
    assert client.is_model_ready("facile", "1")
    assert not client.is_model_ready("facile", "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta["name"] == "arrowinfer"
    assert meta["version"] == arrowinfer.__version__
    assert {"binary_tensor_data", "model_repository", "statistics", "system_shared_memory"} <= (
        set(meta["extensions"])
    )
    model = client.get_model_metadata("toptag_cnn")
    assert model["name"] == "toptag_cnn"
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 37, 37]}]
    assert client.get_model_metadata("toptag_cnn", "1") == model
    config = client.get_model_config("facile")
    assert config["name"] == "facile"
    assert config["max_batch_size"] == server.core.get("facile").version.max_batch_size
    assert [i["name"] for i in config["input"]] == ["hits"]
    assert config["input"][0]["dims"] == [15]  # numbers, as Triton's (protobuf: ["15"])


_INT64 = st.integers(-(2**63), 2**63 - 1)
_UINT64 = st.integers(0, 2**64 - 1)


@given(
    dims=st.lists(st.lists(_INT64, max_size=4), max_size=3),
    delay=_UINT64,
    timeouts=st.dictionaries(_UINT64, _UINT64, max_size=3),
)
def test_config_json_has_64_bit_integers_as_numbers(
    dims: list[list[int]], delay: int, timeouts: dict[int, int]
) -> None:
    """Every int64/uint64 of a config, nested in messages, lists and maps (even a map's
    uint64 keys' values), is a JSON number; the JSON parses back to the same config."""
    config = model_config_pb2.ModelConfig(name="m")
    for i, shape in enumerate(dims):
        config.input.add(name=f"x{i}", data_type=model_config_pb2.TYPE_FP32, dims=shape)
    config.dynamic_batching.max_queue_delay_microseconds = delay
    for level, timeout in timeouts.items():
        policy = config.dynamic_batching.priority_queue_policy[level]
        policy.default_timeout_microseconds = timeout
    text = config_json(config)
    back = json.loads(json.dumps(text))
    assert json_format.ParseDict(back, model_config_pb2.ModelConfig()) == config
    numbers = [d for i in back.get("input", []) for d in i.get("dims", [])]
    batching = back.get("dynamic_batching", {})
    numbers += [batching.get("max_queue_delay_microseconds", 0)]
    numbers += [
        p.get("default_timeout_microseconds", 0)
        for p in batching.get("priority_queue_policy", {}).values()
    ]
    assert all(type(n) is int for n in numbers), numbers


def test_unknown_model_is_404_with_tritons_error_body(server: Server) -> None:
    for path in ("/v2/models/no_such_model", "/v2/models/no_such_model/config"):
        status, headers, body = call(server, "GET", path)
        assert status == 404
        assert headers["content-type"] == "application/json"
        assert "no_such_model" in error_of(body)
    status, _, body = call(server, "GET", "/v2/models/facile/versions/7")
    assert status == 404
    assert "version 7" in error_of(body)
    status, _, body = call(server, "GET", "/v2/models/no_such_model/stats")
    assert status == 404
    status, _, body = call(server, "GET", "/v2/models/no_such_model/ready")
    assert status == 400  # Triton: 400 {"error": "Model version not ready"}
    assert "no_such_model" in error_of(body)
    assert call(server, "GET", "/v2/no/such/endpoint")[0] == 404
    assert call(server, "GET", "/v2/models/facile/")[0] == 404  # not a redirect (Triton)
    for body in (b"{}", b"not JSON", _json_request()):  # the model first, whatever the body
        status, _, answer = call(server, "POST", "/v2/models/no_such_model/infer", body)
        assert status == 404
        assert "no_such_model" in error_of(answer)


def test_statistics_count_http_inferences(server: Server, client: th.InferenceServerClient) -> None:
    before = client.get_inference_statistics("identity")["model_stats"][0]
    client.infer("identity", infer_inputs(REQUESTS["identity"], binary=True))
    after = client.get_inference_statistics("identity", "1")["model_stats"][0]
    assert after["name"] == "identity"
    assert after["inference_count"] == before["inference_count"] + 4
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} >= {"facile", "identity", "toptag_cnn"}


def test_model_control_is_off_by_default(server: Server) -> None:
    """As Triton with --model-control-mode none: load and unload are refused, nothing moves."""
    for action in ("load", "unload"):
        status, _, data = call(server, "POST", f"/v2/repository/models/facile/{action}", b"{}")
        assert status == 400
        assert "model control mode" in error_of(data)
    assert call(server, "GET", "/v2/models/facile/ready")[0] == 200


def test_repository_index_load_unload(example_repository: Path) -> None:
    with http_server(example_repository, model_control="explicit") as server:
        client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            index = {e["name"]: e for e in client.get_model_repository_index()}
            assert index["facile"] == {
                "name": "facile",
                "version": "1",
                "state": "READY",
                "reason": "",
            }
            client.unload_model("facile")
            assert not client.is_model_ready("facile")
            index = {e["name"]: e for e in client.get_model_repository_index()}
            assert index["facile"] == {  # as Triton 2.51 answers, checked
                "name": "facile",
                "version": "1",
                "state": "UNAVAILABLE",
                "reason": "unloaded",
            }
            ready = {e["name"] for e in call_json(server, "/v2/repository/index", {"ready": True})}
            assert "facile" not in ready
            assert "identity" in ready
            client.load_model("facile")
            assert client.is_model_ready("facile")
            arrays = REQUESTS["facile"]
            result = client.infer("facile", infer_inputs(arrays, binary=True))
            expected = onnxruntime_outputs(server, "facile", arrays)["energy"]
            np.testing.assert_array_equal(result.as_numpy("energy"), expected)
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("no_such_model")
            assert caught.value.status() == "404"
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("facile", config='{"max_batch_size": 1}')
            assert caught.value.status() == "400"
            assert "config" in caught.value.message()
            for params in (b"[1]", b"5", b"true", b'"config"'):
                body = b'{"parameters": ' + params + b"}"
                status, _, data = call(server, "POST", "/v2/repository/models/facile/load", body)
                assert status == 400, params
                assert "parameters of the load request must be a JSON object" in error_of(data)
                assert "model 'facile'" in error_of(data)
        finally:
            client.close()


def call_json(server: Server, path: str, body: dict[str, Any]) -> Any:
    status, _, data = call(server, "POST", path, json.dumps(body).encode())
    assert status == 200, data
    return json.loads(data)


# -- inference -----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_infer_equals_onnxruntime(
    server: Server, client: th.InferenceServerClient, model: str, binary: bool
) -> None:
    arrays = REQUESTS[model]
    expected = onnxruntime_outputs(server, model, arrays)
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in expected]
    result = client.infer(model, infer_inputs(arrays, binary=binary), outputs=outputs)
    response = result.get_response()
    assert response["model_name"] == model
    assert response["model_version"] == "1"
    assert {"queue_ns", "compute_infer_ns"} <= set(response["parameters"])
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype
        if binary:
            np.testing.assert_array_equal(got, want)  # the same bytes
        else:  # JSON carries floats as decimal text: equal after rounding to float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        entry = next(o for o in response["outputs"] if o["name"] == name)
        assert entry["shape"] == list(want.shape)
        assert ("parameters" in entry) == binary


@pytest.mark.parametrize(
    ("request_algorithm", "response_algorithm"),
    [("gzip", "gzip"), ("deflate", "deflate"), ("gzip", None), (None, "deflate")],
)
def test_compressed_bodies(
    server: Server,
    client: th.InferenceServerClient,
    request_algorithm: str | None,
    response_algorithm: str | None,
) -> None:
    arrays = REQUESTS["identity"]
    result = client.infer(
        "identity",
        infer_inputs(arrays, binary=True),
        request_compression_algorithm=request_algorithm,
        response_compression_algorithm=response_algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"])


def test_async_clients(server: Server) -> None:
    """tritonclient.http's async_infer (gevent threads) and its asyncio client."""
    arrays = REQUESTS["toptag_cnn"]
    expected = onnxruntime_outputs(server, "toptag_cnn", arrays)["probabilities"]
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=4)
    try:
        pending = [
            client.async_infer("toptag_cnn", infer_inputs(arrays, binary=True)) for _ in range(8)
        ]
        for request in pending:
            np.testing.assert_array_equal(
                request.get_result(timeout=WAIT).as_numpy("probabilities"), expected
            )
    finally:
        client.close()

    async def run() -> list[np.ndarray]:
        aio = th_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            assert await aio.is_server_ready()
            assert (await aio.get_model_metadata("toptag_cnn"))["name"] == "toptag_cnn"
            results = await asyncio.gather(
                *(aio.infer("toptag_cnn", infer_inputs(arrays, binary=b)) for b in (True, False))
            )
            with pytest.raises(InferenceServerException) as caught:
                await aio.infer("no_such_model", infer_inputs(arrays, binary=True))
            assert caught.value.status() == "404"
            return [r.as_numpy("probabilities") for r in results]
        finally:
            await aio.close()

    binary, text = asyncio.run(asyncio.wait_for(run(), WAIT))
    np.testing.assert_array_equal(binary, expected)
    np.testing.assert_allclose(text, expected, rtol=1e-6, atol=1e-7)


def test_raw_json_inference_like_curl(server: Server) -> None:
    """A client without tritonclient: nested JSON data in, JSON data out."""
    hits = REQUESTS["facile"]["hits"][:2]
    body = {
        "id": "req-1",
        "inputs": [{"name": "hits", "shape": [2, 15], "datatype": "FP32", "data": hits.tolist()}],
        "outputs": [{"name": "energy"}],
    }
    status, headers, data = call(
        server,
        "POST",
        "/v2/models/facile/versions/1/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, data
    assert headers["content-type"] == "application/json"
    answer = json.loads(data)
    assert answer["id"] == "req-1"
    (output,) = answer["outputs"]
    assert output["name"] == "energy"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [2, 1]
    expected = onnxruntime_outputs(server, "facile", {"hits": hits})["energy"]
    np.testing.assert_allclose(
        np.array(output["data"], np.float32).reshape(2, 1), expected, rtol=1e-6
    )
    # the same request gzip-compressed, asking for a deflate answer
    status, headers, data = call(
        server,
        "POST",
        "/v2/models/facile/infer",
        gzip.compress(json.dumps(body).encode()),
        {"Content-Encoding": "gzip", "Accept-Encoding": "deflate"},
    )
    assert status == 200
    assert headers["content-encoding"] == "deflate"
    assert json.loads(zlib.decompress(data))["outputs"][0]["shape"] == [2, 1]


def _binary_request(values: np.ndarray, pad: int = 0) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor data extension by hand: a JSON header (``pad`` spaces
    longer), its length in a header, then the bytes; binary outputs asked for."""
    header = (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": list(values.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": values.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        + b" " * pad
    )
    return header + values.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def test_raw_binary_inference(server: Server) -> None:
    values = REQUESTS["identity"]["INPUT0"]
    status, headers, data = call(
        server, "POST", "/v2/models/identity/infer", *_binary_request(values)
    )
    assert status == 200, data
    length = int(headers["inference-header-content-length"])
    answer = json.loads(data[:length])
    (output,) = answer["outputs"]
    assert output["parameters"] == {"binary_data_size": values.nbytes}
    assert data[length:] == values.tobytes()


def test_binary_inputs_reach_onnxruntime_without_an_alignment_copy(server: Server) -> None:
    """The body is read into a buffer where the binary data starts 64-byte aligned, whatever
    the JSON header's length: onnxruntime views the tensor (the backend counts the copies
    it makes, `alignment_copies`), and the answer is the same bits."""
    values = REQUESTS["identity"]["INPUT0"]
    statistics = server.core.get("identity").statistics
    before = statistics.as_dict()["arrowinfer"]["alignment_copies"]
    for pad in (0, 1, 7, 33):
        body, sent = _binary_request(values, pad)
        status, headers, data = call(server, "POST", "/v2/models/identity/infer", body, sent)
        assert status == 200, data
        assert data[int(headers["inference-header-content-length"]) :] == values.tobytes()
    assert statistics.as_dict()["arrowinfer"]["alignment_copies"] == before


#: what an error about facile's input names
NAMED = ["model 'facile'", "input 'hits'"]


def _json_request(**tensor: Any) -> bytes:
    base = {"name": "hits", "shape": [1, 15], "datatype": "FP32", "data": [0.5] * 15}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


def _with(**request: Any) -> bytes:
    """A good facile request with these request-level fields added."""
    return json.dumps({**json.loads(_json_request()), **request}).encode()


def test_an_output_named_twice_is_answered_once(server: Server) -> None:
    """As Triton 2.51 (checked): not once per name, which let 4 KB of request ask for a
    201 MB JSON answer (the same output 48 times) built on the event loop."""
    outputs = [{"name": "energy"}] * 48 + [{"name": "energy", "parameters": {"binary_data": False}}]
    status, _, data = call(server, "POST", "/v2/models/facile/infer", _with(outputs=outputs))
    assert status == 200, data
    answer = json.loads(data)
    assert [o["name"] for o in answer["outputs"]] == ["energy"]
    assert len(answer["outputs"][0]["data"]) == 1


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"{not json", {}, ["not JSON"]),
        (b"[]", {}, ["JSON object"]),
        (_json_request(datatype="INT32", data=[1] * 15), {}, ["wrong datatype"]),
        (_json_request(shape=[1, 14], data=[0.5] * 14), {}, ["wrong shape"]),
        (_json_request(data=[0.5] * 14), {}, ["does not match the shape", *NAMED]),
        (
            _json_request(data=["a"] * 15),
            {},
            ["wrong kind", "expected numbers, got strings", *NAMED],
        ),
        (_json_request(datatype="BYTES", data=[1] * 15), {}, ["BYTES data must be strings"]),
        (_json_request(name="nope"), {}, ["unexpected input"]),
        (
            _json_request(parameters={"binary_data_size": 60}),
            {},
            ["got 'data' and 'binary_data_size'", *NAMED],
        ),
        (_json_request(parameters={"p": [1]}), {}, ["parameter 'p'", *NAMED]),
        (_json_request(shape=[1, -15]), {}, ["'shape'", *NAMED]),
        (_json_request(shape=[0, 2**62], data=[]), {}, ["wrong shape", *NAMED]),
        (_json_request(shape=[2**62, 0], data=[]), {}, ["shape", *NAMED]),
        (
            _with(outputs=[{"name": "energy", "parameters": {"classification": "2"}}]),
            {},
            ["output 'energy'", "integer", "'facile'", "got '2'"],
        ),
        (
            _json_request(),
            {"Inference-Header-Content-Length": "99999"},
            ["within the body", "model 'facile'"],
        ),
        (_json_request(), {"Inference-Header-Content-Length": "9" * 5000}, ["within the body"]),
        (_json_request(), {"Inference-Header-Content-Length": "\u00b2"}, ["within the body"]),
        (
            _json_request() + b"extra",
            {"Inference-Header-Content-Length": str(len(_json_request()))},
            ["left over"],
        ),
        (_json_request(), {"Content-Encoding": "gzip"}, ["does not decompress", "model 'facile'"]),
        (
            gzip.compress(_json_request()) + b"junk",
            {"Content-Encoding": "gzip"},
            ["after the end"],
        ),
        (_json_request(), {"Content-Encoding": "br"}, ["Content-Encoding"]),
        (
            json.dumps({"inputs": [], "outputs": [{"name": "energy"}]}).encode(),
            {},
            ["no inputs"],
        ),
        # JSON allows what protobuf cannot hold: the client's error (400), not a 500
        (_json_request(name="\ud800"), {}, ["cannot carry"]),
        (_json_request(shape=[2**63, 15]), {}, ["cannot carry"]),
        (_with(id="\ud800"), {}, ["cannot carry"]),
        (_with(parameters={"p": "\udc00"}), {}, ["cannot carry"]),
        (_with(parameters={"priority": 10**20}), {}, ["cannot carry"]),
        (_with(parameters={"priority": 1.5}), {}, ["'priority'", "integer", "got a float"]),
        (_with(parameters={"timeout": "1"}), {}, ["'timeout'", "integer", "'facile'"]),
        (_with(outputs=[{"name": "energy", "parameters": {"x": None}}]), {}, ["'x'", "'facile'"]),
        # Triton's answers, checked against it: true/false are not numbers, and an input
        # takes its data from one place
        (_json_request(data=[True] * 15), {}, ["wrong kind", "got true/false", *NAMED]),
        (_json_request(data=[0.5] * 14 + [False]), {}, ["got true/false", *NAMED]),
        (_json_request(data=[[0.5] * 14 + [True]]), {}, ["got true/false", *NAMED]),
        (
            _json_request(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 60}),
            {},
            ["one of 'data'", "got 'data' and 'shared_memory_region'", *NAMED],
        ),
        # parameters are objects (or absent), flags true/false, the id a string
        (_json_request(parameters=5), {}, ["parameters of the input", "JSON object", *NAMED]),
        (_json_request(parameters=False), {}, ["parameters of the input", *NAMED]),
        (_with(parameters=[]), {}, ["parameters of the request", "'facile'"]),
        (_with(id=7), {}, ["'id' must be a string", "'facile'"]),
        (_with(parameters={"binary_data_output": "false"}), {}, ["true or false", "'facile'"]),
        (
            _with(outputs=[{"name": "energy", "parameters": {"binary_data": 1}}]),
            {},
            ["'binary_data'", "true or false"],
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "hits",
                            "shape": [1, 15],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": "60"},
                        }
                    ]
                }
            ).encode(),
            {},
            ["binary_data_size must be an integer", *NAMED],
        ),
    ],
    ids=[
        "bad-json",
        "not-object",
        "datatype",
        "shape",
        "data-count",
        "data-kind",
        "bytes-kind",
        "input-name",
        "binary-size",
        "input-parameter",
        "negative-dim",
        "huge-empty-dims",
        "huge-empty-rows",
        "class-count-string",
        "header-length",
        "header-length-huge",
        "header-length-superscript",
        "binary-left-over",
        "bad-gzip",
        "gzip-trailing-data",
        "unknown-encoding",
        "no-inputs",
        "surrogate-name",
        "shape-beyond-int64",
        "surrogate-id",
        "surrogate-parameter",
        "parameter-beyond-int64",
        "priority-float",
        "timeout-string",
        "output-parameter",
        "data-true-false",
        "data-mixed-false",
        "data-nested-true",
        "data-and-shared-memory",
        "input-parameters-number",
        "input-parameters-false",
        "request-parameters-list",
        "id-number",
        "binary-data-output-string",
        "binary-data-number",
        "binary-data-size-string",
    ],
)
def test_bad_requests_are_400(
    server: Server, body: bytes, headers: dict[str, str], words: list[str]
) -> None:
    status, _, data = call(server, "POST", "/v2/models/facile/infer", body, headers)
    assert status == 400, data
    message = error_of(data)
    for word in words:
        assert word in message
    # the server keeps serving
    assert call(server, "POST", "/v2/models/facile/infer", _json_request())[0] == 200


def test_uint64_priority_as_tritonclient_sends_it(server: Server) -> None:
    """A priority beyond int64 (tritonclient writes priority as uint64) is a priority, as
    over gRPC; beyond 64 bits it cannot be one."""
    assert (
        call(server, "POST", "/v2/models/facile/infer", _with(parameters={"priority": 2**64 - 1}))[
            0
        ]
        == 200
    )
    assert (
        call(server, "POST", "/v2/models/facile/infer", _with(parameters={"priority": 2**64}))[0]
        == 400
    )


def test_nan_and_infinity_as_triton_reads_and_writes_them(
    server: Server, client: th.InferenceServerClient
) -> None:
    """JSON has no NaN or infinities; Triton reads and writes them as Python's json does
    (``NaN``, ``Infinity``, ``-Infinity``; triton-inference-server/server#3870), and a
    float beyond FP32 becomes infinite, as its cast does."""
    special = (["NaN", "Infinity", "-Infinity", "1e300", "-1e300", "0.5"] * 171)[:1024]
    data = ", ".join(special)
    body = (
        '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1024], '
        f'"data": [{data}]}}]}}'
    ).encode()
    status, _, answer = call(server, "POST", "/v2/models/identity/infer", body)
    assert status == 200, answer
    got = np.array(json.loads(answer)["outputs"][0]["data"], np.float32)
    with np.errstate(over="ignore"):  # 1e300: the cast Triton does
        want = np.array([float(v) for v in special]).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # NaN equals NaN here
    assert b"NaN" in answer  # written as Triton writes them
    assert b"-Infinity" in answer
    # tritonclient's JSON tensors say the same (it writes them with json.dumps)
    values = want.reshape(1, 1024)
    outputs = [th.InferRequestedOutput("OUTPUT0", binary_data=False)]
    result = client.infer(
        "identity", infer_inputs({"INPUT0": values}, binary=False), outputs=outputs
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values)


def _decoded(body: bytes) -> np.ndarray:
    """A JSON inference request's one input as the HTTP front end decodes it (raw bytes)."""
    header = parse_json(body, allow_nan=True)
    request, _ = infer_request("m", "", header, memoryview(b""))
    return np.frombuffer(request.raw[0], np.uint8)


@given(data=st.data(), kserve=st.sampled_from([d.kserve for d in DATATYPES]))
def test_json_tensors_decode_to_the_bits_of_their_values(data: st.DataObject, kserve: str) -> None:
    """Every numeric datatype: JSON values (written as tritonclient and json.dumps write
    them, NaN and infinities included) decode to the little-endian bytes of the values."""
    dtype = next(d.numpy for d in DATATYPES if d.kserve == kserve)
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    values = data.draw(hnp.arrays(dtype, shape))
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": kserve, "shape": list(shape), "data": values.tolist()}
            ]
        }
    ).encode()
    want = values.astype(dtype.newbyteorder("<"))
    got = _decoded(body).view(want.dtype).reshape(shape)
    if dtype.kind == "f":  # a NaN's payload is not JSON's to carry
        np.testing.assert_array_equal(got, want)
    else:
        assert got.tobytes() == want.tobytes()


@given(
    kserve=st.sampled_from([d.kserve for d in DATATYPES if d.numpy.kind in "iu"]),
    value=st.integers(-(2**70), 2**70),
)
def test_json_integers_beyond_their_datatype_are_refused(kserve: str, value: int) -> None:
    info = np.iinfo(next(d.numpy for d in DATATYPES if d.kserve == kserve))
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": kserve, "shape": [1], "data": [value]}]}
    ).encode()
    if info.min <= value <= info.max:
        assert int(_decoded(body).view(f"<{np.dtype(info.dtype).str[1:]}")[0]) == value
    else:
        with pytest.raises(InvalidInput) as caught:
            _decoded(body)
        assert (caught.value.model, caught.value.input) == ("m", "x")


#: A request parameter's value, as both tritonclients send them (int64 or uint64 ints)
_PARAMETER = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),  # int64
    st.integers(2**63, 2**64 - 1),  # beyond it: uint64
    st.floats(allow_nan=False),
    st.text(max_size=8),
)


@given(
    data=st.data(),
    kserves=st.lists(st.sampled_from([d.kserve for d in DATATYPES]), min_size=1, max_size=3),
    params=st.dictionaries(st.text(min_size=1, max_size=6), _PARAMETER, max_size=3),
    request_id=st.text(max_size=8),
    class_count=st.integers(0, 3),
)
def test_http_and_grpc_describe_one_request_alike(
    data: st.DataObject,
    kserves: list[str],
    params: dict[str, Any],
    request_id: str,
    class_count: int,
) -> None:
    """A request as tritonclient.http writes it (JSON or binary tensors) and as a gRPC
    ``ModelInferRequest`` says it decode to the same request: names, datatypes, shapes,
    parameters (an int the same whether int64 or uint64) and each input's bytes."""
    from tritonclient.grpc import service_pb2 as pb

    from arrowinfer.server._v2request import from_protobuf

    params.pop("binary_data_output", None)  # HTTP's own: not passed on
    grpc = pb.ModelInferRequest(model_name="m", id=request_id)
    http_inputs = []
    for i, kserve in enumerate(kserves):
        dtype = next(d.numpy for d in DATATYPES if d.kserve == kserve)
        shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=3))
        values = data.draw(hnp.arrays(dtype, shape, elements={"allow_nan": False}))
        tensor = th.InferInput(f"in{i}", list(shape), kserve)
        tensor.set_data_from_numpy(values, binary_data=data.draw(st.booleans()))
        http_inputs.append(tensor)
        grpc.inputs.add(name=f"in{i}", datatype=kserve, shape=shape)
        grpc.raw_input_contents.append(values.astype(dtype.newbyteorder("<")).tobytes())
    output = th.InferRequestedOutput("out", binary_data=True, class_count=class_count)
    requested = grpc.outputs.add(name="out")
    if class_count:
        requested.parameters["classification"].int64_param = class_count
    for key, value in params.items():
        set_parameter(grpc.parameters[key], value)
    body, header_length = th.InferenceServerClient.generate_request_body(
        http_inputs, [output], request_id=request_id, parameters=params
    )
    length = len(body) if header_length is None else header_length
    header = parse_json(body[:length], allow_nan=True)
    over_http, _ = infer_request("m", "", header, memoryview(body)[length:])
    over_grpc = from_protobuf(grpc)
    assert _described(over_http) == _described(over_grpc)
    assert [bytes(raw) for raw in over_http.raw] == [bytes(raw) for raw in over_grpc.raw]


def _described(request: Any) -> Any:
    """An ``InferRequest`` but its data, each parameter with its type (1 == 1.0 in Python)."""

    def typed(params: dict[str, Any]) -> list[tuple[str, str, Any]]:
        return sorted((key, type(value).__name__, value) for key, value in params.items())

    return (
        request.model_name,
        request.model_version,
        request.id,
        typed(request.parameters),
        [(t.name, t.datatype, t.shape, typed(t.parameters), t.contents) for t in request.inputs],
        [(o.name, typed(o.parameters)) for o in request.outputs],
    )


#: Any JSON value, a few levels deep: what a client may put where the protocol wants another
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=200)  # each part must be well formed for the later checks to run
@given(
    params=st.dictionaries(st.sampled_from(["priority", "timeout", "x"]), _ANY_JSON, max_size=2),
    tensor_params=st.dictionaries(st.just("y"), _ANY_JSON, max_size=1),
    outputs=st.one_of(
        st.dictionaries(
            st.sampled_from(["classification", "binary_data", "z"]), _ANY_JSON, max_size=2
        ).map(lambda p: [{"name": "energy", "parameters": p}]),
        st.lists(_ANY_JSON, max_size=2),
    ),
    request_id=_ANY_JSON,
)
def test_any_json_in_the_request_is_200_or_400(
    server: Server,
    params: dict[str, Any],
    tensor_params: dict[str, Any],
    outputs: list[Any],
    request_id: Any,
) -> None:
    """Whatever JSON values stand in a request's parameters, its input's parameters, its
    outputs and its id, the server answers 200 or a 400 that says what is wrong (never a
    500, a traceback or a path), and goes on serving."""
    tensor = {"name": "hits", "shape": [1, 15], "datatype": "FP32", "data": [0.5] * 15}
    if tensor_params:
        tensor["parameters"] = tensor_params
    header = {"id": request_id, "parameters": params, "inputs": [tensor], "outputs": outputs}
    body = json.dumps(header).encode()
    status, _, answer = call(server, "POST", "/v2/models/facile/infer", body)
    assert status in (200, 400), answer
    if status == 400:
        message = error_of(answer)
        for leak in ("Traceback", "site-packages", "pytest-of", "arrowinfer/"):  # no paths
            assert leak not in message
    ready, _, _ = call(server, "GET", "/v2/health/ready")
    assert ready == 200


def test_good_clients_beside_bad_ones_get_exact_results(server: Server) -> None:
    """Well-behaved clients (their requests run alone on the event loop or batched on the
    batcher's thread, as they happen to arrive) get their own rows, bit for bit, while
    others send malformed requests to the same model at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    good_rng = np.random.default_rng(7)
    requests = [
        good_rng.normal(size=(int(good_rng.integers(1, 4)), 1024)).astype(np.float32)
        for _ in range(80)
    ]
    one_row = requests[0][:1]
    body, headers = _binary_request(one_row)
    too_few = {"name": "INPUT0", "shape": [1, 1024], "datatype": "FP32", "data": [0.5] * 1000}
    bad = [
        (body[:-8], headers),  # binary data shorter than its binary_data_size
        _binary_request(one_row[:, :1023]),  # the wrong shape per entry
        (json.dumps({"inputs": [too_few]}).encode(), {}),  # fewer values than the shape
    ]

    def good(x: np.ndarray) -> bool:
        client = th.InferenceServerClient(
            f"127.0.0.1:{server.http_port}", connection_timeout=WAIT, network_timeout=WAIT
        )
        try:
            tensor = th.InferInput("INPUT0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            out = client.infer("identity", [tensor]).as_numpy("OUTPUT0")
            return out.tobytes() == x.tobytes()
        finally:
            client.close()

    def malformed(i: int) -> int:
        body, extra = bad[i % len(bad)]
        return call(server, "POST", "/v2/models/identity/infer", body, extra)[0]

    with ThreadPoolExecutor(6) as pool:
        bad_answers = pool.map(malformed, range(60))
        good_answers = pool.map(good, requests)
        assert list(good_answers) == [True] * len(requests)
        assert list(bad_answers) == [400] * 60


@pytest.mark.parametrize("bound", ["http_max_input_size", "max_request_bytes"])
def test_request_size_is_bounded(example_repository: Path, bound: str) -> None:
    """Bodies beyond --http-max-input-size (or --max-request-bytes, the smaller wins),
    compressed or decompressed, are refused."""
    options = {bound: 64 * 1024}
    with http_server(example_repository, models=["facile"], **options) as server:
        small = _json_request()
        assert call(server, "POST", "/v2/models/facile/infer", small)[0] == 200
        big = small + b" " * (64 * 1024)
        status, _, data = call(server, "POST", "/v2/models/facile/infer", big)
        assert status == 400
        assert "too large" in error_of(data)
        assert "--http-max-input-size" in error_of(data)
        bomb = gzip.compress(small[:-1] + b" " * (10 * 2**20) + b"}")  # ~10 KiB compressed
        assert len(bomb) < 64 * 1024
        status, _, data = call(
            server, "POST", "/v2/models/facile/infer", bomb, {"Content-Encoding": "gzip"}
        )
        assert status == 400
        assert "decompressed, the request body is too large" in error_of(data)


def test_http_max_input_size_is_tritons_64_mib_by_default(example_repository: Path) -> None:
    """A body declared one byte beyond 64 MiB is refused before it is read."""
    assert HTTP_MAX_INPUT_SIZE == 64 * 2**20
    with http_server(example_repository, models=["identity"]) as server:
        for declared, status in ((HTTP_MAX_INPUT_SIZE + 1, 400), (2, 400)):
            connection = HTTPConnection("127.0.0.1", server.http_port, timeout=WAIT)
            try:
                connection.putrequest("POST", "/v2/models/identity/infer")
                connection.putheader("Content-Length", str(declared))
                connection.endheaders(b"{}")
                answer = connection.getresponse()
                assert answer.status == status
                message = error_of(answer.read())
            finally:
                connection.close()
            assert ("too large" in message) == (declared > HTTP_MAX_INPUT_SIZE), message


def _partial_request(server: Server, declared: int) -> socket.socket:
    """A connection that declares a body of ``declared`` bytes and sends one."""
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT)
    sock.sendall(
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n{" % declared
    )
    return sock


def test_memory_follows_the_body_not_its_declared_length(server: Server) -> None:
    """Clients that declare large bodies and send nothing more cost the server nothing:
    the body is stored as it arrives, not allocated on the word of Content-Length."""
    pool = pa.default_memory_pool()
    before = pool.bytes_allocated()
    held = [_partial_request(server, 256 * 2**20) for _ in range(4)]
    try:
        # answered after the event loop has read the four requests' headers
        assert call(server, "POST", "/v2/models/facile/infer", _json_request())[0] == 200
        assert pool.bytes_allocated() - before < 64 * 2**20
    finally:
        for sock in held:
            sock.close()


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(server: Server) -> None:
    """A connection idle for longer than uvicorn's default keep-alive (5 s) still answers:
    tritonclient.http does not retry a POST that crosses the server's close, so clients
    that pause about that long between requests failed with "connection closed". The
    pause is the point of the test, not a wait for a condition."""
    http = HTTPConnection("127.0.0.1", server.http_port, timeout=WAIT)
    try:
        for pause in (0.0, 6.0):
            threading.Event().wait(pause)
            http.request("POST", "/v2/models/facile/infer", _json_request())
            response = http.getresponse()
            assert response.status == 200, response.read()
            assert json.loads(response.read())["outputs"]
    finally:
        http.close()


def test_a_client_gone_mid_body_is_no_error(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="arrowinfer.server._http")
    _partial_request(server, 1024).close()
    stop = threading.Event()
    for _ in range(int(WAIT * 20)):
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        stop.wait(0.05)
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_cuda_shared_memory_is_501(server: Server) -> None:
    """Registering is 501; there are no CUDA regions to list or unregister (raw HTTP: the
    tritonclient calls are in test_system_shm.py)."""
    for path in ("/v2/cudasharedmemory/region/r/register", "/v2/cudasharedmemory/other"):
        status, _, data = call(server, "POST", path, b"{}")
        assert status == 501, path
        assert "CUDA shared memory is not supported" in error_of(data)
    status, _, data = call(server, "GET", "/v2/cudasharedmemory/status")
    assert (status, json.loads(data)) == (200, [])
    status, _, data = call(server, "GET", "/v2/cudasharedmemory/region/r/status")
    assert status == 404  # Triton's NOT_FOUND
    assert "no region 'r' is registered" in error_of(data)
    for path in ("/v2/cudasharedmemory/unregister", "/v2/cudasharedmemory/region/r/unregister"):
        assert call(server, "POST", path, b"")[0] == 200, path


# -- TLS and bearer tokens -------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key (PEM files)."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS tests need the openssl command"
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.parametrize("written", ["+1", "%201", "1%20", "%E0%A5%A7", "1.0", "0x1", "1_0"])
def test_a_version_is_ascii_digits(server: Server, written: str) -> None:
    """Version 1 is "1" (or "01", as Triton's stol reads it), not " 1", "+1" or another
    script's digit one (Python's int() takes all three): 404 / NOT_FOUND, over both."""
    assert call(server, "GET", "/v2/models/facile/versions/01")[0] == 200
    status, _, body = call(server, "GET", f"/v2/models/facile/versions/{written}")
    assert status == 404, written
    assert "facile" in error_of(body)
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    version = urllib.parse.unquote(written)
    with grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(
                pb.ModelMetadataRequest(name="facile", version=version), timeout=WAIT
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, version


def test_inference_paths_answer_as_the_router_would(server: Server) -> None:
    """Inference requests skip Starlette's router (_InferenceFirst): the same paths answer,
    versioned or not, and what the router answered before is still answered."""
    body = _json_request()
    assert call(server, "POST", "/v2/models/facile/infer", body)[0] == 200
    assert call(server, "POST", "/v2/models/facile/versions/1/infer", body)[0] == 200
    status, _, data = call(server, "POST", "/v2/models/facile/versions/9/infer", body)
    assert status == 404
    assert "facile" in error_of(data)
    status, _, data = call(server, "GET", "/v2/models/facile/infer")
    assert status == 405
    assert "GET" in error_of(data)
    assert call(server, "POST", "/v2/models/facile/infer/more", body)[0] == 404
    assert call(server, "POST", "/v2/models//infer", body)[0] == 404


def test_concurrent_requests_are_batched(example_repository: Path) -> None:
    """Requests that arrive together batch as over the other protocols (Triton's dynamic
    batching), whether on the event loop's thread or the batcher's."""
    arrays = {"hits": REQUESTS["facile"]["hits"][:1]}
    expected = None

    async def run() -> list[np.ndarray]:
        aio = th_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            results = await asyncio.gather(
                *(aio.infer("facile", infer_inputs(arrays, binary=True)) for _ in range(64))
            )
            return [r.as_numpy("energy") for r in results]
        finally:
            await aio.close()

    with http_server(example_repository, models=["facile"]) as server:
        expected = onnxruntime_outputs(server, "facile", arrays)["energy"]
        for result in asyncio.run(asyncio.wait_for(run(), WAIT)):
            np.testing.assert_array_equal(result, expected)
        stats = server.core.statistics("facile")[0]
        assert stats["inference_count"] == 64
        assert stats["execution_count"] < 64  # some ran together


def test_requests_of_one_turn_of_the_event_loop_run_together_on_its_thread(
    example_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests the event loop converts in one turn are submitted together: a quick model
    runs them as one batch on the loop's own thread (no hand-off to the batcher's thread
    and back), and each gets its own rows. Driven in-process, so the turn is certain."""
    from arrowinfer.repository import Repository
    from arrowinfer.server import _http
    from arrowinfer.server._core import InferenceCore

    # however busy the machine (the thresholds: test_a_slow_model_never_holds_the_event_loop,
    # test_a_model_that_held_the_event_loop_never_runs_there_again); a cold first run can
    # take over _LOOP_HELD_NS on a loaded machine
    monkeypatch.setattr(_http, "_LOOP_RUN_NS", 10**10)
    monkeypatch.setattr(_http, "_LOOP_HELD_NS", 10**11)
    core = InferenceCore(Repository(example_repository), models=["identity"])
    app = _http.application(core)
    batcher = core.get("identity").batcher
    backend = batcher._backends[0]
    threads: list[int] = []
    execute = backend.execute

    def recorded(requests: Any) -> Any:
        threads.append(threading.get_ident())
        return execute(requests)

    monkeypatch.setattr(backend, "execute", recorded)

    async def infer(value: float) -> tuple[int, np.ndarray]:
        x = np.full((1, 1024), value, np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "shape": [1, 1024],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + x.tobytes()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v2/models/identity/infer",
            "query_string": b"",
            "headers": [
                (b"inference-header-content-length", b"%d" % len(header)),
                (b"content-length", b"%d" % len(body)),
            ],
            "client": ("127.0.0.1", 5000),
        }
        await app(scope, receive, send)
        answer = b"".join(m.get("body", b"") for m in sent[1:])
        length = int(dict(sent[0]["headers"])[b"inference-header-content-length"])
        return sent[0]["status"], np.frombuffer(answer[length:], np.float32)

    async def run() -> tuple[int, list[tuple[int, np.ndarray]], list[dict[str, Any]]]:
        await infer(-1.0)  # the model's first run: its time per row is known from now on
        # its answer comes before the batcher's thread lets go of the instance; the turn
        # below runs on the loop only if the instance is idle by then
        deadline = time.monotonic() + WAIT
        while batcher._running and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        threads.clear()
        before = core.statistics("identity")[0]
        answers = await asyncio.gather(*(infer(float(i)) for i in range(8)))
        return threading.get_ident(), answers, [before, core.statistics("identity")[0]]

    try:
        loop_thread, answers, (before, after) = asyncio.run(asyncio.wait_for(run(), WAIT))
    finally:
        core.close()
    for i, (status, values) in enumerate(answers):
        assert status == 200
        np.testing.assert_array_equal(values, np.full(1024, i, np.float32))
    assert threads == [loop_thread]  # one execution, on the loop's thread
    assert after["execution_count"] - before["execution_count"] == 1
    assert after["inference_count"] - before["inference_count"] == 8


def _sleepy(repository: Path) -> None:
    """``sleepy`` in ``repository``: a model whose time is its input's (test_queue_policy)."""
    from test_queue_policy import sleepy_model

    (repository / "sleepy" / "1").mkdir(parents=True)
    onnx.save(sleepy_model(), str(repository / "sleepy" / "1" / "model.onnx"))
    (repository / "sleepy" / "config.pbtxt").write_text(
        "max_batch_size: 0\n"
        'input [ { name: "n" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


def _sleep_for(seconds: float) -> bytes:
    from test_queue_policy import slow_trips_for

    trips = slow_trips_for(seconds) if seconds else 1
    return json.dumps(
        {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [trips]}]}
    ).encode()


def _loop_answers_while_it_runs(server: Server, body: bytes) -> None:
    """Send ``body`` to sleepy from another thread; while the model computes it, the event
    loop answers a health check."""
    batcher = server.core.get("sleepy").batcher
    answer: list[int] = []
    worker = threading.Thread(
        target=lambda: answer.append(call(server, "POST", "/v2/models/sleepy/infer", body)[0])
    )
    worker.start()
    try:
        deadline = time.monotonic() + WAIT
        while batcher.running == 0:  # the slow request has an instance
            assert time.monotonic() < deadline, "the slow request never ran"
            time.sleep(0.001)
        assert call(server, "GET", "/v2/health/live")[0] == 200
        assert batcher.running == 1  # answered while the model still computed
    finally:
        worker.join(WAIT)
    assert answer == [200]


def test_a_slow_model_never_holds_the_event_loop(tmp_path: Path) -> None:
    """A request runs on the event loop's thread only when its model's latest execution was
    quick: while a slow model computes, the loop still answers everyone else."""
    _sleepy(tmp_path)
    slow = _sleep_for(0.5)
    with http_server(tmp_path) as server:
        batcher = server.core.get("sleepy").batcher
        assert call(server, "POST", "/v2/models/sleepy/infer", slow)[0] == 200  # now known slow
        expected = batcher.expected_ns(1)
        assert expected is not None
        assert expected > 10**8
        _loop_answers_while_it_runs(server, slow)


def test_a_model_that_held_the_event_loop_never_runs_there_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose time depends on its data, not its rows: after a quick request a slow
    one looks quick, and runs on the event loop's thread, once. From then on the model's
    requests run on the batcher's thread, however quick its latest run."""
    from arrowinfer.server import _http

    # "quick" however busy the machine; held: over _LOOP_HELD_NS (10 ms)
    monkeypatch.setattr(_http, "_LOOP_RUN_NS", 5 * 10**7)
    _sleepy(tmp_path)
    quick, slow = _sleep_for(0), _sleep_for(0.1)
    with http_server(tmp_path) as server:
        for body in (quick, quick, slow, quick):  # the first ever runs on the batcher's thread
            assert call(server, "POST", "/v2/models/sleepy/infer", body)[0] == 200
        assert "model 'sleepy' held the event loop" in caplog.text
        expected = server.core.get("sleepy").batcher.expected_ns(1)
        assert expected is not None
        assert expected < _http._LOOP_RUN_NS  # the latest run was quick again
        _loop_answers_while_it_runs(server, _sleep_for(0.5))


# geventhttpclient <= 2.0.2 (all that tritonclient[http] 2.44, the floor, allows) opens TLS
# with ssl.PROTOCOL_TLS and checks the host with ssl.match_hostname, both deprecated since
# Python 3.10; the geventhttpclient of later tritonclient (2.6) does neither. Those two
# warnings, raised from there only, are not this test's.
@pytest.mark.filterwarnings(
    "ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning:gevent.ssl",
    r"ignore:ssl.match_hostname\(\) is deprecated:DeprecationWarning:geventhttpclient",
)
def test_tls_and_bearer_tokens(example_repository: Path, certificate: tuple[Path, Path]) -> None:
    import ssl

    cert, key = certificate
    with http_server(
        example_repository, models=["facile"], tls_cert=cert, tls_key=key, auth_tokens={TOKEN}
    ) as server:
        context = ssl.create_default_context(cafile=str(cert))
        status, headers, data = call(
            server, "GET", "/v2/health/ready", scheme="https", context=context
        )
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert "bearer token" in error_of(data)
        wrong = {"Authorization": "Bearer not-the-token"}
        assert call(server, "GET", "/v2", None, wrong, scheme="https", context=context)[0] == 401
        status, _, data = call(
            server,
            "POST",
            "/v2/models/facile/infer",
            _json_request(),
            scheme="https",
            context=context,
        )
        assert status == 401
        assert server.core.statistics("facile")[0]["inference_count"] == 0  # nothing ran
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (
            call(server, "GET", "/v2/health/ready", None, good, scheme="https", context=context)[0]
            == 200
        )
        client = th.InferenceServerClient(
            f"127.0.0.1:{server.http_port}",
            ssl=True,
            ssl_options={"ca_certs": str(cert)},
        )
        try:
            arrays = {"hits": REQUESTS["facile"]["hits"]}
            result = client.infer("facile", infer_inputs(arrays, binary=True), headers=good)
            expected = onnxruntime_outputs(server, "facile", arrays)["energy"]
            np.testing.assert_array_equal(result.as_numpy("energy"), expected)
        finally:
            client.close()
        with pytest.raises(OSError, match="closed connection"):  # plain HTTP to a TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2", timeout=WAIT)


@pytest.mark.parametrize("pool", [True, False])
def test_the_benchmarks_http_clients_get_the_identity_back(server: Server, pool: bool) -> None:
    """``arrowinfer bench``'s tritonclient.http submit, pooled and inline (the Triton peer's
    way: the future comes back resolved), both over the real server."""
    from arrowinfer.bench.transports import _kserve_http

    x = np.random.default_rng(5).random((3, 1024), dtype=np.float32)
    submit, cleanup = _kserve_http(
        f"127.0.0.1:{server.http_port}", "identity", x, "INPUT0", "OUTPUT0", binary=True, pool=pool
    )
    try:
        future = submit()
        if not pool:
            assert future.done()  # resolved before submit returned
        np.testing.assert_array_equal(future.result(timeout=WAIT), x)
    finally:
        cleanup()


def _raw_exchange(server: Server, data: bytes) -> bytes:
    """``data`` written to the HTTP port; every byte the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_request_head_is_bounded(server: Server) -> None:
    """httptools joins a header's pieces by concatenation (quadratic: a 160 MiB header held
    the event loop for seconds at a time): a head over 64 KiB is answered 431 and closed,
    while heads below it, and requests after it on other connections, are served."""
    from arrowinfer.server._request_head import MAX_HEAD_BYTES

    def get(header_bytes: int) -> bytes:
        head = (
            b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-big: "
            + b"a" * header_bytes
            + b"\r\nconnection: close\r\n\r\n"
        )
        return _raw_exchange(server, head)

    assert get(MAX_HEAD_BYTES // 2).startswith(b"HTTP/1.1 200")
    for size in (MAX_HEAD_BYTES + 1, 16 * 2**20):
        answer = get(size)
        assert answer.startswith(b"HTTP/1.1 431"), size
        assert b"headers are too large" in answer
    # a body far larger than the bound is no head: served
    body = json.dumps({"pad": "x" * (4 * MAX_HEAD_BYTES)}).encode()
    request = (
        b"POST /v2/repository/index HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    assert _raw_exchange(server, request).startswith(b"HTTP/1.1 200")
    assert call(server, "GET", "/v2/health/live")[0] == 200


def test_classification_is_formatted_off_the_event_loop(
    server: Server, client: th.InferenceServerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """class_count formats one string per row and class in Python: seconds for a large
    output (a 16 MiB request asking for 1,024 classes held the loop 5.5 s, every other
    client waiting). It is built in a worker thread, never on the loop's."""
    from arrowinfer.server import _v2tensors

    threads: list[str] = []
    classified = _v2tensors._classified

    def recorded(*args: Any) -> list[bytes]:
        threads.append(threading.current_thread().name)
        return classified(*args)

    monkeypatch.setattr(_v2tensors, "_classified", recorded)
    x = np.random.default_rng(1).standard_normal((3, 1024), dtype=np.float32)
    tensor = th.InferInput("INPUT0", [3, 1024], "FP32")
    tensor.set_data_from_numpy(x)
    for binary in (True, False):
        wanted = th.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=2)
        result = client.infer("identity", [tensor], outputs=[wanted])
        top = result.as_numpy("OUTPUT0")
        assert top.shape == (3, 2)
        best = [(v.decode() if isinstance(v, bytes) else v).split(":")[1] for v in top[:, 0]]
        assert [int(i) for i in best] == list(np.argmax(x, axis=1))
    assert len(threads) == 2
    assert "kserve-http" not in threads  # the loop's thread (start_http names it)
