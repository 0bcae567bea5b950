"""Run a model over a file of events (kept for ``arrowinfer.client.infer_file``).

The work is done by :mod:`arrowinfer.files`, outside ``client/``, because it needs uproot,
awkward and tqdm, which a client on a worker node does not: they load only when this is
called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["infer_file"]


def infer_file(
    url: str,
    model: str,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_rows: int = 4096,
    columns: Sequence[str] | None = None,
    progress: bool = True,
) -> int:
    """Stream a file's events through a model and write the results; returns events written.

    ``columns`` maps model inputs to file columns as ``INPUT=COLUMN[,COLUMN...]`` (default:
    same names). The formats are those of :func:`arrowinfer.files.infer_files`.
    """
    from ..files import infer_files
    from ._client import Client

    mapping = {}
    for text in columns or ():
        name, _, cols = text.partition("=")
        mapping[name] = cols.split(",")
    with Client(url) as client:
        stats = infer_files(
            client,
            model,
            [os.fspath(input)],
            output,
            mapping=mapping,
            step_size=batch_rows,
            progress=progress,
        )
    return stats.events
