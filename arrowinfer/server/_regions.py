"""Shared-memory regions of clients, mapped into the server: checks, reads and writes.

A region is a file in ``/dev/shm`` named by the client. Names are plain file names (no
path separator, no leading dot); symlinks and anything but regular files are refused, and
so are regions smaller than their registered size, and offsets or lengths outside a
region: each an ``InvalidInput``. Requests are read zero-copy from the mapping; a result
is written once, as an Arrow IPC stream, into the client's output region. The session
protocol that uses them is in ``_shm.py``.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
import threading
from typing import Any

import pyarrow as pa

from .._ipc import SchemaCache, encode
from ..errors import InvalidInput

__all__ = [
    "SHM_DIR",
    "OutputTooSmall",
    "Region",
    "check_integer",
    "decoded_size",
    "read_request",
    "region_path",
    "write_result",
]

#: Where POSIX shared memory lives on Linux; regions are files here.
SHM_DIR = "/dev/shm"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")

#: Threads that copy a large result into the client's region.
_COPY_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


def check_integer(value: Any, what: str, minimum: int = 0) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``.

    Raises
    ------
    InvalidInput
        Naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{what} must be an integer >= {minimum}", got=repr(value))
    return value


def region_path(name: Any) -> str:
    """The file of a region name, refusing anything but a plain name in ``/dev/shm``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            "a shared-memory region is named by a plain file name in /dev/shm "
            "(letters, digits, '_', '.', '-'; no path separator, no leading dot)",
            got=repr(name),
        )
    return os.path.join(SHM_DIR, name)


