"""The dynamic batcher has Triton's semantics: merge, delay, preferred sizes, queue bound, split.

Most tests drive the batcher with a real :class:`~arrowinfer.backends.Backend` subclass that
doubles its input and records what each ``execute`` got, and that can hold executions on an
event, so that requests pile up in the queue in a known order before any is scheduled. No
test sleeps: each waits on events, semaphores or futures, with timeouts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from arrowinfer.backends import Backend, Timings, create_backend
from arrowinfer.batching import Completed, DynamicBatcher, ModelStatistics, Submission, _choose
from arrowinfer.errors import (
    InvalidInput,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    TransportError,
)
from arrowinfer.examples import IR_VERSION, OPSET
from arrowinfer.repository import ModelVersion, load_model

WAIT = 10.0  # seconds: the most any test waits for something that should happen at once
LONG_DELAY_US = 10_000_000  # a queue delay no test may sit out (10 s)
BAD = -1.0  # a request holding this value is refused by the backend (InvalidInput)
BOOM = -2.0  # ... makes the backend crash (a bug, not the request's fault)
TIMINGS = Timings(10, 20, 30)

MakeModel = Callable[..., ModelVersion]
Start = Callable[..., "tuple[DynamicBatcher, Doubling]"]
Batchers = list["tuple[DynamicBatcher, list[Doubling]]"]


# -- a model, an instrumented backend, requests ------------------------------------------------


def _write_model(directory: Path) -> None:
    """``y = 2 * x``, one float per batch entry, batch dimension first."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y])
    graph.initializer.append(two)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    (directory / "1").mkdir(parents=True)
    onnx.save(model, str(directory / "1" / "model.onnx"))


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., ModelVersion]:
    """A ``double`` model version whose config has the given batching settings."""
    count = iter(range(1000))

    def make(
        *, max_batch_size: int = 8, dynamic_batching: str | None = "", instances: int = 1
    ) -> ModelVersion:
        name = f"double{next(count)}"
        _write_model(tmp_path / name)
        lines = [
            f'name: "{name}"',
            'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch_size}",
            'input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]',
            'output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]',
            f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]",
        ]
        if dynamic_batching is not None:
            lines.append(f"dynamic_batching {{ {dynamic_batching} }}")
        (tmp_path / name / "config.pbtxt").write_text("\n".join(lines) + "\n")
        (version,) = load_model(tmp_path / name)
        return version

    return make


class Doubling(Backend):
    """Doubles ``x`` into ``y``; records each call; can hold calls, refuse or crash."""

    def __init__(self, model: ModelVersion, barrier: threading.Barrier | None = None):
        super().__init__(model)
        self.calls: list[list[pa.RecordBatch]] = []
        self.entered = threading.Semaphore(0)  # released once per call, before any hold
        self.hold = threading.Event()  # cleared: calls wait until it is set again
        self.hold.set()
        self.barrier = barrier
        self.closed = False
        self._lock = threading.Lock()

    @property
    def rows(self) -> list[list[int]]:
        """Row counts of the requests of each call, in call order."""
        with self._lock:
            return [[r.num_rows for r in call] for call in self.calls]

    @property
    def requests(self) -> list[pa.RecordBatch]:
        """Every request any call got, in call order."""
        with self._lock:
            return [r for call in self.calls for r in call]

    def execute(self, requests: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], Timings]:
        with self._lock:
            self.calls.append(list(requests))
        self.entered.release()
        if not self.hold.wait(WAIT):
            raise RuntimeError("held for too long")
        if self.barrier is not None:
            self.barrier.wait(WAIT)  # BrokenBarrierError unless another instance joins
        values = [r.column("x").to_numpy() for r in requests]
        for value in values:
            if (value == BOOM).any():
                raise RuntimeError("the backend crashed")
        for i, value in enumerate(values):
            if (value == BAD).any():
                raise InvalidInput(f"request {i} is bad", model=self.model.name, input="x")
        results = [
            pa.RecordBatch.from_arrays([pa.array(2 * v)], schema=self.model.outputs) for v in values
        ]
        return results, TIMINGS

    def close(self) -> None:
        self.closed = True


