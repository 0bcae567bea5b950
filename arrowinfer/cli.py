"""The ``arrowinfer`` command: serve, models, infer, examples.

A thin user of the library: it catches only :class:`~arrowinfer.errors.ArrowInferError`
and prints ``TypeName: message``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import ArrowInferError

__all__ = ["default_repository", "main"]

log = logging.getLogger("arrowinfer")


def default_repository() -> Path:
    """The built-in example repository, written into the user's cache on first use."""
    from .examples import write_example_repository

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return write_example_repository(cache / "arrowinfer" / "examples")


def _serve(args: argparse.Namespace) -> int:
    from .server import Server

    repository = Path(args.repository) if args.repository else default_repository()
    server = Server(
        repository,
        host=args.host,
        port=args.port,
        unix_socket=args.unix_socket,
        kserve_port=None if args.kserve_port < 0 else args.kserve_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        allow_client_shm=args.allow_client_shm,
        device=args.device,
        models=args.model or None,
    )

    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():  # a client may hold its stream open: don't wait for it
            log.warning("%s again: exiting without waiting for open streams", name)
            os._exit(1)
        stopping.set()
        log.info("%s: finishing requests in flight, then stopping", name)
        threading.Thread(target=server.stop, name="shutdown").start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"arrowinfer serving {repository} on {server.location}", flush=True)
    server.wait()
    return 0


def _models(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(args.url) as client:
        for name, info in client.models().items():
            inputs = ", ".join(f"{f.name}: {f.type}" for f in info)
            print(f"{name}  ({inputs})")
    return 0


def _infer(args: argparse.Namespace) -> int:
    from .client import infer_file

    rows = infer_file(
        args.url,
        args.model,
        args.input,
        args.output,
        batch_rows=args.batch_rows,
        columns=args.column or None,
        progress=not args.quiet,
    )
    print(f"wrote {rows} rows to {args.output}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from .examples import write_example_repository

    path = write_example_repository(args.directory, overwrite=args.overwrite)
    print(f"example model repository written to {path}")
    return 0


def _column_mapping(text: str) -> str:
    name, sep, column = text.partition("=")
    if not (name and sep and column):
        raise argparse.ArgumentTypeError(f"expected INPUT=COLUMN, got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line, documented for physicists."""
    top = argparse.ArgumentParser(
        prog="arrowinfer",
        description="Neural-network inference as a service for HEP event processing, "
        "with Apache Arrow end to end.",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve a model repository over Arrow Flight",
        description="Serve every ONNX model of a Triton-layout model repository "
        "(REPO/<model>/config.pbtxt, REPO/<model>/<version>/model.onnx) over Arrow Flight, "
        "with dynamic batching and Prometheus metrics. Stops cleanly on Ctrl-C/SIGTERM, "
        "finishing the requests in flight; a second Ctrl-C/SIGTERM exits at once.",
    )
    serve.add_argument(
        "repository",
        nargs="?",
        help="model repository directory (default: the built-in example models)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; use 0.0.0.0 to accept remote clients)",
    )
    serve.add_argument(
        "--port", type=int, default=8815, help="Arrow Flight port (default: %(default)s)"
    )
    serve.add_argument(
        "--unix-socket", metavar="PATH", help="listen on a Unix domain socket instead of TCP"
    )
    serve.add_argument(
        "--kserve-port",
        type=int,
        default=8001,
        help="KServe v2 gRPC port (Triton's protocol, for tritonclient); -1 disables "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="accept shared-memory sessions from clients that are not on this host's "
        "loopback or a Unix socket. Shared memory only works between processes that see the "
        "same /dev/shm under the same user (containers of one pod, say); off by default, so "
        "that remote peers can only use Arrow Flight",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus metrics port; -1 disables (default: %(default)s)",
    )
    serve.add_argument(
        "--device",
        help="run every model on this device: cpu or cuda:N (default: each model's instance_group)",
    )
    serve.add_argument(
        "--model", action="append", metavar="NAME", help="load only this model (repeatable)"
    )
    serve.set_defaults(run=_serve)

    models = sub.add_parser("models", help="list the models a server serves")
    models.add_argument(
        "url", nargs="?", default="grpc://127.0.0.1:8815", help="server (default: %(default)s)"
    )
    models.set_defaults(run=_models)

    infer = sub.add_parser(
        "infer",
        help="run a model over a file of events",
        description="Send the events of an Arrow IPC (.arrow/.arrows/.feather) or Parquet file "
        "to a server, and write the results (one row per input row) as Arrow IPC or Parquet, "
        "chosen by the output file's extension.",
    )
    infer.add_argument("url", help="server, e.g. grpc://127.0.0.1:8815")
    infer.add_argument("model", help="model name (optionally NAME/VERSION)")
    infer.add_argument("input", help="input file (.arrow, .arrows, .feather, .parquet)")
    infer.add_argument("output", help="output file (.arrow or .parquet)")
    infer.add_argument(
        "--column",
        action="append",
        type=_column_mapping,
        metavar="INPUT=COLUMN",
        help="map a model input to a file column (repeatable)",
    )
    infer.add_argument(
        "--batch-rows", type=int, default=4096, help="rows per request (default: %(default)s)"
    )
    infer.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    infer.set_defaults(run=_infer)

    examples = sub.add_parser("examples", help="write the example model repository")
    examples.add_argument("directory", help="where to write it")
    examples.add_argument("--overwrite", action="store_true", help="rewrite existing models")
    examples.set_defaults(run=_examples)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except ArrowInferError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
