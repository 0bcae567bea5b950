"""The onnxruntime backend: one ``InferenceSession`` per model instance.

Inputs come from the Arrow columns as numpy views; a single request goes to the model
without a copy, several requests are merged into one batch buffer (the one copy batching
needs), and ragged inputs are padded per entry into their slot of that buffer, with the
mask filled beside them. Outputs are wrapped into Arrow once per batch, without copies:
each request's result is a slice of that one batch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from tritonclient.grpc import model_config_pb2 as mc

from .. import tensors
from ..dense import AnyBatch, DenseBatch, entry_fits
from ..errors import InvalidInput, ModelError, ServerError
from ..repository import ModelVersion
from ..schema import datatype, to_column
from .base import ALIGNMENT, Backend, Timings, aligned_empty, check_batch_dimension

# Besides the backend, the pieces DeviceBackend shares: how a session is opened, how the
# inputs are planned and how an output slice becomes a column.
__all__ = [
    "ORT_ERRORS",
    "OnnxRuntimeBackend",
    "PlannedInput",
    "assemble_inputs",
    "batch_input",
    "batch_invariant_rows",
    "input_plan",
    "model_shape",
    "output_column",
    "session_options",
    "split_outputs",
]

# onnxruntime's own errors (InvalidGraph, NotImplemented, Fail, ...) derive from Exception,
# not RuntimeError; the set differs between versions, so take whatever this one defines.
ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    ValueError,
    *(
        value
        for value in vars(_ort_state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ),
)


def _providers(model: ModelVersion, device: str | None) -> list[str | tuple[str, dict[str, str]]]:
    available = ort.get_available_providers()
    kinds = {g.kind for g in model.config.instance_group}
    kind_gpu = 1  # ModelInstanceGroup.Kind.KIND_GPU
    wants_gpu = (device or "").startswith("cuda") or (device is None and kind_gpu in kinds)
    if not wants_gpu:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ModelError(
            f"model {model.name!r} asks for a GPU, but onnxruntime has no CUDA provider here "
            f"(available: {available}); install onnxruntime-gpu or use KIND_CPU"
        )
    device_id = device.split(":", 1)[1] if device and ":" in device else "0"
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def session_options(model: ModelVersion) -> ort.SessionOptions:
    """onnxruntime's options for one instance of a model.

    The thread pools do not spin: by default onnxruntime's idle pool threads busy-wait for
    the next run, which on a server burns the cores its network threads and the other
    instances need (on two cores it cost more CPU per request than the model itself).
    Triton's ``intra_op_thread_count``/``inter_op_thread_count`` parameters size the pools.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, attr in (
        ("intra_op_thread_count", "intra_op_num_threads"),
        ("inter_op_thread_count", "inter_op_num_threads"),
    ):
        value = model.parameter(key)
        if value is not None:
            try:
                setattr(options, attr, int(value))
            except ValueError as err:
                raise ModelError(f"model {model.name!r}: parameter {key}={value!r}: {err}") from err
    return options


def model_shape(entry: object) -> tuple[int, ...]:
    """Per-entry dims as the ONNX graph sees them (``reshape`` applied)."""
    reshape = entry.reshape  # type: ignore[attr-defined]
    dims = reshape.shape if entry.HasField("reshape") else entry.dims  # type: ignore[attr-defined]
    return tuple(int(d) for d in dims)


class PlannedInput(NamedTuple):
    """How one model input is made.

    ``kind`` is ``"dense"``, ``"ragged"`` (padded lists), ``"mask"``, ``"ragged_batch"``
    (Triton's ``allow_ragged_batch``: every row's values concatenated, 1-D) or
    ``"batch_input"`` (made from a ragged-batch input's counts).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # per entry, as the ONNX graph wants it
    kind: str


def input_plan(model: ModelVersion) -> list[PlannedInput]:
    """The model's inputs, worked out once per backend instead of once per batch."""
    plan = []
    for entry in model.config.input:
        kind = (
            "mask"
            if entry.name == model.mask_input
            else "ragged"
            if entry.name in model.ragged_inputs
            else "ragged_batch"
            if entry.name in model.ragged_batch_inputs
            else "dense"
        )
        dtype = datatype(mc.DataType.Name(entry.data_type)).numpy
        plan.append(PlannedInput(entry.name, dtype, model_shape(entry), kind))
    # after their sources: they are made from those inputs' counts
    plan.extend(PlannedInput(b.target, b.dtype, (), "batch_input") for b in model.batch_inputs)
    return plan


