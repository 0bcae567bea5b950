"""numpy arrays <-> Arrow columns, without copies wherever the Arrow layout allows.

Row ``i`` of a column is batch entry ``i`` (an event, a jet, a hit). The layouts:

======================================  ============================  ===================
numpy (per batch entry)                 Arrow column                  numpy -> Arrow copy
======================================  ============================  ===================
``(n,)`` one value per entry            primitive                     no
``(n, *shape)`` fixed shape             ``arrow.fixed_shape_tensor``  no
                                        (or nested ``fixed_size_list``)
ragged: ``Ragged(offsets, values)``     ``list``/``large_list`` of    no
with ``values`` ``(total, *shape)``     primitive/``fixed_size_list``
``(n, *shape)`` with variable dims       ``arrow.variable_shape_tensor``  no
(one shape for the whole batch)
======================================  ============================  ===================

Copies happen only where the layouts differ, and are documented where they happen:
booleans (Arrow packs them into bits), numpy input that is not C-contiguous, columns with
nulls (refused), a ``ChunkedArray`` of more than one chunk, and the ``n + 1`` offsets of a
sliced list column (rebased to start at 0; the values are never copied).

Extension types (``arrow.fixed_shape_tensor``, and awkward's ``awkward<...>`` types from
``ak.to_arrow``) are read through their storage.

pyarrow has no class for Arrow's canonical ``arrow.variable_shape_tensor`` extension (a
tensor per row whose shape may differ from row to row: storage
``struct<data: list<T>, shape: fixed_size_list<int32>[ndim]>``, metadata
``{"uniform_shape": [...]}`` with ``null`` for a dimension that varies):
:class:`VariableShapeTensorType` is that type. It travels over IPC and Flight under its
canonical name; read back, the type is a ``pyarrow.BaseExtensionType`` where Arrow C++ knows
the name (later pyarrow), and this class where it does not (pyarrow 19: registered below),
both recognised by :func:`layout` and :func:`to_numpy`. Here it carries inputs and outputs
whose config has a ``-1`` in a dimension other than the first (``[2, -1]``, ``[-1, -1]``):
a dense tensor per request, every row of one batch with the same shape.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Mapping
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import pyarrow as pa

__all__ = [
    "Layout",
    "Ragged",
    "VariableShapeTensorType",
    "batch_from_numpy",
    "batch_to_numpy",
    "from_numpy",
    "is_string",
    "layout",
    "mask",
    "pad",
    "ragged_counts",
    "ragged_from_numpy",
    "ragged_to_numpy",
    "to_numpy",
    "variable_from_numpy",
    "variable_shape_tensor",
]

#: The alignment (bytes) of every array handed to a model: Arrow's own buffer alignment.
#: onnxruntime's CPU kernels take different vectorised paths (and so round differently)
#: for differently aligned inputs; gRPC hands received buffers over at any address, so
#: without this the same event could give other bits over Flight than in-process. Here,
#: not in backends/, because clients place what they send at it too (shared memory).
ALIGNMENT = 64

Column: TypeAlias = pa.Array | pa.ChunkedArray


class Ragged(NamedTuple):
    """A ragged collection in numpy form: entry ``i`` is ``values[offsets[i]:offsets[i+1]]``.

    ``offsets`` has ``n + 1`` integers starting at 0; ``values`` has shape ``(total, *shape)``.
    """

    offsets: np.ndarray
    values: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Number of items of each entry (``np.diff(offsets)``)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


class Layout(NamedTuple):
    """What a column holds per batch entry: value type, shape, and whether it is ragged.

    For a ragged column the first dimension of ``shape`` is ``-1`` (variable).
    """

    value_type: pa.DataType
    shape: tuple[int, ...]
    ragged: bool


class VariableShapeTensorType(pa.ExtensionType):
    """Arrow's canonical ``arrow.variable_shape_tensor`` (no permutation, no dim names).

    Parameters
    ----------
    value_type
        The element type.
    uniform_shape
        One entry per dimension: its size, or ``-1`` (JSON ``null``) where it varies.
    """

    def __init__(self, value_type: pa.DataType, uniform_shape: tuple[int, ...]):
        self.value_type = value_type
        self.uniform_shape = tuple(int(d) for d in uniform_shape)
        storage = pa.struct(
            [
                pa.field("data", pa.list_(value_type)),
                pa.field("shape", pa.list_(pa.int32(), len(self.uniform_shape))),
            ]
        )
        super().__init__(storage, "arrow.variable_shape_tensor")

    def __arrow_ext_serialize__(self) -> bytes:
        uniform = [None if d < 0 else d for d in self.uniform_shape]
        return json.dumps({"uniform_shape": uniform}).encode()

    @classmethod
    def __arrow_ext_deserialize__(
        cls, storage_type: pa.DataType, serialized: bytes
    ) -> VariableShapeTensorType:
        """The type of a column read from IPC, Flight or a pickle (the registration below).

        Raises
        ------
        pyarrow.ArrowInvalid
            The storage or the metadata is not the canonical type's (the bytes come from a
            peer: untrusted), or a permutation is given. Arrow's own error, as Arrow C++
            raises where it knows the type: a reader fails as on any malformed IPC message.
        """
        storage = storage_type
        if not (
            pa.types.is_struct(storage)
            and [f.name for f in storage] == ["data", "shape"]
            and pa.types.is_list(storage.field("data").type)
            and pa.types.is_fixed_size_list(storage.field("shape").type)
            and storage.field("shape").type.value_type == pa.int32()
        ):
            raise pa.ArrowInvalid(f"not the storage of arrow.variable_shape_tensor: {storage}")
        ndim = storage.field("shape").type.list_size
        try:
            meta = json.loads(serialized.decode() or "{}")
        except ValueError as e:  # UnicodeDecodeError is one
            raise pa.ArrowInvalid(
                f"arrow.variable_shape_tensor metadata is not JSON: {e}"
            ) from None
        if not isinstance(meta, dict):
            raise pa.ArrowInvalid("arrow.variable_shape_tensor metadata is not a JSON object")
        if meta.get("permutation") not in (None, list(range(ndim))):
            raise pa.ArrowInvalid("arrow.variable_shape_tensor with a permutation is not supported")
        uniform = meta.get("uniform_shape") or [None] * ndim
        if not (
            isinstance(uniform, list)
            and len(uniform) == ndim
            and all(d is None or (type(d) is int and d >= 0) for d in uniform)
        ):
            raise pa.ArrowInvalid(
                f"arrow.variable_shape_tensor uniform_shape {uniform!r} for {ndim} dims"
            )
        data_type = storage.field("data").type
        return cls(data_type.value_type, tuple(-1 if d is None else d for d in uniform))


# Arrow C++ registers the canonical type itself in later pyarrow (26 has it, and refuses a
# second registration with ArrowKeyError); read back, a column is then a BaseExtensionType
# (below). pyarrow 19, the floor, does not know the name: without this registration a column
# read from IPC, Flight or shared memory comes back as its bare struct storage, the name only
# in the field's metadata, and is no tensor layout. Registered, it comes back as
# VariableShapeTensorType, through __arrow_ext_deserialize__.
with contextlib.suppress(pa.ArrowKeyError):
    pa.register_extension_type(VariableShapeTensorType(pa.float32(), (-1,)))


def variable_shape_tensor(
    value_type: pa.DataType, uniform_shape: tuple[int, ...] | list[int]
) -> VariableShapeTensorType:
    """The ``arrow.variable_shape_tensor`` type; ``-1`` marks a varying dimension."""
    return VariableShapeTensorType(value_type, tuple(uniform_shape))


def _is_variable(type: pa.DataType) -> bool:
    """Arrow C++ knows the canonical type itself: read from IPC, it is a BaseExtensionType."""
    return getattr(type, "extension_name", None) == "arrow.variable_shape_tensor"


def layout(type: pa.DataType) -> Layout:
    """The per-entry value type and shape of an Arrow column type.

    Raises
    ------
    TypeError
        For types that are not a tensor layout (strings, structs, lists of lists, ...).
    """
    if isinstance(type, pa.FixedShapeTensorType):
        return Layout(type.value_type, tuple(type.shape), ragged=False)
    if isinstance(type, VariableShapeTensorType):
        return Layout(type.value_type, type.uniform_shape, ragged=False)
    if _is_variable(type):  # uniform_shape is not readable from Python: every dim may vary
        storage = type.storage_type
        ndim = storage.field("shape").type.list_size
        return Layout(storage.field("data").type.value_type, (-1,) * ndim, ragged=False)
    if isinstance(type, pa.BaseExtensionType):
        return layout(type.storage_type)
    if pa.types.is_list(type) or pa.types.is_large_list(type):
        inner = layout(type.value_type)
        if inner.ragged:
            raise TypeError(f"lists of lists are not a tensor layout: {type}")
        return Layout(inner.value_type, (-1, *inner.shape), ragged=True)
    if pa.types.is_fixed_size_list(type):
        inner = layout(type.value_type)
        if inner.ragged:
            raise TypeError(f"fixed-size lists of lists are not a tensor layout: {type}")
        return Layout(inner.value_type, (type.list_size, *inner.shape), ragged=False)
    if pa.types.is_integer(type) or pa.types.is_floating(type) or pa.types.is_boolean(type):
        return Layout(type, (), ragged=False)
    if is_string(type):
        return Layout(type, (), ragged=False)
    raise TypeError(f"not a tensor layout: {type}")


# -- numpy -> Arrow ------------------------------------------------------------------------


def is_string(type: pa.DataType) -> bool:
    """Arrow ``string``, ``large_string``, ``binary`` or ``large_binary``: KServe's BYTES."""
    return (
        pa.types.is_string(type)
        or pa.types.is_large_string(type)
        or pa.types.is_binary(type)
        or pa.types.is_large_binary(type)
    )


