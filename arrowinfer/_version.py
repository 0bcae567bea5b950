"""The package's version, written in one place: ``version`` in pyproject.toml.

Installed (from a wheel, a source archive without ``.git``, or editable), it is the
installed distribution's metadata; run from a source tree that is not installed, it is read
from that tree's pyproject.toml.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

__all__ = ["__version__"]


def _version() -> str:
    try:
        return metadata.version("arrowinfer")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text("utf-8"))
        if found:
            return found.group(1)
    return "0+unknown"


__version__ = _version()