def request(ident: int, rows: int) -> pa.RecordBatch:
    """``rows`` entries whose values say which request and row they are."""
    # np.float32: under numpy < 2 a Python int above 65535 would promote the sum to float64
    x = np.arange(rows, dtype=np.float32) + np.float32(1000 * ident)
    return pa.RecordBatch.from_arrays([pa.array(x)], names=["x"])


def expected(batch: pa.RecordBatch) -> list[float]:
    return [2 * v for v in batch.column("x").to_pylist()]


def result(future: Future[Completed], timeout: float = WAIT) -> list[float]:
    done = future.result(timeout)
    assert isinstance(done, Completed)
    assert done.batch.schema.names == ["y"]
    return done.batch.column("y").to_pylist()


@pytest.fixture
def batchers() -> Iterator[Batchers]:
    """Batchers to close after the test, with their backends (held ones are released)."""
    made: Batchers = []
    yield made
    for batcher, backends in made:
        for backend in backends:
            backend.hold.set()
        batcher.close(timeout=WAIT)


@pytest.fixture
def start(
    batchers: Batchers,
) -> Start:
    """A batcher over one ``Doubling`` backend per configured instance (the first returned)."""

    def make(model: ModelVersion, *, held: bool = False) -> tuple[DynamicBatcher, Doubling]:
        count = model.config.instance_group[0].count if model.config.instance_group else 1
        backends = [Doubling(model) for _ in range(count)]
        if held:
            backends[0].hold.clear()
        batcher = DynamicBatcher(model, backends)
        batchers.append((batcher, backends))
        return batcher, backends[0]

    return make


def hold_first(batcher: DynamicBatcher, backend: Doubling, rows: int = 1) -> Future[Completed]:
    """Submit a request and wait until the (held) backend is executing it."""
    future = batcher.submit(request(999, rows))
    assert backend.entered.acquire(timeout=WAIT)
    return future


# -- merging and splitting back ----------------------------------------------------------------


def test_queued_requests_merge_up_to_max_batch_size_and_split_back_in_order(
    make_model: MakeModel, start: Start
) -> None:
    batcher, backend = start(make_model(max_batch_size=4, dynamic_batching=""), held=True)
    first = hold_first(batcher, backend)
    sizes = [1, 2, 1, 3, 2, 1, 1]
    batches = [request(i, n) for i, n in enumerate(sizes)]
    futures = [batcher.submit(b) for b in batches]
    assert batcher.queued == len(sizes)
    backend.hold.set()
    for batch, future in zip(batches, futures, strict=True):
        assert result(future) == expected(batch)
    assert result(first) == expected(request(999, 1))
    # the longest prefix that fits in 4 rows, every time; requests are never reordered
    assert backend.rows == [[1], [1, 2, 1], [3], [2, 1, 1]]
    # the batcher hands the backend the clients' record batches as they are: no per-event work
    got = backend.requests[1:]
    assert len(got) == len(batches)
    assert all(a is b for a, b in zip(got, batches, strict=True))


def test_preferred_batch_size_cuts_the_batch(make_model: MakeModel, start: Start) -> None:
    model = make_model(
        dynamic_batching=(
            f"preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: {LONG_DELAY_US}"
        )
    )
    batcher, backend = start(model, held=True)
    first = hold_first(batcher, backend, rows=4)  # the largest preferred size: no wait
    futures = [batcher.submit(request(i, 1)) for i in range(5)]
    began = time.monotonic()
    backend.hold.set()
    for i, future in enumerate(futures[:4]):
        assert result(future, timeout=LONG_DELAY_US / 2e6) == expected(request(i, 1))
    assert time.monotonic() - began < LONG_DELAY_US / 2e6
    assert len(result(first)) == 4
    # 5 rows would fit in max_batch_size 8, but 4 is the largest preferred size formed
    assert backend.rows == [[4], [1, 1, 1, 1]]
    assert not futures[4].done()  # alone, it waits for more requests or for its delay


