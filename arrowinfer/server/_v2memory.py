"""Triton's system shared-memory extension, for the KServe v2 front ends (gRPC and HTTP).

A client creates a POSIX shared-memory object (``shm_open(key)``, i.e. ``/dev/shm/KEY``),
registers a window of it under a name (``key``, ``offset``, ``byte_size``), and then names
that region, an offset and a byte size in an inference request instead of sending a
tensor's bytes; an output named so is written into the region instead of the response.
This is what ``tritonclient.utils.shared_memory`` and CMSSW's SonicTriton do.

Rules (the same as arrowinfer's own shared memory, for requests that are not trusted):

- A peer on this host's loopback is identified by its user id, read from the kernel's
  table of TCP sockets (:func:`._peers.peer_uid`): it may register only shared-memory
  files of its own user with mode 0600 (:func:`._peers.open_region`), and use, list and
  unregister only the regions its user registered. A peer whose user cannot be found is
  refused (UNAUTHENTICATED, HTTP 401).
- A peer that is not on loopback is refused unless the server was started with
  ``allow_client_shm`` (``--allow-client-shm``; for containers that share ``/dev/shm``):
  then it may register files of the server's own user (mode 0600), and all such peers
  share one owner.
- Keys are plain names in ``/dev/shm`` (``/name``): no path, no symlink (``O_NOFOLLOW``),
  regular files only, the window inside the file when registered.
- Data moves with ``pread``/``pwrite`` on the file, never through a mapping: a client that
  shrinks its file later gets an error on its request (short read), it cannot crash the
  server (a mapping would take ``SIGBUS``). Offsets and sizes outside the registered
  window are refused before any byte moves.
- Each user has its own names: one user cannot take, see or probe another's. A user may
  hold :data:`MAX_REGIONS_PER_USER` regions, the server :func:`max_regions` in all (each
  keeps a file open). Unregistering a region a request is reading or writing closes its
  file once that request is done with it (as Triton defers it), never under it.
- Unregistering a name that is not registered succeeds, as in Triton (clean-up code
  unregisters what it may not have registered).
- CUDA shared memory is not supported: registering answers UNIMPLEMENTED (HTTP 501). As on
  a Triton built without GPUs, there are then no CUDA regions: their status is empty (a
  named one is not registered) and unregistering succeeds, so that clients which clean
  up both kinds (tritonclient's own shm examples) run unchanged (:func:`cuda_status`).
"""

from __future__ import annotations

import os
import re
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import InvalidInput, RegionNotFound
from ..protocol import peer_is_local
from ._peers import open_region, peer_uid

__all__ = [
    "CUDA_UNSUPPORTED",
    "MAX_REGIONS_PER_USER",
    "NO_PEER",
    "Peer",
    "SystemRegions",
    "cuda_status",
]

_KEY = re.compile(r"^/?([A-Za-z0-9_][A-Za-z0-9_.\-]{0,254})$")

CUDA_UNSUPPORTED = (
    "CUDA shared memory is not supported by this server; use system shared memory "
    "(register_system_shared_memory) or send the tensors in the request"
)


def cuda_status(name: str | None) -> list[dict[str, Any]]:
    """The CUDA shared-memory regions: none (no name), else ``name`` is not registered.

    Raises
    ------
    RegionNotFound
        A ``name`` given: no CUDA region is ever registered.
    """
    if name:
        raise RegionNotFound(f"CUDA shared memory: no region {name!r} is registered")
    return []


class Peer(NamedTuple):
    """A KServe client: gRPC's peer string (``ipv4:127.0.0.1:5000``) and the server port."""

    address: str
    server_port: int | None = None


#: No peer known: shared memory is refused to it (unless remote peers are admitted).
NO_PEER = Peer("")

#: Regions one user may have registered at once (each holds an open file).
MAX_REGIONS_PER_USER = 1024


