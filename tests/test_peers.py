"""The peer's uid from the kernel, and who may use a shared-memory file (server/_peers.py).

Real sockets on loopback; the other user is a child process that drops to ``nobody``
(the tests run as root, so they are skipped where they cannot change user).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from arrowinfer.errors import InvalidInput, Unauthenticated
from arrowinfer.server._peers import open_region, peer_uid, proc_socket_owner

OTHER_UID = 65534  # nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")


def _connect_as(uid: int, port: int, family: int = socket.AF_INET) -> tuple[int, int, int]:
    """A child of ``uid`` connected to ``port``: its pid, its local port, and a pipe to end it."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: another user, one connection, wait to be told to go
        try:
            "x".encode("idna")  # loaded now: the other user may not read the codec's file
            os.setuid(uid)
            host = "127.0.0.1" if family == socket.AF_INET else "::1"
            conn = socket.create_connection((host, port))
            os.write(ready_w, conn.getsockname()[1].to_bytes(4, "little"))
            os.read(done_r, 1)
        except BaseException as err:  # noqa: BLE001 -- the child reports any failure, then exits
            os.write(2, f"child: {err!r}\n".encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    got = os.read(ready_r, 4)
    os.close(ready_r)
    assert len(got) == 4, "the child could not connect"
    local = int.from_bytes(got, "little")
    return pid, local, done_w


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, int]]:
    family = request.param
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    sock.listen()
    yield sock, family
    sock.close()


@needs_root
def test_peer_uid_is_the_socket_owner_over_loopback(listener: tuple[socket.socket, int]) -> None:
    sock, family = listener
    port = sock.getsockname()[1]
    for uid in (OTHER_UID, os.geteuid()):
        pid, local, done = _connect_as(uid, port, family)
        try:
            conn, _ = sock.accept()
            kind = "ipv4:127.0.0.1" if family == socket.AF_INET else "ipv6:[::1]"
            assert peer_uid(f"{kind}:{local}", server_port=port) == uid
            assert proc_socket_owner(conn.getpeername()[0], local, server_port=port) == uid
            # the same client port towards another server port is not this connection
            assert proc_socket_owner(conn.getpeername()[0], local, server_port=port + 1) is None
            conn.close()
        finally:
            os.write(done, b"x")
            os.close(done)
            os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "peer", ["ipv4:10.1.2.3:5000", "ipv4:127.0.0.1:1", "garbage", "ipv6:[zz]:1", "unix:"]
)
def test_unknown_or_remote_peers_have_no_uid(peer: str) -> None:
    with pytest.raises(Unauthenticated):
        peer_uid(peer, server_port=1)


def test_unix_socket_peer_is_the_server_user_only_when_private(tmp_path: Path) -> None:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    path = folder / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        os.chmod(path, 0o600)
        assert peer_uid("unix:", unix_socket=str(path)) == os.geteuid()
        os.chmod(path, 0o666)  # anyone may connect: the peer could be anyone
        with pytest.raises(Unauthenticated):
            peer_uid("unix:", unix_socket=str(path))
        os.chmod(path, 0o600)
        os.chmod(folder, 0o777)  # anyone may replace the socket
        with pytest.raises(Unauthenticated):
            peer_uid("unix:", unix_socket=str(path))
    finally:
        sock.close()


def _region(folder: Path, name: str, mode: int, uid: int | None = None) -> Path:
    path = folder / name
    path.write_bytes(b"\0" * 64)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)
    return path


def test_only_own_private_regular_files_open(tmp_path: Path) -> None:
    me = os.geteuid()
    _region(tmp_path, "mine", 0o600)
    fd, info = open_region("mine", me, folder=str(tmp_path))
    os.close(fd)
    assert stat.S_ISREG(info.st_mode)
    assert info.st_size == 64
    _region(tmp_path, "readable", 0o644)
    _region(tmp_path, "group", 0o660)
    os.symlink(tmp_path / "mine", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo", 0o600)
    for name in ("readable", "group", "link", "fifo", "missing"):
        with pytest.raises(InvalidInput):
            open_region(name, me, folder=str(tmp_path))
    # a file of root, asked for by another user: refused, and the message names no owner
    with pytest.raises(InvalidInput) as caught:
        open_region("mine", OTHER_UID, folder=str(tmp_path))
    assert "root" not in str(caught.value)
    if me == 0:
        _region(tmp_path, "theirs", 0o600, OTHER_UID)
        fd, _ = open_region("theirs", OTHER_UID, folder=str(tmp_path))
        os.close(fd)
        with pytest.raises(InvalidInput):
            open_region("theirs", me, folder=str(tmp_path))
