"""Shared memory to a server on the same host: large requests and results skip the socket.

:class:`ShmTransport` speaks the shared-memory protocol of ``arrowinfer.server``: a Flight
``do_exchange`` on ``["arrowinfer.shm"]`` (the *session*) carries small JSON messages, and
the data lies in POSIX shared-memory regions the client creates. A request is written once
as an Arrow IPC stream into an input region (the one copy from the caller's arrays); the
server reads it in place, runs the model, and writes the result's IPC stream into an output
region, where the client reads it without a copy: **result columns are views of shared
memory**. Models, schemas and actions go over plain Flight.

Regions
    Files ``/dev/shm/arrowinfer-<pid>-<random>``, mode 0600, created with ``O_EXCL`` and
    mapped read-write. They come from a pool: each request takes a free input region and a
    free output region big enough for it (a bigger one is created and registered when none
    fits; sizes are rounded up so that they are reused), and gives them back when done.
    As soon as the server has mapped a region, its file is unlinked: nothing is left in
    ``/dev/shm`` even if the client is killed, and the memory is freed once both sides
    unmap it. :meth:`ShmTransport.close` (and garbage collection) unmaps the rest.

Small requests
    Requests with less than :data:`MIN_SHM_BYTES` (256 KiB) of Arrow buffers go over Flight
    on the same connection (``min_shm_bytes=`` changes it; 0 sends everything through
    shared memory): below about that size the socket's copies cost less than the extra
    work shared memory takes per request, so they are faster there.

Result lifetime
    A result batch keeps its output region busy until the batch, and every array taken
    from it, is garbage-collected; the region is then reused. Keeping many results alive
    therefore keeps that much shared memory. ``copy_results=True`` copies each result into
    ordinary memory instead (one more copy) and frees the region at once.

The output region is sized from what earlier results of the same model needed per row;
when a result does not fit, the server says how much it needs, and the request is sent
again with a region of that size (the model runs twice, which happens at most once per
growth of the result size).

Selection (``Client(url, shm=...)``)
    ``shm://HOST:PORT`` or ``shm+unix:///PATH`` always use shared memory (and fail if it
    does not work). ``shm="auto"`` with a Flight URL uses it when the server is on this
    host, decided once, when the client is made: the URL is a loopback address
    (``localhost``, 127.0.0.0/8, ``::1``) or a Unix socket, **and** a test region (64 KiB)
    registers: that proves the server sees this host's ``/dev/shm`` under the same user.
    Otherwise the client speaks Flight, silently. ``shm=True`` is like ``shm://``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import secrets
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import flight

from .._ipc import SchemaCache, encode, read_stream
from ..errors import ArrowInferError, ServerUnavailable, Timeout, TransportError
from ..protocol import SHM_DESCRIPTOR, dump_json, is_loopback_host, result_metadata, shm_descriptor
from ..tensors import ALIGNMENT
from ._stream import OrderedStream, Reply
from ._transport import (
    FLIGHT_OPTIONS,
    FlightTransport,
    Transport,
    check_options,
    error_from_reply,
    in_order,
)

__all__ = [
    "MIN_SHM_BYTES",
    "SHM_DESCRIPTOR",
    "SHM_OPTIONS",
    "ShmTransport",
    "check_shm",
    "flight_location",
    "is_local",
    "make_transport",
]

log = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"
_MIN_REGION = 64 * 1024

#: Requests with fewer bytes of Arrow buffers go over Flight (see ``min_shm_bytes``).
MIN_SHM_BYTES = 256 * 1024
_SHM_SCHEMES = {"shm": "grpc", "shm+unix": "grpc+unix"}
#: Threads that copy a large request into its region.
_COPY_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))

#: The options of :class:`ShmTransport` a client passes on (``Client(url, shm=..., ...)``).
SHM_OPTIONS = frozenset({"copy_results", "min_shm_bytes", "max_free_regions", "probe_timeout"})


def flight_location(url: str) -> str:
    """The Flight location of a URL: ``shm://h:p`` -> ``grpc://h:p``; others unchanged."""
    scheme, sep, rest = url.partition("://")
    return f"{_SHM_SCHEMES[scheme]}://{rest}" if sep and scheme in _SHM_SCHEMES else url


