"""Triton's ragged batching: ``allow_ragged_batch`` inputs and the ``batch_input`` tensors.

Requests of different lengths are concatenated into one execution without padding; the
model reads each row's extent from batch inputs the server makes. Checked on the backend
(several requests in one execution, against tensors built here without arrowinfer), over
Arrow Flight (lists), KServe gRPC and HTTP (``[1, n]`` tensors), and at load (configs that
cannot be served are refused, naming the file).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from onnx import TensorProto, helper

from arrowinfer.backends import create_backend
from arrowinfer.client import AsyncClient
from arrowinfer.errors import ModelError
from arrowinfer.examples import IR_VERSION, OPSET, write_example_repository
from arrowinfer.repository import Repository, load_model
from arrowinfer.server import Server

WAIT = 30.0
KINDS_CONFIG = """
name: "kinds"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
output [
  { name: "count" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "end" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "start" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "longest" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "total" data_type: TYPE_FP32 dims: [ 1 ] }
]
batch_input [
  { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_INT32 source_input: "x" },
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT target_name: "acc" data_type: TYPE_INT64
    source_input: "x" },
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO target_name: "offsets"
    data_type: TYPE_FP32 source_input: "x" },
  { kind: BATCH_MAX_ELEMENT_COUNT_AS_SHAPE target_name: "max_shape" data_type: TYPE_FP32
    source_input: "x" }
]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""