def max_regions() -> int:
    """Regions the server holds at most, all users together: half its open-file limit
    (``RLIMIT_NOFILE``), the rest for connections and models; at least 64."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 16


@dataclass
class _Region:
    name: str
    key: str
    fd: int
    offset: int
    byte_size: int
    owner: int | None  # the registering peer's uid; None: a remote peer (allow_client_shm)
    users: int = 0  # requests reading or writing it now (under SystemRegions._lock)
    unregistered: bool = False  # its file is closed when the last user is done

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


class SystemRegions:
    """The registered system shared-memory regions of one server, for gRPC and HTTP alike.

    Parameters
    ----------
    allow_remote
        Admit peers that are not on this host's loopback (see the module's rules).
    """

    def __init__(self, *, allow_remote: bool = False):
        self.allow_remote = allow_remote
        self.limit = max_regions()
        self._regions: dict[tuple[int | None, str], _Region] = {}  # by (owner, name)
        self._lock = threading.Lock()

    def _owner(self, peer: Peer) -> int | None:
        """Who a peer is, for the regions: its uid, or None for an admitted remote peer.

        Raises
        ------
        InvalidInput
            A remote peer without ``allow_remote``.
        Unauthenticated
            A local peer whose user the kernel cannot tell.
        """
        if not peer.address.startswith("unix") and not peer_is_local(peer.address):
            if not self.allow_remote:
                raise InvalidInput(
                    "system shared memory is served to clients on this host only (the "
                    "server's --allow-client-shm admits others that share its /dev/shm)"
                )
            return None
        return peer_uid(peer.address, server_port=peer.server_port)

    def register(self, peer: Peer, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register ``/dev/shm/KEY``'s bytes ``[offset, offset + byte_size)`` as ``name``.

        Raises
        ------
        InvalidInput
            A name this user registered already, a bad key, a file that is not the peer's
            (or not a regular file, or smaller than the window), a peer not admitted, or
            too many regions (:data:`MAX_REGIONS_PER_USER`, :attr:`limit`).
        """
        owner = self._owner(peer)
        if not name or len(name) > 255:
            raise InvalidInput("system shared memory: a region needs a name (at most 255 chars)")
        match = _KEY.match(key)
        if match is None:
            raise InvalidInput(
                "system shared memory: the key must be a plain shm name like /my_region",
                got=key,
            )
        if offset < 0 or byte_size <= 0:
            raise InvalidInput(
                "system shared memory: offset must be >= 0 and byte_size > 0",
                got={"offset": offset, "byte_size": byte_size},
            )
        self._check_room(owner, name)  # before a file is opened
        # an admitted remote peer may use files of the server's own user only
        fd, info = open_region(match.group(1), os.geteuid() if owner is None else owner)
        try:
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"system shared memory: region {name!r} lies outside {key!r}",
                    expected=f"offset + byte_size <= {info.st_size}",
                    got=offset + byte_size,
                )
            with self._lock:
                self._check_room(owner, name)  # again: another request may have come first
                self._regions[owner, name] = _Region(name, key, fd, offset, byte_size, owner)
        except BaseException:
            os.close(fd)
            raise

    def _check_room(self, owner: int | None, name: str) -> None:
        if (owner, name) in self._regions:
            raise InvalidInput(f"system shared memory: region {name!r} is already registered")
        mine = sum(key[0] == owner for key in self._regions)
        if mine >= MAX_REGIONS_PER_USER or len(self._regions) >= self.limit:
            raise InvalidInput(
                "system shared memory: too many regions registered; unregister some first",
                expected=f"at most {MAX_REGIONS_PER_USER} per user, {self.limit} in all",
                got={"this user's": mine, "all": len(self._regions)},
            )

    def _get(self, owner: int | None, name: str) -> _Region:
        """A region of ``owner``'s (call under the lock)."""
        region = self._regions.get((owner, name))
        if region is None:
            raise RegionNotFound(f"system shared memory: no region {name!r} is registered")
        return region

    def unregister(self, peer: Peer, name: str | None = None) -> None:
        """Unregister one region of the peer's user, or all of them (``name`` None/empty);
        a name not registered is no error (Triton's ``UnregisterHelper``). A region in use
        by a request has its file closed when that request is done with it.

        Raises
        ------
        InvalidInput
            A peer not admitted.
        """
        owner = self._owner(peer)
        with self._lock:
            if name:
                gone = [r] if (r := self._regions.pop((owner, name), None)) else []
            else:
                gone = [r for r in self._regions.values() if r.owner == owner]
                for region in gone:
                    del self._regions[owner, region.name]
            for region in gone:
                region.unregistered = True
            closing = [region.fd for region in gone if not region.users]
        for fd in closing:
            os.close(fd)

    def status(self, peer: Peer, name: str | None = None) -> list[dict[str, Any]]:
        """The peer's user's regions (one when ``name`` is given): name, key, offset, size.

        Raises
        ------
        RegionNotFound
            An unknown ``name``.
        InvalidInput
            A peer not admitted.
        """
        owner = self._owner(peer)
        with self._lock:
            if name:
                return [self._get(owner, name).as_dict()]
            mine = sorted(r.name for r in self._regions.values() if r.owner == owner)
            return [self._regions[owner, n].as_dict() for n in mine]

    def _window(self, owner: int | None, name: str, offset: int, size: int) -> _Region:
        """The region, if ``[offset, offset + size)`` lies inside it (under the lock)."""
        region = self._get(owner, name)
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidInput(
                f"system shared memory: offset and size lie outside region {name!r}",
                expected=f"offset + size <= {region.byte_size}",
                got={"offset": offset, "size": size},
            )
        return region

    @contextmanager
    def _using(self, peer: Peer, name: str, offset: int, size: int) -> Iterator[tuple[int, int]]:
        """The region's file and the file position of ``offset``, held open meanwhile:
        an unregister leaves the file to the last request using it (a file descriptor
        closed under a read could be another file's by then)."""
        owner = self._owner(peer)
        with self._lock:
            region = self._window(owner, name, offset, size)
            region.users += 1
        try:
            yield region.fd, region.offset + offset
        finally:
            with self._lock:
                region.users -= 1
                last = region.unregistered and not region.users
            if last:
                os.close(region.fd)

    def check(self, peer: Peer, name: str, offset: int, size: int) -> None:
        """Refuse a place that is not inside a region of the peer's user (before running).

        Raises
        ------
        RegionNotFound
            An unknown region.
        InvalidInput
            Outside the region.
        """
        owner = self._owner(peer)
        with self._lock:
            self._window(owner, name, offset, size)

    def read(self, peer: Peer, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in a region of the peer's user.

        Raises
        ------
        RegionNotFound
            An unknown region.
        InvalidInput
            Outside the region, or a file shrunk since registration.
        """
        with self._using(peer, name, offset, size) as (fd, position):
            data = os.pread(fd, size, position)
        if len(data) != size:
            raise InvalidInput(
                f"system shared memory: region {name!r} is smaller than when registered"
            )
        return data

    def write(self, peer: Peer, name: str, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` into a region of the peer's user.

        Raises
        ------
        RegionNotFound
            An unknown region.
        InvalidInput
            Outside the region, or a file shrunk since registration.
        """
        view = memoryview(data).cast("B")
        with self._using(peer, name, offset, len(view)) as (fd, start):
            if os.fstat(fd).st_size < start + len(view):
                raise InvalidInput(
                    f"system shared memory: region {name!r} is smaller than when registered"
                )
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], start + done)

    def close(self) -> None:
        """Unregister every region (those in use: when their requests are done)."""
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
            for region in regions:
                region.unregistered = True
            closing = [region.fd for region in regions if not region.users]
        for fd in closing:
            os.close(fd)