def is_local(url: str) -> bool:
    """Does the URL name a server on this host (a Unix socket or a loopback address)?"""
    parts = urllib.parse.urlsplit(flight_location(url))
    if parts.scheme.endswith("+unix"):
        return True
    return is_loopback_host(parts.hostname or "")


def _round(size: int) -> int:
    """A region size for ``size`` bytes: 64 KiB at least, then steps of 1/8 of a power of 2."""
    if size <= _MIN_REGION:
        return _MIN_REGION
    step = 1 << (size.bit_length() - 4)
    return -(-size // step) * step


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _Region:
    """One shared-memory region the client owns: a file in /dev/shm, mapped read-write."""

    def __init__(self, size: int):
        self.name = f"arrowinfer-{os.getpid()}-{secrets.token_hex(8)}"
        self.size = size
        path = os.path.join(_SHM_DIR, self.name)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # no space: an error now, not SIGBUS later
            except OSError as err:
                if err.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: not on this file system
                    raise
                os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink, path)
        self.view: Any = pa.py_buffer(self._mmap)  # None once closed
        #: The session the server mapped it in (None: not registered anywhere).
        self.session: _Session | None = None

    def unlink(self) -> None:
        """Remove the file; the mapping stays (idempotent)."""
        self._finalizer()

    def close(self) -> None:
        """Unlink and unmap; results still using it keep it mapped until they are gone."""
        self._finalizer()
        self.session = None
        self.view = None
        with contextlib.suppress(BufferError):  # exported to results: unmapped with them
            self._mmap.close()


class _Lease:
    """Owner of a result's memory: when it dies, the output region goes back to the pool.

    It holds a view of the region, so that the mapping outlives every result read from it.
    """

    __slots__ = ("__weakref__", "view")

    def __init__(self, view: pa.Buffer):
        self.view = view


@dataclass
class _Op:
    """A request on the session waiting for its reply."""

    on_reply: Callable[[dict[str, Any] | ArrowInferError], None]


@dataclass
class _Infer:
    """An infer request: its future, regions and what it needs."""

    future: Future[pa.RecordBatch]
    key: tuple[str, str | None]
    source: _Region
    length: int
    rows: int
    offset: int = 0  # where the stream starts in ``source``
    output: _Region | None = None
    attempts: int = 0


class _Session(OrderedStream):
    """The control stream: JSON requests in order, their JSON replies read in order."""

    def __init__(self, client: flight.FlightClient, where: str):
        # replies to requests in flight may take a while (a large batch): wait longer
        super().__init__(client, shm_descriptor(), where, name="shm-session", linger=10.0)

    def send(
        self,
        request: dict[str, Any],
        on_reply: Callable[[dict[str, Any] | ArrowInferError], None],
    ) -> None:
        """Send a request; ``on_reply`` gets its reply (or the error that broke the session)."""

        def reply_of(reply: Reply | ArrowInferError) -> None:
            on_reply(reply if isinstance(reply, ArrowInferError) else reply.meta)

        self.request(reply_of, metadata=dump_json(request))


