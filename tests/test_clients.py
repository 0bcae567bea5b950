"""The example client programs in clients/ run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arrowinfer.events import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_nanoaod_through_every_transport_writes_its_picture(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("uproot")
    data = shared_data_dir()
    if data is None or not (data / "nanoAOD_2015_CMS_Open_Data_ttbar.root").exists():
        pytest.fail("no CMS open-data sample: set $ARROWINFER_DATA")
    out = tmp_path / "transports.png"
    done = subprocess.run(
        [sys.executable, "clients/nanoaod_transports.py", "--repeat", "1", "--out", str(out)],
        check=False,
        cwd=ROOT,
        env={**os.environ, "ARROWINFER_DATA": str(data)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same scores through every transport" in done.stdout
    for transport in ("in-process", "flight-tcp", "flight-unix", "shm", "kserve-grpc"):
        assert transport in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
