"""Score the jets of a CMS NanoAOD file on a Dask cluster, with the model on arrowinfer servers.

The event loop of SONIC on Dask: the jets of the CMS Open Data ttbar sample
(``nanoAOD_2015_CMS_Open_Data_ttbar.root``, found with
:func:`arrowinfer.events.shared_data_dir`) become one row per jet in an Arrow-backed Dask
DataFrame, and :func:`arrowinfer.dask.infer_partitions` runs the example per-jet tagger
``jet_score`` over every partition, one client per Dask worker process, with the requests
going to the servers. ``jet_score`` reads eight branches NanoAOD really has for every jet
(``arrowinfer.examples.JET_SCORE_BRANCHES``); its weights are random, so the scores mean
nothing physics-wise, but the inputs and the data flow are the real ones.

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

from arrowinfer import events, tensors
from arrowinfer.examples import JET_SCORE_BRANCHES

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def jets_table(path: Path, entry_stop: int | None = None) -> pa.Table:
    """One row per jet: event number, jet index, pt and jet_score's input ``jet`` [8]."""
    branches = ("event", *JET_SCORE_BRANCHES)
    table = events.read_nanoaod(path, branches=branches, entry_stop=entry_stop)
    pt_list = table.column("Jet_pt").combine_chunks()
    offsets = pt_list.offsets.to_numpy()
    n_jets = np.diff(offsets)
    features = np.stack(
        [
            table.column(b).combine_chunks().flatten().to_numpy().astype(np.float32)
            for b in JET_SCORE_BRANCHES
        ],
        axis=1,
    )
    n = len(features)
    return pa.table(
        {
            "event": np.repeat(table.column("event").to_numpy(), n_jets),
            "jet": np.arange(n) - np.repeat(offsets[:-1], n_jets),  # index within the event
            "pt": features[:, 0],
            "features": tensors.from_numpy(features),
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
        scores = infer_partitions(
            collection, "jet_score", servers=servers, columns={"jet": "features"}, batch_rows=4096
        )
        start = time.perf_counter()
        result = scores.compute()
        elapsed = time.perf_counter() - start

    score = np.stack(result["score"].to_numpy()).ravel()
    print(
        f"scored {len(result)} jets in {elapsed:.2f} s ({len(result) / elapsed:,.0f} jets/s) "
        f"on {args.workers} Dask workers, {args.partitions} partitions"
    )
    print(f"mean score {score.mean():.3f}; jets with score > 0.5: {(score > 0.5).sum()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
