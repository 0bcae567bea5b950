"""Synthetic requests for the example models, and the one-thread setting the benchmarks use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import events, tensors

__all__ = ["make_request", "one_intra_op_thread"]


def make_request(model: str, rows: int, *, seed: int = 0) -> pa.RecordBatch:
    """A synthetic request of ``rows`` batch entries for one of the example models."""
    if model == "facile":
        # Whole events' hits, flattened to one row per hit: ~2000 hits per event.
        n_events = rows // 1500 + 2
        hits = events.synthetic_hcal_hits(n_events, seed=seed).column("hits").flatten()
        if len(hits) < rows:
            raise RuntimeError(f"{n_events} synthetic events gave {len(hits)} hits < {rows}")
        column = tensors.from_numpy(tensors.to_numpy(hits[:rows]))  # fixed_shape_tensor [15]
        return pa.RecordBatch.from_arrays([column], ["hits"])
    if model == "jet_tagger":
        return events.synthetic_jet_constituents(rows, seed=seed)
    if model == "toptag_cnn":
        return events.synthetic_jet_images(rows, seed=seed)
    if model == "identity":
        values = np.random.default_rng(seed).standard_normal((rows, 1024), dtype=np.float32)
        return pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["INPUT0"])
    raise ValueError(f"no synthetic input for model {model!r}")


def one_intra_op_thread(repository: Path, models: tuple[str, ...] = ("identity", "facile")) -> Path:
    """Give the models one onnxruntime thread: neither an identity copy nor one row needs
    more, and an idle pool's spinning threads would take the CPUs the transports measure."""
    for model in models:
        config = repository / model / "config.pbtxt"
        config.write_text(
            config.read_text()
            + '\nparameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
        )
    return repository