def _strings(flat: np.ndarray) -> pa.Array:
    """Strings (numpy ``U``/``S`` or objects of ``str``/``bytes``): Arrow ``string`` when every
    value is text, else ``binary``. Arrow lays them out anew: a copy by nature."""
    if flat.dtype.kind == "U":
        return pa.array(flat, type=pa.string())
    if flat.dtype.kind == "S":
        return pa.array(flat, type=pa.binary())
    if all(isinstance(v, str) for v in flat):
        return pa.array(flat, type=pa.string())
    if all(isinstance(v, (bytes, bytearray)) for v in flat):
        return pa.array(flat, type=pa.binary())
    raise TypeError("an object array must hold only str or only bytes")


def _primitive(flat: np.ndarray) -> pa.Array:
    """A 1-d numpy array as a primitive Arrow array, sharing its memory (booleans excepted)."""
    if flat.dtype.kind in "OUS":
        return _strings(flat)
    if flat.dtype == np.bool_:
        return pa.array(flat, type=pa.bool_())  # packs bits: the one unavoidable copy
    type_ = pa.from_numpy_dtype(flat.dtype)
    return pa.Array.from_buffers(type_, len(flat), [None, pa.py_buffer(flat)])


def from_numpy(
    array: np.ndarray,
    *,
    tensor_type: Literal["fixed_shape_tensor", "fixed_size_list"] = "fixed_shape_tensor",
) -> pa.Array:
    """An array whose first dimension is the batch as one Arrow column.

    Parameters
    ----------
    array
        Shape ``(n,)`` gives a primitive column; ``(n, *shape)`` gives
        ``arrow.fixed_shape_tensor(dtype, shape)`` or, with
        ``tensor_type="fixed_size_list"``, nested ``fixed_size_list`` columns.
    tensor_type
        The Arrow type of multi-dimensional entries.

    Returns
    -------
    pyarrow.Array
        Shares memory with ``array`` (and keeps it alive), except for ``bool`` arrays
        (bit-packed by Arrow) and non-C-contiguous arrays, which are copied once.
    """
    array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError("a column needs a batch dimension; got a 0-d array")
    kind = array.dtype.kind
    if kind not in "biufOUS":
        raise TypeError(f"not a numeric or string dtype: {array.dtype}")
    shape = array.shape[1:]
    if 0 in shape:
        raise ValueError(f"per-entry shape {shape} has no values")
    flat = _primitive(np.ascontiguousarray(array).reshape(-1))  # copies non-contiguous input only
    if not shape:
        return flat
    if tensor_type == "fixed_size_list" or kind in "OUS":  # strings: no tensor extension
        for size in reversed(shape):
            flat = pa.FixedSizeListArray.from_arrays(flat, size)
        return flat
    if tensor_type != "fixed_shape_tensor":
        raise ValueError(
            f"tensor_type must be 'fixed_shape_tensor' or 'fixed_size_list', got {tensor_type!r}"
        )
    # The extension type's storage is one flat fixed_size_list of prod(shape) values.
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(shape))
    return _tensor_type(flat.type, shape).wrap_array(storage)


