"""Memory of ``arrowinfer infer`` over files of growing size: bounded by the step, not the file.

Writes Parquet files of 100 000 to 1 600 000 events (three jets each, the eight branches the
example per-jet tagger ``jet_score`` reads) and the same as ROOT files, runs ``arrowinfer infer local jet_score`` over
each in a child process (the model in that process: no server to share the memory with),
and reports the child's peak RSS and events/s. With a fixed ``--step-size`` the peak stays
flat while the file grows 16-fold; the output file is written chunk by chunk too.

Usage: ``python benchmarks/infer_files.py [--step-size 5000] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from arrowinfer.bench.machine import describe, markdown
from arrowinfer.examples import ALL_MODELS, JET_SCORE_BRANCHES, write_example_repository

ROOT = Path(__file__).resolve().parent.parent
SIZES = (100_000, 400_000, 1_600_000)


def write_events(path: Path, n_events: int, *, seed: int = 0) -> Path:
    """``n_events`` events of three jets each, in row groups of 100 000 events."""
    rng = np.random.default_rng(seed)
    offsets = pa.array(np.arange(0, 3 * 100_000 + 1, 3, dtype=np.int32))
    schema = None
    writer = None
    for start in range(0, n_events, 100_000):
        n = min(100_000, n_events - start)
        columns = {
            b: pa.ListArray.from_arrays(
                offsets[: n + 1], pa.array(rng.uniform(0.5, 50, 3 * n).astype(np.float32))
            )
            for b in JET_SCORE_BRANCHES
        }
        table = pa.table({"event": np.arange(start, start + n, dtype=np.uint64), **columns})
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path


def to_root(parquet: Path, path: Path) -> Path:
    """The same events as a ROOT TTree ``Events`` (uproot's writer), row group by row group."""
    import awkward as ak
    import uproot

    source = pq.ParquetFile(parquet, pre_buffer=False)
    with uproot.recreate(path) as file:
        for group in range(source.num_row_groups):
            events = ak.from_arrow(source.read_row_group(group))
            branches = {name: events[name] for name in events.fields}
            if "Events" in file:
                file["Events"].extend(branches)
            else:
                file["Events"] = branches
    return path


def run(repository: Path, source: Path, out: Path, step_size: int) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one ``arrowinfer infer`` child process."""
    command = [
        sys.executable, "-m", "arrowinfer.cli", "infer", "local", "jet_score", str(source),
        str(out), "--repository", str(repository), "--input",
        "jet=" + ",".join(JET_SCORE_BRANCHES), "--step-size", str(step_size), "-q",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{command}: exit status {child.returncode}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-size", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repository = write_example_repository(work / "models", models=ALL_MODELS)
        for n in SIZES:
            parquet = write_events(work / f"events-{n}.parquet", n)
            for source in (parquet, to_root(parquet, work / f"events-{n}.root")):
                seconds, peak = run(repository, source, work / "out.parquet", args.step_size)
                rows.append((n, source.suffix, source.stat().st_size, seconds, peak))
                sys.stdout.write(
                    f"{n:>9,} events {source.suffix:8s}: {seconds:6.1f} s, "
                    f"peak RSS {peak / 2**20:6.0f} MiB\n"
                )
            for path in (parquet, parquet.with_suffix(".root")):
                path.unlink()
    lines = [
        "# `arrowinfer infer` memory against file size",
        "",
        f"`python benchmarks/infer_files.py --step-size {args.step_size}`: `jet_score` in the",
        "command's own process (`local`), three jets per event, Parquet or ROOT in, Parquet out.",
        "",
        "| events | input | input MB | seconds | events/s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|",
        *(
            f"| {n:,} | {fmt} | {size / 1e6:.0f} | {s:.1f} | {n / s:,.0f} | {peak / 2**20:.0f} |"
            for n, fmt, size, s, peak in rows
        ),
        "",
        markdown(describe()),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infer_files.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
