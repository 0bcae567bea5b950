"""Arrow IPC streams in preallocated memory: how shared-memory requests and results travel.

A stream here is what ``pa.ipc.new_stream`` writes (schema message, one record-batch
message, end-of-stream marker), byte for byte, so any Arrow reader opens it. Two things
make small batches cheap, which the shared-memory transport needs for one-row requests:

- :func:`encode` serializes a small batch with ``Schema.serialize`` and
  ``RecordBatch.serialize`` (a tiny extra copy), which is several times faster than
  opening a stream writer; a large one is measured (``get_record_batch_size``) and then
  streamed straight into the destination (one copy).
- :func:`read_stream` parses each distinct schema message once (:class:`SchemaCache`) and
  reads the batch message without a copy: the columns are views of the given memory.

Used by both ``client/`` and ``server/``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

__all__ = [
    "SMALL_BATCH",
    "Encoded",
    "SchemaCache",
    "WriteOnlyFile",
    "encode",
    "read_messages",
    "read_stream",
]

#: Batches up to this many bytes are serialized first, then copied (faster when small).
SMALL_BATCH = 256 * 1024

_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # end-of-stream: continuation, length 0
_PARALLEL_COPY = 1 << 20


class WriteOnlyFile:
    """What ``pyarrow.PythonFile`` needs of a file it writes to, around a ``write`` of the
    subclass's own that counts what it took in ``_written``."""

    closed = False
    _written = 0

    def write(self, data: Any) -> int:
        raise NotImplementedError

    def tell(self) -> int:
        return self._written

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _BodyFinder(WriteOnlyFile):
    """Keeps no data, only the 8 bytes written at ``at``: the start of the stream's second
    message (the record batch), which say how long its metadata is.

    The writer hands it the body's buffers as they are (no copy); they are only counted.
    """

    def __init__(self, at: int):
        self._at, self.prefix = at, bytearray(8)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        lo, hi = max(self._at, self._written), min(self._at + 8, self._written + len(view))
        if lo < hi:
            self.prefix[lo - self._at : hi - self._at] = view[
                lo - self._written : hi - self._written
            ]
        self._written += len(view)
        return len(view)


def _body_start(prefix: bytes | bytearray) -> int:
    """Where an IPC message's body starts in it, from its first 8 bytes: the continuation
    marker, the metadata's length (little-endian, padding included); then the metadata."""
    return 8 + int.from_bytes(prefix[4:8], "little")


class Encoded:
    """A batch ready to be written as an IPC stream: :attr:`size` bytes, then :meth:`write`."""

    __slots__ = ("_batch", "_body_offset", "_parts", "_schema_size", "size")

    def __init__(self, batch: pa.RecordBatch):
        self._batch = batch
        self._parts: tuple[Any, ...] | None = None
        self._body_offset: int | None = None
        schema = batch.schema.serialize()
        self._schema_size = schema.size
        if batch.nbytes <= SMALL_BATCH:
            self._parts = (schema, batch.serialize(), _END)
            self.size: int = sum(len(p) if isinstance(p, bytes) else p.size for p in self._parts)
        else:  # what new_stream writes: schema message, batch message, end marker
            self.size = schema.size + int(pa.ipc.get_record_batch_size(batch)) + len(_END)

    @property
    def body_offset(self) -> int:
        """Where the record batch's body starts in the stream: a writer that places the
        stream so that the body lands at a multiple of 64 bytes lets the reader hand its
        buffers to onnxruntime without an alignment copy. (A large batch is streamed
        through a writer that keeps none of its data to learn it: a few microseconds.)"""
        if self._body_offset is None:
            if self._parts is not None:
                prefix = self._parts[1].slice(0, 8).to_pybytes()
            else:
                finder = _BodyFinder(self._schema_size)
                self.write_file(finder)
                prefix = finder.prefix
            self._body_offset = self._schema_size + _body_start(prefix)
        return self._body_offset

    def write(self, view: pa.Buffer, *, start: int = 0, threads: int = 1) -> int:
        """Write the stream at byte ``start`` of the mutable ``view``; its length in bytes.

        ``threads`` > 1 copies a large batch's buffers with that many threads.
        """
        if start + self.size > view.size:
            raise ValueError(f"{self.size} bytes do not fit in {view.size - start}")
        # (pyarrow's slices of a buffer are never mutable, and its writers do not seek)
        sink = pa.FixedSizeBufferWriter(view)
        sink.write(bytes(start))
        if self._parts is not None:
            for part in self._parts:
                sink.write(part)
        else:
            if threads > 1 and self.size > _PARALLEL_COPY:
                sink.set_memcopy_threads(threads)
            with pa.ipc.new_stream(sink, self._batch.schema) as writer:
                writer.write_batch(self._batch)
        return int(sink.tell()) - start

    def write_file(self, file: Any) -> int:
        """Write the stream to a Python file object (``write``, ``tell``); its length.

        The batch's buffers reach ``file.write`` as they are (pyarrow buffers, no copy):
        a file that writes them with ``pwrite`` copies each byte once, into the file.
        """
        sink = pa.PythonFile(file, mode="w")
        if self._parts is not None:
            for part in self._parts:
                sink.write(part)
        else:
            with pa.ipc.new_stream(sink, self._batch.schema) as writer:
                writer.write_batch(self._batch)
        return int(file.tell())


