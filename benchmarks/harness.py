"""Moved to :mod:`arrowinfer.bench.harness` (installed with the package); kept for old imports."""

from __future__ import annotations

from arrowinfer.bench.harness import (
    Measurement,
    arrowinfer_server,
    echo_server,
    markdown_table,
    measure,
    process,
    rss_bytes,
)

__all__ = [
    "Measurement",
    "arrowinfer_server",
    "echo_server",
    "markdown_table",
    "measure",
    "process",
    "rss_bytes",
]
