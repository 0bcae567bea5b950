"""Device-side batch assembly: the numpy path of the GPU code against the CPU backend.

``DeviceBackend(model, xp=numpy)`` runs the same assembly, padding and splitting code as
on a GPU, with numpy as the array module; its results must be those of
``OnnxRuntimeBackend`` bit for bit. ``_fakecupy`` (numpy memory, CuPy's transfer API,
asynchronous copies) runs the CuPy branch: pinned staging, streams and IOBinding on data
pointers. The ``gpu`` tests run the real thing where CuPy sees a GPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
from collections.abc import Iterator
from types import ModuleType

import _fakecupy
import numpy as np
import onnx
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from arrowinfer import events, tensors
from arrowinfer.backends import Backend, create_backend, device, import_cupy
from arrowinfer.backends.device import DeviceAssembler, DeviceBackend, fill_mask, pad
from arrowinfer.backends.ort import OnnxRuntimeBackend, assemble_inputs, input_plan
from arrowinfer.dense import DenseBatch
from arrowinfer.errors import InvalidInput, ModelError
from arrowinfer.examples import EXAMPLE_MODELS, write_example_repository
from arrowinfer.repository import ModelVersion, Repository

HAVE_CUPY = importlib.util.find_spec("cupy") is not None

#: The examples the device backend serves: a model with ragged batching (track_sum) is
#: assembled on the host and run by onnxruntime's CUDA provider (backends._factory).
DEVICE_MODELS = [name for name in EXAMPLE_MODELS if name != "track_sum"]


# -- fixtures and requests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelVersion]:
    repo = Repository(write_example_repository(tmp_path_factory.mktemp("examples")))
    return {name: repo.load(name)[0] for name in EXAMPLE_MODELS}


@pytest.fixture(scope="module")
def cpu(models: dict[str, ModelVersion]) -> dict[str, Backend]:
    return {name: OnnxRuntimeBackend(model) for name, model in models.items()}


@pytest.fixture(scope="module")
def on_numpy(models: dict[str, ModelVersion]) -> dict[str, DeviceBackend]:
    return {name: DeviceBackend(model, xp=np) for name, model in models.items()}


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake CuPy, with sessions that run on the CPU but are bound like CUDA ones."""
    cpu_session = device._session

    def session(model: ModelVersion, on_device: bool, device_id: int) -> tuple[object, str | None]:
        session, bind = cpu_session(model, False, device_id)
        return session, "cpu" if on_device else bind

    monkeypatch.setattr(device, "_session", session)
    _fakecupy.reset()
    yield _fakecupy
    _fakecupy.reset()


def request_for(name: str, n: int, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    if name == "facile":
        hits = rng.standard_normal((n, 15), dtype=np.float32)
        return pa.RecordBatch.from_arrays([tensors.from_numpy(hits)], ["hits"])
    if name == "jet_tagger":
        return events.synthetic_jet_constituents(n, seed=seed)
    if name == "toptag_cnn":
        return events.synthetic_jet_images(n, seed=seed)
    assert name == "identity"
    values = rng.standard_normal((n, 1024), dtype=np.float32)
    return pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["INPUT0"])