def encode(batch: pa.RecordBatch) -> Encoded:
    """Prepare ``batch`` to be written as an IPC stream (its exact size is known at once)."""
    return Encoded(batch)


class SchemaCache:
    """Schemas by the bytes of their IPC message metadata, so that each is parsed once."""

    def __init__(self, capacity: int = 64):
        self._capacity = capacity
        self._schemas: dict[bytes, pa.Schema] = {}

    def get(self, message: pa.ipc.Message) -> pa.Schema:
        """The schema of a schema ``message`` (as ``pa.ipc.read_message`` returns it)."""
        key = message.metadata.to_pybytes()
        schema = self._schemas.get(key)
        if schema is None:
            schema = pa.ipc.read_schema(message)
            if len(self._schemas) >= self._capacity:
                self._schemas.clear()
            self._schemas[key] = schema
        return schema


def read_messages(
    view: pa.Buffer, schemas: SchemaCache | None = None
) -> tuple[pa.Schema, pa.ipc.Message | None]:
    """The schema and the record-batch message of the IPC stream in ``view`` (None when the
    stream ends after its schema), read with ``pa.ipc.read_message``: framing, lengths and
    bounds are checked by Arrow, and the body stays a view of ``view``. With ``schemas``,
    each distinct schema message is parsed once.

    Raises
    ------
    pyarrow.ArrowInvalid, OSError
        ``view`` does not start with a schema message.
    """
    source = pa.BufferReader(view)
    try:
        message = pa.ipc.read_message(source)
    except EOFError:  # the end-of-stream marker first, or nothing at all
        message = None
    if message is None or message.type != "schema":
        raise pa.ArrowInvalid("no schema message at the start of the IPC stream")
    schema = schemas.get(message) if schemas is not None else pa.ipc.read_schema(message)
    try:
        return schema, pa.ipc.read_message(source)
    except EOFError:
        return schema, None


def read_stream(view: pa.Buffer, schemas: SchemaCache | None = None) -> pa.RecordBatch:
    """The first record batch of the IPC stream in ``view``, without a copy.

    With ``schemas``, the stream's two messages are read by :func:`read_messages` and the
    schema message is parsed only the first time it is seen.

    Raises
    ------
    pyarrow.ArrowInvalid, OSError
        ``view`` does not start with a schema message followed by a record batch.
    StopIteration
        The stream ends after its schema, as ``RecordBatchStreamReader.read_next_batch``
        says it.
    """
    if schemas is None:
        return pa.ipc.open_stream(view).read_next_batch()
    schema, message = read_messages(view, schemas)
    if message is None:
        raise StopIteration
    return pa.ipc.read_record_batch(message, schema)