def kinds_onnx() -> bytes:
    """Echoes the four batch inputs per row, and the total of all values (1-D ``x``)."""

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(value, name)

    nodes = [
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["n_f", "axis1"], ["count"]),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["acc_f", "axis1"], ["end"]),
        helper.make_node("Slice", ["offsets", "zero", "minus1", "zero"], ["starts"]),
        helper.make_node("Unsqueeze", ["starts", "axis1"], ["start"]),
        helper.make_node("Shape", ["max_shape"], ["max_i"]),
        helper.make_node("Cast", ["max_i"], ["max_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["count", "zero_f"], ["zeros"]),
        helper.make_node("Add", ["zeros", "max_f"], ["longest"]),
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=1),
        helper.make_node("Add", ["zeros", "sum"], ["total"]),
    ]
    graph = helper.make_graph(
        nodes,
        "kinds",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["values"]),
            helper.make_tensor_value_info("n", TensorProto.INT32, ["rows"]),
            helper.make_tensor_value_info("acc", TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info("offsets", TensorProto.FLOAT, ["rows1"]),
            helper.make_tensor_value_info("max_shape", TensorProto.FLOAT, ["longest"]),
        ],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", 1])
            for name in ("count", "end", "start", "longest", "total")
        ],
        initializer=[
            const("axis1", np.array([1], np.int64)),
            const("zero", np.array([0], np.int64)),
            const("minus1", np.array([-1], np.int64)),
            const("zero_f", np.array(0.0, np.float32)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write(root: Path, name: str, config: str, model: bytes) -> Path:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").write_bytes(model)
    (root / name / "config.pbtxt").write_text(config.replace('name: "kinds"', f'name: "{name}"'))
    return root / name


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_example_repository(tmp_path_factory.mktemp("ragged"), models=["track_sum"])
    write(root, "kinds", KINDS_CONFIG, kinds_onnx())
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with Server(repository, port=0, kserve_port=0, http_port=0, metrics_port=None) as running:
        yield running


def lists(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.exponential(3.0, size=n).astype(np.float32) for n in lengths]


def track_sum_reference(server: Server, events: list[np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime on the model file, with the concatenation and offsets made here."""
    session = ort.InferenceSession(str(server.core.get("track_sum").version.path))
    pt = np.concatenate(events) if events else np.zeros(0, np.float32)
    offsets = np.cumsum([0] + [len(e) for e in events]).astype(np.int32)
    score, n_tracks = session.run(["score", "n_tracks"], {"pt": pt, "offsets": offsets})
    return {"score": score, "n_tracks": n_tracks}


# -- the batch inputs, on the backend --------------------------------------------------------


def test_batch_input_kinds_over_several_requests(repository: Path) -> None:
    """Three requests of 2, 1 and 2 rows in one execution: every kind, per row."""
    version = Repository(repository).load("kinds")[0]
    backend = create_backend(version)
    try:
        requests = [
            pa.RecordBatch.from_arrays([pa.array(rows, pa.list_(pa.float32()))], ["x"])
            for rows in ([[1, 2, 3], []], [[4] * 5], [[0.5], [1, 1]])
        ]
        results, _ = backend.execute(requests)
    finally:
        backend.close()
    merged = pa.Table.from_batches(results).combine_chunks()
    column = {name: merged.column(name).to_pylist() for name in merged.column_names}
    assert column["count"] == [3, 0, 5, 1, 2]  # BATCH_ELEMENT_COUNT
    assert column["end"] == [3, 3, 8, 9, 11]  # BATCH_ACCUMULATED_ELEMENT_COUNT
    assert column["start"] == [0, 3, 3, 8, 9]  # ..._WITH_ZERO without its last entry
    assert column["longest"] == [5] * 5  # BATCH_MAX_ELEMENT_COUNT_AS_SHAPE: its shape
    assert column["total"] == [28.5] * 5  # every value once: concatenated, no padding
    assert [len(r) for r in results] == [2, 1, 2]  # each request its own rows back


def test_item_shapes_count_values(tmp_path: Path) -> None:
    """A ragged-batch input of items [-1, 2]: counts are values, as Triton counts elements."""
    config = KINDS_CONFIG.replace("dims: [ -1 ] allow", "dims: [ -1, 2 ] allow")
    version = load_model(write(tmp_path, "pairs", config, kinds_onnx()))[0]
    backend = create_backend(version)
    try:
        column = pa.array([[[1, 2], [3, 4]], [[5, 6]]], pa.list_(pa.list_(pa.float32(), 2)))
        (result,), _ = backend.execute([pa.RecordBatch.from_arrays([column], ["x"])])
    finally:
        backend.close()
    assert result.column("count").to_pylist() == [4, 2]
    assert result.column("total").to_pylist() == [21, 21]


# -- the example, over every transport --------------------------------------------------


def test_track_sum_over_flight(server: Server) -> None:
    """Concurrent Flight requests of different lengths, batched without padding."""
    batches = [lists(n, seed=i) for i, n in enumerate([[3, 0, 7], [1], [12, 4], [0]])]

    async def run() -> list[pa.RecordBatch]:
        async with AsyncClient(server.location) as client:
            return await asyncio.gather(
                *(
                    client.infer(
                        "track_sum",
                        pa.RecordBatch.from_arrays(
                            [pa.array([e.tolist() for e in events], pa.list_(pa.float32()))],
                            ["pt"],
                        ),
                    )
                    for events in batches
                )
            )

    results = asyncio.run(asyncio.wait_for(run(), WAIT))
    for events, result in zip(batches, results, strict=True):
        expected = track_sum_reference(server, events)
        got_score = np.array(result.column("score").to_pylist(), np.float32)
        # each event is summed alone in the model: batched with others, the same bits
        np.testing.assert_array_equal(got_score, expected["score"][:, 0])
        got_n = result.column("n_tracks").to_pylist()
        assert got_n == [len(e) for e in events]
        assert np.isfinite(got_score).all()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_track_sum_over_kserve(server: Server, protocol: str) -> None:
    """Requests [1, n] of different n, in flight together, as Triton's clients send them."""
    events = lists([5, 1, 9, 3, 0, 2], seed=7)
    mod = tg if protocol == "grpc" else th
    port = server.kserve_port if protocol == "grpc" else server.http_port
    client = mod.InferenceServerClient(
        f"127.0.0.1:{port}", **({} if mod is tg else {"concurrency": 6})
    )
    try:
        inputs = []
        for event in events:
            tensor = mod.InferInput("pt", [1, len(event)], "FP32")
            tensor.set_data_from_numpy(event[np.newaxis])
            inputs.append([tensor])
        if mod is tg:
            answers: list[Any] = [None] * len(events)
            done: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
            for i, tensors in enumerate(inputs):
                client.async_infer(
                    "track_sum",
                    tensors,
                    lambda result, error, i=i: done.put((i, result, error)),
                )
            for _ in events:
                i, result, error = done.get(timeout=WAIT)
                assert error is None
                answers[i] = result
        else:
            pending = [client.async_infer("track_sum", tensors) for tensors in inputs]
            answers = [p.get_result(timeout=WAIT) for p in pending]
    finally:
        client.close()
    for event, answer in zip(events, answers, strict=True):
        expected = track_sum_reference(server, [event])
        np.testing.assert_array_equal(answer.as_numpy("score"), expected["score"])
        assert answer.as_numpy("n_tracks").tolist() == [[float(len(event))]]


# -- refused configs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("max_batch_size: 64", "max_batch_size: 0"), "needs batching"),
        (("kind: BATCH_ELEMENT_COUNT", "kind: BATCH_ITEM_SHAPE"), "is not served"),
        (
            (
                'source_input: "x" },\n  { kind: BATCH_ACC',
                'source_input: "y" },\n  { kind: BATCH_ACC',
            ),
            "not an input with allow_ragged_batch",
        ),
        (("data_type: TYPE_INT32 source", "data_type: TYPE_FP16 source"), "data_type"),
        ((" allow_ragged_batch: true", ""), "not an input with allow_ragged_batch"),
    ],
    ids=["no-batching", "kind", "source", "data-type", "not-ragged"],
)
def test_configs_that_cannot_be_served(tmp_path: Path, change: tuple[str, str], words: str) -> None:
    old, new = change
    assert old in KINDS_CONFIG
    with pytest.raises(ModelError, match=words) as caught:
        load_model(write(tmp_path, "bad", KINDS_CONFIG.replace(old, new), kinds_onnx()))
    assert "config.pbtxt" in str(caught.value) or "model.onnx" in str(caught.value)
