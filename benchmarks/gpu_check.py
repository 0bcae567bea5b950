"""Check and time the GPU path (``DeviceBackend`` with CuPy) against the CPU backend.

One short script for a machine with an NVIDIA GPU. From a fresh clone (Linux, an NVIDIA
driver for CUDA 12)::

    python3 -m venv .venv
    .venv/bin/pip install -e '.[gpu]'                    # arrowinfer and cupy-cuda12x
    .venv/bin/pip uninstall -y onnxruntime               # the CPU build hides the GPU one
    .venv/bin/pip install 'onnxruntime-gpu[cuda,cudnn]'  # with the CUDA 12 / cuDNN 9 wheels
    .venv/bin/python -m benchmarks.gpu_check             # from the clone's root, < 5 minutes

Where no CUDA 12 toolkit is installed system-wide, CuPy needs its libraries from PyPI too
(NVRTC compiles its kernels): ``pip install 'cupy-cuda12x[ctk]'`` (CuPy 14 and later). Where
CUDA 12 and cuDNN 9 are installed system-wide, ``pip install onnxruntime-gpu`` is enough.
It writes ``benchmarks/results/gpu_check.md`` and prints the same Markdown:

1. correctness: for each example model, fresh random inputs split into several requests,
   ``DeviceBackend`` on the GPU against ``OnnxRuntimeBackend`` on the CPU, per output
   within float32 tolerance (GPU kernels, TF32 included, round differently), and the
   largest difference seen;
2. host-to-device and device-to-host bandwidth, pinned memory, 64 MB copies;
3. batch assembly (``DeviceAssembler.assemble`` up to the stream's synchronize) by batch
   size;
4. events/s by batch size, ``DeviceBackend`` against the CPU backend on the same machine.

``--cpu`` runs the same script with numpy as the array module and a CPU session: a dry
run of the script itself on any machine (results go to ``gpu_check_cpu.md``; the numbers
say nothing about GPUs). Exit status: 0 when every check passes, 1 when a correctness
check fails, 2 when there is no GPU, CuPy or onnxruntime CUDA provider to check.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa

from arrowinfer import events, tensors
from arrowinfer.backends import import_cupy
from arrowinfer.backends.device import DeviceBackend
from arrowinfer.backends.ort import OnnxRuntimeBackend
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.errors import ModelError
from arrowinfer.examples import EXAMPLE_MODELS, write_example_repository
from arrowinfer.repository import ModelVersion, Repository

BATCH_SIZES = (1, 16, 128, 1024, 4096)
REQUESTS_PER_BATCH = 4  # a batch merges this many requests, as from several clients
CELL_SECONDS = 0.3  # timing per (model, batch size, backend)
BUDGET_SECONDS = 240  # cells after this are skipped, so that the script ends in 5 minutes
COPY_BYTES = 64 * 2**20
#: GPU against CPU: float32 kernels differ in rounding (and TF32 may be on for Conv/Gemm)
TOLERANCE = {"rtol": 1e-2, "atol": 1e-3}


def make_request(model: str, rows: int, rng: np.random.Generator) -> pa.RecordBatch:
    """Fresh random inputs: ``rows`` batch entries of an example model."""
    seed = int(rng.integers(2**31))
    if model == "facile":
        hits = rng.standard_normal((rows, 15), dtype=np.float32)
        return pa.RecordBatch.from_arrays([tensors.from_numpy(hits)], ["hits"])
    if model == "jet_tagger":
        jets = events.synthetic_jet_constituents(rows, seed=seed)
        if rows < 4:
            return jets
        # with empty jets and jets longer than the 100 particles the model takes
        counts = rng.poisson(40, rows)
        counts[::7] = 0
        counts[1::9] = rng.integers(101, 300, len(counts[1::9]))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        points = rng.standard_normal((int(offsets[-1]), 2), dtype=np.float32)
        features = rng.standard_normal((int(offsets[-1]), 7), dtype=np.float32)
        return pa.RecordBatch.from_arrays(
            [
                tensors.ragged_from_numpy(offsets, points),
                tensors.ragged_from_numpy(offsets, features),
            ],
            ["points", "features"],
        )
    if model == "toptag_cnn":
        return events.synthetic_jet_images(rows, seed=seed)
    values = rng.standard_normal((rows, 1024), dtype=np.float32)
    return pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["INPUT0"])


def split(batch: pa.RecordBatch, parts: int) -> list[pa.RecordBatch]:
    """The batch as ``parts`` requests (slices, no copy) of nearly equal size."""
    bounds = np.linspace(0, batch.num_rows, min(parts, batch.num_rows) + 1).astype(int)
    return [batch.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


@dataclass
class Report:
    title: str
    lines: list[str] = field(default_factory=list)
    failed: bool = False

    def table(self, heading: str, header: Sequence[str], rows: list[Sequence[object]]) -> None:
        self.lines += ["", f"## {heading}", ""]
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]

    def note(self, text: str) -> None:
        self.lines += ["", text]

    def markdown(self) -> str:
        return "\n".join([f"# {self.title}", *self.lines]) + "\n"


class Clock:
    """Times device work: CUDA events with CuPy, the host clock with numpy."""

    def __init__(self, xp: ModuleType, stream: Any):
        self.xp = xp
        self.stream = stream

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def seconds(self, work: Callable[[], object], repeats: int) -> float:
        """Seconds per call of ``work``, over ``repeats`` calls, all queued work done."""
        self.sync()
        if self.stream is None:
            t0 = time.perf_counter()
            for _ in range(repeats):
                work()
            return (time.perf_counter() - t0) / repeats
        start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record(self.stream)
        for _ in range(repeats):
            work()
        end.record(self.stream)
        end.synchronize()
        return float(self.xp.cuda.get_elapsed_time(start, end)) / 1e3 / repeats


def check(
    name: str, model: ModelVersion, gpu: DeviceBackend, cpu: OnnxRuntimeBackend, exact: bool
) -> list[object]:
    """Fresh inputs, several requests: the device path against the CPU backend."""
    rng = np.random.default_rng()
    batch = make_request(name, min(300, model.max_batch_size), rng)
    cuts = np.sort(rng.choice(np.arange(1, batch.num_rows), size=5, replace=False))
    bounds = [0, *cuts.tolist(), batch.num_rows]
    requests = [batch.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    got, _ = gpu.execute(requests)
    expected, _ = cpu.execute(requests)
    worst = 0.0
    ok = len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        ok &= g.schema.equals(e.schema) and g.num_rows == e.num_rows
        for key in e.schema.names:
            a, b = tensors.to_numpy(g.column(key)), tensors.to_numpy(e.column(key))
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
            ok &= bool(np.array_equal(a, b) if exact else np.allclose(a, b, **TOLERANCE))
    return [name, len(requests), batch.num_rows, f"{worst:.2e}", "ok" if ok else "**FAILED**"]


def bandwidth(xp: ModuleType, stream: Any) -> list[list[object]]:
    """Pinned host <-> device copies of 64 MB, in GB/s (host memcpy with numpy)."""
    clock = Clock(xp, stream)
    if stream is None:
        src = np.ones(COPY_BYTES, np.uint8)
        dst = np.empty_like(src)
        seconds = clock.seconds(lambda: np.copyto(dst, src), 5)
        return [["host memcpy (dry run: no device)", COPY_BYTES // 2**20, _gbs(seconds)]]
    host = np.frombuffer(xp.cuda.alloc_pinned_memory(COPY_BYTES), np.uint8, COPY_BYTES)
    host[:] = 1
    device = xp.empty(COPY_BYTES, np.uint8)
    rows = []
    for label, work in (
        ("host to device (pinned)", lambda: device.set(host, stream=stream)),
        ("device to host (pinned)", lambda: device.get(stream=stream, out=host)),
    ):
        work()  # warm-up
        rows.append([label, COPY_BYTES // 2**20, _gbs(clock.seconds(work, 10))])
    return rows


def _gbs(seconds: float) -> str:
    return f"{COPY_BYTES / seconds / 1e9:.1f}"


def sizes(model: ModelVersion) -> list[int]:
    return [s for s in BATCH_SIZES if s <= model.max_batch_size]


def assembly(name: str, model: ModelVersion, backend: DeviceBackend) -> list[list[object]]:
    """Microseconds to assemble a batch of ``REQUESTS_PER_BATCH`` requests on the device."""
    assert backend.assembler is not None
    clock = Clock(backend.xp, backend.stream)
    rows = []
    rng = np.random.default_rng(1)
    for size in sizes(model):
        requests = split(make_request(name, size, rng), REQUESTS_PER_BATCH)
        nbytes = sum(input_bytes(r) for r in requests)
        backend.assembler.assemble(requests)  # warm-up
        repeats = max(3, min(200, int(2e8 // max(nbytes, 1))))
        seconds = clock.seconds(lambda r=requests: backend.assembler.assemble(r), repeats)
        rows.append(
            [name, size, len(requests), f"{seconds * 1e6:.0f}", f"{nbytes / seconds / 1e9:.2f}"]
        )
    return rows


def input_bytes(batch: pa.RecordBatch) -> int:
    """Bytes of a request's input values: what travels to the device (offsets aside)."""
    total = 0
    for column in batch.columns:
        if tensors.layout(column.type).ragged:
            total += tensors.ragged_to_numpy(column).values.nbytes
        else:
            total += tensors.to_numpy(column).nbytes
    return total


