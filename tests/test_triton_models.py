"""Triton model repositories that serve unchanged: variable dims, HEP-style configs.

Every model here is a small ONNX graph made with ``onnx.helper`` and a config written from
Triton's documented ``ModelConfig`` fields (not copied from anyone's repository). Each is
served by a real server and called over Arrow Flight (arrowinfer's client and raw
``pyarrow.flight``), shared memory and KServe (tritonclient sync, asyncio and streaming);
every result is compared with onnxruntime run directly on the same ``model.onnx``.
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tg_aio
import tritonclient.http as th
from onnx import TensorProto, helper, numpy_helper
from pyarrow import flight
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from arrowinfer import tensors
from arrowinfer.batching import DynamicBatcher
from arrowinfer.client import Client, ShmTransport
from arrowinfer.errors import InvalidInput
from arrowinfer.examples import IR_VERSION, OPSET
from arrowinfer.repository import Repository
from arrowinfer.schema import validate
from arrowinfer.server import Server

WAIT = 30.0  # seconds any one answer may take: bounds every test, never a sleep

rng = np.random.default_rng(15)

_KSERVE = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _save(repo: Path, name: str, graph: onnx.GraphProto, config: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(config)


def _fp32(name: str, dims: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def write_repository(repo: Path) -> Path:
    """The HEP-style models: ParticleNet-like, MLPF-like, FACILE-like, DeepMET-like, and
    two without batching."""
    w = rng.normal(size=(9, 2)).astype(np.float32)
    # ParticleNet-like: points [2, P], features [7, P], mask [1, P], P varies per request
    nodes = [
        helper.make_node("Mul", ["features", "mask"], ["fm"]),
        helper.make_node("Mul", ["points", "mask"], ["pm"]),
        helper.make_node("ReduceSum", ["fm", "axis2"], ["fs"], keepdims=0),
        helper.make_node("ReduceSum", ["pm", "axis2"], ["ps"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axis2"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Concat", ["fs", "ps"], ["pooled"], axis=1),
        helper.make_node("Div", ["pooled", "count1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["softmax"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "particlenet_like",
        [
            _fp32("points", ["N", 2, "P"]),
            _fp32("features", ["N", 7, "P"]),
            _fp32("mask", ["N", 1, "P"]),
        ],
        [_fp32("softmax", ["N", 2])],
        [
            _const("axis2", np.array([2], np.int64)),
            _const("one", np.array(1.0, np.float32)),
            _const("w", w),
        ],
    )
    _save(
        repo,
        "particlenet_like",
        graph,
        """
name: "particlenet_like"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [
  { name: "points" data_type: TYPE_FP32 dims: [ 2, -1 ] },
  { name: "features" data_type: TYPE_FP32 dims: [ 7, -1 ] },
  { name: "mask" data_type: TYPE_FP32 dims: [ 1, -1 ] }
]
output [ { name: "softmax" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { count: 1 kind: KIND_CPU } ]
""",
    )
    # MLPF-like: a variable number of particles with 25 features each
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Tanh", ["h"], ["id_probs"]),
        ],
        "mlpf_like",
        [_fp32("x", ["N", "P", 25])],
        [_fp32("id_probs", ["N", "P", 8])],
        [_const("w", rng.normal(size=(25, 8)).astype(np.float32) / 5)],
    )
    _save(
        repo,
        "mlpf_like",
        graph,
        """
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 25 ] } ]
output [ { name: "id_probs" data_type: TYPE_FP32 dims: [ -1, 8 ] } ]
dynamic_batching { }
""",
    )
    # FACILE-like: fixed features per hit, a dense network
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["hits", "w1", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("Gemm", ["r1", "w2", "b2"], ["energy"]),
        ],
        "facile_like",
        [_fp32("hits", ["N", 15])],
        [_fp32("energy", ["N", 1])],
        [
            _const("w1", rng.normal(size=(15, 12)).astype(np.float32)),
            _const("b1", rng.normal(size=(12,)).astype(np.float32)),
            _const("w2", rng.normal(size=(12, 1)).astype(np.float32)),
            _const("b2", np.zeros(1, np.float32)),
        ],
    )
    _save(
        repo,
        "facile_like",
        graph,
        """
backend: "onnxruntime"
max_batch_size: 1024
input [ { name: "hits" data_type: TYPE_FP32 dims: [ 15 ] } ]
output [ { name: "energy" data_type: TYPE_FP32 dims: [ 1 ] } ]
dynamic_batching { preferred_batch_size: [ 256, 1024 ] max_queue_delay_microseconds: 200 }
""",
    )
    # DeepMET-like: per-candidate continuous features and an integer category
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pf", "wgt"], ["s"]),
            helper.make_node("Sigmoid", ["s"], ["weight"]),
            helper.make_node("MatMul", ["pf", "pxy"], ["p"]),
            helper.make_node("Cast", ["pdg"], ["pdgf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pdgf", "axis2"], ["pdgu"]),
            helper.make_node("Mul", ["pdgu", "scale"], ["pdgs"]),
            helper.make_node("Add", ["weight", "pdgs"], ["w2"]),
            helper.make_node("Mul", ["w2", "p"], ["wp"]),
            helper.make_node("ReduceSum", ["wp", "axis1"], ["met"], keepdims=0),
        ],
        "deepmet_like",
        [
            _fp32("pf", ["N", "P", 8]),
            helper.make_tensor_value_info("pdg", TensorProto.INT64, ["N", "P"]),
        ],
        [_fp32("met", ["N", 2])],
        [
            _const("wgt", rng.normal(size=(8, 1)).astype(np.float32)),
            _const("pxy", rng.normal(size=(8, 2)).astype(np.float32)),
            _const("axis1", np.array([1], np.int64)),
            _const("axis2", np.array([2], np.int64)),
            _const("scale", np.array(0.001, np.float32)),
        ],
    )
    _save(
        repo,
        "deepmet_like",
        graph,
        """
