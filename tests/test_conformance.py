"""The calls of tritonclient's example clients, over KServe gRPC and HTTP alike.

Written for this project from tritonclient's public API, after the flows of Triton's
``simple_{grpc,http}_*_client.py`` examples: health, simple infer (the ``simple`` model:
``OUTPUT0 = INPUT0 + INPUT1``, ``OUTPUT1 = INPUT0 - INPUT1``, INT32 ``[16]``), async
infer, streaming infer (gRPC), shared-memory infer, model control with the repository
index, statistics, string infer and image classification with ``class_count`` (the
``image_client.py`` flow on a small classifier with a label file). Values are compared with
onnxruntime on the same model file, error codes with Triton's documented ones.
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from arrowinfer.examples import IR_VERSION, OPSET
from arrowinfer.server import Server

WAIT = 30.0

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
"""

INPUT0 = np.arange(16, dtype=np.int32).reshape(1, 16)
INPUT1 = np.ones((1, 16), dtype=np.int32)


def simple_onnx() -> bytes:
    """Triton's example ``simple`` model as ONNX: the sum and the difference."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [
            helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16])
            for n in ("INPUT0", "INPUT1")
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16])
            for n in ("OUTPUT0", "OUTPUT1")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


CLASSIFIER_CONFIG = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "scores" data_type: TYPE_FP32 dims: [ 6 ] label_filename: "labels.txt" } ]
"""
LABELS = ["ELECTRON", "MUON", "PHOTON", "PION", "KAON", "PROTON"]

STRING_CONFIG = """
name: "simple_string"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 16 ] } ]
"""


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def classifier_onnx() -> bytes:
    """image_client.py's flow in small: scores of 6 classes from 4 features (fixed weights)."""
    weights = np.random.default_rng(6).normal(size=(4, 6)).astype(np.float32)
    return _model(
        helper.make_graph(
            [helper.make_node("MatMul", ["image", "w"], ["scores"])],
            "classifier",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 6])],
            [onnx.numpy_helper.from_array(weights, "w")],
        )
    )


