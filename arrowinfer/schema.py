"""A model's signature as an Arrow schema, and the check of a request against it.

Each input (or output) is one field, named as in the model config. Its Arrow type is the
canonical form of the tensor per batch entry (see :mod:`arrowinfer.tensors`):

- shape ``[]`` (or ``[1]``): a primitive column;
- a fixed shape: ``arrow.fixed_shape_tensor(value_type, shape)``;
- a ragged input (padded by the server to the model's size), or a variable first
  dimension and no other: ``list<value_type>`` or ``list<fixed_size_list<...>>``;
- a variable dimension elsewhere (``[2, -1]``, ``[-1, -1]``):
  ``arrow.variable_shape_tensor(value_type, uniform_shape)``
  (:class:`arrowinfer.tensors.VariableShapeTensorType`).

An input with variable dimensions that is not declared ragged is a dense tensor per
request, as in Triton: its ``-1`` dims take any size, the same for every row of the
request (:func:`validate` checks it and returns the sizes, by which the dynamic batcher
merges only requests that agree). Besides the canonical type, a request may carry it as
an ``arrow.fixed_shape_tensor`` (or nested ``fixed_size_list``) of its concrete shape.

Field metadata keeps what Arrow's type cannot: ``datatype`` (Triton/KServe name, e.g.
``FP32``), ``shape`` (the config's dims as JSON, ``-1`` for variable) and, for ragged
inputs padded by the server, ``ragged`` = ``pad``.

:func:`validate` accepts the equivalent forms too (nested ``fixed_size_list`` for a tensor,
a primitive column for shape ``[1]``, ``large_list`` for ``list``, awkward's extension
types), and says precisely what is wrong otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from .errors import InvalidInput
from .tensors import (
    Layout,
    Ragged,
    from_numpy,
    is_string,
    layout,
    ragged_from_numpy,
    ragged_to_numpy,
    to_numpy,
    variable_from_numpy,
    variable_shape_tensor,
)

__all__ = [
    "DATATYPES",
    "STRING",
    "Datatype",
    "TensorSpec",
    "check_data",
    "check_rows",
    "datatype",
    "describe",
    "signature",
    "spec_field",
    "tensor_specs",
    "to_column",
    "validate",
]


class Datatype(NamedTuple):
    """One tensor element type under its names in Triton, KServe, numpy and Arrow."""

    triton: str  # model config, e.g. TYPE_FP32
    kserve: str  # KServe v2 protocol, e.g. FP32
    numpy: np.dtype
    arrow: pa.DataType


DATATYPES: tuple[Datatype, ...] = tuple(
    Datatype(f"TYPE_{name}", name, np.dtype(np_name), pa.from_numpy_dtype(np.dtype(np_name)))
    for name, np_name in [
        ("BOOL", "bool"),
        ("UINT8", "uint8"),
        ("UINT16", "uint16"),
        ("UINT32", "uint32"),
        ("UINT64", "uint64"),
        ("INT8", "int8"),
        ("INT16", "int16"),
        ("INT32", "int32"),
        ("INT64", "int64"),
        ("FP16", "float16"),
        ("FP32", "float32"),
        ("FP64", "float64"),
    ]
)

#: ``TYPE_STRING`` / KServe ``BYTES``: numpy object arrays (``str`` for onnxruntime), Arrow
#: ``string`` canonically; ``large_string``, ``binary`` and ``large_binary`` are the same type.
STRING = Datatype("TYPE_STRING", "BYTES", np.dtype(object), pa.string())

_BY_ANY: dict[object, Datatype] = {}
for _dt in (*DATATYPES, STRING):
    for _key in (_dt.triton, _dt.kserve, _dt.numpy, _dt.arrow):
        _BY_ANY[_key] = _dt
for _key in (pa.large_string(), pa.binary(), pa.large_binary(), np.dtype("U"), np.dtype("S")):
    _BY_ANY[_key] = STRING


def datatype(key: str | np.dtype | pa.DataType) -> Datatype:
    """Look an element type up by its Triton, KServe, numpy or Arrow name.

    Raises
    ------
    TypeError
        For types a tensor cannot hold here (``BF16``, ...).
    """
    if isinstance(key, type):
        key = np.dtype(key)
    if isinstance(key, np.dtype) and key.kind in "US":
        key = np.dtype(key.kind)  # any length of numpy string
    found = _BY_ANY.get(key)
    if found is None:
        supported = ", ".join(d.kserve for d in (*DATATYPES, STRING))
        raise TypeError(f"unsupported tensor data type {key!r} (supported: {supported})")
    return found


class TensorSpec(NamedTuple):
    """One input or output as a model config states it (dims without the batch dimension)."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    ragged: bool = False  # arrives as a list per entry; the server pads it to ``shape``
    optional: bool = False  # a request may leave it out (config ``optional: true``)