platform: "onnxruntime_onnx"
max_batch_size: 16
input [
  { name: "pf" data_type: TYPE_FP32 dims: [ -1, 8 ] },
  { name: "pdg" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "met" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { }
""",
    )
    # no batching, every dim variable: a matrix in, a matrix out
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "grid",
        [_fp32("x", ["R", "C"])],
        [_fp32("y", ["R", "C"])],
        [_const("two", np.array(2.0, np.float32))],
    )
    _save(
        repo,
        "grid",
        graph,
        """
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
""",
    )
    # batching, a variable dim after a fixed one in the output too
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "tracks",
        [_fp32("x", ["N", 3, "T"])],
        [_fp32("y", ["N", 3, "T"])],
    )
    _save(
        repo,
        "tracks",
        graph,
        """
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
""",
    )
    return repo


def request(model: str, rows: int = 3, size: int = 11) -> dict[str, np.ndarray]:
    """Random inputs of ``model``'s signature: ``rows`` entries, variable dims ``size``."""
    if model == "particlenet_like":
        mask = (np.arange(size) < rng.integers(0, size + 1, size=(rows, 1)))[:, None]
        return {
            "points": rng.normal(size=(rows, 2, size)).astype(np.float32),
            "features": rng.normal(size=(rows, 7, size)).astype(np.float32),
            "mask": mask.astype(np.float32),
        }
    if model == "mlpf_like":
        return {"x": rng.normal(size=(rows, size, 25)).astype(np.float32)}
    if model == "facile_like":
        return {"hits": rng.normal(size=(rows, 15)).astype(np.float32)}
    if model == "deepmet_like":
        return {
            "pf": rng.normal(size=(rows, size, 8)).astype(np.float32),
            "pdg": rng.choice([-211, 11, 13, 22, 130, 211], size=(rows, size)).astype(np.int64),
        }
    if model == "grid":
        return {"x": rng.normal(size=(1, rows, size)).astype(np.float32)}
    if model == "tracks":
        return {"x": rng.normal(size=(rows, 3, size)).astype(np.float32)}
    raise KeyError(model)


MODELS = ["particlenet_like", "mlpf_like", "facile_like", "deepmet_like", "grid", "tracks"]
BATCHING = {m for m in MODELS if m != "grid"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with Server(repository, port=0, kserve_port=0, http_port=0, metrics_port=None) as running:
        yield running


def reference(repository: Path, model: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """onnxruntime run directly on the model file (a model without batching: one entry)."""
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"))
    feeds = inputs if model in BATCHING else {k: v[0] for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feeds), strict=True))
    return out if model in BATCHING else {k: v[np.newaxis] for k, v in out.items()}


def as_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A result column as one dense array (a list column of equal lengths included)."""
    if tensors.layout(column.type).ragged:
        ragged = tensors.ragged_to_numpy(column)
        return ragged.values.reshape((len(ragged), -1, *ragged.values.shape[1:]))
    return tensors.to_numpy(column)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        array = got[name]
        if array.shape == value.shape[:-1] and value.shape[-1:] == (1,):
            array = array[..., np.newaxis]  # dims [1] travel as one value per row
        assert array.shape == value.shape, name
        assert np.all(np.isfinite(array)), name
        # merged batches may take other onnxruntime kernels: equal up to rounding
        np.testing.assert_allclose(array, value, rtol=1e-5, atol=1e-6, err_msg=name)


# -- loading and metadata -------------------------------------------------------------------


def test_variable_dim_models_load(repository: Path) -> None:
    repo = Repository(repository)
    for name in MODELS:
        (version,) = repo.load(name)
        assert version.inputs.names == list(request(name))
    tracks = repo.load("tracks")[0]
    assert tracks.inputs.field("x").type.extension_name == "arrow.variable_shape_tensor"
    assert tracks.outputs.field("y").type.extension_name == "arrow.variable_shape_tensor"
    mlpf = repo.load("mlpf_like")[0]
    assert mlpf.inputs.field("x").type == pa.list_(pa.list_(pa.float32(), 25))


def test_kserve_metadata_shows_the_config_dims(server: Server) -> None:
    with tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as triton:
        meta = triton.get_model_metadata("particlenet_like", as_json=True)
        assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [
            ("points", ["-1", "2", "-1"]),
            ("features", ["-1", "7", "-1"]),
            ("mask", ["-1", "1", "-1"]),
        ]
        grid = triton.get_model_metadata("grid", as_json=True)
        assert grid["inputs"][0]["shape"] == ["-1", "-1"]


# -- every transport, results equal onnxruntime's -------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_flight_takes_dense_numpy_for_variable_dims(
    server: Server, repository: Path, model: str
) -> None:
    with Client(server.location) as client:
        # several sizes on one client (one stream): the schema of the stream never changes
        for size in (11, 4, 11, 1):
            inputs = request(model, size=size)
            result = client.infer(model, inputs)
            got = {name: as_numpy(result.column(name)) for name in result.schema.names}
            assert_close(got, reference(repository, model, inputs))


@pytest.mark.parametrize("model", MODELS)
def test_shared_memory_takes_variable_dims(server: Server, repository: Path, model: str) -> None:
    transport = ShmTransport(server.location.replace("grpc", "shm", 1), min_shm_bytes=0)
    with Client(server.location, transport=transport) as client:
        for size in (6, 13):
            inputs = request(model, size=size)
            result = client.infer(model, inputs)
            got = {name: as_numpy(result.column(name)) for name in result.schema.names}
            assert_close(got, reference(repository, model, inputs))


def _infer_inputs(arrays: dict[str, np.ndarray], batching: bool) -> list[tg.InferInput]:
    out = []
    for name, array in arrays.items():
        value = array if batching else array[0]
        tensor = tg.InferInput(name, list(value.shape), _KSERVE[value.dtype.name])
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


def _outputs(response: Any, names: list[str], batching: bool) -> dict[str, np.ndarray]:
    return {
        n: response.as_numpy(n) if batching else response.as_numpy(n)[np.newaxis] for n in names
    }


@pytest.mark.parametrize("model", MODELS)
def test_tritonclient_sync_async_and_stream(server: Server, repository: Path, model: str) -> None:
    url = f"127.0.0.1:{server.kserve_port}"
    batching = model in BATCHING
    sent = [request(model, size=s) for s in (9, 2, 9)]
    wants = [reference(repository, model, inputs) for inputs in sent]
    names = list(wants[0])
    with tg.InferenceServerClient(url) as triton:
        for inputs, want in zip(sent, wants, strict=True):
            response = triton.infer(model, _infer_inputs(inputs, batching), client_timeout=WAIT)
            assert_close(_outputs(response, names, batching), want)
        answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        triton.start_stream(lambda result, error: answers.put((result, error)))
        try:
            for i, inputs in enumerate(sent):
                triton.async_stream_infer(model, _infer_inputs(inputs, batching), request_id=str(i))
            got = [answers.get(timeout=WAIT) for _ in sent]
        finally:
            triton.stop_stream()
        for (response, error), want in zip(got, wants, strict=True):
            assert error is None, error
            assert_close(_outputs(response, names, batching), want)

    async def async_calls() -> list[Any]:
        async with tg_aio.InferenceServerClient(url) as client:
            return await asyncio.gather(
                *(client.infer(model, _infer_inputs(i, batching)) for i in sent)
            )

    for response, want in zip(asyncio.run(async_calls()), wants, strict=True):
        assert_close(_outputs(response, names, batching), want)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_zero_rows_answer_zero_rows_of_the_config_dims(server: Server, protocol: str) -> None:
    """An event without candidates: no rows back, the model not run. A variable output dim
    is then 0 (there is no entry to take it from), a fixed one is the config's."""
    mod: Any = tg if protocol == "grpc" else th
    port = server.kserve_port if protocol == "grpc" else server.http_port
    client = mod.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for model in sorted(BATCHING):
            tensors_ = []
            for name, array in request(model, rows=0, size=5).items():
                tensor = mod.InferInput(name, list(array.shape), _KSERVE[array.dtype.name])
                tensor.set_data_from_numpy(array)
                tensors_.append(tensor)
            response = client.infer(model, tensors_)
            kwargs = {"as_json": True} if protocol == "grpc" else {}
            config = client.get_model_config(model, **kwargs)
            config = config["config"] if protocol == "grpc" else config
            for output in config["output"]:
                dims = [max(int(d), 0) for d in output["dims"]]
                got = response.as_numpy(output["name"])
                assert got.shape == (0, *dims), (model, output["name"])
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    ("model", "shape"),
    [("mlpf_like", [0, 2**62, 25]), ("tracks", [0, 3, 2**60]), ("grid", [2**31, 2**31, 0])],
)
def test_empty_tensors_of_huge_dims_are_refused(
    server: Server, protocol: str, model: str, shape: list[int]
) -> None:
    """Zero elements, but dims whose product numpy cannot hold: invalid, naming the model
    and input, as any wrong shape (was a 500). Raw requests: tritonclient refuses them."""
    if protocol == "grpc":
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype="FP32", shape=shape)
        request.raw_input_contents.append(b"")
        with grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = str(caught.value.details())
    else:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": []}]}
        connection = HTTPConnection("127.0.0.1", server.http_port, timeout=WAIT)
        try:
            connection.request("POST", f"/v2/models/{model}/infer", json.dumps(body))
            answer = connection.getresponse()
            assert answer.status == 400
            message = json.loads(answer.read())["error"]
        finally:
            connection.close()
    assert f"model '{model}', input 'x'" in message


