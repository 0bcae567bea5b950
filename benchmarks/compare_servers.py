"""Two versions of the server side by side in one run: server CPU per request, and p50.

Each ``--server NAME=DIR`` is a copy of the repository (``git archive COMMIT | tar -x -C
DIR``); every server serves ``facile`` from the same model repository, and the cells
alternate between them (and the bare Flight echo), so that a change in the machine's load
hits all of them alike. Cells: 1, 100 and 10,000-row requests at 1 and 8 in flight on one
stream. Prints one JSON line per cell.

Usage: ``python benchmarks/compare_servers.py --server before=/tmp/old --server after=.``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.harness import echo_server, measure, process
from arrowinfer.bench.requests import make_request
from arrowinfer.client import Client, FlightTransport, conform
from arrowinfer.examples import write_example_repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 100, 10_000])
    args = parser.parse_args(argv)
    trees = dict(s.split("=", 1) for s in args.server)
    repository = write_example_repository(Path(tempfile.mkdtemp()) / "repo")
    cell = {"warmup_s": 0.5, "window_s": 1.0, "max_windows": 4}
    pool = make_request("facile", max(args.rows))
    with contextlib.ExitStack() as stack:
        echo_proc, echo_location = stack.enter_context(echo_server())
        echo = FlightTransport(echo_location)
        stack.callback(echo.close)
        clients = {}
        for name, tree in trees.items():
            proc, match = stack.enter_context(
                process(
                    [sys.executable, "-m", "arrowinfer.cli", "serve", str(repository),
                     "--port", "0", "--kserve-port", "-1", "--http-port", "-1",
                     "--metrics-port", "-1",
                     "--model", "facile"],
                    r"serving .* on (\S+)",
                    env={"PYTHONPATH": str(Path(tree).resolve())},
                )
            )  # fmt: skip
            client = stack.enter_context(Client(match.group(1)))
            clients[name] = (client, proc.pid)
        schema = next(iter(clients.values()))[0].schema("facile")
        for rows in args.rows:
            batch = conform(pool.slice(0, rows), schema, model="facile")
            for window in (1, 8):
                bare = measure(
                    "echo",
                    lambda b=batch: echo.submit("echo", None, b),
                    concurrency=window,
                    server_pids=(echo_proc.pid,),
                    **cell,
                )
                line: dict[str, float] = {
                    "rows": rows,
                    "window": window,
                    "echo_server_cpu_us": bare.server_cpu_us,
                    "echo_p50_ms": bare.p50_ms,
                }
                for name, (client, pid) in clients.items():
                    m = measure(
                        name,
                        lambda b=batch, c=client: c.infer_async("facile", b),
                        concurrency=window,
                        server_pids=(pid,),
                        **cell,
                    )
                    line[f"{name}_server_cpu_us"] = m.server_cpu_us
                    line[f"{name}_client_cpu_us"] = m.client_cpu_us
                    line[f"{name}_p50_ms"] = m.p50_ms
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
