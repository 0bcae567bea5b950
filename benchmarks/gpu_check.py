"""Check and time the GPU path (CuPy batch assembly, ``DeviceBackend``) on a real GPU.

One short script for a machine with an NVIDIA GPU. From a fresh clone (Linux, an NVIDIA
driver for CUDA 12)::

    python3 -m venv .venv
    .venv/bin/pip install -e '.[gpu]'                    # arrowinfer and cupy-cuda12x
    .venv/bin/pip uninstall -y onnxruntime               # the CPU build hides the GPU one
    .venv/bin/pip install 'onnxruntime-gpu[cuda,cudnn]'  # with the CUDA 12 / cuDNN 9 wheels
    .venv/bin/python -m benchmarks.gpu_check             # from the clone's root, < 5 minutes

For CUDA 13, ``cupy-cuda13x`` instead of ``cupy-cuda12x`` (README, "Installing"). Where no
CUDA toolkit is installed system-wide, CuPy needs its libraries from PyPI too (NVRTC
compiles its kernels): ``pip install 'cupy-cuda12x[ctk]'`` (CuPy 14 and later).
It writes ``benchmarks/results/gpu.md`` and prints the same Markdown:

1. the GPU, its CUDA driver and runtime, and its PCIe link (``nvidia-smi``) with that
   link's limit;
2. copies of 64 MB: pinned host to device and back, and ``cupy.asarray`` of pageable
   memory, in GB/s;
3. for each example model the device assembles, the batch ``DeviceAssembler`` builds on
   the GPU from several requests against the CPU backend's (``assemble_inputs``), bit
   for bit;
4. ``jet_tagger``'s ragged inputs at batch 64 to 4096: batches/s of the device assembly
   (only the real items travel, padded on the GPU) against the CPU assembly (padded on the
   host), alone and followed by the upload of its padded batch;
5. needing onnxruntime's CUDA provider (``onnxruntime-gpu``): ``DeviceBackend``'s results
   against the CPU backend (within float32 tolerance: GPU kernels, TF32 included, round
   differently), and events/s by batch size. Without the provider these rows say "not
   run" and the rest still runs.

Timings are wall-clock per batch, the stream synchronized after each: what the batcher's
thread waits for. ``--cpu`` runs the same script with numpy as the array module and a
CPU session: a dry run of the script itself on any machine (results go to
``gpu_cpu.md``; the numbers say nothing about GPUs). Exit status: 0 when every check
passes, 1 when a check fails, 2 when there is no GPU or CuPy to check.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import subprocess
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
from arrowinfer.backends.device import DeviceAssembler, DeviceBackend
from arrowinfer.backends.ort import OnnxRuntimeBackend, assemble_inputs, input_plan
from arrowinfer.bench.machine import describe, markdown
from arrowinfer.errors import ModelError
from arrowinfer.examples import EXAMPLE_MODELS, write_example_repository
from arrowinfer.repository import ModelVersion, Repository

BATCH_SIZES = (1, 16, 128, 1024, 4096)
JET_BATCH_SIZES = (64, 256, 1024, 4096)
REQUESTS_PER_BATCH = 4  # a batch merges this many requests, as from several clients
CELL_SECONDS = 0.3  # timing per (model, batch size, backend)
BUDGET_SECONDS = 240  # cells after this are skipped, so that the script ends in 5 minutes
COPY_BYTES = 64 * 2**20
#: GPU against CPU: float32 kernels differ in rounding (and TF32 may be on for Conv/Gemm)
TOLERANCE = {"rtol": 1e-2, "atol": 1e-3}
#: GB/s per lane and direction, after line coding (8b/10b to PCIe 2, 128b/130b from 3)
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.877}
NOT_RUN = "not run: no onnxruntime-gpu on the machine (onnxruntime has no CUDA provider)"


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


@dataclass
class Gpu:
    """The array module and where its work runs: CuPy and a stream, or numpy (dry run)."""

    xp: ModuleType
    stream: Any = None  # a non-blocking CuPy stream; None with numpy

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def upload(self, value: np.ndarray) -> Any:
        """``cupy.asarray`` of a host array, as code without pinned staging copies it."""
        if self.stream is None:
            return np.array(value)
        with self.stream:
            return self.xp.asarray(value)

    def seconds(self, work: Callable[[], object], cell: float) -> float:
        """Wall-clock seconds per call of ``work``, each call's device work waited for:
        what the batcher's thread waits per batch. At least 3 calls, about ``cell`` s."""
        work()  # warm-up: kernels compiled, buffers allocated
        self.sync()
        calls = 0
        t0 = time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < cell:
            work()
            self.sync()
            calls += 1
        return (time.perf_counter() - t0) / calls


