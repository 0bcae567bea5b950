"""Dynamic batching with Triton's semantics, and the per-model statistics Triton reports.

Requests for a model, from every client and stream, wait in one queue. Each model
instance (``instance_group`` count) has a thread that takes the oldest requests and
merges them into one batch of at most ``max_batch_size`` rows:

- it waits at most ``max_queue_delay_microseconds`` after the oldest request arrived for
  more requests to join;
- it stops waiting as soon as the largest ``preferred_batch_size`` (or ``max_batch_size``)
  is reached, and otherwise cuts the batch at the largest preferred size it can form;
- a model without ``dynamic_batching`` runs each request on its own, as Triton does;
- queue policies as Triton documents them: ``default_queue_policy`` and, with
  ``priority_levels``, ``priority_queue_policy`` per level (``default_priority_level`` for
  requests without a priority; level 1 is served first). ``max_queue_size`` bounds a
  level's queue: a request that finds it full fails at once with
  :class:`~arrowinfer.errors.ServerBusy`. ``default_timeout_microseconds`` bounds the time a
  request may wait in the queue (from its arrival); a request may ask for a shorter one when
  ``allow_timeout_override`` is true. Past it, ``timeout_action: REJECT`` (the default)
  answers the request at once with :class:`~arrowinfer.errors.ServerUnavailable` "Request
  timeout expired" (Triton's message, UNAVAILABLE), even while the instances are busy;
  ``DELAY`` moves it behind every request of its level that has not timed out;
- requests merge only when the inputs with variable dims have the same concrete shapes
  (Triton's rule without ragged batching): a request of another shape ends the batch;
- a request larger than ``max_batch_size`` is split into slices (no copy) that queue one
  after the other, and its results are joined again (one copy of the outputs).

Requests are never reordered. Whatever makes a merged batch fail (a bad request, an
onnxruntime error, a model whose outputs do not keep the batch dimension, so that a
request's rows cannot be told apart), its requests are re-run one by one, so that only the
request that fails on its own gets the error and no request gets another request's rows.
Every result carries its provenance (model, version, the model file's sha256, the execution
provider) and what padding cut from its ragged inputs.

A caller with nothing else to do may ask for its request to run *inline*: when no request
is queued, no queue delay applies (no batching, or ``max_queue_delay_microseconds: 0``) and
an instance is idle, the request runs at once on that instance in the caller's thread,
with the same statistics and error handling, instead of going through the queue and the
instance's thread (two thread hand-offs, which cost a one-row request more CPU than the
model). Otherwise it is queued as usual. (A front end asks for it only when none of its
stream's earlier requests is pending, so a stream's requests keep their order; an inline
request may start beside one that another instance took from the queue that instant.)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import pyarrow as pa

from .backends import Backend
from .backends.base import truncation
from .dense import AnyBatch, DenseBatch
from .errors import ArrowInferError, ServerBusy, ServerError, ServerUnavailable
from .repository import ModelVersion
from .statistics import COUNTERS, ModelStatistics

# COUNTERS and ModelStatistics: re-exported from .statistics
__all__ = ["COUNTERS", "Completed", "DynamicBatcher", "ModelStatistics", "Submission"]

log = logging.getLogger(__name__)


_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class Completed(NamedTuple):
    """A request's result, where its time went inside the server (nanoseconds), and what
    its reply says beside the data (``metadata``).

    ``metadata`` holds the provenance (``model``, ``model_version``, ``model_sha256``,
    ``execution_provider``: :data:`arrowinfer.protocol.PROVENANCE`) and, when padding cut
    the request's ragged inputs, ``truncated_entries`` and ``truncated_items``.
    """

    batch: AnyBatch  # a DenseBatch for a DenseBatch request, whose outputs it holds
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    metadata: Mapping[str, Any] = _NO_METADATA


@dataclass(eq=False)
class _Request:
    batch: AnyBatch
    future: Future[Completed]
    enqueued_ns: int
    shapes: tuple[Any, ...] = ()  # concrete shapes of variable inputs: the merge key
    level: int = 1  # priority level, 1 the highest
    deadline_ns: int = 0  # when its queue timeout expires; 0: never
    queued: bool = True  # still waiting (not taken, rejected or delayed)


_DELAY = 1  # ModelQueuePolicy.TimeoutAction.DELAY


class Submission(NamedTuple):
    """One validated request, as :meth:`DynamicBatcher.submit` takes it."""

    batch: AnyBatch
    shapes: tuple[Any, ...] = ()
    priority: int = 0
    timeout_us: int = 0


class QueuePolicy(NamedTuple):
    """Triton's ``ModelQueuePolicy`` of one priority level."""

    timeout_ns: int  # default_timeout_microseconds; 0: none
    delay: bool  # timeout_action DELAY (else REJECT)
    allow_override: bool  # a request may ask for a shorter timeout
    max_size: int  # max_queue_size; 0: unbounded

    @classmethod
    def of(cls, policy: Any) -> QueuePolicy:
        return cls(
            int(policy.default_timeout_microseconds) * 1000,
            policy.timeout_action == _DELAY,
            bool(policy.allow_timeout_override),
            int(policy.max_queue_size),
        )


