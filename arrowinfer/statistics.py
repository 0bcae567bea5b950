"""Triton's per-model statistics (its statistics extension), and arrowinfer's own counters.

One :class:`ModelStatistics` per served model version, written by its batcher and read by
every front end (Flight ``model.statistics``, KServe ``ModelStatistics``, HTTP) and by the
Prometheus collector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .backends import Timings

__all__ = ["COUNTERS", "ModelStatistics", "RequestTimes"]


class RequestTimes(Protocol):
    """Where one request's time went inside the server (nanoseconds)."""

    @property
    def queue_ns(self) -> int: ...
    @property
    def compute_input_ns(self) -> int: ...
    @property
    def compute_infer_ns(self) -> int: ...
    @property
    def compute_output_ns(self) -> int: ...


#: arrowinfer's own per-model counters, beside Triton's statistics:
#: ``alignment_copies`` (inputs copied because they were not 64-byte aligned, see
#: :data:`arrowinfer.backends.base.ALIGNMENT`) and the ``alignment_copy_ns`` spent on them;
#: ``truncated_entries`` / ``truncated_items`` (ragged entries longer than the model's size,
#: and the items padding cut from them).
#: ``isolated_batches``: merged batches that failed and ran again request by request.
COUNTERS = (
    "alignment_copies",
    "alignment_copy_ns",
    "truncated_entries",
    "truncated_items",
    "isolated_batches",
)


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    """Triton's statistics of one model version: counts and cumulative times.

    ``as_dict()`` has the field names of Triton's statistics extension, so tools that read
    Triton's ``ModelStatistics`` read these too. Thread-safe.
    """

    name: str
    version: str
    inference_count: int = 0  # rows (batch entries) inferred
    execution_count: int = 0  # model executions (batches)
    last_inference_ms: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batch_stats: dict[int, list[_Duration]] = field(default_factory=dict)
    # arrowinfer's own counts (COUNTERS)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_execution(self, rows: int, timings: Timings) -> None:
        with self._lock:
            self.execution_count += 1
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)
            per_size = self.batch_stats.setdefault(rows, [_Duration(), _Duration(), _Duration()])
            for duration, ns in zip(per_size, timings, strict=True):
                duration.add(ns)

    def record_request(self, ok: bool, total_ns: int, done: RequestTimes | None = None) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(total_ns)
            if done is not None:
                self.queue.add(done.queue_ns)
                self.compute_input.add(done.compute_input_ns)
                self.compute_infer.add(done.compute_infer_ns)
                self.compute_output.add(done.compute_output_ns)

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add to arrowinfer's own counters (:data:`COUNTERS`)."""
        if counts:
            with self._lock:
                for key, value in counts.items():
                    self.counters[key] = self.counters.get(key, 0) + value

    def as_dict(self) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` JSON for this model version.

        Beside Triton's fields, ``"arrowinfer"`` holds :data:`COUNTERS` (readers of Triton's
        message ignore it).
        """
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    "compute_input": self.compute_input.as_dict(),
                    "compute_infer": self.compute_infer.as_dict(),
                    "compute_output": self.compute_output.as_dict(),
                    # no response cache: Triton writes these zeros too (perf_analyzer reads them)
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "response_stats": {},  # decoupled models only, which are not served
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": d[0].as_dict(),
                        "compute_infer": d[1].as_dict(),
                        "compute_output": d[2].as_dict(),
                    }
                    for size, d in sorted(self.batch_stats.items())
                ],
                "memory_usage": [],
                "arrowinfer": dict(self.counters),
            }