def ragged_jets(counts: list[int], seed: int = 0) -> pa.RecordBatch:
    """Jets with exactly these particle counts (random values)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    total = int(offsets[-1])
    points = rng.standard_normal((total, 2), dtype=np.float32)
    features = rng.standard_normal((total, 7), dtype=np.float32)
    return pa.RecordBatch.from_arrays(
        [tensors.ragged_from_numpy(offsets, points), tensors.ragged_from_numpy(offsets, features)],
        ["points", "features"],
    )


def pieces(batch: pa.RecordBatch, cuts: list[int]) -> list[pa.RecordBatch]:
    bounds = [0, *sorted(set(cuts)), batch.num_rows]
    return [batch.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def assert_same_results(got: list[pa.RecordBatch], expected: list[pa.RecordBatch]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.schema.equals(e.schema, check_metadata=True)
        assert g.num_rows == e.num_rows
        for name in e.schema.names:
            np.testing.assert_array_equal(
                tensors.to_numpy(g.column(name)), tensors.to_numpy(e.column(name)), err_msg=name
            )


# -- the numpy path against the CPU backend ----------------------------------------------------


@pytest.mark.parametrize("name", DEVICE_MODELS)
@settings(deadline=None, max_examples=8)
@given(data=st.data())
def test_same_results_as_cpu_backend(
    name: str,
    data: st.DataObject,
    models: dict[str, ModelVersion],
    cpu: dict[str, Backend],
    on_numpy: dict[str, DeviceBackend],
) -> None:
    n = data.draw(st.integers(1, 40), label="rows")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    cuts = data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=6), label="cuts")
    requests = pieces(request_for(name, n, seed), [c for c in cuts if c < n])

    got, timings = on_numpy[name].execute(requests)

    expected, _ = cpu[name].execute(requests)
    assert_same_results(got, expected)
    assert all(isinstance(t, int) and t >= 0 for t in timings)
    for result in got:
        assert result.schema.equals(models[name].outputs, check_metadata=True)


def test_jets_empty_and_longer_than_the_model_takes(
    cpu: dict[str, Backend], on_numpy: dict[str, DeviceBackend]
) -> None:
    counts = [0, 3, 0, 150, 100, 101, 1, 0, 0, 250, 42]
    batch = ragged_jets(counts, seed=7)
    requests = pieces(batch, [2, 3, 7, 9])  # one request of empty jets only: [7, 9)

    got, _ = on_numpy["jet_tagger"].execute(requests)

    expected, _ = cpu["jet_tagger"].execute(requests)
    assert_same_results(got, expected)
    probabilities = np.concatenate([tensors.to_numpy(r.column("probabilities")) for r in got])
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_array_equal(probabilities[0], probabilities[2])  # empty jets alike


def test_buffers_are_reused(models: dict[str, ModelVersion]) -> None:
    backend = DeviceBackend(models["identity"], xp=np)
    assert backend.assembler is not None
    buffer = backend.assembler.buffers["INPUT0"]
    assert buffer.shape == (models["identity"].max_batch_size, 1024)
    first = [request_for("identity", 5, seed=1), request_for("identity", 3, seed=2)]

    results, _ = backend.execute(first)
    kept = [tensors.to_numpy(r.column("OUTPUT0")).copy() for r in results]
    inputs = backend.assembler.assemble([request_for("identity", 17, seed=3)])
    backend.execute([request_for("identity", 11, seed=4)])

    assert backend.assembler.buffers["INPUT0"] is buffer
    assert np.shares_memory(inputs["INPUT0"], buffer)
    assert inputs["INPUT0"].ctypes.data == buffer.ctypes.data
    # results own their memory: the next batch in the same buffer does not change them
    for result, before in zip(results, kept, strict=True):
        after = tensors.to_numpy(result.column("OUTPUT0"))
        assert not np.shares_memory(after, buffer)
        np.testing.assert_array_equal(after, before)


def test_requests_land_in_their_slots(models: dict[str, ModelVersion]) -> None:
    model = models["facile"]
    assembler = DeviceAssembler(np, input_plan(model), model.max_batch_size, model=model.name)
    requests = [request_for("facile", n, seed=n) for n in (4, 1, 7, 2)]

    ((name, batch),) = assembler.assemble(requests).items()

    assert name == "hits"
    assert batch.shape == (14, 15)
    start = 0
    for request in requests:
        n = request.num_rows
        np.testing.assert_array_equal(batch[start : start + n], tensors.to_numpy(request["hits"]))
        start += n


def test_buffers_grow_past_max_batch_size(
    models: dict[str, ModelVersion], cpu: dict[str, Backend]
) -> None:
    model = models["jet_tagger"]
    assembler = DeviceAssembler(np, input_plan(model), 2, model=model.name)
    requests = pieces(ragged_jets([5, 0, 120, 7, 1], seed=3), [1, 3])

    inputs = assembler.assemble(requests)

    assert {k: v.shape[0] for k, v in inputs.items()} == dict.fromkeys(inputs, 5)
    expected = {"points": 2, "features": 7}
    merged = tensors.batch_to_numpy(pa.Table.from_batches(requests).combine_chunks())
    for key, width in expected.items():
        ragged = merged[key]
        assert isinstance(ragged, tensors.Ragged)
        np.testing.assert_array_equal(inputs[key], tensors.pad(ragged, 100))
        assert inputs[key].shape == (5, 100, width)
    np.testing.assert_array_equal(
        inputs["mask"], tensors.mask(merged["points"].counts, 100, shape=(1,))
    )


def test_mixed_column_forms_in_one_batch(
    models: dict[str, ModelVersion], on_numpy: dict[str, DeviceBackend], cpu: dict[str, Backend]
) -> None:
    """fixed_shape_tensor and nested fixed_size_list requests share a batch."""
    a = request_for("facile", 3, seed=1)
    values = tensors.to_numpy(request_for("facile", 4, seed=2)["hits"])
    b = pa.RecordBatch.from_arrays(
        [tensors.from_numpy(values, tensor_type="fixed_size_list")], ["hits"]
    )
    got, _ = on_numpy["facile"].execute([a, b])
    expected = [cpu["facile"].execute([r])[0][0] for r in (a, b)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(
            tensors.to_numpy(g["energy"]), tensors.to_numpy(e["energy"]), rtol=1e-6, atol=1e-7
        )


def test_ragged_inputs_must_agree(on_numpy: dict[str, DeviceBackend]) -> None:
    good = ragged_jets([2, 5, 1], seed=8)
    bad = pa.RecordBatch.from_arrays(
        [good.column("points"), ragged_jets([2, 4, 1], seed=8).column("features")],
        ["points", "features"],
    )
    with pytest.raises(InvalidInput, match="same number of items") as info:
        on_numpy["jet_tagger"].execute([good, bad])
    assert info.value.model == "jet_tagger"


# -- the vectorised pad and mask ---------------------------------------------------------------


@st.composite
def raggeds(draw: st.DrawFn) -> tensors.Ragged:
    """Ragged collections with empty entries, zero entries, and offsets not starting at 0."""
    counts = draw(st.lists(st.integers(0, 7), max_size=8))
    skip = draw(st.integers(0, 3))  # items before the first entry (a sliced column)
    inner = draw(st.lists(st.integers(1, 3), max_size=2).map(tuple))
    offsets = np.full(len(counts) + 1, skip, dtype=draw(st.sampled_from([np.int32, np.int64])))
    np.cumsum(counts, out=offsets[1:])
    offsets[1:] += skip
    values = draw(hnp.arrays(np.float32, (int(offsets[-1]), *inner)))
    return tensors.Ragged(offsets, values)


@given(
    ragged=raggeds(),
    length=st.integers(0, 6),
    pad_value=st.sampled_from([0.0, -1.0, 7.5]),
)
def test_device_pad_equals_tensors_pad(
    ragged: tensors.Ragged, length: int, pad_value: float
) -> None:
    expected = tensors.pad(ragged, length, pad_value=pad_value)
    got = pad(ragged.offsets, ragged.values, length, pad_value=pad_value, xp=np)
    np.testing.assert_array_equal(got, expected)
    out = np.full_like(expected, 99.0)
    assert pad(ragged.offsets, ragged.values, length, pad_value=pad_value, out=out) is out
    np.testing.assert_array_equal(out, expected)


@given(ragged=raggeds(), length=st.integers(0, 6), shape=st.sampled_from([(), (1,), (2, 3)]))
def test_fill_mask_equals_tensors_mask(
    ragged: tensors.Ragged, length: int, shape: tuple[int, ...]
) -> None:
    expected = tensors.mask(ragged.counts, length, shape=shape)
    out = np.full((len(ragged), length, *shape), 5.0, dtype=np.float32)
    np.testing.assert_array_equal(fill_mask(ragged.offsets, out), expected)


def test_pad_refuses_a_wrong_out() -> None:
    offsets, values = np.array([0, 2]), np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        pad(offsets, values, 4, out=np.empty((1, 5, 3), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        pad(offsets, values, 4, out=np.empty((1, 4, 6), np.float32)[:, :, ::2])


# -- models beyond the examples ----------------------------------------------------------------


def _write_model(repo: pathlib.Path, name: str, node: onnx.NodeProto, dims: str, config: str):
    (repo / name / "1").mkdir(parents=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *dims.split()])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *dims.split()])
    model = helper.make_model(
        helper.make_graph([node], name, [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(config)
    return Repository(repo).load(name)[0]


@pytest.fixture
def gpu_model(tmp_path: pathlib.Path) -> ModelVersion:
    return _write_model(
        tmp_path,
        "on_gpu",
        helper.make_node("Neg", ["x"], ["y"]),
        "2",
        "max_batch_size: 8\ninstance_group [ { count: 1 kind: KIND_GPU } ]\n",
    )


def test_variable_dims(tmp_path: pathlib.Path, fake_cupy: ModuleType) -> None:
    """Per-entry dims that each batch decides (-1): list columns of one length per batch."""
    var = _write_model(
        tmp_path,
        "var",
        helper.make_node("Neg", ["x"], ["y"]),
        "n",
        'max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n',
    )
    column = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], type=pa.list_(pa.float32()))
    request = pa.RecordBatch.from_arrays([column], ["x"])
    short = pa.RecordBatch.from_arrays([pa.array([[1.0]], type=column.type)], ["x"])
    for backend in (DeviceBackend(var, xp=np), DeviceBackend(var, xp=fake_cupy)):
        results, _ = backend.execute([request, request.slice(1, 1)])
        assert results[0].column("y").to_pylist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]
        assert results[1].column("y").to_pylist() == [[-4.0, -5.0, -6.0]]
        (alone,), _ = backend.execute([short])
        assert alone.column("y").to_pylist() == [[-1.0]]
        with pytest.raises(InvalidInput, match="different lengths"):
            backend.execute([request, short])


def test_model_without_batching(tmp_path: pathlib.Path, fake_cupy: ModuleType) -> None:
    model = _write_model(
        tmp_path,
        "single",
        helper.make_node("Neg", ["x"], ["y"]),
        "",
        'max_batch_size: 0\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n',
    )
    request = pa.RecordBatch.from_arrays(
        [pa.array([[1.5, -2.0, 3.0]], type=pa.list_(pa.float32()))], ["x"]
    )
    for xp in (np, fake_cupy):
        backend = DeviceBackend(model, xp=xp)
        assert backend.assembler is None
        (result,), _ = backend.execute([request])
        assert result.column("y").to_pylist() == [[-1.5, 2.0, -3.0]]
        with pytest.raises(InvalidInput, match="max_batch_size 0"):
            backend.execute([request, request])


# -- the CuPy branch, on the fake --------------------------------------------------------------


@pytest.mark.parametrize("name", DEVICE_MODELS)
def test_cupy_branch_on_fake_cupy(
    name: str, fake_cupy: ModuleType, models: dict[str, ModelVersion], cpu: dict[str, Backend]
) -> None:
    backend = DeviceBackend(models[name], xp=fake_cupy)
    assert backend.on_device
    assert backend.assembler is not None
    batch = (
        request_for(name, 40, seed=11)
        if name != "jet_tagger"
        else ragged_jets([0, 3, 150, 100, 101, 1, 0, 42] * 5, seed=11)
    )
    staging = None
    for cuts in ([7, 8, 30], [1, 2, 3, 4, 39], []):
        requests = pieces(batch, cuts)
        fake_cupy.reset()

        got, _ = backend.execute(requests)

        expected, _ = cpu[name].execute(requests)
        assert_same_results(got, expected)
        copies = fake_cupy.h2d
        assert copies
        assert all(pinned for _, pinned in copies), (
            "every host-to-device copy is from pinned memory"
        )
        # one copy per request and lane at most; small requests coalesce
        lanes = 3 if name == "jet_tagger" else 1
        assert len(copies) <= lanes * len(requests) + 1
        assert sum(n for n, _ in copies) == sent_bytes(requests)
        assert len(fake_cupy.d2h) == 1  # one copy back per output, for all requests
        if staging is not None:
            assert backend.assembler.staging_bytes == staging  # reused, not reallocated
        staging = backend.assembler.staging_bytes


def sent_bytes(requests: list[pa.RecordBatch]) -> int:
    """What should travel: the columns' values, plus one set of int64 offsets if ragged."""
    total = 0
    ragged = False
    for request in requests:
        for column in request.columns:
            if tensors.layout(column.type).ragged:
                total += tensors.ragged_to_numpy(column).values.nbytes
                ragged = True
            else:
                total += tensors.to_numpy(column).nbytes
    rows = sum(r.num_rows for r in requests)
    return total + (8 * (rows + 1) if ragged else 0)


