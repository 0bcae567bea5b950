"""Who is the peer of a call, and may it use a shared-memory file? (Local clients only.)

A client of a shared-memory protocol names a file in ``/dev/shm`` that the server then
reads and writes. The server must never reach memory the client could not reach itself,
so it learns the peer's uid and accepts only files that uid owns, mode 0600:

- **TCP over loopback**: the peer's socket is in ``/proc/net/tcp`` (or ``tcp6``), keyed by
  its address and port, with the uid that owns it. The kernel fills that table, so a
  client cannot lie about it; matching the server's own port as well picks the one
  connection even when the client's port is reused towards other servers.
- **Unix sockets**: gRPC Python does not expose the accepted socket (so no
  ``SO_PEERCRED``). The server instead proves who *can* connect: a socket file owned by
  the server's uid, in a directory that only that uid can write, with no group or other
  write bits, admits only that uid (and root, which can read any file anyway); the peer is
  then taken to be the server's uid.
- Anything else (a remote peer, a socket file others can write): no uid; shared memory is
  refused.

This module knows nothing of any shared-memory protocol: arrowinfer's own Arrow IPC
sessions and Triton's system shared-memory extension both use it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import urllib.parse
from typing import Any

from ..errors import InvalidInput, Unauthenticated

__all__ = ["SHM_DIR", "check_region_owner", "open_region", "peer_uid", "proc_socket_owner"]

#: Where POSIX shared memory lives on Linux; regions are files here.
SHM_DIR = "/dev/shm"

_TCP_ESTABLISHED = "01"


def _address(peer: str) -> tuple[str, Any, int] | None:
    """``(kind, address or path, port)`` of a gRPC peer string, None if not understood.

    Peers look like ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``ipv6:%5B::1%5D:5000``
    or ``unix:/path`` (``port`` 0).
    """
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return kind, rest, 0
    rest = urllib.parse.unquote(rest)
    try:
        if kind == "ipv6" and rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        elif kind in ("ipv4", "ipv6"):
            host, _, port = rest.rpartition(":")
        else:
            return None
        address = ipaddress.ip_address(host.split("%", 1)[0])
        return kind, address, int(port)
    except ValueError:
        return None


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    """An IPv4-mapped IPv6 address as its IPv4 address; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _proc_address(text: str) -> tuple[Any, int]:
    """An ``ADDR:PORT`` of ``/proc/net/tcp{,6}``: the address in host byte order words."""
    hex_address, hex_port = text.split(":")
    raw = bytes.fromhex(hex_address)
    # the kernel prints each 32-bit word in host byte order (little-endian here)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ipaddress.IPv4Address(words), int(hex_port, 16)
    return _plain(ipaddress.IPv6Address(words)), int(hex_port, 16)


def proc_socket_owner(
    address: Any, port: int, *, server_port: int | None = None, proc: str = "/proc/net"
) -> int | None:
    """The uid owning the established TCP socket bound to ``address:port``, or None.

    ``address`` is an ``ipaddress`` address or its text; ``server_port``, when given, must
    be that socket's remote port (the server's).
    """
    want = _plain(ipaddress.ip_address(address))
    for table in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, table), encoding="ascii") as lines:
                next(lines, None)
                for line in lines:
                    parts = line.split()
                    if len(parts) < 8 or parts[3] != _TCP_ESTABLISHED:
                        continue
                    local, remote = _proc_address(parts[1]), _proc_address(parts[2])
                    if local != (want, port):
                        continue
                    if server_port is not None and remote[1] != server_port:
                        continue
                    return int(parts[7])
        except FileNotFoundError:
            continue
    return None


def _unix_socket_uid(path: str) -> int | None:
    """The server's uid when only it (and root) can connect to the socket at ``path``."""
    try:
        info = os.stat(path)
        folder = os.stat(os.path.dirname(os.path.abspath(path)) or "/")
    except OSError:
        return None
    me = os.geteuid()
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != me or info.st_mode & 0o022:
        return None
    sticky = folder.st_mode & stat.S_ISVTX
    # a folder others can write lets them replace the socket (unless sticky, as /tmp is)
    if folder.st_mode & 0o022 and not (sticky and folder.st_uid in (0, me)):
        return None
    return me


def peer_uid(peer: str, *, server_port: int | None = None, unix_socket: str | None = None) -> int:
    """The uid of the local process at the other end of a gRPC call (``context.peer()``).

    Parameters
    ----------
    peer
        The gRPC peer string.
    server_port
        The TCP port the server listens on (to pick the one connection).
    unix_socket
        The path of the Unix socket the server listens on, for Unix-socket peers.

    Raises
    ------
    Unauthenticated
        The peer is not a local process whose uid the kernel can tell.
    """
    parsed = _address(peer)
    uid: int | None = None
    if parsed is not None:
        kind, address, port = parsed
        if kind.startswith("unix"):
            uid = _unix_socket_uid(unix_socket) if unix_socket else None
        elif _plain(address).is_loopback:
            uid = proc_socket_owner(address, port, server_port=server_port)
    if uid is None:
        raise Unauthenticated(
            "shared memory needs a client on this host whose user the server can tell "
            "(loopback TCP, or a Unix socket only the server's user can reach)"
        )
    return uid


def check_region_owner(fd: int, name: str, uid: int) -> os.stat_result:
    """Refuse a region file unless it is a regular file of ``uid`` with mode 0600 (or less).

    Returns its ``fstat``. Checked on the open file itself, so a rename or symlink swap
    after the check changes nothing.

    Raises
    ------
    InvalidInput
        Not a regular file, another owner, or group/other permission bits set. The
        message never says whose the file is.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput(f"shared-memory region {name!r} is not a regular file")
    if info.st_uid != uid or info.st_mode & 0o077:
        raise InvalidInput(
            f"shared-memory region {name!r} is not a file of the client's own user with "
            "mode 0600; the server only uses memory the client itself owns"
        )
    return info


def open_region(name: str, uid: int, *, folder: str = SHM_DIR) -> tuple[int, os.stat_result]:
    """Open the plain-named region file ``folder/name`` read-write for peer ``uid``.

    The name must already be checked to be a plain file name. Returns the file descriptor
    (close it) and its ``fstat``.

    Raises
    ------
    InvalidInput
        Missing, not openable, a symlink, or refused by :func:`check_region_owner`.
    """
    path = os.path.join(folder, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidInput(f"no shared-memory region {name!r} in {folder}") from None
    except OSError as err:
        raise InvalidInput(f"cannot open shared-memory region {name!r}: {err.strerror}") from None
    try:
        return fd, check_region_owner(fd, name, uid)
    except BaseException:
        os.close(fd)
        raise
