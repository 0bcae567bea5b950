"""Shared-memory regions of clients in the server: checks, reads and writes.

A region is a file in ``/dev/shm`` named by the client. Names are plain file names (no
path separator, no leading dot); symlinks, anything but regular files, files not of the
client's own user with mode 0600 (``_peers.py``), regions smaller than their registered
size, and offsets or lengths outside a region are refused: each an ``InvalidInput``. A
request is read with ``pread`` into the server's memory (one copy: a mapping could be cut
short by the client's ``ftruncate`` and kill the server with ``SIGBUS``); a result is
written once, as an Arrow IPC stream, into the client's output region with ``pwrite``.
The session protocol that uses them is in ``_shm.py``.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from typing import Any

import pyarrow as pa

from .._ipc import SchemaCache, WriteOnlyFile, encode, read_messages
from ..errors import InvalidInput
from ..tensors import ALIGNMENT
from ._peers import SHM_DIR, open_region

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
    """One client region: a file in ``/dev/shm`` of the client's own user, read and written
    with ``pread``/``pwrite``.

    Never mapped: a client may shrink its file (``ftruncate``) at any time, and a mapping
    of the lost pages would kill the server with ``SIGBUS``. A read or write past the new
    end is short instead, and fails that request alone. The cost is one copy each way
    (see ``docs/security.md`` for the figures).

    Parameters
    ----------
    name
        The file name in ``/dev/shm``.
    size
        Bytes the client offers; the file must be at least this large.
    uid
        The client's uid (:func:`~arrowinfer.server._peers.peer_uid`): the file must be
        its own, mode 0600 (:func:`~arrowinfer.server._peers.check_region_owner`).

    Raises
    ------
    InvalidInput
        The name is not a plain name, the file is missing, not a regular file, not the
        client's own with mode 0600, cannot be opened, or is smaller than ``size``.
    """

    def __init__(self, name: Any, size: Any, uid: int):
        region_path(name)
        size = check_integer(size, "the region size", 1)
        fd, info = open_region(name, uid, folder=SHM_DIR)
        if info.st_size < size:
            os.close(fd)
            raise InvalidInput(
                f"shared-memory region {name!r} is smaller than its registered size",
                expected=f">= {size} bytes",
                got=f"{info.st_size} bytes",
            )
        self._fd: int | None = fd
        self.name: str = name
        self.size: int = size
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    @property
    def mapping(self) -> None:
        """Always None: regions are never mapped (kept for callers that looked)."""
        return None

    def check(self, offset: Any, length: Any, what: str, *, minimum: int = 1) -> tuple[int, int]:
        """``(offset, length)``, checked to be integers that lie inside the region."""
        offset = check_integer(offset, f"the {what} offset")
        length = check_integer(length, f"the {what} length", minimum)
        if offset + length > self.size:
            raise InvalidInput(
                f"the {what} lies outside shared-memory region {self.name!r}",
                expected=f"offset + length <= {self.size}",
                got=f"offset {offset} + length {length}",
            )
        return offset, length

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:
            raise InvalidInput(f"shared-memory region {self.name!r} was unregistered")
        return fd

    def read(self, offset: Any, length: Any, what: str = "input") -> pa.Buffer:
        """A copy of ``length`` bytes at ``offset`` (checked to lie inside the region).

        Raises
        ------
        InvalidInput
            Outside the region, or the file shrank below it.
        """
        offset, length = self.check(offset, length, what)
        # in the region's phase of 64 bytes: data the client placed aligned stays aligned
        # (onnxruntime takes it without a copy: backends.base.aligned)
        whole = pa.allocate_buffer(length + ALIGNMENT)
        skip = (offset - whole.address) % ALIGNMENT
        view = memoryview(whole)[skip : skip + length]  # (pyarrow's slices are read-only)
        fd = self._descriptor()
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise InvalidInput(
                    f"shared-memory region {self.name!r} shrank below its registered size"
                )
            done += got
        return whole.slice(skip, length)

    def acquire(self) -> None:
        """A request uses the region: it stays open until :meth:`release`."""
        with self._lock:
            self._users += 1

    def release(self) -> bool:
        """A request is done with the region; True when it is now closed."""
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        return self._close_file() if last else False

    def close(self) -> bool:
        """Close once no request uses it; True when it is closed now."""
        with self._lock:
            self._closing = True
            idle = self._users == 0
        return self._close_file() if idle else False

    def _close_file(self) -> bool:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        return True

    def unmapped(self) -> bool:
        """Is the file closed (after :meth:`close`, once no request uses it)?"""
        with self._lock:
            if not self._closing or self._users:
                return False
        return self._close_file()

    def write_result(self, offset: int, size: int, batch: pa.RecordBatch) -> int:
        """Write ``batch`` as an IPC stream at ``offset``, within ``size`` bytes; its length.

        The stream goes from the result's buffers into the file with ``pwrite``: one copy,
        no staging buffer.

        Raises
        ------
        OutputTooSmall
            It does not fit (nothing is written).
        """
        encoded = encode(batch)
        if encoded.size > size:
            raise OutputTooSmall(encoded.size, size)
        return encoded.write_file(_FileAt(self._descriptor(), offset, encoded.size))


class _FileAt(WriteOnlyFile):
    """A write-only file over a descriptor from ``offset`` on, at most ``limit`` bytes.

    Writes with ``pwrite``: the descriptor's own position is shared by every request on the
    region and is never moved. A file that shrank grows again by a write past its end:
    nothing is lost but the client's own memory, and the server touches no mapped page.
    """

    def __init__(self, fd: int, offset: int, limit: int):
        self._fd, self._offset, self._limit = fd, offset, limit

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # bytes, whatever the exporter's format
        size = len(view)
        if self._written + size > self._limit:  # Arrow wrote more than it measured
            raise OutputTooSmall(self._written + size, self._limit)
        done = 0
        while done < size:
            done += os.pwrite(self._fd, view[done:], self._offset + self._written + done)
        self._written += size
        return size


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
        schema, message = read_messages(view, schemas)
        if message is None:
            raise InvalidInput("the input region holds no record batch")
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
