"""Event files in, results beside the events out: what ``arrowinfer infer`` runs.

Inputs are ROOT files (read with uproot, ``tree`` default ``Events``), Parquet or Arrow IPC
files, local paths, globs or remote URLs (``http(s)://`` through uproot/fsspec; ``root://``
needs uproot's optional XRootD handler, ``fsspec-xrootd``). They are read ``step_size``
events at a time and each chunk is one request, pipelined to the server(s) with at most
``window`` chunks in flight, so memory is bounded whatever the file size.

Model inputs are built from columns (:func:`build_request`):

- ``NAME=COL`` with COL already in the model's layout (a tensor column): passed as it is;
- ``NAME=A,B,...`` of per-event scalars: stacked into one ``[n]`` tensor per event;
- ``NAME=Jet_pt,Jet_eta,...`` of per-object lists with the same counts: stacked into a
  ragged ``[var, n]`` per event when the model takes ragged input (its config's
  ``arrowinfer.ragged_inputs``), else into one request row per object (a per-object model,
  such as a per-jet tagger), whose results are regrouped into per-event lists.

The output has one row per event: the identifying columns kept from the input (``keep``,
default ``run, luminosityBlock, event`` where present) and the model's outputs, written as
Parquet, Arrow IPC (``.arrow``/``.feather``) or a ROOT TTree (``.root``, uproot's writer).
It is written to a hidden file beside the target and renamed into place when complete; on
Ctrl-C the rows written so far are renamed into place (a valid, shorter file), on any
error nothing is left.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import tensors
from .errors import InvalidInput

__all__ = [
    "DEFAULT_KEEP",
    "OUTPUT_FORMATS",
    "EventFiles",
    "FileArgumentError",
    "InferStats",
    "build_request",
    "check_output",
    "infer_files",
    "regroup",
]

#: Identifying columns copied from input to output when the input has them.
DEFAULT_KEEP = ("run", "luminosityBlock", "event")

#: Output file extensions and their format.
OUTPUT_FORMATS = {".parquet": "parquet", ".arrow": "ipc", ".feather": "ipc", ".root": "root"}

_INPUT_FORMATS = {
    ".root": "root",
    ".parquet": "parquet",
    ".parq": "parquet",
    ".arrow": "ipc",
    ".arrows": "ipc",
    ".feather": "ipc",
    ".ipc": "ipc",
}


class FileArgumentError(ValueError):
    """A wrong file argument: missing, unreadable, unknown format, unwritable output."""


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _suffix(path: str) -> str:
    return Path(path.split("?", 1)[0]).suffix.lower()


def expand(paths: Sequence[str]) -> list[str]:
    """Local paths and globs expanded (sorted) and checked readable; URLs kept as given.

    Raises
    ------
    FileArgumentError
        A glob that matches nothing, a missing or unreadable file.
    """
    out: list[str] = []
    for path in paths:
        if _is_url(path):
            out.append(path)
            continue
        local = os.path.expanduser(path.removeprefix("file://"))
        if glob.has_magic(local):
            matches = sorted(glob.glob(local))
            if not matches:
                raise FileArgumentError(f"{local}: no file matches")
            out += matches
        elif not os.path.isfile(local):
            raise FileArgumentError(f"{local}: no such file")
        elif not os.access(local, os.R_OK):
            raise FileArgumentError(f"{local}: cannot read it (permission denied)")
        else:
            out.append(local)
    return out


def _arrow_from_awkward(array: Any) -> pa.Table:
    import awkward as ak

    table = ak.to_arrow_table(
        array, extensionarray=False, list_to32=True, string_to32=True, bytestring_to32=True
    )
    return table.replace_schema_metadata(None)


class EventFiles:
    """One or several event files of one format, read in chunks of ``step_size`` events.

    Parameters
    ----------
    paths
        Files, globs or URLs (see the module docstring); all of one format, chosen by the
        extension.
    tree
        The TTree of ROOT files.

    Raises
    ------
    FileArgumentError
        No file, an unknown or mixed format, a file that cannot be opened or has no ``tree``.
    """

    def __init__(self, paths: Sequence[str], *, tree: str = "Events"):
        self.paths = expand(paths)
        if not self.paths:
            raise FileArgumentError("no input file")
        formats = {_INPUT_FORMATS.get(_suffix(p)) for p in self.paths}
        if None in formats:
            bad = next(p for p in self.paths if _suffix(p) not in _INPUT_FORMATS)
            raise FileArgumentError(
                f"{bad}: unknown input format {_suffix(bad) or '(no extension)'!r} "
                f"(expected {', '.join(sorted(_INPUT_FORMATS))})"
            )
        if len(formats) > 1:
            raise FileArgumentError(f"input files of mixed formats: {sorted(map(str, formats))}")
        self.format = formats.pop()
        self.tree = tree
        self.columns, self.num_events = self._inspect()

    def _open(self, path: str) -> Any:
        """A readable file object for Parquet and IPC (fsspec for URLs)."""
        if _is_url(path):
            import fsspec  # type: ignore[import-untyped]

            return fsspec.open(path, "rb").open()
        # Read, not memory-mapped: mapped pages of a file read end to end would count in the
        # process's memory for as long as the file is open, growing with the file.
        return pa.OSFile(path)

    def _inspect(self) -> tuple[list[str], int]:
        names: list[str] | None = None
        total = 0
        for path in self.paths:
            try:
                file_names, entries = self._inspect_one(path)
            except FileArgumentError:
                raise
            except Exception as err:  # noqa: BLE001 - uproot, pyarrow, fsspec: each its own
                raise FileArgumentError(f"{path}: cannot read it as {self.format}: {err}") from None
            names = file_names if names is None else [n for n in names if n in file_names]
            total += entries
        return names or [], total

    def _inspect_one(self, path: str) -> tuple[list[str], int]:
        if self.format == "root":
            import uproot

            with uproot.open(path) as file:
                if self.tree not in file:
                    trees = [k.split(";")[0] for k, c in file.classnames().items() if c == "TTree"]
                    raise FileArgumentError(
                        f"{path}: no tree {self.tree!r} (trees: {', '.join(trees) or 'none'}; "
                        "choose one with --tree)"
                    )
                tree = file[self.tree]
                return list(tree.keys()), int(tree.num_entries)
        if self.format == "parquet":
            meta = pq.ParquetFile(self._open(path))
            return meta.schema_arrow.names, meta.metadata.num_rows
        with self._ipc_reader(path) as batches:
            schema, rows = None, 0
            for batch in batches:
                schema = batch.schema
                rows += batch.num_rows
            if schema is None:
                schema = self._ipc_schema(path)
            return schema.names, rows

    def _ipc_schema(self, path: str) -> pa.Schema:
        source = self._open(path)
        try:
            return pa.ipc.open_file(source).schema
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(self._open(path)).schema

    @contextlib.contextmanager
    def _ipc_reader(self, path: str) -> Iterator[Iterator[pa.RecordBatch]]:
        source = self._open(path)
        try:
            reader = pa.ipc.open_file(source)
            yield (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.close()
            source = self._open(path)
            yield iter(pa.ipc.open_stream(source))
        finally:
            source.close()

    def iterate(self, columns: Sequence[str], step_size: int) -> Iterator[pa.Table]:
        """Tables of at most ``step_size`` events with these columns, file after file."""
        for path in self.paths:
            if self.format == "root":
                import uproot

                with uproot.open(path) as file:
                    for array in file[self.tree].iterate(
                        list(columns), step_size=step_size, library="ak"
                    ):
                        yield _arrow_from_awkward(array).select(list(columns))
            elif self.format == "parquet":
                # pre_buffer (pyarrow's default) keeps the raw column chunks it read ahead
                # until the file is closed: memory would grow with the file.
                parquet = pq.ParquetFile(self._open(path), pre_buffer=False)
                for batch in parquet.iter_batches(batch_size=step_size, columns=list(columns)):
                    yield pa.Table.from_batches([batch])
            else:
                with self._ipc_reader(path) as batches:
                    for batch in batches:
                        for start in range(0, batch.num_rows, step_size):
                            chunk = batch.slice(start, step_size).select(list(columns))
                            yield pa.Table.from_batches([chunk])


# --------------------------------------------------------------------------------------
# Model inputs from columns, results back per event
# --------------------------------------------------------------------------------------


def _is_list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_)


def _is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)


def _counts(column: pa.Array) -> np.ndarray:
    return column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)


def build_request(
    table: pa.Table,
    mapping: Mapping[str, Sequence[str]],
    schema: pa.Schema,
    *,
    model: str,
) -> tuple[dict[str, pa.Array | np.ndarray | tensors.Ragged], np.ndarray | None]:
    """The request of one chunk of events, and the per-event object counts if per-object.

    Parameters
    ----------
    table
        A chunk of events, one row per event.
    mapping
        Model input name -> the column(s) that make it (default: the column of the
        input's name).
    schema
        The model's input schema (``Client.schema``).

    Returns
    -------
    (inputs, counts)
        ``inputs`` maps each model input to its column; ``counts`` is None when a request row
        is an event, else the number of objects of each event (request rows are objects).

    Raises
    ------
    InvalidInput
        A missing column, lists of different lengths in one event, per-event and
        per-object columns mixed, a column that is neither numbers nor lists of numbers.
    """
    inputs: dict[str, pa.Array | np.ndarray | tensors.Ragged] = {}
    counts: np.ndarray | None = None
    per_event: list[str] = []
    for field in schema:
        names = list(mapping.get(field.name, [field.name]))
        missing = [c for c in names if c not in table.column_names]
        if missing:
            raise InvalidInput(
                f"no column {missing} (map inputs as --input NAME=COL[,COL...])",
                model=model,
                input=field.name,
                got=table.column_names,
            )
        columns = [table.column(c).combine_chunks() for c in names]
        want = tensors.layout(field.type)
        dtype = want.value_type.to_pandas_dtype()
        lists = [_is_list(c.type) and _is_number(c.type.value_type) for c in columns]
        if len(columns) == 1 and not lists[0] and not _is_number(columns[0].type):
            inputs[field.name] = columns[0]  # a tensor column already: as it is
            per_event.append(field.name)
            continue
        if not all(lists) and any(lists):
            raise InvalidInput(
                f"columns {names} mix per-object lists and per-event values",
                model=model,
                input=field.name,
            )
        if not all(_is_list(c.type) or _is_number(c.type) for c in columns):
            raise InvalidInput(
                f"columns {names} are not numbers or lists of numbers",
                model=model,
                input=field.name,
                got=[str(c.type) for c in columns],
            )
        if not lists[0]:
            values = np.stack([c.to_numpy(zero_copy_only=False) for c in columns], axis=1)
            inputs[field.name] = np.ascontiguousarray(values, dtype=dtype)
            per_event.append(field.name)
            continue
        n = [_counts(c) for c in columns]
        for name, other in zip(names[1:], n[1:], strict=True):
            if not np.array_equal(n[0], other):
                raise InvalidInput(
                    f"columns {names[0]} and {name} have different lengths in some events "
                    "(not one collection)",
                    model=model,
                    input=field.name,
                )
        values = np.stack([c.flatten().to_numpy(zero_copy_only=False) for c in columns], axis=1)
        values = np.ascontiguousarray(values, dtype=dtype)
        offsets = np.zeros(len(n[0]) + 1, dtype=np.int32)
        np.cumsum(n[0], out=offsets[1:])
        if want.ragged:  # the model takes each event's collection: [var, k] per event
            if want.shape == (-1,) and values.shape[1] == 1:
                values = values[:, 0]
            inputs[field.name] = tensors.Ragged(offsets, values)
            per_event.append(field.name)
        else:  # a per-object model: one request row per object
            if counts is not None and not np.array_equal(counts, n[0]):
                raise InvalidInput(
                    "per-object inputs come from collections of different sizes",
                    model=model,
                    input=field.name,
                )
            counts = n[0]
            if want.shape == () and values.shape[1] == 1:
                values = values[:, 0]
            inputs[field.name] = values
    if counts is not None and per_event:
        raise InvalidInput(
            f"inputs {per_event} are per event but the others are per object; a model takes "
            "one or the other",
            model=model,
        )
    return inputs, counts


def _plain(column: pa.Array) -> pa.Array:
    """A ``fixed_shape_tensor`` column as nested ``fixed_size_list`` (same buffers)."""
    if isinstance(column.type, pa.FixedShapeTensorType):
        out = column.storage.flatten()
        for size in reversed(column.type.shape):
            out = pa.FixedSizeListArray.from_arrays(out, size)
        return out
    return column


def regroup(result: pa.RecordBatch, counts: np.ndarray) -> pa.RecordBatch:
    """Per-object results as per-event lists: row i holds the ``counts[i]`` objects of event i.

    An output of one value per object becomes a list of numbers; larger outputs lists of
    ``fixed_size_list``. Values are not copied.
    """
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    columns = []
    for column in result.columns:
        values = _plain(column)
        if (
            pa.types.is_fixed_size_list(values.type)
            and values.type.list_size == 1
            and not pa.types.is_fixed_size_list(values.type.value_type)
        ):
            values = values.flatten()
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), values))
    return pa.RecordBatch.from_arrays(columns, names=result.schema.names)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def check_output(path: str | os.PathLike[str]) -> str:
    """The output format of a path, checked writable before anything runs.

    Raises
    ------
    FileArgumentError
        Unknown extension, missing or unwritable directory, a directory as output.
    """
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FileArgumentError(
            f"{path}: unknown output format {path.suffix or '(no extension)'!r} "
            f"(expected {', '.join(OUTPUT_FORMATS)})"
        )
    parent = path.parent
    if path.is_dir():
        raise FileArgumentError(f"{path}: is a directory")
    if not parent.is_dir():
        raise FileArgumentError(f"{path}: no such directory {str(parent)!r}")
    # Try it: permission bits say nothing for root, a read-only mount or /proc.
    probe = parent / f".{path.name}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as err:
        raise FileArgumentError(f"{path}: cannot write there ({err.strerror})") from None
    return fmt


def _required(type: pa.DataType) -> pa.DataType:
    """``type`` with every nested list item declared non-nullable."""
    if pa.types.is_list(type) or pa.types.is_large_list(type) or pa.types.is_fixed_size_list(type):
        item = pa.field(type.value_field.name, _required(type.value_type), nullable=False)
        if pa.types.is_fixed_size_list(type):
            return pa.list_(item, type.list_size)
        return pa.large_list(item) if pa.types.is_large_list(type) else pa.list_(item)
    return type


def _for_root(table: pa.Table) -> dict[str, Any]:
    """Branches for uproot's writer: awkward arrays, regular dimensions as numpy."""
    import awkward as ak

    columns = [_plain(c.combine_chunks()) for c in table.columns]
    # Results have no nulls: declared so, awkward reads no option types (``?float32``), which
    # older uproot writers refuse. A view: the buffers are the same.
    fields = [
        pa.field(name, _required(c.type), nullable=False)
        for name, c in zip(table.column_names, columns, strict=True)
    ]
    plain = pa.table(
        [c.view(f.type) for c, f in zip(columns, fields, strict=True)], schema=pa.schema(fields)
    )
    array = ak.from_arrow(plain, highlevel=True)
    return {name: array[name] for name in table.column_names}


class _Writer:
    """Writes result tables to a hidden file; ``commit`` renames it into place."""

    def __init__(self, path: Path, fmt: str, tree: str):
        self.path = path
        self.fmt = fmt
        self.tree = tree
        self.tmp = path.with_name(f".{path.name}.partial")
        self._writer: Any = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.tmp, table.schema)
            elif self.fmt == "ipc":
                self._writer = pa.ipc.new_file(self.tmp, table.schema)
            else:
                import uproot

                self._writer = uproot.recreate(self.tmp)
        if self.fmt == "root":
            branches = _for_root(table)
            if self.tree in self._writer:
                self._writer[self.tree].extend(branches)
            else:
                self._writer[self.tree] = branches
        else:
            self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def commit(self) -> None:
        """Rename what was written into place; without a row written, leave nothing."""
        if self.rows == 0:  # also a Ctrl-C inside the first writer's constructor
            self.discard()
            return
        self.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


