"""Tests of the example model repository (`arrowinfer.examples`)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2

from arrowinfer import examples

MODELS = examples.ALL_MODELS
N_PARTICLES = 100


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return examples.write_example_repository(
        tmp_path_factory.mktemp("repo") / "models", models=MODELS
    )


@pytest.fixture(scope="module")
def sessions(repo: pathlib.Path) -> dict[str, ort.InferenceSession]:
    # Load what was written to disk, not what build_model returns: the files are what a
    # server sees.
    return {name: _session((repo / name / "1" / "model.onnx").read_bytes()) for name in MODELS}


def _random_inputs(
    config: model_config_pb2.ModelConfig, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs as the model sees them (ragged-batch inputs concatenated, with offsets)."""
    feed = {
        t.name: rng.normal(size=(batch, *t.dims)).astype(np.float32)
        for t in config.input
        if not t.allow_ragged_batch
    }
    counts = rng.integers(0, 30, size=batch)  # events with 0 to 29 values, some empty
    for t in config.input:
        if t.allow_ragged_batch:
            feed[t.name] = rng.normal(size=int(counts.sum())).astype(np.float32)
    for b in config.batch_input:
        kind = model_config_pb2.BatchInput.Kind.Name(b.kind)
        assert kind == "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO"
        feed[b.target_name[0]] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    if "mask" in feed:
        feed["mask"] = (rng.random(feed["mask"].shape) < 0.7).astype(np.float32)
    return feed


# --------------------------------------------------------------------------------------
# Repository layout and configs
# --------------------------------------------------------------------------------------


def test_repository_has_every_file(repo: pathlib.Path) -> None:
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    for name in MODELS:
        files = sorted(str(p.relative_to(repo / name)) for p in (repo / name).rglob("*"))
        # Exactly the Triton layout plus the card: no temporary files left behind.
        assert files == ["1", "1/model.onnx", "README.md", "config.pbtxt"]
        for rel in ("1/model.onnx", "README.md", "config.pbtxt"):
            path = repo / name / rel
            assert path.stat().st_size > 0
            # Readable by a server running as another user.
            assert path.stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize("name", MODELS)
def test_config_matches_onnx_graph(repo: pathlib.Path, name: str) -> None:
    text = (repo / name / "config.pbtxt").read_text()
    assert text == examples.config_text(name)
    config = _parse_config(text)
    model = onnx.load(repo / name / "1" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)

    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert config.dynamic_batching.max_queue_delay_microseconds >= 0
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]

    made = {b.target_name[0] for b in config.batch_input}  # graph inputs the server makes
    for b in config.batch_input:
        (value,) = [v for v in model.graph.input if v.name == b.target_name[0]]
        assert b.data_type == model_config_pb2.TYPE_INT32
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert len(value.type.tensor_type.shape.dim) == 1
    graph_inputs = [v for v in model.graph.input if v.name not in made]
    for tensors, values in ((config.input, graph_inputs), (config.output, model.graph.output)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for t, v in zip(tensors, values, strict=True):
            if tensors is config.input and t.allow_ragged_batch:  # concatenated, 1-D
                assert list(t.dims) == [-1]
                assert len(v.type.tensor_type.shape.dim) == 1
                continue
            assert t.data_type == model_config_pb2.TYPE_FP32
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            batch, *dims = v.type.tensor_type.shape.dim
            assert batch.dim_param == "batch"
            assert list(t.dims) == [d.dim_value for d in dims]
            assert all(d.HasField("dim_value") for d in dims)


# Expected settings, written out independently of the module's own table.
_SETTINGS = {
    "facile": (16384, 0, [], {}),
    "jet_tagger": (
        1024,
        500,
        [64, 256],
        {
            "arrowinfer.ragged_inputs": "points,features",
            "arrowinfer.mask_input": "mask",
            "arrowinfer.pad_value": "0",
        },
    ),
    "toptag_cnn": (256, 1000, [], {"intra_op_thread_count": "2"}),
    "identity": (16384, 0, [], {}),
    "track_sum": (4096, 100, [], {}),
    "jet_score": (65536, 100, [], {}),
    "event_jets": (
        4096,
        200,
        [],
        {
            "arrowinfer.ragged_inputs": "jets",
            "arrowinfer.mask_input": "mask",
            "arrowinfer.pad_value": "0",
        },
    ),
}
_SIGNATURES = {
    "facile": ({"hits": [15]}, {"energy": [1]}),
    "jet_tagger": (
        {"points": [100, 2], "features": [100, 7], "mask": [100, 1]},
        {"probabilities": [5]},
    ),
    "toptag_cnn": ({"image": [1, 37, 37]}, {"probabilities": [2]}),
    "identity": ({"INPUT0": [1024]}, {"OUTPUT0": [1024]}),
    "track_sum": ({"pt": [-1]}, {"score": [1], "n_tracks": [1]}),
    "jet_score": ({"jet": [8]}, {"score": [1]}),
    "event_jets": ({"jets": [16, 5], "mask": [16, 1]}, {"probabilities": [2]}),
}


@pytest.mark.parametrize("name", MODELS)
def test_config_settings(name: str) -> None:
    config = _parse_config(examples.config_text(name))
    max_batch, delay, preferred, parameters = _SETTINGS[name]
    assert config.max_batch_size == max_batch
    assert config.dynamic_batching.max_queue_delay_microseconds == delay
    assert list(config.dynamic_batching.preferred_batch_size) == preferred
    assert {k: v.string_value for k, v in config.parameters.items()} == parameters
    inputs, outputs = _SIGNATURES[name]
    assert {t.name: list(t.dims) for t in config.input} == inputs
    assert {t.name: list(t.dims) for t in config.output} == outputs


def test_onnx_versions() -> None:
    for name in MODELS:
        model = examples.build_model(name)
        assert model.ir_version == examples.IR_VERSION <= 9
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
        props = {p.key: p.value for p in model.metadata_props}
        assert props["arrowinfer.example"] == name
        assert "random" in props["weights"]
        # Every weight is float32 (the configs declare FP32 throughout); the only other
        # initializer type allowed is the int64 axes of ReduceSum.
        for init in model.graph.initializer:
            assert init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)