def events_per_second(backend: Any, requests: list[pa.RecordBatch]) -> float:
    backend.execute(requests)  # warm-up
    rows = sum(r.num_rows for r in requests)
    calls = 0
    t0 = time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < CELL_SECONDS:
        backend.execute(requests)
        calls += 1
    return rows * calls / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cpu", action="store_true", help="dry run with numpy, no GPU needed")
    parser.add_argument("--device", default="cuda:0", help="the GPU (default cuda:0)")
    parser.add_argument("--output", type=Path, help="the Markdown file (default in results/)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    if args.cpu:
        xp: ModuleType = np
        gpu_name = "none: dry run with xp=numpy and a CPU session"
        on_device: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    else:
        try:
            xp = import_cupy("benchmarks/gpu_check")
        except (ModuleNotFoundError, RuntimeError) as err:
            print(f"gpu_check: {err}; or try the dry run: --cpu", file=sys.stderr)
            return 2
        if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA/cuDNN from pip wheels
            try:
                ort.preload_dlls()
            except OSError as err:
                print(f"gpu_check: onnxruntime.preload_dlls(): {err}", file=sys.stderr)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(
                "gpu_check: onnxruntime has no CUDA provider "
                f"({ort.get_available_providers()}): pip uninstall -y onnxruntime && "
                "pip install 'onnxruntime-gpu[cuda,cudnn]'",
                file=sys.stderr,
            )
            return 2
        device_id = int(args.device.partition(":")[2] or 0)
        gpu_name = xp.cuda.runtime.getDeviceProperties(device_id)["name"].decode()
        on_device = xp.cuda.Device(device_id)  # the copies and timings below run there
    output = args.output or Path("benchmarks/results") / (
        "gpu_check_cpu.md" if args.cpu else "gpu_check.md"
    )

    report = Report("GPU path check" + (" (DRY RUN: numpy, no GPU)" if args.cpu else ""))
    report.note(f"GPU: **{gpu_name}** (`{args.device if not args.cpu else 'cpu'}`)")
    with tempfile.TemporaryDirectory() as tmp, on_device:
        repo = Repository(write_example_repository(tmp))
        models = {name: repo.load(name)[0] for name in EXAMPLE_MODELS}
        try:
            gpu = {n: DeviceBackend(m, xp=xp, device=args.device) for n, m in models.items()}
        except ModelError as err:
            print(f"gpu_check: {err}", file=sys.stderr)
            return 2
        cpu = {n: OnnxRuntimeBackend(m, device="cpu") for n, m in models.items()}

        rows = []
        for name in EXAMPLE_MODELS:
            try:
                rows.append(check(name, models[name], gpu[name], cpu[name], exact=args.cpu))
            except Exception as err:  # noqa: BLE001 - report it, and check the other models
                rows.append([name, "", "", "", f"**FAILED**: {type(err).__name__}: {err}"])
        failed = {str(r[0]) for r in rows if "FAILED" in str(r[-1])}
        report.failed = bool(failed)
        working = [name for name in EXAMPLE_MODELS if name not in failed]
        tolerance = (
            "bit for bit" if args.cpu else f"rtol {TOLERANCE['rtol']}, atol {TOLERANCE['atol']}"
        )
        report.table(
            f"Correctness: device path against the CPU backend ({tolerance})",
            ["model", "requests", "rows", "max abs diff", "result"],
            rows,
        )
        stream = gpu["identity"].stream
        report.table("Copies", ["copy", "MB", "GB/s"], bandwidth(xp, stream))
        rows = []
        for name in working:
            rows += assembly(name, models[name], gpu[name])
        report.table(
            f"Batch assembly on the device ({REQUESTS_PER_BATCH} requests per batch)",
            ["model", "batch size", "requests", "us per batch", "GB/s of inputs"],
            rows,
        )
        rows = []
        skipped = 0
        rng = np.random.default_rng(2)
        for name in working:
            for size in sizes(models[name]):
                if time.perf_counter() - started > BUDGET_SECONDS:
                    skipped += 1
                    continue
                requests = split(make_request(name, size, rng), REQUESTS_PER_BATCH)
                on_cpu = events_per_second(cpu[name], requests)
                on_gpu = events_per_second(gpu[name], requests)
                rows.append(
                    [name, size, f"{on_cpu:,.0f}", f"{on_gpu:,.0f}", f"{on_gpu / on_cpu:.2f}"]
                )
        report.table(
            f"Events/s by batch size ({REQUESTS_PER_BATCH} requests per batch, "
            f"{CELL_SECONDS} s per cell)",
            ["model", "batch size", "CPU backend", "DeviceBackend", "device / CPU"],
            rows,
        )
        if skipped:
            report.note(f"{skipped} cells skipped: the {BUDGET_SECONDS} s budget was spent.")
        if failed:
            report.note(f"Not timed, as their check failed: {', '.join(sorted(failed))}.")
    report.note(f"Total time: {time.perf_counter() - started:.0f} s.")
    report.lines += ["", "## Machine", "", markdown(describe())]

    text = report.markdown()
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"written to {output}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