def test_fake_cupy_would_catch_a_missing_synchronize(
    fake_cupy: ModuleType, models: dict[str, ModelVersion]
) -> None:
    """Without the stream's synchronize the batch buffer still holds stale data."""
    model = models["identity"]
    stream = fake_cupy.cuda.Stream(non_blocking=True)
    assembler = DeviceAssembler(fake_cupy, input_plan(model), 4, stream=stream, model="identity")
    request = request_for("identity", 3, seed=5)
    assembler.buffers["INPUT0"][:] = 0  # a kernel: runs now

    batch = assembler.assemble([request])["INPUT0"]

    assert not np.any(batch.view(np.ndarray))  # the copy is still queued
    stream.synchronize()
    np.testing.assert_array_equal(batch.view(np.ndarray), tensors.to_numpy(request["INPUT0"]))


def test_large_requests_are_sent_in_chunks(
    fake_cupy: ModuleType, models: dict[str, ModelVersion]
) -> None:
    model = models["identity"]
    assembler = DeviceAssembler(
        fake_cupy, input_plan(model), 64, stream=fake_cupy.cuda.Stream(), chunk_bytes=16 * 4096
    )
    requests = [request_for("identity", n, seed=n) for n in (40, 3, 5, 8)]
    batch = assembler.assemble(requests)["INPUT0"]
    fake_cupy.cuda.Stream().synchronize()
    assert [n for n, _ in fake_cupy.h2d] == [40 * 4096, 16 * 4096]  # 40 | 3+5+8
    expected = np.concatenate([tensors.to_numpy(r["INPUT0"]) for r in requests])
    np.testing.assert_array_equal(batch.view(np.ndarray), expected)


