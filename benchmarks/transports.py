"""Moved to :mod:`arrowinfer.bench.transports`: run ``arrowinfer bench`` (same options)."""

from __future__ import annotations

import sys

from arrowinfer.bench.transports import main

if __name__ == "__main__":
    sys.exit(main())
