"""What users hand the client (Arrow, numpy dicts, awkward) as a request batch, and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .. import tensors
from ..errors import InvalidInput
from ..protocol import PROVENANCE, SERVER_TIMES, TRUNCATION
from ..schema import to_column, validate

__all__ = [
    "CASTS",
    "SERVER_TIMES",
    "conform",
    "per_object",
    "provenance",
    "regroup",
    "server_times",
    "to_awkward",
    "to_record_batch",
    "truncation",
]


def _is_awkward(data: object) -> bool:
    return type(data).__module__.startswith("awkward")


def to_record_batch(data: Any) -> pa.RecordBatch:
    """A request as a record batch, columns named after the model's inputs.

    Parameters
    ----------
    data
        A ``pa.RecordBatch``; a ``pa.Table`` (several chunks are combined: a copy); a
        mapping of input name to numpy array, ``Ragged``, ``(offsets, values)`` or Arrow
        array; or an awkward record array with one field per input. Numpy arrays become
        columns of their own layout (:func:`arrowinfer.tensors.from_numpy`), no copies;
        :func:`conform` then checks them and adapts them to the model's types.
    """
    if isinstance(data, pa.RecordBatch):
        return data
    if isinstance(data, pa.Table):
        combined = data.combine_chunks() if any(c.num_chunks > 1 for c in data.columns) else data
        batches = combined.to_batches()
        if not batches:
            return pa.RecordBatch.from_pylist([], schema=data.schema)
        return batches[0]
    if _is_awkward(data):
        import awkward as ak

        data = {name: ak.to_arrow(data[name], extensionarray=False) for name in data.fields}
    if isinstance(data, Mapping):
        names = list(data)
        columns = []
        for name in names:
            value = data[name]
            if _is_awkward(value):
                import awkward as ak

                value = ak.to_arrow(value, extensionarray=False)
            if isinstance(value, tuple) and len(value) == 2:
                value = tensors.Ragged(np.asarray(value[0]), np.asarray(value[1]))
            if isinstance(value, pa.ChunkedArray):
                value = value.combine_chunks()
            if not isinstance(value, pa.Array):
                value = _column(value)  # its own layout; conform() checks and adapts it
            columns.append(value)
        return pa.RecordBatch.from_arrays(columns, names=names)
    raise TypeError(
        "data must be a pyarrow RecordBatch or Table, a dict of numpy arrays, or an awkward "
        f"array; got {type(data).__name__}"
    )


def _column(value: Any) -> pa.Array:
    if isinstance(value, tensors.Ragged):
        return tensors.ragged_from_numpy(value.offsets, value.values)
    return tensors.from_numpy(np.asarray(value))


#: The values of ``cast``: None (no conversion: another element type is an error), or
#: ``"same_kind"`` (numpy's rule: float64 -> float32, int64 -> int32 and the like; never
#: float -> int).
CASTS = (None, "same_kind")


def conform(
    batch: pa.RecordBatch, schema: pa.Schema, *, model: str, cast: str | None = None
) -> pa.RecordBatch:
    """Check a request against the model's signature and give it exactly that schema.

    Equivalent layouts (nested ``fixed_size_list`` for a tensor, ``large_list``, awkward's
    extension types) are rebuilt in the canonical types from the same buffers: values are
    never copied (only the offsets of a ``large_list``, narrowed to int32). With
    ``cast="same_kind"``, a column of another element type that numpy casts with
    ``casting="same_kind"`` (float64 from awkward arithmetic for a float32 model, say) is
    converted: one copy of its values; rounding to the model's type is the caller's choice.

    Raises
    ------
    InvalidInput
        Before anything is sent, with the message the server would give.
    ValueError
        An unknown ``cast``.
    """
    if cast not in CASTS:
        raise ValueError(f"cast must be one of {CASTS}, got {cast!r}")
    if cast is not None:
        batch = _cast(batch, schema, cast)
    validate(batch, schema, model=model)
    if batch.schema.equals(schema, check_metadata=False) and batch.schema.names == schema.names:
        return (
            batch
            if batch.schema.metadata == schema.metadata
            else batch.replace_schema_metadata(schema.metadata)
        )
    given = set(batch.schema.names)
    if not given.issuperset(schema.names):  # optional inputs left out (validate() allowed it)
        fields = [f for f in schema if f.name in given]
        schema = pa.schema(fields, metadata=schema.metadata)
    columns = []
    for field in schema:
        column = batch.column(field.name)
        if column.type == field.type:
            columns.append(column)
            continue
        lay = tensors.layout(field.type)
        if not lay.ragged or not tensors.layout(column.type).ragged:
            # a dense array for a variable dim travels as the field's type (the stream's
            # schema), one shape per request: validate() checked that
            columns.append(to_column(field, tensors.to_numpy(column)))
            continue
        ragged = tensors.ragged_to_numpy(column)
        if ragged.offsets.dtype != np.int32:
            if len(ragged.values) > np.iinfo(np.int32).max:
                raise InvalidInput(
                    "too many items for 32-bit list offsets", model=model, input=field.name
                )
            ragged = tensors.Ragged(ragged.offsets.astype(np.int32), ragged.values)
        columns.append(to_column(field, ragged))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _cast(batch: pa.RecordBatch, schema: pa.Schema, casting: Any) -> pa.RecordBatch:
    """The columns whose element type numpy casts to the model's under ``casting``, cast."""
    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        known = name in schema.names
        columns.append(_cast_column(column, schema.field(name), casting) if known else column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _cast_column(column: pa.Array, field: pa.Field, casting: Any) -> pa.Array:
    try:
        got, want = tensors.layout(column.type), tensors.layout(field.type)
    except TypeError:
        return column  # not a tensor column: validate() says so
    source, target = got.value_type.to_pandas_dtype(), want.value_type.to_pandas_dtype()
    if got.value_type == want.value_type or not np.can_cast(source, target, casting):
        return column  # the same type, or a cast not allowed: validate() says so
    if got.ragged:
        ragged = tensors.ragged_to_numpy(column)
        return tensors.ragged_from_numpy(ragged.offsets, ragged.values.astype(target))
    return tensors.from_numpy(tensors.to_numpy(column).astype(target))


def provenance(result: pa.RecordBatch) -> dict[str, str]:
    """What produced a result: ``model``, ``model_version``, ``model_sha256`` (of the model
    file) and ``execution_provider`` (e.g. ``CPUExecutionProvider``), from its schema
    metadata; servers and the local fallback both set them."""
    meta = result.schema.metadata or {}
    return {key: meta[key.encode()].decode() for key in PROVENANCE if key.encode() in meta}


def truncation(result: pa.RecordBatch) -> tuple[int, int]:
    """``(entries, items)`` that padding to the model's size cut from the request's ragged
    inputs (``(0, 0)`` when nothing was cut)."""
    meta = result.schema.metadata or {}
    return tuple(  # type: ignore[return-value]
        int(meta.get(key.encode(), b"0")) for key in TRUNCATION
    )


def _is_list(type: pa.DataType) -> bool:
    return pa.types.is_list(type) or pa.types.is_large_list(type)


def per_object(
    batch: pa.RecordBatch, schema: pa.Schema, *, model: str
) -> tuple[pa.RecordBatch, np.ndarray | None]:
    """A per-event collection sent to a per-object model, as that model's rows.

    When every input column of ``batch`` is a ``list``/``large_list`` one level deeper than
    the model's input (events of hits for ``facile``, which takes one hit per row), the
    request is the objects themselves: the lists' values (a view: no copy), with the
    events' offsets to :func:`regroup` the results by. Otherwise ``batch`` is returned as it
    is, with None.

    Raises
    ------
    InvalidInput
        When the columns are per-event collections of different lengths.
    """
    fields = [f for f in schema if f.name in batch.schema.names]
    if not fields or not all(
        _is_list(batch.column(f.name).type)
        and (not _is_list(f.type) or _is_list(batch.column(f.name).type.value_type))
        for f in fields
    ):
        return batch, None
    offsets: np.ndarray | None = None
    columns = []
    for field in fields:
        column = batch.column(field.name)
        mine = column.offsets.to_numpy()
        mine = mine - mine[0]  # a slice's offsets start where its first event does
        if offsets is None:
            offsets = mine
        elif not np.array_equal(offsets, mine):
            raise InvalidInput(
                "per-event collections of different lengths for a per-object model",
                model=model,
                input=field.name,
                expected=f"as many objects per event as {fields[0].name!r}",
            )
        columns.append(column.flatten())  # this slice's values only
    flat = pa.RecordBatch.from_arrays(columns, names=[f.name for f in fields])
    return flat, offsets


def regroup(result: pa.RecordBatch, offsets: np.ndarray | None) -> pa.RecordBatch:
    """Per-object results back into per-event lists with the request's ``offsets``.

    The output columns become ``list<...>`` over the same buffers (no copy); an event without
    objects gets an empty list. ``offsets`` None: ``result`` as it is.
    """
    if offsets is None:
        return result
    bounds = pa.array(offsets.astype(np.int32, copy=False))
    columns = [pa.ListArray.from_arrays(bounds, column) for column in result.columns]
    fields = [f.with_type(c.type) for f, c in zip(result.schema, columns, strict=True)]
    return pa.RecordBatch.from_arrays(
        columns, schema=pa.schema(fields, metadata=result.schema.metadata)
    )


def server_times(result: pa.RecordBatch) -> dict[str, int]:
    """The server-side times of the request a result answers: queue, compute (ns)."""
    meta = result.schema.metadata or {}
    return {key: int(meta[key.encode()]) for key in SERVER_TIMES if key.encode() in meta}


def _regular(array: pa.Array) -> pa.Array:
    """A ``fixed_shape_tensor`` array as nested ``fixed_size_list`` of non-null items."""
    shape = array.type.shape
    out = array.storage.flatten()  # the values of these rows (honours slicing): no copy
    for size in reversed(shape):
        item = pa.field("item", out.type, nullable=False)
        out = pa.FixedSizeListArray.from_arrays(out, type=pa.list_(item, size))
    return out


def to_awkward(result: pa.RecordBatch | pa.Table) -> Any:
    """A result as an awkward record array (one field per output).

    ``arrow.fixed_shape_tensor`` columns, which awkward does not read, become regular
    dimensions (nested ``fixed_size_list`` over the same buffers: no copy).
    """
    import awkward as ak

    fields, columns = [], []
    for field, column in zip(result.schema, result.columns, strict=True):
        out = column
        if isinstance(field.type, pa.FixedShapeTensorType):
            if isinstance(column, pa.ChunkedArray):
                out = pa.chunked_array([_regular(c) for c in column.chunks])
            else:
                out = _regular(column)
        fields.append(field.with_type(out.type))
        columns.append(out)
    return ak.from_arrow(type(result).from_arrays(columns, schema=pa.schema(fields)))
