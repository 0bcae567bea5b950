"""Model signatures as Arrow schemas, and the request validator's messages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowinfer import tensors
from arrowinfer.errors import InvalidInput
from arrowinfer.schema import (
    DATATYPES,
    TensorSpec,
    datatype,
    signature,
    tensor_specs,
    to_column,
    validate,
)

FP32 = datatype("FP32")

# jet_tagger-like: a fixed tensor, a ragged collection padded by the server, one value per jet
SPECS = [
    TensorSpec("image", FP32, (1, 4, 4)),
    TensorSpec("points", FP32, (100, 2), ragged=True),
    TensorSpec("pt", FP32, (1,)),
]
SCHEMA = signature(SPECS)


def good_batch(n: int = 3) -> dict[str, pa.Array]:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return {
        "image": tensors.from_numpy(rng.random((n, 1, 4, 4), dtype=np.float32)),
        "points": tensors.ragged_from_numpy(
            offsets, rng.random((offsets[-1], 2), dtype=np.float32)
        ),
        "pt": tensors.from_numpy(rng.random(n, dtype=np.float32)),
    }


def batch(columns: dict[str, pa.Array]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


def test_canonical_types() -> None:
    assert SCHEMA.field("image").type == pa.fixed_shape_tensor(pa.float32(), [1, 4, 4])
    assert SCHEMA.field("points").type == pa.list_(pa.list_(pa.float32(), 2))
    assert SCHEMA.field("pt").type == pa.float32()
    assert SCHEMA.field("points").metadata[b"ragged"] == b"pad"
    assert SCHEMA.field("points").metadata[b"shape"] == b"[100, 2]"
    assert not any(f.nullable for f in SCHEMA)


@settings(deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DATATYPES),
            st.lists(st.integers(1, 5), max_size=3).map(tuple),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_signature_round_trips_to_specs(specs: list) -> None:
    specs = [
        TensorSpec(f"in{i}", dt, (shape or (1,)) if ragged else shape, ragged=ragged)
        for i, (dt, shape, ragged) in enumerate(specs)
    ]
    schema = signature(specs)
    assert tensor_specs(schema) == specs
    # the schema survives Arrow IPC, as it does on the wire
    assert pa.ipc.read_schema(schema.serialize()) == schema


def test_variable_dims() -> None:
    schema = signature([TensorSpec("x", FP32, (-1, 3))])
    assert schema.field("x").type == pa.list_(pa.list_(pa.float32(), 3))
    # a variable dim elsewhere is Arrow's canonical variable-shape tensor
    for shape in [(3, -1), (-1, -1), (-1,) * 3]:
        field = signature([TensorSpec("x", FP32, shape)]).field("x")
        assert field.type.extension_name == "arrow.variable_shape_tensor"
        assert tensors.layout(field.type).shape == shape
    # a ragged input pads to fixed dims: a -1 there has no size to pad to
    with pytest.raises(TypeError, match="fixed dims to pad to"):
        signature([TensorSpec("x", FP32, (3, -1), ragged=True)])


def _one(column: pa.Array, name: str = "x") -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([column], [name])


@pytest.mark.parametrize("shape", [(2, -1), (-1, 25), (-1,), (-1, -1)])
def test_dense_variable_dims_in_every_form(shape: tuple[int, ...]) -> None:
    schema = signature([TensorSpec("x", FP32, shape)])
    concrete = tuple(7 if d < 0 else d for d in shape)
    data = np.random.default_rng(1).random((3, *concrete), dtype=np.float32)
    forms = [
        tensors.from_numpy(data),
        tensors.from_numpy(data, tensor_type="fixed_size_list"),
        tensors.variable_from_numpy(data),
        to_column(schema.field("x"), data),  # the canonical form
    ]
    if len(shape) == 1:
        forms[0] = tensors.from_numpy(data)  # (n, 7): a fixed_shape_tensor of [7]
    for column in forms:
        assert validate(_one(column), schema, model="m") == (("x", concrete),)
        assert np.array_equal(
            tensors.to_numpy(column)
            if not tensors.layout(column.type).ragged
            else tensors.ragged_to_numpy(column).values.reshape(data.shape),
            data,
        )
    # IPC turns the type into Arrow C++'s own class: still recognised
    ipc = pa.ipc.read_record_batch(_one(forms[3]).serialize(), _one(forms[3]).schema)
    assert validate(ipc, schema, model="m") == (("x", concrete),)
    # a size that differs from a fixed dim, or rows of different shapes: refused
    bad = tuple(d + 1 if d > 0 else 7 for d in shape)
    if bad != concrete:
        with pytest.raises(InvalidInput, match="wrong shape"):
            validate(_one(tensors.from_numpy(np.zeros((2, *bad), np.float32))), schema, model="m")
    anything = (-1,) * len(shape)
    other = np.zeros((1, *(c + 1 for c in concrete)), np.float32)
    mixed = pa.concat_arrays(
        [
            tensors.variable_from_numpy(data, anything),
            tensors.variable_from_numpy(other, anything),
        ]
    )
    with pytest.raises(InvalidInput, match=r"one shape per request|different"):
        validate(_one(mixed), schema, model="m")


def test_datatype_lookup() -> None:
    for key in ("TYPE_FP32", "FP32", np.dtype("float32"), pa.float32(), np.float32):
        assert datatype(key).kserve == "FP32"
    # strings are one type under every name
    for key in ("TYPE_STRING", "BYTES", pa.string(), pa.large_binary(), np.dtype("U5")):
        assert datatype(key).triton == "TYPE_STRING"
    with pytest.raises(TypeError, match=r"unsupported.*BF16"):
        datatype("BF16")


def test_good_requests_in_every_accepted_form() -> None:
    validate(batch(good_batch()), SCHEMA, model="m")
    columns = good_batch()
    image = tensors.to_numpy(columns["image"])
    ragged = tensors.ragged_to_numpy(columns["points"])
    # nested fixed_size_list instead of the tensor type; large_list; [1] given as [1]-tensor
    columns["image"] = tensors.from_numpy(image, tensor_type="fixed_size_list")
    columns["points"] = tensors.ragged_from_numpy(ragged.offsets.astype(np.int64), ragged.values)
    columns["pt"] = tensors.from_numpy(tensors.to_numpy(columns["pt"]).reshape(-1, 1))
    validate(batch(columns), SCHEMA, model="m")
    # columns in another order are fine
    validate(batch(dict(reversed(columns.items()))), SCHEMA, model="m")


def test_awkward_arrays_are_accepted() -> None:
    ak = pytest.importorskip("awkward")
    columns = good_batch(2)
    points = ak.to_regular(ak.Array([[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]]), axis=2)
    columns["points"] = ak.to_arrow(ak.values_astype(points, np.float32))
    assert isinstance(columns["points"].type, pa.BaseExtensionType)
    validate(batch(columns), SCHEMA, model="m")


def _with(**changes: pa.Array | None) -> pa.RecordBatch:
    columns = good_batch()
    for name, value in changes.items():
        if value is None:
            del columns[name]
        else:
            columns[name] = value
    return batch(columns)


BAD = {
    "missing": (_with(pt=None), r"model 'm': missing input column\(s\) \['pt'\]"),
    "extra": (_with(eta=pa.array([1.0, 2.0, 3.0])), r"unexpected column\(s\) \['eta'\]"),
    "dtype": (
        _with(pt=pa.array([1.0, 2.0, 3.0], pa.float64())),
        r"model 'm', input 'pt': wrong element type \(expected float \(FP32\), got double\)",
    ),
    "shape": (
        _with(image=tensors.from_numpy(np.zeros((3, 4, 4), np.float32))),
        r"input 'image': wrong shape per entry \(expected float\[1, 4, 4\], got float\[4, 4\]\)",
    ),
    "ragged item shape": (
        _with(points=pa.array([[[1.0]], [], []], pa.list_(pa.list_(pa.float32(), 1)))),
        r"input 'points': wrong shape per entry \(expected float\[var, 2\], got float\[var, 1\]\)",
    ),
    "fixed for ragged": (
        _with(points=tensors.from_numpy(np.zeros((3, 100, 2), np.float32))),
        r"input 'points': expected a list per entry \(ragged\)",
    ),
    "event nulls": (
        _with(pt=pa.array([1.0, None, 3.0], pa.float32())),
        r"input 'pt': 1 null value",
    ),
    "value nulls": (
        _with(points=pa.array([[[1.0, None]], [], []], pa.list_(pa.list_(pa.float32(), 2)))),
        r"input 'points': 1 null value",
    ),
    "not a tensor": (
        _with(pt=pa.array([{"x": 1.0}, {"x": 2.0}, {"x": 3.0}])),
        r"input 'pt': not a tensor column",
    ),
    "strings for numbers": (
        _with(pt=pa.array(["a", "b", "c"])),
        r"input 'pt': wrong element type.*string",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_say_what_is_wrong(case: str) -> None:
    request, message = BAD[case]
    with pytest.raises(InvalidInput, match=message) as info:
        validate(request, SCHEMA, model="m")
    assert info.value.model == "m"
    assert isinstance(info.value, ValueError)


def test_row_limits() -> None:
    empty = batch({k: v.slice(0, 0) for k, v in good_batch().items()})
    validate(empty, SCHEMA, model="m", max_rows=1)  # an event without jets is valid
    columns = good_batch()
    columns["image"] = tensors.from_numpy(np.zeros((3, 1, 4, 4), np.float64))
    with pytest.raises(InvalidInput, match="wrong element type"):  # and is still checked
        validate(batch({k: v.slice(0, 0) for k, v in columns.items()}), SCHEMA, model="m")
    with pytest.raises(InvalidInput, match=r"too many rows.*<= 2 rows, got 3 rows"):
        validate(batch(good_batch(3)), SCHEMA, model="m", max_rows=2)
    validate(batch(good_batch(2)), SCHEMA, model="m", max_rows=2)


def test_nulls_are_counted_in_what_the_entries_refer_to_only() -> None:
    """A list column's child may hold values no entry refers to (a slice keeps the whole
    child): a null there is not the request's; one in a referred value is."""
    column = pa.array(
        [[[1.0, None]], [[1.0, 2.0]], [[3.0, 4.0]], []], pa.list_(pa.list_(pa.float32(), 2))
    )
    schema = pa.schema([SCHEMA.field("points")])
    for part, nulls in ((column, 1), (column.slice(0, 1), 1), (column.slice(1), 0)):
        batch = pa.RecordBatch.from_arrays([part], schema=schema)
        if nulls:
            with pytest.raises(InvalidInput, match=f"{nulls} null value"):
                validate(batch, schema, model="m")
        else:
            validate(batch, schema, model="m")
