"""Shared memory for clients on the server's host: Arrow IPC through POSIX shm regions.

In the spirit of Triton's system shared-memory extension, but what lies in the regions is
Arrow IPC, so neither side encodes anything and the server reads requests in place.

Control channel
    A Flight ``do_exchange`` on descriptor path ``["arrowinfer.shm"]``, open for as long as
    the client uses shared memory (its *session*). Both ways it carries metadata-only
    messages, one JSON object each in ``app_metadata``. Every request gets one reply, in
    request order; requests may be pipelined. Operations:

    - ``{"op": "register", "name": N, "size": S}``: map ``/dev/shm/N`` (S bytes, read-write)
      for this session -> ``{"registered": N}``.
    - ``{"op": "unregister", "name": N}`` -> ``{"unregistered": N}``.
    - ``{"op": "infer", "model": M, "version": V?, "input": {"region", "offset", "length"},
      "output": {"region", "offset", "size"}}``: the input slice holds an Arrow IPC stream
      (schema + one record batch) -> ``{"output": {"region", "offset", "length"},
      "queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns"}``: the
      result's IPC stream now lies at that place in the output region.

    A failed operation is answered ``{"error": {...}}`` (``errors.error_to_dict``), and the
    session goes on. A result that does not fit the output slice is answered with an
    ``InvalidInput`` error and ``"needed": bytes``, so that the client can offer a bigger
    region and ask again. Any request may carry an ``"id"``, echoed in its reply. When the
    server stops it writes ``{"goaway": reason}`` after the replies of the requests it has
    read, as on inference streams.

Data
    The request's IPC stream is read from the input region with ``pread`` (one copy into
    the server), and the result is written once into the client's output region with
    ``pwrite``. Regions are never mapped: a client that shrinks its file (``ftruncate``)
    under a mapping would kill the server with ``SIGBUS``; a short read fails that
    request alone.

Safety
    The server reaches only memory the client can reach itself. It learns the peer's uid
    from the kernel (``_peers.py``: ``/proc/net/tcp`` for loopback TCP; for a Unix socket
    that only the server's user can reach, the server's uid) and registers only regions
    that are regular files of that uid with mode 0600, checked on the open file. Names
    are plain file names in ``/dev/shm`` (no path separator, no leading dot); symlinks,
    regions smaller than their registered size, and offsets or lengths outside a region
    are refused: each an ``InvalidInput`` on that request alone. A session's regions are
    its own; when its stream ends or breaks (the client is gone), every one of them is
    closed. Sessions are accepted from clients on this host only (a loopback or
    Unix-socket peer) unless the server was started with ``allow_client_shm=True``
    (``arrowinfer serve --allow-client-shm``), for clients that share this host's
    ``/dev/shm`` over another network path (containers of one pod, say): the server
    cannot tell those clients' uids, and lets them use the private files of its own user
    (run it as a user of its own).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyarrow import flight

from .._ipc import SchemaCache
from ..batching import Completed
from ..errors import (
    ArrowInferError,
    InvalidInput,
    RequestError,
    ServerUnavailable,
    error_to_dict,
    to_flight,
)
from ..protocol import SERVER_TIMES, SHM_DESCRIPTOR, parse_json, peer_is_local
from ._core import InferenceCore, unexpected
from ._ordered import OrderedReplies, Reply, read_chunks
from ._peers import peer_uid
from ._regions import OutputTooSmall, Region, check_integer, read_request

__all__ = [
    "SHM_ACTIONS",
    "SHM_DESCRIPTOR",
    "SHM_STATUS",
    "ShmService",
    "check_peer",
]

log = logging.getLogger(__name__)

#: The Flight action that reports on the sessions.
SHM_STATUS = "shm.status"

#: The actions of this service, with their descriptions.
SHM_ACTIONS = {
    SHM_STATUS: "Shared-memory sessions and mapped regions -> {sessions, regions, bytes}"
}

#: Regions one session may have registered at once.
MAX_REGIONS = 4096

#: Bytes of IPC framing (schema message, padding) allowed beyond a request's data.
_IPC_FRAMING = 1 << 20


def check_peer(peer: str, allow_remote: bool) -> None:
    """Refuse a shared-memory session from a peer that is not on this host.

    Raises
    ------
    RequestError
        Unless ``allow_remote`` or :func:`arrowinfer.protocol.peer_is_local`.
    """
    if not allow_remote and not peer_is_local(peer):
        raise RequestError(
            f"shared memory is only for clients on the server's host, and {peer} is not "
            "(start the server with allow_client_shm=True / --allow-client-shm to accept it)"
        )


@dataclass
class _Infer:
    """A request in flight: its result goes to ``output`` once ``future`` completes."""

    future: Future[Completed]
    source: Region
    output: Region
    offset: int
    size: int
    id: Any
    nbytes: int = 0  # the request's data: what the stream's back-pressure counts


class _Session:
    """One client's control stream and the regions it registered."""

    def __init__(self, peer: str, uid: int, replies: OrderedReplies):
        self.peer = peer
        self.uid = uid  # regions must be files of this user
        self.regions: dict[str, Region] = {}
        self.replies = replies
        self.schemas = SchemaCache()
        self.lock = threading.Lock()

    def region(self, name: Any) -> Region:
        with self.lock:
            region = self.regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise InvalidInput(
                f"shared-memory region {name!r} is not registered in this session",
                expected=sorted(self.regions) or "a registered region",
                got=repr(name),
            )
        return region


