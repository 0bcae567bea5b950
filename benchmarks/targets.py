"""Every target of the performance issue (and the HTTP one of the protocol issue), in one run.

Runs ``benchmarks/flight.py``, ``benchmarks/shm.py`` and ``arrowinfer bench`` one after
the other on the same machine, each writing its own results (with the server and client
CPU columns) into ``--out``, then collects their target ratios into one table,
``targets.md`` / ``targets.json``: each target with its threshold, the ratio measured in
this run, and whether it is reached. A ratio is always of two numbers measured in the same
benchmark run; the three benchmarks run minutes apart, never at the same time.

The real Triton rows (4c, 6c and HTTP) need a running peer (``../shared/peers/triton``):
``--triton-url HOST:PORT`` (gRPC) and ``--triton-http-url HOST:PORT``; without them those
targets are listed as not measured.

Usage: ``python benchmarks/targets.py [--quick] [--out DIR] [--triton-url HOST:PORT]
[--triton-http-url HOST:PORT] [--update-readme README.md]``
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.machine import describe, markdown

HERE = Path(__file__).resolve().parent


class Target(NamedTuple):
    """One target: which benchmark's results hold it, and the start of its key there."""

    number: str  # as the issue numbers them
    source: str  # flight, shm or transports (the results file's stem)
    key: str  # the start of the benchmark's own name for the ratio
    op: str  # "<=" or ">="
    threshold: float


TARGETS = [
    Target("1a", "flight", "1 row, 1 in flight: server CPU", "<=", 3),
    Target("1b", "flight", "1 row, 8 in flight: server CPU", "<=", 3),
    Target("1c", "flight", "100 row, 1 in flight: server CPU", "<=", 3),
    Target("1d", "flight", "100 row, 8 in flight: server CPU", "<=", 3),
    Target("1e", "flight", "10000 rows, 1 in flight: server CPU", "<=", 1),
    Target("1e", "flight", "10000 rows, 8 in flight: server CPU", "<=", 1),
    Target("2", "flight", "one row, one at a time: p50", "<=", 2),
    Target("3a", "flight", "jet_tagger 32 clients: server CPU per row", "<=", 1.5),
    Target("3b", "flight", "jet_tagger 32 clients: rows/s", ">=", 0.5),
    Target("4a", "shm", "identity 4 MB: shm p50 / one numpy copy", "<=", 4),
    Target("4b", "shm", "identity 4 MB, 1 in flight: shm / Flight TCP", ">=", 5),
    Target("4b", "shm", "identity 32 MB, 1 in flight: shm / Flight TCP", ">=", 5),
    Target("4c", "transports", "4 MB: shm / real Triton gRPC + shm", ">=", 1),
    Target("4c", "transports", "32 MB: shm / real Triton gRPC + shm", ">=", 1),
    Target("5", "flight", "memory: peak - idle RSS", "<=", 4),
    Target("6a", "flight", "identity 4 MB: Flight / bare echo", ">=", 0.8),
    Target("6b", "flight", "identity 32 MB: Flight / bare echo", ">=", 0.8),
    Target("6c", "transports", "4 MB: kserve-grpc / real Triton gRPC", ">=", 0.7),
    Target("6c", "transports", "32 MB: kserve-grpc / real Triton gRPC", ">=", 0.7),
    *(
        Target("HTTP", "transports", f"{size}: kserve-http / real Triton HTTP", ">=", 1)
        for size in ("4 KB", "256 KB", "4 MB", "32 MB")
    ),
]

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def collect(ratios: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    """Each target with its measured ratio (None: not in this run's results).

    ``ratios``: each benchmark's ``targets`` (its JSON results), by source name.
    """
    rows: list[dict[str, object]] = []
    for target in TARGETS:
        found = {k: v for k, v in ratios.get(target.source, {}).items() if k.startswith(target.key)}
        if len(found) > 1:
            raise ValueError(f"{target.key!r} names {len(found)} ratios: {sorted(found)}")
        name, value = next(iter(found.items()), (target.key, None))
        reached = None if value is None else _OPS[target.op](value, target.threshold)
        rows.append(
            {
                "target": target.number,
                "ratio": name,
                "threshold": f"{target.op} {target.threshold:g}",
                "measured": value,
                "reached": reached,
                "source": f"{target.source}.md",
            }
        )
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| # | ratio (as its benchmark names it) | target | measured | reached | in |"]
    lines.append("|---|---|---:|---:|---|---|")
    for row in rows:
        value = row["measured"]
        measured = "not measured" if value is None else f"{value:.2f}"
        reached = {True: "yes", False: "**no**", None: "-"}[row["reached"]]  # type: ignore[index]
        lines.append(
            f"| {row['target']} | {row['ratio']} | {row['threshold']} | {measured} | "
            f"{reached} | {row['source']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--triton-url", metavar="HOST:PORT")
    parser.add_argument("--triton-http-url", metavar="HOST:PORT")
    parser.add_argument(
        "--update-readme", metavar="README", help="passed to arrowinfer bench: its table there"
    )
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    triton = []
    if args.triton_url:
        triton += ["--triton-url", args.triton_url]
    if args.triton_http_url:
        triton += ["--triton-http-url", args.triton_http_url]
    readme = ["--update-readme", args.update_readme] if args.update_readme else []
    runs = {
        "flight": [sys.executable, str(HERE / "flight.py"), *quick],
        "shm": [sys.executable, str(HERE / "shm.py"), *quick],
        "transports": [
            sys.executable,
            "-m",
            "arrowinfer.bench.transports",
            *quick,
            *triton,
            *readme,
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    ratios, took = {}, {}
    for name, command in runs.items():
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.monotonic()
        subprocess.run([*command, "--out", str(args.out)], check=True)
        took[name] = time.monotonic() - start
        ratios[name] = json.loads((args.out / f"{name}.json").read_text())["targets"]
    rows = collect(ratios)
    machine = describe()
    (args.out / "targets.json").write_text(
        json.dumps({"targets": rows, "seconds": took, "machine": machine}, indent=2)
    )
    reached = sum(row["reached"] is True for row in rows)
    text = "\n".join(
        [
            "# Every target, one run",
            "",
            f"`python benchmarks/targets.py{' --quick' if args.quick else ''}"
            f"{' --triton-url ... --triton-http-url ...' if triton else ''}`: "
            + ", ".join(f"{name}.md ({seconds / 60:.0f} min)" for name, seconds in took.items())
            + ", one after the other. Each ratio is of two numbers measured in the same "
            "benchmark; every benchmark's file has the cells with their server and client "
            "CPU per request. Targets numbered as in the performance issue; HTTP is the "
            "protocol issue's (kserve-http >= real Triton's HTTP on the same payload).",
            "",
            f"Reached: {reached} of {len(rows)}.",
            "",
            table(rows),
            "",
            markdown(machine),
        ]
    )
    (args.out / "targets.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
