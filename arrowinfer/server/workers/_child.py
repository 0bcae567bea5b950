"""The worker process: one whole :class:`~arrowinfer.server.Server` on a private listener.

Started by the pool as ``python -c`` with :data:`COMMAND`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading

from ...errors import ArrowInferError
from .._server import Server

__all__ = ["COMMAND", "main"]

log = logging.getLogger(__name__)

#: How the pool starts a worker (not ``-m``: running a package module imports it twice).
COMMAND = "import sys; from arrowinfer.server.workers._child import main; sys.exit(main())"


def main() -> int:
    """A worker: its settings come as one JSON line on stdin; it answers its address on stdout.

    It stops on SIGTERM/SIGINT, and when its stdin closes (the parent is gone); a second
    signal (or the parent gone while stopping) exits at once.
    """
    config = json.loads(sys.stdin.readline())
    index = config["index"]
    logging.basicConfig(
        level=config["log_level"],
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    listen = config["listen"]
    try:
        server = Server(
            config["repository"],
            host="127.0.0.1",
            port=listen.get("port", 0),
            unix_socket=listen.get("unix_socket"),
            kserve_port=listen["kserve_port"],
            http_port=None,  # KServe HTTP is not relayed to workers (yet)
            metrics_port=None,
            # see the package docstring: without it, refuse shm sessions from everyone
            shared_memory=config["shm"],
            **config["options"],
        )
    except ArrowInferError as err:
        log.error("%s: %s", type(err).__name__, err)
        return 1

    stopping = threading.Event()

    def stop(reason: str) -> None:
        if stopping.is_set():
            log.warning("%s again: exiting without waiting for open streams", reason)
            os._exit(1)
        stopping.set()
        log.info("%s: finishing requests in flight, then stopping", reason)
        threading.Thread(target=server.stop, name="shutdown").start()

    def on_signal(signum: int, frame: object) -> None:
        stop(signal.Signals(signum).name)

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns when the parent closes our stdin or dies
        stop("parent gone")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    answer = {"location": server.location, "kserve_port": server.kserve_port, "pid": os.getpid()}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    server.wait()
    if not server.clean:  # a stream outlived the exit timeout: don't wait for it at exit
        log.warning("exiting with streams still open (exit timeout)")
        logging.shutdown()
        os._exit(0)
    return 0