# --------------------------------------------------------------------------------------
# Running the models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", MODELS)
def test_models_run(
    repo: pathlib.Path, sessions: dict[str, ort.InferenceSession], name: str, batch: int
) -> None:
    config = _parse_config((repo / name / "config.pbtxt").read_text())
    feed = _random_inputs(config, batch, np.random.default_rng(batch))
    names = [t.name for t in config.output]
    results = dict(zip(names, sessions[name].run(names, feed), strict=True))
    for t in config.output:
        out = results[t.name]
        assert out.dtype == np.float32
        assert out.shape == (batch, *t.dims)
        assert np.isfinite(out).all()
    if "probabilities" in results:
        probabilities = results["probabilities"]
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=0, atol=1e-5)
        assert (probabilities > 0).all()
    if name == "identity":
        np.testing.assert_array_equal(results["OUTPUT0"], feed["INPUT0"])
    if name == "track_sum":  # each event's count, from the offsets alone
        np.testing.assert_array_equal(results["n_tracks"][:, 0], np.diff(feed["offsets"]))


@pytest.mark.parametrize("name", ["facile", "jet_tagger", "toptag_cnn"])
def test_outputs_vary_and_are_not_saturated(
    sessions: dict[str, ort.InferenceSession], name: str
) -> None:
    # Random weights must still give a usable function: outputs that depend on the
    # input and a softmax that is not pinned to 0 or 1.
    config = _parse_config(examples.config_text(name))
    feed = _random_inputs(config, 64, np.random.default_rng(1))
    (out,) = sessions[name].run(None, feed)
    assert out.std(axis=0).min() > 1e-3
    if config.output[0].name == "probabilities":
        assert out.min() > 1e-4
        assert out.max() < 1 - 1e-4


def test_identity_is_bit_exact(sessions: dict[str, ort.InferenceSession]) -> None:
    bits = np.random.default_rng(2).integers(0, 2**32, size=(3, 1024), dtype=np.uint32)
    bits[0, :4] = [0x7FC00001, 0xFF800000, 0x80000000, 0x00000001]  # NaN payload, -inf, -0, tiny
    x = bits.view(np.float32)
    (y,) = sessions["identity"].run(None, {"INPUT0": x})
    np.testing.assert_array_equal(y.view(np.uint32), bits)


# --------------------------------------------------------------------------------------
# jet_tagger's padding contract
# --------------------------------------------------------------------------------------