# -- choosing the backend, and CuPy missing ----------------------------------------------------


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
def test_import_cupy_says_how_to_install_it() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'arrowinfer\[gpu\]'") as info:
        import_cupy("device-side batching")
    assert "device-side batching" in str(info.value)


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
@pytest.mark.parametrize(("config_gpu", "device_arg"), [(True, None), (False, "cuda:0")])
def test_gpu_model_without_cupy(
    gpu_model: ModelVersion, models: dict[str, ModelVersion], config_gpu: bool, device_arg: str
) -> None:
    model = gpu_model if config_gpu else models["facile"]
    with pytest.raises(ModelError) as info:
        create_backend(model, device=device_arg)
    message = str(info.value)
    assert repr(model.name) in message
    assert "pip install 'arrowinfer[gpu]'" in message
    assert "--device cpu" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ModelError, match=model.name):
        DeviceBackend(model)


def test_cpu_unless_a_gpu_is_asked_for(
    gpu_model: ModelVersion, models: dict[str, ModelVersion]
) -> None:
    assert isinstance(create_backend(models["facile"]), OnnxRuntimeBackend)
    assert isinstance(create_backend(models["facile"], device="cpu"), OnnxRuntimeBackend)
    assert isinstance(create_backend(gpu_model, device="cpu"), OnnxRuntimeBackend)


