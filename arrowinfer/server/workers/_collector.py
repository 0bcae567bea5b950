"""The Prometheus metrics of a worker pool: Triton's summed over the workers, and their own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._metrics import StatisticsCollector

__all__ = ["PoolCollector", "Scrape", "WorkerState"]


class WorkerState(NamedTuple):
    """One worker as a scrape shows it."""

    worker: int
    pid: int
    ready: bool
    starts: int
    connections: int


#: What one scrape reads: each serving worker's statistics by index, their sum over every
#: worker (those that died included), and each worker's state.
Scrape = tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]], list[WorkerState]]


class PoolCollector(Collector):
    """Triton's metrics summed over the workers, and the workers' own."""

    def __init__(self, scrape: Callable[[], Scrape]):
        self._scrape = scrape

    def collect(self) -> Iterator[Any]:
        per_worker, total, workers = self._scrape()
        yield from StatisticsCollector(lambda: total, dict).collect()
        up = GaugeMetricFamily(
            "arrowinfer_worker_up",
            "1 while the worker process serves, else 0",
            labels=["worker", "pid"],
        )
        starts = CounterMetricFamily(
            "arrowinfer_worker_starts", "Times the worker process was started", labels=["worker"]
        )
        connections = GaugeMetricFamily(
            "arrowinfer_worker_connections",
            "Client connections relayed to the worker now",
            labels=["worker"],
        )
        success = CounterMetricFamily(
            "arrowinfer_worker_request_success",
            "Successful inference requests the worker process served since it started",
            labels=["worker", "model", "version"],
        )
        for index, pid, ready, count, open_connections in workers:
            up.add_metric([str(index), str(pid)], 1 if ready else 0)
            starts.add_metric([str(index)], count)
            connections.add_metric([str(index)], open_connections)
            for s in per_worker.get(index, []):
                success.add_metric(
                    [str(index), s["name"], s["version"]], s["inference_stats"]["success"]["count"]
                )
        yield from (up, starts, connections, success)
