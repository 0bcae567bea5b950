"""Relaying a client's TCP connection, byte for byte, to one worker's private listener.

The relay works below gRPC (TLS passes through untouched) and, on Linux, moves the bytes
with ``splice(2)`` through a kernel pipe, never through Python objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
from collections.abc import Callable

__all__ = ["Relay", "listen"]

_PIPE_BYTES = 1 << 20


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until end of stream, then half-close ``dst``."""
    try:
        if hasattr(os, "splice"):
            read_end, write_end = os.pipe()
            try:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
                while n := os.splice(src.fileno(), write_end, _PIPE_BYTES):
                    while n:
                        n -= os.splice(read_end, dst.fileno(), n)
            finally:
                os.close(read_end)
                os.close(write_end)
        else:  # pragma: no cover - splice is Linux only
            buffer = bytearray(_PIPE_BYTES)
            view = memoryview(buffer)
            while n := src.recv_into(buffer):
                dst.sendall(view[:n])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:  # reset either way: break both directions
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Relay:
    """One client connection relayed to one worker: a thread per direction."""

    def __init__(
        self, client: socket.socket, upstream: socket.socket, on_close: Callable[[Relay], None]
    ):
        self.sockets = (client, upstream)
        self._left = 2
        self._lock = threading.Lock()
        self._on_close = on_close
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._run, args=(src, dst), name="relay", daemon=True).start()

    def _run(self, src: socket.socket, dst: socket.socket) -> None:
        _pump(src, dst)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.close()
            self._on_close(self)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family, backlog=1024)