def test_device_names(gpu_model: ModelVersion, fake_cupy: ModuleType) -> None:
    assert DeviceBackend(gpu_model, xp=fake_cupy, device="cuda").device_id == 0
    assert DeviceBackend(gpu_model, xp=fake_cupy, device="cuda:3").device_id == 3
    with pytest.raises(ModelError, match="'cuda' or 'cuda:N'"):
        DeviceBackend(gpu_model, xp=fake_cupy, device="gpu0")


# -- on a real GPU -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy() -> ModuleType:
    cp = pytest.importorskip("cupy", reason="needs CuPy and an NVIDIA GPU")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except RuntimeError as err:
        pytest.skip(f"CuPy sees no CUDA driver: {err}")
    if count == 0:
        pytest.skip("CuPy sees no CUDA device")
    return cp


def _cuda_provider() -> bool:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA libraries from wheels
        try:
            ort.preload_dlls()
        except OSError:
            return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def cuda_provider(cupy: ModuleType) -> None:
    if not _cuda_provider():
        pytest.skip("onnxruntime has no CUDA provider here: onnxruntime-gpu is not installed")


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).view(np.uint8).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_bytes", [device.CHUNK_BYTES, 4096])
@pytest.mark.parametrize("name", DEVICE_MODELS)
def test_gpu_assembly_is_the_cpu_assembly_bit_for_bit(
    name: str, chunk_bytes: int, cupy: ModuleType, models: dict[str, ModelVersion]
) -> None:
    """On a real GPU, the batch the device assembles (pinned staging, async copies on a
    non-default stream, the pad and mask kernels) holds the bits the CPU backend feeds
    onnxruntime. Small chunks put many copies in flight while the next rows are staged."""
    model = models[name]
    plan = input_plan(model)
    stream = cupy.cuda.Stream(non_blocking=True)
    assembler = DeviceAssembler(
        cupy,
        plan,
        model.max_batch_size,
        pad_value=model.pad_value,
        stream=stream,
        model=name,
        chunk_bytes=chunk_bytes,
    )
    batch = (
        request_for(name, 300, seed=13)
        if name != "jet_tagger"
        else ragged_jets([0, 3, 150, 100, 101, 1, 0, 42] * 40, seed=13)
    )
    staging = None
    for cuts in ([7, 8, 100, 299], [1], [], [150]):  # the third outgrows max_batch_size
        requests = pieces(batch, cuts)

        got = assembler.assemble(requests)
        stream.synchronize()

        expected = assemble_inputs(model, requests, plan=plan)
        assert list(got) == list(expected)
        for key, value in expected.items():
            on_host = cupy.asnumpy(got[key])
            assert (on_host.dtype, on_host.shape) == (value.dtype, value.shape), key
            assert _bits(on_host) == _bits(value), key
        if staging is not None and batch.num_rows <= model.max_batch_size:
            assert assembler.staging_bytes == staging  # reused, not reallocated
        staging = assembler.staging_bytes


