"""The onnxruntime backend: same numbers as onnxruntime itself, batching, zero copy, ragged.

The reference for every model is a plain ``onnxruntime.InferenceSession`` on the model file,
fed numpy arrays built here without ``arrowinfer.tensors`` (for ``jet_tagger``, padded and
masked by a slow loop over jets), so that the backend's conversions are checked against an
independent path.
"""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from arrowinfer import events, tensors
from arrowinfer.backends import Backend, Timings, create_backend
from arrowinfer.backends.ort import assemble_inputs, split_outputs
from arrowinfer.errors import InvalidInput, ModelError
from arrowinfer.examples import EXAMPLE_MODELS, write_example_repository
from arrowinfer.repository import ModelVersion, Repository
from arrowinfer.schema import validate

N_PARTICLES = 100  # jet_tagger's padded size


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelVersion]:
    repo = Repository(write_example_repository(tmp_path_factory.mktemp("examples")))
    return {name: repo.load(name)[0] for name in EXAMPLE_MODELS}


@pytest.fixture(scope="module")
def backends(models: dict[str, ModelVersion]) -> dict[str, Backend]:
    return {name: create_backend(model) for name, model in models.items()}


@pytest.fixture(scope="module")
def sessions(models: dict[str, ModelVersion]) -> dict[str, ort.InferenceSession]:
    return {name: ort.InferenceSession(str(model.path)) for name, model in models.items()}


# -- requests and the independent reference ---------------------------------------------------


def facile_request(n: int, seed: int = 0) -> pa.RecordBatch:
    """``n`` HCAL hits (rows) taken from synthetic events, as facile's ``hits`` column."""
    event = events.synthetic_hcal_hits(1, seed=seed, mean_hits=2 * n + 50)
    hits = event.column("hits").flatten()[:n]  # fixed_size_list<float, 15>, one per hit
    assert len(hits) == n
    return pa.RecordBatch.from_arrays([tensors.from_numpy(tensors.to_numpy(hits))], ["hits"])


def request_for(name: str, n: int, seed: int = 0) -> pa.RecordBatch:
    if name == "facile":
        return facile_request(n, seed)
    if name == "jet_tagger":
        return events.synthetic_jet_constituents(n, seed=seed)
    if name == "toptag_cnn":
        return events.synthetic_jet_images(n, seed=seed)
    if name == "track_sum":  # n events, each with 0 to 40 tracks
        rng = np.random.default_rng(seed)
        tracks = [rng.exponential(5.0, size=rng.integers(0, 41)).tolist() for _ in range(n)]
        return pa.RecordBatch.from_arrays([pa.array(tracks, pa.list_(pa.float32()))], ["pt"])
    assert name == "identity"
    values = np.random.default_rng(seed).standard_normal((n, 1024), dtype=np.float32)
    return pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["INPUT0"])


def _jet_items(column: pa.Array, i: int, width: int) -> np.ndarray:
    return np.asarray(column[i].values.flatten(), dtype=np.float32).reshape(-1, width)


def _dense_values(column: pa.Array) -> np.ndarray:
    """A fixed-shape column's values, one row per entry (shaped as its type says, if it can)."""
    if isinstance(column.type, pa.FixedShapeTensorType):
        return np.asarray(column.to_numpy_ndarray())
    values = column
    while pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return np.asarray(values).reshape(len(column), -1)


def reference_inputs(name: str, request: pa.RecordBatch) -> dict[str, np.ndarray]:
    """The model's inputs as onnxruntime wants them, built without arrowinfer."""
    if name == "track_sum":  # Triton's ragged batching: concatenated, with offsets
        events = request.column("pt").to_pylist()
        pt = np.array([v for event in events for v in event], dtype=np.float32)
        offsets = np.cumsum([0] + [len(event) for event in events]).astype(np.int32)
        return {"pt": pt, "offsets": offsets}
    if name != "jet_tagger":
        return {
            field.name: _dense_values(column)
            for field, column in zip(request.schema, request.columns, strict=True)
        }
    n = request.num_rows
    points = np.zeros((n, N_PARTICLES, 2), dtype=np.float32)
    features = np.zeros((n, N_PARTICLES, 7), dtype=np.float32)
    mask = np.zeros((n, N_PARTICLES, 1), dtype=np.float32)
    for i in range(n):  # slow on purpose: one jet at a time
        p = _jet_items(request.column("points"), i, 2)[:N_PARTICLES]
        f = _jet_items(request.column("features"), i, 7)[:N_PARTICLES]
        points[i, : len(p)] = p
        features[i, : len(f)] = f
        mask[i, : len(p)] = 1.0
    return {"points": points, "features": features, "mask": mask}


