"""arrowinfer: inference as a service for HEP event processing, with Apache Arrow end to end.

Events are Arrow record batches (one row per batch entry, ragged collections as lists),
sent over Arrow Flight or shared memory to servers that run ONNX models with dynamic
batching; the same servers speak Triton's KServe v2 gRPC protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    ArrowInferError,
    InvalidInput,
    ModelError,
    ModelNotFound,
    RequestError,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    Timeout,
    TransportError,
    Unauthenticated,
    Unsupported,
)
from .schema import signature, validate
from .tensors import (
    Ragged,
    batch_from_numpy,
    batch_to_numpy,
    from_numpy,
    ragged_from_numpy,
    ragged_to_numpy,
    to_numpy,
)

if TYPE_CHECKING:
    from .client import AsyncClient, Client

__all__ = [
    "ArrowInferError",
    "AsyncClient",
    "Client",
    "InvalidInput",
    "ModelError",
    "ModelNotFound",
    "Ragged",
    "RequestError",
    "ServerBusy",
    "ServerError",
    "ServerUnavailable",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "Unsupported",
    "__version__",
    "batch_from_numpy",
    "batch_to_numpy",
    "from_numpy",
    "ragged_from_numpy",
    "ragged_to_numpy",
    "signature",
    "to_numpy",
    "validate",
]


def __getattr__(name: str) -> Any:
    """``arrowinfer.Client`` and ``arrowinfer.AsyncClient``, imported on first use.

    The server imports this package too, and needs no Flight client to start.
    """
    if name in ("Client", "AsyncClient"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
