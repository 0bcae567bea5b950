"""The backend interface, small enough for a CPU and a GPU backend side by side.

A backend takes a list of requests (record batches already validated against the model's
input signature) and returns one result batch per request, like a Triton backend's
``execute(requests) -> responses``: whether requests are merged on the host or assembled on
a device is the backend's business.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple

import pyarrow as pa

from ..repository import ModelVersion

__all__ = ["Backend", "Timings"]


class Timings(NamedTuple):
    """Nanoseconds spent in one ``execute``, as Triton's statistics split them."""

    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


class Backend(abc.ABC):
    """One instance of one model version (a Triton ``instance_group`` member)."""

    def __init__(self, model: ModelVersion):
        self.model = model

    @abc.abstractmethod
    def execute(self, requests: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], Timings]:
        """Run the model over the requests as one batch; one result per request, in order.

        Each result has the model's output signature and the row count of its request.
        """

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the instance's resources."""
