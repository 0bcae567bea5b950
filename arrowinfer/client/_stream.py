"""The client's ordered stream: one Flight ``do_exchange`` shared by many callers.

Both streams of the client work this way: a model's stream of requests
(:class:`~arrowinfer.client.FlightTransport`) and the shared-memory session
(:class:`~arrowinfer.client.ShmTransport`). Callers on any thread write requests; the server
answers them in the order they came; one reader thread hands each reply to the callback
its request left in a queue. A metadata-only ``{"goaway": reason}`` asks the client to
finish (no new requests; the replies still due arrive, then the stream ends). When the
stream breaks, every request still waiting gets the error, exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyarrow as pa
from pyarrow import flight

from ..errors import ArrowInferError, InvalidInput, ServerError, ServerUnavailable, from_exception
from ..protocol import goaway_reason, parse_json

__all__ = ["OrderedStream", "Reply", "map_flight_errors"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def map_flight_errors(where: str) -> Iterator[None]:
    """Re-raise Flight, Arrow and socket errors as arrowinfer errors (``where``: the server)."""
    try:
        yield
    except (flight.FlightError, pa.ArrowException, OSError, EOFError) as err:
        raise from_exception(err, where) from err


class Reply(NamedTuple):
    """One reply: its record batch (None for a metadata-only reply) and its JSON metadata."""

    data: pa.RecordBatch | None
    meta: dict[str, Any]


#: What a request leaves for its reply: called once, on the reader thread, with the reply
#: or with the error that ended the stream.
OnReply = Callable[[Reply | ArrowInferError], None]


class OrderedStream:
    """A ``do_exchange`` stream on which requests are pipelined and answered in order.

    Parameters
    ----------
    client
        The connection.
    descriptor
        What the stream is for (a model's path, or the shared-memory session's).
    where
        The server, for error messages.
    name
        The reader thread's name.
    schema, options
        The schema (and IPC options) of the record batches written; None: requests are
        metadata-only messages.
    first_metadata
        Sent with the first request when it has no metadata of its own (compression).
    linger
        Seconds :meth:`close` waits for the replies still due before cancelling the stream.

    Raises
    ------
    ArrowInferError
        The stream cannot be opened.
    """

    def __init__(
        self,
        client: flight.FlightClient,
        descriptor: flight.FlightDescriptor,
        where: str,
        *,
        name: str,
        schema: pa.Schema | None = None,
        options: pa.ipc.IpcWriteOptions | None = None,
        first_metadata: bytes = b"",
        linger: float = 5.0,
    ):
        with map_flight_errors(where):
            self.writer, self.reader = client.do_exchange(descriptor)
            if schema is not None:
                self.writer.begin(schema, options=options)
        self.schema = schema
        self.where = where
        self._linger = linger
        self._first: bytes | None = first_metadata
        self._pending: deque[OnReply] = deque()
        # Two locks: writers queue on _write_lock (a write can block on flow control), while
        # _lock guards only the pending queue, so the reader can always take its callbacks
        # and keep reading; one lock for both deadlocks once the stream's buffers fill.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._finish = False  # half-close as soon as no write is in progress
        self._half_closed = False
        #: The error new requests get: set by a failure, a goaway or close().
        self.broken: ArrowInferError | None = None
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)
        self._thread.start()

    # -- writing -------------------------------------------------------------------------

    def request(
        self, on_reply: OnReply, batch: pa.RecordBatch | None = None, metadata: bytes = b""
    ) -> None:
        """Send one request; ``on_reply`` gets its reply later (on the reader thread).

        Raises
        ------
        ArrowInferError
            The stream is broken, finishing or closed, or the write failed (the stream is
            broken then: the requests waiting get the same error); ``on_reply`` is not called.
        """
        failed: ArrowInferError | None = None
        with self._write_lock:
            with self._lock:
                if self.broken is not None:
                    raise self.broken
                if self._first is not None:
                    metadata, self._first = metadata or self._first, None
                self._pending.append(on_reply)
            try:
                with map_flight_errors(self.where):
                    if batch is None:
                        self.writer.write_metadata(metadata)
                    else:
                        self.writer.write_with_metadata(batch, metadata)
            except ArrowInferError as err:
                with self._lock:
                    if self._pending and self._pending[-1] is on_reply:
                        self._pending.pop()
                failed = err
        self._half_close_if_due()
        if failed is not None:
            self._break(failed)
            raise failed

    def _half_close_if_due(self) -> None:
        """Half-close once a goaway or close() asked for it and no write is in progress.

        Whoever holds the write lock calls this after releasing it, so the request is never
        lost between a writer that already looked and a reader that could not take the lock.
        """
        while self._finish and self._write_lock.acquire(blocking=False):
            try:
                if self._finish and not self._half_closed:
                    self._half_closed = True
                    with contextlib.suppress(pa.ArrowException, OSError, flight.FlightError):
                        self.writer.done_writing()
                self._finish = False
            finally:
                self._write_lock.release()

    # -- reading -------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                with map_flight_errors(self.where):
                    chunk = self.reader.read_chunk()
                self._reply(chunk)
                chunk = None  # a reply may hold a result: keep nothing of it while waiting
        except StopIteration:
            self._break(ServerUnavailable(f"{self.where}: the server closed the stream"))
        except ArrowInferError as err:
            self._break(err)
        except Exception as err:  # every request waiting must hear of it
            log.exception("%s: reading the stream failed", self.where)
            self._break(ServerError(f"{self.where}: reading the stream failed: {err!r}"))

    def _reply(self, chunk: flight.FlightStreamChunk) -> None:
        reply: Reply | ArrowInferError
        try:
            meta = parse_json(chunk.app_metadata, "a reply's metadata")
        except InvalidInput as err:  # answers the oldest request all the same: keep in step
            reply = ServerError(f"{self.where}: a malformed reply: {err}")
        else:
            if chunk.data is None:
                reason = goaway_reason(meta)
                if reason is not None:
                    self._goaway(reason)
                    return
                if self.schema is not None:
                    return  # a metadata-only message on a data stream asks nothing of us
            reply = Reply(chunk.data, meta)
        with self._lock:
            on_reply = self._pending.popleft() if self._pending else None
        if on_reply is None:
            log.warning("%s: a reply came that no request waits for", self.where)
            return
        try:
            on_reply(reply)
        except Exception:
            log.exception("%s: handling a reply failed", self.where)

    def _goaway(self, reason: str) -> None:
        """The server asks us to finish: no new requests; those in flight get their replies."""
        with self._lock:
            if self.broken is None:
                self.broken = ServerUnavailable(f"{self.where}: {reason}")
        self._finish = True
        self._half_close_if_due()

    def _break(self, err: ArrowInferError) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = err
            pending, self._pending = list(self._pending), deque()
        for on_reply in pending:
            try:
                on_reply(err)
            except Exception:
                log.exception("%s: failing a request", self.where)

    def close(self) -> None:
        """Finish writing; wait (``linger`` s) for the replies still due; end the stream."""
        with self._lock:
            if self.broken is None:
                self.broken = ServerUnavailable(f"{self.where}: the client is closed")
        self._finish = True
        # a write stuck on a stalled server must not hang close(): the cancel below ends it
        if self._write_lock.acquire(timeout=self._linger):
            self._write_lock.release()
        self._half_close_if_due()
        self._thread.join(timeout=self._linger)
        if self._thread.is_alive():
            # the server does not finish the stream (stalled, frozen): cancel it, or
            # writer.close() below would wait for the server as long as it stalls
            log.warning("%s: the stream did not finish; cancelling it", self.where)
            with contextlib.suppress(pa.ArrowException, OSError, flight.FlightError):
                self.reader.cancel()
            self._thread.join(timeout=self._linger)
        with contextlib.suppress(pa.ArrowException, OSError, flight.FlightError):
            self.writer.close()
