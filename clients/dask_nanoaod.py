"""Tag the jets of a CMS NanoAOD file on a Dask cluster, with the model on arrowinfer servers.

The event loop of SONIC on Dask: the jets of the CMS Open Data ttbar sample
(``nanoAOD_2015_CMS_Open_Data_ttbar.root``, found with
:func:`arrowinfer.events.shared_data_dir`) become one row per jet in an Arrow-backed Dask
DataFrame, and :func:`arrowinfer.dask.infer_partitions` runs the example ``jet_tagger`` over
every partition, one client per Dask worker process, with the requests going to the servers.

**A demonstration, not physics.** NanoAOD keeps jets, not their particles, and
``jet_tagger`` (a ParticleNet stand-in with random weights) wants particles. Each jet is
handed to it as a *single constituent* at the jet axis: points ``[(0, 0)]`` and features
``[(0, 0, log pt, log E, 0, 0, 0)]`` (``arrowinfer.events.CONSTITUENT_FEATURES``). The shapes
and the data flow are real; the scores mean nothing.

Usage::

    python clients/dask_nanoaod.py                      # starts a server in this process
    python clients/dask_nanoaod.py --servers @servers.txt --workers 4
    ARROWINFER_SERVERS=grpc://gpu1:8815,grpc://gpu2:8815 python clients/dask_nanoaod.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone

from arrowinfer import events

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def jets_table(path: Path, entry_stop: int | None = None) -> pa.Table:
    """One row per jet: event number, jet index, pt/eta/phi/mass and jet_tagger's inputs."""
    table = events.read_nanoaod(
        path, branches=("event", "Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass"), entry_stop=entry_stop
    )
    pt_list = table.column("Jet_pt").combine_chunks()
    offsets = pt_list.offsets.to_numpy()
    n_jets = np.diff(offsets)
    flat = {
        name: table.column(f"Jet_{name}").combine_chunks().flatten().to_numpy()
        for name in ("pt", "eta", "phi", "mass")
    }
    n = len(flat["pt"])
    energy = np.sqrt((flat["pt"] * np.cosh(flat["eta"])) ** 2 + flat["mass"] ** 2)
    features = np.zeros((n, 7), dtype=np.float32)  # one constituent at the jet axis
    features[:, 2] = np.log(flat["pt"])
    features[:, 3] = np.log(energy)
    one_each = pa.array(np.arange(n + 1, dtype=np.int32))  # offsets: one item per jet

    def constituents(values: np.ndarray, size: int) -> pa.Array:
        items = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), size)
        return pa.ListArray.from_arrays(one_each, items)

    return pa.table(
        {
            "event": np.repeat(table.column("event").to_numpy(), n_jets),
            "jet": np.arange(n) - np.repeat(offsets[:-1], n_jets),  # index within the event
            **flat,
            "points": constituents(np.zeros((n, 2), dtype=np.float32), 2),
            "features": constituents(features, 7),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help=f"NanoAOD file (default: the shared {SAMPLE})")
    parser.add_argument(
        "--servers", help="server URLs, or @FILE (default: $ARROWINFER_SERVERS, else a local one)"
    )
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--partitions", type=int, default=8, help="Dask partitions")
    parser.add_argument("--events", type=int, help="read only the first N events")
    args = parser.parse_args(argv)

    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client as DaskClient
    from distributed import LocalCluster

    from arrowinfer.dask import infer_partitions

    path = args.file
    if path is None:
        data = events.shared_data_dir()
        if data is None or not (data / SAMPLE).exists():
            parser.error(f"no {SAMPLE} (set $ARROWINFER_DATA, or give --file)")
        path = data / SAMPLE
    jets = jets_table(path, args.events)
    print(f"{path.name}: {jets.num_rows} jets")

    with contextlib.ExitStack() as stack:
        servers = args.servers or os.environ.get("ARROWINFER_SERVERS")
        if not servers:
            from arrowinfer.cli import default_repository
            from arrowinfer.server import Server

            server = stack.enter_context(
                Server(default_repository(), port=0, kserve_port=None, metrics_port=None)
            )
            servers = server.location
            print(f"started a server in this process at {servers}")
        cluster = stack.enter_context(
            LocalCluster(
                processes=True, n_workers=args.workers, threads_per_worker=1, dashboard_address=None
            )
        )
        stack.enter_context(DaskClient(cluster))
        frame = jets.to_pandas(types_mapper=pd.ArrowDtype)
        collection = dd.from_pandas(frame, npartitions=args.partitions)
        scores = infer_partitions(collection, "jet_tagger", servers=servers, batch_rows=1024)
        start = time.perf_counter()
        result = scores.compute()
        elapsed = time.perf_counter() - start

    probabilities = np.stack(result["probabilities"].to_numpy())
    print(
        f"tagged {len(result)} jets in {elapsed:.2f} s ({len(result) / elapsed:,.0f} jets/s) "
        f"on {args.workers} Dask workers, {args.partitions} partitions"
    )
    print("mean score per class:", np.round(probabilities.mean(axis=0), 3))
    print("jets per most likely class:", np.bincount(probabilities.argmax(axis=1), minlength=5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
