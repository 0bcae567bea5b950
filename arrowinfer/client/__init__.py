"""The arrowinfer client: ``Client`` / ``AsyncClient`` over Flight, and result helpers.

Results are ``pa.RecordBatch``; ``arrowinfer.tensors.batch_to_numpy(result)`` gives numpy
views and :func:`to_awkward` an awkward array.

Importing it needs pyarrow and numpy only: the local fallback (``LocalTransport``:
onnxruntime, onnx) and ``infer_file`` (files, progress bars) are imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._async import AsyncClient
from ._base import (
    CLIENT_OPTIONS,
    DEFAULT_TIMEOUT,
    USE_CLIENT_DEFAULT,
    BaseClient,
    TruncationWarning,
)
from ._client import Client
from ._convert import (
    conform,
    provenance,
    server_times,
    to_awkward,
    to_record_batch,
    truncation,
)
from ._failover import FailoverTransport, FallbackWarning
from ._shm import ShmTransport
from ._transport import FlightTransport, Transport

if TYPE_CHECKING:
    from ._files import infer_file
    from ._local import LocalTransport

__all__ = [
    "CLIENT_OPTIONS",
    "DEFAULT_TIMEOUT",
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "BaseClient",
    "Client",
    "FailoverTransport",
    "FallbackWarning",
    "FlightTransport",
    "LocalTransport",
    "ShmTransport",
    "Transport",
    "TruncationWarning",
    "conform",
    "infer_file",
    "provenance",
    "server_times",
    "to_awkward",
    "to_record_batch",
    "truncation",
]

#: Names imported on first use, and their modules: their dependencies are not the client's.
_LAZY = {"LocalTransport": "._local", "infer_file": "._files"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once
    return value
