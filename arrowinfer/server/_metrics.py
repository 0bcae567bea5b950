"""Prometheus metrics under Triton's names, read from the statistics at scrape time.

The same HTTP port answers Triton's health endpoints, ``/v2/health/live`` and
``/v2/health/ready`` (200 or 503), for Kubernetes probes and load balancers.

The counters keep Triton's exact names (``nv_inference_request_success``, ...) with the
labels ``model`` and ``version``, so dashboards and autoscalers written for Triton (such as
SuperSONIC's, which scale on ``nv_inference_queue_duration_us``) work unchanged. They are
exposed untyped: prometheus-client would append ``_total`` to a typed counter, and Triton's
names have no suffix. Triton's host gauges (``nv_cpu_utilization``,
``nv_cpu_memory_total_bytes``, ``nv_cpu_memory_used_bytes``) come from ``/proc``.
arrowinfer's own metrics start with ``arrowinfer_``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, UnknownMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

__all__ = [
    "ARROWINFER_COUNTERS",
    "TRITON_COUNTERS",
    "StatisticsCollector",
    "address_family",
    "metrics_registry",
    "start_metrics_server",
]

#: Triton's counter name -> (help, how to read it from one model's statistics JSON).
TRITON_COUNTERS: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "nv_inference_request_success": (
        "Number of successful inference requests, all batch sizes",
        lambda s: s["inference_stats"]["success"]["count"],
    ),
    "nv_inference_request_failure": (
        "Number of failed inference requests, all batch sizes",
        lambda s: s["inference_stats"]["fail"]["count"],
    ),
    "nv_inference_count": (
        "Number of inferences performed (batch entries)",
        lambda s: s["inference_count"],
    ),
    "nv_inference_exec_count": (
        "Number of model executions performed (batches)",
        lambda s: s["execution_count"],
    ),
    "nv_inference_request_duration_us": (
        "Cumulative inference request duration in microseconds",
        lambda s: (
            (s["inference_stats"]["success"]["ns"] + s["inference_stats"]["fail"]["ns"]) / 1e3
        ),
    ),
    "nv_inference_queue_duration_us": (
        "Cumulative inference queuing duration in microseconds",
        lambda s: s["inference_stats"]["queue"]["ns"] / 1e3,
    ),
    "nv_inference_compute_input_duration_us": (
        "Cumulative compute input duration in microseconds",
        lambda s: s["inference_stats"]["compute_input"]["ns"] / 1e3,
    ),
    "nv_inference_compute_infer_duration_us": (
        "Cumulative compute inference duration in microseconds",
        lambda s: s["inference_stats"]["compute_infer"]["ns"] / 1e3,
    ),
    "nv_inference_compute_output_duration_us": (
        "Cumulative inference compute output duration in microseconds",
        lambda s: s["inference_stats"]["compute_output"]["ns"] / 1e3,
    ),
}

#: arrowinfer's own counters (statistics ``"arrowinfer"``), by metric name -> (help, key).
ARROWINFER_COUNTERS: dict[str, tuple[str, str]] = {
    "arrowinfer_truncated_entries": (
        "Ragged entries (jets, events) with more items than the model takes, cut to its size",
        "truncated_entries",
    ),
    "arrowinfer_truncated_items": (
        "Items (constituents, hits) cut from ragged entries longer than the model takes",
        "truncated_items",
    ),
    "arrowinfer_alignment_copies": (
        "Inputs copied because they were not 64-byte aligned (same bits on every path)",
        "alignment_copies",
    ),
    "arrowinfer_isolated_batches": (
        "Merged batches that failed and ran again request by request",
        "isolated_batches",
    ),
}

_BATCH_BUCKETS = [2**i for i in range(17)]


class _HostCpu:
    """Triton's host gauges, from ``/proc`` (Linux): CPU utilization since the previous
    scrape (the first: since boot), and RAM total and used (total less available)."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def utilization(self) -> float:
        """The fraction of all CPUs' time not idle (idle and iowait), 0.0 to 1.0."""
        with open("/proc/stat") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:]]
        busy, total = sum(ticks) - ticks[3] - ticks[4], sum(ticks)
        with self._lock:
            last, self._last = self._last, (busy, total)
        if last is not None and total > last[1]:
            busy, total = busy - last[0], total - last[1]
        return busy / total if total else 0.0

    @staticmethod
    def memory() -> tuple[int, int]:
        """RAM in bytes: (total, used), used being ``MemTotal - MemAvailable``."""
        kib = {}
        with open("/proc/meminfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    kib[key] = int(value.split()[0])
        total = kib.get("MemTotal", 0) * 1024
        return total, total - kib.get("MemAvailable", 0) * 1024

    def collect(self) -> Iterator[Any]:
        try:
            utilization, (total, used) = self.utilization(), self.memory()
        except (OSError, ValueError, IndexError):  # not Linux, or /proc unreadable
            return
        for name, help_text, value in (
            ("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", utilization),
            ("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", total),
            ("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", used),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


#: One per process: utilization is since the previous scrape of any collector (a worker
#: pool's makes a collector per scrape).
_HOST = _HostCpu()


class StatisticsCollector(Collector):
    """Collects the metrics from ``statistics()`` (a list of Triton statistics JSON) and
    ``pending()`` (queued requests by (model, version)) on every scrape."""

    def __init__(
        self,
        statistics: Callable[[], list[dict[str, Any]]],
        pending: Callable[[], dict[tuple[str, str], int]],
    ):
        self._statistics = statistics
        self._pending = pending

    def collect(self) -> Iterator[Any]:
        stats = self._statistics()
        labels = ["model", "version"]
        for name, (help_text, read) in TRITON_COUNTERS.items():
            family = UnknownMetricFamily(name, help_text, labels=labels)
            for s in stats:
                family.add_metric([s["name"], s["version"]], read(s))
            yield family
        for name, (help_text, key) in ARROWINFER_COUNTERS.items():
            family = UnknownMetricFamily(name, help_text, labels=labels)
            for s in stats:
                family.add_metric([s["name"], s["version"]], s.get("arrowinfer", {}).get(key, 0))
            yield family
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Instantaneous number of pending requests awaiting execution",
            labels=labels,
        )
        for (model, version), count in sorted(self._pending().items()):
            pending.add_metric([model, version], count)
        yield pending
        batch = HistogramMetricFamily(
            "arrowinfer_batch_size",
            "Rows per model execution, as the dynamic batcher formed them",
            labels=labels,
        )
        for s in stats:
            counts = {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}
            buckets = [
                (str(bound), sum(c for size, c in counts.items() if size <= bound))
                for bound in _BATCH_BUCKETS
            ]
            buckets.append(("+Inf", sum(counts.values())))
            total = sum(size * c for size, c in counts.items())
            batch.add_metric([s["name"], s["version"]], buckets, total)
        yield batch
        yield from _HOST.collect()


def metrics_registry(collector: StatisticsCollector) -> CollectorRegistry:
    """A registry of the server's own (never the global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""


def address_family(host: str, port: int) -> socket.AddressFamily:
    """The family to listen on ``host`` with: IPv6 for ``::1`` or ``::``, IPv4 for ``127.0.0.1``.

    The first passive address ``getaddrinfo`` gives, as prometheus-client's own
    ``start_wsgi_server`` chooses it (a plain WSGI server listens on IPv4 only).

    Raises
    ------
    OSError
        ``host`` does not resolve (``socket.gaierror``).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, *, ready: Callable[[], bool]
) -> tuple[Any, int]:
    """Serve ``/metrics`` and ``/v2/health/{live,ready}`` on ``host`` (IPv4 or IPv6).

    Returns the server (``shutdown()`` then ``server_close()`` it) and its port. The
    metrics come from prometheus-client's own WSGI app and threading server; only the
    health paths are answered here (200, or 503 while ``ready()`` is false).

    Raises
    ------
    OSError
        The address cannot be bound.
    """
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path in ("/v2/health/live", "/v2/health/ready"):
            ok = path.endswith("live") or ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Length", "0")])
            return [b""]
        return metrics(environ, start_response)

    family = address_family(host, port)

    class _Server(ThreadingWSGIServer):
        address_family = family  # the class attribute socketserver reads

    try:
        server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    except OSError as err:
        raise OSError(f"metrics cannot listen on {host}:{port}: {err.strerror}") from err
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_port