# -- the Flight encoding, with nothing but pyarrow ------------------------------------------


class _VariableShapeTensor(pa.ExtensionType):
    """Arrow's canonical ``arrow.variable_shape_tensor``, as a pyarrow user writes it."""

    def __init__(self, value_type: pa.DataType, ndim: int):
        self.ndim = ndim
        storage = pa.struct(
            [pa.field("data", pa.list_(value_type)), pa.field("shape", pa.list_(pa.int32(), ndim))]
        )
        super().__init__(storage, "arrow.variable_shape_tensor")

    def __arrow_ext_serialize__(self) -> bytes:
        return b"{}"  # the canonical type's metadata is JSON; every key is optional

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> Any:
        data, shape = storage_type.field("data"), storage_type.field("shape")
        return cls(data.type.value_type, shape.type.list_size)


def _raw_variable(array: np.ndarray) -> pa.Array:
    rows, shape = array.shape[0], array.shape[1:]
    data = pa.array(list(array.reshape(rows, -1)), type=pa.list_(pa.float32()))
    shapes = pa.array([list(shape)] * rows, type=pa.list_(pa.int32(), len(shape)))
    type_ = _VariableShapeTensor(pa.float32(), len(shape))
    storage = pa.StructArray.from_arrays([data, shapes], fields=list(type_.storage_type))
    return pa.ExtensionArray.from_storage(type_, storage)


