"""The arrowinfer client: ``Client`` / ``AsyncClient`` over Flight, and result helpers.

Results are ``pa.RecordBatch``; ``arrowinfer.tensors.batch_to_numpy(result)`` gives numpy
views and :func:`to_awkward` an awkward array.
"""

from __future__ import annotations

from ._client import DEFAULT_TIMEOUT, USE_CLIENT_DEFAULT, AsyncClient, Client
from ._convert import conform, server_times, to_awkward, to_record_batch
from ._failover import FailoverTransport, FallbackWarning
from ._files import infer_file
from ._local import LocalTransport
from ._shm import ShmTransport
from ._transport import FlightTransport, Transport

__all__ = [
    "DEFAULT_TIMEOUT",
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "Client",
    "FailoverTransport",
    "FallbackWarning",
    "FlightTransport",
    "LocalTransport",
    "ShmTransport",
    "Transport",
    "conform",
    "infer_file",
    "server_times",
    "to_awkward",
    "to_record_batch",
]