def reference_outputs(
    session: ort.InferenceSession, name: str, *requests: pa.RecordBatch
) -> dict[str, np.ndarray]:
    """onnxruntime's outputs for the requests as one batch."""
    parts = [reference_inputs(name, r) for r in requests]
    feeds = {}
    for graph_input in session.get_inputs():
        merged = np.concatenate([p[graph_input.name] for p in parts])
        feeds[graph_input.name] = merged.reshape(len(merged), *graph_input.shape[1:])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def output_arrays(result: pa.RecordBatch) -> dict[str, np.ndarray]:
    """A result's columns as numpy, via pyarrow only (not arrowinfer.tensors)."""
    out = {}
    for field, column in zip(result.schema, result.columns, strict=True):
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[field.name] = np.asarray(column.to_numpy_ndarray())
        else:
            out[field.name] = column.to_numpy(zero_copy_only=False).reshape(len(column), -1)
    return out


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


# -- the example models against onnxruntime ---------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_MODELS)
def test_matches_onnxruntime(
    name: str,
    models: dict[str, ModelVersion],
    backends: dict[str, Backend],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    request = request_for(name, 37, seed=1)
    results, timings = backends[name].execute([request])
    assert len(results) == 1
    result = results[0]
    assert result.num_rows == 37
    assert result.schema.equals(models[name].outputs, check_metadata=True)
    assert isinstance(timings, Timings)
    assert all(isinstance(t, int) and t >= 0 for t in timings)
    expected = reference_outputs(sessions[name], name, request)
    got = output_arrays(result)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value.reshape(len(value), -1), err_msg=key)


