"""Dense requests (the KServe front ends' tensors, without Arrow) through the core.

A :class:`DenseBatch` must be checked exactly as a record batch of the same tensors, may
share a batch with record batches, and must come back with its own rows, bit for bit.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import onnx
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from arrowinfer import tensors
from arrowinfer.backends.ort import OnnxRuntimeBackend, request_results
from arrowinfer.batching import Completed, DynamicBatcher
from arrowinfer.dense import DenseBatch, validate_dense
from arrowinfer.errors import InvalidInput, ServerError
from arrowinfer.repository import ModelVersion, Repository
from arrowinfer.schema import DATATYPES, TensorSpec, spec_field, validate
from arrowinfer.server._core import InferenceCore
from arrowinfer.server._v2request import InputTensor
from arrowinfer.server._v2tensors import input_array

WAIT = 30.0


def _identity(repo: pathlib.Path, name: str, dims: list[int], max_batch_size: int) -> ModelVersion:
    """``OUTPUT0 = INPUT0``, FP32 of ``dims`` per entry (``-1``: any size)."""
    (repo / name / "1").mkdir(parents=True)
    shape: list[int | str] = ["batch", *(d if d >= 0 else f"d{i}" for i, d in enumerate(dims))]
    x, y = (
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("INPUT0", "OUTPUT0")
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name, [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    entries = [
        f'{kind} {{ name: "{n}" data_type: TYPE_FP32 dims: {dims} }}'
        for kind, n in (("input", "INPUT0"), ("output", "OUTPUT0"))
    ]
    (repo / name / "config.pbtxt").write_text(
        f"max_batch_size: {max_batch_size}\ndynamic_batching {{ }}\n" + "\n".join(entries)
    )
    return Repository(repo).load(name)[0]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    return _identity(tmp_path_factory.mktemp("fixed"), "fixed", [3, 2], 4)


@pytest.fixture(scope="module")
def variable(tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    return _identity(tmp_path_factory.mktemp("variable"), "variable", [-1], 16)


def dense(values: np.ndarray) -> DenseBatch:
    return DenseBatch({"INPUT0": values})


def arrow(values: np.ndarray, *, as_list: bool = False) -> pa.RecordBatch:
    column = (
        pa.array(values.tolist(), pa.list_(pa.float32())) if as_list else tensors.from_numpy(values)
    )
    return pa.RecordBatch.from_arrays([column], ["INPUT0"])


def values_of(result: pa.RecordBatch | DenseBatch) -> np.ndarray:
    column = result.column("OUTPUT0")
    if isinstance(column, np.ndarray):
        return column
    if tensors.layout(column.type).ragged:
        return np.array(column.to_pylist(), dtype=np.float32)
    return tensors.to_numpy(column)


# -- validation: the same verdict as a record batch of the same tensors ------------------------

NUMBERS = [d for d in DATATYPES if d.kserve != "BYTES"]


@st.composite
def specs_and_arrays(draw: st.DrawFn) -> tuple[list[TensorSpec], dict[str, np.ndarray]]:
    """A model's inputs, and tensors that fit them or miss in one way."""
    specs = []
    for i in range(draw(st.integers(1, 3))):
        dims = draw(st.lists(st.sampled_from([-1, 2, 3]), min_size=1, max_size=2))
        specs.append(
            TensorSpec(
                f"in{i}", draw(st.sampled_from(NUMBERS)), tuple(dims), optional=draw(st.booleans())
            )
        )
    rows = draw(st.integers(0, 3))
    arrays = {}
    for spec in specs:
        entry = [draw(st.integers(1, 3)) if d == -1 else d for d in spec.shape]
        arrays[spec.name] = np.zeros((rows, *entry), dtype=spec.datatype.numpy)
    miss = draw(st.sampled_from(["none", "dtype", "dim", "ndim", "missing", "extra", "rows"]))
    name = draw(st.sampled_from(sorted(arrays)))
    array = arrays[name]
    if miss == "dtype":
        other = draw(st.sampled_from([d for d in NUMBERS if d.numpy != array.dtype]))
        arrays[name] = array.astype(other.numpy)
    elif miss == "dim":
        arrays[name] = np.zeros((rows, *(d + 1 for d in array.shape[1:])), array.dtype)
    elif miss == "ndim":
        arrays[name] = np.zeros((rows, *array.shape[1:], 2), array.dtype)
    elif miss == "missing" and len(arrays) > 1:
        del arrays[name]
    elif miss == "extra":
        arrays["other"] = np.zeros((rows, 2), np.float32)
    elif miss == "rows":
        rows += 5  # beyond max_rows for every input
        arrays = {n: np.zeros((rows, *a.shape[1:]), a.dtype) for n, a in arrays.items()}
    return specs, arrays