def string_onnx() -> bytes:
    """simple_*_string_infer_client.py's model in spirit: strings in, the same strings out."""
    return _model(
        helper.make_graph(
            [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
            "simple_string",
            [helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["batch", 16])],
            [helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["batch", 16])],
        )
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``simple``; ``simple_sequence``, the same with ``sequence_batching`` (refused); a
    ``classifier`` with labels; ``simple_string``."""
    root = tmp_path_factory.mktemp("conformance")
    for name, extra in (("simple", ""), ("simple_sequence", "sequence_batching { }\n")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(simple_onnx())
        config = SIMPLE_CONFIG.replace('name: "simple"', f'name: "{name}"')
        (root / name / "config.pbtxt").write_text(config + extra)
    for name, config, model in (
        ("classifier", CLASSIFIER_CONFIG, classifier_onnx()),
        ("simple_string", STRING_CONFIG, string_onnx()),
    ):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model)
        (root / name / "config.pbtxt").write_text(config)
    (root / "classifier" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with Server(  # Triton's model-control example needs --model-control-mode explicit
        repository,
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=None,
        model_control="explicit",
    ) as running:
        yield running


@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(server: Server, protocol: str) -> Iterator[Any]:
    if protocol == "grpc":
        triton: Any = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    else:
        triton = th.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=2)
    try:
        yield triton
    finally:
        triton.close()


def lib(protocol: str) -> Any:
    return tg if protocol == "grpc" else th


def onnxruntime_simple(server: Server, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(server.core.get("simple").version.path))
    return list(session.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b}))


def simple_inputs(protocol: str, a: np.ndarray = INPUT0, b: np.ndarray = INPUT1) -> list[Any]:
    mod = lib(protocol)
    inputs = [mod.InferInput("INPUT0", list(a.shape), "INT32")]
    inputs.append(mod.InferInput("INPUT1", list(b.shape), "INT32"))
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def assert_simple(
    server: Server, result: Any, a: np.ndarray = INPUT0, b: np.ndarray = INPUT1
) -> None:
    expected = onnxruntime_simple(server, a, b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected[0])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected[1])
    np.testing.assert_array_equal(expected[0], a + b)  # and onnxruntime is right


def not_found(protocol: str) -> str:
    return "StatusCode.NOT_FOUND" if protocol == "grpc" else "404"


# -- the examples ----------------------------------------------------------------------------


def test_health_metadata(client: Any) -> None:
    """simple_*_health_metadata.py."""
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert not client.is_model_ready("simple_sequence")  # refused at load
    if isinstance(client, tg.InferenceServerClient):
        meta = client.get_model_metadata("simple", as_json=True)
    else:
        meta = client.get_model_metadata("simple")
    assert meta["name"] == "simple"
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]


def test_simple_infer(server: Server, client: Any, protocol: str) -> None:
    """simple_*_infer_client.py: both outputs requested, then none named (all come)."""
    mod = lib(protocol)
    outputs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", simple_inputs(protocol), outputs=outputs)
    assert_simple(server, result)
    assert_simple(server, client.infer("simple", simple_inputs(protocol), model_version="1"))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no_such_model", simple_inputs(protocol))
    assert str(caught.value.status()) == not_found(protocol)


def test_async_infer(server: Server, client: Any, protocol: str) -> None:
    """simple_*_async_infer_client.py: several requests in flight at once."""
    batches = [np.full((1, 16), i, dtype=np.int32) for i in range(6)]
    if protocol == "grpc":
        results: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
        for i, a in enumerate(batches):
            client.async_infer(
                "simple",
                simple_inputs(protocol, a),
                lambda result, error, i=i: results.put((i, result, error)),
            )
        answers = {}
        for _ in batches:
            i, result, error = results.get(timeout=WAIT)
            assert error is None
            answers[i] = result
    else:
        pending = [client.async_infer("simple", simple_inputs(protocol, a)) for a in batches]
        answers = {i: p.get_result(timeout=WAIT) for i, p in enumerate(pending)}
    for i, a in enumerate(batches):
        assert_simple(server, answers[i], a)


def test_streaming_infer_grpc(server: Server) -> None:
    """simple_grpc_stream_infer_client.py (HTTP has no streaming, as in Triton)."""
    client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    batches = [np.full((2, 16), i, dtype=np.int32) for i in range(5)]
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i, a in enumerate(batches):
            client.async_stream_infer(
                "simple", simple_inputs("grpc", a, np.ones_like(a)), request_id=str(i)
            )
        client.async_stream_infer("no_such_model", simple_inputs("grpc"), request_id="bad")
        for i, a in enumerate(batches):  # answered in order
            result, error = results.get(timeout=WAIT)
            assert error is None
            assert result.get_response().id == str(i)
            assert_simple(server, result, a, np.ones_like(a))
        result, error = results.get(timeout=WAIT)
        assert error is not None
        assert "no_such_model" in error.message()
    finally:
        client.stop_stream()
        client.close()


def test_shm_infer(server: Server, client: Any, protocol: str) -> None:
    """simple_*_shm_client.py: inputs and outputs in four system shared-memory regions."""
    mod = lib(protocol)
    size = INPUT0.nbytes
    tag = uuid.uuid4().hex[:8]
    handles = {
        name: shm.create_shared_memory_region(f"{name}_data", f"/{name}_{tag}", size)
        for name in ("input0", "input1", "output0", "output1")
    }
    try:
        shm.set_shared_memory_region(handles["input0"], [INPUT0])
        shm.set_shared_memory_region(handles["input1"], [INPUT1])
        client.unregister_system_shared_memory()
        for name in handles:
            client.register_system_shared_memory(f"{name}_data", f"/{name}_{tag}", size)
        inputs = [mod.InferInput("INPUT0", [1, 16], "INT32")]
        inputs.append(mod.InferInput("INPUT1", [1, 16], "INT32"))
        inputs[0].set_shared_memory("input0_data", size)
        inputs[1].set_shared_memory("input1_data", size)
        outputs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("output0_data", size)
        outputs[1].set_shared_memory("output1_data", size)
        client.infer("simple", inputs, outputs=outputs)
        expected = onnxruntime_simple(server, INPUT0, INPUT1)
        for name, want in zip(("output0", "output1"), expected, strict=True):
            got = shm.get_contents_as_numpy(handles[name], np.int32, [1, 16])
            np.testing.assert_array_equal(got, want)
        status = client.get_system_shared_memory_status()
        names = sorted(status.regions) if protocol == "grpc" else sorted(r["name"] for r in status)
        assert names == sorted(f"{name}_data" for name in handles)
    finally:
        client.unregister_system_shared_memory()
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)


def test_model_control(server: Server, client: Any, protocol: str) -> None:
    """simple_*_model_control.py, and the index's reason for a refused sequence model."""
    index = client.get_model_repository_index()
    entries = (
        [{"name": m.name, "state": m.state, "reason": m.reason} for m in index.models]
        if protocol == "grpc"
        else index
    )
    by_name = {e["name"]: e for e in entries}
    assert by_name["simple"]["state"] == "READY"
    assert by_name["simple_sequence"]["state"] == "UNAVAILABLE"
    assert "sequence" in by_name["simple_sequence"]["reason"]
    client.unload_model("simple")
    try:
        client.unload_model("simple")  # again: no error, as Triton's (clean-up code does it)
        assert not client.is_model_ready("simple")
        with pytest.raises(InferenceServerException) as caught:
            client.infer("simple", simple_inputs(protocol))
        assert str(caught.value.status()) == not_found(protocol)
    finally:
        client.load_model("simple")
    assert client.is_model_ready("simple")
    assert_simple(server, client.infer("simple", simple_inputs(protocol)))
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("simple_sequence")
    assert "sequence" in caught.value.message()
    # the example's end: it passes when loading a model the repository lacks says this
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("wrong_model_name")
    assert "failed to load" in caught.value.message()
    client.unload_model("wrong_model_name")  # Triton: unloading an unknown name succeeds