@pytest.mark.parametrize("name", EXAMPLE_MODELS)
@settings(deadline=None, max_examples=12)
@given(data=st.data())
def test_several_requests_in_one_execute(
    name: str,
    data: st.DataObject,
    models: dict[str, ModelVersion],
    backends: dict[str, Backend],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    n = 24
    batch = request_for(name, n, seed=2)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6), label="cuts"))
    bounds = [0, *cuts, n]
    requests = [batch.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    backend = backends[name]

    merged, _ = backend.execute(requests)

    assert [r.num_rows for r in merged] == [r.num_rows for r in requests]
    for result in merged:
        assert result.schema.equals(models[name].outputs, check_metadata=True)
    # In order, and bit for bit what onnxruntime gives for the whole batch at once.
    expected = reference_outputs(sessions[name], name, batch)
    pieces = [output_arrays(r) for r in merged]
    for key, value in expected.items():
        joined = np.concatenate([p[key] for p in pieces])
        np.testing.assert_array_equal(joined, value.reshape(n, -1), err_msg=key)
    # Each request alone gives the same rows; a smaller batch may take other kernel blocking,
    # hence a tolerance at float32 rounding level rather than equality.
    for request, result in zip(requests, pieces, strict=True):
        (alone,) = backend.execute([request])[0]
        for key, value in output_arrays(alone).items():
            np.testing.assert_allclose(result[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def _large_list(column: pa.Array) -> pa.Array:
    ragged = tensors.ragged_to_numpy(column)
    return tensors.ragged_from_numpy(ragged.offsets.astype(np.int64), ragged.values)


def equivalent_forms(name: str) -> list[pa.RecordBatch]:
    """Requests whose columns differ in type but that validate() accepts alike."""
    if name == "identity":
        values = np.random.default_rng(11).standard_normal((9, 1024), dtype=np.float32)
        return [
            pa.RecordBatch.from_arrays([tensors.from_numpy(values[:4])], ["INPUT0"]),
            pa.RecordBatch.from_arrays(
                [tensors.from_numpy(values[4:], tensor_type="fixed_size_list")], ["INPUT0"]
            ),
        ]
    jets = events.synthetic_jet_constituents(9, seed=11)  # items "not null"
    own = ragged_jets([5, 0, 120], seed=12)  # items nullable
    large = pa.RecordBatch.from_arrays(
        [_large_list(own.column("points")), _large_list(own.column("features"))],
        ["points", "features"],
    )
    return [jets.slice(0, 4), own, jets.slice(4), large]


@pytest.mark.parametrize("name", ["identity", "jet_tagger"])
def test_requests_in_equivalent_forms_merge(
    name: str,
    models: dict[str, ModelVersion],
    backends: dict[str, Backend],
    sessions: dict[str, ort.InferenceSession],
) -> None:
    requests = equivalent_forms(name)
    assert len({str(r.schema.types) for r in requests}) > 1  # really different types
    for request in requests:
        validate(request, models[name].inputs, model=name)

    results, _ = backends[name].execute(requests)

    assert [r.num_rows for r in results] == [r.num_rows for r in requests]
    expected = reference_outputs(sessions[name], name, *requests)
    for key, value in expected.items():
        joined = np.concatenate([output_arrays(r)[key] for r in results])
        np.testing.assert_array_equal(joined, value.reshape(len(value), -1), err_msg=key)


# -- zero copy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "input_name"), [("facile", "hits"), ("identity", "INPUT0")])
@pytest.mark.parametrize("sliced", [False, True])
def test_one_request_is_not_copied(
    name: str, input_name: str, sliced: bool, models: dict[str, ModelVersion]
) -> None:
    whole = request_for(name, 20, seed=3)
    request = whole.slice(7, 9) if sliced else whole
    arrow_view = tensors.to_numpy(request.column(input_name))

    feed = assemble_inputs(models[name], [request])[input_name]

    assert np.shares_memory(feed, arrow_view)
    assert feed.ctypes.data == arrow_view.ctypes.data  # starts at the slice's first row
    np.testing.assert_array_equal(
        feed,
        np.asarray(whole.column(input_name).to_numpy_ndarray())[
            (7 if sliced else 0) : (16 if sliced else 20)
        ],
    )


@pytest.mark.parametrize(("name", "input_name"), [("facile", "hits"), ("identity", "INPUT0")])
def test_several_requests_are_merged_into_one_buffer(
    name: str, input_name: str, models: dict[str, ModelVersion]
) -> None:
    a, b = request_for(name, 5, seed=4), request_for(name, 3, seed=5)
    feed = assemble_inputs(models[name], [a, b])[input_name]
    expected = np.concatenate([np.asarray(r.column(input_name).to_numpy_ndarray()) for r in (a, b)])
    np.testing.assert_array_equal(feed, expected)


@pytest.mark.parametrize(
    ("name", "output", "shape"), [("facile", "energy", (1,)), ("identity", "OUTPUT0", (1024,))]
)
def test_outputs_are_not_copied(
    name: str, output: str, shape: tuple[int, ...], models: dict[str, ModelVersion]
) -> None:
    rows = [3, 1, 6]
    array = np.random.default_rng(6).standard_normal((sum(rows), *shape), dtype=np.float32)

    results = split_outputs(models[name], {output: array}, rows)

    assert [r.num_rows for r in results] == rows
    start = 0
    for result, n in zip(results, rows, strict=True):
        assert result.schema.equals(models[name].outputs, check_metadata=True)
        view = tensors.to_numpy(result.column(output))
        assert np.shares_memory(view, array)
        np.testing.assert_array_equal(view.reshape(n, *shape), array[start : start + n])
        start += n


# -- ragged inputs -----------------------------------------------------------------------------


def test_jets_empty_and_truncated(
    backends: dict[str, Backend], sessions: dict[str, ort.InferenceSession]
) -> None:
    counts = [0, 3, 0, 150, 100, 101, 1]
    request = ragged_jets(counts, seed=7)

    (result,), _ = backends["jet_tagger"].execute([request])

    got = output_arrays(result)["probabilities"]
    expected = reference_outputs(sessions["jet_tagger"], "jet_tagger", request)["probabilities"]
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    # Empty jets look alike; a truncated jet is its first 100 particles, cut here by hand.
    np.testing.assert_array_equal(got[0], got[2])
    offsets = np.array([0, 100], np.int32)
    cut = pa.RecordBatch.from_arrays(
        [
            tensors.ragged_from_numpy(offsets, _jet_items(request.column("points"), 3, 2)[:100]),
            tensors.ragged_from_numpy(offsets, _jet_items(request.column("features"), 3, 7)[:100]),
        ],
        ["points", "features"],
    )
    (cut_result,), _ = backends["jet_tagger"].execute([cut])
    # a batch of one, not seven: float32 rounding may differ, nothing more
    np.testing.assert_allclose(
        output_arrays(cut_result)["probabilities"][0], got[3], rtol=1e-5, atol=1e-6
    )


def test_jets_padded_and_masked(models: dict[str, ModelVersion]) -> None:
    """The model's padding cannot change its output, so check the padded arrays themselves."""
    request = ragged_jets([0, 3, 0, 150, 100, 101, 1, 42], seed=10)
    requests = [request.slice(0, 3), request.slice(3, 1), request.slice(4, 4)]

    feeds = assemble_inputs(models["jet_tagger"], requests)

    expected = reference_inputs("jet_tagger", request)
    assert set(feeds) == set(expected)
    for key, value in expected.items():
        assert feeds[key].dtype == np.float32
        np.testing.assert_array_equal(feeds[key], value, err_msg=key)


@pytest.mark.parametrize("sliced", [False, True])
def test_ragged_inputs_must_agree(sliced: bool, backends: dict[str, Backend]) -> None:
    good = ragged_jets([2, 5, 1], seed=8)
    other = ragged_jets([2, 4, 1], seed=8)  # the middle jet has one feature vector too few
    request = pa.RecordBatch.from_arrays(
        [good.column("points"), other.column("features")], ["points", "features"]
    )
    if sliced:
        request = request.slice(1, 2)
    with pytest.raises(InvalidInput, match="same number of items") as info:
        backends["jet_tagger"].execute([request])
    assert info.value.model == "jet_tagger"
    assert info.value.input in ("points", "features")
    assert "jet_tagger" in str(info.value)


def test_ragged_mismatch_in_one_request_of_several(backends: dict[str, Backend]) -> None:
    good = ragged_jets([2, 5, 1], seed=9)
    bad = pa.RecordBatch.from_arrays(
        [good.column("points"), ragged_jets([2, 5, 0], seed=9).column("features")],
        ["points", "features"],
    )
    with pytest.raises(InvalidInput, match="jet_tagger"):
        backends["jet_tagger"].execute([good, bad])


# -- configs beyond the examples: no batching, reshape, GPU, broken models ---------------------


def _write_model(
    repo: pathlib.Path,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    nodes: list[onnx.NodeProto],
    config: str,
) -> ModelVersion:
    (repo / name / "1").mkdir(parents=True)
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(config)
    return Repository(repo).load(name)[0]


def _fp32(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _io(name: str, dims: str, extra: str = "") -> str:
    return f'{{ name: "{name}" data_type: TYPE_FP32 dims: {dims} {extra} }}'


@pytest.fixture
def no_batching(tmp_path: pathlib.Path) -> ModelVersion:
    return _write_model(
        tmp_path,
        "simple_identity",
        [_fp32("INPUT0", [-1])],
        [_fp32("OUTPUT0", [-1])],
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "max_batch_size: 0\n"
        f"input [ {_io('INPUT0', '[ -1 ]')} ]\n"
        f"output [ {_io('OUTPUT0', '[ -1 ]')} ]\n",
    )


def test_model_without_batching(no_batching: ModelVersion) -> None:
    backend = create_backend(no_batching)
    column = pa.array([[1.5, -2.0, 3.25, 0.0, 7.0]], type=pa.list_(pa.float32()))
    request = pa.RecordBatch.from_arrays([column], ["INPUT0"])
    assert request.schema.field("INPUT0").type == no_batching.inputs.field("INPUT0").type

    (result,), _ = backend.execute([request])

    assert result.num_rows == 1
    assert result.schema.equals(no_batching.outputs, check_metadata=True)
    assert pa.types.is_list(result.schema.field("OUTPUT0").type)
    assert result.column("OUTPUT0").to_pylist() == column.to_pylist()


def test_model_without_batching_takes_one_row(no_batching: ModelVersion) -> None:
    backend = create_backend(no_batching)
    two = pa.RecordBatch.from_arrays(
        [pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32()))], ["INPUT0"]
    )
    with pytest.raises(InvalidInput, match="max_batch_size 0") as info:
        backend.execute([two])
    assert info.value.model == "simple_identity"
    with pytest.raises(InvalidInput, match="simple_identity"):
        backend.execute([two.slice(0, 1), two.slice(1, 1)])


def test_batched_variable_dims(tmp_path: pathlib.Path) -> None:
    """A batching model with a variable per-entry dimension: lists of one length per batch."""
    model = _write_model(
        tmp_path,
        "var_identity",
        [_fp32("INPUT0", ["batch", "n"])],
        [_fp32("OUTPUT0", ["batch", "n"])],
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "max_batch_size: 8\n"
        f"input [ {_io('INPUT0', '[ -1 ]')} ]\n"
        f"output [ {_io('OUTPUT0', '[ -1 ]')} ]\n",
    )
    column = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], type=pa.list_(pa.float32()))
    request = pa.RecordBatch.from_arrays([column], ["INPUT0"])

    results, _ = create_backend(model).execute([request, request.slice(1, 1)])

    assert [r.schema.equals(model.outputs, check_metadata=True) for r in results] == [True, True]
    assert results[0].column("OUTPUT0").to_pylist() == column.to_pylist()
    assert results[1].column("OUTPUT0").to_pylist() == column.to_pylist()[1:]


