"""Requests as dense numpy tensors: what the KServe front ends hand the core.

KServe's wire carries tensors, not Arrow. Building a record batch from them for the core,
only for the backend to take it apart again for onnxruntime (and the same back for the
outputs), cost half the server's CPU on a small request: ~480 against ~250 us per 4 KB
HTTP request at 16 in flight (``benchmarks/results/performance.md``, fifth session).

A :class:`DenseBatch` takes the same path through the core, the batcher and the backend
as a record batch, is validated as fully (:func:`validate_dense`), may share a batch with
record batches, and its result is a DenseBatch of the outputs (views of the model's output
arrays).

Only a model whose every input is a dense number tensor takes one
(:attr:`~arrowinfer.repository.ModelVersion.dense_inputs`): strings, ragged inputs, the
mask and Triton's ragged batching keep the Arrow path, whose conversions they need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from .errors import InvalidInput
from .schema import TensorSpec, check_rows, to_column

__all__ = ["AnyBatch", "DenseBatch", "entry_fits", "validate_dense"]


class DenseBatch:
    """Tensors of equal rows by name, batch dimension first: a request (or a result)
    without Arrow. The parts of a :class:`pyarrow.RecordBatch` the core reads:
    ``num_rows``, ``nbytes``, ``column_names``, ``column(name)``, ``slice``.

    The arrays are kept as given (views of the request's bytes, not copies); the core
    checks them (:func:`validate_dense`) before anything reads them.

    Raises
    ------
    InvalidInput
        Arrays with different numbers of rows (first dimensions), or none.
    """

    __slots__ = ("arrays", "num_rows")

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        rows = {len(a) if a.ndim else -1 for a in arrays.values()}
        if len(rows) != 1 or -1 in rows:
            got = {name: list(a.shape) for name, a in arrays.items()}
            raise InvalidInput("tensors need one batch size (first dimension)", got=got)
        self.arrays = dict(arrays)
        self.num_rows: int = rows.pop()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def column_names(self) -> list[str]:
        return list(self.arrays)

    def column(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def slice(self, offset: int = 0, length: int | None = None) -> DenseBatch:
        """Rows ``offset`` to ``offset + length`` (views), as :meth:`pyarrow.RecordBatch.slice`."""
        end = self.num_rows if length is None else offset + length
        return DenseBatch({name: a[offset:end] for name, a in self.arrays.items()})

    def to_arrow(self, schema: pa.Schema) -> pa.RecordBatch:
        """As a record batch of ``schema``'s fields (a backend that reads only Arrow)."""
        fields = [schema.field(name) for name in self.arrays]
        columns = [to_column(f, self.arrays[f.name]) for f in fields]
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))

    @staticmethod
    def concat(parts: Sequence[DenseBatch]) -> DenseBatch:
        """The parts' rows one after the other (one copy), as ``pyarrow.concat_batches``."""
        names = parts[0].arrays
        return DenseBatch({n: np.concatenate([p.arrays[n] for p in parts]) for n in names})


#: What the core takes as a request, and gives back as its result.
AnyBatch = pa.RecordBatch | DenseBatch


def entry_fits(dims: Sequence[int], entry: Sequence[int]) -> bool:
    """Whether an entry's shape is a config's ``dims``: as many, each equal or ``-1``."""
    return len(entry) == len(dims) and all(d in (-1, g) for d, g in zip(dims, entry, strict=True))


def validate_dense(
    batch: DenseBatch, specs: Sequence[TensorSpec], *, model: str, max_rows: int | None
) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """:func:`arrowinfer.schema.validate` for a :class:`DenseBatch`: the same checks, the
    same result (the concrete per-entry shapes of the inputs with variable dims, and
    ``(input, None)`` for each optional input left out), so that a dense request and a
    record batch of the same shapes share a batch.

    ``specs``: the model's inputs (each a dense number tensor; see the module docstring).

    Raises
    ------
    InvalidInput
        Naming the model and the input: too many rows, missing or unexpected inputs, a
        dtype or per-entry shape that is not the model's.
    """
    check_rows(batch.num_rows, max_rows, model=model)
    names = [s.name for s in specs]
    given = batch.arrays
    unexpected = [n for n in given if n not in names]
    if unexpected:
        raise InvalidInput(f"unexpected input(s) {unexpected}", model=model, expected=names)
    omitted = [s.name for s in specs if s.name not in given and s.optional]
    missing = [s.name for s in specs if s.name not in given and not s.optional]
    if missing:
        raise InvalidInput(f"missing input(s) {missing}", model=model, expected=names)
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(omitted)
    for spec in specs:
        if spec.name in shapes:
            continue
        array = given[spec.name]
        if array.dtype != spec.datatype.numpy:
            raise InvalidInput(
                "wrong element type",
                model=model,
                input=spec.name,
                expected=spec.datatype.kserve,
                got=str(array.dtype),
            )
        entry = array.shape[1:]
        if not entry_fits(spec.shape, entry):
            raise InvalidInput(
                "wrong shape per entry",
                model=model,
                input=spec.name,
                expected=list(spec.shape),
                got=list(entry),
            )
        if -1 in spec.shape:
            shapes[spec.name] = tuple(int(d) for d in entry)
    return tuple(shapes.items())
