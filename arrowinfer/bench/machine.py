"""Describe the machine a benchmark ran on, for its results file.

Every benchmark records :func:`describe` next to its numbers, so that results from
different machines are never compared by mistake. Only cheap, local reads: ``/proc``,
``/etc/os-release``, ``platform`` and installed package metadata (nothing is imported,
onnxruntime included).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["PACKAGES", "SIMD_FLAGS", "OtherLoad", "describe", "markdown"]

#: CPU flags that decide which onnxruntime (MLAS) and numpy kernels run.
SIMD_FLAGS: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile")

#: Packages whose versions matter to the numbers.
PACKAGES: tuple[str, ...] = (
    "numpy",
    "pyarrow",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "cupy",  # built from source; the wheels are named for their CUDA:
    "cupy-cuda12x",
    "cupy-cuda13x",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe() -> dict[str, object]:
    """The machine and software a benchmark runs on, as JSON-ready values.

    Returns
    -------
    dict
        ``cpu`` (model name), ``simd`` (which of :data:`SIMD_FLAGS` it has), ``cores``
        (logical CPUs this process may use), ``cpus_online``, ``cores_per_socket``,
        ``memory_gib``, ``os``, ``kernel``, ``machine``, ``load_average`` (1, 5 and 15
        minutes, when described: other work skews timings), ``python``, ``packages``
        (name -> version, installed ones only), ``commit`` (``git describe`` of the
        checkout, or None) and ``date`` (UTC, ISO 8601).
    """
    cpu = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    flags = set(cpu.get("flags", "").split())
    packages = {name: v for name in PACKAGES if (v := _version(name)) is not None}
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "simd": " ".join(f for f in SIMD_FLAGS if f in flags) or None,
        "cores": usable,
        "cpus_online": os.cpu_count(),
        "cores_per_socket": int(cpu["cpu cores"]) if cpu.get("cpu cores", "").isdigit() else None,
        "memory_gib": _memory_gib(),
        "os": _os_name(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": packages,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(description: dict[str, object]) -> str:
    """A :func:`describe` result as a two-column Markdown table."""
    lines = ["| | |", "|---|---|"]
    for key, value in description.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            text = "" if value is None else str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from ``/proc/stat``."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is already in user


class OtherLoad:
    """How busy the CPUs were with other processes between construction and :meth:`share`.

    Timings are only worth keeping from a quiet machine; this measures how quiet it was:
    the CPUs' busy time (``/proc/stat``) minus this process's own CPU time, as a share of
    all CPU time. ``None`` where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self._start = _cpu_jiffies()
        self._own = self._own_seconds()

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def share(self) -> float | None:
        """Other processes' CPU time since construction, as a fraction of all CPU time."""
        end = _cpu_jiffies()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self._start[0]) / tick
        total = (end[1] - self._start[1]) / tick
        own = self._own_seconds() - self._own
        return min(max((busy - own) / total, 0.0), 1.0)


if __name__ == "__main__":
    sys.stdout.write(markdown(describe()) + "\n")
