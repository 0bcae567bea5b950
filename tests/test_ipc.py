"""arrowinfer._ipc: IPC streams written into and read from preallocated memory.

The shared-memory transport reads whatever bytes a peer left in a region, so every
malformed stream here must end in an Arrow error (or StopIteration), never a wrong batch.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrowinfer import tensors
from arrowinfer._ipc import SMALL_BATCH, SchemaCache, encode, read_stream


def stream_of(*batches: pa.RecordBatch, schema: pa.Schema | None = None) -> pa.Buffer:
    """What ``pa.ipc.new_stream`` writes for these batches."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema or batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def batch_of(rows: int, seed: int = 0) -> pa.RecordBatch:
    values = np.random.default_rng(seed).standard_normal((rows, 16), dtype=np.float32)
    return pa.record_batch({"x": tensors.from_numpy(values), "n": pa.array(np.arange(rows))})


@pytest.mark.parametrize("rows", [1, 100, SMALL_BATCH // 64 + 1])  # serialized and streamed
def test_encoded_stream_is_new_streams_bytes_and_reads_back_in_place(rows: int) -> None:
    batch = batch_of(rows)
    encoded = encode(batch)
    memory = pa.allocate_buffer(encoded.size + 100, resizable=False)
    length = encoded.write(pa.py_buffer(memoryview(memory).cast("B")))
    assert length == encoded.size
    view = memory.slice(0, length)
    assert view.to_pybytes() == stream_of(batch).to_pybytes()
    schemas = SchemaCache()
    for cache in (None, schemas, schemas):
        got = read_stream(view, cache)
        assert got.equals(batch)
        values = tensors.to_numpy(got.column("x"))
        assert np.shares_memory(values, np.frombuffer(memory, np.uint8))  # no copy


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 2 * SMALL_BATCH // 64), start=st.integers(0, 63))
def test_every_way_of_writing_gives_new_streams_bytes_and_the_body_offset(
    rows: int, start: int
) -> None:
    """``write`` at any start and ``write_file`` give the bytes ``new_stream`` writes, and
    ``body_offset`` is where the first buffer of the batch's body (``x``'s values) begins,
    serialized (small) or streamed (large) alike."""
    batch = batch_of(rows, seed=rows)
    expected = stream_of(batch).to_pybytes()
    encoded = encode(batch)
    memory = pa.allocate_buffer(start + encoded.size, resizable=False)
    length = encoded.write(pa.py_buffer(memoryview(memory).cast("B")), start=start)
    assert memory.slice(start, length).to_pybytes() == expected
    file = io.BytesIO()
    assert encoded.write_file(file) == len(expected)
    assert file.getvalue() == expected
    values = tensors.to_numpy(batch.column("x")).tobytes()
    assert expected[encoded.body_offset : encoded.body_offset + len(values)] == values


def test_a_schema_is_parsed_once_per_distinct_message() -> None:
    schemas = SchemaCache()
    for rows, seed in ((3, 0), (5, 1)):
        assert read_stream(stream_of(batch_of(rows, seed)), schemas).equals(batch_of(rows, seed))
    assert len(schemas._schemas) == 1  # the second stream's schema came from the cache
    other = pa.record_batch({"y": pa.array([1.0])})
    assert read_stream(stream_of(other), schemas).equals(other)
    assert len(schemas._schemas) == 2


def test_a_cache_that_fills_up_starts_over() -> None:
    schemas = SchemaCache(capacity=2)
    for i in range(5):
        batch = pa.record_batch({f"c{i}": pa.array([i])})
        assert read_stream(stream_of(batch), schemas).equals(batch)
    assert len(schemas._schemas) <= 2


@pytest.mark.parametrize("cache", [False, True])
def test_a_stream_without_a_batch_stops(cache: bool) -> None:
    empty = stream_of(schema=batch_of(1).schema)
    with pytest.raises(StopIteration):
        read_stream(empty, SchemaCache() if cache else None)


def bad_streams() -> dict[str, pa.Buffer]:
    whole = stream_of(batch_of(4))
    schema_only = stream_of(schema=batch_of(1).schema)
    schema_message = schema_only.slice(0, schema_only.size - 8)
    return {
        "empty": pa.py_buffer(b""),
        "three bytes": whole.slice(0, 3),
        "end marker only": pa.py_buffer(b"\xff\xff\xff\xff\x00\x00\x00\x00"),
        "starts mid-stream": whole.slice(8, 64),
        "length past the end": pa.py_buffer(b"\xff\xff\xff\xff\xf0\x00\x00\x00" + bytes(16)),
        "batch body cut short": whole.slice(0, whole.size - 24),
        "two schemas": pa.py_buffer(schema_message.to_pybytes() * 2),
        "zeros": pa.py_buffer(bytes(256)),
    }


@pytest.mark.parametrize("name", sorted(bad_streams()))
@pytest.mark.parametrize("cache", [False, True])
def test_malformed_streams_are_arrow_errors(name: str, cache: bool) -> None:
    with pytest.raises((pa.ArrowInvalid, OSError, StopIteration)):
        read_stream(bad_streams()[name], SchemaCache() if cache else None)