def _item_type(value_type: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    out = value_type
    for size in reversed(shape):
        out = pa.list_(out, size)
    return out


def spec_field(spec: TensorSpec) -> pa.Field:
    """The Arrow field of one tensor in its canonical form."""
    value_type = spec.datatype.arrow
    shape = spec.shape
    if spec.ragged:
        if any(d < 0 for d in shape):
            raise TypeError(
                f"{spec.name}: a ragged input needs fixed dims to pad to, got {list(shape)}"
            )
        type_ = pa.list_(_item_type(value_type, shape[1:]))
    elif shape and shape[0] == -1 and all(d >= 0 for d in shape[1:]):
        type_ = pa.list_(_item_type(value_type, shape[1:]))
    elif any(d < 0 for d in shape):
        if spec.datatype is STRING:
            raise TypeError(f"{spec.name}: strings with a variable dim after the first: {shape}")
        type_ = variable_shape_tensor(value_type, shape)
    elif shape in ((), (1,)):
        type_ = value_type
    elif spec.datatype is STRING:  # fixed_shape_tensor holds fixed-width values only
        type_ = _item_type(value_type, shape)
    else:
        type_ = pa.fixed_shape_tensor(value_type, list(shape))
    metadata = {"datatype": spec.datatype.kserve, "shape": json.dumps(list(shape))}
    if spec.ragged:
        metadata["ragged"] = "pad"
    if spec.optional:
        metadata["optional"] = "true"
    return pa.field(spec.name, type_, nullable=False, metadata=metadata)


def signature(specs: Sequence[TensorSpec], *, metadata: dict[str, str] | None = None) -> pa.Schema:
    """A model's inputs (or outputs) as an Arrow schema."""
    return pa.schema([spec_field(s) for s in specs], metadata=metadata)


def tensor_specs(schema: pa.Schema) -> list[TensorSpec]:
    """The specs a signature was made from (inverse of :func:`signature`)."""
    out = []
    for field in schema:
        meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
        lay = layout(field.type)
        shape = tuple(json.loads(meta["shape"])) if "shape" in meta else lay.shape
        dt = datatype(meta["datatype"]) if "datatype" in meta else datatype(lay.value_type)
        out.append(
            TensorSpec(
                field.name,
                dt,
                shape,
                ragged=meta.get("ragged") == "pad",
                optional=meta.get("optional") == "true",
            )
        )
    return out


def to_column(field: pa.Field, data: np.ndarray | Ragged) -> pa.Array:
    """Arrays (batch first) or a ``Ragged`` collection as a column of ``field``'s canonical type.

    No copies (as :func:`arrowinfer.tensors.from_numpy`); shapes are reshaped as views.
    """
    if type(field.type) is pa.FixedShapeTensorType and isinstance(data, np.ndarray):
        return from_numpy(data.reshape((len(data), *field.type.shape)))  # the common case
    want = layout(field.type)
    if want.ragged and (isinstance(data, Ragged) or _declared_ragged(field)):
        if not isinstance(data, Ragged):
            raise TypeError(f"{field.name}: a ragged field needs a Ragged collection")
        return ragged_from_numpy(data.offsets, data.values).cast(field.type)
    if isinstance(data, Ragged):
        raise TypeError(f"{field.name}: a fixed-shape field needs an array, got Ragged")
    n = len(data)
    if not want.shape:
        return from_numpy(data.reshape(n))
    if want.ragged:  # a variable first dim sent dense: every row has the same length
        length = data.shape[1] if data.ndim > 1 else 0
        offsets = np.arange(n + 1, dtype=np.int32) * length
        values = data.reshape((n * length, *data.shape[2:]))
        return ragged_from_numpy(offsets, values).cast(field.type)
    if -1 in want.shape:
        column = variable_from_numpy(data, want.shape)
        if column.type != field.type:  # the field read from IPC: Arrow C++'s own class
            return field.type.wrap_array(column.storage.cast(field.type.storage_type))
        return column
    return from_numpy(data.reshape((n, *want.shape)))


def _optional(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"optional") == b"true"


def _declared_ragged(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"ragged") == b"pad"


def _ragged_batch(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(b"ragged") == b"batch"


def _any_lengths(field: pa.Field) -> bool:
    """A list per entry whose lengths requests need not agree on: padded by the server
    (``ragged: pad``), or concatenated for Triton's ragged batching (``ragged: batch``, set
    by the repository for ``allow_ragged_batch`` inputs)."""
    return bool(field.metadata) and field.metadata.get(b"ragged") in (b"pad", b"batch")


def describe(lay: Layout) -> str:
    """A layout as users read it: ``float32[100, 2]`` or ``float32[var, 2]`` (ragged)."""
    dims = ", ".join("var" if d < 0 else str(d) for d in lay.shape)
    return f"{lay.value_type}[{dims}]"


def _shape_matches(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    if expected in ((), (1,)) and got in ((), (1,)):
        return True
    return len(expected) == len(got) and all(
        e in (-1, g) for e, g in zip(expected, got, strict=True)
    )


def _nulls(array: pa.Array | pa.ChunkedArray) -> int:
    """Nulls at any level of a column (events, items, values)."""
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    total = 0
    for chunk in chunks:
        a = chunk
        while True:
            while isinstance(a, pa.ExtensionArray):
                a = a.storage
            total += a.null_count
            if pa.types.is_fixed_size_list(a.type):
                size = a.type.list_size
                a = a.values.slice(a.offset * size, len(a) * size)
            elif pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
                # none null anywhere under the whole child, so none in the part the entries
                # refer to: that needs no flatten (a compute call, ~10 us); else count that part
                if _nulls(a.values) == 0:
                    break
                a = a.flatten()
            else:
                break
    return total


def _read_names(fields: list[pa.Field]) -> None:
    """Read every field's name, nested ones too (each raises if it is not UTF-8)."""
    while fields:
        field = fields.pop()
        _ = field.name
        kind = field.type
        while isinstance(kind, pa.BaseExtensionType):
            kind = kind.storage_type
        fields.extend(kind.field(i) for i in range(kind.num_fields))


def check_data(
    batch: pa.RecordBatch | pa.Table, expected: pa.Schema | None = None, *, model: str | None = None
) -> None:
    """Check that a batch's buffers hold what its metadata declares, before anything reads them.

    A batch received over the wire is only metadata over the client's buffers: a length,
    offset or null count can claim more than the buffers hold, and numpy or onnxruntime
    would then read (or send back) memory past them. This is Arrow's full validation
    (``validate(full=True)``): every column, nested child and extension storage, its
    buffer sizes, list offsets (in range and increasing) and UTF-8. It costs a few
    microseconds for fixed-size data and a pass over the offsets of list columns; it is
    never skipped (a cache may skip the signature check of :func:`validate`, never this).
    Names (of fields and nested fields) must be UTF-8 too; a schema equal to ``expected``
    (the model's signature: what arrowinfer's clients send) needs no second look at them.

    Raises
    ------
    InvalidInput
        Arrow's reason, which names only the column and the sizes.
    """
    try:
        batch.validate(full=True)
        if expected is None or not batch.schema.equals(expected):
            # pyarrow decodes names as UTF-8 whenever they are read: read them all now
            _read_names(list(batch.schema))
    except (pa.ArrowException, ValueError, TypeError) as err:
        raise InvalidInput(f"the request's Arrow data is malformed: {err}", model=model) from None


def check_rows(rows: int, max_rows: int | None, *, model: str) -> None:
    """Refuse a request of more than ``max_rows`` rows (None: no limit).

    Raises
    ------
    InvalidInput
        Naming the model, the limit and the rows.
    """
    if max_rows is not None and rows > max_rows:
        raise InvalidInput(
            "too many rows in one request",
            model=model,
            expected=f"<= {max_rows} rows",
            got=f"{rows} rows",
        )


def validate(
    batch: pa.RecordBatch | pa.Table,
    schema: pa.Schema,
    *,
    model: str,
    max_rows: int | None = None,
) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """Check a request against a model's input signature.

    Parameters
    ----------
    batch
        The request: one column per input, one row per batch entry.
    schema
        The model's input signature (from :func:`signature`).
    model
        The model's name, for the error message.
    max_rows
        The most rows one request may have, if limited.

    Returns
    -------
    tuple
        ``((input, shape), ...)``: the concrete per-entry shape of each input with variable
        dims that is not declared ragged, and ``(input, None)`` for each optional input the
        request leaves out (empty when there is none). Requests for which it differs cannot
        share a batch.

    Raises
    ------
    InvalidInput
        Naming the model and the input, with expected and received: missing (required) or
        unexpected columns, element type, per-entry shape (or ragged vs. fixed; rows of a
        dense input with variable dims that differ in shape), nulls. A request of zero rows
        is valid (its result has zero rows).
    """
    check_rows(batch.num_rows, max_rows, model=model)
    # what our clients send: every input, in order, of the model's types (a cheap compare)
    canonical = batch.schema.equals(schema)
    omitted = [] if canonical else _check_names(batch.schema, schema, model)
    # requests that leave out different optional inputs cannot share a batch either
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(omitted)
    for field in schema:
        if field.name in shapes:
            continue
        column = batch.column(field.name)
        want = layout(field.type)
        variable = -1 in want.shape and not _any_lengths(field)
        if canonical:
            _check_nulls(column, model, field.name)
            if variable:
                shapes[field.name] = _entry_shape(column, want, model, field.name)
            continue
        try:
            got = layout(column.type)
        except TypeError:
            raise InvalidInput(
                "not a tensor column",
                model=model,
                input=field.name,
                expected=describe(want),
                got=str(column.type),
            ) from None
        if got.value_type != want.value_type and not (
            is_string(got.value_type) and is_string(want.value_type)
        ):
            raise InvalidInput(
                "wrong element type",
                model=model,
                input=field.name,
                expected=f"{want.value_type} ({datatype(want.value_type).kserve})",
                got=str(got.value_type),
            )
        # a ragged-batch input may also come dense: every row then has the same length
        dense_batch = _ragged_batch(field) and want.ragged and not got.ragged
        if got.ragged != want.ragged and not variable and not dense_batch:
            how = "a list per entry (ragged)" if want.ragged else "a fixed shape per entry"
            raise InvalidInput(
                f"expected {how}",
                model=model,
                input=field.name,
                expected=describe(want),
                got=describe(got),
            )
        _check_nulls(column, model, field.name)
        if variable:
            shapes[field.name] = _entry_shape(column, want, model, field.name)
        elif not _shape_matches(want.shape, got.shape):
            raise InvalidInput(
                "wrong shape per entry",
                model=model,
                input=field.name,
                expected=describe(want),
                got=describe(got),
            )
    return tuple(shapes.items())


def _check_names(got: pa.Schema, schema: pa.Schema, model: str) -> list[str]:
    """The optional inputs a request leaves out.

    Raises
    ------
    InvalidInput
        Missing (required), unexpected or duplicate columns.
    """
    names = set(got.names)
    omitted = [f.name for f in schema if f.name not in names and _optional(f)]
    missing = [n for n in schema.names if n not in names and n not in omitted]
    if missing:
        raise InvalidInput(
            f"missing input column(s) {missing}", model=model, expected=schema.names, got=got.names
        )
    expected_names = set(schema.names)
    extra = [n for n in got.names if n not in expected_names]
    if extra:
        raise InvalidInput(
            f"unexpected column(s) {extra}", model=model, expected=schema.names, got=got.names
        )
    if len(names) != len(got.names):
        raise InvalidInput("duplicate column names", model=model, got=got.names)
    return omitted


def _entry_shape(
    column: pa.Array | pa.ChunkedArray, want: Layout, model: str, name: str
) -> tuple[int, ...]:
    """The one concrete per-entry shape of a dense input with variable dims.

    Raises
    ------
    InvalidInput
        When rows differ in shape (a dense tensor has one shape), or it does not fit ``want``.
    """
    got = layout(column.type)
    if got.ragged:
        counts = ragged_to_numpy(column).counts
        if len(counts) and np.any(counts != counts[0]):
            raise InvalidInput(
                "entries have different lengths; a dense input has one shape per request "
                "(send entries of different lengths in separate requests)",
                model=model,
                input=name,
                expected=describe(want),
                got=f"lengths {int(counts.min())}..{int(counts.max())}",
            )
        shape = (int(counts[0]) if len(counts) else 0, *got.shape[1:])
    elif getattr(column.type, "extension_name", None) == "arrow.variable_shape_tensor":
        try:  # the rows' own shapes: a type's uniform_shape proves nothing about them
            shape = to_numpy(column).shape[1:]
        except ValueError as err:
            raise InvalidInput(
                f"{err}; a dense input has one shape per request",
                model=model,
                input=name,
                expected=describe(want),
            ) from None
    else:
        shape = got.shape
    if len(shape) != len(want.shape) or any(
        e not in (-1, g) for e, g in zip(want.shape, shape, strict=True)
    ):
        raise InvalidInput(
            "wrong shape per entry",
            model=model,
            input=name,
            expected=describe(want),
            got=str(list(shape)),
        )
    return tuple(int(d) for d in shape)


def _check_nulls(column: pa.Array | pa.ChunkedArray, model: str, name: str) -> None:
    nulls = _nulls(column)
    if nulls:
        raise InvalidInput(f"{nulls} null value(s); nulls are not allowed", model=model, input=name)
