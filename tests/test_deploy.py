"""The deployment files in ``servers/`` against the real server.

- Kubernetes manifests validate against the Kubernetes schemas (``kubernetes-validate``
  ships them: no network), and their flags, ports and probes are the server's real ones.
- The Containerfile's command parses with the real command line.
- The Slurm and HTCondor scripts run for real (``srun`` and ``hostname`` faked): a server
  starts, is published in the server list once ready, answers a client that reads the list
  through ``@FILE``, and leaves the list when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arrowinfer.cli import parser
from arrowinfer.client import Client
from arrowinfer.server import Server

yaml = pytest.importorskip("yaml", reason="needs PyYAML (comes with kubernetes-validate)")

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "servers"
KUBERNETES = SERVERS / "kubernetes"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def serve_options() -> dict[str, argparse.Action]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o: a for a in sub.choices["serve"]._actions for o in a.option_strings}


def parse(args: list[str]) -> argparse.Namespace:
    """Parse a command line with the real parser; unknown flags fail the test."""
    try:
        return parser().parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"arrowinfer does not accept {args}") from err


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# -- Kubernetes ------------------------------------------------------------------------------


def test_every_manifest_validates_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)  # raises on any error


def test_deployment_flags_ports_and_probes_are_the_servers() -> None:
    (deployment,) = by_kind("Deployment")
    spec = container(deployment)
    args = spec["args"]
    known = serve_options()
    flags = [a for a in args if a.startswith("-")]
    assert flags
    assert [f for f in flags if f not in known] == []
    options = parse(args)
    assert options.command == "serve"
    assert options.host == "0.0.0.0"

    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {
        "flight": options.port,
        "kserve": options.kserve_port,
        "metrics": options.metrics_port,
    }
    probes = {k: spec[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    for probe in probes.values():
        assert ports[probe["port"]] == options.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == options.metrics_port

    # the Service selects these pods and targets these named ports
    (service,) = by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    # the volume with the repository is mounted where the server reads it
    mounts = {m["mountPath"] for m in spec["volumeMounts"]}
    assert options.repository in mounts


def test_autoscaler_scales_the_deployment_on_queue_time() -> None:
    (deployment,) = by_kind("Deployment")
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # the adapter rule makes that metric from the counter the server exposes
    (adapter,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "adapter-config"]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]


def test_models_job_writes_where_the_servers_read() -> None:
    (job,) = by_kind("Job")
    spec = job["spec"]["template"]["spec"]["containers"][0]
    options = parse(spec["args"])
    assert options.command == "examples"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in (job, *by_kind("Deployment"))
        for v in d["spec"]["template"]["spec"]["volumes"]
    }
    assert claims == {by_kind("PersistentVolumeClaim")[0]["metadata"]["name"]}


def test_probe_paths_answer_on_a_real_server(example_repository: Path) -> None:
    (deployment,) = by_kind("Deployment")
    spec = container(deployment)
    paths = {spec[k]["httpGet"]["path"] for k in ("readinessProbe", "livenessProbe")}
    with Server(
        example_repository, port=0, kserve_port=None, metrics_port=0, models=["facile"]
    ) as server:
        for path in paths:
            url = f"http://127.0.0.1:{server.metrics_port}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200, path
        metrics = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(metrics, timeout=10) as response:
            assert "nv_inference_queue_duration_us{" in response.read().decode()


# -- Containerfile ---------------------------------------------------------------------------


def test_containerfile_command_and_ports() -> None:
    text = (SERVERS / "Containerfile").read_text()
    instructions = dict(re.findall(r"^(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", text, flags=re.MULTILINE))
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint == ["arrowinfer"]
    args = json.loads(instructions["CMD"])
    known = serve_options()
    assert [a for a in args if a.startswith("-") and a not in known] == []
    options = parse(args)
    assert (options.command, options.repository, options.host) == ("serve", "/models", "0.0.0.0")
    (expose,) = re.findall(r"^EXPOSE\s+(.+)$", text, flags=re.MULTILINE)
    assert sorted(int(p) for p in expose.split()) == sorted(
        [options.port, options.kserve_port, options.metrics_port]
    )
    assert "arrowinfer examples /models" in text


# -- Slurm and HTCondor ----------------------------------------------------------------------


def _serve_flags(script: str) -> list[str]:
    """The flags of every ``arrowinfer serve`` command line of a shell script."""
    joined = script.replace("\\\n", " ")
    flags = []
    for line in joined.splitlines():
        if "arrowinfer serve" in line and not line.lstrip().startswith("#"):
            flags += re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line.split("arrowinfer serve", 1)[1])
    return flags


@pytest.mark.parametrize(
    "script",
    ["slurm/arrowinfer-server.sbatch", "slurm/arrowinfer-client.sbatch", "htcondor/serve.sh"],
)
def test_batch_scripts_parse_and_use_real_flags(script: str) -> None:
    path = SERVERS / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    flags = _serve_flags(path.read_text())
    known = serve_options()
    assert [f for f in flags if f not in known] == []
    if script.endswith("server.sbatch"):
        assert {"--host", "--device", "--port", "--metrics-port"} <= set(flags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def default_http_port_taken() -> Iterator[None]:
    """Port 8000 (``serve``'s default HTTP port) held, as a second server on the node would:
    a job script must not serve HTTP on it. If something else holds it already, so be it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            holder.bind(("0.0.0.0", 8000))
            holder.listen()
        yield
    finally:
        holder.close()


@pytest.fixture
def fake_cluster(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with ``srun`` (runs the command here), ``hostname`` (127.0.0.1) and ``arrowinfer``."""
    for tool in ("curl", "flock"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
        "hostname": "#!/bin/sh\necho 127.0.0.1\n",
        "arrowinfer": f'#!/bin/sh\nexec {sys.executable} -m arrowinfer.cli "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return env, tmp_path / "servers.txt"


def _listed(path: Path) -> list[str]:
    return [u for u in path.read_text().split() if u.startswith("grpc")] if path.exists() else []


def _wait_listed(path: Path, process: subprocess.Popen[str], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while not _listed(path):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no server was published"
        time.sleep(0.2)
    return _listed(path)


def _check_client(listing: Path) -> None:
    hits = np.ones((4, 15), dtype=np.float32)
    with Client(f"@{listing}", timeout=30) as client:
        assert client.infer("facile", {"hits": hits}).num_rows == 4


def _stop(process: subprocess.Popen[str], group: bool) -> None:
    if group:  # as Slurm does: every process of the step
        os.killpg(process.pid, signal.SIGTERM)
    else:  # as condor_rm does: the job's process
        process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)  # until every process of the job has exited
    # the batch shell itself may die of the signal (Slurm's does); the server stops cleanly
    assert process.returncode in ((0, -signal.SIGTERM) if group else (0,)), out
    assert "server stopped" in out


@pytest.mark.usefixtures("default_http_port_taken")
def test_slurm_server_job_publishes_and_unpublishes(
    fake_cluster: tuple[dict[str, str], Path], example_repository: Path
) -> None:
    env, listing = fake_cluster
    flight, kserve, http, metrics = _free_port(), _free_port(), _free_port(), _free_port()
    env.update(
        ARROWINFER_SERVER_LIST=str(listing),
        ARROWINFER_MODELS=str(example_repository),
        ARROWINFER_DEVICE="cpu",
        ARROWINFER_FLIGHT_PORT=str(flight),
        ARROWINFER_KSERVE_PORT=str(kserve),
        ARROWINFER_HTTP_PORT=str(http),
        ARROWINFER_METRICS_PORT=str(metrics),
    )
    process = subprocess.Popen(
        ["bash", str(SERVERS / "slurm" / "arrowinfer-server.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert _wait_listed(listing, process) == [f"grpc://127.0.0.1:{flight}"]
        _check_client(listing)
        _stop(process, group=True)
        assert _listed(listing) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.mark.usefixtures("default_http_port_taken")
def test_htcondor_wrapper_publishes_and_unpublishes(
    fake_cluster: tuple[dict[str, str], Path], example_repository: Path
) -> None:
    env, listing = fake_cluster
    process = subprocess.Popen(
        [
            "bash",
            str(SERVERS / "htcondor" / "serve.sh"),
            str(example_repository),
            str(listing),
            "--model",
            "facile",
            "--device",
            "cpu",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        (url,) = _wait_listed(listing, process)
        assert url.startswith("grpc://127.0.0.1:")
        _check_client(listing)
        _stop(process, group=False)
        assert _listed(listing) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
