"""The backend interface, small enough for a CPU and a GPU backend side by side.

A backend takes a list of requests (record batches, or the KServe front ends' dense tensors
as :class:`~arrowinfer.dense.DenseBatch`, already validated against the model's input
signature) and returns one result per request, of its request's kind, like a Triton
backend's ``execute(requests) -> responses``: whether requests are merged on the host or
assembled on a device is the backend's business.

Also here, shared by every backend and the batcher: the 64-byte alignment of the arrays a
model reads (:func:`aligned`), the check that a batched output keeps the batch dimension
(:func:`check_batch_dimension`) and the count of what padding truncated (:func:`truncation`).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from .. import tensors
from ..dense import AnyBatch
from ..errors import ServerError
from ..repository import ModelVersion
from ..tensors import ALIGNMENT

__all__ = [
    "ALIGNMENT",
    "Backend",
    "Timings",
    "Truncation",
    "aligned",
    "aligned_empty",
    "check_batch_dimension",
    "truncation",
]


class Timings(NamedTuple):
    """Nanoseconds spent in one ``execute``, as Triton's statistics split them."""

    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


class Truncation(NamedTuple):
    """What padding to the model's size cut from one request's ragged inputs."""

    entries: int  # batch entries that lost items
    items: int  # items lost, summed over those entries


class Backend(abc.ABC):
    """One instance of one model version (a Triton ``instance_group`` member).

    ``provider`` names where it runs (onnxruntime's execution provider, e.g.
    ``CPUExecutionProvider``): every result carries it. ``counters`` accumulate
    ``alignment_copies`` and ``alignment_copy_ns`` until the batcher takes them
    (:meth:`take_counters`); one backend is used by one thread at a time.
    """

    provider = "unknown"

    def __init__(self, model: ModelVersion):
        self.model = model
        self.counters: dict[str, int] = {}

    @abc.abstractmethod
    def execute(self, requests: Sequence[AnyBatch]) -> tuple[list[AnyBatch], Timings]:
        """Run the model over the requests as one batch; one result per request, in order.

        Each result has the model's output signature and the row count of its request.
        """

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the instance's resources."""

    def take_counters(self) -> dict[str, int]:
        """The counters since the last call (and start again from zero)."""
        counters, self.counters = self.counters, {}
        return counters

    def aligned_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds, each C-contiguous at a multiple of :data:`ALIGNMENT` (copies counted)."""
        out = {}
        for name, value in feeds.items():
            start = time.perf_counter_ns()
            out[name] = aligned(value)
            if out[name] is not value:
                self.counters["alignment_copies"] = self.counters.get("alignment_copies", 0) + 1
                self.counters["alignment_copy_ns"] = self.counters.get("alignment_copy_ns", 0) + (
                    time.perf_counter_ns() - start
                )
        return out


def aligned(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is C-contiguous at a multiple of :data:`ALIGNMENT` bytes,
    else a copy that is (same shape and dtype)."""
    if array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0:
        return array
    if array.dtype == object:  # strings: references, which onnxruntime copies as text anyway
        return np.ascontiguousarray(array)
    out = aligned_empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting at a multiple of :data:`ALIGNMENT` bytes.

    The memory comes from Arrow's memory pool, whose blocks start at 64 bytes and are
    reused: a fresh numpy allocation of a large request is new pages each time, and
    faulting them in made a 32 MB copy cost 2.6x as much (6.1 against 2.3 ms here).
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = pa.allocate_buffer(nbytes)
    if buffer.address % ALIGNMENT == 0:
        return np.frombuffer(buffer, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)  # a pool with other alignment
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def check_batch_dimension(model: ModelVersion, outputs: Mapping[str, object], rows: int) -> None:
    """Every output of a batching model has ``rows`` rows (its first dimension).

    Raises
    ------
    ServerError
        Naming the model, the output and both sizes (Triton's "failed to split the output
        tensor"): the model does not keep the batch dimension (a reduction over it, or more
        rows out than in), so its rows cannot be handed back request by request.
    """
    if model.max_batch_size <= 0:
        return
    for name, value in outputs.items():
        shape: tuple[int, ...] = tuple(getattr(value, "shape", ()))
        got = int(shape[0]) if shape else None
        if got != rows:
            raise ServerError(
                f"model {model.name!r}: failed to split the output tensor {name!r}: the batch "
                f"has {rows} rows, the output's first dimension is "
                f"{got if got is not None else 'missing (a scalar)'}; the model must keep the "
                "batch dimension"
            )


def _ragged_size(model: ModelVersion, name: str) -> int:
    entry = next(e for e in model.config.input if e.name == name)
    dims = entry.reshape.shape if entry.HasField("reshape") else entry.dims
    return int(dims[0])


def truncation(model: ModelVersion, batch: AnyBatch) -> Truncation:
    """What padding to the model's fixed size cuts from one request's ragged inputs."""
    if not model.ragged_inputs or batch.num_rows == 0:
        return Truncation(0, 0)
    lost = np.zeros(batch.num_rows, dtype=np.int64)
    for name in model.ragged_inputs:
        counts = tensors.ragged_counts(batch.column(name))
        np.maximum(lost, counts - _ragged_size(model, name), out=lost)
    return Truncation(int(np.count_nonzero(lost)), int(lost.sum()))
