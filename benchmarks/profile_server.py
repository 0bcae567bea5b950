"""Profile the server under one-row ``facile`` requests with py-spy, and summarise it.

The server runs in its own process (``arrowinfer serve``); this process keeps ``--window``
one-row requests in flight on one stream while ``py-spy record`` samples the server:
once with ``--gil`` (only samples holding the GIL: where the Python time goes) and once
with ``--native`` and idle threads included (where every thread waits or spins). Each
profile is summarised as the functions with the most samples, inclusive and self, and
the share of samples per thread.

Needs ``py-spy`` (``pip install py-spy``) and permission to ptrace the server.

Usage: ``python benchmarks/profile_server.py [--window 8] [--seconds 10] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.harness import arrowinfer_server, client_cpu_s, server_cpu_s
from arrowinfer.bench.requests import make_request
from arrowinfer.client import Client, conform
from arrowinfer.examples import write_example_repository


def _load(stop: threading.Event, location: str, window: int, rows: int, count: list[int]) -> None:
    with Client(location) as client:
        batch = conform(make_request("facile", rows), client.schema("facile"), model="facile")
        pending = collections.deque(client.infer_async("facile", batch) for _ in range(window))
        while not stop.is_set():
            pending.popleft().result()
            count[0] += 1
            pending.append(client.infer_async("facile", batch))
        for future in pending:
            future.result()


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process, by ``thread-name (tid)`` (from /proc)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended
        out[f"{name} ({task.name})"] = (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK"
        )
    return out


def thread_table(before: dict[str, float], after: dict[str, float], requests: int) -> str:
    """CPU microseconds per request of each thread that used any, busiest first."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    rows = [
        f"| {name} | {seconds / max(requests, 1) * 1e6:,.0f} |"
        for name, seconds in sorted(used.items(), key=lambda kv: -kv[1])
        if seconds > 0
    ]
    return "\n".join(["| thread (from /proc) | CPU us/request |", "|---|---:|", *rows, ""])


def summarise(folded: Path, top: int = 25) -> str:
    """A py-spy ``--format raw`` (folded stacks) profile as Markdown tables."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        samples = int(n)
        total += samples
        frames = stack.split(";")
        threads[frames[0]] += samples
        for frame in set(frames[1:]):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    total = max(total, 1)

    def table(title: str, counts: collections.Counter[str]) -> list[str]:
        rows = [
            f"| {100 * n / total:.1f} % | `{name[:110]}` |" for name, n in counts.most_common(top)
        ]
        return [f"**{title}**", "", "| samples | function |", "|---:|---|", *rows, ""]

    return "\n".join(
        [
            f"{total} samples.",
            "",
            *table("Threads", threads),
            *table("Inclusive", inclusive),
            *table("Self", own),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=int, default=8, help="requests in flight")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the summary here (Markdown)")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    repository = write_example_repository(Path(tempfile.mkdtemp()) / "repo")
    work = Path(tempfile.mkdtemp())
    sections = []
    with arrowinfer_server(repository, "--model", "facile") as (proc, location):
        stop = threading.Event()
        count = [0]
        load = threading.Thread(
            target=_load, args=(stop, location, args.window, args.rows, count), daemon=True
        )
        load.start()
        while count[0] < 2000:  # warm: lazy imports (pyarrow's pandas shim), first runs
            time.sleep(0.1)
        try:
            # (--native needs the process paused while it unwinds: no --nonblocking there)
            for mode, flags in (
                ("gil", ["--gil", "--nonblocking"]),
                ("native", ["--native"]),
            ):
                out = work / f"{mode}.txt"
                before = (count[0], server_cpu_s((proc.pid,)), client_cpu_s())
                threads_before = thread_cpu_s(proc.pid)
                subprocess.run(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--duration",
                        str(args.seconds),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--threads",
                        "-o",
                        str(out),
                        *flags,
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                done = count[0] - before[0]
                threads = thread_table(threads_before, thread_cpu_s(proc.pid), done)
                server = (server_cpu_s((proc.pid,)) - before[1]) / max(done, 1) * 1e6
                sections.append(
                    f"### py-spy record {' '.join(flags)} ({done} requests of {args.rows} row(s), "
                    f"window {args.window}; server CPU {server:,.0f} us/request while sampled)\n\n"
                    + threads
                    + "\n"
                    + summarise(out)
                )
        finally:
            stop.set()
            load.join(60)
    text = "\n".join(sections)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
