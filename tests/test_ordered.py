"""A stream's replies go out in request order, whatever order their results complete in.

A real Flight server whose ``do_exchange`` answers through :class:`OrderedReplies`: each
request gets a future the test completes, last request first; the client must still read
the replies in request order, and a goaway queued after them comes last.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pyarrow as pa
import pytest
from pyarrow import flight

from arrowinfer.protocol import GOAWAY, parse_json
from arrowinfer.server._ordered import OrderedReplies, Reply

WAIT = 10.0
COUNT = 5


class Held(flight.FlightServerBase):
    """Answers request ``i`` with ``i`` once the test completes ``futures[i]``."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.futures: list[Future[int]] = [Future() for _ in range(COUNT)]
        self.all_read = threading.Event()

    def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> None:
        schema = pa.schema([("i", pa.int64())])

        def finish(item: tuple[int, Future[int]]) -> Reply:
            i, future = item
            assert future.done()  # queued only once ready: the writer never waits on it
            return pa.record_batch({"i": [future.result()]}, schema=schema), {"id": i}

        replies = OrderedReplies(writer, finish, name="test-writer")
        writer.begin(schema)
        replies.start()
        try:
            for i, _ in enumerate(reader):
                replies.put((i, self.futures[i]), ready=self.futures[i])
                if i == COUNT - 1:
                    replies.goaway()
                    self.all_read.set()
        finally:
            replies.close()


@pytest.fixture
def server() -> Iterator[Held]:
    with Held() as held:
        yield held


def test_replies_keep_request_order_when_results_complete_in_reverse(server: Held) -> None:
    client = flight.FlightClient(f"grpc://127.0.0.1:{server.port}")
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("held"))
    request = pa.record_batch({"x": [0]})
    writer.begin(request.schema)
    for _ in range(COUNT):
        writer.write_batch(request)
    assert server.all_read.wait(WAIT)
    for i, future in reversed(list(enumerate(server.futures))):
        future.set_result(i)
    got = []
    for _ in range(COUNT + 1):
        chunk = reader.read_chunk()
        meta = parse_json(chunk.app_metadata.to_pybytes())
        got.append("goaway" if GOAWAY in meta else (meta["id"], chunk.data.column(0)[0].as_py()))
    writer.done_writing()
    assert got == [(i, i) for i in range(COUNT)] + ["goaway"]
    client.close()


def test_open_streams_share_one_budget_of_pending_bytes() -> None:
    """Each stream may hold MAX_PENDING_BYTES of requests whose replies its client has not
    read; many streams together share ALL_PENDING_BYTES (48 streams that never read held
    6 GB before); put() still admits one request to an idle stream, so none is starved."""
    from arrowinfer.server import _ordered

    before = OrderedReplies._open
    streams = [OrderedReplies(None, lambda item: item, name="budget") for _ in range(64)]
    try:
        for stream in streams:
            stream.start()
        share = _ordered.ALL_PENDING_BYTES // (before + 64)
        assert streams[0].byte_limit() == min(_ordered.MAX_PENDING_BYTES, share) < (16 << 20)
    finally:
        for stream in streams:
            stream.close()
            stream.close()  # again: counted once
    assert OrderedReplies._open == before
    assert OrderedReplies(None, lambda item: item, name="x").byte_limit() == min(
        _ordered.MAX_PENDING_BYTES, _ordered.ALL_PENDING_BYTES // max(before, 1)
    )