def test_reshape(tmp_path: pathlib.Path) -> None:
    model = _write_model(
        tmp_path,
        "reshaped",
        [_fp32("x", ["batch", 2, 2])],
        [_fp32("y", ["batch", 2, 2])],
        [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1])],
        "max_batch_size: 8\n"
        f"input [ {_io('x', '[ 4 ]', 'reshape { shape: [ 2, 2 ] }')} ]\n"
        f"output [ {_io('y', '[ 4 ]', 'reshape { shape: [ 2, 2 ] }')} ]\n",
    )
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    request = pa.RecordBatch.from_arrays([tensors.from_numpy(values)], ["x"])

    (result,), _ = create_backend(model).execute([request])

    assert result.schema.equals(model.outputs, check_metadata=True)
    assert result.schema.field("y").type == pa.fixed_shape_tensor(pa.float32(), [4])
    expected = values.reshape(3, 2, 2).transpose(0, 2, 1).reshape(3, 4)
    np.testing.assert_array_equal(tensors.to_numpy(result.column("y")), expected)


@pytest.fixture
def gpu_model(tmp_path: pathlib.Path) -> ModelVersion:
    return _write_model(
        tmp_path,
        "on_gpu",
        [_fp32("x", ["batch", 2])],
        [_fp32("y", ["batch", 2])],
        [helper.make_node("Neg", ["x"], ["y"])],
        "max_batch_size: 8\ninstance_group [ { count: 1 kind: KIND_GPU } ]\n",
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA provider is here"
)
@pytest.mark.parametrize("device", [None, "cuda:0"])
def test_gpu_without_cuda(gpu_model: ModelVersion, device: str | None) -> None:
    with pytest.raises(ModelError, match="CUDA") as info:
        create_backend(gpu_model, device=device)
    assert "on_gpu" in str(info.value)


