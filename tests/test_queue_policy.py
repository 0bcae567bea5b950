"""Triton's queue policies: queue timeouts (REJECT, DELAY), per-request overrides, priorities.

A real server runs ``sleepy``, a one-instance model whose request says how long it runs (an
ONNX ``Loop`` of ``n`` small matrix products, calibrated on this machine), so that one slow
request keeps the instance busy while the others wait in the queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.grpc as tg
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from arrowinfer import tensors
from arrowinfer.client import Client
from arrowinfer.errors import ModelError, ServerUnavailable
from arrowinfer.examples import IR_VERSION, OPSET, write_example_repository
from arrowinfer.repository import load_model
from arrowinfer.server import Server

WAIT = 60.0  # the most any one answer may take: bounds every test, never a sleep
SLOW_S = 1.0  # how long the slow request keeps the instance busy
TIMEOUT_US = 200_000


def sleepy_model() -> onnx.ModelProto:
    """``y = sum(tanh(... tanh(x0 @ w) ...))``, ``n`` times: ``n`` INT64 [1] -> ``y`` FP32 [1]."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["x_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [128, 128]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [128, 128]),
        ],
        [numpy_helper.from_array(np.eye(128, dtype=np.float32), "w")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["n"], ["trips"]),
            helper.make_node("Loop", ["trips", "true", "x0"], ["x"], body=body),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
            helper.make_node("Reshape", ["total", "shape1"], ["y"]),
        ],
        "sleepy",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.full((128, 128), 0.01, np.float32), "x0"),
            numpy_helper.from_array(np.array([1], np.int64), "shape1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


POLICIES = {
    "reject": "default_queue_policy { timeout_action: REJECT "
    f"default_timeout_microseconds: {TIMEOUT_US} }}",
    "delay": f"default_queue_policy {{ timeout_action: DELAY default_timeout_microseconds: "
    f"{TIMEOUT_US} }}",
    "override": "default_queue_policy { allow_timeout_override: true }",
    "no_override": "default_queue_policy { }",
    "priorities": "priority_levels: 2 default_priority_level: 2",
}


def slow_trips_for(seconds: float) -> int:
    """The loop count of ``sleepy_model`` that keeps this machine busy for about ``seconds``."""
    session = ort.InferenceSession(sleepy_model().SerializeToString())
    trips = 500
    times = []
    for _ in range(5):  # the fastest run: on a busy machine the slow request only gets slower
        start = time.perf_counter()
        session.run(None, {"n": np.array([trips], np.int64)})
        times.append(time.perf_counter() - start)
    return int(seconds / max(min(times) / trips, 1e-7))


@pytest.fixture(scope="module")
def slow_trips() -> int:
    """The loop count that keeps this machine busy for about SLOW_S seconds."""
    return slow_trips_for(SLOW_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("queues")
    model = sleepy_model()
    for name, policy in POLICIES.items():
        (repo / name / "1").mkdir(parents=True)
        onnx.save(model, str(repo / name / "1" / "model.onnx"))
        (repo / name / "config.pbtxt").write_text(
            "max_batch_size: 0\n"
            'input [ { name: "n" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
            f"dynamic_batching {{ {policy} }}\n"
        )
    with Server(repo, port=0, kserve_port=0, metrics_port=None) as running:
        yield running


def trips(n: int) -> dict[str, np.ndarray]:
    return {"n": np.array([[n]], np.int64)}


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def start_slow(server: Server, model: str, n: int) -> Future[Any]:
    """A request that holds the model's one instance; returns once the instance took it.

    Submitted to the server's core in-process (what every front end calls), so that it is
    queued before this returns and the wait below sees it leave the queue.
    """
    loaded = server.core.get(model)
    batch = pa.RecordBatch.from_arrays([tensors.from_numpy(trips(n)["n"])], ["n"])
    slow = server.core.submit(loaded, batch)
    wait_for(lambda: loaded.batcher.queued == 0, "the slow request to leave the queue")
    return slow


def test_reject_answers_at_once_while_the_instance_is_busy(server: Server, slow_trips: int) -> None:
    # retries=0: a queue timeout, like a full queue, is an error another server might not
    # have (ServerUnavailable), which the client would otherwise retry
    with Client(server.location, retries=0) as client:
        client.infer("reject", trips(1))  # connected, the stream open: only the queue counts
        slow = start_slow(server, "reject", slow_trips)
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="Request timeout expired"):
            client.infer("reject", trips(1), timeout=WAIT)
        waited = time.monotonic() - start
        # answered at its timeout, not when the slow request ahead finished
        assert not slow.done()
        assert waited + 0.01 >= TIMEOUT_US / 1e6
        slow.result(WAIT)
    # over KServe too, with Triton's status code
    with tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as triton:
        tensor = tg.InferInput("n", [1], "INT64")
        tensor.set_data_from_numpy(np.array([1], np.int64))
        triton.infer("reject", [tensor], client_timeout=WAIT)
        slow = start_slow(server, "reject", slow_trips)
        with pytest.raises(InferenceServerException) as caught:
            triton.infer("reject", [tensor], client_timeout=WAIT)
        assert not slow.done()
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        assert "Request timeout expired" in caught.value.message()
        slow.result(WAIT)


def test_delay_runs_the_request_after_all(server: Server, slow_trips: int) -> None:
    with Client(server.location) as client:
        slow = start_slow(server, "delay", slow_trips)
        late = client.infer_async("delay", trips(3))
        wait_for(slow.done, "the slow request")
        assert np.isfinite(late.result(WAIT).column("y").to_numpy()).all()
        slow.result(WAIT)


def _kserve_call(server: Server, model: str, **options: Any) -> Any:
    tensor = tg.InferInput("n", [1], "INT64")
    tensor.set_data_from_numpy(np.array([1], np.int64))
    with tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as triton:
        return triton.infer(model, [tensor], client_timeout=WAIT, **options)


def test_request_timeout_needs_allow_timeout_override(server: Server, slow_trips: int) -> None:
    slow = start_slow(server, "override", slow_trips)
    with pytest.raises(InferenceServerException, match="Request timeout expired"):
        _kserve_call(server, "override", timeout=100_000)  # microseconds
    assert not slow.done()
    slow.result(WAIT)
    # the same timeout for a model whose policy does not allow it: it waits its turn
    slow = start_slow(server, "no_override", slow_trips)
    result = _kserve_call(server, "no_override", timeout=100_000)
    assert slow.done()  # the server finished it before this one
    assert np.isfinite(result.as_numpy("y")).all()


def test_priority_levels_serve_level_one_first(server: Server, slow_trips: int) -> None:
    model = server.core.get("priorities")
    ran: list[str] = []  # appended by the model's instance, in the order it ran them
    slow = start_slow(server, "priorities", slow_trips // 2)
    futures = []
    # the core the front ends call, as KServe's ``priority`` parameter reaches it
    for name, priority in [("low-a", 0), ("low-b", 2), ("high", 1), ("beyond", 7)]:
        batch = pa.RecordBatch.from_arrays([tensors.from_numpy(trips(1)["n"])], ["n"])
        future = server.core.submit(model, batch, priority=priority)
        future.add_done_callback(lambda _, name=name: ran.append(name))
        futures.append(future)
    assert not slow.done()
    for future in futures:
        future.result(WAIT)
    slow.result(WAIT)
    # 0 and levels beyond priority_levels take default_priority_level (2), as in Triton
    assert ran == ["high", "low-a", "low-b", "beyond"]
    # and over KServe the parameter is accepted
    assert np.isfinite(_kserve_call(server, "priorities", priority=1).as_numpy("y")).all()


# -- config fields: implemented, warned about, or refused -----------------------------------


def test_unimplemented_config_fields_are_named_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    onnx.save(sleepy_model(), str(tmp_path / "m" / "1" / "model.onnx"))
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(
        "max_batch_size: 0\n"
        "response_cache { enable: true }\n"
        "optimization { graph { level: 1 } }\n"
        'input [ { name: "n" data_type: TYPE_INT64 dims: [ 1 ] is_shape_tensor: true } ]\n'
        "dynamic_batching { preserve_ordering: true default_queue_policy { max_queue_size: 4 } }\n"
    )
    with caplog.at_level(logging.WARNING, logger="arrowinfer.repository"):
        load_model(tmp_path / "m")
    warned = caplog.text
    for field in ("response_cache", "optimization", "input.is_shape_tensor"):
        assert field in warned
    assert "preserve_ordering" not in warned
    assert "max_queue_size" not in warned
    # a model that needs what is missing is refused, naming the field
    config.write_text(
        "max_batch_size: 0\nsequence_batching { }\n"
        'input [ { name: "n" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
    )
    with pytest.raises(ModelError, match="sequence_batching"):
        load_model(tmp_path / "m")
    config.write_text(
        "max_batch_size: 0\ndynamic_batching { priority_levels: 2 default_priority_level: 3 }\n"
    )
    with pytest.raises(ModelError, match="default_priority_level"):
        load_model(tmp_path / "m")


def test_example_configs_load_without_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = write_example_repository(tmp_path)
    with caplog.at_level(logging.WARNING, logger="arrowinfer.repository"):
        for model in sorted(p for p in repo.iterdir() if p.is_dir()):
            load_model(model)
    assert "does not implement" not in caplog.text