def _verdict(check: Callable[[], object]) -> object:
    try:
        return check()
    except InvalidInput as err:
        return ("refused", err.model, type(err).__name__)


@settings(max_examples=300, deadline=None)
@given(case=specs_and_arrays())
def test_dense_validation_gives_the_record_batch_verdict(
    case: tuple[list[TensorSpec], dict[str, np.ndarray]],
) -> None:
    specs, arrays = case
    schema = pa.schema([spec_field(s) for s in specs])
    batch = pa.RecordBatch.from_arrays(
        [tensors.from_numpy(a) for a in arrays.values()], list(arrays)
    )
    as_arrow = _verdict(lambda: validate(batch, schema, model="m", max_rows=4))
    as_dense = _verdict(lambda: validate_dense(DenseBatch(arrays), specs, model="m", max_rows=4))
    assert as_dense == as_arrow


@given(raw=st.binary(min_size=1, max_size=64))
def test_bool_bytes_are_true_unless_zero_as_arrow_reads_them(raw: bytes) -> None:
    """KServe's BOOL is a byte per value; Arrow (the Flight path, and KServe's before it took
    the dense path) reads any byte but 0 as true. The model must see 0 or 1 either way."""
    spec = TensorSpec("b", next(d for d in DATATYPES if d.kserve == "BOOL"), (len(raw),))
    tensor = InputTensor("b", "BOOL", (1, len(raw)), {})
    got = input_array(spec, tensor, raw, model="m", batching=True)
    as_sent = np.frombuffer(raw, np.bool_).reshape(1, -1)  # the bytes as they came
    arrow = tensors.to_numpy(tensors.from_numpy(as_sent))  # the Arrow path's round trip
    assert got.dtype == np.bool_
    assert got.reshape(-1).tobytes() == arrow.tobytes()
    assert set(got.view(np.uint8).reshape(-1).tolist()) <= {0, 1}


def test_dense_batch_refuses_tensors_of_different_rows() -> None:
    with pytest.raises(InvalidInput, match="one batch size"):
        DenseBatch({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
    with pytest.raises(InvalidInput, match="one batch size"):
        DenseBatch({"a": np.zeros(())})


def test_the_core_refuses_a_bad_dense_batch_naming_model_and_input(
    example_repository: pathlib.Path,
) -> None:
    core = InferenceCore(Repository(example_repository), models=["identity", "jet_tagger"])
    try:
        identity = core.get("identity", None)
        with pytest.raises(InvalidInput, match="wrong element type") as info:
            core.submit(identity, dense(np.zeros((1, 1024), np.float64)))
        assert (info.value.model, info.value.input) == ("identity", "INPUT0")
        with pytest.raises(InvalidInput, match="wrong shape per entry") as info:
            core.submit(identity, dense(np.zeros((1, 1023), np.float32)))
        assert info.value.input == "INPUT0"
        with pytest.raises(InvalidInput, match="unexpected input"):
            core.submit(identity, DenseBatch({"INPUT1": np.zeros((1, 1024), np.float32)}))
        # a model with ragged inputs needs the Arrow path: a front end's mistake, not the client's
        with pytest.raises(ServerError, match="dense"):
            core.submit(core.get("jet_tagger", None), DenseBatch({"points": np.zeros((1, 2))}))
        good = np.arange(1024, dtype=np.float32).reshape(1, 1024)
        done = core.submit(identity, dense(good)).result(WAIT)
        assert isinstance(done.batch, DenseBatch)
        np.testing.assert_array_equal(done.batch.column("OUTPUT0"), good)
    finally:
        core.close()


# -- execution: dense and Arrow requests in one batch, each with its own rows ------------------


def test_dense_and_arrow_requests_share_a_batch(fixed: ModelVersion) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3, 2), dtype=np.float32) for n in (1, 2, 1)]
    requests = [dense(parts[0]), arrow(parts[1]), dense(parts[2])]
    backend = OnnxRuntimeBackend(fixed)

    results, _ = backend.execute(requests)

    assert [type(r) for r in results] == [DenseBatch, pa.RecordBatch, DenseBatch]
    assert results[1].schema.equals(fixed.outputs, check_metadata=True)
    for result, values in zip(results, parts, strict=True):
        assert values_of(result).tobytes() == values.tobytes()  # bit for bit
    # the dense results are views of the one output of the batch, not copies
    first, last = results[0].column("OUTPUT0"), results[2].column("OUTPUT0")
    assert first.base is not None
    assert first.base is last.base


