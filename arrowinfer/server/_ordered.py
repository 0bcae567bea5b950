"""Ordered, pipelined replies on one server stream, shared by the Flight and shm front ends.

A stream's reader submits requests as it reads them and puts each one here, in request
order; a writer thread beside it writes their replies in that order, so requests run while
later ones are still being read, and replies never overtake each other. An item put with
the future its reply waits for reaches the writer thread only once that future is done
(its done-callback queues it, numbered), so the thread wakes once per reply, not once for
the item and again for its result. Server
shutdown puts a ``goaway`` in the same queue, so it lands after the replies of every
request read so far. When a write fails (the client went away), the writer keeps taking
items, so that each is finished (its resources released), but writes nothing more; the
reader sees :attr:`OrderedReplies.failure` and stops reading.

When nothing is pending (every item put so far is written), the reader may write a reply
itself (:meth:`OrderedReplies.write_now`): a request that ran inline in the reader's
thread then goes out without waking the writer thread, the fast path of one request at
a time.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pyarrow as pa
from pyarrow import flight

from ..protocol import GOAWAY, dump_json

__all__ = ["GOAWAY_REASON", "OrderedReplies", "Reply"]

log = logging.getLogger(__name__)

#: What a stream's client is told when the server stops.
GOAWAY_REASON = "the server is shutting down"

#: One reply: a record batch (None for a metadata-only message) and its JSON metadata.
Reply = tuple[pa.RecordBatch | None, dict[str, Any]]

_GOAWAY = object()
_END = object()


class OrderedReplies:
    """The writer side of one stream: replies written in the order their items were put.

    Items may be put before :meth:`start` (a Flight stream begins its writer with the
    first request's options); they wait in the queue.

    Parameters
    ----------
    writer
        The stream's Flight writer (``begin`` already called if batches are written).
    finish
        Turns a queued item into its reply; runs on the writer thread and may block (wait
        for a result). It must not raise: a request's error is part of its reply.
    name
        The writer thread's name.
    """

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
        # items put and not yet written (counted under _count_lock); every write holds
        # _write_lock, so a reply written by the reader and the writer's never interleave
        self._pending = 0
        self._count_lock = threading.Lock()
        self._numbered = 0  # the next item's place in the stream (under _count_lock)
        self._write_lock = threading.Lock()
        #: The error that broke the stream (the client went away), once a write failed.
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start writing replies (once)."""
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def idle(self) -> bool:
        """Is every item put so far written (a new request would be next in line)?"""
        return self._pending == 0

    def _number(self, item: Any, *, counted: bool = True) -> tuple[int, Any]:
        with self._count_lock:
            self._pending += counted
            place = self._numbered
            self._numbered += 1
        return place, item

    def put(self, item: Any, ready: Future[Any] | None = None) -> None:
        """Queue the next request's item; its reply follows those put before.

        ``ready``: the future the item's reply waits for; the writer thread gets the item
        once it is done (the callback only queues it: it never blocks the thread that
        completes the future).
        """
        numbered = self._number(item)
        if ready is None:
            self._items.put(numbered)
        else:
            ready.add_done_callback(lambda _: self._items.put(numbered))

    def write_now(self, item: Any) -> bool:
        """Write an item's reply in this thread if nothing is pending; else queue it.

        Returns whether it was written here (False: queued, as :meth:`put`).
        """
        with self._write_lock:
            # 0 pending: every earlier reply is written (the count drops after the write),
            # and a goaway put from now on waits for this lock, so it lands after this reply
            if self._pending == 0 and self.started:
                self._write(self._finish(item))
                return True
        self.put(item)
        return False

    def goaway(self) -> None:
        """Ask the client to finish the stream, after the replies queued so far."""
        self._items.put(self._number(_GOAWAY))

    def close(self) -> None:
        """Finish every queued item, write their replies, and stop the writer thread.

        Not started: nothing is written (the items are dropped).
        """
        self._items.put(self._number(_END, counted=False))
        if self.started:
            self._thread.join()

    def _run(self) -> None:
        arrived: dict[int, Any] = {}  # items that came before their turn, by place
        turn = 0
        while True:
            place, item = self._items.get()
            arrived[place] = item
            while turn in arrived:
                item = arrived.pop(turn)
                turn += 1
                if item is _END:
                    return
                if item is _GOAWAY:
                    reply: Reply = (None, {GOAWAY: GOAWAY_REASON})
                else:
                    reply = self._finish(item)
                item = None  # drop what it holds (mapped regions) before the next wait
                with self._write_lock:
                    self._write(reply)
                with self._count_lock:
                    self._pending -= 1
                del reply

    def _write(self, reply: Reply) -> None:
        """Write one reply (under the write lock); nothing once the stream is gone."""
        if self.failure is not None:
            return  # the stream is gone; the items still drain so the reader can finish
        batch, meta = reply
        try:
            if batch is None:
                self._writer.write_metadata(dump_json(meta))
            else:
                self._writer.write_with_metadata(batch, dump_json(meta))
        except (pa.ArrowException, OSError) as err:  # the client went away
            log.debug("stream closed while writing: %s", err)
            self.failure = err