def test_reaching_the_largest_preferred_size_ends_the_wait(
    make_model: MakeModel, start: Start
) -> None:
    model = make_model(
        dynamic_batching=(
            f"preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: {LONG_DELAY_US}"
        )
    )
    batcher, backend = start(model)
    began = time.monotonic()
    a = batcher.submit(request(0, 2))
    b = batcher.submit(request(1, 2))
    assert result(a, timeout=LONG_DELAY_US / 2e6) == expected(request(0, 2))
    assert result(b, timeout=LONG_DELAY_US / 2e6) == expected(request(1, 2))
    assert time.monotonic() - began < LONG_DELAY_US / 2e6
    assert backend.rows == [[2, 2]]


def test_max_queue_delay_bounds_the_wait_of_a_lone_request(
    make_model: MakeModel, start: Start
) -> None:
    delay_us = 50_000
    batcher, backend = start(
        make_model(dynamic_batching=f"max_queue_delay_microseconds: {delay_us}")
    )
    future = batcher.submit(request(0, 3))
    done = future.result(WAIT)
    assert done.batch.column("y").to_pylist() == expected(request(0, 3))
    assert done.queue_ns >= delay_us * 1000  # it did wait for others to join ...
    assert backend.rows == [[3]]  # ... and then ran alone


def test_without_dynamic_batching_each_request_runs_alone(
    make_model: MakeModel, start: Start
) -> None:
    batcher, backend = start(make_model(dynamic_batching=None), held=True)
    first = hold_first(batcher, backend)
    sizes = [3, 1, 2, 1]
    futures = [batcher.submit(request(i, n)) for i, n in enumerate(sizes)]
    backend.hold.set()
    for i, (n, future) in enumerate(zip(sizes, futures, strict=True)):
        assert result(future) == expected(request(i, n))
    result(first)
    assert backend.rows == [[1], *([n] for n in sizes)]


# -- the queue bound ---------------------------------------------------------------------------


def test_a_full_queue_answers_server_busy_at_once(make_model: MakeModel, start: Start) -> None:
    model = make_model(dynamic_batching="default_queue_policy { max_queue_size: 2 }")
    batcher, backend = start(model, held=True)
    first = hold_first(batcher, backend)
    futures = [batcher.submit(request(i, 1)) for i in range(2)]
    assert batcher.queued == 2
    began = time.monotonic()
    with pytest.raises(ServerBusy) as raised:
        batcher.submit(request(2, 1))
    assert time.monotonic() - began < 1.0
    assert isinstance(raised.value, ServerUnavailable)
    assert isinstance(raised.value, TransportError)
    message = str(raised.value)
    assert model.name in message
    assert "queue" in message
    assert "busy" in message
    assert batcher.queued == 2  # nothing was queued
    backend.hold.set()
    assert result(first) == expected(request(999, 1))
    for i, future in enumerate(futures):
        assert result(future) == expected(request(i, 1))
    assert [r.num_rows for r in backend.requests] == [1, 1, 1]  # the refused one never ran
    assert result(batcher.submit(request(3, 1))) == expected(request(3, 1))  # room again


def test_a_request_split_in_more_parts_than_max_queue_size_is_served(
    make_model: MakeModel, start: Start
) -> None:
    model = make_model(
        max_batch_size=4, dynamic_batching="default_queue_policy { max_queue_size: 2 }"
    )
    batcher, _ = start(model)
    batch = request(0, 10)  # three parts in an empty queue
    assert result(batcher.submit(batch)) == expected(batch)


# -- splitting requests larger than max_batch_size ---------------------------------------------


