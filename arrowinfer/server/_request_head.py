"""uvicorn's httptools protocol with a bound on a request's head (request line and headers).

httptools joins a header that arrives in pieces by concatenation, so a head of N bytes costs
time quadratic in N on the event loop: a 160 MiB header took 25 s to parse and stalled
every other client for seconds at a time (tenth session's attack). uvicorn bounds heads
only for h11. A head larger than :data:`MAX_HEAD_BYTES` gets 431 and its connection is
closed, as nginx, Node and h11 do at their own bounds (8-64 KiB).
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: The largest request line plus headers; a bearer token of a few KiB fits many times.
MAX_HEAD_BYTES = 64 * 1024

_TOO_LARGE = json.dumps(
    {"error": f"the request's headers are too large (at most {MAX_HEAD_BYTES} bytes)"}
).encode()


class _HeadTooLarge(Exception):
    """Raised in a parser callback: httptools stops, and uvicorn calls send_400_response."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that answers 431 to a head over :data:`MAX_HEAD_BYTES`.

    It counts the bytes received while a head is unfinished: that stops a head streamed
    over many reads before httptools has joined it all. A read that ends a head may also
    hold the body; only when such reads exceed the bound is the head as parsed measured.
    """

    def connection_made(self, transport: Any) -> None:
        self._in_head, self._received, self._too_large = True, 0, False
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._received += len(data)
        super().data_received(data)
        if self._in_head and self._received > MAX_HEAD_BYTES:
            self._refuse()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._received > MAX_HEAD_BYTES and self._parsed_head() > MAX_HEAD_BYTES:
            self._too_large = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._received = True, 0
        super().on_message_complete()

    def _parsed_head(self) -> int:
        """The URL and headers as parsed (their separators counted), in bytes."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE)
        )
        self.transport.close()
