"""benchmarks/targets.py: the one table of every target, from the benchmarks' own ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("targets", ROOT / "benchmarks" / "targets.py")
assert _spec is not None
assert _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


def test_targets_are_read_from_the_benchmarks_ratios_and_judged() -> None:
    ratios = {
        "flight": {
            "1 row, 1 in flight: server CPU / bare echo's (<= 3)": 2.5,  # reached
            "1 row, 8 in flight: server CPU / bare echo's (<= 3)": 3.5,  # not
            "identity 4 MB: Flight / bare echo throughput (>= 0.8)": 0.8,  # on the line
        },
        "transports": {"4 KB: kserve-http / real Triton HTTP, binary tensor data (>= 1)": 0.4},
    }
    rows = {row["ratio"]: row for row in targets.collect(ratios)}
    assert len(rows) == len(targets.TARGETS)
    assert rows["1 row, 1 in flight: server CPU / bare echo's (<= 3)"]["reached"] is True
    assert rows["1 row, 8 in flight: server CPU / bare echo's (<= 3)"]["reached"] is False
    assert rows["identity 4 MB: Flight / bare echo throughput (>= 0.8)"]["reached"] is True
    http = rows["4 KB: kserve-http / real Triton HTTP, binary tensor data (>= 1)"]
    assert (http["target"], http["measured"], http["reached"]) == ("HTTP", 0.4, False)
    missing = rows["memory: peak - idle RSS"]  # no such ratio in this run: the key stands
    assert (missing["measured"], missing["reached"]) == (None, None)
    assert "not measured" in targets.table(list(rows.values()))


def test_a_key_naming_two_ratios_is_an_error() -> None:
    ratios = {
        "shm": {
            "identity 4 MB: shm p50 / one numpy copy p50": 9.0,
            "identity 4 MB: shm p50 / one numpy copy p50 (again)": 8.0,
        }
    }
    with pytest.raises(ValueError, match="names 2 ratios"):
        targets.collect(ratios)


def test_the_committed_run_has_every_target() -> None:
    """The keys in TARGETS are the names the benchmarks write: a renamed ratio, or a run
    that left one out, shows as not measured in the committed results and fails here."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "targets.json").read_text())["targets"]
    assert len(rows) == len(targets.TARGETS)
    assert [row["ratio"] for row in rows if row["measured"] is None] == []


@pytest.mark.parametrize("blocking", [False, True])
def test_a_blocking_client_keeps_each_request_in_flight_on_its_own_thread(blocking: bool) -> None:
    """measure(blocking=True) is the Triton peer's client: one thread per request in flight,
    each sending and waiting in a loop; otherwise at most 4 threads submit."""
    import threading
    import time
    from concurrent.futures import Future

    from arrowinfer.bench.harness import measure

    lock = threading.Lock()
    threads: set[int] = set()
    in_flight, most = [0], [0]

    def submit() -> Future[object]:
        with lock:
            threads.add(threading.get_ident())
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        future: Future[object] = Future()
        if blocking:
            time.sleep(0.002)
            with lock:
                in_flight[0] -= 1
            future.set_result(None)
        else:

            def finish() -> None:
                with lock:
                    in_flight[0] -= 1
                future.set_result(None)

            threading.Timer(0.002, finish).start()
        return future

    m = measure(
        "fake", submit, concurrency=6, warmup_s=0.1, window_s=0.1, max_windows=3, blocking=blocking
    )
    assert m.requests_per_s > 0
    assert most[0] == 6  # both keep every request in flight
    assert len(threads) == (6 if blocking else 4)


def test_a_benchmarked_server_runs_in_its_own_session() -> None:
    """As a service, or the Triton peer, does: the scheduler then shares CPU between the
    client's session and the server's, not between the server and each client thread."""
    import os
    import sys

    from arrowinfer.bench.harness import process

    command = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]
    with process(command, "ready") as (proc, _):
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
    assert proc.poll() is not None  # and it is stopped after
