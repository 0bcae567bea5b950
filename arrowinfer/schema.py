"""A model's signature as an Arrow schema, and the check of a request against it.

Each input (or output) is one field, named as in the model config. Its Arrow type is the
canonical form of the tensor per batch entry (see :mod:`arrowinfer.tensors`):

- shape ``[]`` (or ``[1]``): a primitive column;
- a fixed shape: ``arrow.fixed_shape_tensor(value_type, shape)``;
- a ragged input (variable first dimension, or padded by the server to the model's size):
  ``list<value_type>`` or ``list<fixed_size_list<...>>``.

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
from .tensors import Layout, Ragged, from_numpy, layout, ragged_from_numpy

__all__ = [
    "DATATYPES",
    "Datatype",
    "TensorSpec",
    "check_data",
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

_BY_ANY: dict[object, Datatype] = {}
for _dt in DATATYPES:
    for _key in (_dt.triton, _dt.kserve, _dt.numpy, _dt.arrow):
        _BY_ANY[_key] = _dt


def datatype(key: str | np.dtype | pa.DataType) -> Datatype:
    """Look an element type up by its Triton, KServe, numpy or Arrow name.

    Raises
    ------
    TypeError
        For types a tensor cannot hold here (``TYPE_STRING``/``BYTES``, ``BF16``, ...).
    """
    found = _BY_ANY.get(np.dtype(key) if isinstance(key, type) else key)
    if found is None:
        supported = ", ".join(d.kserve for d in DATATYPES)
        raise TypeError(f"unsupported tensor data type {key!r} (supported: {supported})")
    return found


class TensorSpec(NamedTuple):
    """One input or output as a model config states it (dims without the batch dimension)."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    ragged: bool = False  # arrives as a list per entry; the server pads it to ``shape``


def _item_type(value_type: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    out = value_type
    for size in reversed(shape):
        out = pa.list_(out, size)
    return out


def spec_field(spec: TensorSpec) -> pa.Field:
    """The Arrow field of one tensor in its canonical form."""
    value_type = spec.datatype.arrow
    shape = spec.shape
    if spec.ragged or (shape and shape[0] == -1):
        if any(d < 0 for d in shape[1:]):
            raise TypeError(
                f"{spec.name}: only the first per-entry dimension may vary, got {list(shape)}"
            )
        type_ = pa.list_(_item_type(value_type, shape[1:]))
    elif any(d < 0 for d in shape):
        raise TypeError(
            f"{spec.name}: only the first per-entry dimension may vary, got {list(shape)}"
        )
    elif shape in ((), (1,)):
        type_ = value_type
    else:
        type_ = pa.fixed_shape_tensor(value_type, list(shape))
    metadata = {"datatype": spec.datatype.kserve, "shape": json.dumps(list(shape))}
    if spec.ragged:
        metadata["ragged"] = "pad"
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
        out.append(TensorSpec(field.name, dt, shape, ragged=meta.get("ragged") == "pad"))
    return out


def to_column(field: pa.Field, data: np.ndarray | Ragged) -> pa.Array:
    """Arrays (batch first) or a ``Ragged`` collection as a column of ``field``'s canonical type.

    No copies (as :func:`arrowinfer.tensors.from_numpy`); shapes are reshaped as views.
    """
    want = layout(field.type)
    if want.ragged:
        if not isinstance(data, Ragged):
            raise TypeError(f"{field.name}: a ragged field needs a Ragged collection")
        return ragged_from_numpy(data.offsets, data.values).cast(field.type)
    if isinstance(data, Ragged):
        raise TypeError(f"{field.name}: a fixed-shape field needs an array, got Ragged")
    n = len(data)
    if not want.shape:
        return from_numpy(data.reshape(n))
    return from_numpy(data.reshape((n, *want.shape)))


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


def validate(
    batch: pa.RecordBatch | pa.Table,
    schema: pa.Schema,
    *,
    model: str,
    max_rows: int | None = None,
) -> None:
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

    Raises
    ------
    InvalidInput
        Naming the model and the input, with expected and received: missing or unexpected
        columns, element type, per-entry shape (or ragged vs. fixed), nulls. A request of
        zero rows is valid (its result has zero rows).
    """
    names = set(batch.schema.names)
    expected_names = set(schema.names)
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise InvalidInput(
            f"missing input column(s) {missing}",
            model=model,
            expected=schema.names,
            got=batch.schema.names,
        )
    extra = [n for n in batch.schema.names if n not in expected_names]
    if extra:
        raise InvalidInput(
            f"unexpected column(s) {extra}",
            model=model,
            expected=schema.names,
            got=batch.schema.names,
        )
    if len(set(batch.schema.names)) != len(batch.schema.names):
        raise InvalidInput("duplicate column names", model=model, got=batch.schema.names)
    if max_rows is not None and batch.num_rows > max_rows:
        raise InvalidInput(
            "too many rows in one request",
            model=model,
            expected=f"<= {max_rows} rows",
            got=f"{batch.num_rows} rows",
        )
    canonical = batch.schema.equals(schema)  # what our clients send: types need no check
    for field in schema:
        column = batch.column(field.name)
        if canonical:
            _check_nulls(column, model, field.name)
            continue
        want = layout(field.type)
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
        if got.value_type != want.value_type:
            raise InvalidInput(
                "wrong element type",
                model=model,
                input=field.name,
                expected=f"{want.value_type} ({datatype(want.value_type).kserve})",
                got=str(got.value_type),
            )
        if got.ragged != want.ragged:
            how = "a list per entry (ragged)" if want.ragged else "a fixed shape per entry"
            raise InvalidInput(
                f"expected {how}",
                model=model,
                input=field.name,
                expected=describe(want),
                got=describe(got),
            )
        if not _shape_matches(want.shape, got.shape):
            raise InvalidInput(
                "wrong shape per entry",
                model=model,
                input=field.name,
                expected=describe(want),
                got=describe(got),
            )
        _check_nulls(column, model, field.name)


def _check_nulls(column: pa.Array | pa.ChunkedArray, model: str, name: str) -> None:
    nulls = _nulls(column)
    if nulls:
        raise InvalidInput(f"{nulls} null value(s); nulls are not allowed", model=model, input=name)