def test_variable_dims_merge_across_forms(variable: ModelVersion) -> None:
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    requests = [dense(values[:1]), arrow(values[1:3], as_list=True), dense(values[3:])]

    results, _ = OnnxRuntimeBackend(variable).execute(requests)

    got = np.concatenate([values_of(r).reshape(-1, 3) for r in results])
    np.testing.assert_array_equal(got, values)


def test_an_output_not_as_configured_fails_a_dense_request(fixed: ModelVersion) -> None:
    request = [dense(np.zeros((2, 3, 2), np.float32))]
    for wrong in (np.zeros((2, 5), np.float32), np.zeros((2, 3, 2), np.float64)):
        with pytest.raises(ServerError, match="'fixed': output 'OUTPUT0'"):
            request_results(fixed, {"OUTPUT0": wrong}, request)
    (ok,) = request_results(fixed, {"OUTPUT0": np.ones((2, 6), np.float32)}, request)
    assert isinstance(ok, DenseBatch)  # the same size per entry in another shape is fine


@pytest.fixture
def batcher(fixed: ModelVersion) -> Iterator[DynamicBatcher]:
    running = DynamicBatcher(fixed, [OnnxRuntimeBackend(fixed)])
    yield running
    running.close()


def test_a_dense_request_over_max_batch_size_is_split_and_rejoined(
    batcher: DynamicBatcher,
) -> None:
    values = np.random.default_rng(1).standard_normal((10, 3, 2), dtype=np.float32)
    done: Completed = batcher.submit(dense(values)).result(WAIT)  # 4 + 4 + 2 rows
    assert isinstance(done.batch, DenseBatch)
    assert done.batch.column("OUTPUT0").tobytes() == values.tobytes()


def test_dense_requests_from_many_threads_get_their_own_rows(batcher: DynamicBatcher) -> None:
    rng = np.random.default_rng(2)
    sent = [
        rng.standard_normal((int(rng.integers(1, 4)), 3, 2), dtype=np.float32) for _ in range(64)
    ]
    futures: list[Future[Completed]] = [batcher.submit(dense(v)) for v in sent]
    for values, future in zip(sent, futures, strict=True):
        assert values_of(future.result(WAIT).batch).tobytes() == values.tobytes()


def test_merged_dense_requests_reach_onnxruntime_without_an_alignment_copy(
    fixed: ModelVersion,
) -> None:
    """Concatenated into aligned memory, as Arrow's concatenation is (docs/reproducibility.md)."""
    backend = OnnxRuntimeBackend(fixed)
    rng = np.random.default_rng(3)
    for _ in range(20):  # numpy's own allocations are 64-byte aligned only by chance
        requests = [dense(rng.standard_normal((1, 3, 2), dtype=np.float32)) for _ in range(3)]
        backend.execute(requests)
    assert backend.take_counters().get("alignment_copies", 0) == 0
