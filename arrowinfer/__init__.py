"""arrowinfer: inference as a service for HEP event processing, with Apache Arrow end to end.

Events are Arrow record batches (one row per batch entry, ragged collections as lists),
sent over Arrow Flight or shared memory to servers that run ONNX models with dynamic
batching; the same servers speak Triton's KServe v2 gRPC protocol.
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "ArrowInferError",
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