def _raw_exchange(server: Server, model: str, batches: list[pa.RecordBatch]) -> list[Any]:
    """One request at a time on one do_exchange stream; its replies (data + app_metadata)."""
    with flight.connect(server.location) as client:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(model))
        try:
            writer.begin(batches[0].schema)
            replies = []
            for batch in batches:
                writer.write_batch(batch)
                replies.append(reader.read_chunk())
            writer.done_writing()
        except BaseException:
            reader.cancel()  # a failed test must not leave the server waiting on the stream
            raise
        writer.close()
        return replies


def test_raw_pyarrow_flight_variable_shape_tensor(server: Server, repository: Path) -> None:
    schema = pa.schema(
        client_schema := flight.connect(server.location)
        .get_schema(flight.FlightDescriptor.for_path("tracks", "1"))
        .schema
    )
    assert client_schema.field("x").type.extension_name == "arrow.variable_shape_tensor"
    sent = [request("tracks", size=s) for s in (5, 8)]
    batches = [pa.RecordBatch.from_arrays([_raw_variable(i["x"])], ["x"]) for i in sent]
    for inputs, reply in zip(sent, _raw_exchange(server, "tracks", batches), strict=True):
        assert "error" not in json.loads(reply.app_metadata.to_pybytes())
        y = reply.data.column("y")
        assert y.type.extension_name == "arrow.variable_shape_tensor"
        # read back by hand: storage struct<data: list, shape: fixed_size_list>
        data, shapes = y.storage.flatten()
        assert shapes.to_pylist() == [[3, inputs["x"].shape[2]]] * len(y)
        values = np.asarray(data.flatten()).reshape(inputs["x"].shape)
        np.testing.assert_array_equal(values, reference(repository, "tracks", inputs)["y"])
    assert schema.names == ["x"]


def test_raw_pyarrow_flight_fixed_shape_tensor_of_the_request_shape(
    server: Server, repository: Path
) -> None:
    inputs = request("particlenet_like", size=17)
    columns = [pa.FixedShapeTensorArray.from_numpy_ndarray(v) for v in inputs.values()]
    batch = pa.RecordBatch.from_arrays(columns, list(inputs))
    (reply,) = _raw_exchange(server, "particlenet_like", [batch])
    assert "error" not in json.loads(reply.app_metadata.to_pybytes())
    got = reply.data.column("softmax").to_numpy_ndarray()
    want = reference(repository, "particlenet_like", inputs)["softmax"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- one shape per request, batches of one shape ----------------------------------------------


def test_entries_of_one_request_must_share_the_shape(server: Server) -> None:
    ragged = tensors.Ragged(
        np.array([0, 3, 7], np.int32), rng.normal(size=(7, 25)).astype(np.float32)
    )
    with Client(server.location) as client, pytest.raises(InvalidInput, match="one shape"):
        client.infer("mlpf_like", {"x": ragged})
    tensor = tg.InferInput("x", [2, 3, 24], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 3, 24), np.float32))
    with (
        tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as triton,
        pytest.raises(InferenceServerException, match="wrong shape"),
    ):
        triton.infer("mlpf_like", [tensor], client_timeout=WAIT)


def test_batcher_merges_only_requests_of_one_shape(repository: Path) -> None:
    from arrowinfer.backends import create_backend

    (version,) = Repository(repository).load("tracks")
    # a long delay: everything queued below is there when the first batch is formed
    version.config.dynamic_batching.max_queue_delay_microseconds = 300_000
    batcher = DynamicBatcher(version, [create_backend(version)])
    try:
        sizes = [5, 5, 9, 5]
        sent = [request("tracks", rows=2, size=s) for s in sizes]
        futures = []
        for inputs in sent:
            batch = pa.RecordBatch.from_arrays([tensors.from_numpy(inputs["x"])], ["x"])
            shapes = validate(batch, version.inputs, model="tracks")
            futures.append(batcher.submit(batch, shapes=shapes))
        for inputs, future in zip(sent, futures, strict=True):
            got = tensors.to_numpy(future.result(WAIT).batch.column("y"))
            np.testing.assert_array_equal(got, -inputs["x"])
        # [5, 5] together; 9 alone; the last 5 after it (never reordered)
        assert batcher.statistics.execution_count == 3
        assert sorted(batcher.statistics.batch_stats) == [2, 4]
    finally:
        batcher.close()


