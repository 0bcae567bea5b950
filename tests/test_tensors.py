"""numpy <-> Arrow conversions: round trips, zero-copy (proven), and the documented copies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arrowinfer import tensors
from arrowinfer.tensors import Ragged

DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]


def arrays(
    dtype: type, *, min_events: int = 0, max_events: int = 6, max_dims: int = 4
) -> st.SearchStrategy[np.ndarray]:
    """(n, *shape) arrays, n from 0, per-entry shapes from scalar to max_dims-d."""
    shapes = st.tuples(
        st.integers(min_events, max_events),
        st.lists(st.integers(1, 4), min_size=0, max_size=max_dims).map(tuple),
    ).map(lambda s: (s[0], *s[1]))
    return hnp.arrays(np.dtype(dtype), shapes)


@st.composite
def raggeds(draw: st.DrawFn, dtype: type = np.float32, *, events: int | None = None) -> Ragged:
    """Ragged collections with empty entries, zero entries and inner shapes up to 2-d."""
    sizes = {"min_size": events, "max_size": events} if events is not None else {"max_size": 8}
    counts = draw(st.lists(st.integers(0, 5), **sizes))
    inner = draw(st.lists(st.integers(1, 3), max_size=2).map(tuple))
    offset_type = draw(st.sampled_from([np.int32, np.int64]))
    offsets = np.zeros(len(counts) + 1, dtype=offset_type)
    np.cumsum(counts, out=offsets[1:])
    values = draw(hnp.arrays(np.dtype(dtype), (int(offsets[-1]), *inner)))
    return Ragged(offsets, values)


def _shares(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == 0 or np.shares_memory(a, b)


# -- fixed shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("tensor_type", ["fixed_shape_tensor", "fixed_size_list"])
@given(data=st.data())
def test_round_trip_every_dtype_and_shape(
    dtype: type, tensor_type: str, data: st.DataObject
) -> None:
    array = data.draw(arrays(dtype))
    column = tensors.from_numpy(array, tensor_type=tensor_type)
    assert len(column) == array.shape[0]
    assert tensors.layout(column.type).shape == array.shape[1:]
    back = tensors.to_numpy(column)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    if dtype is not np.bool_:
        # no copy either way: the Arrow column and the numpy view are the caller's memory
        assert _shares(back, array)


@given(data=st.data())
def test_sliced_columns_stay_zero_copy(data: st.DataObject) -> None:
    array = data.draw(arrays(np.float32, min_events=1))
    start = data.draw(st.integers(0, array.shape[0]))
    stop = data.draw(st.integers(start, array.shape[0]))
    for tensor_type in ("fixed_shape_tensor", "fixed_size_list"):
        column = tensors.from_numpy(array, tensor_type=tensor_type).slice(start, stop - start)
        back = tensors.to_numpy(column)
        np.testing.assert_array_equal(back, array[start:stop])
        assert _shares(back, array[start:stop])


def test_one_value_per_event_is_a_primitive_column() -> None:
    energy = np.linspace(0, 1, 10, dtype=np.float32)
    column = tensors.from_numpy(energy)
    assert column.type == pa.float32()
    assert np.shares_memory(tensors.to_numpy(column), energy)


def test_fixed_shape_tensor_is_arrows_canonical_type() -> None:
    images = np.zeros((3, 1, 37, 37), dtype=np.float32)
    column = tensors.from_numpy(images)
    assert column.type.extension_name == "arrow.fixed_shape_tensor"
    assert column.type.shape == [1, 37, 37]
    # pyarrow's own reader sees the same memory
    assert np.shares_memory(column.to_numpy_ndarray(), images)


def test_zero_copy_allocates_nothing_in_arrow() -> None:
    array = np.ones((1000, 64), dtype=np.float32)
    before = pa.total_allocated_bytes()
    column = tensors.from_numpy(array)
    back = tensors.to_numpy(column.slice(10, 500))
    assert pa.total_allocated_bytes() == before
    assert np.shares_memory(back, array)


def test_documented_copies_are_the_only_ones() -> None:
    """Booleans and non-contiguous input are copied once, as the docstring says."""
    flags = np.ones((1000, 8), dtype=np.bool_)
    before = pa.total_allocated_bytes()
    column = tensors.from_numpy(flags)
    assert pa.total_allocated_bytes() - before >= 1000 * 8 // 8  # the bit-packed copy
    assert not np.shares_memory(tensors.to_numpy(column), flags)

    strided = np.ones((100, 8), dtype=np.float32)[:, ::2]
    column = tensors.from_numpy(strided)
    back = tensors.to_numpy(column)
    np.testing.assert_array_equal(back, strided)
    assert not np.shares_memory(back, strided)


def test_chunked_arrays() -> None:
    array = np.arange(20, dtype=np.float64).reshape(10, 2)
    one = pa.chunked_array([tensors.from_numpy(array)])
    assert np.shares_memory(tensors.to_numpy(one), array)
    two = pa.chunked_array([tensors.from_numpy(array[:4]), tensors.from_numpy(array[4:])])
    np.testing.assert_array_equal(tensors.to_numpy(two), array)  # combined: a copy


@given(data=st.data())
def test_fixed_shape_tensor_over_a_sliced_child(data: st.DataObject) -> None:
    """A fixed_shape_tensor whose storage lies at an offset in its child, sliced again,
    with a null before or after the rows it covers: the same view as the general path
    (the fast path of to_numpy must never read outside its rows, nor refuse them)."""
    rows = data.draw(st.integers(1, 5))
    size = data.draw(st.integers(1, 4))
    lead = data.draw(st.integers(0, 3))
    values = np.arange(lead + rows * size + 2, dtype=np.float32)
    nulls = np.zeros(len(values), dtype=bool)
    if data.draw(st.booleans()):
        nulls[data.draw(st.sampled_from([0, len(values) - 1]))] = True
    child = pa.array(values, mask=nulls).slice(lead, rows * size)
    tensor = pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.float32(), [size]), pa.FixedSizeListArray.from_arrays(child, size)
    )
    start = data.draw(st.integers(0, rows - 1))
    column = tensor.slice(start, rows - start)
    expected = values[lead:].reshape(-1)[: rows * size].reshape(rows, size)[start:]
    covered = nulls[lead + start * size : lead + rows * size]
    if covered.any():
        with pytest.raises(ValueError, match="nulls"):
            tensors.to_numpy(column)
    else:
        np.testing.assert_array_equal(tensors.to_numpy(column), expected)


def test_nulls_are_refused() -> None:
    with pytest.raises(ValueError, match="1 nulls"):
        tensors.to_numpy(pa.array([1.0, None, 3.0]))
    storage = pa.array([[1.0, None], [3.0, 4.0]], type=pa.list_(pa.float32(), 2))
    with pytest.raises(ValueError, match="nulls"):
        tensors.to_numpy(storage)


def test_not_a_tensor_layout() -> None:
    with pytest.raises(TypeError, match="not a tensor layout"):
        tensors.layout(pa.struct([("x", pa.float32())]))
    with pytest.raises(TypeError, match="lists of lists"):
        tensors.layout(pa.list_(pa.list_(pa.float32())))
    with pytest.raises(TypeError, match="ragged"):
        tensors.to_numpy(pa.array([[1.0]], type=pa.list_(pa.float32())))
    with pytest.raises(TypeError, match="numeric or string"):
        tensors.from_numpy(np.array([1 + 2j]))
    with pytest.raises(TypeError, match="only str or only bytes"):
        tensors.from_numpy(np.array(["a", b"b"], dtype=object))


def test_strings_are_tensors_of_text() -> None:
    words = np.array([["a", "ζ"], ["", "bc"]], dtype=object)
    column = tensors.from_numpy(words)  # fixed_shape_tensor takes fixed-width values only
    assert column.type == pa.list_(pa.string(), 2)
    assert tensors.layout(column.type) == tensors.Layout(pa.string(), (2,), ragged=False)
    assert tensors.to_numpy(column).tolist() == words.tolist()
    assert tensors.from_numpy(np.array(["x", "yz"])).type == pa.string()
    assert tensors.from_numpy(np.array([b"x"], dtype=object)).type == pa.binary()


# -- ragged collections ----------------------------------------------------------------------


@given(ragged=raggeds())
def test_ragged_round_trip(ragged: Ragged) -> None:
    column = tensors.ragged_from_numpy(ragged.offsets, ragged.values)
    large = ragged.offsets.dtype == np.int64
    assert (pa.types.is_large_list if large else pa.types.is_list)(column.type)
    back = tensors.ragged_to_numpy(column)
    np.testing.assert_array_equal(back.offsets, ragged.offsets)
    np.testing.assert_array_equal(back.values, ragged.values)
    assert _shares(back.values, ragged.values)


@given(ragged=raggeds(), data=st.data())
def test_sliced_ragged_shares_values(ragged: Ragged, data: st.DataObject) -> None:
    n = len(ragged)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    column = tensors.ragged_from_numpy(ragged.offsets, ragged.values).slice(start, stop - start)
    back = tensors.ragged_to_numpy(column)
    assert back.offsets[0] == 0
    np.testing.assert_array_equal(back.counts, ragged.counts[start:stop])
    lo, hi = ragged.offsets[start], ragged.offsets[stop]
    np.testing.assert_array_equal(back.values, ragged.values[lo:hi])
    assert _shares(back.values, ragged.values[lo:hi])
    np.testing.assert_array_equal(tensors.ragged_counts(column), ragged.counts[start:stop])


def test_ragged_from_awkward() -> None:
    ak = pytest.importorskip("awkward")
    jets = ak.to_regular(ak.Array([[[1.0, 2.0]], [], [[3.0, 4.0], [5.0, 6.0]]]), axis=2)
    column = ak.to_arrow(jets)
    assert isinstance(column.type, pa.BaseExtensionType)  # awkward's own extension types
    back = tensors.ragged_to_numpy(column[1:])
    np.testing.assert_array_equal(back.offsets, [0, 0, 2])
    np.testing.assert_array_equal(back.values, [[3, 4], [5, 6]])
    flat = ak.to_arrow(ak.Array([[1.0, 2.0], [3.0]]), list_to32=True)
    assert tensors.layout(flat.type).shape == (-1,)
    regular = ak.to_arrow(ak.Array(np.arange(6.0).reshape(3, 2)))
    np.testing.assert_array_equal(tensors.to_numpy(regular), np.arange(6.0).reshape(3, 2))


# -- record batches --------------------------------------------------------------------------


@given(
    hits=arrays(np.float32, min_events=3, max_events=3, max_dims=2),
    ragged=raggeds(events=3),
)
def test_batch_round_trip(hits: np.ndarray, ragged: Ragged) -> None:
    energy = np.arange(3, dtype=np.float64)
    batch = tensors.batch_from_numpy({"hits": hits, "jets": ragged, "energy": energy})
    assert batch.schema.names == ["hits", "jets", "energy"]
    back = tensors.batch_to_numpy(batch)
    np.testing.assert_array_equal(back["hits"], hits)
    np.testing.assert_array_equal(back["energy"], energy)
    assert isinstance(back["jets"], Ragged)
    np.testing.assert_array_equal(back["jets"].values, ragged.values)
    assert _shares(back["hits"], hits)
    assert np.shares_memory(back["energy"], energy)


# -- padding to a model's fixed size -----------------------------------------------------------


@given(ragged=raggeds(), length=st.integers(1, 6), pad_value=st.sampled_from([0.0, -1.0]))
def test_pad_and_mask_match_a_per_event_reference(
    ragged: Ragged, length: int, pad_value: float
) -> None:
    padded = tensors.pad(ragged, length, pad_value=pad_value)
    inner = ragged.values.shape[1:]
    assert padded.shape == (len(ragged), length, *inner)
    m = tensors.mask(ragged.counts, length, shape=(1,))
    assert m.shape == (len(ragged), length, 1)
    for i in range(len(ragged)):  # the slow, obvious reference
        items = ragged.values[ragged.offsets[i] : ragged.offsets[i + 1]][:length]
        np.testing.assert_array_equal(padded[i, : len(items)], items)
        assert np.all(padded[i, len(items) :] == pad_value)
        np.testing.assert_array_equal(m[i, :, 0], np.arange(length) < len(items))
