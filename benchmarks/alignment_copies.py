"""How often each transport hands the server an input that is not 64-byte aligned, and what
copying it costs.

Every input a model reads is 64-byte aligned (``arrowinfer.backends.base.ALIGNMENT``): an
input that arrives elsewhere is copied once, and counted in the model's statistics
(``"arrowinfer": {"alignment_copies", "alignment_copy_ns"}``). This script sends the same
requests (``identity``, 4 KiB per row; ``facile``, 60 bytes per row) one after the other
over each transport of one server, and reads the counters before and after: copies per
request and µs per copy.

    python -m benchmarks.alignment_copies                 # results in benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th

from arrowinfer.bench.machine import describe, markdown
from arrowinfer.client import Client, ShmTransport
from arrowinfer.examples import write_example_repository
from arrowinfer.server import Server

MODELS = {"identity": ("INPUT0", 1024), "facile": ("hits", 15)}


def _counters(server: Server, model: str) -> dict[str, int]:
    (stats,) = server.core.statistics(model)
    return dict(stats["arrowinfer"])


def _send(kind: str, server: Server, unix: Server, model: str, arrays: list[np.ndarray]) -> None:
    name, _ = MODELS[model]
    if kind == "kserve":  # gRPC
        client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
        try:
            for array in arrays:
                tensor = tg.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array)
                client.infer(model, [tensor])
        finally:
            client.close()
        return
    if kind == "kserve_http":  # binary tensor data: the body is read with its data aligned
        http = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            for array in arrays:
                tensor = th.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array, binary_data=True)
                http.infer(model, [tensor])
        finally:
            http.close()
        return
    if kind == "shm":
        url = server.location.replace("grpc", "shm", 1)
        client = Client(server.location, transport=ShmTransport(url, min_shm_bytes=0))
    else:
        client = Client(unix.location if kind == "flight_unix" else server.location)
    with client:
        for array in arrays:
            client.infer(model, {name: array})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = write_example_repository(Path(tmp) / "repository")
        sock = str(Path(tmp) / "arrowinfer.sock")
        models = list(MODELS)
        with (
            Server(
                repository, port=0, kserve_port=0, http_port=0, metrics_port=None, models=models
            ) as server,
            Server(repository, unix_socket=sock, kserve_port=None, metrics_port=None) as unix,
        ):
            for model, (_, width) in MODELS.items():
                for n in (1, 64):
                    arrays = [
                        rng.normal(size=(n, width)).astype(np.float32) for _ in range(args.requests)
                    ]
                    for kind in ("flight_tcp", "flight_unix", "shm", "kserve", "kserve_http"):
                        target = unix if kind == "flight_unix" else server
                        before = _counters(target, model)
                        _send(kind, server, unix, model, arrays)
                        after = _counters(target, model)
                        copies = after["alignment_copies"] - before["alignment_copies"]
                        ns = after["alignment_copy_ns"] - before["alignment_copy_ns"]
                        rows.append(
                            {
                                "model": model,
                                "rows": n,
                                "transport": kind,
                                "requests": args.requests,
                                "copies_per_request": round(copies / args.requests, 3),
                                "us_per_copy": round(ns / copies / 1e3, 2) if copies else None,
                            }
                        )
                        print(json.dumps(rows[-1]), file=sys.stderr)
    machine = describe()
    lines = [
        "| model | rows | transport | copies per request | µs per copy |",
        "|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['rows']} | {r['transport']} | {r['copies_per_request']} "
            f"| {r['us_per_copy'] if r['us_per_copy'] is not None else '-'} |"
            for r in rows
        ),
    ]
    header = [
        "# Alignment copies per transport",
        "",
        (
            f"`python -m benchmarks.alignment_copies` ({args.requests} requests per cell, one "
            "after the other, one server): how often an input reached the model elsewhere than "
            "at a 64-byte boundary and was copied once to one (the model's `alignment_copies` "
            "counter), and what a copy cost. 0 means every input was used where it arrived."
        ),
        "",
    ]
    text = "\n".join(header + lines) + f"\n\n{markdown(machine)}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alignment_copies.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n"
    )
    (args.out / "alignment_copies.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