# -- optional inputs ---------------------------------------------------------------------------


def write_optional_models(repo: Path) -> Path:
    """Graph inputs with a default (an ONNX initializer of the same name), batching or not."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scaled",
        [_fp32("x", ["N", 4]), _fp32("scale", ["N", 1])],
        [_fp32("y", ["N", 4])],
        [_const("scale", np.array([[2.0]], np.float32))],
    )
    _save(
        repo,
        "scaled",
        graph,
        """
max_batch_size: 8
input [
  { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "scale" data_type: TYPE_FP32 dims: [ 1 ] optional: true }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
""",
    )
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "biased",
        [_fp32("x", [4]), _fp32("bias", [4])],
        [_fp32("y", [4])],
        [_const("bias", np.array([1.0, 2.0, 3.0, 4.0], np.float32))],
    )
    # the config names only the required input: the default one is left to the graph
    _save(
        repo,
        "biased",
        graph,
        """
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
""",
    )
    graph.name = "biased_optional"
    _save(
        repo,
        "biased_optional",
        graph,
        """
max_batch_size: 0
input [
  { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "bias" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
""",
    )
    return repo


@pytest.fixture(scope="module")
def optional_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = write_optional_models(tmp_path_factory.mktemp("optional"))
    with Server(repo, port=0, kserve_port=0, metrics_port=None) as running:
        yield running


def _optional_cases() -> list[tuple[str, dict[str, np.ndarray], np.ndarray]]:
    x = rng.normal(size=(3, 4)).astype(np.float32)
    scale = np.array([[0.5], [-1.0], [3.0]], np.float32)
    bias = np.array([[10.0, 20.0, 30.0, 40.0]], np.float32)
    return [
        ("scaled", {"x": x}, x * 2.0),  # the initializer's default
        ("scaled", {"x": x, "scale": scale}, x * scale),  # the client's value
        ("biased", {"x": x[:1]}, x[:1] + np.array([1.0, 2.0, 3.0, 4.0], np.float32)),
        ("biased_optional", {"x": x[:1]}, x[:1] + np.array([1.0, 2.0, 3.0, 4.0], np.float32)),
        ("biased_optional", {"x": x[:1], "bias": bias}, x[:1] + bias),
    ]


def test_optional_inputs_load_as_optional(optional_server: Server) -> None:
    with Client(optional_server.location) as client:
        assert client.schema("scaled").names == ["x", "scale"]
        assert client.schema("biased").names == ["x"]
    with tg.InferenceServerClient(f"127.0.0.1:{optional_server.kserve_port}") as triton:
        config = triton.get_model_config("biased_optional", as_json=True)["config"]
        assert [i.get("optional", False) for i in config["input"]] == [False, True]


def test_optional_inputs_may_be_left_out_over_flight_and_shm(optional_server: Server) -> None:
    shm = ShmTransport(optional_server.location.replace("grpc", "shm", 1), min_shm_bytes=0)
    with (
        Client(optional_server.location) as flight_client,
        Client(optional_server.location, transport=shm) as shm_client,
    ):
        for client in (flight_client, shm_client):
            for model, inputs, want in _optional_cases():
                got = tensors.to_numpy(client.infer(model, inputs).column("y"))
                np.testing.assert_allclose(got, want, rtol=1e-6)
        # the required input is still required
        with pytest.raises(InvalidInput, match="missing"):
            flight_client.infer("scaled", {"scale": np.ones((2, 1), np.float32)})


def test_optional_inputs_may_be_left_out_over_kserve(optional_server: Server) -> None:
    url = f"127.0.0.1:{optional_server.kserve_port}"
    cases = _optional_cases()

    with tg.InferenceServerClient(url) as triton:
        for model, arrays, want in cases:
            batching = model == "scaled"
            response = triton.infer(model, _infer_inputs(arrays, batching), client_timeout=WAIT)
            got = response.as_numpy("y")
            np.testing.assert_allclose(got if batching else got[np.newaxis], want, rtol=1e-6)

    async def together() -> list[Any]:
        # requests with and without the optional input, queued together: never merged
        async with tg_aio.InferenceServerClient(url) as client:
            return await asyncio.gather(
                *(client.infer("scaled", _infer_inputs(a, True)) for _, a, _ in cases[:2] * 3)
            )

    for response, (_, _, want) in zip(asyncio.run(together()), cases[:2] * 3, strict=True):
        np.testing.assert_allclose(response.as_numpy("y"), want, rtol=1e-6)


# -- warm-up -------------------------------------------------------------------------------


WARMUP = """
  {{ name: "sample" batch_size: 4 count: 2
     inputs {{ key: "points" value: {{ data_type: TYPE_FP32 dims: [ 2, 5 ] {points} }} }}
     inputs {{ key: "features" value: {{ data_type: TYPE_FP32 dims: [ 7, 5 ] random_data: true }} }}
     inputs {{ key: "mask" value: {{ data_type: TYPE_FP32 dims: [ 1, 5 ] zero_data: true }} }}
  }}
"""


def _with_warmup(tmp_path: Path, points: str) -> Path:
    repo = write_repository(tmp_path)
    config = repo / "particlenet_like" / "config.pbtxt"
    config.write_text(config.read_text() + "model_warmup [" + WARMUP.format(points=points) + "]\n")
    return repo / "particlenet_like"


def test_model_warmup_runs_at_load(tmp_path: Path) -> None:
    from arrowinfer.server._core import InferenceCore

    model_dir = _with_warmup(tmp_path, 'input_data_file: "points.bin"')
    (model_dir / "warmup").mkdir()
    # Triton's format: the raw values of one entry, little-endian
    rng.normal(size=(2, 5)).astype("<f4").tofile(model_dir / "warmup" / "points.bin")
    core = InferenceCore(Repository(model_dir.parent), models=["particlenet_like"])
    try:
        loaded = core.get("particlenet_like")  # ready: the samples ran without error
        batch = pa.RecordBatch.from_arrays(
            [tensors.variable_from_numpy(v) for v in request("particlenet_like").values()],
            list(request("particlenet_like")),
        )
        assert np.isfinite(tensors.to_numpy(core.submit(loaded, batch).result(WAIT).batch[0])).all()
    finally:
        core.close()
    # a sample that cannot run keeps the model from loading, naming the sample's problem
    (model_dir / "warmup" / "points.bin").write_bytes(b"\0" * 12)
    from arrowinfer.errors import ModelError

    with pytest.raises(ModelError, match=r"model_warmup 'sample'.*points.bin"):
        InferenceCore(Repository(model_dir.parent), models=["particlenet_like"]).load(
            "particlenet_like"
        )


# -- requests larger than max_batch_size -----------------------------------------------------


def test_oversized_requests_split_over_flight_and_refused_over_kserve(
    server: Server, repository: Path
) -> None:
    inputs = request("mlpf_like", rows=10, size=3)  # max_batch_size 4
    want = reference(repository, "mlpf_like", inputs)
    with Client(server.location) as client:  # split into 4 + 4 + 2 and joined
        result = client.infer("mlpf_like", inputs)
        assert_close({"id_probs": as_numpy(result.column("id_probs"))}, want)
    with tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as triton:
        with pytest.raises(InferenceServerException, match="batch-size must be <= 4") as caught:
            triton.infer("mlpf_like", _infer_inputs(inputs, True), client_timeout=WAIT)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "arrowinfer.kserve_split_oversized: true splits" in caught.value.message()
        assert "(got 10 rows)" in caught.value.message()


def test_oversized_kserve_requests_split_when_the_config_asks(tmp_path: Path) -> None:
    repo = write_repository(tmp_path)
    config = repo / "mlpf_like" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "arrowinfer.kserve_split_oversized" value: { string_value: "true" } }\n'
    )
    inputs = request("mlpf_like", rows=10, size=3)
    with (
        Server(repo, port=0, kserve_port=0, metrics_port=None, models=["mlpf_like"]) as running,
        tg.InferenceServerClient(f"127.0.0.1:{running.kserve_port}") as triton,
    ):
        response = triton.infer("mlpf_like", _infer_inputs(inputs, True), client_timeout=WAIT)
    assert_close({"id_probs": response.as_numpy("id_probs")}, reference(repo, "mlpf_like", inputs))


# -- Triton's example repository, as Triton publishes its configs ------------------------------

DENSENET_CONFIG = """name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 0
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape { shape: [ 1, 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
"""

SIMPLE_CONFIG = """name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
"""


@pytest.fixture(scope="module")
def triton_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("examples")
    # densenet_onnx's signature with a small stand-in network: pool, then a 1x1 convolution
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["data_0"], ["pooled"]),
            helper.make_node("Conv", ["pooled", "w"], ["fc6_1"]),
        ],
        "densenet_onnx",
        [_fp32("data_0", [1, 3, 224, 224])],
        [_fp32("fc6_1", [1, 1000, 1, 1])],
        [_const("w", rng.normal(size=(1000, 3, 1, 1)).astype(np.float32))],
    )
    _save(repo, "densenet_onnx", graph, DENSENET_CONFIG)
    labels = [f"CLASS {i}" for i in range(1000)]
    (repo / "densenet_onnx" / "densenet_labels.txt").write_text("\n".join(labels) + "\n")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.INT32, ["N", 16]),
            helper.make_tensor_value_info("INPUT1", TensorProto.INT32, ["N", 16]),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, ["N", 16]),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, ["N", 16]),
        ],
    )
    _save(repo, "simple", graph, SIMPLE_CONFIG)
    return repo


@pytest.fixture(scope="module")
def examples_server(triton_examples: Path) -> Iterator[Server]:
    with Server(triton_examples, port=0, kserve_port=0, metrics_port=None) as running:
        yield running


def test_triton_example_configs_load_unchanged_and_match_onnxruntime(
    examples_server: Server, triton_examples: Path
) -> None:
    image = rng.random((3, 224, 224), dtype=np.float32)
    session = ort.InferenceSession(str(triton_examples / "densenet_onnx" / "1" / "model.onnx"))
    want_scores = session.run(None, {"data_0": image[np.newaxis]})[0].reshape(1000)
    a = rng.integers(-100, 100, size=(3, 16), dtype=np.int32)
    b = rng.integers(-100, 100, size=(3, 16), dtype=np.int32)
    with Client(examples_server.location) as client:
        scores = tensors.to_numpy(client.infer("densenet_onnx", {"data_0": image[np.newaxis]})[0])
        np.testing.assert_allclose(scores[0], want_scores, rtol=1e-5, atol=1e-6)
        simple = client.infer("simple", {"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(tensors.to_numpy(simple.column("OUTPUT0")), a + b)
        np.testing.assert_array_equal(tensors.to_numpy(simple.column("OUTPUT1")), a - b)
    with tg.InferenceServerClient(f"127.0.0.1:{examples_server.kserve_port}") as triton:
        # what Triton's image_client.py sends: the image without a batch dim, class_count 3
        tensor = tg.InferInput("data_0", [3, 224, 224], "FP32")
        tensor.set_data_from_numpy(image)
        wanted = tg.InferRequestedOutput("fc6_1", class_count=3)
        response = triton.infer("densenet_onnx", [tensor], outputs=[wanted])
        top = np.argsort(-want_scores, kind="stable")[:3]
        got = [item.decode() for item in response.as_numpy("fc6_1")]
        assert [g.split(":")[1:] for g in got] == [[str(i), f"CLASS {i}"] for i in top]
        for text, index in zip(got, top, strict=True):
            assert float(text.split(":")[0]) == pytest.approx(want_scores[index], abs=1e-5)
        # without class_count: the scores themselves
        response = triton.infer("densenet_onnx", [tensor])
        np.testing.assert_allclose(response.as_numpy("fc6_1"), want_scores, rtol=1e-5, atol=1e-6)
        inputs = []
        for name, value in (("INPUT0", a), ("INPUT1", b)):
            inputs.append(tg.InferInput(name, [3, 16], "INT32"))
            inputs[-1].set_data_from_numpy(value)
        response = triton.infer("simple", inputs)
        np.testing.assert_array_equal(response.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(response.as_numpy("OUTPUT1"), a - b)


# -- strings ---------------------------------------------------------------------------------


def write_string_models(repo: Path) -> Path:
    """A tokenizer-like model (strings -> ids, and the strings back) and a string [1] echo."""
    vocabulary = ["the", "jet", "muon", "électron"]
    graph = helper.make_graph(
        [
            helper.make_node(
                "LabelEncoder",
                ["words"],
                ["ids"],
                domain="ai.onnx.ml",
                keys_strings=vocabulary,
                values_int64s=list(range(1, len(vocabulary) + 1)),
                default_int64=0,
            ),
            helper.make_node("Identity", ["words"], ["echo"]),
        ],
        "tokens",
        [helper.make_tensor_value_info("words", TensorProto.STRING, ["N", 4])],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 4]),
        ],
    )
    (repo / "tokens" / "1").mkdir(parents=True)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 2)],
    )
    model.ir_version = IR_VERSION
    onnx.save(model, str(repo / "tokens" / "1" / "model.onnx"))
    (repo / "tokens" / "config.pbtxt").write_text(
        'max_batch_size: 8\ninput [ { name: "words" data_type: TYPE_STRING dims: [ 4 ] } ]\n'
        'output [ { name: "ids" data_type: TYPE_INT64 dims: [ 4 ] },\n'
        '  { name: "echo" data_type: TYPE_STRING dims: [ 4 ] } ]\ndynamic_batching { }\n'
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 1])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N", 1])],
    )
    _save(repo, "echo", graph, "max_batch_size: 8\n")  # the config completed from the graph
    return repo


WORDS = np.array([["the", "jet", "ζ", "muon"], ["électron", "", "the", "the"]], dtype=object)
IDS = np.array([[1, 2, 0, 3], [4, 0, 1, 1]], dtype=np.int64)


@pytest.fixture(scope="module")
def string_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = write_string_models(tmp_path_factory.mktemp("strings"))
    with Server(repo, port=0, kserve_port=0, metrics_port=None) as running:
        yield running


def test_strings_over_flight_and_shared_memory(string_server: Server) -> None:
    shm = ShmTransport(string_server.location.replace("grpc", "shm", 1), min_shm_bytes=0)
    binary = np.array([[w.encode() for w in row] for row in WORDS], dtype=object)
    with (
        Client(string_server.location) as flight_client,
        Client(string_server.location, transport=shm) as shm_client,
    ):
        for client in (flight_client, shm_client):
            for words in (WORDS, binary):  # Arrow string, or binary holding UTF-8
                result = client.infer("tokens", {"words": words})
                np.testing.assert_array_equal(tensors.to_numpy(result.column("ids")), IDS)
                assert tensors.to_numpy(result.column("echo")).tolist() == WORDS.tolist()
            # a large_string column, one string per row
            column = pa.array(["a", "βγ", ""], type=pa.large_string())
            result = client.infer("echo", {"text": column})
            assert result.column("same").to_pylist() == ["a", "βγ", ""]


def test_strings_over_kserve_raw_and_typed(string_server: Server) -> None:
    with tg.InferenceServerClient(f"127.0.0.1:{string_server.kserve_port}") as triton:
        tensor = tg.InferInput("words", [2, 4], "BYTES")
        tensor.set_data_from_numpy(WORDS)  # raw: length-prefixed UTF-8
        response = triton.infer("tokens", [tensor], client_timeout=WAIT)
        np.testing.assert_array_equal(response.as_numpy("ids"), IDS)
        echo = response.as_numpy("echo")
        assert [[v.decode() for v in row] for row in echo] == WORDS.tolist()
    # typed bytes_contents, with the generated stub
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    request = pb.ModelInferRequest(model_name="tokens")
    words = request.inputs.add(name="words", datatype="BYTES", shape=[2, 4])
    words.contents.bytes_contents.extend(w.encode() for w in WORDS.reshape(-1))
    with grpc.insecure_channel(f"127.0.0.1:{string_server.kserve_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    ids = np.frombuffer(response.raw_output_contents[0], dtype="<i8").reshape(2, 4)
    np.testing.assert_array_equal(ids, IDS)


# -- every example model, random inputs, every transport ----------------------------------------


def random_inputs(version: Any, rows: int) -> dict[str, Any]:
    """Random inputs of a model's signature: ragged inputs as lists of random lengths (the
    same per entry for every ragged input), variable dims of size 5."""
    from arrowinfer.schema import tensor_specs

    counts = rng.integers(0, 40, size=rows)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    out: dict[str, Any] = {}
    for spec in tensor_specs(version.inputs):
        if spec.optional:
            continue
        dt = spec.datatype.numpy
        if spec.ragged:
            values = rng.normal(size=(int(offsets[-1]), *spec.shape[1:])).astype(dt)
            out[spec.name] = tensors.Ragged(offsets, values)
        else:
            shape = tuple(5 if d < 0 else d for d in spec.shape)
            out[spec.name] = rng.normal(size=(rows, *shape)).astype(dt)
    return out


def _padded(version: Any, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The same request as KServe carries it: ragged inputs padded, the mask beside them."""
    out: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        if isinstance(value, tensors.Ragged):
            length = dict(zip(version.inputs.names, version.inputs, strict=True))[name]
            size = json.loads(length.metadata[b"shape"])[0]
            out[name] = tensors.pad(value, size, pad_value=version.pad_value)
            if version.mask_input:
                out[version.mask_input] = tensors.mask(value.counts, size, shape=(1,))
        else:
            out[name] = value
    return out


def test_every_example_model_is_finite_on_every_transport(
    example_repository: Path,
) -> None:
    with Server(example_repository, port=0, kserve_port=0, metrics_port=None) as running:
        versions = {m.version.name: m.version for m in running.core.served()}
        shm = ShmTransport(running.location.replace("grpc", "shm", 1), min_shm_bytes=0)
        with (
            Client(running.location) as flight_client,
            Client(running.location, transport=shm) as shm_client,
            tg.InferenceServerClient(f"127.0.0.1:{running.kserve_port}") as triton,
        ):
            for name, version in sorted(versions.items()):
                inputs = random_inputs(version, rows=3)
                for client in (flight_client, shm_client):
                    result = client.infer(name, inputs)
                    for column in result.columns:
                        assert np.all(np.isfinite(as_numpy(column))), name
                padded = _padded(version, inputs)
                response = triton.infer(name, _infer_inputs(padded, True), client_timeout=WAIT)
                for output in version.outputs.names:
                    assert np.all(np.isfinite(response.as_numpy(output))), (name, output)


# -- the device backend's assembly (numpy in place of CuPy) ------------------------------------


@pytest.mark.parametrize("model", ["particlenet_like", "mlpf_like", "deepmet_like", "tracks"])
def test_device_backend_takes_variable_dims(repository: Path, model: str) -> None:
    from arrowinfer.backends.device import DeviceBackend
    from arrowinfer.backends.ort import OnnxRuntimeBackend

    (version,) = Repository(repository).load(model)
    device = DeviceBackend(version, xp=np)
    cpu = OnnxRuntimeBackend(version)
    try:
        requests = []
        for size in (7, 7):  # two requests of one shape, as the batcher merges them
            inputs = request(model, rows=2, size=size)
            columns = [
                tensors.variable_from_numpy(v)
                if -1 in tensors.layout(version.inputs.field(k).type).shape
                and not tensors.layout(version.inputs.field(k).type).ragged
                else tensors.from_numpy(v)
                for k, v in inputs.items()
            ]
            requests.append(pa.RecordBatch.from_arrays(columns, list(inputs)))
        for request_batch in requests:
            validate(request_batch, version.inputs, model=model)
        got, _ = device.execute(requests)
        want, _ = cpu.execute(requests)
        for g, w in zip(got, want, strict=True):
            for name in version.outputs.names:
                np.testing.assert_allclose(
                    as_numpy(g.column(name)), as_numpy(w.column(name)), rtol=1e-5, atol=1e-6
                )
    finally:
        device.close()
        cpu.close()


def test_device_backend_takes_optional_inputs_left_out(tmp_path: Path) -> None:
    from arrowinfer.backends.device import DeviceBackend

    repo = write_optional_models(tmp_path)
    (version,) = Repository(repo).load("scaled")
    x = rng.normal(size=(3, 4)).astype(np.float32)
    backend = DeviceBackend(version, xp=np)
    try:
        (result,), _ = backend.execute([pa.RecordBatch.from_arrays([tensors.from_numpy(x)], ["x"])])
        np.testing.assert_allclose(tensors.to_numpy(result.column("y")), x * 2.0, rtol=1e-6)
    finally:
        backend.close()
