"""Ordered, pipelined replies on one server stream, shared by the Flight and shm front ends.

A stream's reader submits requests as it reads them and puts each one here, in request
order; a writer thread beside it waits for each in turn and writes its reply, so requests
run while later ones are still being read, and replies never overtake each other. Server
shutdown puts a ``goaway`` in the same queue, so it lands after the replies of every
request read so far. When a write fails (the client went away), the writer keeps taking
items, so that each is finished (its resources released), but writes nothing more; the
reader sees :attr:`OrderedReplies.failure` and stops reading.

An item put with the future its reply waits for reaches the writer thread only once that
future is done (its done-callback queues it, numbered), so the thread wakes once per reply,
not once for the item and again for its result; items are written in the order they were
put whatever order their futures complete in. When nothing is pending (every item put so
far is written), the reader may write a reply itself (:meth:`OrderedReplies.write_now`): a
request that ran inline in the reader's thread then goes out without waking the writer
thread, the fast path of one request at a time.

Back-pressure: a stream holds at most :data:`MAX_PENDING` requests (and about
:data:`MAX_PENDING_BYTES` of their data, less when many streams share
:data:`ALL_PENDING_BYTES`) whose replies are not written yet. :meth:`put`
blocks the stream's reader beyond that, so a client that sends without reading its
results stops being read (gRPC's flow control then stops its sending) instead of making
the server hold every result.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pyarrow as pa
from pyarrow import flight

from ..errors import InvalidInput
from ..protocol import GOAWAY, dump_json

__all__ = [
    "ALL_PENDING_BYTES",
    "GOAWAY_REASON",
    "MAX_PENDING",
    "MAX_PENDING_BYTES",
    "OrderedReplies",
    "Reply",
    "read_chunks",
]

log = logging.getLogger(__name__)

#: What a stream's client is told when the server stops.
GOAWAY_REASON = "the server is shutting down"

#: One reply: a record batch (None for a metadata-only message) and its JSON metadata.
Reply = tuple[pa.RecordBatch | None, dict[str, Any]]

_GOAWAY = object()
_END = object()

#: Requests of one stream whose replies are not written yet, at most.
MAX_PENDING = 32

#: Bytes of request data one stream may have pending (one request is always admitted).
MAX_PENDING_BYTES = 64 << 20

#: Bytes of request data all streams of the process may have pending together: each open
#: stream may hold its share (at most MAX_PENDING_BYTES), and at least one request. 32
#: Flight streams that never read their replies held 3.17 GB without it, 2.65 GB with it
#: (their results and gRPC's buffers are the rest: docs/security.md, section 11).
ALL_PENDING_BYTES = 512 << 20


def read_chunks(reader: flight.MetadataRecordBatchReader) -> Iterator[flight.FlightStreamChunk]:
    """A stream's messages; one Arrow cannot decode ends the stream as ``InvalidInput``.

    A message whose IPC metadata is malformed (a schema Arrow cannot read, a batch header
    that is not a flatbuffer) leaves the reader with nothing to go on: the stream ends,
    with Arrow's reason. Flight's own errors (the client cancelled) pass unchanged.
    """
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except flight.FlightError:
            raise
        except (pa.ArrowException, OSError) as err:
            raise InvalidInput(f"the stream holds a malformed Arrow IPC message: {err}") from None
        yield chunk


class OrderedReplies:
    """The writer side of one stream: replies written in the order their items were put.

    Items may be put before :meth:`start` (a Flight stream begins its writer with the
    first request's options); they wait in the queue.

    Parameters
    ----------
    writer
        The stream's Flight writer (``begin`` already called if batches are written).
    finish
        Turns a queued item into its reply; runs on the writer thread (or the reader's, in
        :meth:`write_now`) and may block (wait for a result). It must not raise: a
        request's error is part of its reply.
    name
        The writer thread's name.
    """

    #: Streams started and not closed, in this process (their share of ALL_PENDING_BYTES).
    _open = 0
    _open_lock = threading.Lock()

    def __init__(
        self,
        writer: flight.MetadataRecordBatchWriter,
        finish: Callable[[Any], Reply],
        *,
        name: str,
    ):
        self._writer = writer
        self._finish = finish
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # _room guards the counts below; every write holds _write_lock, so that a reply
        # written by the reader (write_now) and the writer thread's never interleave
        self._room = threading.Condition()
        self._pending = 0  # items put (goaway included) whose replies are not written yet
        self._pending_bytes = 0
        self._closing = False
        self._numbered = 0  # the next item's place in the stream
        self._write_lock = threading.Lock()
        #: The error that broke the stream (the client went away), once a write failed.
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start writing replies (once)."""
        with OrderedReplies._open_lock:
            OrderedReplies._open += 1
        self._thread.start()

    def byte_limit(self) -> int:
        """The request bytes this stream may have pending now: its share of
        :data:`ALL_PENDING_BYTES` among the open streams, at most :data:`MAX_PENDING_BYTES`."""
        return min(MAX_PENDING_BYTES, ALL_PENDING_BYTES // max(OrderedReplies._open, 1))

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def idle(self) -> bool:
        """Is every item put so far written (a new request would be next in line)?"""
        return self._pending == 0

    def put(self, item: Any, size: int = 0, *, ready: Future[Any] | None = None) -> None:
        """Queue the next request's item; its reply follows those put before.

        ``size`` is the bytes of request data it holds. Blocks while the stream has
        :data:`MAX_PENDING` replies (or :meth:`byte_limit` bytes) not written yet: the
        client is not reading them. ``ready``: the future the item's reply waits for; the
        writer thread gets the item once it is done (the callback only queues it, so it
        never blocks the thread that completes the future).
        """
        with self._room:
            while (
                self._pending
                and (self._pending >= MAX_PENDING or self._pending_bytes + size > self.byte_limit())
                and self.failure is None
                and not self._closing
            ):
                self._room.wait()
            self._pending += 1
            self._pending_bytes += size
            entry = (self._numbered, item, size)
            self._numbered += 1
        if ready is None:
            self._items.put(entry)
        else:
            ready.add_done_callback(lambda _: self._items.put(entry))

    def write_now(self, item: Any, size: int = 0) -> bool:
        """Write an item's reply in this thread if nothing is pending; else queue it.

        Returns whether it was written here (False: queued, as :meth:`put`).
        """
        with self._write_lock:
            # 0 pending: every earlier reply is written (the count drops after the write),
            # and a goaway put from now on waits for this lock, so it lands after this reply
            if self._pending == 0 and self.started:
                reply = self._finish(item)
                if self.failure is None:
                    self._write(reply)
                return True
        self.put(item, size)
        return False

    def goaway(self) -> None:
        """Ask the client to finish the stream, after the replies queued so far."""
        with self._room:
            self._pending += 1
            entry = (self._numbered, _GOAWAY, 0)
            self._numbered += 1
        self._items.put(entry)

    def close(self) -> None:
        """Finish every queued item, write their replies, and stop the writer thread.

        Not started: nothing is written (the items are dropped).
        """
        with self._room:
            first, self._closing = not self._closing, True
            self._room.notify_all()
            entry = (self._numbered, _END, 0)
            self._numbered += 1
        self._items.put(entry)
        if self.started:
            self._thread.join()
            if first:
                with OrderedReplies._open_lock:
                    OrderedReplies._open -= 1

    def _run(self) -> None:
        arrived: dict[int, tuple[Any, int]] = {}  # items that came before their turn
        turn = 0
        while True:
            place, item, size = self._items.get()
            arrived[place] = (item, size)
            while turn in arrived:
                item, size = arrived.pop(turn)
                turn += 1
                if item is _END:
                    return
                goaway: Reply = (None, {GOAWAY: GOAWAY_REASON})
                reply: Reply | None = goaway if item is _GOAWAY else self._finish(item)
                item = None  # drop what it holds (mapped regions) before the next wait
                try:
                    with self._write_lock:
                        if self.failure is None and reply is not None:
                            self._write(reply)
                        # else the stream is gone: drain the queue so the reader can finish
                finally:
                    reply = None
                    with self._room:
                        self._pending -= 1
                        self._pending_bytes -= size
                        self._room.notify_all()

    def _write(self, reply: Reply) -> None:
        batch, meta = reply
        try:
            if batch is None:
                self._writer.write_metadata(dump_json(meta))
            else:
                self._writer.write_with_metadata(batch, dump_json(meta))
        except (pa.ArrowException, OSError) as err:  # the client went away
            log.debug("stream closed while writing: %s", err)
            with self._room:
                self.failure = err
                self._room.notify_all()