def _ragged_batch(columns: Sequence[pa.Array | pa.ChunkedArray]) -> tuple[np.ndarray, np.ndarray]:
    """A ragged-batch input over requests: every row's values concatenated (1-D), and the
    number of values of each row. A request may send lists, or rows of one fixed shape."""
    values, counts = [], []
    for column in columns:
        if tensors.layout(column.type).ragged:
            ragged = tensors.ragged_to_numpy(column)
            per_item = math.prod(ragged.values.shape[1:])
            values.append(ragged.values.reshape(-1))
            counts.append(ragged.counts.astype(np.int64) * per_item)
        else:
            dense = tensors.to_numpy(column)
            values.append(dense.reshape(-1))
            counts.append(np.full(len(dense), math.prod(dense.shape[1:]), dtype=np.int64))
    if len(values) == 1:
        return values[0], counts[0]
    return np.concatenate(values), np.concatenate(counts)


def batch_input(kind: str, counts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Triton's batch input of ``kind`` for rows with these element counts (1-D)."""
    if kind == "BATCH_ELEMENT_COUNT":
        return counts.astype(dtype)
    if kind == "BATCH_ACCUMULATED_ELEMENT_COUNT":
        return np.cumsum(counts).astype(dtype)
    if kind == "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO":
        return np.concatenate([[0], np.cumsum(counts)]).astype(dtype)
    if kind == "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE":
        return np.zeros(int(counts.max()) if len(counts) else 0, dtype=dtype)
    raise ValueError(f"batch input kind {kind} is not served")


def _merged(
    model: ModelVersion, requests: Sequence[AnyBatch], name: str
) -> pa.Array | pa.ChunkedArray | np.ndarray:
    """One input column over all requests: Arrow concatenates them in C++ (one copy)."""
    columns = [r.column(name) for r in requests]
    if len(columns) == 1:
        return columns[0]
    if any(isinstance(c, np.ndarray) for c in columns):  # dense tensors (beside Arrow ones)
        arrays = [_dense(model, name, c) for c in columns]
        entry = arrays[0].shape[1:]  # the batcher merged only requests of one entry shape
        # into aligned memory, as Arrow's concatenation: onnxruntime takes it as it is
        out = aligned_empty((sum(len(a) for a in arrays), *entry), arrays[0].dtype)
        return np.concatenate([a.reshape((len(a), *entry)) for a in arrays], out=out)
    if all(c.type == columns[0].type for c in columns[1:]):
        return pa.concat_arrays(columns)
    # Forms that validate() accepts as equal (fixed_shape_tensor or nested fixed_size_list,
    # primitive for [1], list or large_list, items nullable or not) do not concatenate in
    # Arrow: merge them through numpy, still one copy.
    if all(tensors.layout(c.type).ragged for c in columns):
        parts = [tensors.ragged_to_numpy(c) for c in columns]
        offsets = np.zeros(sum(len(p) for p in parts) + 1, dtype=np.int64)
        np.cumsum(np.concatenate([p.counts for p in parts]), out=offsets[1:])
        return tensors.ragged_from_numpy(offsets, np.concatenate([p.values for p in parts]))
    # a dense input with variable dims comes in several forms (list, variable-shape or
    # fixed-shape tensor); the batcher merged only requests of one shape
    if any(-1 in tensors.layout(c.type).shape for c in columns):
        return tensors.from_numpy(np.concatenate([_dense(model, name, c) for c in columns]))
    return tensors.from_numpy(
        np.concatenate([tensors.to_numpy(c).reshape(len(c), -1) for c in columns])
    )


def _ragged_columns(model: ModelVersion, requests: Sequence[AnyBatch]) -> dict[str, tensors.Ragged]:
    """The ragged inputs of all requests, which must have the same items per entry."""
    out = {
        name: tensors.ragged_to_numpy(_merged(model, requests, name))
        for name in model.ragged_inputs
    }
    counts = [r.counts for r in out.values()]
    if any(not np.array_equal(counts[0], c) for c in counts[1:]):
        raise InvalidInput(
            f"ragged inputs {list(model.ragged_inputs)} must have the same number of items "
            "in every entry",
            model=model.name,
            input=model.ragged_inputs[-1],
        )
    return out


def assemble_inputs(
    model: ModelVersion,
    requests: Sequence[AnyBatch],
    *,
    plan: Sequence[PlannedInput] | None = None,
) -> dict[str, np.ndarray]:
    """The model's input arrays for a list of requests, batch dimension first.

    One request's fixed-shape inputs are passed as views of its Arrow buffers; several are
    concatenated by Arrow into one buffer. Ragged inputs are concatenated the same way,
    then padded or truncated to the model's size (``arrowinfer.pad_value``) in one
    vectorised step, and the ``arrowinfer.mask_input`` is 1 for real items. Ragged-batch
    inputs (``allow_ragged_batch``) are concatenated without padding into one 1-D tensor,
    and their ``batch_input`` tensors say where each row's values lie.
    """
    batching = model.max_batch_size > 0
    if not batching and (len(requests) != 1 or requests[0].num_rows != 1):
        raise InvalidInput(
            "a model without batching (max_batch_size 0) takes one entry per request",
            model=model.name,
            expected="1 row",
            got=f"{sum(r.num_rows for r in requests)} rows",
        )
    total = sum(r.num_rows for r in requests)
    ragged = _ragged_columns(model, requests) if model.ragged_inputs else {}
    feeds: dict[str, np.ndarray] = {}
    elements: dict[str, np.ndarray] = {}  # values per row of each ragged-batch input
    makers = {b.target: b for b in model.batch_inputs}
    given = set(requests[0].column_names)  # the batcher merged requests that agree on it
    for name, dtype, shape, kind in plan or input_plan(model):
        if kind == "dense" and name not in given:
            continue  # an optional input left out: the graph's default (its initializer)
        if kind == "ragged_batch":
            values, elements[name] = _ragged_batch([r.column(name) for r in requests])
            feeds[name] = values.astype(dtype, copy=False)
        elif kind == "batch_input":
            made = makers[name]
            feeds[name] = batch_input(made.kind, elements[made.source], dtype)
        elif kind == "mask":
            counts = next(iter(ragged.values())).counts
            feeds[name] = aligned_empty((total, *shape), dtype)
            feeds[name][...] = tensors.mask(counts, shape[0], shape=shape[1:], dtype=dtype)
        elif kind == "ragged":
            values = ragged[name].values
            padded = aligned_empty((total, shape[0], *values.shape[1:]), values.dtype)
            tensors.pad(ragged[name], shape[0], pad_value=model.pad_value, out=padded)
            feeds[name] = padded.astype(dtype, copy=False)
        else:
            dense = _dense(model, name, _merged(model, requests, name))
            if shape.count(-1) > 1:  # variable dims: the request's own shape is the model's
                feeds[name] = dense if batching else dense[0]
            elif not batching:
                feeds[name] = dense[0].reshape(shape)
            else:
                feeds[name] = dense.reshape((total, *shape))  # a view; -1 takes the rest
            if feeds[name].dtype == object:
                feeds[name] = _text(model, name, feeds[name])
    return feeds


def _text(model: ModelVersion, name: str, array: np.ndarray) -> np.ndarray:
    """A string tensor as onnxruntime takes it: ``str`` objects (bytes decoded as UTF-8)."""
    flat = array.reshape(-1)
    if all(isinstance(v, str) for v in flat):
        return array
    try:
        text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in flat]
    except UnicodeDecodeError as err:
        raise InvalidInput(
            f"string input is not UTF-8 text: {err}", model=model.name, input=name
        ) from None
    return np.array(text, dtype=object).reshape(array.shape)


