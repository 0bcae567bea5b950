"""Several server processes behind one set of ports: ``arrowinfer serve --workers N``.

Each worker is a whole :class:`~arrowinfer.server.Server` in its own process, with its own
model instances, batchers and statistics; the workers share nothing but the repository. A
parent process owns the public ports and supervises them:

- **Ports.** gRPC turns ``SO_REUSEPORT`` on by default, but Arrow Flight's C++ server turns
  it off for its listener ("leftover processes can handle requests on accident") and pyarrow
  has no hook to turn it back on: a second process binding the same Flight port fails with
  "Address already in use". So the parent listens on the Flight port (and the KServe port)
  itself and *relays* every accepted TCP connection, byte for byte, to one worker's private
  listener: a Unix socket in a private temporary directory, or a loopback TCP port when TLS
  is on (Flight has no TLS over Unix sockets). The relay works below gRPC (TLS passes
  through to the worker untouched) and, on Linux, moves the bytes with ``splice(2)``
  through a kernel pipe, never through Python objects. KServe uses the same relay rather
  than grpcio's ``SO_REUSEPORT``: one mechanism, one balancing rule, and port 0 works.
- **Balancing** is per connection, as a Kubernetes Service balances pods: a new connection
  goes to the ready worker with the fewest open connections. One ``Client`` (one
  tritonclient) keeps one connection, so many clients spread over the workers, and one
  client's pipelined requests stay with one worker.
- **Supervision.** A worker that dies (killed, out of memory, crashed) is restarted, after a
  pause that grows while it keeps dying at once; its connections break, and clients with
  ``retries`` send their requests again on a new connection, which goes to a live worker.
  SIGTERM/SIGINT to the parent: not ready, stop accepting, SIGTERM to every worker (which
  finish their requests in flight), wait for them, exit. Workers run in their own session,
  so a terminal's Ctrl-C reaches the parent only; a worker whose parent is gone (its stdin
  closes) stops by itself.
- **Metrics and health** are served by the parent on the metrics port. At every scrape it
  asks each worker for ``model.statistics`` over the worker's private Flight listener and
  sums them per model and version, so one scrape sees the whole server under Triton's
  names. The counts of a worker that died are kept (as last scraped), so counters do not go
  down when a worker is replaced. ``nv_inference_pending_request_count`` is not available
  (the statistics do not carry queue lengths). Per worker: ``arrowinfer_worker_up{worker,
  pid}``, ``arrowinfer_worker_starts_total{worker}``,
  ``arrowinfer_worker_request_success_total{worker, model, version}`` (since the worker started)
  and ``arrowinfer_worker_connections{worker}``. ``/v2/health/ready`` answers 200 once every
  worker has started, while at least one serves and the server is not stopping.
- **Shared memory** is off in workers unless ``allow_client_shm`` is given. A worker sees
  the relay, not the client, so it can learn neither the client's address nor its uid,
  and without the uid it cannot check that a region is the client's own
  (``docs/security.md``). With ``allow_client_shm`` the operator trusts every client
  that can reach the port; sessions then ride the relay (a client's session and its
  Flight stream share one connection, so one worker).

Nothing crosses the process boundary but JSON (the worker's settings on its stdin, its
private address on its stdout) and the Flight protocol.

Modules: ``_relay`` (listening, relaying a connection to a worker), ``_pool`` (the
supervisor: starts, restarts and balances over workers), ``_statistics`` (summing the
workers' statistics), ``_collector`` (the pool's Prometheus metrics), ``_child`` (the
worker process's entry point).
"""

from __future__ import annotations

from ._pool import WorkerPool
from ._statistics import merge_statistics

__all__ = ["WorkerPool", "merge_statistics"]