def test_gpu_model_on_cpu_when_asked(gpu_model: ModelVersion) -> None:
    backend = create_backend(gpu_model, device="cpu")
    request = pa.RecordBatch.from_arrays(
        [tensors.from_numpy(np.array([[1.0, -2.0]], dtype=np.float32))], ["x"]
    )
    (result,), _ = backend.execute([request])
    np.testing.assert_array_equal(tensors.to_numpy(result.column("y")), [[-1.0, 2.0]])


@pytest.mark.parametrize(
    "nodes",
    [
        pytest.param([helper.make_node("NoSuchOperator", ["x"], ["y"])], id="unknown-op"),
        pytest.param(
            [helper.make_node("Add", ["x", "ints"], ["y"])], id="type-mismatch"
        ),  # float + int64: the graph parses, onnxruntime refuses it
    ],
)
def test_model_onnxruntime_cannot_load(tmp_path: pathlib.Path, nodes: list[onnx.NodeProto]) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    ints = helper.make_tensor("ints", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(
        nodes, "broken", [_fp32("x", ["batch", 2])], [_fp32("y", ["batch", 2])], [ints]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "broken" / "1" / "model.onnx"
    onnx.save(model, str(path))
    version = Repository(tmp_path).load("broken")[0]  # onnx itself reads it fine

    with pytest.raises(ModelError) as info:
        create_backend(version)
    assert str(path) in str(info.value)
