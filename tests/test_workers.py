"""``arrowinfer serve --workers 2``: one port, two processes, one parent that supervises.

The server runs as a real subprocess (the command line), on ports it picks itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tritonclient.grpc as tg

from arrowinfer import tensors
from arrowinfer.client import Client
from arrowinfer.server.workers import merge_statistics

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@dataclass
class Running:
    process: subprocess.Popen[str]
    location: str
    metrics_port: int
    kserve_port: int
    output: list[str] = field(default_factory=list)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def health(self, which: str) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/v2/health/{which}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (labels must all match)."""
    total = None
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total = float(line.rsplit(" ", 1)[1])
    if total is None:
        raise KeyError(f"no sample {name}{labels} in the metrics")
    return total


def worker_pids(text: str) -> dict[str, int]:
    found = re.findall(r'arrowinfer_worker_up\{pid="(\d+)",worker="(\d+)"\} 1\.0', text)
    return {worker: int(pid) for pid, worker in found}


def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture
def workers(example_repository: Path) -> Iterator[Running]:
    args = [
        sys.executable,
        "-m",
        "arrowinfer.cli",
        "serve",
        str(example_repository),
        "--workers",
        "2",
        "--port",
        "0",
        "--kserve-port",
        "0",
        "--http-port",
        "-1",
        "--metrics-port",
        "0",
        "--model",
        "facile",
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    output: list[str] = []
    ports: dict[str, int] = {}
    location = None
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    for line in process.stdout:
        output.append(line)
        if m := re.search(r"workers\._pool: metrics on http://[^:]+:(\d+)/metrics", line):
            ports["metrics"] = int(m.group(1))
        if m := re.search(r"workers\._pool: KServe v2 gRPC listening on [^ ]+:(\d+)", line):
            ports["kserve"] = int(m.group(1))
        if m := re.search(r"serving .* on (\S+)", line):
            location = m.group(1)
            break
        assert time.monotonic() < deadline, "".join(output)
    assert location is not None, "".join(output)
    drain = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    drain.start()
    running = Running(process, location, ports["metrics"], ports["kserve"], output)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        drain.join(30)
        process.stdout.close()


def hits(rows: int, seed: int) -> pa.RecordBatch:
    values = np.random.default_rng(seed).standard_normal((rows, 15), dtype=np.float32)
    return pa.record_batch({"hits": tensors.from_numpy(values)})


def send(location: str, clients: int, requests: int, reference: Client) -> int:
    """``clients`` clients in threads, ``requests`` each; checks every result; returns rows."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with Client(location, retries=3) as client:
                for i in range(requests):
                    batch = hits(1 + (index + i) % 8, seed=index * 1000 + i)
                    got = client.infer("facile", batch)
                    want = reference.infer("facile", batch)
                    assert got.num_rows == batch.num_rows
                    np.testing.assert_array_equal(
                        tensors.to_numpy(got.column("energy")),
                        tensors.to_numpy(want.column("energy")),
                    )
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return clients * requests


def test_workers_share_the_port_restart_and_stop(
    workers: Running, example_repository: Path
) -> None:
    assert workers.location.startswith("grpc://127.0.0.1:")
    assert workers.health("live") == 200
    assert workers.health("ready") == 200
    text = workers.metrics()
    pids = worker_pids(text)
    assert sorted(pids) == ["0", "1"]
    assert workers.process.pid not in pids.values()

    with Client(None, fallback="local", repository=example_repository) as reference:
        sent = send(workers.location, clients=6, requests=10, reference=reference)
        text = workers.metrics()
        # one scrape sees every request, under Triton's names, summed over the workers
        assert sample(text, "nv_inference_request_success", model="facile", version="1") == sent
        per_worker = [
            sample(text, "arrowinfer_worker_request_success_total", worker=w, model="facile")
            for w in ("0", "1")
        ]
        assert sum(per_worker) == sent
        assert all(count > 0 for count in per_worker), per_worker  # the clients spread

        # KServe goes through the same parent, to a worker
        triton = tg.InferenceServerClient(f"127.0.0.1:{workers.kserve_port}")
        try:
            assert triton.is_server_ready()
            data = np.ones((3, 15), dtype=np.float32)
            request = tg.InferInput("hits", list(data.shape), "FP32")
            request.set_data_from_numpy(data)
            result = triton.infer("facile", [request]).as_numpy("energy")
        finally:
            triton.close()
        want = reference.infer("facile", {"hits": data})
        np.testing.assert_array_equal(
            result.ravel(), tensors.to_numpy(want.column("energy")).ravel()
        )
        sent += 1
        until(
            lambda: (
                sample(workers.metrics(), "nv_inference_request_success", model="facile") == sent
            )
        )

        # kill -9 one worker: the parent starts another, and service goes on
        os.kill(pids["0"], signal.SIGKILL)
        until(lambda: sample(workers.metrics(), "arrowinfer_worker_starts_total", worker="0") == 2)
        until(lambda: worker_pids(workers.metrics()).keys() == {"0", "1"})
        assert worker_pids(workers.metrics())["0"] != pids["0"]
        assert workers.health("ready") == 200
        sent += send(workers.location, clients=4, requests=5, reference=reference)
        text = workers.metrics()
        # the dead worker's counts (as last scraped) stay in the sum: counters never go down
        assert sample(text, "nv_inference_request_success", model="facile") == sent

    # SIGTERM: a clean exit, and no worker left behind
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(60) == 0, "".join(workers.output)
    for pid in worker_pids(text).values():
        until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repository"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "arrowinfer.cli",
            "serve",
            str(missing),
            "--workers",
            "2",
            "--port",
            "0",
            "--kserve-port",
            "-1",
            "--http-port",
            "-1",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "serving" not in result.stdout


def test_merge_statistics_sums_per_model_version() -> None:
    def stats(name: str, count: int, last: int, sizes: dict[int, int]) -> dict[str, object]:
        duration = {"count": count, "ns": 10 * count}
        return {
            "name": name,
            "version": "1",
            "last_inference": last,
            "inference_count": count,
            "execution_count": count,
            "inference_stats": {k: dict(duration) for k in ("success", "fail", "queue")},
            "batch_stats": [
                {"batch_size": size, "compute_infer": {"count": n, "ns": n}}
                for size, n in sizes.items()
            ],
        }

    merged = merge_statistics(
        [[stats("a", 2, 5, {1: 2})], [stats("a", 3, 9, {1: 1, 4: 2}), stats("b", 1, 1, {})], []]
    )
    assert [m["name"] for m in merged] == ["a", "b"]
    a = merged[0]
    assert a["inference_count"] == 5
    assert a["last_inference"] == 9
    assert a["inference_stats"]["success"] == {"count": 5, "ns": 50}
    assert a["batch_stats"] == [
        {"batch_size": 1, "compute_infer": {"count": 3, "ns": 3}},
        {"batch_size": 4, "compute_infer": {"count": 2, "ns": 2}},
    ]
    assert merged[1]["inference_count"] == 1
