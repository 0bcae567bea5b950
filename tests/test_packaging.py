"""The dependency shape in pyproject.toml, and the files that install from it.

A client install is pyarrow + numpy; the server, the local fallback and the GPU build are
extras; the gpu extra replaces onnxruntime (the two wheels install the same module, so
having both leaves whichever was installed last); the Containerfile installs an extra that
exists; the floors that `make test-min` installs are the declared ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert match is not None, requirement
    return match[0].lower().replace("_", "-")


def resolved(requirements: list[str]) -> set[str]:
    """Distribution names, with the project's own ``arrowinfer[...]`` extras expanded."""
    names: set[str] = set()
    for requirement in requirements:
        if name(requirement) == PROJECT["name"]:
            inner = re.search(r"\[(.*)\]", requirement)
            assert inner is not None, requirement
            for extra in inner[1].split(","):
                names |= resolved(EXTRAS[extra.strip()])
        else:
            names.add(name(requirement))
    return names


def test_the_client_needs_pyarrow_and_numpy_only() -> None:
    assert resolved(PROJECT["dependencies"]) == {"pyarrow", "numpy"}


@pytest.mark.parametrize("extra", ["server", "fallback", "test", "bench"])
def test_cpu_extras_have_onnxruntime_and_not_the_gpu_build(extra: str) -> None:
    names = resolved(EXTRAS[extra])
    assert "onnxruntime" in names
    assert "onnxruntime-gpu" not in names


def test_the_gpu_extra_serves_with_onnxruntime_gpu_instead_of_onnxruntime() -> None:
    gpu = resolved(EXTRAS["gpu"])
    assert "onnxruntime" not in gpu
    assert {"onnxruntime-gpu", "cupy-cuda12x"} <= gpu
    assert resolved(EXTRAS["server"]) - {"onnxruntime"} <= gpu  # all else a server needs


def test_test_extra_installs_what_serving_fallback_and_tests_need() -> None:
    assert resolved(EXTRAS["server"]) | resolved(EXTRAS["fallback"]) <= resolved(EXTRAS["test"])
    assert {"pytest", "hypothesis", "awkward", "dask"} <= resolved(EXTRAS["test"])


def test_bench_extra_has_every_client_the_benchmark_drives() -> None:
    """``arrowinfer bench`` drives KServe HTTP with tritonclient.http (its gevent client):
    the server extra's tritonclient[grpc] alone made it fail at its first HTTP cell."""
    assert any(re.fullmatch(r"tritonclient\[[^\]]*\bhttp\b[^\]]*\].*", r) for r in EXTRAS["bench"])
    assert "matplotlib" in resolved(EXTRAS["bench"])


def test_checkers_are_pinned_to_a_minor_version() -> None:
    dev = {name(r): r for r in EXTRAS["dev"]}
    for tool in ("ruff", "mypy"):
        assert re.fullmatch(rf"{tool}~=\d+\.\d+\.\d+", dev[tool]), dev[tool]


def test_pyarrow_floor_has_concat_batches() -> None:
    (pyarrow,) = [r for r in PROJECT["dependencies"] if name(r) == "pyarrow"]
    floor = re.search(r">=\s*(\d+)", pyarrow)
    assert floor is not None
    assert int(floor[1]) >= 19  # pa.concat_batches


def test_floors_pins_every_declared_floor_exactly() -> None:
    out = subprocess.run(
        [sys.executable, ".ci/floors.py", "server", "awkward"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pins = dict(line.split("==") for line in out)
    assert pins["pyarrow"] == "19"
    (onnxruntime,) = [r for r in EXTRAS["fallback"] if name(r) == "onnxruntime"]
    assert f"onnxruntime>={pins['onnxruntime']}" == onnxruntime
    assert {"pyarrow", "numpy", "onnxruntime", "onnx", "grpcio", "awkward"} <= set(pins)
    assert "arrowinfer" not in pins


def test_containerfile_installs_existing_extras() -> None:
    text = (ROOT / "servers" / "Containerfile").read_text()
    (default,) = re.findall(r"^ARG EXTRA=(\S+)$", text, flags=re.MULTILINE)
    assert default == "server"
    assert 'pip install --no-cache-dir ".[${EXTRA}]"' in text
    for extra in re.findall(r"--build-arg EXTRA=(\w+)", text):
        assert extra in EXTRAS