def _choose(rows: Sequence[int], max_rows: int, preferred: Sequence[int]) -> int:
    """How many queued requests form the next batch (at least one).

    The longest prefix whose rows make a preferred size, else the longest that fits.
    """
    total = 0
    fits = 0
    best_preferred = 0
    for i, n in enumerate(rows):
        total += n
        if total > max_rows and i > 0:
            break
        fits = i + 1
        if total in preferred:
            best_preferred = i + 1
    return best_preferred or fits


class DynamicBatcher:
    """The queue and scheduler of one model version.

    Parameters
    ----------
    model
        The model version; its config gives the batching settings.
    backends
        One backend per model instance; each gets a scheduler thread.
    statistics
        Where to record counts and times (a new one if not given).
    """

    def __init__(
        self,
        model: ModelVersion,
        backends: Sequence[Backend],
        statistics: ModelStatistics | None = None,
    ):
        if not backends:
            raise ValueError("a batcher needs at least one model instance")
        self.model = model
        self.statistics = statistics or ModelStatistics(model.name, str(model.version))
        config = model.config
        self._max_rows = max(model.max_batch_size, 1)
        self._batching = model.max_batch_size > 0 and config.HasField("dynamic_batching")
        dynamic = config.dynamic_batching
        self._delay_ns = int(dynamic.max_queue_delay_microseconds) * 1000
        self._preferred = sorted(
            int(p) for p in dynamic.preferred_batch_size if p <= self._max_rows
        )
        self._enough = self._preferred[-1] if self._preferred else self._max_rows
        levels = max(int(dynamic.priority_levels), 1)
        default = int(dynamic.default_priority_level)
        self._default_level = default if 1 <= default <= levels else 1
        self._policies = [
            QueuePolicy.of(dynamic.priority_queue_policy.get(level, dynamic.default_queue_policy))
            for level in range(1, levels + 1)
        ]
        # per level: the requests waiting, then those delayed past their timeout (DELAY)
        self._queues: list[deque[_Request]] = [deque() for _ in range(2 * levels)]
        self._count = 0
        self._queued_rows = 0
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the instances wait on it for requests
        self._reaper_cond = threading.Condition(lock)  # the reaper, for the next deadline
        self._deadlines: list[tuple[int, int, _Request]] = []  # a heap
        self._sequence = itertools.count()
        self._closed = False
        self._backends = list(backends)
        # held while an instance executes, by its thread or by an inline caller
        self._instance_locks = [threading.Lock() for _ in self._backends]
        self._running = 0  # instances executing now (under self._cond)
        self._inline = not self._batching or not self._delay_ns
        self._last_run: tuple[int, int] | None = None  # the latest execution's (ns, rows)
        self._threads = [
            threading.Thread(
                target=self._run, args=(b,), name=f"batcher-{model.name}-{i}", daemon=True
            )
            for i, b in enumerate(self._backends)
        ]
        if any(p.timeout_ns or p.allow_override for p in self._policies):
            self._threads.append(
                threading.Thread(
                    target=self._reap, name=f"queue-timeouts-{model.name}", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()

    # -- submitting ----------------------------------------------------------------------

    def submit(
        self,
        batch: AnyBatch,
        *,
        shapes: tuple[Any, ...] = (),
        priority: int = 0,
        timeout_us: int = 0,
        inline: bool = False,
    ) -> Future[Completed]:
        """Queue one (validated) request; the future gives its result in the same row order.

        ``shapes`` is what :func:`arrowinfer.schema.validate` returns: only requests with
        equal ``shapes`` are merged into one batch. ``priority`` (1 the highest; 0 or out of
        range: ``default_priority_level``) and ``timeout_us`` (a queue timeout in
        microseconds, honoured when the level's policy has ``allow_timeout_override`` and it
        is shorter than the policy's own; 0: none) have Triton's meaning. ``inline=True``:
        run it in this thread, now, if nothing is queued, no queue delay applies and an
        instance is idle (the future is then done on return; it never waits, so no queue
        timeout applies); else queue it.

        Raises
        ------
        ServerBusy
            At once, when the queue is full.
        ServerUnavailable
            When the batcher is closed.
        """
        requests = self._requests(Submission(batch, shapes, priority, timeout_us))
        if inline and len(requests) == 1 and self._inline and self._run_inline(requests):
            return requests[0].future
        return self._queue(requests)

    def submit_many(
        self, submissions: Sequence[Submission], *, inline: bool = False
    ) -> list[Future[Completed]]:
        """:meth:`submit` for several requests that arrived together: with ``inline=True``
        they run in this thread now, merged into batches as the queue would merge them, if
        nothing is queued, no queue delay applies and an instance is idle (the futures are
        then done on return); else each is queued. A request that cannot be queued (the
        queue is full, the batcher closed) has that error in its future.
        """
        parts = [self._requests(s) for s in submissions]
        if inline and self._inline and all(len(p) == 1 for p in parts):
            requests = [p[0] for p in parts]
            if self._run_inline(requests):
                return [r.future for r in requests]
        futures = []
        for requests in parts:
            try:
                futures.append(self._queue(requests))
            except (ServerBusy, ServerUnavailable) as err:
                refused: Future[Completed] = Future()
                refused.set_exception(err)
                futures.append(refused)
        return futures

    def _requests(self, submission: Submission) -> list[_Request]:
        """A submission as the requests the queue holds: one per ``max_batch_size`` rows."""
        batch, shapes, priority, timeout_us = submission
        parts = [batch]
        if batch.num_rows > self._max_rows and self.model.max_batch_size > 0:
            parts = [
                batch.slice(i, self._max_rows) for i in range(0, batch.num_rows, self._max_rows)
            ]
        level = priority if 1 <= priority <= len(self._policies) else self._default_level
        policy = self._policies[level - 1]
        timeout_ns = policy.timeout_ns
        if timeout_us > 0 and policy.allow_override:
            # a request may shorten its level's timeout, never lengthen it (Triton)
            timeout_ns = min(timeout_ns or timeout_us * 1000, timeout_us * 1000)
        now = time.perf_counter_ns()
        deadline = now + timeout_ns if timeout_ns else 0
        return [_Request(p, Future(), now, shapes, level, deadline) for p in parts]

    def _queue(self, requests: list[_Request]) -> Future[Completed]:
        """Queue the parts of one request; the future of the whole."""
        level = requests[0].level
        policy = self._policies[level - 1]
        deadline = requests[0].deadline_ns
        batch_rows = sum(r.batch.num_rows for r in requests)
        waiting, delayed = self._queues[2 * level - 2], self._queues[2 * level - 1]
        with self._cond:
            if self._closed:
                raise ServerUnavailable(f"model {self.model.name!r} is unloading")
            # a request finding the queue full is refused; one split into more parts than
            # max_queue_size still enters a queue with room, or it could never be served
            queued = len(waiting) + len(delayed)
            if policy.max_size and queued >= policy.max_size:
                raise ServerBusy(
                    f"model {self.model.name!r}: server busy, the queue is full "
                    f"({queued} requests waiting, max_queue_size {policy.max_size})"
                )
            waiting.extend(requests)
            self._count += len(requests)
            self._queued_rows += batch_rows
            self._cond.notify()
            if deadline:
                for request in requests:
                    heapq.heappush(self._deadlines, (deadline, next(self._sequence), request))
                if self._deadlines[0][2] is requests[0]:
                    self._reaper_cond.notify()  # a new earliest deadline
        if len(requests) == 1:
            return requests[0].future
        return _joined([r.future for r in requests])

    # -- scheduling ----------------------------------------------------------------------

    def _waiting(self) -> Iterator[_Request]:
        """The queued requests in the order they are served: by level, delayed ones last."""
        for queue in self._queues:
            yield from queue

    def _take(self) -> list[_Request] | None:
        """Wait for the next batch; None once closed and drained."""
        expired: list[_Request] = []
        try:
            with self._cond:
                return self._take_locked(expired)
        finally:
            self._reject(expired)  # unlocked: a future's callbacks may do anything

    def _take_locked(self, expired: list[_Request]) -> list[_Request] | None:
        while True:
            while not self._count:
                if self._closed:
                    return None
                self._cond.wait()
            # a request past its timeout is not run, even if the reaper has not seen it yet
            self._expire(time.perf_counter_ns(), expired)
            if self._count:
                break
        if self._batching and self._delay_ns:
            while not self._closed and self._queued_rows < self._enough:
                # the first request now: another instance may have taken the previous one
                first = next(self._waiting())
                left = first.enqueued_ns + self._delay_ns - time.perf_counter_ns()
                if left <= 0:
                    break
                self._cond.wait(left / 1e9)
                self._expire(time.perf_counter_ns(), expired)
                if not self._count:  # another instance took them, or they timed out
                    return []
        count = self._batch_of(self._waiting())
        taken: list[_Request] = []
        for queue in self._queues:
            while queue and len(taken) < count:
                taken.append(queue.popleft())
        for request in taken:
            request.queued = False
        self._count -= count
        self._queued_rows -= sum(r.batch.num_rows for r in taken)
        if self._count:
            self._cond.notify()  # another idle instance can start the next batch
        return taken

    # -- queue timeouts ------------------------------------------------------------------

    def _expire(self, now: int, rejected: list[_Request]) -> None:
        """Apply the timeout action to every waiting request past its deadline (locked).

        REJECT: it leaves the queue and goes into ``rejected`` (failed once unlocked);
        DELAY: it moves behind the requests of its level that have not timed out.
        """
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self._deadlines)
            if not request.queued:
                continue  # taken already
            self._queues[2 * request.level - 2].remove(request)
            if self._policies[request.level - 1].delay:
                self._queues[2 * request.level - 1].append(request)
                continue
            request.queued = False
            self._count -= 1
            self._queued_rows -= request.batch.num_rows
            rejected.append(request)

    def _reject(self, requests: list[_Request]) -> None:
        for request in requests:
            if request.future.set_running_or_notify_cancel():
                waited = (time.perf_counter_ns() - request.enqueued_ns) // 1000
                error = ServerUnavailable(
                    f"Request timeout expired (model {self.model.name!r}, {waited} us in the queue)"
                )
                self._fail(request, error)

    def _reap(self) -> None:
        """Answer requests whose queue timeout expires at once, while the instances are busy."""
        while True:
            expired: list[_Request] = []
            with self._reaper_cond:
                if self._closed:
                    return  # the instances drain the queue, and _take still expires
                self._expire(time.perf_counter_ns(), expired)
                if not expired:
                    left = (
                        self._deadlines[0][0] - time.perf_counter_ns() if self._deadlines else None
                    )
                    self._reaper_cond.wait(None if left is None else max(left, 0) / 1e9)
            self._reject(expired)

    def _batch_of(self, requests: Iterable[_Request]) -> int:
        """How many of ``requests``, from the first, form the next batch."""
        if not self._batching:
            return 1
        rows = []
        shapes = None
        for request in requests:
            if shapes is None:
                shapes = request.shapes
            elif request.shapes != shapes:
                break  # another shape: it cannot join this batch
            rows.append(request.batch.num_rows)
        return _choose(rows, self._max_rows, self._preferred)

    def _run_inline(self, requests: list[_Request]) -> bool:
        """Run requests on an idle instance in this thread, in batches as :meth:`_take`
        would form them; False if none is free now."""
        with self._cond:
            if self._closed or self._count or self._running >= len(self._backends):
                return False
            index = next(
                (i for i, lock in enumerate(self._instance_locks) if lock.acquire(blocking=False)),
                None,
            )
            if index is None:
                return False
            self._running += 1
        for request in requests:
            request.queued = False  # never queued: the reaper has nothing to expire
        try:
            start = 0
            while start < len(requests):
                count = self._batch_of(requests[start:])
                self._execute(self._backends[index], requests[start : start + count])
                start += count
        finally:
            self._instance_locks[index].release()
            with self._cond:
                self._running -= 1
        return True

    def _run(self, backend: Backend) -> None:
        lock = self._instance_locks[self._backends.index(backend)]
        while (taken := self._take()) is not None:
            if taken:
                # an inline caller may hold this instance: its run ends first
                with lock:
                    with self._cond:
                        self._running += 1
                    try:
                        self._execute(backend, taken)
                    finally:
                        with self._cond:
                            self._running -= 1
            # hold no request while waiting for the next: its arrays may be a client's
            # shared memory, which the server unmaps once nothing uses it
            del taken

    def _execute(self, backend: Backend, requests: list[_Request]) -> None:
        live = [r for r in requests if r.future.set_running_or_notify_cancel()]
        if live:
            self._run_batch(backend, live)

    def _run_batch(self, backend: Backend, live: list[_Request]) -> None:
        """Run requests as one batch; on any failure, run each alone to find the culprit.

        Whatever fails (a bad request, an onnxruntime error, a model whose outputs do not
        keep the batch dimension), the requests of a merged batch run again one by one, so
        that only the request that fails on its own gets an error, and no request ever gets
        rows computed from another request's data.
        """
        start = time.perf_counter_ns()
        try:
            results, timings = backend.execute([r.batch for r in live])
            _check_results(self.model.name, live, results)
        except Exception as err:
            self.statistics.add_counters(backend.take_counters())
            if len(live) > 1:  # find the culprit: the others must not pay for it
                self.statistics.add_counters({"isolated_batches": 1})
                for request in live:  # (their futures are running already)
                    self._run_batch(backend, [request])
                return
            if not isinstance(err, ArrowInferError):
                log.error("model %s: execution failed", self.model.name, exc_info=err)
                err = ServerError(f"model {self.model.name!r}: execution failed: {err}")
            self._fail(live[0], err)
            return
        counters = backend.take_counters()
        rows = sum(r.batch.num_rows for r in live)
        self.statistics.record_execution(rows, timings)
        self._last_run = (sum(timings), rows)
        end = time.perf_counter_ns()
        provenance = _provenance(self.model, backend)
        finished = []
        for request, result in zip(live, results, strict=True):
            metadata = dict(provenance)
            entries, items = truncation(self.model, request.batch)
            if entries:  # the client warns its user; the statistics count it
                cut = {"truncated_entries": entries, "truncated_items": items}
                metadata.update(cut)
                for key, value in cut.items():
                    counters[key] = counters.get(key, 0) + value
            done = Completed(result, start - request.enqueued_ns, *timings, metadata=metadata)
            finished.append((request, done))
        # counted before any result is given: whoever has a result sees it in the statistics
        self.statistics.add_counters(counters)
        for request, done in finished:
            self.statistics.record_request(True, end - request.enqueued_ns, done)
            request.future.set_result(done)

    def empty(self) -> Completed:
        """The result of a request with no rows: no rows of the output schema, the model
        not run (an event without jets is an ordinary event). Counted as a successful
        request of no rows and no execution."""
        empty = pa.RecordBatch.from_pylist([], schema=self.model.outputs)
        done = Completed(empty, 0, 0, 0, 0, metadata=_provenance(self.model, self._backends[0]))
        self.statistics.record_request(True, 0, done)
        return done

    def _fail(self, request: _Request, error: BaseException) -> None:
        self.statistics.record_request(False, time.perf_counter_ns() - request.enqueued_ns)
        request.future.set_exception(error)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def instances(self) -> int:
        """Model instances (scheduler threads)."""
        return len(self._backends)

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._count

    @property
    def running(self) -> int:
        """Instances executing now."""
        return self._running

    def expected_ns(self, rows: int) -> int | None:
        """How long an execution of ``rows`` rows should take (ns: inputs assembled, run,
        outputs split), from the latest execution's time per row; None before the first.

        An estimate for deciding where to run a request: a model whose time depends on its
        data rather than its rows can take longer.
        """
        if self._last_run is None:
            return None
        ns, last_rows = self._last_run
        return ns * max(rows, 1) // max(last_rows, 1)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, stop the instances."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._reaper_cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        for backend, lock in zip(self._backends, self._instance_locks, strict=True):
            with lock:  # an inline run in progress ends first
                backend.close()


def _provenance(model: ModelVersion, backend: Backend) -> dict[str, Any]:
    """What produced a result: the keys of :data:`arrowinfer.protocol.PROVENANCE`."""
    return {
        "model": model.name,
        "model_version": str(model.version),
        "model_sha256": model.sha256,
        "execution_provider": backend.provider,
    }


def _check_results(model: str, live: list[_Request], results: list[AnyBatch]) -> None:
    """One result per request, each with its request's rows, whatever the backend."""
    if len(results) != len(live):
        raise ServerError(f"model {model!r}: {len(results)} results for {len(live)} requests")
    for request, result in zip(live, results, strict=True):
        if result.num_rows != request.batch.num_rows:
            raise ServerError(
                f"model {model!r}: a result has {result.num_rows} rows for a request of "
                f"{request.batch.num_rows}"
            )


def _joined(futures: list[Future[Completed]]) -> Future[Completed]:
    """One future for the parts of a split request: outputs concatenated, times summed."""
    out: Future[Completed] = Future()
    out.set_running_or_notify_cancel()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[Completed]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
            return
        parts = [f.result() for f in futures]
        out.set_result(
            Completed(
                _concat([p.batch for p in parts]),
                queue_ns=max(p.queue_ns for p in parts),
                compute_input_ns=sum(p.compute_input_ns for p in parts),
                compute_infer_ns=sum(p.compute_infer_ns for p in parts),
                compute_output_ns=sum(p.compute_output_ns for p in parts),
                metadata=_joined_metadata([p.metadata for p in parts]),
            )
        )

    for future in futures:
        future.add_done_callback(one_done)
    return out


def _concat(batches: list[AnyBatch]) -> AnyBatch:
    dense = [b for b in batches if isinstance(b, DenseBatch)]
    return DenseBatch.concat(dense) if len(dense) == len(batches) else pa.concat_batches(batches)


def _joined_metadata(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The metadata of a split request's parts: the provenance, truncation counts summed."""
    out = dict(parts[0])
    for key in ("truncated_entries", "truncated_items"):
        total = sum(int(p.get(key, 0)) for p in parts)
        if total:
            out[key] = total
    return out
