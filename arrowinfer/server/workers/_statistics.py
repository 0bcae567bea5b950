"""Summing the Triton statistics of several worker processes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["merge_statistics"]


def _add(a: Any, b: Any) -> Any:
    """Sum two Triton statistics JSON values leaf by leaf (numbers add, dicts recurse)."""
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) if k in b else a[k] for k in a} | {
            k: v for k, v in b.items() if k not in a
        }
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return a


def merge_statistics(sources: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum lists of Triton ``ModelStatistics`` JSON (one list per process) per model version.

    Counts and durations add up (arrowinfer's own counters too), ``batch_stats`` add up per
    batch size, and ``last_inference`` is the latest. Returns one entry per (name, version), sorted.
    """
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for stats in sources:
        for s in stats:
            key = (s["name"], s["version"])
            if key not in merged:
                merged[key] = json.loads(json.dumps(s))  # a deep copy of plain JSON
                continue
            into = merged[key]
            last = max(into.get("last_inference", 0), s.get("last_inference", 0))
            batches = {b["batch_size"]: b for b in into.get("batch_stats", [])}
            for b in s.get("batch_stats", []):
                size = b["batch_size"]
                batches[size] = _add(batches[size], b) if size in batches else dict(b)
            for name in ("inference_count", "execution_count", "inference_stats", "arrowinfer"):
                if name in s:
                    into[name] = _add(into[name], s[name]) if name in into else s[name]
            into["last_inference"] = last
            into["batch_stats"] = [{**b, "batch_size": size} for size, b in sorted(batches.items())]
    return [merged[key] for key in sorted(merged)]