@pytest.mark.gpu
@settings(deadline=None, max_examples=40)
@given(
    ragged=raggeds(),
    length=st.integers(0, 6),
    pad_value=st.sampled_from([0.0, -1.0, 7.5]),
    shape=st.sampled_from([(), (1,), (2, 3)]),
)
def test_gpu_pad_and_mask_equal_tensors_pad_and_mask(
    cupy: ModuleType, ragged: tensors.Ragged, length: int, pad_value: float, shape: tuple[int, ...]
) -> None:
    offsets, values = cupy.asarray(ragged.offsets), cupy.asarray(ragged.values)
    got = pad(offsets, values, length, pad_value=pad_value, xp=cupy)
    expected = tensors.pad(ragged, length, pad_value=pad_value)
    assert _bits(cupy.asnumpy(got)) == _bits(expected)
    out = cupy.full((len(ragged), length, *shape), 5.0, dtype=cupy.float32)
    mask = cupy.asnumpy(fill_mask(offsets, out, xp=cupy))
    assert _bits(mask) == _bits(tensors.mask(ragged.counts, length, shape=shape))


@pytest.mark.gpu
def test_gpu_split_copies_each_output_back_once(
    cupy: ModuleType, models: dict[str, ModelVersion]
) -> None:
    model = models["facile"]
    stream = cupy.cuda.Stream(non_blocking=True)
    assembler = DeviceAssembler(cupy, input_plan(model), 8, stream=stream, model=model.name)
    expected = np.random.default_rng(3).standard_normal((10, 3), dtype=np.float32)
    with stream:
        outputs = {"energy": cupy.asarray(expected)}

    parts = assembler.split(outputs, [4, 0, 6])

    assert [len(p["energy"]) for p in parts] == [4, 0, 6]
    np.testing.assert_array_equal(np.concatenate([p["energy"] for p in parts]), expected)
    assert type(parts[0]["energy"]) is np.ndarray
    first, last = parts[0]["energy"], parts[2]["energy"]
    assert last.ctypes.data == first.ctypes.data + first.nbytes  # slices of one copy


@pytest.mark.gpu
def test_gpu_without_onnxruntime_gpu_names_the_fix(
    cupy: ModuleType, models: dict[str, ModelVersion]
) -> None:
    if _cuda_provider():
        pytest.skip("onnxruntime has a CUDA provider here")
    with pytest.raises(ModelError) as info:
        create_backend(models["facile"], device="cuda:0")
    message = str(info.value)
    for part in ("'facile'", "onnxruntime-gpu", "--device cpu"):
        assert part in message