# --------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------


@dataclass
class InferStats:
    """What :func:`infer_files` did.

    ``max_in_flight`` is the most events read but not yet written at any moment: at most
    ``window * step_size``, whatever the file size.
    """

    events: int = 0
    chunks: int = 0
    max_in_flight: int = 0
    interrupted: bool = False


def _did_you_mean(wrong: list[str], names: Sequence[str]) -> str:
    """``"; did you mean 'Jet_mass'?"`` for the names close to a wrong one, else ``""``."""
    close = [m for w in wrong for m in difflib.get_close_matches(w, names, n=1)]
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def infer_files(
    client: Any,
    model: str,
    inputs: Sequence[str],
    output: str | os.PathLike[str],
    *,
    mapping: Mapping[str, Sequence[str]] | None = None,
    keep: Sequence[str] | None = None,
    tree: str = "Events",
    step_size: int = 5000,
    window: int = 4,
    progress: bool = False,
    on_chunk: Callable[[InferStats], None] | None = None,
) -> InferStats:
    """Run a model over event files and write one result row per event.

    Parameters
    ----------
    client
        An :class:`arrowinfer.client.Client` (servers, ``local``, or with a fallback).
    model
        Model name, ``NAME`` or ``NAME/VERSION``.
    inputs
        Event files, globs or URLs (:class:`EventFiles`).
    output
        ``.parquet``, ``.arrow``/``.feather`` or ``.root``.
    mapping
        Model input -> column(s) (:func:`build_request`).
    keep
        Columns copied through (default: those of :data:`DEFAULT_KEEP` the input has).
    step_size
        Events per chunk (one request each).
    window
        Chunks in flight at once.
    progress
        Show a progress bar with events/s (on stderr).
    on_chunk
        Called after each chunk is written.

    Returns
    -------
    InferStats
        ``interrupted`` is True after Ctrl-C: the output then holds the events done so far.

    Raises
    ------
    FileArgumentError
        Bad input or output files, inputs without events (before anything is written).
    InvalidInput
        Columns that do not make the model's inputs.
    arrowinfer.errors.ArrowInferError
        From the client; nothing is left at ``output``.
    """
    if step_size < 1 or window < 1:
        raise FileArgumentError(f"step_size and window must be at least 1: {step_size}, {window}")
    fmt = check_output(output)
    files = EventFiles(inputs, tree=tree)
    if files.num_events == 0:
        raise FileArgumentError(f"{', '.join(files.paths)}: no events to run over")
    mapping = dict(mapping or {})
    schema = client.schema(model)
    unknown = [name for name in mapping if name not in schema.names]
    if unknown:  # a typo, or an input the server fills (a mask): never silently unused
        raise InvalidInput(
            f"--input names {unknown}, which the model does not take"
            + _did_you_mean(unknown, schema.names),
            model=model,
            expected=schema.names,
            got=list(mapping),
        )
    needed = [c for name in schema.names for c in mapping.get(name, [name])]
    missing = [c for c in needed if c not in files.columns]
    if missing:
        raise InvalidInput(
            f"no column {missing} in {files.paths[0]}"
            + _did_you_mean(missing, files.columns)
            + " (map inputs as --input NAME=COL[,COL...])",
            model=model,
            expected=needed,
            got=files.columns if len(files.columns) <= 20 else f"{len(files.columns)} columns",
        )
    if keep is None:
        keep = [c for c in DEFAULT_KEEP if c in files.columns]
    absent = [c for c in keep if c not in files.columns]
    if absent:
        raise FileArgumentError(f"--keep: no column {absent} in {files.paths[0]}")
    columns = list(dict.fromkeys([*keep, *needed]))

    stats = InferStats()
    pending: deque[tuple[pa.Table, np.ndarray | None]] = deque()

    def requests() -> Iterator[dict[str, Any]]:
        for chunk in files.iterate(columns, step_size):
            request, counts = build_request(chunk, mapping, schema, model=model)
            pending.append((chunk.select(list(keep)), counts))
            stats.max_in_flight = max(stats.max_in_flight, sum(len(k) for k, _ in pending))
            yield request

    from tqdm import tqdm

    writer = _Writer(Path(output), fmt, tree)
    bar = tqdm(total=files.num_events, unit=" events", disable=not progress, dynamic_ncols=True)
    try:
        for answer in client.stream(model, requests(), window=window):
            kept, counts = pending.popleft()
            result = answer.replace_schema_metadata(None)  # drop the server times
            if counts is not None:
                result = regroup(result, counts)
            clash = [n for n in result.schema.names if n in kept.column_names]
            if clash:
                raise FileArgumentError(f"--keep: {clash} would overwrite the model's outputs")
            table = pa.Table.from_batches([result])
            for i, name in enumerate(kept.column_names):
                table = table.add_column(i, name, kept.column(name))
            writer.write(table)
            stats.events += table.num_rows
            stats.chunks += 1
            bar.update(table.num_rows)
            if on_chunk is not None:
                on_chunk(stats)
    except KeyboardInterrupt:
        stats.interrupted = True
        writer.commit()  # the events done so far: a valid, shorter file (none if no chunk)
        return stats
    except BaseException:
        writer.discard()
        raise
    finally:
        bar.close()
    writer.commit()
    return stats