def _dense(
    model: ModelVersion, name: str, column: pa.Array | pa.ChunkedArray | np.ndarray
) -> np.ndarray:
    """A column as a dense block; a list column only if every entry has the same length."""
    if isinstance(column, np.ndarray):  # a DenseBatch's
        return column
    if not tensors.layout(column.type).ragged:
        return tensors.to_numpy(column)
    ragged = tensors.ragged_to_numpy(column)
    counts = ragged.counts
    if len(counts) and np.any(counts != counts[0]):
        raise InvalidInput(
            "entries have different lengths, and the model needs one length per batch",
            model=model.name,
            input=name,
            expected="equal lengths (or list the input in arrowinfer.ragged_inputs)",
            got=f"lengths {int(counts.min())}..{int(counts.max())}",
        )
    length = int(counts[0]) if len(counts) else 0
    return ragged.values.reshape((len(counts), length, *ragged.values.shape[1:]))


def split_outputs(
    model: ModelVersion, outputs: dict[str, np.ndarray], rows: Sequence[int]
) -> list[pa.RecordBatch]:
    """One result batch per request, each a zero-copy slice of the model's output.

    The batch's outputs are wrapped into Arrow once; each request's result is a slice of
    that batch (free in Arrow: no copy, no per-request conversion).
    """
    schema = model.outputs
    if model.max_batch_size == 0:
        columns = []
        for field in schema:
            value = outputs[field.name]
            if tensors.layout(field.type).ragged:
                data: np.ndarray | tensors.Ragged = tensors.Ragged(
                    np.array([0, len(value)], dtype=np.int32), value
                )
            else:
                data = value[np.newaxis]
            columns.append(to_column(field, data))
        return [pa.RecordBatch.from_arrays(columns, schema=schema)]
    whole = pa.RecordBatch.from_arrays(
        [output_column(field, outputs[field.name]) for field in schema], schema=schema
    )
    if len(rows) == 1:
        return [whole]
    results = []
    start = 0
    for n in rows:
        results.append(whole.slice(start, n))
        start += n
    return results