def _jet(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One jet with n real particles and zeros in the padded slots."""
    points = np.zeros((1, N_PARTICLES, 2), np.float32)
    features = np.zeros((1, N_PARTICLES, 7), np.float32)
    mask = np.zeros((1, N_PARTICLES, 1), np.float32)
    points[0, :n] = rng.normal(0, 0.4, size=(n, 2))
    features[0, :n] = rng.normal(size=(n, 7))
    mask[0, :n] = 1
    return {"points": points, "features": features, "mask": mask}


_garbage = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(deadline=None, max_examples=60)
@given(
    n=st.integers(1, N_PARTICLES),
    seed=st.integers(0, 2**32 - 1),
    garbage_points=hnp.arrays(np.float32, (N_PARTICLES, 2), elements=_garbage),
    garbage_features=hnp.arrays(np.float32, (N_PARTICLES, 7), elements=_garbage),
)
def test_jet_tagger_padding_invariance(
    sessions: dict[str, ort.InferenceSession],
    n: int,
    seed: int,
    garbage_points: np.ndarray,
    garbage_features: np.ndarray,
) -> None:
    session = sessions["jet_tagger"]
    clean = _jet(n, np.random.default_rng(seed))
    dirty = {k: v.copy() for k, v in clean.items()}
    dirty["points"][0, n:] = garbage_points[n:]
    dirty["features"][0, n:] = garbage_features[n:]
    (expected,) = session.run(None, clean)
    (got,) = session.run(None, dirty)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_jet_tagger_sees_real_particles(sessions: dict[str, ort.InferenceSession]) -> None:
    # The converse of padding invariance, so that invariance is not a constant output:
    # changing one real particle, or unmasking a padded one, changes the output.
    session = sessions["jet_tagger"]
    jet = _jet(5, np.random.default_rng(3))
    (base,) = session.run(None, jet)
    changed = {k: v.copy() for k, v in jet.items()}
    changed["features"][0, 0] += 3
    assert np.abs(session.run(None, changed)[0] - base).max() > 1e-4
    unmasked = {k: v.copy() for k, v in jet.items()}
    unmasked["features"][0, 5] = 3
    unmasked["mask"][0, 5] = 1
    assert np.abs(session.run(None, unmasked)[0] - base).max() > 1e-4


def test_jet_tagger_empty_jet_is_finite(sessions: dict[str, ort.InferenceSession]) -> None:
    (out,) = sessions["jet_tagger"].run(None, _jet(0, np.random.default_rng(4)))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-5)


@settings(deadline=None, max_examples=15)
@given(counts=st.lists(st.integers(0, N_PARTICLES), min_size=1, max_size=8))
def test_jet_tagger_batch_entries_are_independent(
    sessions: dict[str, ort.InferenceSession], counts: list[int]
) -> None:
    # Dynamic batching stacks jets from different requests: each row must come out as
    # if it had been sent alone.
    session = sessions["jet_tagger"]
    jets = [_jet(n, np.random.default_rng(i)) for i, n in enumerate(counts)]
    batch = {k: np.concatenate([j[k] for j in jets]) for k in jets[0]}
    (together,) = session.run(None, batch)
    alone = np.concatenate([session.run(None, j)[0] for j in jets])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Determinism, cards, writing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_builds_are_deterministic(repo: pathlib.Path, name: str) -> None:
    first = examples.build_model(name).SerializeToString()
    assert examples.build_model(name).SerializeToString() == first
    assert (repo / name / "1" / "model.onnx").read_bytes() == first


def test_models_differ() -> None:
    weights = [
        examples.build_model(name).graph.initializer[0].raw_data
        for name in ("facile", "jet_tagger", "toptag_cnn")
    ]
    assert len(set(weights)) == len(weights)


@pytest.mark.parametrize("name", MODELS)
def test_model_card(repo: pathlib.Path, name: str) -> None:
    card = (repo / name / "README.md").read_text()
    assert card == examples.model_card(name)
    assert "the weights are random" in card.lower()
    assert "meaningless physics-wise" in card
    config = _parse_config(examples.config_text(name))
    for t in [*config.input, *config.output]:
        assert f"| `{t.name}` | FP32 | `[batch, {', '.join(map(str, t.dims))}]` |" in card
    assert "## References" in card


def test_write_is_idempotent_and_completes(tmp_path: pathlib.Path) -> None:
    root = examples.write_example_repository(tmp_path, models=["identity", "facile"])
    assert root == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facile", "identity"]

    config = tmp_path / "facile" / "config.pbtxt"
    edited = config.read_text() + "# local edit\n"
    config.write_text(edited)
    examples.write_example_repository(tmp_path, models=["facile"])
    assert config.read_text() == edited  # a complete model is left alone

    (tmp_path / "facile" / "1" / "model.onnx").unlink()
    examples.write_example_repository(tmp_path, models=["facile"])
    model_bytes = (tmp_path / "facile" / "1" / "model.onnx").read_bytes()
    assert model_bytes == examples.build_model("facile").SerializeToString()
    assert config.read_text() == examples.config_text("facile")  # incomplete: rewritten

    config.write_text(edited)
    examples.write_example_repository(tmp_path, models=["facile"], overwrite=True)
    assert config.read_text() == examples.config_text("facile")

    (tmp_path / "identity" / "README.md").write_bytes(b"")  # empty counts as missing
    examples.write_example_repository(tmp_path, models=["identity"])
    assert (tmp_path / "identity" / "README.md").read_text() == examples.model_card("identity")
    assert not list(tmp_path.rglob(".*"))


def test_bad_arguments_fail_before_writing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"unknown example model 'resnet50'.*jet_tagger"):
        examples.write_example_repository(tmp_path, models=["facile", "resnet50"])
    with pytest.raises(TypeError, match=r"models=\['facile'\]"):
        examples.write_example_repository(tmp_path, models="facile")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown example model"):
        examples.build_model("nope")
    with pytest.raises(ValueError, match="unknown example model"):
        examples.config_text("nope")


def test_config_text_is_protobuf_text_format() -> None:
    # Printed from a ModelConfig by protobuf itself: parsing and printing again gives the
    # same text, comment lines aside.
    for name in MODELS:
        text = examples.config_text(name)
        body = "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))
        assert text_format.MessageToString(_parse_config(text)) == body


def _nanoaod_jets(branches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets per event and the values [n_jets, len(branches)] of the CMS open-data sample."""
    uproot = pytest.importorskip("uproot")
    from arrowinfer.events import shared_data_dir

    data = shared_data_dir()
    sample = None if data is None else data / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
    if sample is None or not sample.exists():
        pytest.skip("no CMS open-data sample in ../shared/data")
    with uproot.open(sample) as file:
        arrays = file["Events"].arrays(list(branches), library="np")
    counts = np.array([len(a) for a in arrays[branches[0]]])
    values = np.stack([np.concatenate(arrays[b]).astype(np.float32) for b in branches], axis=1)
    return np.concatenate([[0], np.cumsum(counts)]), values


def test_jet_score_on_real_jets(sessions: dict[str, ort.InferenceSession]) -> None:
    _, jets = _nanoaod_jets(examples.JET_SCORE_BRANCHES)
    (score,) = sessions["jet_score"].run(["score"], {"jet": jets})
    assert score.shape == (len(jets), 1)
    assert ((score > 0) & (score < 1)).all()
    assert score.std() > 0.01  # the standardisation keeps it away from saturation


def test_event_jets_on_real_events(sessions: dict[str, ort.InferenceSession]) -> None:
    offsets, jets = _nanoaod_jets(examples.EVENT_JETS_BRANCHES)
    n = len(offsets) - 1
    padded = np.full((n + 1, 16, 5), 1e30, dtype=np.float32)  # garbage in padded slots
    mask = np.zeros((n + 1, 16, 1), dtype=np.float32)  # the last event has no jets
    for i in range(n):
        k = min(16, offsets[i + 1] - offsets[i])
        padded[i, :k] = jets[offsets[i] : offsets[i] + k]
        mask[i, :k] = 1
    (probabilities,) = sessions["event_jets"].run(["probabilities"], {"jets": padded, "mask": mask})
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    clean = np.where(mask > 0, padded, 0).astype(np.float32)
    (again,) = sessions["event_jets"].run(["probabilities"], {"jets": clean, "mask": mask})
    np.testing.assert_array_equal(again, probabilities)  # padding cannot change it


def test_does_not_import_onnxruntime() -> None:
    # Only arrowinfer.backends may import onnxruntime (DESIGN.md).
    root = pathlib.Path(examples.__file__).resolve().parent.parent
    code = "import sys, arrowinfer.examples; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
