"""Run a model over a Dask DataFrame, partition by partition: the event loop on Dask.

>>> import dask.dataframe as dd, pandas as pd
>>> from arrowinfer.dask import infer_partitions
>>> jets = dd.from_pandas(table.to_pandas(types_mapper=pd.ArrowDtype), npartitions=8)
>>> scores = infer_partitions(jets, "jet_tagger", servers="@/shared/servers.txt")
>>> scores.compute()  # one row per jet, the model's outputs as Arrow-backed columns

Each partition's columns become one Arrow table (zero-copy for ``pd.ArrowDtype`` columns),
go to the servers as pipelined requests of at most ``batch_rows`` rows, and the results
come back as a partition of the same length and index, every column Arrow-backed
(``pd.ArrowDtype``; a tensor output keeps its ``arrow.fixed_shape_tensor`` type).

**One client per worker process.** Every Dask worker process keeps one
:class:`~arrowinfer.client.Client` per set of client options (server list, fallback,
resilience settings) and reuses it for every partition it runs, so connections, schemas and
health checks are shared by the partitions and threads of a process. This module-level cache
is the one piece of global state in arrowinfer, and it holds clients only, never server
state: :func:`close_clients` (also run at exit) closes them.

**Resilience** comes from the client: with several ``servers`` a request that fails in
transport moves to another server (``retries``, ``attempt_timeout``), and ``fallback="local"``
runs the model in the worker process from ``repository`` when no server answers.

Dask itself moves the task functions and partitions between its processes with its own
serialization (pickle); the requests to the servers are Arrow Flight, as everywhere in
arrowinfer. Needs ``pip install 'arrowinfer[dask]'``.

**dask-awkward.** ``collection`` may also be a ``dask_awkward.Array`` of records with a
field per model input (``pip install dask-awkward``): each partition goes to the servers as
an awkward record array, and the result is a ``dask_awkward.Array`` of records with a field
per output, in the same partitions (tensor outputs as regular dimensions, ``N * 5 *
float32``). The dask-awkward optimizer runs the function on type tracers to learn which
fields it needs: every input field is marked as needed, and the output's type comes from the
model's metadata.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from .client import Client
from .schema import TensorSpec, datatype, signature

__all__ = ["close_clients", "infer_partitions", "output_schema"]

_CLIENTS: dict[str, Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _import_dask() -> tuple[Any, Any]:
    try:
        import dask.dataframe as dd
        import pandas as pd
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "arrowinfer.dask needs dask and pandas: pip install 'arrowinfer[dask]'"
        ) from err
    return dd, pd


def _client(options: dict[str, Any]) -> Client:
    """This process's client for these options (made on first use)."""
    key = json.dumps(options, sort_keys=True, default=repr)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = Client(**options)
        return client


def close_clients() -> None:
    """Close every client this process made for :func:`infer_partitions`."""
    with _CLIENTS_LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close()


atexit.register(close_clients)


def output_schema(client: Client, model: str, *, version: str | int | None = None) -> pa.Schema:
    """The Arrow schema of a model's outputs, from its config (Triton's JSON).

    Raises
    ------
    ValueError
        For a model without a batch dimension (``max_batch_size: 0``): it takes one entry
        per request, not a partition's rows.
    """
    config = client.metadata(model, version=version)["config"]
    if int(config.get("max_batch_size", 0)) <= 0:
        raise ValueError(
            f"model {model!r} has no batch dimension (max_batch_size 0): infer_partitions "
            "needs a model that takes a batch of rows"
        )
    specs = [
        TensorSpec(
            out["name"],
            datatype(out["data_type"]),
            tuple(int(d) for d in out.get("dims", [])),
        )
        for out in config["output"]
    ]
    return signature(specs)


def _run(
    table: pa.Table,
    model: str,
    version: str | int | None,
    inputs: dict[str, str],
    batch_rows: int,
    options: dict[str, Any],
    schema: pa.Schema,
) -> pa.Table:
    """A partition's input columns (named as in the data) through the model, as one table."""
    table = table.rename_columns(list(inputs))
    results = _client(options).stream(
        model, table.to_batches(max_chunksize=batch_rows), version=version
    )
    # the server's timings are per request, in the schema metadata: drop them
    return pa.Table.from_batches([r.replace_schema_metadata(None) for r in results], schema=schema)


def _infer_partition(
    frame: Any,
    *,
    model: str,
    version: str | int | None,
    inputs: dict[str, str],
    batch_rows: int,
    schema: pa.Schema,
    options: dict[str, Any],
) -> Any:
    """One partition: its columns to Arrow, through the model, back to an Arrow-backed frame."""
    _, pd = _import_dask()
    if len(frame) == 0:
        out = schema.empty_table()
    else:
        table = pa.Table.from_pandas(frame[list(inputs.values())], preserve_index=False)
        out = _run(table, model, version, inputs, batch_rows, options, schema)
    result = out.to_pandas(types_mapper=pd.ArrowDtype)
    result.index = frame.index
    return result