def request_results(
    model: ModelVersion, outputs: dict[str, np.ndarray], requests: Sequence[AnyBatch]
) -> list[AnyBatch]:
    """Each request's result, of its request's kind: a :class:`DenseBatch` of views of its
    rows of the outputs (no Arrow: the KServe front ends send the bytes as they are), or a
    record batch (:func:`split_outputs`).

    Raises
    ------
    ServerError
        For a DenseBatch request, an output whose dtype or size per entry is not the
        config's (the record batch path refuses them when it converts).
    """
    rows = [r.num_rows for r in requests]
    dense = [isinstance(r, DenseBatch) for r in requests]
    if not any(dense):
        return split_outputs(model, outputs, rows)
    _check_dense_outputs(model, outputs)
    arrow = [] if all(dense) else split_outputs(model, outputs, rows)
    results: list[AnyBatch] = []
    start = 0
    for i, n in enumerate(rows):
        if not dense[i]:
            results.append(arrow[i])
        elif model.max_batch_size == 0:  # one entry: the batch dimension added, as Arrow's
            results.append(DenseBatch({k: v[np.newaxis] for k, v in outputs.items()}))
        else:
            results.append(DenseBatch({k: v[start : start + n] for k, v in outputs.items()}))
        start += n
    return results


def _check_dense_outputs(model: ModelVersion, outputs: dict[str, np.ndarray]) -> None:
    for spec in model.output_specs:
        value = outputs[spec.name]
        entry = value.shape[1:] if model.max_batch_size > 0 else value.shape
        if -1 in spec.shape:
            fits = entry_fits(spec.shape, entry)
        else:
            fits = math.prod(entry) == math.prod(spec.shape)
        if value.dtype != spec.datatype.numpy or not fits:
            raise ServerError(
                f"model {model.name!r}: output {spec.name!r} is {value.dtype} of "
                f"{list(entry)} per entry; the config says {spec.datatype.kserve} of "
                f"{list(spec.shape)}"
            )


def output_column(field: pa.Field, value: np.ndarray) -> pa.Array:
    """A batched output slice as a column; a variable dimension becomes a list per entry.

    Every entry of one batch has the same length there, so the offsets are a range and the
    values stay a view of ``value``.
    """
    if not tensors.layout(field.type).ragged:
        return to_column(field, value)
    n, length = value.shape[:2]
    wide = n * length > np.iinfo(np.int32).max
    offsets = np.arange(n + 1, dtype=np.int64 if wide else np.int32) * length
    return to_column(field, tensors.Ragged(offsets, value.reshape((n * length, *value.shape[2:]))))


def batch_invariant_rows(model: ModelVersion) -> int:
    """The fixed execution batch size of ``arrowinfer.batch_invariant`` (0: off).

    ``arrowinfer.batch_invariant: "true"`` runs every execution with ``max_batch_size`` rows,
    ``"N"`` with N rows (smaller is cheaper for small requests): the merged requests, each
    starting at a 64-byte aligned row, zeros between and after them. onnxruntime picks its
    kernels and rounds by the shape of the batch and by the alignment of each row, so with
    one shape for every execution and every request placed as it would be alone, a
    request's result no longer depends on which requests share its execution
    (docs/reproducibility.md measures it, and the cost).

    Raises
    ------
    ModelError
        For a value other than true/false or a positive integer, or a model without batching.
    """
    value = (model.parameter("arrowinfer.batch_invariant") or "false").strip().lower()
    if value in ("false", "0", "no", "off"):
        return 0
    if value in ("true", "yes", "on"):
        rows = model.max_batch_size
    elif value.isdigit():
        rows = int(value)
    else:
        raise ModelError(
            f"model {model.name!r}: parameter arrowinfer.batch_invariant must be true, false "
            f"or a number of rows, got {value!r}"
        )
    if model.ragged_batch_inputs:  # its fixed slices of rows cannot cut 1-D concatenations
        raise ModelError(
            f"model {model.name!r}: arrowinfer.batch_invariant cannot be combined with "
            f"allow_ragged_batch (inputs {list(model.ragged_batch_inputs)})"
        )
    if model.max_batch_size <= 0:
        raise ModelError(
            f"model {model.name!r}: arrowinfer.batch_invariant needs max_batch_size > 0"
        )
    return rows