def _bits(array: Any, gpu: Gpu) -> bytes:
    host = array if isinstance(array, np.ndarray) else gpu.xp.asnumpy(array)
    return np.ascontiguousarray(host).view(np.uint8).tobytes()


def gpu_rows(gpu: Gpu, device_id: int) -> list[list[object]]:
    """The GPU, its CUDA versions and PCIe link, as ``nvidia-smi`` and CUDA report them."""
    if gpu.stream is None:
        return [["GPU", "none: dry run with xp=numpy and a CPU session"]]
    runtime = gpu.xp.cuda.runtime
    props = runtime.getDeviceProperties(device_id)

    def version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    rows: list[list[object]] = [
        ["GPU", props["name"].decode()],
        ["memory", f"{props['totalGlobalMem'] / 2**30:.1f} GiB"],
        ["compute capability", f"{props['major']}.{props['minor']}"],
        ["multiprocessors", props["multiProcessorCount"]],
        [
            "CUDA driver / runtime (CuPy's)",
            f"{version(runtime.driverGetVersion())} / {version(runtime.runtimeGetVersion())}",
        ],
        ["CuPy", gpu.xp.__version__],
    ]
    query = "driver_version,pcie.link.gen.max,pcie.link.gen.gpucurrent,pcie.link.width.max"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={device_id}", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        driver, gen_max, gen_now, width = (x.strip() for x in out.split(","))
        rows.append(["NVIDIA driver", driver])
        link = f"PCIe gen {gen_max} x{width} (gen {gen_now} at the time of reading)"
        if gen_max.isdigit() and width.isdigit() and int(gen_max) in PCIE_LANE_GBS:
            limit = PCIE_LANE_GBS[int(gen_max)] * int(width)
            link += f": {limit:.1f} GB/s per direction before packet overhead"
        rows.append(["host link", link])
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        rows.append(["host link", f"unknown (nvidia-smi: {err})"])
    return rows


