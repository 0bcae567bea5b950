"""glibc's malloc thresholds (arrowinfer.server._malloc): a server's freed memory is
reused by its next request, not given back and faulted in anew.

A real KServe HTTP server in a child process (the settings are the process's), once with
glibc's defaults and once with :func:`keep_freed_memory`, each sent the same 4 MB requests;
the child's minor page faults are read from /proc.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th

from arrowinfer.examples import write_example_repository

WAIT = 60.0

_SERVER = """
import sys
from arrowinfer.server import Server
from arrowinfer.server._malloc import keep_freed_memory
if sys.argv[2] == "kept":
    assert keep_freed_memory()
with Server(sys.argv[1], port=0, kserve_port=None, http_port=0, metrics_port=None) as server:
    print(server.http_port, flush=True)
    sys.stdin.read()  # until the test closes it
"""


def _faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _faults_per_request(repository: Path, mode: str) -> float:
    args = [sys.executable, "-c", _SERVER, str(repository), mode]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            values = np.ones((1024, 1024), np.float32)  # 4 MiB
            tensor = th.InferInput("INPUT0", list(values.shape), "FP32")
            tensor.set_data_from_numpy(values)
            client = th.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=WAIT)
            try:
                for _ in range(5):  # warm: the buffers of a request exist once
                    client.infer("identity", [tensor])
                before = _faults(child.pid)
                for _ in range(20):
                    client.infer("identity", [tensor])
                return (_faults(child.pid) - before) / 20
            finally:
                client.close()
        finally:
            child.communicate("", timeout=WAIT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")
def test_a_servers_freed_memory_is_reused_not_faulted_in_again(tmp_path: Path) -> None:
    repository = write_example_repository(tmp_path, models=["identity"])
    plain = _faults_per_request(repository, "plain")
    kept = _faults_per_request(repository, "kept")
    # A 4 MiB buffer is 1,024 pages. With glibc's defaults: ~1,100 faults per request with
    # this project's dependencies, ~6 with the oldest versions it supports (test-min),
    # whose buffers happen to stay below glibc's thresholds.
    assert kept < 50, (kept, plain)


_ARENAS = """
import ctypes, ctypes.util, re, sys, tempfile, threading
from arrowinfer.server._malloc import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
start = threading.Barrier(32)

def churn():  # all at once: a thread that finds every arena busy makes another
    start.wait()
    for _ in range(2000):
        libc.free(libc.malloc(64 << 10))

threads = [threading.Thread(target=churn) for _ in range(32)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.NamedTemporaryFile() as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(len(re.findall(rb'<heap nr="', open(out.name, "rb").read())))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_arenas_are_few() -> None:
    """Each malloc arena keeps up to TRIM_THRESHOLD free; glibc makes up to 8 per core, one
    for each thread that finds the others busy (a thread per Flight stream: an attack's
    streams left gigabytes kept). With keep_freed_memory there are at most ARENA_MAX."""
    from arrowinfer.server._malloc import ARENA_MAX

    def arenas(mode: str) -> int:
        args = [sys.executable, "-c", _ARENAS, mode]
        return int(subprocess.run(args, check=True, capture_output=True, timeout=WAIT).stdout)

    assert arenas("kept") <= ARENA_MAX