def _aligned_row_step(values: Iterable[np.ndarray]) -> int:
    """The smallest number of rows after which a row of every array is 64-byte aligned again."""
    step = 1
    for value in values:
        row_bytes = value.dtype.itemsize * math.prod(value.shape[1:])
        step = math.lcm(step, ALIGNMENT // math.gcd(row_bytes, ALIGNMENT) if row_bytes else 1)
    return step


class OnnxRuntimeBackend(Backend):
    """Runs a model version with onnxruntime (CPU, or CUDA when configured and available)."""

    def __init__(self, model: ModelVersion, *, device: str | None = None):
        super().__init__(model)
        try:
            self.session = ort.InferenceSession(
                os.fspath(model.path),
                sess_options=session_options(model),
                providers=_providers(model, device),
            )
        except ORT_ERRORS as err:
            raise ModelError(f"{model.path}: onnxruntime cannot load it: {err}") from err
        self._output_names = [o.name for o in model.config.output]
        self._plan = input_plan(model)
        self.provider = self.session.get_providers()[0]
        self.fixed_rows = batch_invariant_rows(model)
        self._batching = model.max_batch_size > 0
        # outputs the config reshapes, with their per-entry dims (read once, not per batch)
        self._reshape = {
            o.name: tuple(o.dims)
            for o in model.config.output
            if o.HasField("reshape") and -1 not in o.dims
        }

    def execute(self, requests: Sequence[AnyBatch]) -> tuple[list[AnyBatch], Timings]:
        if self.fixed_rows:
            return self._execute_invariant(requests)
        t0 = time.perf_counter_ns()
        feeds = self.aligned_feeds(assemble_inputs(self.model, requests, plan=self._plan))
        t1 = time.perf_counter_ns()
        outputs = self._run(feeds)
        t2 = time.perf_counter_ns()
        check_batch_dimension(self.model, outputs, sum(r.num_rows for r in requests))
        results = request_results(self.model, outputs, requests)
        t3 = time.perf_counter_ns()
        return results, Timings(t1 - t0, t2 - t1, t3 - t2)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session; outputs by name, reshaped as the config says."""
        values = self.session.run(self._output_names, feeds)
        outputs = dict(zip(self._output_names, values, strict=True))
        for name, dims in self._reshape.items():
            value = outputs[name]
            outputs[name] = value.reshape(((len(value),) if self._batching else ()) + dims)
        return outputs

    def _execute_invariant(self, requests: Sequence[AnyBatch]) -> tuple[list[AnyBatch], Timings]:
        """``arrowinfer.batch_invariant``: executions of ``fixed_rows`` rows each, every
        request starting at a 64-byte aligned row of every input, as it would alone.

        The requests are laid out one after the other in one zero-filled buffer (each from
        the next aligned row), which runs in slices of ``fixed_rows`` rows (rounded up to a
        multiple of the alignment step, so that every slice starts aligned too). A request
        may span two slices: each of its rows still sits at the alignment it has alone.
        """
        t0 = time.perf_counter_ns()
        counts = [r.num_rows for r in requests]
        merged = assemble_inputs(self.model, requests, plan=self._plan)
        step = _aligned_row_step(merged.values())
        size = -(-self.fixed_rows // step) * step
        starts = []
        place = 0
        for n in counts:
            place = -(-place // step) * step
            starts.append(place)
            place += n
        total = -(-place // size) * size
        feeds = {}
        for name, value in merged.items():
            laid = aligned_empty((total, *value.shape[1:]), value.dtype)
            laid[...] = 0
            first = 0
            for start, n in zip(starts, counts, strict=True):
                laid[start : start + n] = value[first : first + n]
                first += n
            feeds[name] = laid
        t1 = time.perf_counter_ns()
        slices = []
        for begin in range(0, total, size):
            outputs = self._run({k: v[begin : begin + size] for k, v in feeds.items()})
            check_batch_dimension(self.model, outputs, size)
            slices.append(outputs)
        t2 = time.perf_counter_ns()
        joined = {
            name: slices[0][name] if len(slices) == 1 else np.concatenate([o[name] for o in slices])
            for name in slices[0]
        }
        results = [
            request_results(
                self.model, {k: v[start : start + n] for k, v in joined.items()}, [request]
            )[0]
            for start, n, request in zip(starts, counts, requests, strict=True)
        ]
        t3 = time.perf_counter_ns()
        return results, Timings(t1 - t0, t2 - t1, t3 - t2)
