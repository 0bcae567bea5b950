"""awkward arrays in, awkward arrays out: run a model at whatever depth its inputs sit.

>>> from arrowinfer.awkward import infer
>>> jet = ak.concatenate([events.Jet.pt[..., None], events.Jet.eta[..., None], ...], axis=-1)
>>> out = infer("grpc://127.0.0.1:8815", "jet_score", {"jet": jet})
>>> out.score          # events * var * float32: one score per jet, events.Jet's structure

The model's config says what one of its batch entries is (a row of ``[8]`` features, a
ragged ``[var, 5]`` set, ...); every dimension of an input in front of that is structure
(events, jets per event, ...). That structure is taken off with ``ak.flatten`` (its counts
kept), the entries go to the server as one Arrow column each (only real entries travel: no
padding on the wire), and the results are put back with ``ak.unflatten``: no Python loop
per event, and empty events stay empty lists.

The result is an awkward array of records, one field per model output, with the inputs'
structure: for a per-jet model on ``events.Jet``-shaped input, ``out.score`` has one value
per jet. An output of one value per entry (dims ``[1]``) comes back as that value, not a
list of one.

With dask-awkward inputs the result is a dask-awkward array computed partition by partition
(``dask_awkward.map_partitions``), one client per worker process (as
:mod:`arrowinfer.dask`): pass the server URL(s) and client options, not a client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from . import tensors
from .client import Client, to_awkward
from .errors import InvalidInput

__all__ = ["infer"]


def _is_dask(array: object) -> bool:
    return type(array).__module__.startswith("dask_awkward")


def _innermost_is_one(ak: Any, array: Any) -> bool:
    """Whether the innermost dimension is a regular one of size 1."""
    type_, last = array.type.content, None
    while hasattr(type_, "content"):
        last, type_ = type_, type_.content
    return isinstance(last, ak.types.RegularType) and last.size == 1


def _entries(
    ak: Any, array: Any, entry: tensors.Layout, *, model: str, name: str
) -> tuple[Any, list[Any]]:
    """The batch entries of one input (1 outer dimension) and the counts taken off."""
    depth = len(entry.shape)
    ndim = array.ndim
    if entry.shape and entry.shape[-1] == 1 and not _innermost_is_one(ak, array):
        array = array[..., np.newaxis]  # one value per entry for a [..., 1] input
        ndim += 1
    outer = ndim - depth
    if outer < 1:
        raise InvalidInput(
            f"an array of {ndim} dimension(s) cannot hold entries of {depth} "
            f"(type {ak.type(array)})",
            model=model,
            input=name,
        )
    counts = []
    for _ in range(outer - 1):
        counts.append(ak.num(array, axis=1))
        array = ak.flatten(array, axis=1)
    if not entry.ragged:
        for axis in range(1, depth + 1):  # fixed per-entry shape: regular dimensions
            array = ak.to_regular(array, axis=axis)
    return array, counts


def _same(ak: Any, a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and bool(ak.all(x == y)) for x, y in zip(a, b, strict=True)
    )


def _run(
    client: Client,
    model: str,
    version: str | int | None,
    inputs: Mapping[str, Any],
    batch_rows: int,
    outputs: pa.Schema,
) -> Any:
    """The eager path: flatten, stream the entries, regroup."""
    import awkward as ak

    from .dask import _awkward_ready

    if any(ak.backend(a) == "typetracer" for a in inputs.values()):
        # dask-awkward's optimizer: every input is read; the type comes from an empty run.
        for a in inputs.values():
            ak.typetracer.touch_data(a)
        empty = {n: ak.Array(a.layout.form.length_zero_array()) for n, a in inputs.items()}
        meta = _run(client, model, version, empty, 1, outputs)
        return ak.Array(meta.layout.to_typetracer(forget_length=True))

    schema = client.schema(model, version=version)
    unknown = sorted(set(inputs) - set(schema.names))
    missing = [n for n in schema.names if n not in inputs]
    if unknown or missing:
        raise InvalidInput(
            "inputs do not match the model's", model=model, expected=schema.names, got=list(inputs)
        )
    flat: dict[str, Any] = {}
    structure: list[Any] | None = None
    first = None
    for field in schema:
        array = ak.Array(inputs[field.name])
        entries, counts = _entries(
            ak, array, tensors.layout(field.type), model=model, name=field.name
        )
        if structure is None:
            structure, first = counts, field.name
        elif not _same(ak, structure, counts):
            raise InvalidInput(
                f"inputs {first!r} and {field.name!r} have different structure "
                "(not the same events and objects)",
                model=model,
                input=field.name,
            )
        flat[field.name] = entries
    assert structure is not None
    rows = len(next(iter(flat.values())))
    if rows:
        table = pa.Table.from_pydict(
            {n: ak.to_arrow(a, extensionarray=False) for n, a in flat.items()}
        )
        batches = table.to_batches(max_chunksize=batch_rows)
        results = [
            r.replace_schema_metadata(None) for r in client.stream(model, batches, version=version)
        ]
        result = pa.Table.from_batches(results)
    else:  # nothing to send: the outputs' types, zero entries
        result = outputs.empty_table()
    out = to_awkward(_awkward_ready(result))
    fields = {}
    for field in outputs:
        values = out[field.name]
        if tensors.layout(field.type).shape == (1,):
            values = values[:, 0]  # one value per entry, not a list of one
        for counts in reversed(structure):
            values = ak.unflatten(values, counts)
        fields[field.name] = values
    return ak.zip(fields, depth_limit=len(structure) + 1)


def _partition(
    *arrays: Any,
    names: list[str],
    model: str,
    version: str | int | None,
    batch_rows: int,
    outputs: pa.Schema,
    options: dict[str, Any],
) -> Any:
    from .dask import _client

    inputs = dict(zip(names, arrays, strict=True))
    return _run(_client(options), model, version, inputs, batch_rows, outputs)


def infer(
    client_or_url: Client | str | Sequence[str] | None,
    model: str,
    inputs: Mapping[str, Any],
    *,
    version: str | int | None = None,
    batch_rows: int = 65536,
    **client_options: Any,
) -> Any:
    """Run a model over awkward arrays; the results have the inputs' structure.

    Parameters
    ----------
    client_or_url
        A :class:`~arrowinfer.client.Client`, or server URL(s) as for ``Client``'s ``url``
        (None: ``$ARROWINFER_SERVERS``); a client per process is then made and kept, as in
        :mod:`arrowinfer.dask` (required for dask-awkward inputs).
    model
        Model name (``"name/version"`` also works).
    inputs
        Model input name -> ``ak.Array`` (or ``dask_awkward.Array``): any number of outer
        dimensions (events, objects, ...) in front of what one batch entry of the model is.
        All inputs must have the same outer structure.
    version
        A model version (default: the latest).
    batch_rows
        Entries per request; a call streams several requests, pipelined.
    **client_options
        More ``Client`` options when ``client_or_url`` is a URL (``fallback``,
        ``repository``, ``retries``, ``token``, ...); with a ``Client``, none (TypeError).

    Returns
    -------
    ak.Array or dask_awkward.Array
        Records with one field per model output, nested like the inputs' outer dimensions;
        tensor outputs as regular dimensions (``var * 5 * float32`` per event for a
        ``[5]`` output of a per-jet model), ``[1]`` outputs as one value per entry.

    Raises
    ------
    InvalidInput
        Inputs the model lacks or misses, inputs of different structure, too few
        dimensions, entries of the wrong shape (the client's checks).
    """
    import awkward as ak  # noqa: F401 - an ImportError here says what is missing

    from .dask import output_schema

    name, _, ver = model.partition("/")
    version = version if version is not None else (ver or None)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    lazy = [_is_dask(a) for a in inputs.values()]
    if isinstance(client_or_url, Client):
        if client_options:  # they are a new Client's: this one is made already
            raise TypeError(
                f"options {sorted(client_options)} make a Client: pass them to Client(...), "
                "or pass the server URL here instead of a Client"
            )
        if any(lazy):
            raise TypeError(
                "dask-awkward inputs need the server URL(s), not a Client: each worker "
                "process makes its own"
            )
        outputs = output_schema(client_or_url, name, version=version)
        return _run(client_or_url, name, version, inputs, batch_rows, outputs)
    from .dask import _client

    options = {"url": client_or_url, **client_options}
    client = _client(options)
    outputs = output_schema(client, name, version=version)
    if not any(lazy):
        return _run(client, name, version, inputs, batch_rows, outputs)
    import dask_awkward as dak

    names = list(inputs)
    return dak.map_partitions(
        _partition,
        *inputs.values(),
        names=names,
        model=name,
        version=version,
        batch_rows=batch_rows,
        outputs=outputs,
        options=options,
        label=f"arrowinfer-{name}",
    )
