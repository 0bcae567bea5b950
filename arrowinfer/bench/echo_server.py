"""A bare pyarrow Flight echo server: no arrowinfer code, the transport's limit.

``do_exchange`` writes every record batch it reads straight back. Prints
``listening on grpc://127.0.0.1:PORT`` when ready; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

from pyarrow import flight


class Echo(flight.FlightServerBase):
    def do_exchange(self, context, descriptor, reader, writer):  # type: ignore[no-untyped-def]
        started = False
        for chunk in reader:
            if not started:
                writer.begin(chunk.data.schema)
                started = True
            writer.write_batch(chunk.data)


def main() -> int:
    server = Echo("grpc://127.0.0.1:0")
    sys.stdout.write(f"listening on grpc://127.0.0.1:{server.port}\n")
    sys.stdout.flush()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