class Region:
    """One client region, mapped read-write into the server.

    Parameters
    ----------
    name
        The file name in ``/dev/shm``.
    size
        Bytes to map; the file must be at least this large.

    Raises
    ------
    InvalidInput
        The name is not a plain name, the file is missing, not a regular file, cannot be
        opened, or is smaller than ``size``.
    """

    def __init__(self, name: Any, size: Any):
        path = region_path(name)
        size = check_integer(size, "the region size", 1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(f"no shared-memory region {name!r} in {SHM_DIR}") from None
        except OSError as err:
            raise InvalidInput(
                f"cannot open shared-memory region {name!r}: {err.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared-memory region {name!r} is not a regular file")
            if info.st_size < size:
                raise InvalidInput(
                    f"shared-memory region {name!r} is smaller than its registered size",
                    expected=f">= {size} bytes",
                    got=f"{info.st_size} bytes",
                )
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name: str = name
        self.size: int = size
        self.view: pa.Buffer | None = pa.py_buffer(self._mmap)
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    @property
    def mapping(self) -> mmap.mmap | None:
        """The server's mapping of the region (None once unmapped); for tests and debugging."""
        return self._mmap

    def slice(self, offset: Any, length: Any, what: str, *, minimum: int = 1) -> pa.Buffer:
        """``length`` bytes at ``offset``, checked to lie inside the region."""
        offset = check_integer(offset, f"the {what} offset")
        length = check_integer(length, f"the {what} length", minimum)
        if offset + length > self.size:
            raise InvalidInput(
                f"the {what} lies outside shared-memory region {self.name!r}",
                expected=f"offset + length <= {self.size}",
                got=f"offset {offset} + length {length}",
            )
        view = self.view
        if view is None:
            raise InvalidInput(f"shared-memory region {self.name!r} was unregistered")
        return view.slice(offset, length)

    def writable(self, offset: int, size: int) -> pa.Buffer:
        """A mutable view of ``size`` bytes at ``offset`` (checked by :meth:`slice` before)."""
        if self._mmap is None or self.view is None:
            raise InvalidInput(f"shared-memory region {self.name!r} was unregistered")
        # a slice of a mutable pyarrow buffer is not mutable; a memoryview's slice is
        return pa.py_buffer(memoryview(self._mmap)[offset : offset + size])

    def acquire(self) -> None:
        """A request uses the region: it stays mapped until :meth:`release`."""
        with self._lock:
            self._users += 1

    def release(self) -> bool:
        """A request is done with the region; True when it is now unmapped."""
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        return self._unmap() if last else False

    def close(self) -> bool:
        """Unmap once no request uses it; True when it is unmapped now.

        Arrays read from the region keep it mapped until they are gone (Python refuses to
        unmap memory that is still exported): :meth:`unmapped` tries again.
        """
        with self._lock:
            self._closing = True
            idle = self._users == 0
        return self._unmap() if idle else False

    def _unmap(self) -> bool:
        self.view = None
        if self._mmap is None:
            return True
        try:
            self._mmap.close()
        except BufferError:  # arrays of a request are still alive somewhere
            return False
        self._mmap = None
        return True

    def unmapped(self) -> bool:
        """Has the mapping gone (after :meth:`close`, once nothing uses it)?"""
        with self._lock:
            if not self._closing or self._users:
                return False
        return self._unmap()


_RECORD_BATCH = 3  # the MessageHeader union's tag of a RecordBatch (Arrow's Message.fbs)


def _table_field(data: bytes, table: int, index: int) -> int | None:
    """Where field ``index`` of the flatbuffer table at ``table`` lies, None if absent."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vsize = struct.unpack_from("<H", data, vtable)[0]
    if 4 + 2 * index >= vsize:
        return None
    offset = struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0]
    return table + offset if offset else None


def _follow(data: bytes, where: int) -> int:
    return where + struct.unpack_from("<I", data, where)[0]


def decoded_size(message: pa.ipc.Message) -> int:
    """The bytes a record batch message's body takes once decompressed, read before it is.

    An uncompressed body is its own size. A compressed one (``BodyCompression`` in the
    metadata) holds each buffer as its uncompressed length (int64, -1 = stored as is)
    followed by the compressed bytes: the sum of those lengths is what decompression
    would allocate, known here without allocating it.

    Raises
    ------
    InvalidInput
        The metadata or a buffer's length prefix lies outside the message.
    """
    body = message.body
    body_size = body.size if body is not None else 0
    data = message.metadata.to_pybytes()
    try:
        root = _follow(data, 0)
        kind = _table_field(data, root, 1)
        header = _table_field(data, root, 2)
        if kind is None or header is None or data[kind] != _RECORD_BATCH:
            return body_size
        batch = _follow(data, header)
        if _table_field(data, batch, 3) is None:  # no BodyCompression: stored as is
            return body_size
        where = _table_field(data, batch, 2)
        if where is None:
            return 0
        buffers = _follow(data, where)
        count = struct.unpack_from("<I", data, buffers)[0]
        prefixes = memoryview(body) if body is not None else b""
        total = 0
        for i in range(count):
            offset, length = struct.unpack_from("<qq", data, buffers + 4 + 16 * i)
            if length == 0:
                continue
            if length < 8 or offset < 0 or offset + length > body_size:
                raise ValueError("a compressed buffer outside the body")
            (size,) = struct.unpack_from("<q", prefixes, offset)
            if size < -1:
                raise ValueError("a negative uncompressed length")
            total += length - 8 if size == -1 else size
        return total
    except (struct.error, IndexError, ValueError) as err:
        raise InvalidInput(f"the input region holds a malformed Arrow IPC message: {err}") from None


def read_request(
    view: pa.Buffer, schemas: SchemaCache | None = None, *, max_bytes: int | None = None
) -> pa.RecordBatch:
    """The record batch of the Arrow IPC stream lying in ``view``, without a copy.

    ``schemas`` caches parsed schemas (each session has one). ``max_bytes`` bounds the
    batch's body once decompressed, checked before anything is decompressed
    (:func:`decoded_size`). The batch's buffers are not validated here: the core does it
    (``schema.check_data``) before anything reads them.

    Raises
    ------
    InvalidInput
        Not an IPC stream with a record batch, or a body larger than ``max_bytes``.
    """
    try:
        source = pa.BufferReader(view)
        try:
            message = pa.ipc.read_message(source)
        except EOFError:  # the end-of-stream marker first, or nothing at all
            message = None
        if message is None or message.type != "schema":
            raise pa.ArrowInvalid("no schema message at the start of the IPC stream")
        schema = schemas.get(message) if schemas is not None else pa.ipc.read_schema(message)
        try:
            message = pa.ipc.read_message(source)
        except EOFError:
            raise InvalidInput("the input region holds no record batch") from None
        if max_bytes is not None:
            size = decoded_size(message)
            if size > max_bytes:
                raise InvalidInput(
                    "the request is too large (max_request_bytes)",
                    expected=f"<= {max_bytes} bytes of data",
                    got=f"{size} bytes",
                )
        return pa.ipc.read_record_batch(message, schema)
    except (pa.ArrowInvalid, pa.ArrowIOError, pa.ArrowNotImplementedError) as err:
        raise InvalidInput(f"the input region holds no valid Arrow IPC stream: {err}") from None


class OutputTooSmall(InvalidInput):
    """The result does not fit the output slice the client offered."""

    def __init__(self, needed: int, size: int):
        self.needed = needed
        super().__init__(
            "the result does not fit the output region",
            expected=f"{needed} bytes",
            got=f"{size} bytes",
        )


def write_result(view: pa.Buffer, batch: pa.RecordBatch) -> int:
    """Write ``batch`` as an IPC stream at the start of the mutable ``view``; its length.

    Raises
    ------
    OutputTooSmall
        It does not fit (nothing is written).
    """
    encoded = encode(batch)
    if encoded.size > view.size:
        raise OutputTooSmall(encoded.size, view.size)
    return encoded.write(view, threads=_COPY_THREADS)
