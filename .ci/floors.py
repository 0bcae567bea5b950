"""Print the declared minimum versions as exact pins, for `make test-min`.

Usage: python .ci/floors.py [EXTRA ...] > floors.txt   (Python >= 3.11: tomllib)

Reads pyproject.toml: every requirement of ``dependencies`` and of the named extras
(following ``arrowinfer[...]`` references) that has a ``>=`` floor becomes ``name==floor``;
one without a floor is printed as it is, so pip still installs it. Installing the result
with ``pip --only-binary :all:`` proves that the floors exist as wheels and, with the tests
run after it, that the code works with them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

_REQ = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$")


def floors(extras: list[str]) -> list[str]:
    """Return one pin per distinct requirement, in the order first met."""
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    pending = list(project["dependencies"])
    for extra in extras:
        pending += optional[extra]
    pins: dict[str, str] = {}
    while pending:
        match = _REQ.match(pending.pop(0).strip())
        if match is None:
            raise SystemExit(f"cannot read requirement {pending!r}")
        name, extra_part, spec = match.groups()
        if name == project["name"]:
            for extra in (extra_part or "[]")[1:-1].split(","):
                pending += optional[extra.strip()]
            continue
        floor = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        pins.setdefault(name, f"{name}{extra_part or ''}" + (f"=={floor[1]}" if floor else spec))
    return list(pins.values())


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:])))
