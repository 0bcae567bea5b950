"""The KServe v2 gRPC front end, through tritonclient and the generated stub.

Real servers on ephemeral loopback ports, no mocks. Every inference result is compared bit
for bit with the same request through the Flight path: both protocols adapt one core.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tg_aio
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from arrowinfer.client import Client
from arrowinfer.examples import IR_VERSION, OPSET
from arrowinfer.server import Server
from arrowinfer.server._v2tensors import InferAnswer, OutputTensor
from arrowinfer.tensors import Ragged, to_numpy

WAIT = 30.0  # seconds any one answer may take: bounds every test, never a sleep

rng = np.random.default_rng(20240601)

#: One request per model: its inputs (batch first) and its outputs' per-row dims.
REQUESTS: dict[str, tuple[dict[str, np.ndarray], dict[str, list[int]]]] = {
    "facile": (
        {"hits": rng.normal(size=(7, 15)).astype(np.float32)},
        {"energy": [1]},
    ),
    "toptag_cnn": (
        {"image": np.abs(rng.normal(size=(3, 1, 37, 37))).astype(np.float32)},
        {"probabilities": [2]},
    ),
    "identity": (
        {"INPUT0": rng.normal(size=(4, 1024)).astype(np.float32)},
        {"OUTPUT0": [1024]},
    ),
}


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def triton(server: Server) -> Iterator[tg.InferenceServerClient]:
    client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    try:
        yield client
    finally:
        client.close()


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[tg.InferInput]:
    out = []
    for name, array in arrays.items():
        tensor = tg.InferInput(name, list(array.shape), _kserve_type(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _kserve_type(dtype: np.dtype) -> str:
    return {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}[
        np.dtype(dtype).name
    ]


def flight_outputs(server: Server, model: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    with Client(server.location) as client:
        result = client.infer(model, arrays)
    return {name: to_numpy(result.column(name)) for name in result.schema.names}


def assert_same_bits(kserve: np.ndarray, flight: np.ndarray, dims: list[int]) -> None:
    """KServe's ``[batch, *dims]`` tensor holds exactly the bytes of Flight's column."""
    assert kserve.shape == (len(flight), *dims)
    assert kserve.dtype == flight.dtype
    assert kserve.tobytes() == flight.tobytes()


def assert_like_flight(server: Server, model: str, result: tg.InferResult) -> None:
    arrays, dims = REQUESTS[model]
    expected = flight_outputs(server, model, arrays)
    assert [o.name for o in result.get_response().outputs] == list(dims)
    for name, per_row in dims.items():
        assert_same_bits(result.as_numpy(name), expected[name], per_row)


def status(err: InferenceServerException) -> str:
    return str(err.status())


def collector() -> tuple[Callable[..., None], queue.Queue[tuple[Any, Any]]]:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def callback(result: Any, error: Any) -> None:
        results.put((result, error))

    return callback, results


# -- health, metadata, config, repository ------------------------------------------------


def test_health(triton: tg.InferenceServerClient) -> None:
    assert triton.is_server_live(client_timeout=WAIT)
    assert triton.is_server_ready(client_timeout=WAIT)
    assert triton.is_model_ready("facile", client_timeout=WAIT)
    assert triton.is_model_ready("facile", "1", client_timeout=WAIT)
    assert not triton.is_model_ready("facile", "7", client_timeout=WAIT)
    assert not triton.is_model_ready("no_such_model", client_timeout=WAIT)


def test_server_metadata(triton: tg.InferenceServerClient) -> None:
    import arrowinfer

    meta = triton.get_server_metadata(as_json=True, client_timeout=WAIT)
    assert meta["name"] == "arrowinfer"
    assert meta["version"] == arrowinfer.__version__
    assert {"model_repository", "statistics"} <= set(meta["extensions"])


def test_model_metadata(triton: tg.InferenceServerClient) -> None:
    meta = triton.get_model_metadata("toptag_cnn", client_timeout=WAIT)
    assert meta.name == "toptag_cnn"
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "FP32", [-1, 1, 37, 37])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 2])
    ]
    # a ragged model shows the padded tensors it takes over KServe, and its mask
    tagger = triton.get_model_metadata("jet_tagger", as_json=True, client_timeout=WAIT)
    assert [(t["name"], t["shape"]) for t in tagger["inputs"]] == [
        ("points", ["-1", "100", "2"]),
        ("features", ["-1", "100", "7"]),
        ("mask", ["-1", "100", "1"]),
    ]


def _padded_jets(counts: list[int]) -> dict[str, np.ndarray]:
    """Jets padded to 100 constituents with 0 (the model's pad value), and their mask."""
    n = len(counts)
    real = np.arange(100) < np.asarray(counts)[:, None]
    points = rng.normal(size=(n, 100, 2)).astype(np.float32) * real[..., None]
    features = rng.normal(size=(n, 100, 7)).astype(np.float32) * real[..., None]
    return {"points": points, "features": features, "mask": real[..., None].astype(np.float32)}


def test_ragged_model_takes_the_padded_tensors_its_metadata_shows(
    server: Server, triton: tg.InferenceServerClient
) -> None:
    counts = [3, 100, 0, 41]
    jets = _padded_jets(counts)
    with Client(server.location) as client:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        real = jets["mask"][..., 0].astype(bool)
        lists = {name: Ragged(offsets, jets[name][real]) for name in ("points", "features")}
        want = to_numpy(client.infer("jet_tagger", lists).column("probabilities"))
    # with the mask: the real constituents as the Flight lists have them
    got = triton.infer("jet_tagger", infer_inputs(jets), client_timeout=WAIT)
    np.testing.assert_array_equal(got.as_numpy("probabilities"), want)
    # without it every position is real: the same as 100 constituents per jet over Flight
    full = {k: v for k, v in jets.items() if k != "mask"}
    got = triton.infer("jet_tagger", infer_inputs(full), client_timeout=WAIT)
    with Client(server.location) as client:
        every = {
            k: Ragged(np.arange(5, dtype=np.int32) * 100, v.reshape(400, -1))
            for k, v in full.items()
        }
        want_full = to_numpy(client.infer("jet_tagger", every).column("probabilities"))
    np.testing.assert_array_equal(got.as_numpy("probabilities"), want_full)
    assert np.all(np.isfinite(want_full))


def test_model_config(triton: tg.InferenceServerClient) -> None:
    config = triton.get_model_config("facile", client_timeout=WAIT).config
    assert config.name == "facile"
    assert config.max_batch_size == 16384
    assert [i.name for i in config.input] == ["hits"]
    assert list(config.input[0].dims) == [15]
    assert [o.name for o in config.output] == ["energy"]
    assert config.HasField("dynamic_batching")
    as_json = triton.get_model_config("identity", as_json=True, client_timeout=WAIT)
    assert as_json["config"]["max_batch_size"] == 16384


def test_repository_index(triton: tg.InferenceServerClient) -> None:
    index = triton.get_model_repository_index(as_json=True, client_timeout=WAIT)["models"]
    assert {m["name"] for m in index} == {
        "facile",
        "identity",
        "jet_tagger",
        "toptag_cnn",
        "track_sum",
    }
    assert {m["state"] for m in index} == {"READY"}
    assert all(m["version"] == "1" for m in index)


def test_statistics_grow_with_requests(triton: tg.InferenceServerClient) -> None:
    def stats() -> dict[str, Any]:
        response = triton.get_inference_statistics("identity", as_json=True, client_timeout=WAIT)
        (model,) = response["model_stats"]
        return model

    before = stats()
    assert before["name"] == "identity"
    assert before["version"] == "1"
    arrays, _ = REQUESTS["identity"]
    triton.infer("identity", infer_inputs(arrays), client_timeout=WAIT)
    after = stats()
    # Triton's field names; protobuf's JSON writes 64-bit counts as strings, 0 not at all
    rows = len(arrays["INPUT0"])
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + rows
    assert int(after["execution_count"]) == int(before.get("execution_count", 0)) + 1
    success = after["inference_stats"]["success"]
    assert (
        int(success["count"])
        == int(before.get("inference_stats", {}).get("success", {}).get("count", 0)) + 1
    )
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(after["inference_stats"][key]["ns"]) > 0
    assert any(int(b["batch_size"]) == rows for b in after["batch_stats"])
    assert int(after["last_inference"]) > 0
    every = triton.get_inference_statistics(client_timeout=WAIT).model_stats
    assert {s.name for s in every} == {
        "facile",
        "identity",
        "jet_tagger",
        "toptag_cnn",
        "track_sum",
    }


# -- inference: tritonclient, every way it sends ------------------------------------------


@pytest.mark.parametrize("model", list(REQUESTS))
def test_infer_matches_flight(server: Server, triton: tg.InferenceServerClient, model: str) -> None:
    arrays, _ = REQUESTS[model]
    result = triton.infer(model, infer_inputs(arrays), request_id="r1", client_timeout=WAIT)
    response = result.get_response()
    assert response.model_name == model
    assert response.model_version == "1"
    assert response.id == "r1"
    assert_like_flight(server, model, result)


def test_identity_returns_its_input(triton: tg.InferenceServerClient) -> None:
    arrays, _ = REQUESTS["identity"]
    result = triton.infer(
        "identity",
        infer_inputs(arrays),
        priority=1,  # the highest level (identity has one)
        timeout=int(WAIT * 1e6),  # a queue timeout (us): only with allow_timeout_override
        parameters={"anything": "custom"},
        client_timeout=WAIT,
    )
    assert result.as_numpy("OUTPUT0").tobytes() == arrays["INPUT0"].tobytes()


@pytest.mark.parametrize("model", list(REQUESTS))
def test_async_infer_matches_flight(
    server: Server, triton: tg.InferenceServerClient, model: str
) -> None:
    arrays, _ = REQUESTS[model]
    callback, results = collector()
    for _ in range(3):  # several in flight at once: they may share a batch
        triton.async_infer(model, infer_inputs(arrays), callback, client_timeout=WAIT)
    for _ in range(3):
        result, error = results.get(timeout=WAIT)
        assert error is None, error
        assert_like_flight(server, model, result)


def test_aio_client_matches_flight(server: Server) -> None:
    async def run() -> list[Any]:
        async with tg_aio.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as client:
            assert await client.is_server_ready()
            calls = [
                client.infer(m, infer_inputs(REQUESTS[m][0]), client_timeout=WAIT) for m in REQUESTS
            ]
            return list(await asyncio.gather(*calls))

    for model, result in zip(REQUESTS, asyncio.run(run()), strict=True):
        assert_like_flight(server, model, result)


def test_stream_infer_matches_flight(server: Server, triton: tg.InferenceServerClient) -> None:
    callback, results = collector()
    triton.start_stream(callback, stream_timeout=WAIT * 2)
    try:
        sent = [m for _ in range(2) for m in REQUESTS]
        for i, model in enumerate(sent):
            triton.async_stream_infer(model, infer_inputs(REQUESTS[model][0]), request_id=str(i))
        got = {}
        for _ in sent:
            result, error = results.get(timeout=WAIT)
            assert error is None, error
            got[result.get_response().id] = result
    finally:
        triton.stop_stream()
    assert sorted(got, key=int) == [str(i) for i in range(len(sent))]
    for i, model in enumerate(sent):
        assert got[str(i)].get_response().model_name == model
        assert_like_flight(server, model, got[str(i)])


def test_stream_reports_errors_in_the_response_and_goes_on(
    server: Server, triton: tg.InferenceServerClient
) -> None:
    callback, results = collector()
    triton.start_stream(callback, stream_timeout=WAIT * 2)
    arrays, _ = REQUESTS["facile"]
    try:
        triton.async_stream_infer("no_such_model", infer_inputs(arrays), request_id="bad")
        triton.async_stream_infer("jet_tagger", _holey_mask(), request_id="ragged")
        triton.async_stream_infer("facile", infer_inputs(arrays), request_id="good")
        outcomes = [results.get(timeout=WAIT) for _ in range(3)]
    finally:
        triton.stop_stream()
    (_, missing), (_, ragged), (good, error) = outcomes
    assert isinstance(missing, InferenceServerException)
    assert "no_such_model" in missing.message()
    assert isinstance(ragged, InferenceServerException)
    assert "'mask'" in ragged.message()
    assert error is None
    assert good.get_response().id == "good"
    assert_like_flight(server, "facile", good)


# -- the protocol underneath: typed contents, requested outputs ---------------------------


@pytest.fixture
def stub(server: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_typed_contents_give_the_same_result(
    server: Server, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    arrays, dims = REQUESTS["facile"]
    hits = arrays["hits"]
    request = pb.ModelInferRequest(model_name="facile", id="typed")
    tensor = request.inputs.add(name="hits", datatype="FP32", shape=list(hits.shape))
    tensor.contents.fp32_contents.extend(hits.ravel().tolist())
    response = stub.ModelInfer(request, timeout=WAIT)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("energy", "FP32", [7, 1])
    energy = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(7, 1)
    assert_same_bits(energy, flight_outputs(server, "facile", arrays)["energy"], dims["energy"])


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (lambda t: t.contents.int_contents.extend([1] * 15), "fp32_contents"),
        (lambda t: t.contents.fp32_contents.extend([1.0] * 14), "15 values"),
        (lambda t: None, "no data"),
    ],
)
def test_typed_contents_that_do_not_fit(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, fill: Callable[[Any], None], message: str
) -> None:
    request = pb.ModelInferRequest(model_name="facile")
    fill(request.inputs.add(name="hits", datatype="FP32", shape=[1, 15]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert "'facile'" in caught.value.details()


@pytest.mark.parametrize("shape", [[-1, 15], [1, -15], [-2, 15]])
def test_a_dim_below_zero_says_every_dim_must_be_given(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, shape: list[int]
) -> None:
    """-1 is a config's wildcard, not a size: the message says so (it used to read
    "expected [-1, 15], got [-1, 15]")."""
    request = pb.ModelInferRequest(model_name="facile")
    request.inputs.add(name="hits", datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(15, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    for words in ("every dim must be given", "'facile'", "'hits'", str(shape)):
        assert words in details


def test_raw_request_with_default_outputs(
    server: Server, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    arrays, dims = REQUESTS["toptag_cnn"]
    image = arrays["image"]
    request = pb.ModelInferRequest(model_name="toptag_cnn", model_version="1")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(image.shape))
    tensor.contents.SetInParent()  # an empty contents message, as some clients send: no data
    request.raw_input_contents.append(image.tobytes())
    response = stub.ModelInfer(request, timeout=WAIT)
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == ["probabilities"]
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 2)
    expected = flight_outputs(server, "toptag_cnn", arrays)["probabilities"]
    assert_same_bits(got, expected, dims["probabilities"])
    assert response.parameters["queue_ns"].int64_param >= 0
    assert response.parameters["compute_infer_ns"].int64_param > 0


# -- a two-input, two-output model: requested outputs, typed ints, load and unload --------


def _write_pair_model(root: Path) -> Path:
    """``pair``: OUTPUT0 = -INPUT0 (FP32 [4]), OUTPUT1 = INPUT1 (INT32 [2])."""
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["INPUT0"], ["OUTPUT0"]),
            helper.make_node("Identity", ["INPUT1"], ["OUTPUT1"]),
        ],
        "pair",
        inputs=[
            helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("INPUT1", TensorProto.INT32, ["batch", 2]),
        ],
        outputs=[
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, ["batch", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    (root / "pair" / "1").mkdir(parents=True)
    onnx.save(model, root / "pair" / "1" / "model.onnx")
    (root / "pair" / "config.pbtxt").write_text(
        'name: "pair"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },\n'
        '        { name: "INPUT1" data_type: TYPE_INT32 dims: [ 2 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },\n'
        '         { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 2 ] } ]\n'
    )
    return root


@pytest.fixture(scope="module")
def pair_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = _write_pair_model(tmp_path_factory.mktemp("pair_repository"))
    # explicit model control: test_load_and_unload calls RepositoryModelLoad/Unload
    with Server(
        repository, port=0, kserve_port=0, metrics_port=None, model_control="explicit"
    ) as running:
        yield running


@pytest.fixture
def pair(pair_server: Server) -> Iterator[tg.InferenceServerClient]:
    client = tg.InferenceServerClient(f"127.0.0.1:{pair_server.kserve_port}")
    try:
        yield client
    finally:
        client.close()


PAIR = {
    "INPUT0": np.arange(12, dtype=np.float32).reshape(3, 4),
    "INPUT1": np.array([[1, -2], [3, 2**31 - 1], [-(2**31), 0]], dtype=np.int32),
}


@pytest.mark.parametrize("wanted", [["OUTPUT0"], ["OUTPUT1"], ["OUTPUT1", "OUTPUT0"], []])
def test_requested_outputs(
    pair_server: Server, pair: tg.InferenceServerClient, wanted: list[str]
) -> None:
    outputs = [tg.InferRequestedOutput(name) for name in wanted]
    result = pair.infer("pair", infer_inputs(PAIR), outputs=outputs or None, client_timeout=WAIT)
    names = wanted or ["OUTPUT0", "OUTPUT1"]
    assert [o.name for o in result.get_response().outputs] == names
    expected = flight_outputs(pair_server, "pair", PAIR)
    for name in names:
        assert_same_bits(result.as_numpy(name), expected[name], [4 if name == "OUTPUT0" else 2])
    for name in {"OUTPUT0", "OUTPUT1"} - set(names):
        assert result.as_numpy(name) is None
    np.testing.assert_array_equal(expected["OUTPUT0"], -PAIR["INPUT0"])
    np.testing.assert_array_equal(expected["OUTPUT1"], PAIR["INPUT1"])


def test_unknown_requested_output(pair: tg.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        pair.infer(
            "pair",
            infer_inputs(PAIR),
            outputs=[tg.InferRequestedOutput("OUTPUT9")],
            client_timeout=WAIT,
        )
    assert status(caught.value) == "StatusCode.INVALID_ARGUMENT"
    assert "OUTPUT9" in caught.value.message()


def test_typed_int_contents(pair_server: Server, pair: tg.InferenceServerClient) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{pair_server.kserve_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="pair")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[3, 4])
        request.inputs[0].contents.fp32_contents.extend(PAIR["INPUT0"].ravel().tolist())
        request.inputs.add(name="INPUT1", datatype="INT32", shape=[3, 2])
        request.inputs[1].contents.int_contents.extend(PAIR["INPUT1"].ravel().tolist())
        request.outputs.add(name="OUTPUT1")
        response = stub.ModelInfer(request, timeout=WAIT)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("OUTPUT1", "INT32", [3, 2])
    ]
    got = np.frombuffer(response.raw_output_contents[0], np.int32).reshape(3, 2)
    assert got.tobytes() == PAIR["INPUT1"].tobytes()


def test_load_and_unload(pair_server: Server, pair: tg.InferenceServerClient) -> None:
    assert pair.is_model_ready("pair", client_timeout=WAIT)
    pair.unload_model("pair", client_timeout=WAIT)
    try:
        assert not pair.is_model_ready("pair", client_timeout=WAIT)
        (entry,) = pair.get_model_repository_index(as_json=True, client_timeout=WAIT)["models"]
        assert entry["name"] == "pair"
        assert entry["state"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException) as caught:
            pair.infer("pair", infer_inputs(PAIR), client_timeout=WAIT)
        assert status(caught.value) == "StatusCode.NOT_FOUND"
        with grpc.insecure_channel(f"127.0.0.1:{pair_server.kserve_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=WAIT)
        assert list(ready.models) == []  # only ready models were asked for
    finally:
        pair.load_model("pair", client_timeout=WAIT)
    assert pair.is_model_ready("pair", client_timeout=WAIT)
    result = pair.infer("pair", infer_inputs(PAIR), client_timeout=WAIT)
    assert result.as_numpy("OUTPUT1").tobytes() == PAIR["INPUT1"].tobytes()
    with pytest.raises(InferenceServerException) as caught:
        pair.load_model("no_such_model", client_timeout=WAIT)
    assert status(caught.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        pair.load_model("pair", config='{"max_batch_size": 4}', client_timeout=WAIT)
    assert status(caught.value) == "StatusCode.INVALID_ARGUMENT"


# -- errors: Triton's status codes, and the server keeps serving --------------------------


def _wrong_datatype() -> list[tg.InferInput]:
    return infer_inputs({"hits": REQUESTS["facile"][0]["hits"].astype(np.float64)})


def _wrong_shape() -> list[tg.InferInput]:
    return infer_inputs({"hits": np.zeros((2, 14), np.float32)})


def _unknown_input() -> list[tg.InferInput]:
    return infer_inputs({"hit": REQUESTS["facile"][0]["hits"]})


def _shared_memory() -> list[tg.InferInput]:
    tensor = tg.InferInput("hits", [2, 15], "FP32")
    tensor.set_shared_memory("region", 2 * 15 * 4)
    return [tensor]


def _holey_mask() -> list[tg.InferInput]:
    jets = _padded_jets([5, 5])
    jets["mask"][0, 2] = 0  # padding before a real item: no list of items says that
    return infer_inputs(jets)


@pytest.mark.parametrize(
    ("model", "inputs", "code", "words"),
    [
        ("no_such_model", _wrong_shape, "NOT_FOUND", ["no_such_model", "facile"]),
        ("facile", _wrong_datatype, "INVALID_ARGUMENT", ["'facile'", "'hits'", "FP32", "FP64"]),
        ("facile", _wrong_shape, "INVALID_ARGUMENT", ["'facile'", "'hits'", "[-1, 15]", "14"]),
        ("facile", _unknown_input, "INVALID_ARGUMENT", ["'facile'", "'hit'"]),
        ("jet_tagger", _holey_mask, "INVALID_ARGUMENT", ["'jet_tagger'", "'mask'", "first"]),
        # Triton: NOT_FOUND "Unable to find shared memory region"
        ("facile", _shared_memory, "NOT_FOUND", ["'facile'", "'hits'", "no region 'region'"]),
    ],
    ids=["unknown-model", "datatype", "shape", "input-name", "mask", "shared-memory"],
)
def test_errors_have_tritons_status_codes(
    server: Server,
    triton: tg.InferenceServerClient,
    model: str,
    inputs: Callable[[], list[tg.InferInput]],
    code: str,
    words: list[str],
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, inputs(), client_timeout=WAIT)
    assert status(caught.value) == f"StatusCode.{code}"
    for word in words:
        assert word in caught.value.message()
    # the server keeps serving
    arrays, _ = REQUESTS["facile"]
    assert_like_flight(server, "facile", triton.infer("facile", infer_inputs(arrays)))


def test_an_output_named_twice_is_answered_once(triton: tg.InferenceServerClient) -> None:
    """As Triton 2.51 (checked): one output tensor, not one per time it is named."""
    arrays, _ = REQUESTS["facile"]
    outputs = [tg.InferRequestedOutput("energy") for _ in range(256)]
    result = triton.infer("facile", infer_inputs(arrays), outputs=outputs, client_timeout=WAIT)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["energy"]
    assert len(response.raw_output_contents) == 1


@pytest.mark.parametrize(
    ("key", "kind", "value"),
    [
        ("priority", "double_param", 1.5),
        ("priority", "string_param", "1"),
        ("timeout", "double_param", 2.0),
        ("timeout", "bool_param", True),
        ("priority", "int64_param", -1),
    ],
)
def test_priority_and_timeout_must_be_integers(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, key: str, kind: str, value: Any
) -> None:
    """As Triton's: a value of another type is an error, not read as 0 (no priority).
    (tritonclient refuses to send these parameters itself; a raw client can.)"""
    arrays, _ = REQUESTS["identity"]
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(arrays["INPUT0"].shape))
    request.raw_input_contents.append(arrays["INPUT0"].tobytes())
    setattr(request.parameters[key], kind, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{key}'" in caught.value.details()
    assert "'identity'" in caught.value.details()


def test_metadata_of_an_unknown_model_is_not_found(triton: tg.InferenceServerClient) -> None:
    for call in (triton.get_model_metadata, triton.get_model_config):
        with pytest.raises(InferenceServerException) as caught:
            call("no_such_model", client_timeout=WAIT)
        assert status(caught.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        triton.get_inference_statistics("no_such_model", client_timeout=WAIT)
    assert status(caught.value) == "StatusCode.NOT_FOUND"


# -- large messages -----------------------------------------------------------------------


def test_32_mb_request_round_trips(triton: tg.InferenceServerClient) -> None:
    payload = np.random.default_rng(7).normal(size=(8192, 1024)).astype(np.float32)
    assert payload.nbytes == 32 * 2**20
    result = triton.infer("identity", infer_inputs({"INPUT0": payload}), client_timeout=WAIT * 2)
    out = result.as_numpy("OUTPUT0")
    assert out.shape == payload.shape
    assert out.tobytes() == payload.tobytes()


def test_raw_input_becomes_a_column_without_a_copy(server: Server) -> None:
    from arrowinfer.schema import tensor_specs, to_column
    from arrowinfer.server._v2request import InputTensor
    from arrowinfer.server._v2tensors import input_array

    model = server.core.get("identity")
    (spec,) = tensor_specs(model.version.inputs)
    payload = REQUESTS["identity"][0]["INPUT0"]
    raw = payload.tobytes()  # what protobuf hands over for raw_input_contents[0]
    tensor = InputTensor("INPUT0", "FP32", payload.shape, {})
    array = input_array(spec, tensor, raw, model="identity", batching=True)
    column = to_column(model.version.inputs.field("INPUT0"), array)
    assert np.shares_memory(array, np.frombuffer(raw, np.uint8))
    assert np.shares_memory(to_numpy(column), array)
    assert to_numpy(column).tobytes() == raw


def test_a_port_in_use_is_an_error(example_repository: Path, server: Server) -> None:
    with pytest.raises(OSError, match="in use"):
        Server(
            example_repository,
            port=0,
            kserve_port=server.kserve_port,
            metrics_port=None,
            models=[],
        )
    assert server.core.ready  # the running server is undisturbed


# -- the inference answer's own serialization ----------------------------------------------

_text = st.text(max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    name=_text,
    version=_text,
    request_id=_text,
    params=st.dictionaries(_text, st.integers(-(2**63), 2**63 - 1), max_size=3),
    payloads=st.lists(st.binary(max_size=300), max_size=4),
)
def test_infer_answer_serializes_as_protobuf_does(
    name: str, version: str, request_id: str, params: dict[str, int], payloads: list[bytes]
) -> None:
    """InferAnswer writes raw_output_contents after the message's other fields: the bytes
    are protobuf's own serialization of the whole message, alone and inside a stream's
    response (length prefixes of every size: payloads up to 300 bytes cross one byte of
    varint)."""
    whole = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for key, value in params.items():
        whole.parameters[key].int64_param = value
    outputs = []
    for i, _ in enumerate(payloads):
        placed: dict[str, int | str] = {"shared_memory_region": name} if i == 1 else {}
        outputs.append(OutputTensor(f"out{i}", "UINT8", [1], placed))
        tensor = whole.outputs.add(name=f"out{i}", datatype="UINT8", shape=[1])
        if placed:
            tensor.parameters["shared_memory_region"].string_param = name
    whole.raw_output_contents.extend(payloads)
    views = [memoryview(p) for p in payloads]
    answer = InferAnswer(name, version, request_id, outputs, views, dict(params))
    assert pb.ModelInferResponse.FromString(answer.serialize()) == whole
    if len(params) < 2:  # a map's entries may be written in any order
        assert answer.serialize() == whole.SerializeToString()
    in_stream = pb.ModelStreamInferResponse.FromString(answer.serialize_in_stream())
    assert in_stream == pb.ModelStreamInferResponse(infer_response=whole)


def test_a_large_output_round_trips_through_the_answer(triton: tg.InferenceServerClient) -> None:
    """A 4 MB output (a varint of several bytes), unary and streamed, equals the input."""
    x = rng.normal(size=(1024, 1024)).astype(np.float32)
    tensor = tg.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    assert triton.infer("identity", [tensor]).as_numpy("OUTPUT0").tobytes() == x.tobytes()
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        triton.async_stream_infer("identity", [tensor])
        result, error = answers.get(timeout=WAIT)
    finally:
        triton.stop_stream()
    assert error is None
    assert result.as_numpy("OUTPUT0").tobytes() == x.tobytes()


def test_idle_streams_cannot_starve_the_unary_calls(example_repository: Path) -> None:
    """Each open ModelStreamInfer stream holds one of the server's threads, even idle: at
    most half of them are given to streams (more are RESOURCE_EXHAUSTED), so that health
    checks and ModelInfer are answered while clients hold streams open doing nothing."""
    from arrowinfer.repository import Repository
    from arrowinfer.server._core import InferenceCore
    from arrowinfer.server._kserve import start_kserve

    core = InferenceCore(Repository(example_repository), models=["identity"])
    server, port = start_kserve(core, port=0, max_workers=4)  # 2 streams at most
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    quiet: list[queue.SimpleQueue[Any]] = []

    def idle_stream() -> Any:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        quiet.append(requests)
        return stub.ModelStreamInfer(iter(requests.get, None), timeout=WAIT)

    try:
        streams = [idle_stream() for _ in range(2)]
        for requests, stream in zip(quiet, streams, strict=True):
            # one answer each first: only then are both surely holding their thread
            requests.put(pb.ModelInferRequest(model_name="no_such_model"))
            assert "no_such_model" in next(stream).error_message
        refused = idle_stream()
        with pytest.raises(grpc.RpcError) as caught:
            next(refused)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 ModelStreamInfer streams" in str(caught.value.details())
        for _ in range(3):  # more unary calls than the threads the streams left
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        quiet[0].put(None)  # one stream ends: a new one is served
        assert list(streams[0]) == []
        fresh = idle_stream()
        request = pb.ModelInferRequest(model_name="no_such_model")
        quiet[-1].put(request)
        assert "no_such_model" in next(fresh).error_message
        quiet[-1].put(None)
    finally:
        for requests in quiet:
            requests.put(None)
        channel.close()
        server.stop(grace=None)
        core.close()