def test_statistics(client: Any, protocol: str) -> None:
    """simple_*_model_statistics (the example's checks: counts that grow)."""

    def stats() -> dict[str, Any]:
        if protocol == "grpc":
            answer = client.get_inference_statistics("simple", as_json=True)
        else:
            answer = client.get_inference_statistics("simple")
        (entry,) = answer["model_stats"]
        return entry

    before = stats()
    client.infer("simple", simple_inputs(protocol))
    after = stats()
    assert after["name"] == "simple"
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    success = after["inference_stats"]["success"]
    assert int(success["count"]) >= 1
    if protocol == "http":  # every field Triton's JSON has, which perf_analyzer reads by key
        assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}
        assert after["inference_stats"]["cache_miss"] == {"count": 0, "ns": 0}
        assert after["response_stats"] == {}
        assert after["memory_usage"] == []
    with pytest.raises(InferenceServerException) as caught:
        client.get_inference_statistics("no_such_model")
    assert str(caught.value.status()) == not_found(protocol)


def test_sequence_model_refusal_is_logged(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR),
        Server(repository, port=0, kserve_port=None, metrics_port=None) as server,
    ):
        served = [m.version.name for m in server.core.served()]
        assert served == ["classifier", "simple", "simple_string"]  # all but the sequence one
    refused = [r.getMessage() for r in caplog.records if "simple_sequence" in r.getMessage()]
    assert refused
    assert "sequence" in refused[0].split("simple_sequence", 1)[1]