@pytest.mark.gpu
@pytest.mark.parametrize("name", DEVICE_MODELS)
def test_gpu_matches_cpu_backend(
    name: str,
    cupy: ModuleType,
    cuda_provider: None,
    models: dict[str, ModelVersion],
    cpu: dict[str, Backend],
) -> None:
    backend = create_backend(models[name], device="cuda:0")
    assert isinstance(backend, DeviceBackend)
    assert backend.xp is cupy
    batch = (
        request_for(name, 300, seed=12)
        if name != "jet_tagger"
        else ragged_jets([0, 3, 150, 100, 101, 1, 0, 42] * 30, seed=12)
    )
    for cuts in ([7, 8, 100, 299], []):
        requests = pieces(batch, cuts)
        got, _ = backend.execute(requests)
        expected, _ = cpu[name].execute(requests)
        for g, e in zip(got, expected, strict=True):
            assert g.schema.equals(e.schema, check_metadata=True)
            for key in e.schema.names:
                # TF32 and other GPU kernels: float32 rounding differs from the CPU's
                np.testing.assert_allclose(
                    tensors.to_numpy(g[key]), tensors.to_numpy(e[key]), rtol=1e-2, atol=1e-3
                )


def test_batch_invariant_is_refused_where_it_is_not_implemented(tmp_path: pathlib.Path) -> None:
    # the switch changes results: a backend without it must say so, not ignore it
    def config(value: str) -> str:
        return (
            'max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
            f'parameters {{ key: "arrowinfer.batch_invariant" value: {{ string_value: "{value}" }} }}\n'
        )

    neg = helper.make_node("Neg", ["x"], ["y"])
    model = _write_model(tmp_path, "invariant", neg, "2", config("8"))
    with pytest.raises(ModelError, match="batch_invariant is implemented on the CPU"):
        DeviceBackend(model, xp=np)
    cpu = OnnxRuntimeBackend(model)
    assert cpu.fixed_rows == 8
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    (result,), _ = cpu.execute([pa.RecordBatch.from_arrays([tensors.from_numpy(x)], ["x"])])
    assert np.array_equal(tensors.to_numpy(result.column("y")), -x)
    bad = _write_model(tmp_path, "bad", neg, "2", config("maybe"))
    with pytest.raises(ModelError, match="must be true, false or a number"):
        OnnxRuntimeBackend(bad)


@pytest.mark.parametrize("name", [n for n in DEVICE_MODELS if n != "jet_tagger"])
@pytest.mark.parametrize("on_fake_cupy", [False, True])
def test_dense_requests_give_the_cpu_backends_rows(
    name: str,
    on_fake_cupy: bool,
    fake_cupy: ModuleType,
    models: dict[str, ModelVersion],
    cpu: dict[str, Backend],
) -> None:
    """KServe's dense tensors (DenseBatch) reach the device path as Arrow, beside record
    batches: each request gets the rows the CPU backend gives it."""
    model = models[name]
    assert model.dense_inputs
    backend = DeviceBackend(model, xp=fake_cupy if on_fake_cupy else np)
    batch = request_for(name, 12, seed=5)
    arrow = pieces(batch, [3, 7])
    dense = [
        DenseBatch({c: tensors.to_numpy(part.column(c)) for c in part.column_names})
        for part in arrow
    ]
    requests = [dense[0], arrow[1], dense[2]]

    got, _ = backend.execute(requests)

    expected, _ = cpu[name].execute(arrow)
    assert_same_results(got, expected)


def test_gpu_check_dry_run(tmp_path: pathlib.Path) -> None:
    """benchmarks/gpu_check.py, with numpy for CuPy: the script itself works, and its
    bit-for-bit comparison of assembled batches passes (it fails, exit 1, on a wrong one)."""
    from benchmarks import gpu_check

    out = tmp_path / "gpu_cpu.md"

    status = gpu_check.main(["--cpu", "--cell-seconds", "0.01", "--output", str(out)])

    text = out.read_text()
    assert status == 0, text
    assert text.count("| equal, bit for bit |") == len(DEVICE_MODELS)
    for size in gpu_check.JET_BATCH_SIZES:
        assert f"| jet_tagger | {size} |" in text
    assert "FAILED" not in text
    assert "DIFFERENT" not in text