@pytest.mark.parametrize("rows", [5, 8, 10, 13])
def test_a_request_larger_than_max_batch_size_is_split_and_rejoined(
    make_model: MakeModel, start: Start, rows: int
) -> None:
    batcher, backend = start(make_model(max_batch_size=4))
    batch = request(7, rows)
    done = batcher.submit(batch).result(WAIT)
    assert done.batch.num_rows == rows
    assert done.batch.column("y").to_pylist() == expected(batch)
    assert done.compute_infer_ns == TIMINGS.compute_infer_ns * -(-rows // 4)
    parts = [r.num_rows for r in backend.requests]
    assert parts == [4] * (rows // 4) + ([rows % 4] if rows % 4 else [])
    assert all(sum(call) <= 4 for call in backend.rows)
    # the parts are slices of the client's batch, not copies
    original = batch.column("x").to_numpy()
    for part in backend.requests:
        assert np.shares_memory(part.column("x").to_numpy(), original)


def test_a_split_request_fails_when_one_of_its_parts_fails(
    make_model: MakeModel, start: Start
) -> None:
    batcher, _ = start(make_model(max_batch_size=4))
    x = np.arange(10, dtype=np.float32)
    x[6] = BAD
    with pytest.raises(InvalidInput, match="bad"):
        batcher.submit(pa.RecordBatch.from_arrays([pa.array(x)], names=["x"])).result(WAIT)
    assert result(batcher.submit(request(1, 10))) == expected(request(1, 10))


# -- failures ----------------------------------------------------------------------------------


def test_a_bad_request_fails_alone(make_model: MakeModel, start: Start) -> None:
    batcher, backend = start(make_model(), held=True)
    first = hold_first(batcher, backend)
    good = [request(0, 2), request(1, 1)]
    bad_batch = pa.RecordBatch.from_arrays([pa.array([5.0, BAD], pa.float32())], names=["x"])
    futures = [batcher.submit(good[0]), batcher.submit(bad_batch), batcher.submit(good[1])]
    backend.hold.set()
    assert result(futures[0]) == expected(good[0])
    assert result(futures[2]) == expected(good[1])
    with pytest.raises(InvalidInput) as raised:
        futures[1].result(WAIT)
    assert "request 0 is bad" in str(raised.value)  # the error of its own, lone, execution
    assert model_name_in(raised.value, batcher)
    result(first)
    # the merged batch failed, so each of its requests ran again on its own
    assert backend.rows == [[1], [2, 2, 1], [2], [2], [1]]
    stats = batcher.statistics.as_dict()["inference_stats"]
    assert stats["fail"]["count"] == 1
    assert stats["success"]["count"] == 3
    # the batcher goes on serving
    assert result(batcher.submit(request(3, 1))) == expected(request(3, 1))


def model_name_in(error: BaseException, batcher: DynamicBatcher) -> bool:
    return batcher.model.name in str(error)


def test_a_crashing_request_fails_alone_with_server_error_and_the_batcher_keeps_serving(
    make_model: MakeModel, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # any failure of a merged batch (here a plain Python error, not arrowinfer's own) makes
    # its requests run again one by one: only the request that crashes on its own fails
    batcher, backend = start(make_model(), held=True)
    first = hold_first(batcher, backend)
    crash = pa.RecordBatch.from_arrays([pa.array([BOOM], pa.float32())], names=["x"])
    futures = [batcher.submit(request(0, 1)), batcher.submit(crash), batcher.submit(request(2, 2))]
    backend.hold.set()
    assert result(futures[0]) == expected(request(0, 1))
    assert result(futures[2]) == expected(request(2, 2))
    with pytest.raises(ServerError) as raised:
        futures[1].result(WAIT)
    assert model_name_in(raised.value, batcher)
    assert "the backend crashed" in str(raised.value)
    assert "execution failed" in caplog.text
    result(first)
    assert backend.rows[1:] == [[1, 1, 2], [1], [1], [2]]
    assert result(batcher.submit(request(1, 2))) == expected(request(1, 2))
    stats = batcher.statistics.as_dict()["inference_stats"]
    assert stats["fail"]["count"] == 1
    assert stats["success"]["count"] == 4


class WrongCount(Doubling):
    def execute(self, requests: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], Timings]:
        results, timings = super().execute(requests)
        if len(requests) == 2:
            return results[:1], timings
        if any(r.column("x")[0].as_py() == BAD + 10 for r in requests):
            return [results[0].slice(0, 0)], timings  # a result without the request's rows
        return results, timings


def test_a_backend_returning_the_wrong_number_of_results_or_rows_is_caught(
    make_model: MakeModel,
) -> None:
    # a merged batch with too few results runs again request by request (each then gets
    # its own, right result); a lone request whose result lacks its rows fails
    model = make_model()
    backend = WrongCount(model)
    backend.hold.clear()
    batcher = DynamicBatcher(model, [backend])
    try:
        first = hold_first(batcher, backend)
        futures = [batcher.submit(request(i, 1)) for i in range(2)]
        backend.hold.set()
        result(first)
        for i, future in enumerate(futures):
            assert result(future) == expected(request(i, 1))
        assert [len(r) for r in backend.rows[1:]] == [2, 1, 1]
        short = pa.RecordBatch.from_arrays([pa.array([BAD + 10], pa.float32())], names=["x"])
        with pytest.raises(ServerError, match="0 rows for a request of 1"):
            batcher.submit(short).result(WAIT)
        assert result(batcher.submit(request(5, 1))) == expected(request(5, 1))
    finally:
        backend.hold.set()
        batcher.close(WAIT)


# -- model instances ---------------------------------------------------------------------------


def test_instance_group_count_runs_batches_in_parallel(
    make_model: MakeModel, batchers: Batchers
) -> None:
    model = make_model(dynamic_batching=None, instances=2)
    count = model.config.instance_group[0].count
    barrier = threading.Barrier(count)  # passes only when both instances execute at once
    backends = [Doubling(model, barrier) for _ in range(count)]
    batcher = DynamicBatcher(model, backends)
    batchers.append((batcher, backends))
    assert batcher.instances == 2
    futures = [batcher.submit(request(i, i + 1)) for i in range(2)]
    for i, future in enumerate(futures):
        assert result(future) == expected(request(i, i + 1))
    assert [len(b.calls) for b in backends] == [1, 1]


# -- running inline on an idle instance --------------------------------------------------------


class Threads(Doubling):
    """A ``Doubling`` backend that also records which thread ran each call."""

    def __init__(self, model: ModelVersion):
        super().__init__(model)
        self.threads: list[int] = []

    def execute(self, requests: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], Timings]:
        self.threads.append(threading.get_ident())
        return super().execute(requests)


def _threads_batcher(model: ModelVersion, batchers: Batchers) -> tuple[DynamicBatcher, Threads]:
    backend = Threads(model)
    batcher = DynamicBatcher(model, [backend])
    batchers.append((batcher, [backend]))
    return batcher, backend


@pytest.mark.parametrize("dynamic_batching", ["", "max_queue_delay_microseconds: 0", None])
def test_inline_runs_in_the_callers_thread_when_an_instance_is_idle(
    make_model: MakeModel, batchers: Batchers, dynamic_batching: str | None
) -> None:
    batcher, backend = _threads_batcher(make_model(dynamic_batching=dynamic_batching), batchers)
    future = batcher.submit(request(0, 1), inline=True)
    assert future.done()
    assert result(future) == expected(request(0, 1))
    assert backend.threads == [threading.get_ident()]
    stats = batcher.statistics.as_dict()
    assert stats["execution_count"] == 1
    assert stats["inference_stats"]["success"]["count"] == 1
    bad = batcher.submit(
        request(0, 1).set_column(0, "x", pa.array([BAD], pa.float32())), inline=True
    )
    with pytest.raises(InvalidInput):
        bad.result(0)
    assert batcher.statistics.as_dict()["inference_stats"]["fail"]["count"] == 1


def test_inline_is_queued_behind_a_busy_instance_and_keeps_the_order(
    make_model: MakeModel, batchers: Batchers
) -> None:
    batcher, backend = _threads_batcher(make_model(), batchers)
    backend.hold.clear()
    first = hold_first(batcher, backend)
    second = batcher.submit(request(1, 2), inline=True)
    assert not second.done()  # the one instance is busy: queued, not run here
    backend.hold.set()
    result(first)
    assert result(second) == expected(request(1, 2))
    assert backend.rows == [[1], [2]]
    assert threading.get_ident() not in backend.threads


def test_inline_is_queued_when_a_queue_delay_applies(
    make_model: MakeModel, batchers: Batchers
) -> None:
    model = make_model(dynamic_batching="max_queue_delay_microseconds: 1000")
    batcher, backend = _threads_batcher(model, batchers)
    assert result(batcher.submit(request(0, 1), inline=True)) == expected(request(0, 1))
    assert backend.threads
    assert threading.get_ident() not in backend.threads


def test_requests_submitted_together_run_inline_as_the_queue_would_batch_them(
    make_model: MakeModel, batchers: Batchers
) -> None:
    """What the HTTP front end does with the requests of one turn of its event loop: they
    run in the caller's thread, merged up to max_batch_size (8), requests of other shapes
    apart, and a bad request fails alone."""
    batcher, backend = _threads_batcher(make_model(), batchers)
    sizes = [3, 4, 2, 5, 1]
    batches = [request(i, n) for i, n in enumerate(sizes)]
    submissions = [Submission(b) for b in batches[:3]] + [
        Submission(b, shapes=((2,),)) for b in batches[3:]
    ]

    futures = batcher.submit_many(submissions, inline=True)

    assert all(f.done() for f in futures)
    for future, batch in zip(futures, batches, strict=True):
        assert result(future) == expected(batch)
    assert backend.rows == [[3, 4], [2], [5, 1]]  # 3+4+2 > 8; then another shape
    assert backend.threads == [threading.get_ident()] * 3
    stats = batcher.statistics.as_dict()
    assert (stats["execution_count"], stats["inference_count"]) == (3, sum(sizes))

    bad = request(7, 2).set_column(0, "x", pa.array([1.0, BAD], pa.float32()))
    futures = batcher.submit_many([Submission(request(5, 1)), Submission(bad)], inline=True)
    assert result(futures[0]) == expected(request(5, 1))
    with pytest.raises(InvalidInput):
        futures[1].result(0)


def test_requests_submitted_together_are_queued_behind_a_busy_instance(
    make_model: MakeModel, batchers: Batchers
) -> None:
    model = make_model(dynamic_batching="default_queue_policy { max_queue_size: 2 }")
    batcher, backend = _threads_batcher(model, batchers)
    backend.hold.clear()
    first = hold_first(batcher, backend)
    batches = [request(i, 1) for i in range(3)]

    futures = batcher.submit_many([Submission(b) for b in batches], inline=True)

    assert not futures[0].done()  # the one instance is busy: queued, not run here
    with pytest.raises(ServerBusy):  # the queue holds two: the third is refused
        futures[2].result(0)
    backend.hold.set()
    result(first)
    assert [result(f) for f in futures[:2]] == [expected(b) for b in batches[:2]]
    assert threading.get_ident() not in backend.threads


def test_expected_time_scales_the_latest_execution_by_rows(
    make_model: MakeModel, start: Start
) -> None:
    """What the HTTP front end reads before it runs a request on its event loop: a large
    request after a small one is expected to take longer, not as long as the small one."""
    batcher, _ = start(make_model())
    assert batcher.expected_ns(1) is None  # nothing has run: no estimate
    assert result(batcher.submit(request(0, 2))) == expected(request(0, 2))
    per_row = sum(TIMINGS) // 2
    assert batcher.expected_ns(2) == sum(TIMINGS)
    assert batcher.expected_ns(8) == 4 * sum(TIMINGS)
    assert batcher.expected_ns(1) == per_row
    assert batcher.expected_ns(0) == per_row  # at least one row's worth


def test_no_backend_is_an_error(make_model: MakeModel) -> None:
    with pytest.raises(ValueError, match="instance"):
        DynamicBatcher(make_model(), [])


# -- lifecycle ---------------------------------------------------------------------------------


def test_close_finishes_queued_requests_then_refuses_new_ones(make_model: MakeModel) -> None:
    # a long delay: without close the requests would wait for more to join
    model = make_model(dynamic_batching=f"max_queue_delay_microseconds: {LONG_DELAY_US}")
    backend = Doubling(model)
    batcher = DynamicBatcher(model, [backend])
    futures = [batcher.submit(request(i, 1)) for i in range(3)]
    began = time.monotonic()
    batcher.close(timeout=WAIT)
    assert time.monotonic() - began < LONG_DELAY_US / 2e6
    for i, future in enumerate(futures):
        assert future.done()
        assert result(future, timeout=0) == expected(request(i, 1))
    assert backend.rows == [[1, 1, 1]]
    assert backend.closed
    with pytest.raises(ServerUnavailable, match=model.name):
        batcher.submit(request(3, 1))


# -- statistics --------------------------------------------------------------------------------


def test_statistics_have_tritons_fields_and_count_what_ran(
    make_model: MakeModel, start: Start
) -> None:
    batcher, backend = start(make_model(), held=True)
    first = hold_first(batcher, backend, rows=2)
    futures = [batcher.submit(request(i, n)) for i, n in enumerate([1, 2, 1])]
    backend.hold.set()
    for future in [first, *futures]:
        result(future)
    assert backend.rows == [[2], [1, 2, 1]]

    stats = batcher.statistics.as_dict()
    json.dumps(stats)  # plain JSON
    assert set(stats) == {
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "response_stats",
        "batch_stats",
        "memory_usage",
        "arrowinfer",  # arrowinfer's own counters beside Triton's fields
    }
    assert stats["arrowinfer"] == {
        "alignment_copies": 0,
        "alignment_copy_ns": 0,
        "truncated_entries": 0,
        "truncated_items": 0,
        "isolated_batches": 0,
    }
    assert stats["name"] == batcher.model.name
    assert stats["version"] == "1"
    assert stats["last_inference"] > 0
    assert stats["inference_count"] == 6  # rows
    assert stats["execution_count"] == 2  # batches
    inference = stats["inference_stats"]
    assert set(inference) == {
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",  # no response cache: always 0, as Triton writes it
        "cache_miss",
    }
    for duration in inference.values():
        assert set(duration) == {"count", "ns"}
    assert inference["success"]["count"] == 4  # requests
    assert inference["fail"] == {"count": 0, "ns": 0}
    assert inference["queue"]["count"] == 4
    assert inference["queue"]["ns"] > 0  # three of them waited for the held execution
    assert inference["success"]["ns"] >= inference["queue"]["ns"]
    # each request is charged its batch's compute times
    assert inference["compute_input"] == {"count": 4, "ns": 4 * TIMINGS.compute_input_ns}
    assert inference["compute_infer"] == {"count": 4, "ns": 4 * TIMINGS.compute_infer_ns}
    assert inference["compute_output"] == {"count": 4, "ns": 4 * TIMINGS.compute_output_ns}
    assert [b["batch_size"] for b in stats["batch_stats"]] == [2, 4]
    for size in stats["batch_stats"]:
        assert set(size) == {"batch_size", "compute_input", "compute_infer", "compute_output"}
        assert size["compute_infer"] == {"count": 1, "ns": TIMINGS.compute_infer_ns}


def test_statistics_can_be_shared_and_start_empty(make_model: MakeModel, start: Start) -> None:
    model = make_model()
    stats = ModelStatistics(model.name, "1")
    batcher = DynamicBatcher(model, [Doubling(model)], stats)
    try:
        assert batcher.statistics is stats
        assert stats.as_dict()["execution_count"] == 0
        assert stats.as_dict()["batch_stats"] == []
        result(batcher.submit(request(0, 3)))
        assert stats.as_dict()["inference_count"] == 3
    finally:
        batcher.close(WAIT)


# -- choosing the batch: a pure function -------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "max_rows", "preferred", "count"),
    [
        ([1, 1, 1, 1, 1], 8, [2, 4], 4),  # the largest preferred size formed
        ([3, 3, 3], 8, [2, 4], 2),  # no preferred size formed: the longest that fits
        ([1, 2, 1, 3], 4, [], 3),
        ([10], 4, [], 1),  # a request alone larger than max_rows still goes
        ([5, 1], 4, [], 1),
        ([2, 1, 1, 4], 8, [2, 8], 4),
    ],
)
def test_choose_examples(rows: list[int], max_rows: int, preferred: list[int], count: int) -> None:
    assert _choose(rows, max_rows, preferred) == count


