"""The arrowinfer server: one inference core behind Flight, KServe v2 gRPC and metrics.

>>> with Server("path/to/repository", port=0, kserve_port=0, metrics_port=None) as server:
...     print(server.location)  # grpc://127.0.0.1:<port>
...     print(server.kserve_port)  # for tritonclient.grpc on 127.0.0.1:<kserve_port>

Layout: ``_core`` (the models, batchers and statistics every front end adapts);
``_flight``, ``_kserve`` and ``_shm`` (the front ends, side by side: none imports
another); ``_v2tensors`` (KServe v2 tensors <-> Arrow, for any v2 front end);
``_ordered`` (ordered, pipelined replies of one stream); ``_server`` (:class:`Server`,
which wires them); ``_metrics``, ``_auth``; ``workers`` (``serve --workers N``).
This module only re-exports.
"""

from __future__ import annotations

from ._core import InferenceCore, LoadedModel
from ._flight import FlightService
from ._kserve import KServeService, start_kserve
from ._server import ACTIONS, Server
from ._shm import ShmService
from .workers import WorkerPool

__all__ = [
    "ACTIONS",
    "FlightService",
    "InferenceCore",
    "KServeService",
    "LoadedModel",
    "Server",
    "ShmService",
    "WorkerPool",
    "start_kserve",
]
