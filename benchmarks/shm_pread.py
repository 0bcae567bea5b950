"""What reading and writing shared-memory regions with pread/pwrite costs, against a mapping.

``python benchmarks/shm_pread.py`` writes ``benchmarks/results/shm_pread.md``.

The server no longer maps client regions (a client's ``ftruncate`` under a mapping kills
the server with ``SIGBUS``): it reads a request with ``pread`` into its own memory and
writes a result with ``pwrite``. This measures both against the zero-copy view of a
mapping they replace, on the server's own ``Region`` class, at 4 KB, 4 MB and 32 MB.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrowinfer import tensors
from arrowinfer.bench.harness import median_us
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.server._regions import Region

RESULTS = Path(__file__).resolve().parent / "results" / "shm_pread.md"


def main() -> None:
    rows = []
    for size in (4 << 10, 4 << 20, 32 << 20):
        name = f"arrowinfer-bench-{os.getpid()}"
        path = f"/dev/shm/{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 2 * size + (1 << 20))
            memory = mmap.mmap(fd, 2 * size + (1 << 20))
            memory[:size] = os.urandom(size)
            region = Region(name, 2 * size + (1 << 20), os.geteuid())
            repeat = 2000 if size < (1 << 20) else 50
            mapped = median_us(lambda m=memory, n=size: pa.py_buffer(m).slice(0, n), repeat)
            read = median_us(lambda r=region, n=size: r.read(0, n), repeat)
            values = np.frombuffer(memory, np.float32, size // 4).reshape(
                -1, 1024 if size >= 4096 else 1
            )
            batch = pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["OUTPUT0"])
            write = median_us(
                lambda r=region, n=size, b=batch: r.write_result(n, n + (1 << 20), b), repeat
            )
            rows.append(
                f"| {size / 1e6:.3f} | {mapped:.1f} | {read:.1f} | {size / read / 1e3:.2f} "
                f"| {write:.1f} |"
            )
            region.close()
            del values, batch
            memory.close()
        finally:
            os.close(fd)
            os.unlink(path)
    lines = [
        "# Shared-memory regions: pread/pwrite instead of a mapping",
        "",
        (
            "`python benchmarks/shm_pread.py`. Median µs per call on the server's `Region`. "
            "*mapped*: the zero-copy view the server used before (no copy at all); *pread*: "
            "the copy of a request into the server now; *write result*: encoding a result "
            "batch as IPC and `pwrite` into the client's region (the mapping also copied it "
            "once, so the extra cost is one staging copy)."
        ),
        "",
        "| MB | mapped view µs | pread µs | pread GB/s | write result µs |",
        "|---:|---:|---:|---:|---:|",
        *rows,
        "",
        markdown(describe()),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
