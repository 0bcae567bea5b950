"""Run a model over a file of events: Arrow IPC or Parquet in, Arrow IPC or Parquet out."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ..errors import InvalidInput
from ._client import Client

__all__ = ["infer_file", "read_batches"]


def read_batches(
    path: str | os.PathLike[str], rows: int
) -> tuple[pa.Schema, int, Iterator[pa.RecordBatch]]:
    """Schema, row count and batches of at most ``rows`` rows of an IPC or Parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        return (
            parquet.schema_arrow,
            parquet.metadata.num_rows,
            parquet.iter_batches(batch_size=rows),
        )
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        table = reader.read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    return table.schema, table.num_rows, iter(table.to_batches(max_chunksize=rows))


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
    """Stream a file's events through a model and write the results; returns rows written.

    ``columns`` maps model inputs to file columns as ``INPUT=COLUMN`` (default: same names).
    Output format by extension: ``.parquet`` or Arrow IPC file otherwise.
    """
    mapping = dict(c.split("=", 1) for c in columns or ())
    schema, total, batches = read_batches(input, batch_rows)
    output = Path(output)
    written = 0
    with Client(url) as client:
        names = client.schema(model).names
        missing = [n for n in names if mapping.get(n, n) not in schema.names]
        if missing:
            raise InvalidInput(
                f"{input}: no column for input(s) {missing} (map them as INPUT=COLUMN)",
                model=model,
                expected=[mapping.get(n, n) for n in names],
                got=schema.names,
            )

        def requests() -> Iterator[dict[str, pa.Array]]:
            for batch in batches:
                yield {n: batch.column(mapping.get(n, n)) for n in names}

        writer: pq.ParquetWriter | pa.ipc.RecordBatchFileWriter | None = None
        try:
            with tqdm(total=total, unit="rows", disable=not progress) as bar:
                for result in client.stream(model, requests()):
                    rows = result.replace_schema_metadata(None)  # drop the server times
                    if writer is None:
                        writer = (
                            pq.ParquetWriter(output, rows.schema)
                            if output.suffix == ".parquet"
                            else pa.ipc.new_file(output, rows.schema)
                        )
                    writer.write_batch(rows)
                    written += rows.num_rows
                    bar.update(rows.num_rows)
        finally:
            if writer is not None:
                writer.close()
    return written