@st.composite
def queues(draw: st.DrawFn) -> tuple[list[int], int, list[int]]:
    max_rows = draw(st.integers(1, 32))
    rows = draw(st.lists(st.integers(0, 40), min_size=1, max_size=12))
    preferred = draw(st.lists(st.integers(1, max_rows), max_size=4, unique=True))
    return rows, max_rows, sorted(preferred)


@settings(deadline=None, max_examples=300)
@given(queues())
@example(([1, 1, 1, 1, 1], 8, [2, 4]))
@example(([9, 1], 4, [1]))
def test_choose_takes_the_longest_preferred_prefix_else_the_longest_that_fits(
    queue: tuple[list[int], int, list[int]],
) -> None:
    rows, max_rows, preferred = queue
    count = _choose(rows, max_rows, preferred)
    assert 1 <= count <= len(rows)
    sums = np.cumsum(rows).tolist()
    assert sums[count - 1] <= max_rows or count == 1
    fitting = [k for k in range(1, len(rows) + 1) if k == 1 or sums[k - 1] <= max_rows]
    formed = [k for k in fitting if sums[k - 1] in preferred]
    assert count == (max(formed) if formed else max(fitting))


# -- many clients ------------------------------------------------------------------------------


def _hammer(batcher: DynamicBatcher, threads: int = 8, per_thread: int = 50) -> None:
    """Threads submitting concurrently; each checks it gets its own rows back, in order."""

    def client(t: int) -> int:
        rng = np.random.default_rng(t)
        sent = [request(t * per_thread + i, int(rng.integers(1, 6))) for i in range(per_thread)]
        futures = [batcher.submit(b) for b in sent]
        for batch, future in zip(sent, futures, strict=True):
            assert result(future) == expected(batch)
        return sum(b.num_rows for b in sent)

    with ThreadPoolExecutor(threads) as pool:
        rows = sum(pool.map(client, range(threads)))
    stats = batcher.statistics.as_dict()
    assert stats["inference_count"] == rows
    assert stats["inference_stats"]["success"]["count"] == threads * per_thread
    assert stats["execution_count"] <= threads * per_thread


def test_many_threads_get_their_own_results(make_model: MakeModel, batchers: Batchers) -> None:
    model = make_model(max_batch_size=16, dynamic_batching="max_queue_delay_microseconds: 500")
    backends = [Doubling(model) for _ in range(2)]
    batcher = DynamicBatcher(model, backends)
    batchers.append((batcher, backends))
    _hammer(batcher)
    assert all(sum(call) <= 16 for b in backends for call in b.rows)


# -- end to end with onnxruntime ---------------------------------------------------------------


def test_onnxruntime_backend_through_the_batcher(make_model: MakeModel) -> None:
    model = make_model(
        max_batch_size=16, dynamic_batching="max_queue_delay_microseconds: 500", instances=2
    )
    batcher = DynamicBatcher(model, [create_backend(model) for _ in range(2)])
    try:
        _hammer(batcher, threads=4, per_thread=25)
        big = request(0, 40)  # split into three parts, run by onnxruntime, joined
        assert result(batcher.submit(big)) == expected(big)
    finally:
        batcher.close(WAIT)
