"""Batches assembled on the device: the GPU server path, written once for CuPy and numpy.

The array module ``xp`` is a parameter. On a GPU it is ``cupy``; with ``numpy`` the same
code runs on the CPU, which is how CI tests it. For a list of requests,
:class:`DeviceAssembler`:

1. copies each request's input columns (numpy views of its Arrow buffers, see
   :func:`arrowinfer.tensors.to_numpy`) into the request's slot ``[start:start + n]`` of a
   batch buffer per model input, allocated once with ``(max_batch_size, *shape)`` and
   grown only when a batch needs more. With CuPy, each column goes through a reused,
   pinned host staging buffer and is copied host-to-device asynchronously on the
   backend's own (non-default) CUDA stream: one copy per request, coalesced with its
   neighbours up to :data:`CHUNK_BYTES`, so staging the next request overlaps the transfer
   of the previous ones. With numpy, the column is copied straight into its slot;
2. for ragged inputs (``arrowinfer.ragged_inputs``), only the real items travel: each
   request's values and offsets go into device staging arrays, then one vectorised
   gather (:func:`pad`) pads or truncates every entry into the batch buffer, and the
   ``arrowinfer.mask_input`` is filled from the counts (:func:`fill_mask`), both on the
   device;
3. after the model has run, copies the outputs back (:meth:`DeviceAssembler.split`): with
   CuPy, into pinned host memory in one transfer per output (the requests' rows are
   contiguous on both sides, so the per-request copies coalesce into one), with numpy not
   at all; each request's result is a slice of that host array.

:class:`DeviceBackend` runs the model on the assembled batch: with CuPy through
onnxruntime's CUDA provider, inputs and outputs bound to the CuPy buffers by
``IOBinding`` (no copy in onnxruntime); with numpy through a CPU ``InferenceSession``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from tritonclient.grpc import model_config_pb2 as mc

from .. import tensors
from ..dense import AnyBatch, DenseBatch
from ..errors import InvalidInput, ModelError
from ..repository import ModelVersion
from ..schema import datatype
from ._cupy import import_cupy
from .base import Backend, Timings, check_batch_dimension
from .ort import (
    ORT_ERRORS,
    PlannedInput,
    assemble_inputs,
    batch_invariant_rows,
    input_plan,
    model_shape,
    output_column,
    session_options,
    split_outputs,
)

__all__ = ["CHUNK_BYTES", "DeviceAssembler", "DeviceBackend", "fill_mask", "pad", "to_host"]

#: Host-to-device copies of consecutive requests are merged until they reach this size.
CHUNK_BYTES = 1 << 20

_ALIGN = 256  # bytes; start of each region of the pinned staging buffer

Array = Any  # numpy.ndarray or cupy.ndarray


# -- vectorised ragged -> fixed size, for any array module ---------------------------------


def pad(
    offsets: Array,
    values: Array,
    length: int,
    *,
    pad_value: float = 0.0,
    out: Array | None = None,
    xp: ModuleType = np,
) -> Array:
    """Pad (or truncate) ragged entries to ``length`` items, on ``xp``'s device.

    Entry ``i`` is ``values[offsets[i]:offsets[i + 1]]``; the result has shape
    ``(n, length, *values.shape[1:])``, as :func:`arrowinfer.tensors.pad` gives. It is one
    gather: cell ``(i, j)`` takes ``values[offsets[i] + j]`` when ``j`` is below the entry's
    count and ``pad_value`` otherwise, so there is no loop over entries and nothing waits
    for the device. With CuPy the gather is one CUDA kernel (a dozen array operations
    otherwise, each a kernel launch: 1.0 against 0.67 ms per batch of 64 jets on an H200).

    Parameters
    ----------
    offsets, values
        Arrays of ``xp``: ``n + 1`` integer offsets (need not start at 0) and the items.
    out
        A C-contiguous array of ``xp`` to write into (a slot of a batch buffer).
    """
    n = len(offsets) - 1
    shape = tuple(values.shape[1:])
    if out is None:
        out = xp.empty((n, length, *shape), dtype=values.dtype)
    elif tuple(out.shape) != (n, length, *shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, length, *shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if n == 0 or length == 0:
        return out
    if values.dtype != out.dtype:
        values = values.astype(out.dtype)
    kernels = _kernels(xp)
    if kernels is not None:  # one launch instead of the dozen below: their cost is launches
        kernels.pad(
            offsets, values, length, math.prod(shape), len(values), out.dtype.type(pad_value), out
        )
        return out
    positions = xp.arange(length, dtype=np.int64)
    starts = offsets[:-1].astype(np.int64)
    valid = positions < (offsets[1:] - offsets[:-1])[:, None]  # (n, length)
    if len(values):
        index = starts[:, None] + positions  # (n, length), past the end only where not valid
        xp.minimum(index, len(values) - 1, out=index)
        xp.take(values, index.reshape(-1), axis=0, out=out.reshape((n * length, *shape)))
    blank = ~valid.reshape((n, length) + (1,) * len(shape))
    xp.copyto(out, out.dtype.type(pad_value), where=blank)
    return out


def fill_mask(offsets: Array, out: Array, *, xp: ModuleType = np) -> Array:
    """Write 1 where an entry has an item and 0 in the padding, from its offsets.

    ``out`` has shape ``(n, length, *shape)``; the result equals
    :func:`arrowinfer.tensors.mask` of the counts.
    """
    n, length = out.shape[:2]
    if len(offsets) != n + 1:
        raise ValueError(f"{len(offsets)} offsets for {n} entries")
    kernels = _kernels(xp)
    if kernels is not None:
        kernels.mask(offsets, length, math.prod(out.shape[2:]), out)
        return out
    filled = xp.arange(length) < (offsets[1:] - offsets[:-1])[:, None]
    xp.copyto(out, filled.reshape((n, length) + (1,) * (out.ndim - 2)))
    return out


class _Kernels(NamedTuple):
    pad: Any
    mask: Any


# Cell ``i`` of ``out`` (n, length, *shape) is item ``position`` of entry ``entry``, element
# ``i % inner`` of that item; the entry's items are values[offsets[entry]:offsets[entry + 1]].
_CELL = """
const long long cell = i / inner;
const long long entry = cell / length;
const long long position = cell - entry * length;
const long long start = offsets[entry];
const bool real = position < offsets[entry + 1] - start;
"""


@functools.cache
def _kernels(xp: ModuleType) -> _Kernels | None:
    """:func:`pad` and :func:`fill_mask` as one CUDA kernel each, with CuPy (None with
    numpy, or an array module without ``ElementwiseKernel``). They give the bits of the
    generic code, which the ``gpu`` tests check."""
    if xp is np or not hasattr(xp, "ElementwiseKernel"):
        return None
    pad = xp.ElementwiseKernel(
        "raw O offsets, raw T values, int64 length, int64 inner, int64 items, T pad_value",
        "T out",
        _CELL
        + "const long long item = start + position;\n"
        + "out = real && item < items ? values[item * inner + i % inner] : pad_value;",
        "arrowinfer_pad",
    )
    mask = xp.ElementwiseKernel(
        "raw O offsets, int64 length, int64 inner",
        "T out",
        _CELL + "out = real ? (T)1 : (T)0;",
        "arrowinfer_mask",
    )
    return _Kernels(pad, mask)


# -- host <-> device -----------------------------------------------------------------------


def _pinned_empty(xp: ModuleType, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy array in page-locked host memory from CuPy's pinned pool.

    The array keeps the memory alive; the pool takes it back when the array (and any
    Arrow buffer made from it) is gone.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    memory = xp.cuda.alloc_pinned_memory(max(nbytes, 1))
    return np.frombuffer(memory, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


def to_host(xp: ModuleType, outputs: dict[str, Array], stream: Any = None) -> dict[str, np.ndarray]:
    """Device arrays as numpy arrays: one device-to-host copy each, into pinned memory.

    With numpy (or for arrays already on the host) nothing is copied. With CuPy the copies
    run on ``stream``, which is synchronized once at the end.
    """
    if xp is np:
        return dict(outputs)
    host = {}
    for name, value in outputs.items():
        if not isinstance(value, xp.ndarray):
            host[name] = value  # onnxruntime put it on the host already
            continue
        out = _pinned_empty(xp, tuple(value.shape), value.dtype)
        value.get(stream=stream, out=out)
        host[name] = out
    if stream is not None:
        stream.synchronize()
    return host


class _PinnedStaging:
    """One page-locked host buffer, reused from batch to batch and grown when too small.

    It is only reused after the stream that read it was synchronized (every
    :meth:`DeviceBackend.execute` does so before returning).
    """

    def __init__(self, xp: ModuleType):
        self._xp = xp
        self._bytes = np.empty(0, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return len(self._bytes)

    def regions(self, targets: Sequence[Array]) -> list[np.ndarray]:
        """Host arrays shaped like ``targets``, side by side in the staging buffer."""
        starts = []
        end = 0
        for target in targets:
            start = -(-end // _ALIGN) * _ALIGN
            starts.append(start)
            end = start + int(target.nbytes)
        if end > len(self._bytes):
            self._bytes = _pinned_empty(self._xp, (max(end, 2 * len(self._bytes)),), np.dtype("u1"))
        return [
            self._bytes[start : start + int(t.nbytes)].view(t.dtype).reshape(tuple(t.shape))
            for start, t in zip(starts, targets, strict=True)
        ]


class _Lane:
    """One batch-wide device array, filled request after request in row order.

    ``host`` is the pinned staging region for ``device`` (CuPy), or ``device`` itself
    (numpy: the copy goes straight into the slot). Rows staged but not yet sent are sent
    asynchronously once they reach ``chunk_rows``, and by :meth:`flush`.
    """

    __slots__ = ("chunk_rows", "device", "host", "ready", "sent", "stream")

    def __init__(self, device: Array, host: np.ndarray, stream: Any, chunk_rows: int):
        self.device = device
        self.host = host
        self.stream = stream
        self.chunk_rows = chunk_rows
        self.sent = 0
        self.ready = 0

    def put(self, start: int, src: np.ndarray, shift: int | None = None) -> None:
        stop = start + len(src)
        dst = self.host[start:stop]
        if shift is None:
            np.copyto(dst, src)
        else:
            np.add(src, np.int64(shift), out=dst)
        self.ready = stop
        if self.ready - self.sent >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.host is self.device or self.ready == self.sent:
            return
        a, b = self.sent, self.ready
        self.device[a:b].set(self.host[a:b], stream=self.stream)
        self.sent = b


# -- assembly ------------------------------------------------------------------------------


class DeviceAssembler:
    """Batch buffers on a device, filled from a list of requests.

    Parameters
    ----------
    xp
        The array module: ``cupy`` (device memory, pinned staging, async copies on
        ``stream``) or ``numpy`` (the same steps in host memory).
    plan
        The model's inputs (:func:`arrowinfer.backends.ort.input_plan`).
    max_batch_size
        Rows the batch buffers hold from the start; they grow if a batch has more.
    pad_value
        What ragged inputs are padded with.
    stream
        The CuPy stream that copies and kernels run on (None with numpy).
    model
        The model's name, for error messages.
    chunk_bytes
        Host-to-device copies of consecutive requests are merged up to this size.
    """

    def __init__(
        self,
        xp: ModuleType,
        plan: Sequence[PlannedInput],
        max_batch_size: int,
        *,
        pad_value: float = 0.0,
        stream: Any = None,
        model: str = "model",
        chunk_bytes: int = CHUNK_BYTES,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.xp = xp
        self.plan = list(plan)
        self.max_batch_size = max_batch_size
        self.pad_value = pad_value
        self.stream = stream
        self.model = model
        self.chunk_bytes = chunk_bytes
        self.on_device = xp is not np
        self._staging = _PinnedStaging(xp) if self.on_device else None
        self._ragged = [e for e in self.plan if e.kind == "ragged"]
        #: one batch buffer per model input, ``(capacity, *shape)``
        self.buffers: dict[str, Array] = {}
        #: device staging of the ragged inputs' items and of their offsets
        self.values: dict[str, Array] = {}
        self.offsets: Array | None = None
        for entry in self.plan:
            if all(d >= 0 for d in entry.shape):  # variable dims wait for the first batch
                self.buffers[entry.name] = xp.empty((max_batch_size, *entry.shape), entry.dtype)
            if entry.kind == "ragged":
                items = max_batch_size * entry.shape[0]
                self.values[entry.name] = xp.empty((items, *entry.shape[1:]), entry.dtype)
        if self._ragged:
            self.offsets = xp.empty(max_batch_size + 1, dtype=np.int64)

    def _grown(
        self, current: Array | None, rows: int, shape: tuple[int, ...], dtype: np.dtype
    ) -> Array:
        """``current`` if it holds ``rows`` of ``shape``, else a new, larger array."""
        if current is not None and tuple(current.shape[1:]) == shape:
            if len(current) >= rows:
                return current
            capacity = max(rows, 2 * len(current))
        else:
            capacity = max(rows, self.max_batch_size)
        return self.xp.empty((capacity, *shape), dtype)

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return self.stream if self.stream is not None else contextlib.nullcontext()

    # -- host side: the requests' columns as numpy views -----------------------------------

    def _dense(self, entry: PlannedInput, request: pa.RecordBatch) -> np.ndarray:
        column = request.column(entry.name)
        n = request.num_rows
        if tensors.layout(column.type).ragged:  # a list column of one length per batch
            ragged = tensors.ragged_to_numpy(column)
            counts = ragged.counts
            if len(counts) and np.any(counts != counts[0]):
                raise InvalidInput(
                    "entries have different lengths, and the model needs one length per batch",
                    model=self.model,
                    input=entry.name,
                    expected="equal lengths (or list the input in arrowinfer.ragged_inputs)",
                    got=f"lengths {int(counts.min())}..{int(counts.max())}",
                )
            length = int(counts[0]) if len(counts) else 0
            array = ragged.values.reshape((n, length, *ragged.values.shape[1:]))
        else:
            array = tensors.to_numpy(column)
        if entry.shape.count(-1) > 1:  # variable dims: the request's own shape (validated)
            return array
        try:
            return array.reshape((n, *entry.shape))  # a view; -1 takes the rest
        except ValueError:
            raise InvalidInput(
                "wrong shape per entry",
                model=self.model,
                input=entry.name,
                expected=str(list(entry.shape)),
                got=str(list(array.shape[1:])),
            ) from None

    def _ragged_of(self, request: pa.RecordBatch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A request's offsets (from 0) and the items of each ragged input."""
        offsets: np.ndarray | None = None
        values = {}
        for entry in self._ragged:
            ragged = tensors.ragged_to_numpy(request.column(entry.name))
            if offsets is None:
                offsets = ragged.offsets
            elif not np.array_equal(offsets, ragged.offsets):
                raise InvalidInput(
                    f"ragged inputs {[e.name for e in self._ragged]} must have the same "
                    "number of items in every entry",
                    model=self.model,
                    input=entry.name,
                )
            if tuple(ragged.values.shape[1:]) != tuple(entry.shape[1:]):
                raise InvalidInput(
                    "wrong shape per item",
                    model=self.model,
                    input=entry.name,
                    expected=str(list(entry.shape[1:])),
                    got=str(list(ragged.values.shape[1:])),
                )
            values[entry.name] = ragged.values
        assert offsets is not None
        return offsets, values

    # -- the batch -------------------------------------------------------------------------

    def assemble(self, requests: Sequence[pa.RecordBatch]) -> dict[str, Array]:
        """The model's inputs for these requests, as views ``buffer[:total]`` of ``xp``.

        Request ``i``'s rows are at ``[start_i:start_i + n_i]``, in request order. With
        CuPy the copies and kernels are queued on the stream: synchronize it before
        anything outside the stream reads the buffers.
        """
        rows = [r.num_rows for r in requests]
        starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        total = starts[-1]
        live = [i for i, n in enumerate(rows) if n]

        dense: dict[str, dict[int, np.ndarray]] = {}
        targets: dict[tuple[str, str], Array] = {}  # lane -> its device array
        given = set(requests[live[0]].schema.names) if live else set()
        left_out = set()  # optional inputs the requests leave out (the batcher merged alike)
        for entry in self.plan:
            if entry.kind != "dense":
                continue
            if live and entry.name not in given:
                left_out.add(entry.name)
                continue
            views = {i: self._dense(entry, requests[i]) for i in live}
            shapes = {tuple(v.shape[1:]) for v in views.values()}
            if len(shapes) > 1:
                raise InvalidInput(
                    "requests have different lengths, and the model needs one per batch",
                    model=self.model,
                    input=entry.name,
                    got=f"shapes {sorted(shapes)}",
                )
            shape = shapes.pop() if shapes else tuple(max(d, 0) for d in entry.shape)
            buffer = self._grown(self.buffers.get(entry.name), total, shape, entry.dtype)
            self.buffers[entry.name] = buffer
            dense[entry.name] = views
            targets["dense", entry.name] = buffer[:total]

        ragged: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        item_starts = [0] * (len(requests) + 1)
        if self._ragged:
            ragged = {i: self._ragged_of(requests[i]) for i in live}
            counts = [int(ragged[i][0][-1]) if i in ragged else 0 for i in range(len(requests))]
            item_starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
            self.offsets = self._grown(self.offsets, total + 1, (), np.dtype(np.int64))
            targets["offsets", ""] = self.offsets[: total + 1]
            for entry in self._ragged:
                store = self._grown(
                    self.values.get(entry.name), item_starts[-1], entry.shape[1:], entry.dtype
                )
                self.values[entry.name] = store
                targets["values", entry.name] = store[: item_starts[-1]]
        for entry in self.plan:
            if entry.kind != "dense":
                self.buffers[entry.name] = self._grown(
                    self.buffers.get(entry.name), total, entry.shape, entry.dtype
                )

        lanes = self._lanes(targets)
        for i in live:
            for name, views in dense.items():
                lanes["dense", name].put(starts[i], views[i])
            if self._ragged:
                offsets, items = ragged[i]
                lanes["offsets", ""].put(starts[i], offsets[:-1], shift=item_starts[i])
                for name, values in items.items():
                    lanes["values", name].put(item_starts[i], values)
        if self._ragged:
            lanes["offsets", ""].put(total, np.array([item_starts[-1]], dtype=np.int64))
        for lane in lanes.values():
            lane.flush()

        if self._ragged:
            offsets_dev = targets["offsets", ""]
            with self._on_stream():
                for entry in self.plan:
                    out = self.buffers[entry.name][:total]
                    if entry.kind == "ragged":
                        values_dev = targets["values", entry.name]
                        pad(
                            offsets_dev,
                            values_dev,
                            entry.shape[0],
                            pad_value=self.pad_value,
                            out=out,
                            xp=self.xp,
                        )
                    elif entry.kind == "mask":
                        fill_mask(offsets_dev, out, xp=self.xp)
        return {
            entry.name: self.buffers[entry.name][:total]
            for entry in self.plan
            if entry.name not in left_out
        }

    def _lanes(self, targets: dict[tuple[str, str], Array]) -> dict[tuple[str, str], _Lane]:
        """One lane per device array; with CuPy, each gets its region of the staging buffer."""
        keys = list(targets)
        if self._staging is None:
            hosts = [targets[key] for key in keys]
        else:
            hosts = self._staging.regions([targets[key] for key in keys])
        lanes = {}
        for key, host in zip(keys, hosts, strict=True):
            device = targets[key]
            row_bytes = max(int(device.nbytes) // max(len(device), 1), 1)
            lanes[key] = _Lane(device, host, self.stream, max(self.chunk_bytes // row_bytes, 1))
        return lanes

    def split(self, outputs: dict[str, Array], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Each request's rows of the outputs ``(total, ...)``, as numpy arrays.

        With CuPy the outputs are copied to pinned host memory once (:func:`to_host`) and
        every request gets a slice of that copy; with numpy the slices are views of the
        outputs themselves.
        """
        host = to_host(self.xp, outputs, self.stream)
        parts = []
        start = 0
        for n in rows:
            parts.append({name: value[start : start + n] for name, value in host.items()})
            start += n
        return parts

    @property
    def staging_bytes(self) -> int:
        """Size of the pinned staging buffer (0 with numpy)."""
        return 0 if self._staging is None else self._staging.nbytes


# -- the backend ---------------------------------------------------------------------------


class _Output(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # per entry, as the ONNX graph gives it
    dims: tuple[int, ...]  # per entry, as the config (and the client) sees it
    reshaped: bool  # the config has a reshape that applies (no variable dims)


def _output_plan(model: ModelVersion) -> list[_Output]:
    plan = []
    for entry in model.config.output:
        dims = tuple(int(d) for d in entry.dims)
        plan.append(
            _Output(
                entry.name,
                datatype(mc.DataType.Name(entry.data_type)).numpy,
                model_shape(entry),
                dims,
                entry.HasField("reshape") and -1 not in dims,
            )
        )
    return plan


def _device_id(model: ModelVersion, device: str) -> int:
    kind, _, number = device.partition(":")
    if kind != "cuda" or not (number.isdigit() or number == ""):
        raise ModelError(
            f"model {model.name!r}: device {device!r} is not a GPU; expected 'cuda' or 'cuda:N'"
        )
    return int(number or 0)


def _require_cuda(model: ModelVersion, device: str) -> ModuleType:
    """CuPy, once CuPy and onnxruntime's CUDA provider are both known to be usable."""
    problems = []
    cause: Exception | None = None
    cupy = None
    try:
        cupy = import_cupy("device-side batching")
    except (ModuleNotFoundError, RuntimeError) as err:
        problems.append(str(err))
        cause = err
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        problems.append(
            f"onnxruntime has no CUDA provider here (available: {available}): "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    if problems or cupy is None:
        raise ModelError(
            f"model {model.name!r} asks for a GPU ({device}), but: "
            + "; ".join(problems)
            + ". Or run it on the CPU: --device cpu, or instance_group kind KIND_CPU"
        ) from cause
    return cupy


def _session(
    model: ModelVersion, on_device: bool, device_id: int
) -> tuple[ort.InferenceSession, str | None]:
    """The model's session, and the device type its IOBinding uses (None: ``run``)."""
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id)})
    providers: list[Any] = [cuda, "CPUExecutionProvider"] if on_device else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(
            str(model.path), sess_options=session_options(model), providers=providers
        )
    except ORT_ERRORS as err:
        raise ModelError(f"{model.path}: onnxruntime cannot load it: {err}") from err
    if on_device and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError(
            f"model {model.name!r}: onnxruntime could not start its CUDA provider on "
            f"cuda:{device_id} (CUDA 12 or cuDNN 9 libraries missing? onnxruntime logs why): "
            "pip install 'onnxruntime-gpu[cuda,cudnn]'"
        )
    return session, ("cuda" if on_device else None)


class DeviceBackend(Backend):
    """Runs a model version on a batch assembled on the device (:class:`DeviceAssembler`).

    Parameters
    ----------
    model
        The model version.
    xp
        The array module. None means CuPy (imported here; a :class:`ModelError` names the
        model and the fix when CuPy, a CUDA device or onnxruntime's CUDA provider is
        missing). ``numpy`` runs the same assembly on the CPU, with a CPU session.
    device
        ``"cuda"`` or ``"cuda:N"``; ignored with numpy.

    Results are those of :class:`~arrowinfer.backends.ort.OnnxRuntimeBackend` (with numpy
    bit for bit; on a GPU within float tolerance), with the same ``Timings``:
    ``compute_input`` is assembly and host-to-device copies, ``compute_infer`` the model,
    ``compute_output`` the copy back and the Arrow results.
    """

    def __init__(
        self, model: ModelVersion, *, xp: ModuleType | None = None, device: str = "cuda:0"
    ):
        super().__init__(model)
        if batch_invariant_rows(model):  # not silently ignored: results would differ
            raise ModelError(
                f"model {model.name!r}: arrowinfer.batch_invariant is implemented on the CPU "
                "backend only; serve this model on the CPU, or without the parameter"
            )
        if xp is None:
            xp = _require_cuda(model, device)
        self.xp = xp
        self.on_device = xp is not np
        self.device = device if self.on_device else "cpu"
        self.device_id = _device_id(model, device) if self.on_device else 0
        self._plan = input_plan(model)
        self._outputs = _output_plan(model)
        self._output_buffers: dict[str, Array] = {}
        self.stream: Any = None
        self.assembler: DeviceAssembler | None = None
        with self._context():
            if self.on_device:
                self.stream = xp.cuda.Stream(non_blocking=True)
            self.session, self._bind = _session(model, self.on_device, self.device_id)
            self.provider = self.session.get_providers()[0]
            if model.max_batch_size > 0:
                self.assembler = DeviceAssembler(
                    xp,
                    self._plan,
                    model.max_batch_size,
                    pad_value=model.pad_value,
                    stream=self.stream,
                    model=model.name,
                )

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """The backend's CUDA device, current in this thread (a batcher thread, say)."""
        if not self.on_device:
            yield
            return
        with self.xp.cuda.Device(self.device_id):
            yield

    def execute(self, requests: Sequence[AnyBatch]) -> tuple[list[AnyBatch], Timings]:
        # the assembler reads Arrow buffers: KServe's dense tensors become a record batch
        requests = [
            r.to_arrow(self.model.inputs) if isinstance(r, DenseBatch) else r for r in requests
        ]
        rows = [r.num_rows for r in requests]
        with self._context():
            t0 = time.perf_counter_ns()
            if self.assembler is not None:
                inputs = self.assembler.assemble(requests)
            else:  # no batching: one entry, shapes may vary from request to request
                inputs = {
                    name: self._upload(value)
                    for name, value in assemble_inputs(
                        self.model, requests, plan=self._plan
                    ).items()
                }
            if self.stream is not None:
                self.stream.synchronize()  # the model reads the buffers outside the stream
            else:  # numpy: host arrays, aligned as on the CPU backend's path
                inputs = self.aligned_feeds(inputs)
            t1 = time.perf_counter_ns()
            outputs = self._run(inputs, sum(rows))
            check_batch_dimension(self.model, outputs, sum(rows))
            t2 = time.perf_counter_ns()
            if self.assembler is not None:
                results = [self._result(part) for part in self.assembler.split(outputs, rows)]
            else:
                results = split_outputs(self.model, to_host(self.xp, outputs, self.stream), rows)
            t3 = time.perf_counter_ns()
        return results, Timings(t1 - t0, t2 - t1, t3 - t2)

    def _upload(self, value: np.ndarray) -> Array:
        if not self.on_device:
            return value
        array = self.xp.empty(value.shape, value.dtype)
        array.set(np.ascontiguousarray(value), stream=self.stream)
        return array

    def _run(self, inputs: dict[str, Array], total: int) -> dict[str, Array]:
        if self._bind is None:
            names = [o.name for o in self._outputs]
            values = dict(zip(names, self.session.run(names, inputs), strict=True))
        else:
            values = self._run_bound(inputs, total)
        batching = self.model.max_batch_size > 0
        outputs = {}
        for o in self._outputs:
            value = values[o.name]
            batch = (len(value),) if batching else ()
            outputs[o.name] = value.reshape(batch + o.dims) if o.reshaped else value
        return outputs

    def _run_bound(self, inputs: dict[str, Array], total: int) -> dict[str, Array]:
        """Run with inputs and outputs bound to device memory: onnxruntime copies nothing.

        Outputs of fixed shape go to reused device buffers; others (variable dims, or a
        model without batching) are allocated by onnxruntime on the host.
        """
        kind, device_id = self._bind, self.device_id
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_input(
                name, kind, device_id, array.dtype.type, list(array.shape), array.data.ptr
            )
        batching = self.model.max_batch_size > 0
        outputs: dict[str, Array] = {}
        for o in self._outputs:
            if batching and all(d >= 0 for d in o.shape):
                buffer = self._output_buffers.get(o.name)
                if buffer is None or len(buffer) < total:
                    capacity = max(total, self.model.max_batch_size)
                    buffer = self.xp.empty((capacity, *o.shape), o.dtype)
                    self._output_buffers[o.name] = buffer
                view = buffer[:total]
                binding.bind_output(
                    o.name, kind, device_id, o.dtype.type, list(view.shape), view.data.ptr
                )
                outputs[o.name] = view
            else:
                binding.bind_output(o.name, "cpu")
        self.session.run_with_iobinding(binding)
        if len(outputs) < len(self._outputs):
            values = binding.get_outputs()  # in the order they were bound
            for o, value in zip(self._outputs, values, strict=True):
                if o.name not in outputs:
                    outputs[o.name] = value.numpy()
        return outputs

    def _result(self, part: dict[str, np.ndarray]) -> pa.RecordBatch:
        schema = self.model.outputs
        return pa.RecordBatch.from_arrays(
            [output_column(field, part[field.name]) for field in schema], schema=schema
        )

    def close(self) -> None:
        """Drop the device buffers (CuPy's memory pool takes them back)."""
        self.assembler = None
        self._output_buffers.clear()
