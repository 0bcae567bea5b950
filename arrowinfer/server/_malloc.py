"""glibc's malloc, told to keep the memory a server frees for its next request.

By default glibc serves a large allocation (128 KiB at first, up to 32 MiB as it adapts)
with a fresh ``mmap`` and returns it with ``munmap`` when freed, and gives the top of its
heap back to the system once more than twice that threshold lies free there. A server that
receives one large body after another (the bytes uvicorn and gRPC hand over, the arrays
numpy and onnxruntime make) then faults the pages of its requests in anew: until glibc's
threshold has adapted, or for good when its buffers are freed at the top of the heap.

Measured on this project's 2-core VM (sixth session, ``benchmarks/results/performance.md``):

- a fresh KServe HTTP server: ~1,100 minor page faults per 4 MB request with glibc's
  defaults, ~1 with these thresholds (``tests/test_malloc.py``);
- ``arrowinfer bench``'s client against two fresh servers, interleaved: server CPU per 4 MB
  request 6.1-6.5 -> 4.6-5.5 ms, per 32 MB request 54-65 -> 46 ms; a minute later the
  default server had adapted and both cost the same (4.3-4.4 ms, 43 ms);
- the floor server of ``benchmarks/http_floor.py`` never adapts at 256 KB (its buffers are
  trimmed from the heap's top): 714-804 -> 478-536 us per request, a third of its CPU;
- in the full benchmark run no KServe HTTP cell's server CPU moved beyond the run-to-run
  noise, and the memory a server takes for 32 MB requests was no higher (target 5: peak
  minus idle RSS, 2.63 requests' worth, 4.29 in the fifth session's run).

:func:`keep_freed_memory` sets two thresholds with ``mallopt``: the largest
allocation glibc takes from its heap instead of ``mmap`` (the most glibc allows:
``HEAP_MAX_SIZE / 2``, 32 MiB on 64-bit), and the free memory it keeps at the top of a heap.
The cost is memory: what the largest requests in flight at once needed stays mapped, in
each arena; so it also caps the arenas (:data:`ARENA_MAX`).
``arrowinfer serve`` calls it at start (the process is the server's); a program that only
embeds :class:`~arrowinfer.server.Server` keeps its own allocator settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["ARENA_MAX", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Allocations up to this size come from the heap (glibc refuses more on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory up to this size stays at the top of a heap for the next allocations.
TRIM_THRESHOLD = 256 << 20

#: The most malloc arenas (glibc's default: 8 per core). Each arena keeps up to
#: TRIM_THRESHOLD free, and every thread that allocates while the others' arenas are busy
#: makes one: an attack's 48 Flight streams, a thread each, left 6 GB after they closed,
#: growing run after run (eleventh session). With a few arenas what is kept is bounded.
ARENA_MAX = 4


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module's text); False where the C
    library is not glibc (or refuses them), which is no error: nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = all(
        mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    log.debug("glibc malloc thresholds %s", "set" if done else "not set")
    return done