class ShmService:
    """The server side of shared-memory sessions, over one :class:`InferenceCore`.

    Parameters
    ----------
    core
        The models to serve.
    allow_remote
        Accept sessions from peers that are not on this host's loopback or a Unix socket.
    """

    def __init__(self, core: InferenceCore, *, allow_remote: bool = False):
        self.core = core
        self.allow_remote = allow_remote
        #: Where the server listens, to learn a peer's uid (set by the server once bound).
        self.server_port: int | None = None
        self.unix_socket: str | None = None
        #: Test hook: called with each request batch and its input region, before it runs.
        self.on_request: Callable[[pa.RecordBatch, Region], None] | None = None
        self._sessions: set[_Session] = set()
        self._closed: list[Region] = []  # closed, but arrays still keep them mapped
        self._lock = threading.Lock()
        self._draining = False

    # -- state ---------------------------------------------------------------------------

    def mapped(self) -> int:
        """How many regions are mapped now, over all sessions."""
        with self._lock:
            sessions = list(self._sessions)
            self._closed = [r for r in self._closed if not r.unmapped()]
            lingering = len(self._closed)
        return lingering + sum(len(s.regions) for s in sessions)

    def status(self) -> dict[str, Any]:
        """Sessions, mapped regions and their bytes (the ``shm.status`` action)."""
        with self._lock:
            sessions = list(self._sessions)
        regions = [r for s in sessions for r in list(s.regions.values())]
        return {
            "sessions": len(sessions),
            "regions": self.mapped(),
            "bytes": sum(r.size for r in regions),
            "allow_remote": self.allow_remote,
        }

    def drain(self) -> None:
        """Refuse new sessions; ask every open one to finish (``{"goaway": ...}``)."""
        with self._lock:
            self._draining = True
            sessions = list(self._sessions)
        for session in sessions:
            session.replies.goaway()

    def close(self) -> None:
        """Unmap every region of every session (the server is stopping)."""
        with self._lock:
            self._draining = True
            sessions, self._sessions = list(self._sessions), set()
        for session in sessions:
            self._close_regions(session)

    def _close_regions(self, session: _Session) -> None:
        with session.lock:
            regions, session.regions = list(session.regions.values()), {}
        lingering = [r for r in regions if not r.close()]
        if lingering:
            with self._lock:
                self._closed.extend(lingering)

    # -- the session ---------------------------------------------------------------------

    def session(
        self,
        context: Any,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        """Serve one control stream until the client ends it or goes away."""
        peer = context.peer()
        try:
            check_peer(peer, self.allow_remote)
            uid = self._uid(peer)
        except ArrowInferError as err:
            raise to_flight(err) from None
        replies = OrderedReplies(writer, self._reply, name="shm-writer")
        session = _Session(peer, uid, replies)
        with self._lock:
            if self._draining:
                raise to_flight(ServerUnavailable("the server is shutting down"))
            self._sessions.add(session)
        replies.start()
        try:
            for chunk in read_chunks(reader):
                # nothing of this session pending: an infer runs in this thread if an
                # instance is idle, and its reply is written from here (no hand-offs)
                inline = replies.idle
                item = self._handle(session, chunk, inline=inline)
                size = item.nbytes if isinstance(item, _Infer) else 0
                ready = item.future if isinstance(item, _Infer) else None
                if inline and (ready is None or ready.done()):
                    replies.write_now(item, size)
                else:
                    replies.put(item, size, ready=ready)
                del item, ready  # hold no region while reading the next request
                if replies.failure is not None:
                    break
        except (pa.ArrowException, OSError) as err:  # the client went away
            log.debug("shm session of %s broke: %s", peer, err)
        finally:
            replies.close()
            with self._lock:
                self._sessions.discard(session)
            self._close_regions(session)
            log.debug("shm session of %s ended", peer)

    def _uid(self, peer: str) -> int:
        """The peer's uid; with ``allow_remote``, the server's own for a peer it cannot tell.

        Raises
        ------
        Unauthenticated
            A local peer whose uid the kernel does not tell.
        """
        try:
            return peer_uid(peer, server_port=self.server_port, unix_socket=self.unix_socket)
        except ArrowInferError:
            if not self.allow_remote:
                raise
            # --allow-client-shm trusts the network: such clients may use this user's
            # private files in /dev/shm (run the server as a user of its own)
            return os.geteuid()

    def _handle(
        self, session: _Session, chunk: flight.FlightStreamChunk, *, inline: bool = False
    ) -> Any:
        """One request: its reply, or an :class:`_Infer` whose reply comes later.

        ``inline``: an infer may run in this thread (:meth:`InferenceCore.submit`).
        """
        request: dict[str, Any] = {}
        try:
            if chunk.data is not None:
                raise InvalidInput("a shared-memory session carries metadata-only messages")
            request = parse_json(chunk.app_metadata, "a shared-memory request")
            op = request.get("op")
            if op == "infer":
                return self._infer(session, request, inline=inline)
            if op == "register":
                if len(session.regions) >= MAX_REGIONS:
                    raise InvalidInput(f"a session may register at most {MAX_REGIONS} regions")
                region = Region(request.get("name"), request.get("size"), session.uid)
                with session.lock:
                    known = region.name in session.regions
                    if not known:
                        session.regions[region.name] = region
                if known:
                    region.close()
                    raise InvalidInput(f"shared-memory region {region.name!r} is registered")
                reply: dict[str, Any] = {"registered": region.name}
            elif op == "unregister":
                name = request.get("name")
                region = session.region(name)
                with session.lock:
                    session.regions.pop(region.name, None)
                if not region.close():
                    with self._lock:
                        self._closed.append(region)
                reply = {"unregistered": region.name}
            else:
                raise InvalidInput(
                    "unknown shared-memory operation",
                    expected="register, unregister or infer",
                    got=repr(op),
                )
        except ArrowInferError as err:
            reply = {"error": error_to_dict(err)}
        except Exception as err:  # noqa: BLE001 -- this request fails; the session goes on
            reply = {"error": error_to_dict(unexpected(err, "shm request"))}
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _infer(self, session: _Session, request: dict[str, Any], *, inline: bool) -> _Infer:
        model = self.core.get(_text(request, "model"), request.get("version"))
        source = _place(request, "input")
        target = _place(request, "output")
        input_region = session.region(source.get("region"))
        output = session.region(target.get("region"))
        offset, size = output.check(
            target.get("offset", 0), target.get("size"), "output", minimum=0
        )
        start, length = input_region.check(source.get("offset", 0), source.get("length"), "input")
        if length > model.max_request_bytes + _IPC_FRAMING:
            raise InvalidInput(
                "the request is too large (max_request_bytes)",
                model=model.version.name,
                expected=f"<= {model.max_request_bytes} bytes of data",
                got=f"{length} bytes of IPC stream",
            )
        view = input_region.read(start, length)
        batch = read_request(view, session.schemas, max_bytes=model.max_request_bytes)
        del view
        if self.on_request is not None:
            self.on_request(batch, input_region)
        input_region.acquire()
        output.acquire()
        try:
            future = self.core.submit(
                model,
                batch,
                draining=True,
                priority=check_integer(request.get("priority", 0), "the priority"),
                timeout_us=check_integer(request.get("timeout", 0), "the timeout"),
                inline=inline,
            )
        except BaseException:
            self._release(input_region, output)
            raise
        nbytes = batch.get_total_buffer_size()
        return _Infer(future, input_region, output, offset, size, request.get("id"), nbytes)

    def _release(self, *regions: Region) -> None:
        for region in regions:
            region.release()

    def _finish(self, item: _Infer) -> dict[str, Any]:
        """Wait for a request's result, write it into its output region; the reply."""
        reply: dict[str, Any] = {}
        try:
            done = item.future.result()
            length = item.output.write_result(item.offset, item.size, done.batch)
        except OutputTooSmall as err:
            # it travels as InvalidInput (with expected/got); "needed" tells the client to
            # offer a bigger region
            reply = {"error": error_to_dict(err), "needed": err.needed}
        except ArrowInferError as err:
            reply = {"error": error_to_dict(err)}
        except Exception as err:  # noqa: BLE001 -- its text may hold server internals
            reply = {"error": error_to_dict(unexpected(err, "shm request"))}
        else:
            reply = {
                "output": {"region": item.output.name, "offset": item.offset, "length": length},
                **{key: getattr(done, key) for key in SERVER_TIMES},
                **done.metadata,  # provenance, truncation
            }
            del done
        finally:
            self._release(item.source, item.output)
        if item.id is not None:
            reply["id"] = item.id
        return reply

    def _reply(self, item: dict[str, Any] | _Infer) -> Reply:
        """The metadata-only reply of a request (an infer's once its result is written)."""
        return None, self._finish(item) if isinstance(item, _Infer) else item


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"a shared-memory request needs {key!r}", got=repr(value))
    return value


def _place(request: dict[str, Any], key: str) -> dict[str, Any]:
    value = request.get(key)
    if not isinstance(value, dict):
        raise InvalidInput(
            f"an infer request needs {key!r}: {{region, offset, ...}}", got=repr(value)
        )
    return value
