"""The README's Python examples run as written, against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from arrowinfer.server import Server

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
URL = "grpc://127.0.0.1:8815"  # what the README's examples talk to (make serve's address)
# the whole programs among them (the others are fragments: `events` from a NanoAOD file, ...)
EXAMPLES = [
    b
    for b in re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    if URL in b and b.startswith("import ") and "Client(" in b
]


def test_the_readme_has_client_examples() -> None:
    assert len(EXAMPLES) >= 2  # Client and AsyncClient


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(example: str, example_repository: Path) -> None:
    with Server(
        example_repository,
        port=0,
        kserve_port=None,
        http_port=None,
        metrics_port=None,
        models=["facile", "jet_tagger"],
    ) as server:
        exec(compile(example.replace(URL, server.location), "README.md", "exec"), {})  # noqa: S102