@functools.lru_cache(maxsize=256)
def _tensor_type(value_type: pa.DataType, shape: tuple[int, ...]) -> pa.FixedShapeTensorType:
    """``arrow.fixed_shape_tensor(value_type, shape)``, made once per type and shape (a
    conversion on every request's path makes one)."""
    return pa.fixed_shape_tensor(value_type, list(shape))


def variable_from_numpy(
    array: np.ndarray, uniform_shape: tuple[int, ...] | None = None
) -> pa.Array:
    """A dense array ``(n, *shape)`` as an ``arrow.variable_shape_tensor`` column.

    Every row gets ``shape``; the values are not copied (booleans and non-C-contiguous
    input excepted), the ``n`` offsets and shapes are small new arrays.
    ``uniform_shape`` (default: ``shape`` itself) is the type's, ``-1`` where it varies.
    """
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"a variable-shape tensor column needs (n, *shape), got {array.shape}")
    n, shape = array.shape[0], array.shape[1:]
    uniform = tuple(shape) if uniform_shape is None else tuple(uniform_shape)
    if len(uniform) != len(shape) or any(
        u not in (-1, d) for u, d in zip(uniform, shape, strict=True)
    ):
        raise ValueError(f"shape {list(shape)} does not fit {list(uniform)}")
    size = math.prod(shape)
    if n * size > np.iinfo(np.int32).max:
        raise ValueError(f"{n * size} values do not fit a column's 32-bit list offsets")
    values = _primitive(np.ascontiguousarray(array).reshape(-1))
    offsets = np.arange(n + 1, dtype=np.int32) * size
    data = pa.ListArray.from_arrays(_primitive(offsets), values)
    shapes = pa.FixedSizeListArray.from_arrays(
        _primitive(np.tile(np.asarray(shape, dtype=np.int32), n)), len(shape)
    )
    type_ = VariableShapeTensorType(values.type, uniform)
    storage = pa.StructArray.from_arrays([data, shapes], fields=list(type_.storage_type))
    return pa.ExtensionArray.from_storage(type_, storage)