def _awkward_ready(table: pa.Table) -> pa.Table:
    """Tensor extension columns as their storage, with non-null items (awkward reads those
    as regular dimensions, not option types)."""

    def strict(type_: pa.DataType) -> pa.DataType:
        if isinstance(type_, pa.BaseExtensionType):
            return strict(type_.storage_type)
        if pa.types.is_fixed_size_list(type_):
            item = pa.field(type_.value_field.name, strict(type_.value_type), nullable=False)
            return pa.list_(item, type_.list_size)
        return type_

    fields = [pa.field(f.name, strict(f.type), nullable=False) for f in table.schema]
    columns = [
        c.cast(f.type.storage_type) if isinstance(c.type, pa.BaseExtensionType) else c
        for c, f in zip(table.columns, table.schema, strict=True)
    ]
    return pa.Table.from_arrays(
        [c.cast(f.type) for c, f in zip(columns, fields, strict=True)], schema=pa.schema(fields)
    )


def _infer_awkward_partition(
    part: Any,
    *,
    model: str,
    version: str | int | None,
    inputs: dict[str, str],
    batch_rows: int,
    schema: pa.Schema,
    options: dict[str, Any],
) -> Any:
    import awkward as ak

    if ak.backend(part) == "typetracer":  # dask-awkward's optimizer: say what we read
        for field in inputs.values():
            ak.typetracer.touch_data(part[field])
        return _awkward_meta(schema)
    table = ak.to_arrow_table(part[list(inputs.values())], extensionarray=False)
    out = _run(table, model, version, inputs, batch_rows, options, schema)
    return ak.from_arrow(_awkward_ready(out))


def _awkward_meta(schema: pa.Schema) -> Any:
    """A type tracer of the outputs (dask-awkward's meta)."""
    import awkward as ak

    empty = ak.from_arrow(_awkward_ready(schema.empty_table()))
    return ak.Array(empty.layout.to_typetracer(forget_length=True))


def _is_dask_awkward(collection: Any) -> bool:
    return type(collection).__module__.startswith("dask_awkward")


def infer_partitions(
    collection: Any,
    model: str,
    *,
    servers: str | Sequence[str] | None = None,
    fallback: str = "error",
    repository: str | os.PathLike[str] | None = None,
    columns: Mapping[str, str] | None = None,
    version: str | int | None = None,
    batch_rows: int = 4096,
    retries: int = 2,
    attempt_timeout: float | None = None,
    timeout: float | None = 60.0,
    **client_options: Any,
) -> Any:
    """Run ``model`` over every partition of a Dask DataFrame; one output row per input row.

    Parameters
    ----------
    collection
        A ``dask.dataframe.DataFrame`` with a column per model input, ideally Arrow-backed
        (``pd.ArrowDtype``: ragged inputs as Arrow lists, tensors as
        ``fixed_shape_tensor`` or ``fixed_size_list``); or a ``dask_awkward.Array`` of
        records with a field per input.
    model
        Model name (``"name/version"`` also works).
    servers
        As :class:`~arrowinfer.client.Client`'s ``url``: one URL, several (list or
        comma-separated), ``"@FILE"`` (one URL per line, as a Slurm job publishes them), or
        None for ``$ARROWINFER_SERVERS`` on each worker.
    fallback, repository, retries, attempt_timeout, timeout
        The client's resilience options, as for :class:`~arrowinfer.client.Client`
        (``fallback="local"`` runs the model in the worker process from ``repository``).
    columns
        Model input -> column name, for columns not named as the inputs.
    version
        A model version (default: the latest).
    batch_rows
        Rows per request: a partition goes as pipelined requests of at most this many rows.
    **client_options
        More :class:`~arrowinfer.client.Client` options (``token``, ``tls_root_certs``,
        ``compression``, ``shm``, ...).

    Returns
    -------
    dask.dataframe.DataFrame or dask_awkward.Array
        The model's outputs, one column each (``pd.ArrowDtype``), with the partitions and
        index of ``collection``; for a dask-awkward array, records with a field per output.
    """
    _import_dask()
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    options: dict[str, Any] = {
        "url": servers,
        "fallback": fallback,
        "repository": None if repository is None else os.fspath(repository),
        "retries": retries,
        "attempt_timeout": attempt_timeout,
        "timeout": timeout,
        **client_options,
    }
    client = _client(options)  # here too: the schemas, and errors before any task runs
    name, _, ver = model.partition("/")
    version = version if version is not None else (ver or None)
    schema = output_schema(client, name, version=version)
    wanted = [f.name for f in client.schema(name, version=version)]
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - set(wanted))
    if unknown:
        raise ValueError(f"columns names inputs that model {name!r} lacks: {unknown} ({wanted=})")
    inputs = {i: mapping.get(i, i) for i in wanted}
    have = list(collection.fields if _is_dask_awkward(collection) else collection.columns)
    missing = sorted(c for c in inputs.values() if c not in have)
    if missing:
        raise ValueError(
            f"model {name!r} needs columns {missing}, which the collection lacks "
            f"(it has {have}; map inputs to columns with columns=...)"
        )
    if _is_dask_awkward(collection):
        import dask_awkward as dak

        return dak.map_partitions(
            _infer_awkward_partition,
            collection,
            model=name,
            version=version,
            inputs=inputs,
            batch_rows=batch_rows,
            schema=schema,
            options=options,
            meta=_awkward_meta(schema),
            label=f"arrowinfer-{name}",
        )
    meta = _infer_partition(
        collection._meta,
        model=name,
        version=version,
        inputs=inputs,
        batch_rows=batch_rows,
        schema=schema,
        options=options,
    )
    return collection.map_partitions(
        _infer_partition,
        model=name,
        version=version,
        inputs=inputs,
        batch_rows=batch_rows,
        schema=schema,
        options=options,
        meta=meta,
        align_dataframes=False,
    )