class ShmTransport:
    """Requests and results through shared memory; the same API as :class:`FlightTransport`.

    Parameters
    ----------
    url
        ``shm://host:port``, ``shm+unix:///path``, or the server's Flight location
        (``grpc://127.0.0.1:8815``, ``grpc+unix:///path``).
    copy_results
        Copy each result out of shared memory (frees its region at once); by default
        results are views that keep their region busy until they are garbage-collected.
    min_shm_bytes
        Requests whose Arrow buffers are smaller go over Flight, on this transport's own
        connection (0: every request through shared memory). Shared memory saves copies,
        which small requests hardly have, and costs more Python work per request; the
        default is about where it starts to pay (``benchmarks/shm.py``).
    max_free_regions
        Regions kept for reuse when idle; more are unregistered and unmapped.
    probe_timeout
        Seconds to wait for the test registration when the transport is made.
    **flight_options
        Passed to ``pyarrow.flight.FlightClient`` (the session and every other call go
        over it): the names of :data:`~arrowinfer.client._transport.FLIGHT_OPTIONS`,
        ``compression`` and ``token`` (a TypeError names any other).

    Raises
    ------
    ArrowInferError, OSError
        The server is unreachable or refuses shared memory (another host, another user,
        no ``/dev/shm``): nothing is left behind.
    """

    def __init__(
        self,
        url: str,
        *,
        copy_results: bool = False,
        min_shm_bytes: int = MIN_SHM_BYTES,
        max_free_regions: int = 16,
        probe_timeout: float = 10.0,
        **flight_options: Any,
    ):
        self.location = flight_location(url)
        self._flight = FlightTransport(self.location, **flight_options)
        self._copy = copy_results
        self._min_shm_bytes = min_shm_bytes
        self._max_free = max_free_regions
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._regions: set[_Region] = set()  # every region, busy or free
        self._free: list[_Region] = []
        self._returned: queue.SimpleQueue[_Region] = queue.SimpleQueue()  # from finalizers
        self._schemas = SchemaCache()
        self._per_row: dict[tuple[str, str | None], tuple[int, float]] = {}
        self._closed = False
        self._stats = {"requests": 0, "flight_requests": 0, "retries": 0, "regions_created": 0}
        try:
            self._probe(probe_timeout)
        except BaseException:
            self.close()
            raise

    # -- Flight for everything but inference ---------------------------------------------

    def models(self, timeout: float | None = None) -> dict[str, dict[str, pa.Schema]]:
        return self._flight.models(timeout=timeout)

    def schema(self, model: str, version: str | None, timeout: float | None = None) -> pa.Schema:
        return self._flight.schema(model, version, timeout=timeout)

    def action(
        self, name: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        return self._flight.action(name, body, timeout=timeout)

    # -- regions -------------------------------------------------------------------------

    @property
    def statistics(self) -> dict[str, int]:
        """Requests sent through shared memory and over Flight, requests sent again with a
        bigger output region, regions made, regions now (all, free)."""
        with self._lock:
            return {**self._stats, "regions": len(self._regions), "free": len(self._free)}

    def _probe(self, timeout: float) -> None:
        """Open the session and register one region, waiting for the server's answer."""
        region = self._acquire(_MIN_REGION, self._live_session(), wait=timeout)
        self._release(region)

    def _live_session(self) -> _Session:
        with self._lock:
            if self._closed:
                raise ServerUnavailable(f"{self.location}: the client is closed")
            session = self._session
            if session is not None and session.broken is None:
                return session
            old, self._session = session, None
        if old is not None:
            old.close()
        session = _Session(self._flight._client, self.location)
        with self._lock:
            mine = self._session is None and not self._closed
            if mine:
                self._session = session
        if mine:
            return session
        session.close()  # another thread opened one meanwhile, or the client closed
        return self._live_session()

    def _collect_returned(self) -> None:
        """Regions whose results were garbage-collected: free again (under the lock)."""
        while not self._returned.empty():
            self._put_free(self._returned.get())

    def _give_back(self, region: _Region) -> None:
        """A result was garbage-collected (any thread, any time): its region is free."""
        if self._closed:
            region.close()
        else:
            self._returned.put(region)  # SimpleQueue: safe to call from a finalizer

    def _put_free(self, region: _Region) -> None:
        if region in self._regions:
            self._free.append(region)

    def _acquire(self, size: int, session: _Session, *, wait: float | None = None) -> _Region:
        """A free region of at least ``size`` bytes, registered in ``session``."""
        with self._lock:
            self._collect_returned()
            fits = [r for r in self._free if r.size >= size and r.session is session]
            region = min(fits, key=lambda r: r.size) if fits else None
            if region is not None:
                self._free.remove(region)
                return region
            stale = [r for r in self._free if r.session is not session]
        for old in stale:  # registered in a session that is gone
            self._discard(old)
        try:
            region = _Region(_round(size))
        except OSError as err:
            raise TransportError(
                f"cannot create a shared-memory region of {_round(size)} bytes: {err}"
            ) from err
        registered: Future[None] = Future()

        def on_reply(reply: dict[str, Any] | ArrowInferError) -> None:
            if isinstance(reply, dict) and "registered" in reply:
                region.unlink()  # the server has it mapped: nothing to leak from now on
                registered.set_result(None)
            else:
                error = reply if isinstance(reply, ArrowInferError) else error_from_reply(reply)
                log.debug("%s: region %s not registered: %s", self.location, region.name, error)
                region.session = None
                registered.set_exception(error)

        with self._lock:
            self._regions.add(region)
            self._stats["regions_created"] += 1
        region.session = session
        try:
            session.send({"op": "register", "name": region.name, "size": region.size}, on_reply)
            if wait is not None:
                registered.result(wait)
        except FutureTimeout:
            self._discard(region)
            raise Timeout(f"{self.location}: no answer to a shared-memory registration") from None
        except BaseException:
            self._discard(region)
            raise
        return region

    def _release(self, region: _Region) -> None:
        """A region is free again; beyond ``max_free_regions``, the smallest is dropped."""
        with self._lock:
            self._collect_returned()
            self._put_free(region)
            if len(self._free) <= self._max_free:
                return
            drop = min(self._free, key=lambda r: r.size)
            self._free.remove(drop)
        self._discard(drop)

    def _discard(self, region: _Region) -> None:
        """Unregister (if its session lives) and unmap a region that no request uses."""
        with self._lock:
            self._regions.discard(region)
            with contextlib.suppress(ValueError):
                self._free.remove(region)
        session = region.session
        if session is not None and session.broken is None:
            with contextlib.suppress(ArrowInferError):
                session.send({"op": "unregister", "name": region.name}, lambda reply: None)
        region.close()

    # -- inference -----------------------------------------------------------------------

    def _output_size(self, key: tuple[str, str | None], rows: int, length: int) -> int:
        learned = self._per_row.get(key)
        if learned is None:
            return length + _MIN_REGION  # a first guess: results are rarely much larger
        overhead, per_row = learned
        return overhead + int(per_row * rows) + 64

    def _learn(self, key: tuple[str, str | None], result: pa.RecordBatch, length: int) -> None:
        learned = self._per_row.get(key)
        overhead = (
            learned[0]
            if learned
            else encode(result.slice(0, 0)).size
            + 64 * sum(len(c.buffers()) for c in result.columns)
        )
        per_row = (length - overhead) / max(result.num_rows, 1)
        self._per_row[key] = (overhead, max(per_row, learned[1] if learned else 0.0, 0.0))

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        """Send one request (through shared memory unless it is small); its future."""
        if batch.get_total_buffer_size() < self._min_shm_bytes:
            with self._lock:
                self._stats["flight_requests"] += 1
            return self._flight.submit(model, version, batch)
        future: Future[pa.RecordBatch] = Future()
        future.set_running_or_notify_cancel()
        encoded = encode(batch)
        # the body at a multiple of 64 bytes of the region: the server reads it in the same
        # phase, and onnxruntime takes its buffers without an alignment copy
        pad = -encoded.body_offset % ALIGNMENT
        session = self._live_session()
        source = self._acquire(pad + encoded.size, session)
        try:
            written = encoded.write(source.view, start=pad, threads=_COPY_THREADS)
        except BaseException:
            self._release(source)
            raise
        key = (model, version)
        item = _Infer(future, key, source, written, batch.num_rows, pad)
        self._send(session, item, self._output_size(key, batch.num_rows, written))
        return future

    def _send(self, session: _Session, item: _Infer, size: int) -> None:
        try:
            item.output = self._acquire(size, session)
            model, version = item.key
            request = {
                "op": "infer",
                "model": model,
                "version": version,
                "input": {
                    "region": item.source.name,
                    "offset": item.offset,
                    "length": item.length,
                },
                "output": {"region": item.output.name, "offset": 0, "size": item.output.size},
            }
            with self._lock:
                self._stats["requests"] += 1
            session.send(request, lambda reply: self._on_reply(session, item, reply))
        except ArrowInferError as err:
            self._fail(item, err)
            if item.attempts == 0:
                raise

    def _fail(self, item: _Infer, err: ArrowInferError) -> None:
        regions = [item.source] + ([item.output] if item.output is not None else [])
        item.output = None
        for region in regions:
            self._release(region)
        if not item.future.done():
            item.future.set_exception(err)

    def _on_reply(
        self, session: _Session, item: _Infer, reply: dict[str, Any] | ArrowInferError
    ) -> None:
        """A reply (on the session's thread): resolve the future, or ask again, bigger."""
        if isinstance(reply, ArrowInferError):
            self._fail(item, reply)
            return
        output = item.output
        assert output is not None
        if "error" in reply:
            needed = reply.get("needed")
            if isinstance(needed, int) and item.attempts < 3 and session.broken is None:
                item.attempts += 1
                item.output = None
                self._release(output)
                with self._lock:
                    self._stats["retries"] += 1
                self._send(session, item, needed)
                return
            self._fail(item, error_from_reply(reply))
            return
        try:
            result = self._result(output, reply)
        except (ArrowInferError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
            self._fail(item, ServerUnavailable(f"{self.location}: a bad result: {err}"))
            return
        self._release(item.source)
        with self._lock:
            self._learn(item.key, result, int(reply["output"]["length"]))
        item.future.set_result(result)

    def _result(self, output: _Region, reply: dict[str, Any]) -> pa.RecordBatch:
        place = reply["output"]
        offset, length = int(place["offset"]), int(place["length"])
        if place["region"] != output.name or offset < 0 or offset + length > output.size:
            raise ValueError(f"the result lies outside its region: {place}")
        if self._copy:
            data = pa.allocate_buffer(length)
            np.copyto(
                np.frombuffer(data, np.uint8),
                np.frombuffer(output.view, np.uint8, length, offset),
            )
            self._release(output)
        else:
            view = output.view.slice(offset, length)
            lease = _Lease(view)
            data = pa.foreign_buffer(view.address, length, base=lease)
            weakref.finalize(lease, self._give_back, output)
        batch = read_stream(data, self._schemas)
        times = result_metadata(reply)
        if times:
            batch = batch.replace_schema_metadata({**(batch.schema.metadata or {}), **times})
        return batch

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        """Pipeline requests; at most ``window`` in flight; results in order."""
        return in_order(lambda b: self.submit(model, version, b), batches, window)

    def close(self) -> None:
        """End the session (requests in flight get their results), free every region."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session, self._session = self._session, None
        if session is not None:
            session.close()
        with self._lock:
            regions, self._regions, self._free = list(self._regions), set(), []
        while not self._returned.empty():
            regions.append(self._returned.get())
        for region in regions:
            region.close()
        self._flight.close()


def make_transport(
    url: str,
    *,
    shm: bool | str = False,
    compression: str | None = None,
    **options: Any,
) -> Transport:
    """The transport a URL and ``shm=`` ask for (see the module docstring).

    Parameters
    ----------
    url
        ``grpc://``, ``grpc+tls://``, ``grpc+unix://``, ``shm://`` or ``shm+unix://``.
    shm
        False (Flight unless the URL says ``shm``), True (shared memory, or an error),
        or ``"auto"`` (shared memory when the server is on this host, else Flight).
    **options
        :data:`SHM_OPTIONS` (used by shared memory only) and
        :data:`~arrowinfer.client._transport.FLIGHT_OPTIONS`.

    Raises
    ------
    TypeError
        An option of neither kind.
    """
    check_shm(shm)
    check_options("make_transport", options, FLIGHT_OPTIONS | SHM_OPTIONS | {"token"})
    flight_options = {k: v for k, v in options.items() if k not in SHM_OPTIONS}
    scheme = url.partition("://")[0]
    if shm is True or scheme in _SHM_SCHEMES:
        return ShmTransport(url, **options)
    if shm == "auto" and is_local(url):
        try:
            return ShmTransport(url, **options)
        except (ArrowInferError, OSError) as err:
            log.debug("%s: no shared memory (%s); using Flight", url, err)
    return FlightTransport(url, compression=compression, **flight_options)


def check_shm(shm: object) -> None:
    """Raises ValueError unless ``shm`` is False, True or ``"auto"``."""
    if shm not in (False, True, "auto"):
        raise ValueError(f"shm must be False, True or 'auto', got {shm!r}")
