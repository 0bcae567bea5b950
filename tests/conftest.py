"""Shared fixtures: the example repository, and real servers on ephemeral loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from arrowinfer.examples import write_example_repository
from arrowinfer.server import Server

# this machine is shared and noisy: no hypothesis deadlines
settings.register_profile("arrowinfer", deadline=None, max_examples=50)
settings.load_profile("arrowinfer")


@pytest.fixture(scope="session")
def example_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model repository, written once per test session."""
    return write_example_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def server(example_repository: Path) -> Iterator[Server]:
    """A real server over the example repository: Flight, KServe gRPC and HTTP, metrics."""
    with Server(example_repository, port=0, kserve_port=0, http_port=0, metrics_port=0) as running:
        yield running
