"""What a Python KServe HTTP server can cost at least, beside arrowinfer's and real Triton's.

The floor is the smallest server that still answers tritonclient.http with binary tensor
data: uvicorn on uvloop with httptools (arrowinfer's HTTP stack), the JSON header parsed,
the input viewed with ``np.frombuffer``, one onnxruntime run of the same ``identity`` model,
a JSON answer. It checks nothing, batches nothing, counts nothing: not a server anyone
should run, only the bound on what arrowinfer's Python path could reach with the same
libraries. Every server is driven by the same tritonclient.http clients (one per thread) at
1 to 32 requests in flight, 4 KB and 256 KB per request, in two ways: ``pool`` hands each
request to a pool of threads (``arrowinfer bench``'s submit), ``loop`` gives each request in
flight its own thread calling ``infer`` in a loop (as ../shared/peers/triton/bench.py, the
recipe that measures real Triton, does). At 4 KB the client's own CPU is a large part of
what two cores can do, and the two ways have ranked the servers differently
(benchmarks/results/performance.md), so both are given. Each cell runs the servers in the
order A B C C B A and takes each one's mean: a shared VM's speed drifts during a run. The
ratios are best over concurrency, as in ``targets.md``. ``--repeat N`` runs the whole sweep
N times: one run's ratio moves by +-10 % on a shared 2-core machine, so each ratio is given
for every repetition and as their median.

Usage: ``python benchmarks/http_floor.py [--triton-http-url HOST:PORT] [--repeat N] [--out DIR]``
(``--serve PORT MODEL_ONNX`` runs the floor server itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from arrowinfer.bench.harness import (
    Measurement,
    arrowinfer_server,
    markdown_table,
    measure,
    process,
)
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.bench.requests import one_intra_op_thread
from arrowinfer.bench.transports import CONCURRENCY, ROW_BYTES, _checked, _kserve_http
from arrowinfer.examples import write_example_repository

SIZES = {"4 KB": 1, "256 KB": 64}  # rows of 4 KiB
CLIENTS = ("pool", "loop")  # how the client's threads keep requests in flight (see above)


def serve(port: int, model: str) -> None:
    """The floor server: one input, one output, no checks (see the module's text). Its
    malloc keeps freed memory as ``arrowinfer serve``'s does: without, glibc faults a large
    body's pages in anew per request, a third of the floor's CPU at 256 KB (714-804 against
    478-536 us per request, sixth session).
    """
    import onnxruntime as ort
    import uvicorn

    from arrowinfer.server._malloc import keep_freed_memory

    keep_freed_memory()

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        length = int(dict(scope["headers"])[b"inference-header-content-length"])
        (tensor,) = json.loads(body[:length])["inputs"]
        x = np.frombuffer(body, np.float32, offset=length).reshape(tensor["shape"])
        (y,) = session.run(["OUTPUT0"], {"INPUT0": x})
        output: dict[str, Any] = {"name": "OUTPUT0", "datatype": "FP32", "shape": list(y.shape)}
        output["parameters"] = {"binary_data_size": y.nbytes}
        header = json.dumps({"model_name": "identity", "outputs": [output]}).encode()
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", b"%d" % len(header)),
            (b"content-length", b"%d" % (len(header) + y.nbytes)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": header + y.tobytes()})

    print(f"listening on 127.0.0.1:{port}", flush=True)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton-http-url", metavar="HOST:PORT")
    parser.add_argument("--repeat", type=int, default=1, metavar="N")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return
    repository = one_intra_op_thread(write_example_repository(Path(tempfile.mkdtemp()) / "repo"))
    rows: list[Measurement] = []
    best: dict[tuple[int, str, str, str], float] = {}  # (repetition, client, server, payload)
    with contextlib.ExitStack() as stack:
        http_port, floor_port = _port(), _port()
        ours, _ = stack.enter_context(arrowinfer_server(repository, "--http-port", str(http_port)))
        model = str(repository / "identity" / "1" / "model.onnx")
        floor, _ = stack.enter_context(
            process([sys.executable, __file__, "--serve", str(floor_port), model], "listening on")
        )
        servers: dict[str, tuple[str, tuple[int, ...], bool]] = {
            "floor": (f"127.0.0.1:{floor_port}", (floor.pid,), False),
            "kserve-http": (f"127.0.0.1:{http_port}", (ours.pid,), False),
        }
        if args.triton_http_url:  # its identity takes one flat tensor; its CPU is elsewhere
            servers["triton-http"] = (args.triton_http_url, (), True)
        cells = [
            (r, label, client, c)
            for r in range(args.repeat)
            for label in SIZES
            for client in CLIENTS
            for c in CONCURRENCY
        ]
        for repetition, label, client, concurrency in cells:
            n = SIZES[label]
            x = np.random.default_rng(n).random((n, ROW_BYTES // 4), dtype=np.float32)
            # A B C C B A: each server's rate is the mean of its two runs, so a machine that
            # speeds up or slows down during the cell (a shared VM does) favours none
            rates: dict[str, list[float]] = {}
            for name in [*servers, *reversed(servers)]:
                url, pids, flat = servers[name]
                sent = x.reshape(-1) if flat else x
                submit, cleanup = _kserve_http(
                    url, "identity", sent, "INPUT0", "OUTPUT0", binary=True, pool=client == "pool"
                )

                def same(result: object, sent: np.ndarray = sent) -> None:
                    if not np.array_equal(np.asarray(result), sent):
                        raise AssertionError("identity returned different values")

                try:
                    m = measure(
                        f"{name} identity {label} {client}",
                        _checked(submit, same),
                        server_pids=pids,
                        concurrency=concurrency,
                        rows=n,
                        payload_bytes=n * ROW_BYTES,
                        blocking=client == "loop",
                    )
                finally:
                    cleanup()
                rows.append(m)
                rates.setdefault(name, []).append(m.requests_per_s)
            for name, pair in rates.items():
                key = (repetition, client, name, label)
                best[key] = max(best.get(key, 0.0), float(np.mean(pair)))
    triton = " --triton-http-url ..." if args.triton_http_url else ""
    lines = [
        "# The floor of a Python KServe HTTP server, beside arrowinfer's and real Triton's",
        "",
        f"`python benchmarks/http_floor.py{triton}`: see its docstring for what the floor is",
        "and for the two clients (`pool`, `loop`).",
        "",
        "Best requests/s over 1 to 32 in flight (each the mean of two runs, A B C C B A), and",
        "their ratios, in each repetition of the sweep; then each ratio's median over the",
        "repetitions:",
        "",
        (
            "| payload | client | repetition | floor | kserve-http | triton-http"
            " | kserve-http / floor | kserve-http / triton | floor / triton |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in SIZES:
        for client in CLIENTS:
            ratios: list[tuple[float, float | None, float | None]] = []
            for r in range(args.repeat):
                f = best[(r, client, "floor", label)]
                k = best[(r, client, "kserve-http", label)]
                t = best.get((r, client, "triton-http", label))
                ratios.append((k / f, k / t if t else None, f / t if t else None))
                tri = f"{t:,.0f}" if t else ""
                kt, ft = (f"{k / t:.2f}", f"{f / t:.2f}") if t else ("", "")
                lines.append(
                    f"| {label} | {client} | {r + 1} | {f:,.0f} | {k:,.0f} | {tri}"
                    f" | {k / f:.2f} | {kt} | {ft} |"
                )
            medians = [
                f"{float(np.median([v for v in column if v is not None])):.2f}"
                if all(v is not None for v in column)
                else ""
                for column in zip(*ratios, strict=True)
            ]
            lines.append(f"| {label} | {client} | median | | | | {' | '.join(medians)} |")
    lines += ["", markdown_table(rows), "", markdown(describe())]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_floor.md").write_text("\n".join(lines) + "\n")
    (args.out / "http_floor.json").write_text(
        json.dumps({"rows": [m.as_dict() for m in rows], "machine": describe()}, indent=1)
    )
    print("\n".join(lines[: 11 + len(SIZES) * len(CLIENTS) * (args.repeat + 1)]))


if __name__ == "__main__":
    main()