def bandwidth(gpu: Gpu, cell: float) -> list[list[object]]:
    """64 MB copies host <-> device in GB/s: pinned, and ``asarray`` of pageable memory."""
    if gpu.stream is None:
        src = np.ones(COPY_BYTES, np.uint8)
        dst = np.empty_like(src)
        seconds = gpu.seconds(lambda: np.copyto(dst, src), cell)
        return [["host memcpy (dry run: no device)", COPY_BYTES // 2**20, _gbs(seconds)]]
    xp, stream = gpu.xp, gpu.stream
    pinned = np.frombuffer(xp.cuda.alloc_pinned_memory(COPY_BYTES), np.uint8, COPY_BYTES)
    pinned[:] = 1
    pageable = np.ones(COPY_BYTES, np.uint8)
    device = xp.empty(COPY_BYTES, np.uint8)
    return [
        [label, COPY_BYTES // 2**20, _gbs(gpu.seconds(work, cell))]
        for label, work in (
            ("host to device, pinned (`set` on a stream)", lambda: device.set(pinned, stream)),
            ("device to host, pinned (`get` on a stream)", lambda: device.get(stream, out=pinned)),
            ("host to device, pageable (`cupy.asarray`)", lambda: gpu.upload(pageable)),
        )
    ]


def _gbs(seconds: float, nbytes: int = COPY_BYTES) -> str:
    return f"{nbytes / seconds / 1e9:.1f}"


def assembler_for(model: ModelVersion, gpu: Gpu) -> DeviceAssembler:
    return DeviceAssembler(
        gpu.xp,
        input_plan(model),
        model.max_batch_size,
        pad_value=model.pad_value,
        stream=gpu.stream,
        model=model.name,
    )


def assembles(model: ModelVersion) -> bool:
    """Whether the device assembles this model's batches (ragged batching is host-side)."""
    return model.max_batch_size > 0 and not model.ragged_batch_inputs


def same_bits(name: str, model: ModelVersion, gpu: Gpu) -> list[object]:
    """Random requests, several batches: the device's assembled batch against the CPU's."""
    rng = np.random.default_rng()
    assembler = assembler_for(model, gpu)
    checked = 0
    differ = []
    for rows in (300, 7, 1000):
        requests = split(make_request(name, rows, rng), int(rng.integers(1, 9)))
        got = assembler.assemble(requests)
        gpu.sync()
        expected = assemble_inputs(model, requests, plan=assembler.plan)
        for key, value in expected.items():
            if tuple(got[key].shape) != value.shape or _bits(got[key], gpu) != _bits(value, gpu):
                differ.append(key)
            checked += value.nbytes
    result = f"**DIFFERENT**: {sorted(set(differ))}" if differ else "equal, bit for bit"
    return [name, ", ".join(e.name for e in assembler.plan), f"{checked / 1e6:.1f}", result]


def input_bytes(batch: pa.RecordBatch) -> int:
    """Bytes of a request's input values: what travels to the device (offsets aside)."""
    total = 0
    for column in batch.columns:
        if tensors.layout(column.type).ragged:
            total += tensors.ragged_to_numpy(column).values.nbytes
        else:
            total += tensors.to_numpy(column).nbytes
    return total


def assembly_sweep(
    name: str, model: ModelVersion, gpu: Gpu, sizes: Sequence[int], cell: float
) -> list[list[object]]:
    """Batches/s by batch size: the device assembly against the CPU's (alone, and with
    its padded batch uploaded by ``asarray``), :data:`REQUESTS_PER_BATCH` requests each."""
    assembler = assembler_for(model, gpu)
    rng = np.random.default_rng(1)
    rows = []
    for size in sizes:
        requests = split(make_request(name, size, rng), REQUESTS_PER_BATCH)
        sent = sum(input_bytes(r) for r in requests)
        padded = sum(v.nbytes for v in assemble_inputs(model, requests).values())

        def on_host(r: list[pa.RecordBatch] = requests) -> dict[str, np.ndarray]:
            return assemble_inputs(model, r, plan=assembler.plan)

        device = gpu.seconds(lambda r=requests: assembler.assemble(r), cell)
        host = gpu.seconds(on_host, cell)
        uploaded = gpu.seconds(lambda: [gpu.upload(v) for v in on_host().values()], cell)
        rows.append(
            [
                name,
                size,
                f"{sent / 1e6:.2f} / {padded / 1e6:.2f}",
                f"{1 / device:,.0f}",
                _gbs(device, sent),
                f"{1 / host:,.0f}",
                f"{1 / uploaded:,.0f}",
                f"{uploaded / device:.2f}",
            ]
        )
    return rows


ASSEMBLY_HEADER = [
    "model",
    "batch size",
    "MB sent / padded",
    "device assembly, batches/s",
    "its GB/s of inputs",
    "CPU assembly, batches/s",
    "CPU assembly + `asarray`, batches/s",
    "device / (CPU + upload)",
]


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


def sizes(model: ModelVersion) -> list[int]:
    return [s for s in BATCH_SIZES if s <= model.max_batch_size]


def events_per_second(backend: Any, requests: list[pa.RecordBatch], cell: float) -> float:
    backend.execute(requests)  # warm-up
    rows = sum(r.num_rows for r in requests)
    calls = 0
    t0 = time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < cell:
        backend.execute(requests)
        calls += 1
    return rows * calls / (time.perf_counter() - t0)


def with_onnxruntime(
    report: Report,
    models: dict[str, ModelVersion],
    xp: ModuleType,
    device: str,
    exact: bool,
    started: float,
    cell: float,
) -> None:
    """The sections that run models: DeviceBackend against the CPU backend."""
    gpu = {n: DeviceBackend(m, xp=xp, device=device) for n, m in models.items() if assembles(m)}
    cpu = {n: OnnxRuntimeBackend(m, device="cpu") for n, m in models.items() if n in gpu}
    rows = []
    for name, backend in gpu.items():
        try:
            rows.append(check(name, models[name], backend, cpu[name], exact=exact))
        except Exception as err:  # noqa: BLE001 - report it, and check the other models
            rows.append([name, "", "", "", f"**FAILED**: {type(err).__name__}: {err}"])
    failed = {str(r[0]) for r in rows if "FAILED" in str(r[-1])}
    report.failed |= bool(failed)
    tolerance = "bit for bit" if exact else f"rtol {TOLERANCE['rtol']}, atol {TOLERANCE['atol']}"
    report.table(
        f"DeviceBackend's results against the CPU backend ({tolerance})",
        ["model", "requests", "rows", "max abs diff", "result"],
        rows,
    )
    rows = []
    skipped = 0
    rng = np.random.default_rng(2)
    for name in (n for n in gpu if n not in failed):
        for size in sizes(models[name]):
            if time.perf_counter() - started > BUDGET_SECONDS:
                skipped += 1
                continue
            requests = split(make_request(name, size, rng), REQUESTS_PER_BATCH)
            on_cpu = events_per_second(cpu[name], requests, cell)
            on_gpu = events_per_second(gpu[name], requests, cell)
            rows.append([name, size, f"{on_cpu:,.0f}", f"{on_gpu:,.0f}", f"{on_gpu / on_cpu:.2f}"])
    report.table(
        f"Events/s by batch size ({REQUESTS_PER_BATCH} requests per batch, {cell} s per cell)",
        ["model", "batch size", "CPU backend", "DeviceBackend", "device / CPU"],
        rows,
    )
    if skipped:
        report.note(f"{skipped} cells skipped: the {BUDGET_SECONDS} s budget was spent.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cpu", action="store_true", help="dry run with numpy, no GPU needed")
    parser.add_argument("--device", default="cuda:0", help="the GPU (default cuda:0)")
    parser.add_argument("--output", type=Path, help="the Markdown file (default in results/)")
    parser.add_argument(
        "--cell-seconds", type=float, default=CELL_SECONDS, help="time per timed cell"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cell = args.cell_seconds

    device_id = int(args.device.partition(":")[2] or 0)
    on_device: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if args.cpu:
        xp: ModuleType = np
    else:
        try:
            xp = import_cupy("benchmarks/gpu_check")
        except (ModuleNotFoundError, RuntimeError) as err:
            print(f"gpu_check: {err}; or try the dry run: --cpu", file=sys.stderr)
            return 2
        on_device = xp.cuda.Device(device_id)  # the copies and timings below run there
        if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA/cuDNN from pip wheels
            try:
                ort.preload_dlls()
            except OSError as err:
                print(f"gpu_check: onnxruntime.preload_dlls(): {err}", file=sys.stderr)
    cuda_provider = args.cpu or "CUDAExecutionProvider" in ort.get_available_providers()
    output = args.output or Path("benchmarks/results") / ("gpu_cpu.md" if args.cpu else "gpu.md")

    report = Report("GPU path check" + (" (DRY RUN: numpy, no GPU)" if args.cpu else ""))
    with tempfile.TemporaryDirectory() as tmp, on_device:
        gpu = Gpu(xp, None if args.cpu else xp.cuda.Stream(non_blocking=True))
        report.table("The GPU", ["", ""], gpu_rows(gpu, device_id))
        report.table("Copies", ["copy", "MB", "GB/s"], bandwidth(gpu, cell))
        repo = Repository(write_example_repository(tmp))
        models = {name: repo.load(name)[0] for name in EXAMPLE_MODELS}
        rows = [same_bits(n, m, gpu) for n, m in models.items() if assembles(m)]
        report.failed |= any("DIFFERENT" in str(r[-1]) for r in rows)
        report.table(
            "The batch assembled on the device against the CPU backend's, several requests",
            ["model", "inputs", "MB compared", "result"],
            rows,
        )
        rows = assembly_sweep("jet_tagger", models["jet_tagger"], gpu, JET_BATCH_SIZES, cell)
        report.table(
            f"Ragged inputs: jet_tagger's batches ({REQUESTS_PER_BATCH} requests each)",
            ASSEMBLY_HEADER,
            rows,
        )
        report.note(
            "The device assembly sends only the real particles (and offsets) through pinned "
            "staging and pads on the GPU; the CPU assembly pads on the host, and then its "
            "padded batch has to be uploaded. Timings include waiting for the stream."
        )
        rows = []
        for name in ("facile", "toptag_cnn", "identity"):
            rows += assembly_sweep(name, models[name], gpu, sizes(models[name])[1:], cell)
        report.table(
            f"Dense inputs ({REQUESTS_PER_BATCH} requests per batch)", ASSEMBLY_HEADER, rows
        )
        if cuda_provider:
            try:
                with_onnxruntime(report, models, xp, args.device, args.cpu, started, cell)
            except ModelError as err:
                report.failed = True
                report.note(f"DeviceBackend could not load: {err}")
        else:
            report.table(
                "DeviceBackend: results against the CPU backend, events/s",
                ["rows", "result"],
                [["results against the CPU backend", NOT_RUN], ["events/s", NOT_RUN]],
            )
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