def _variable_to_numpy(array: pa.Array) -> np.ndarray:
    """A ``arrow.variable_shape_tensor`` column whose rows share one shape, as ``(n, *shape)``."""
    storage = array.storage
    _check_no_nulls(storage)
    ndim = storage.type.field("shape").type.list_size
    data, shape_column = storage.flatten()  # the children of these rows (slicing honoured)
    shapes = _flat_values(shape_column).to_numpy(zero_copy_only=True).reshape(len(array), ndim)
    if len(array) and np.any(shapes != shapes[0]):
        raise ValueError("the rows of a variable-shape tensor column have different shapes")
    shape = tuple(int(d) for d in shapes[0]) if len(array) else (0,) * ndim
    _check_no_nulls(data)
    offsets = data.offsets.to_numpy(zero_copy_only=True)
    start, stop = int(offsets[0]), int(offsets[-1])
    if stop - start != len(array) * math.prod(shape):
        raise ValueError("a variable-shape tensor's data does not match its shapes")
    values = data.values.slice(start, stop - start)
    _check_no_nulls(values)
    return _primitive_to_numpy(values).reshape((len(array), *shape))


def ragged_from_numpy(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """A ragged collection as a ``list`` (int32 offsets) or ``large_list`` (int64) column.

    ``values`` of shape ``(total, *shape)`` become ``fixed_size_list`` items. Neither
    offsets nor values are copied (booleans excepted).
    """
    offsets = np.asarray(offsets)
    if offsets.dtype not in (np.int32, np.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.ndim != 1 or len(offsets) == 0:
        raise ValueError("offsets must be 1-d with n + 1 entries")
    items = from_numpy(values, tensor_type="fixed_size_list")
    cls = pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray
    return cls.from_arrays(_primitive(offsets), items)


def batch_from_numpy(columns: Mapping[str, np.ndarray | Ragged | pa.Array]) -> pa.RecordBatch:
    """A record batch from named numpy arrays, ``Ragged`` collections or Arrow arrays.

    Conversions as in :func:`from_numpy` and :func:`ragged_from_numpy`: no copies.
    """
    arrays = []
    for value in columns.values():
        if isinstance(value, pa.Array):
            arrays.append(value)
        elif isinstance(value, Ragged):
            arrays.append(ragged_from_numpy(value.offsets, value.values))
        else:
            arrays.append(from_numpy(value))
    return pa.RecordBatch.from_arrays(arrays, names=list(columns))


# -- Arrow -> numpy ------------------------------------------------------------------------


def _single(column: Column) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        # Several chunks must become one buffer: the only copy on this side.
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _storage(array: pa.Array) -> pa.Array:
    while isinstance(array, pa.ExtensionArray):
        array = array.storage
    return array


def _check_no_nulls(array: pa.Array) -> None:
    if array.null_count:
        raise ValueError(f"column has {array.null_count} nulls; fill them before inference")


def _flat_values(array: pa.Array) -> pa.Array:
    """The primitive values under nested fixed-size lists, sliced to ``array``'s rows."""
    array = _storage(array)
    _check_no_nulls(array)
    while pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        # slicing the child is flatten() without its compute-kernel dispatch: no copy either
        array = _storage(array.values.slice(array.offset * size, len(array) * size))
        _check_no_nulls(array)
    return array


def _primitive_to_numpy(array: pa.Array) -> np.ndarray:
    if is_string(array.type):
        return array.to_numpy(zero_copy_only=False)  # objects of str or bytes: a copy
    if pa.types.is_boolean(array.type):
        return array.to_numpy(zero_copy_only=False)  # unpacks bits: a copy
    # The same zero-copy view as Array.to_numpy, at half its cost on a fresh array (it is
    # on every request's path); np.frombuffer also checks the view lies inside the buffer.
    dtype = np.dtype(array.type.to_pandas_dtype())
    data = array.buffers()[1]
    if data is None:  # an empty array may have no data buffer
        return np.empty(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _fixed_shape_to_numpy(array: pa.Array) -> np.ndarray | None:
    """:func:`to_numpy` of the common case, with the fewest Arrow calls (it is on every
    request's path, twice): an ``arrow.fixed_shape_tensor`` of numbers in row-major order
    without a null anywhere under it. None for anything else (the general path)."""
    kind = array.type
    if type(kind) is not pa.FixedShapeTensorType or kind.permutation is not None:
        return None
    storage = array.storage
    values = storage.values  # the whole child: none null there, none in this array's part
    if storage.null_count or values.null_count:
        return None
    value_type = values.type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        return None
    shape = tuple(kind.shape)
    size = math.prod(shape)
    dtype = np.dtype(value_type.to_pandas_dtype())
    start = storage.offset * size + values.offset
    data = values.buffers()[1]
    count = len(array) * size
    if data is None:  # no values at all
        return np.empty((len(array), *shape), dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=count, offset=start * dtype.itemsize).reshape(
        (len(array), *shape)
    )


def to_numpy(column: Column) -> np.ndarray:
    """A fixed-layout column as one numpy array of shape ``(n, *shape)``.

    Accepts primitive, ``arrow.fixed_shape_tensor``, nested ``fixed_size_list`` and
    extension types over them. Shares memory with the Arrow buffers, including for sliced
    arrays; copies booleans and multi-chunk ``ChunkedArray``.

    Raises
    ------
    ValueError
        If the column has nulls.
    TypeError
        If the column is ragged (use :func:`ragged_to_numpy`) or not a tensor layout.
    """
    array = _single(column)
    fast = _fixed_shape_to_numpy(array)
    if fast is not None:
        return fast
    lay = layout(array.type)
    if lay.ragged:
        raise TypeError(f"ragged column ({array.type}): use ragged_to_numpy")
    if _is_variable(array.type):
        return _variable_to_numpy(array)
    permutation = getattr(array.type, "permutation", None)
    if permutation and list(permutation) != sorted(permutation):
        _check_no_nulls(_storage(array))
        return array.to_numpy_ndarray()  # a strided view in the logical order
    values = _primitive_to_numpy(_flat_values(array))
    return values.reshape((len(array), *lay.shape))


def ragged_to_numpy(column: Column) -> Ragged:
    """A ``list``/``large_list`` column as ``Ragged(offsets, values)``.

    The values share memory with the Arrow child array (only the rows this, possibly
    sliced, column covers). Offsets of a slice that does not start at 0 are rebased,
    which copies ``n + 1`` integers.
    """
    array = _storage(_single(column))
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise TypeError(f"not a ragged (list) column: {array.type}")
    _check_no_nulls(array)
    offsets = array.offsets.to_numpy(zero_copy_only=True)
    start, stop = int(offsets[0]), int(offsets[-1])
    values = to_numpy(array.values.slice(start, stop - start))  # flatten(), minus its dispatch
    if start:
        offsets = offsets - start
    return Ragged(offsets, values)


def ragged_counts(column: Column) -> np.ndarray:
    """The number of items of each entry of a ``list``/``large_list`` column.

    From the offsets alone (``n`` integers out): the values are not looked at.
    """
    array = _storage(_single(column))
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise TypeError(f"not a ragged (list) column: {array.type}")
    return np.diff(array.offsets.to_numpy(zero_copy_only=True))


def batch_to_numpy(batch: pa.RecordBatch | pa.Table) -> dict[str, np.ndarray | Ragged]:
    """Each column of a batch as a numpy array, or ``Ragged`` for list columns. No copies."""
    out: dict[str, np.ndarray | Ragged] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        out[name] = ragged_to_numpy(column) if layout(column.type).ragged else to_numpy(column)
    return out


# -- ragged -> fixed size (for models that need it) ----------------------------------------


def pad(
    ragged: Ragged, length: int, *, pad_value: float = 0, out: np.ndarray | None = None
) -> np.ndarray:
    """Pad (or truncate) each entry to ``length`` items: shape ``(n, length, *shape)``.

    Entries with more than ``length`` items keep their first ``length``. Vectorised over
    all items; this is a copy by nature (the model wants a dense block), written into
    ``out`` when given (a request's slot of a batch buffer, say).
    """
    counts = ragged.counts
    n = len(counts)
    shape = ragged.values.shape[1:]
    if out is None:
        out = np.empty((n, length, *shape), dtype=ragged.values.dtype)
    elif out.shape != (n, length, *shape):
        raise ValueError(f"out has shape {out.shape}, expected {(n, length, *shape)}")
    out.fill(pad_value)
    start = ragged.offsets[0]
    used = ragged.values[start : ragged.offsets[-1]] if n else ragged.values[:0]
    position = np.arange(len(used)) - np.repeat(ragged.offsets[:-1] - start, counts)
    keep = position < length
    rows = np.repeat(np.arange(n), counts)
    out[rows[keep], position[keep]] = used[keep]
    return out


def mask(
    counts: np.ndarray,
    length: int,
    *,
    shape: tuple[int, ...] = (),
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """1 where an entry has an item at that position, 0 in the padding: ``(n, length, *shape)``."""
    filled = np.arange(length) < np.asarray(counts)[:, None]
    return np.broadcast_to(
        filled.reshape(filled.shape + (1,) * len(shape)), (len(filled), length, *shape)
    ).astype(dtype)
