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
from typing import NoReturn

from ._version import __version__
from .errors import ArrowInferError, ModelError

__all__ = ["default_repository", "main"]

log = logging.getLogger("arrowinfer")


def default_repository() -> Path:
    """The built-in example repository, written into the user's cache on first use."""
    from .examples import ALL_MODELS, write_example_repository

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return write_example_repository(cache / "arrowinfer" / "examples", models=ALL_MODELS)


def _triton_bool(text: str) -> bool:
    """A boolean option's value as tritonserver reads one: true/false, on/off, 1/0."""
    value = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
    try:
        return value[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _models_to_load(args: argparse.Namespace) -> list[str] | None:
    """The models ``serve`` loads at start (None: every one), as tritonserver's
    ``--load-model``: ``*`` means every model and must be the only one named. In
    ``--model-control-mode explicit`` nothing loads unless named (clients load models);
    in the other modes every model loads unless some are named."""
    names = list(args.model or ())
    if "*" in names:
        if len(names) > 1:
            raise SystemExit("arrowinfer serve: --load-model '*' must be the only model named")
        return None
    if not names and args.model_control_mode != "explicit":
        return None
    return names


def _serve(args: argparse.Namespace) -> int:
    from .server import Server, WorkerPool
    from .server._auth import read_token_file
    from .server._malloc import keep_freed_memory

    repository = _serve_repository(args)
    for front, port in (
        ("http", "http_port"),
        ("grpc", "kserve_port"),
        ("metrics", "metrics_port"),
    ):
        if not getattr(args, f"allow_{front}"):  # tritonserver's --allow-X=false: port -1
            setattr(args, port, -1)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("arrowinfer serve: --tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise SystemExit(f"arrowinfer serve: {option}: cannot read {path}")
    try:
        tokens = read_token_file(args.auth_token_file) if args.auth_token_file else None
    except (OSError, ValueError) as err:
        raise SystemExit(f"arrowinfer serve: --auth-token-file: {err}") from None
    try:
        admin = read_token_file(args.admin_token_file) if args.admin_token_file else None
    except (OSError, ValueError) as err:
        raise SystemExit(f"arrowinfer serve: --admin-token-file: {err}") from None
    if admin is not None and args.model_control_mode != "explicit":
        raise SystemExit("arrowinfer serve: --admin-token-file needs --model-control-mode explicit")
    if args.max_request_bytes < 1:
        raise SystemExit("arrowinfer serve: --max-request-bytes must be positive")
    if args.http_max_input_size < 1:
        raise SystemExit("arrowinfer serve: --http-max-input-size must be positive")
    if args.exit_timeout_secs < 0:
        raise SystemExit("arrowinfer serve: --exit-timeout-secs must be >= 0")
    keep_freed_memory()  # the process is the server's: see arrowinfer.server._malloc
    options = {
        "host": args.host,
        "port": args.port,
        "kserve_port": None if args.kserve_port < 0 else args.kserve_port,
        "metrics_port": None if args.metrics_port < 0 else args.metrics_port,
        "allow_client_shm": args.allow_client_shm,
        "device": args.device,
        "models": _models_to_load(args),
        "exit_on_error": args.exit_on_error,
        "strict_readiness": args.strict_readiness,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "auth_tokens": tokens,
        "max_request_bytes": args.max_request_bytes,
        "model_control": args.model_control_mode,
        "admin_tokens": admin,
        "exit_timeout": float(args.exit_timeout_secs),
    }
    server: Server | WorkerPool
    if args.workers < 1:
        raise SystemExit(f"arrowinfer serve: --workers must be at least 1, got {args.workers}")
    if args.workers > 1:
        if args.unix_socket:
            raise SystemExit("arrowinfer serve: --workers needs a TCP port, not --unix-socket")
        if args.http_port >= 0:
            log.warning("--workers > 1: KServe HTTP is not served (use gRPC or Flight)")
        try:
            server = WorkerPool(repository, workers=args.workers, **options)
        except RuntimeError as err:  # a worker failed to start; its log says why
            raise SystemExit(f"arrowinfer serve: {err}") from None
    else:
        http_port = None if args.http_port < 0 else args.http_port
        try:
            server = Server(
                repository,
                unix_socket=args.unix_socket,
                http_port=http_port,
                http_max_input_size=args.http_max_input_size,
                **options,
            )
        except ModelError as err:  # --exit-on-error: a model failed to load
            raise SystemExit(f"arrowinfer serve: {err}") from None
        except OSError as err:  # a port in use, most often
            raise SystemExit(
                f"arrowinfer serve: {err} (choose another with --port, --kserve-port, "
                "--http-port or --metrics-port; -1 turns one off)"
            ) from None

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
    if not getattr(server, "clean", True):
        # a client kept its stream open past --exit-timeout-secs: gRPC would wait for it at
        # exit, so leave without waiting (its stream is cancelled with the process)
        log.warning("exiting with streams still open (--exit-timeout-secs)")
        logging.shutdown()
        os._exit(0)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .client import Client

    _check_urls(args.url)
    with Client(args.url) as client:
        for name, info in client.models().items():
            inputs = ", ".join(f"{f.name}: {f.type}" for f in info)
            print(f"{name}  ({inputs})")
    return 0


def _check_urls(url: str) -> list[str]:
    """The server URLs of ``url`` (comma-separated), each with a scheme the client knows.

    ``@FILE`` (a server list a batch job wrote) is left to the client to read.
    """
    from .client._transport import check_url

    urls = url.replace(",", " ").split()
    for u in urls:
        if u == "local" or u.startswith("@"):
            continue
        try:
            check_url(u)
        except ValueError as err:
            raise _UsageError(f"{err}, or 'local' with --repository") from None
    return urls


class _UsageError(Exception):
    """A wrong argument: printed as one line, exit status 2."""


def _serve_repository(args: argparse.Namespace) -> Path:
    """The one repository ``serve`` was given, as its argument or as Triton's
    ``--model-repository`` (tritonserver takes several; arrowinfer serves one)."""
    given = ([args.repository] if args.repository else []) + (args.model_repository or [])
    if len(given) > 1:
        raise _UsageError(
            f"one model repository is served, {len(given)} were given ({', '.join(given)}): "
            "name it once, as the argument or as --model-repository"
        )
    return Path(given[0]) if given else default_repository()


def _infer(args: argparse.Namespace) -> int:
    import warnings

    import pyarrow as pa

    from .client import Client, FallbackWarning
    from .files import FileArgumentError, check_output, infer_files

    urls = _check_urls(args.url)
    local = urls == ["local"]
    if (local or args.fallback == "local") and not args.repository:
        raise _UsageError("running locally ('local' or --fallback local) needs --repository REPO")
    if args.repository and not Path(args.repository).is_dir():
        raise _UsageError(f"--repository: no such directory {args.repository!r}")
    if args.step_size < 1:
        raise _UsageError(f"--step-size must be at least 1, got {args.step_size}")
    mapping = dict(args.input or [])
    keep = None if args.keep is None else [c for c in args.keep.split(",") if c]
    try:
        check_output(args.output)
        fallback = "local" if local or args.fallback == "local" else "error"
        # A fallback is reported once, on one line, not as a Python warning with its source.
        warnings.simplefilter("once", FallbackWarning)
        warnings.showwarning = lambda message, category, *_: print(
            f"{category.__name__}: {message}", file=sys.stderr
        )
        with Client(args.url, fallback=fallback, repository=args.repository) as client:
            stats = infer_files(
                client,
                args.model,
                args.inputs,
                args.output,
                mapping=mapping,
                keep=keep,
                tree=args.tree,
                step_size=args.step_size,
                progress=not args.quiet,
            )
    except FileArgumentError as err:
        raise _UsageError(str(err)) from None
    except (OSError, pa.ArrowException) as err:  # a file that breaks while it is read
        print(f"arrowinfer infer: {err}", file=sys.stderr)
        return 1
    if stats.interrupted:
        where = (
            f"{args.output} holds the first {stats.events} events"
            if stats.events
            else "no event was done, no output written"
        )
        print(f"interrupted: {where}", file=sys.stderr)
        return 130
    print(f"wrote {stats.events} events to {args.output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.transports import main as bench

    return bench(args.bench_args)


def _examples(args: argparse.Namespace) -> int:
    from .examples import ALL_MODELS, write_example_repository

    path = write_example_repository(args.directory, models=ALL_MODELS, overwrite=args.overwrite)
    print(f"example model repository written to {path}")
    return 0


def _input_mapping(text: str) -> tuple[str, list[str]]:
    name, sep, columns = text.partition("=")
    names = [c.strip() for c in columns.split(",")]
    if not (name and sep and all(names)):
        raise argparse.ArgumentTypeError(f"expected NAME=COLUMN[,COLUMN...], got {text!r}")
    return name, names


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where help is, not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command line, documented for physicists."""
    top = _Parser(
        prog="arrowinfer",
        description="Neural-network inference as a service for HEP event processing, "
        "with Apache Arrow end to end.",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    top.add_argument("--version", action="version", version=f"arrowinfer {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
        "--model-repository",
        metavar="REPO",
        action="append",
        help="the repository directory by Triton's flag (tritonserver --model-repository), "
        "instead of the argument",
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
        "--grpc-port",  # Triton's name for the same port
        dest="kserve_port",
        type=int,
        default=8001,
        help="KServe v2 gRPC port (Triton's protocol, for tritonclient; --grpc-port is "
        "Triton's name for it); -1 disables (default: %(default)s)",
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="KServe v2 HTTP/REST port (Triton's protocol, for tritonclient.http and curl); "
        "-1 disables; not served with --workers N > 1 (default: %(default)s)",
    )
    serve.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="accept shared memory from clients that are not on this host's loopback or a "
        "Unix socket: arrowinfer's own shared-memory sessions, and Triton's system "
        "shared-memory regions over KServe gRPC and HTTP (files of the server's user). "
        "Shared memory only works between processes that see the same /dev/shm (containers "
        "of one pod, say); off by default, so that remote peers send their data",
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
        "--model",
        "--load-model",  # Triton's name (with its '*' for every model)
        action="append",
        metavar="NAME",
        help="load only this model at start (repeatable; Triton's --load-model, '*': every "
        "model; the default, except with --model-control-mode explicit: none)",
    )

    def triton_bool(flag: str, help: str) -> None:
        """A tritonserver boolean flag, true by default: ``--flag``, ``--flag=false``."""
        serve.add_argument(
            flag, type=_triton_bool, nargs="?", const=True, default=True, metavar="BOOL", help=help
        )

    for front, port in (
        ("http", "--http-port"),
        ("grpc", "--kserve-port"),
        ("metrics", "--metrics-port"),
    ):
        triton_bool(f"--allow-{front}", f"tritonserver's flag: false turns {port} off (as -1)")
    serve.add_argument(
        "--log-verbose",
        type=int,
        default=0,
        metavar="N",
        help="tritonserver's flag: above 0, log debug messages (as arrowinfer -v)",
    )
    triton_bool(
        "--exit-on-error",
        "exit when a model fails to load at start (tritonserver's flag and default: true; "
        "false: the other models serve)",
    )
    triton_bool(
        "--strict-readiness",
        "ready (/v2/health/ready, ServerReady) only while no model has failed to load "
        "(tritonserver's flag and default: true; false: ready whenever serving)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes behind the same ports, each with its own model instances; "
        "a parent process relays connections, restarts dead workers and sums their metrics "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve Flight (grpc+tls://), KServe gRPC and HTTP (https://) over TLS with this "
        "certificate (chain)",
    )
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="accept only calls with 'authorization: Bearer <token>' for a token in FILE "
        "(one per line, # comments); use with TLS, or tokens travel in clear text",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 30,
        metavar="N",
        help="refuse requests with more than N bytes of data, decompressed (default: "
        "%(default)s; a model's config parameter arrowinfer.max_request_bytes overrides it)",
    )
    serve.add_argument(
        "--http-max-input-size",
        type=int,
        default=64 << 20,
        metavar="N",
        help="refuse KServe HTTP bodies of more than N bytes, compressed or decompressed "
        "(Triton's flag and default: %(default)s; JSON tensors grow about 10x once parsed)",
    )
    serve.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "poll"],
        default="none",
        help="none: load the repository at start, refuse load/unload calls; explicit: load "
        "only the --load-model models at start, allow the calls (only with an admin token "
        "when tokens are on); poll: reload models whose files change (default: %(default)s)",
    )
    serve.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="with --model-control-mode explicit: only these tokens (one per line) may load "
        "and unload models",
    )
    serve.add_argument(
        "--exit-timeout-secs",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT, wait this long for open streams to finish, then cancel them "
        "and exit (default: %(default)s)",
    )
    serve.set_defaults(run=_serve)

    models = sub.add_parser("models", help="list the models a server serves")
    models.add_argument(
        "url", nargs="?", default="grpc://127.0.0.1:8815", help="server (default: %(default)s)"
    )
    models.set_defaults(run=_models)

    infer = sub.add_parser(
        "infer",
        help="run a model over event files (ROOT, Parquet, Arrow)",
        description="Run a model over the events of ROOT files (uproot; --tree), Parquet or "
        "Arrow IPC files, local paths, globs or http(s):// URLs, read --step-size events at a "
        "time and pipelined to the server(s). The output has one row per event: the "
        "identifying columns (--keep) and the model's outputs (per-object outputs as per-event "
        "lists), as Parquet, Arrow IPC (.arrow, .feather) or ROOT (.root), by extension. "
        "Ctrl-C stops and leaves the events done so far.",
    )
    infer.add_argument(
        "url",
        help="server(s), e.g. grpc://127.0.0.1:8815 (comma-separated for several), or 'local' "
        "to run the model in this process from --repository",
    )
    infer.add_argument("model", help="model name (optionally NAME/VERSION)")
    infer.add_argument("inputs", nargs="+", metavar="INPUT", help="event files, globs or URLs")
    infer.add_argument("output", help="output file (.parquet, .arrow, .feather or .root)")
    infer.add_argument(
        "--input",
        "--column",
        dest="input",
        action="append",
        type=_input_mapping,
        metavar="NAME=COL[,COL...]",
        help="make model input NAME from these columns (repeatable): one column as it is, "
        "several per-event scalars stacked into [n], several per-object lists (Jet_pt,Jet_eta) "
        "stacked into [var, n] per event, or one row per object for a per-object model. "
        "Default: the column named like the input. --column is an alias",
    )
    infer.add_argument(
        "--keep",
        metavar="COL[,COL...]",
        help="columns copied to the output (default: run,luminosityBlock,event where present; "
        "'' for none)",
    )
    infer.add_argument("--tree", default="Events", help="TTree of ROOT files (default: Events)")
    infer.add_argument(
        "--step-size",
        "--batch-rows",
        dest="step_size",
        type=int,
        default=5000,
        metavar="N",
        help="events read and sent per request (default: %(default)s)",
    )
    infer.add_argument(
        "--fallback",
        choices=("error", "local"),
        default="error",
        help="'local': run the model in this process (from --repository) when the servers "
        "fail (default: %(default)s)",
    )
    infer.add_argument("--repository", metavar="REPO", help="model repository for local runs")
    infer.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    infer.set_defaults(run=_infer)

    # its options (and --help) are the benchmark's own parser's: arguments pass through
    bench = sub.add_parser("bench", help="compare every transport on this machine", add_help=False)
    bench.set_defaults(run=_bench)

    examples = sub.add_parser("examples", help="write the example model repository")
    examples.add_argument("directory", help="where to write it")
    examples.add_argument("--overwrite", action="store_true", help="rewrite existing models")
    examples.set_defaults(run=_examples)
    return top


#: tritonserver's flags that `serve` does not take (its others it does, by Triton's names):
#: a launch script moved from Triton hears that they are Triton's, not typos.
_TRITONSERVER_ONLY = frozenset(
    [
        "--strict-model-config",
        "--disable-auto-complete-config",
        "--backend-config",
        "--backend-directory",
        "--repoagent-directory",
        "--model-load-thread-count",
        "--model-namespacing",
        "--repository-poll-secs",
        "--pinned-memory-pool-byte-size",
        "--cuda-memory-pool-byte-size",
        "--min-supported-compute-capability",
        "--rate-limit",
        "--rate-limit-resource",
        "--response-cache-byte-size",
        "--cache-config",
        "--cache-directory",
        "--buffer-manager-thread-count",
        "--http-thread-count",
        "--http-address",
        "--grpc-address",
        "--metrics-address",
        "--metrics-interval-ms",
        "--allow-cpu-metrics",
        "--allow-gpu-metrics",
        "--grpc-use-ssl",
        "--grpc-infer-allocation-pool-size",
        "--trace-config",
        "--trace-file",
        "--trace-level",
        "--trace-rate",
        "--log-info",
        "--log-warning",
        "--log-error",
        "--log-format",
        "--log-file",
        "--id",
        "--allow-sagemaker",
        "--allow-vertex-ai",
        "--model-config-name",
    ]
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    top = parser()
    args, rest = top.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest  # the benchmark script parses its own options
    elif rest:
        where = f"{top.prog} {args.command}"
        triton = [a for a in rest if a.split("=", 1)[0] in _TRITONSERVER_ONLY]
        said = f"tritonserver's {', '.join(triton)}, which arrowinfer lacks; " if triton else ""
        top.exit(
            2, f"{where}: unrecognized arguments: {' '.join(rest)} ({said}see {where} --help)\n"
        )
    verbose = args.verbose or getattr(args, "log_verbose", 0) > 0
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = int(args.run(args))
        sys.stdout.flush()  # a reader gone shows here, not as an error at exit
        return status
    except _UsageError as err:
        print(f"arrowinfer {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `arrowinfer models | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a shell reports SIGPIPE
    except ArrowInferError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
