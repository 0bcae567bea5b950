"""What the full check of a request's Arrow data costs, against a Flight round trip.

``python benchmarks/validation.py`` writes ``benchmarks/results/validation.md``.

Every request is checked by :func:`arrowinfer.schema.check_data` (Arrow's
``validate(full=True)``) before anything reads its buffers. This measures that check alone
(best-of median over many repetitions) on the requests of the transport benchmarks, and
the round trip of the same request to the ``identity`` model through a server in this
process (Flight over loopback), so that the check's share of the round trip is known.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrowinfer import tensors
from arrowinfer.bench.harness import median_us
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.client import Client
from arrowinfer.examples import write_example_repository
from arrowinfer.schema import check_data
from arrowinfer.server import Server

RESULTS = Path(__file__).resolve().parent / "results" / "validation.md"


def _identity(rows: int) -> pa.RecordBatch:
    data = np.random.default_rng(0).standard_normal((rows, 1024), dtype=np.float32)
    return pa.RecordBatch.from_arrays([tensors.from_numpy(data)], ["INPUT0"])


def _jets(jets: int, per_jet: int) -> pa.RecordBatch:
    rng = np.random.default_rng(0)
    offsets = np.arange(0, (jets + 1) * per_jet, per_jet, dtype=np.int32)
    total = int(offsets[-1])
    return pa.RecordBatch.from_arrays(
        [
            tensors.ragged_from_numpy(offsets, rng.standard_normal((total, 2), dtype=np.float32)),
            tensors.ragged_from_numpy(offsets, rng.standard_normal((total, 7), dtype=np.float32)),
        ],
        ["points", "features"],
    )


def main() -> None:
    cases = {
        "identity, 1 row (4 KB)": _identity(1),
        "identity, 1024 rows (4 MB)": _identity(1024),
        "jet_tagger ragged, 1 jet": _jets(1, 50),
        "jet_tagger ragged, 2048 jets (4 MB)": _jets(2048, 56),
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        repository = write_example_repository(Path(folder))
        with (
            Server(repository, port=0, kserve_port=None, metrics_port=None) as server,
            Client(server.location) as client,
        ):
            for name, batch in cases.items():
                # as served: the request's schema equals the model's (what clients send)
                check = median_us(lambda b=batch: check_data(b, b.schema), 2000)
                other = median_us(lambda b=batch: check_data(b), 2000)
                trip = None
                if name.startswith("identity"):
                    data = tensors.to_numpy(batch.column(0))
                    client.infer("identity", {"INPUT0": data})  # warm up
                    trip = median_us(lambda d=data: client.infer("identity", {"INPUT0": d}), 100)
                share = f"{100 * check / trip:.2f} %" if trip else "-"
                trip_text = f"{trip:,.0f}" if trip else "-"
                rows.append(
                    f"| {name} | {batch.nbytes / 1e6:.3f} | {check:.1f} | {other:.1f} "
                    f"| {trip_text} | {share} |"
                )
    lines = [
        "# Validation of a request's Arrow data",
        "",
        (
            "`python benchmarks/validation.py`. `check_data` is Arrow's full validation "
            "(buffer sizes, lengths, list offsets, nested children, extension storage), run on "
            "every request before anything reads it; median of 2000 runs. Round trip: the same "
            "request to `identity` over Flight on loopback, server in the same process, median "
            "of 100 (it includes the check). *check*: as served, the request's schema equal "
            "to the model's (what arrowinfer's clients send); *other schema*: any other "
            "schema, whose field names (nested ones too) are read once more to prove them UTF-8."
        ),
        "",
        (
            "Fixed-size tensors cost a constant (the check compares buffer sizes with the declared "
            "lengths: it does not scan values); list columns cost one pass over their offsets. "
            "Measured on a shared 2-core machine: the round trips are noisy, the check's order of "
            "magnitude is not."
        ),
        "",
        "| request | MB | check µs | other schema µs | round trip µs | check / round trip |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        markdown(describe()),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