def test_a_model_that_failed_to_load_says_why(server: Server, client: Any, protocol: str) -> None:
    """Asked for by name, a model that failed to load is not found, with its load error
    (the repository index's reason), not only the list of the others."""
    mod = lib(protocol)
    tensor = mod.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 1), np.int32))
    for call in (
        lambda: client.get_model_metadata("simple_sequence"),
        lambda: client.infer("simple_sequence", [tensor]),
    ):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert str(caught.value.status()) == not_found(protocol)
        message = caught.value.message()
        assert "'simple_sequence' is not served: it failed to load" in message
        assert "sequence_batching" in message


def test_image_classification_with_class_count(server: Server, client: Any, protocol: str) -> None:
    """image_client.py: the top classes as "score:index:label", Triton's format."""
    mod = lib(protocol)
    images = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    tensor = mod.InferInput("image", [2, 4], "FP32")
    tensor.set_data_from_numpy(images)
    wanted = mod.InferRequestedOutput("scores", class_count=3)
    result = client.infer("classifier", [tensor], outputs=[wanted])
    got = result.as_numpy("scores")
    assert got.shape == (2, 3)
    session = ort.InferenceSession(str(server.core.get("classifier").version.path))
    (scores,) = session.run(["scores"], {"image": images})
    for row, row_scores in zip(got, scores, strict=True):
        top = np.argsort(-row_scores, kind="stable")[:3]
        fields = [item.decode().split(":") for item in row]
        assert [f[1:] for f in fields] == [[str(i), LABELS[i]] for i in top]
        for (score, *_), index in zip(fields, top, strict=True):
            assert float(score) == pytest.approx(row_scores[index], abs=1e-5)


def test_class_count_of_zero_rows_is_an_empty_answer(
    server: Server, client: Any, protocol: str
) -> None:
    """No rows in, no rows out: a [0, class_count] BYTES tensor, not a server error."""
    mod = lib(protocol)
    tensor = mod.InferInput("image", [0, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((0, 4), np.float32))
    wanted = mod.InferRequestedOutput("scores", class_count=3)
    result = client.infer("classifier", [tensor], outputs=[wanted])
    assert result.as_numpy("scores").shape == (0, 3)


def invalid_argument(protocol: str) -> str:
    return "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"


def test_class_count_of_a_bytes_output_is_refused(
    server: Server, client: Any, protocol: str
) -> None:
    """Classification ranks numbers (Triton's too): asked of a BYTES output, an
    invalid-argument error naming the output, before the model runs; not a 500."""
    mod = lib(protocol)
    tensor = mod.InferInput("INPUT0", [1, 16], "BYTES")
    tensor.set_data_from_numpy(np.array([[f"v{i}" for i in range(16)]], dtype=object))
    wanted = mod.InferRequestedOutput("OUTPUT0", class_count=2)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("simple_string", [tensor], outputs=[wanted])
    assert str(caught.value.status()) == invalid_argument(protocol)
    assert "'OUTPUT0'" in str(caught.value.message())
    assert "BYTES" in str(caught.value.message())


@pytest.mark.parametrize("case", ["grpc", "http-binary", "http-json"])
def test_string_infer(server: Server, case: str) -> None:
    """simple_*_string_infer_client.py: BYTES tensors both ways."""
    strings = np.array([[f"event {i * 16 + j}" for j in range(16)] for i in range(2)], object)
    if case == "grpc":
        client: Any = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
        tensor = tg.InferInput("INPUT0", [2, 16], np_to_triton_dtype(strings.dtype))
        tensor.set_data_from_numpy(strings)
        outputs = [tg.InferRequestedOutput("OUTPUT0")]
    else:
        binary = case == "http-binary"
        client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        tensor = th.InferInput("INPUT0", [2, 16], np_to_triton_dtype(strings.dtype))
        tensor.set_data_from_numpy(strings, binary_data=binary)
        outputs = [th.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    try:
        result = client.infer("simple_string", [tensor], outputs=outputs)
    finally:
        client.close()
    got = result.as_numpy("OUTPUT0")
    assert got.shape == (2, 16)
    decoded = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in got]
    assert decoded == strings.tolist()
