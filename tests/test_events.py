"""Tests of arrowinfer.events: schemas, their files, synthetic generators, ROOT readers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrowinfer.events as ev

REPOSITORY = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPOSITORY / "schemas"
NANOAOD_FILE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
HZZ_FILE = "uproot-HZZ.root"

# (generator, multiplicity column or None, expected mean multiplicity)
GENERATORS: dict[str, tuple[Callable[..., pa.RecordBatch], str | None, float]] = {
    "nanoaod_jets": (ev.synthetic_jets, "Jet_pt", 5.0),
    "hcal_hits": (ev.synthetic_hcal_hits, "hits", 2000.0),
    "jet_constituents": (ev.synthetic_jet_constituents, "features", 40.0),
    "jet_images": (ev.synthetic_jet_images, None, 0.0),
}


def _list_columns(batch: pa.RecordBatch) -> list[pa.ListArray]:
    return [c for c in batch.columns if pa.types.is_list(c.type)]


def _flat_values(column: pa.ListArray) -> np.ndarray:
    values = column.flatten()
    while pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=True)


def _data_file(name: str) -> Path:
    directory = ev.shared_data_dir()
    if directory is None:
        pytest.skip(
            "../shared/data not found: set ARROWINFER_DATA to the directory with "
            f"{NANOAOD_FILE} and {HZZ_FILE}"
        )
    path = directory / name
    if not path.is_file():
        pytest.skip(f"../shared/data has no {name}: {directory}")
    return path


def _check_batch(name: str, batch: pa.RecordBatch, n: int) -> None:
    """What every synthetic batch must satisfy, whatever its size and seed."""
    assert batch.schema.equals(ev.SCHEMAS[name], check_metadata=True)
    assert batch.num_rows == n
    batch.validate(full=True)
    for column in batch.columns:
        assert column.null_count == 0
    for column in _list_columns(batch):
        offsets = column.offsets.to_numpy()
        assert offsets[0] == 0
        assert np.all(np.diff(offsets) >= 0)
        assert np.isfinite(_flat_values(column)).all()
    if name == "jet_images" and n:
        assert np.isfinite(batch.column("image").to_numpy_ndarray()).all()


# --------------------------------------------------------------------------------------------
# Schemas and their files
# --------------------------------------------------------------------------------------------


def test_schema_files_match_code() -> None:
    files = sorted(SCHEMA_DIR.glob("*.schema.arrow"))
    assert sorted(p.name.removesuffix(".schema.arrow") for p in files) == sorted(ev.SCHEMAS)
    for path in files:
        with pa.OSFile(str(path)) as source:
            stored = pa.ipc.read_schema(source)
        expected = ev.SCHEMAS[path.name.removesuffix(".schema.arrow")]
        assert stored.equals(expected, check_metadata=True), (
            f"{path} is stale: run `python -m arrowinfer.events write-schemas schemas/`"
        )


def test_write_schemas_round_trip(tmp_path: Path) -> None:
    written = ev.write_schemas(tmp_path / "new")
    assert [p.name for p in written] == [f"{name}.schema.arrow" for name in ev.SCHEMAS]
    for path, schema in zip(written, ev.SCHEMAS.values(), strict=True):
        stored = pa.ipc.read_schema(pa.py_buffer(path.read_bytes()))
        assert stored.equals(schema, check_metadata=True)


def test_main_writes_schemas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ev.main(["write-schemas", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(ev.SCHEMAS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}.schema.arrow" for name in ev.SCHEMAS
    )


def test_schema_types() -> None:
    hits = ev.HCAL_HITS.field("hits").type
    assert hits.value_type.list_size == len(ev.HCAL_HIT_FEATURES) == 15
    features = ev.JET_CONSTITUENTS.field("features").type
    assert features.value_type.list_size == len(ev.CONSTITUENT_FEATURES) == 7
    assert ev.JET_CONSTITUENTS.field("points").type.value_type.list_size == 2
    image = ev.JET_IMAGES.field("image").type
    assert image == pa.fixed_shape_tensor(pa.float32(), [1, 37, 37])
    assert tuple(image.shape) == ev.JET_IMAGE_SHAPE
    for name, schema in ev.SCHEMAS.items():
        assert schema.metadata[b"name"] == name.encode()
        assert all(not f.nullable for f in schema)


# --------------------------------------------------------------------------------------------
# Synthetic events
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ev.SCHEMAS))
@settings(deadline=None, max_examples=15)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**32 - 1))
def test_synthetic_batches(name: str, n: int, seed: int) -> None:
    generator = GENERATORS[name][0]
    kwargs = {"mean_hits": 200} if name == "hcal_hits" else {}
    _check_batch(name, generator(n, seed=seed, **kwargs), n)


@pytest.mark.parametrize("name", list(ev.SCHEMAS))
def test_synthetic_zero_rows(name: str) -> None:
    _check_batch(name, ev.synthetic(name, 0), 0)


@pytest.mark.parametrize("name", list(ev.SCHEMAS))
def test_synthetic_is_seeded(name: str) -> None:
    n = 50
    first = ev.synthetic(name, n, seed=7)
    assert first.equals(ev.synthetic(name, n, seed=7), check_metadata=True)
    assert not first.equals(ev.synthetic(name, n, seed=8))
    assert ev.synthetic(name, n).equals(GENERATORS[name][0](n, seed=0))


@pytest.mark.parametrize("name", [k for k, v in GENERATORS.items() if v[1] is not None])
def test_synthetic_multiplicity(name: str) -> None:
    _, column, mean = GENERATORS[name]
    assert column is not None
    n = 200 if name == "hcal_hits" else 2000
    counts = np.diff(ev.synthetic(name, n, seed=3).column(column).offsets.to_numpy())
    assert 0.9 * mean < counts.mean() < 1.1 * mean
    assert counts.max() > counts.min()


def test_synthetic_jets_values() -> None:
    batch = ev.synthetic_jets(2000, seed=1)
    n_jets = np.diff(batch.column("Jet_pt").offsets.to_numpy())
    for name in ("Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btagDeepB"):
        assert np.array_equal(np.diff(batch.column(name).offsets.to_numpy()), n_jets)
    assert np.array_equal(batch.column("nJet").to_numpy(), n_jets)
    assert np.array_equal(batch.column("event").to_numpy(), np.arange(1, 2001))
    pt = _flat_values(batch.column("Jet_pt"))
    assert pt.min() >= 20.0
    eta = _flat_values(batch.column("Jet_eta"))
    assert np.abs(eta).max() < 2.5
    phi = _flat_values(batch.column("Jet_phi"))
    assert phi.min() >= -np.pi
    assert phi.max() <= np.float32(np.pi)
    btag = _flat_values(batch.column("Jet_btagDeepB"))
    assert btag.min() >= 0.0
    assert btag.max() <= 1.0
    assert (_flat_values(batch.column("Jet_mass")) < pt).all()
    # pt descends within each event: a rise is only allowed where a new event starts
    rises = np.flatnonzero(np.diff(pt) > 0) + 1
    starts = batch.column("Jet_pt").offsets.to_numpy()
    assert np.isin(rises, starts).all()


def test_synthetic_hcal_hits_values() -> None:
    batch = ev.synthetic_hcal_hits(5, seed=2, mean_hits=500)
    hits = _flat_values(batch.column("hits")).reshape(-1, 15)
    columns = dict(zip(ev.HCAL_HIT_FEATURES, hits.T, strict=True))
    charges = hits[:, :8]
    assert charges.min() >= 0.0
    # on average the pulse peaks in time sample 3, the bunch crossing of the event
    assert charges.mean(axis=0).argmax() == 3
    ieta = columns["ieta"]
    assert np.all((np.abs(ieta) >= 1) & (np.abs(ieta) <= 29))
    assert np.all((columns["iphi"] >= 1) & (columns["iphi"] <= 72))
    assert np.all((columns["depth"] >= 1) & (columns["depth"] <= 7))
    assert np.array_equal(ieta, np.round(ieta))


def test_synthetic_jet_constituents_values() -> None:
    batch = ev.synthetic_jet_constituents(300, seed=4)
    points, features = batch.column("points"), batch.column("features")
    assert np.array_equal(points.offsets.to_numpy(), features.offsets.to_numpy())
    p = _flat_values(points).reshape(-1, 2)
    f = _flat_values(features).reshape(-1, 7)
    assert np.array_equal(p, f[:, :2])
    assert np.allclose(np.hypot(p[:, 0], p[:, 1]), f[:, 6], rtol=1e-5)
    assert f[:, 6].max() < 0.8
    # pt and energy fractions are at most 1, so their logs at most 0
    assert f[:, 4].max() <= 1e-5
    assert f[:, 5].max() <= 1e-5


def test_synthetic_jet_constituents_allows_empty_jets() -> None:
    batch = ev.synthetic_jet_constituents(200, seed=0, mean_constituents=1)
    counts = np.diff(batch.column("features").offsets.to_numpy())
    assert (counts == 0).any()
    _check_batch("jet_constituents", batch, 200)


def test_synthetic_jet_images_values() -> None:
    images = ev.synthetic_jet_images(20, seed=5).column("image").to_numpy_ndarray()
    assert images.shape == (20, 1, 37, 37)
    assert images.dtype == np.float32
    assert images.min() >= 0.0
    totals = images.sum(axis=(1, 2, 3))
    assert np.all((totals > 300.0) & (totals < 700.0))
    centre = images[:, 0, 18, 18]
    assert np.all(centre > images[:, 0, 0, 0])


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown event schema 'jets'.*nanoaod_jets"):
        ev.synthetic("jets", 3)
    with pytest.raises(ValueError, match="n_events must be >= 0"):
        ev.synthetic_jets(-1)
    with pytest.raises(TypeError):
        ev.synthetic_jets(2.5)  # type: ignore[arg-type]


def test_user_check_from_issue() -> None:
    code = "import arrowinfer.events as e; print(e.synthetic_jets(1000).schema)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "Jet_pt: list<item: float not null> not null" in result.stdout
    assert "nJet: uint32 not null" in result.stdout


# --------------------------------------------------------------------------------------------
# ROOT files
# --------------------------------------------------------------------------------------------


def test_shared_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROWINFER_DATA", str(tmp_path))
    assert ev.shared_data_dir() == tmp_path
    monkeypatch.setenv("ARROWINFER_DATA", str(tmp_path / "missing"))
    assert ev.shared_data_dir() is None


def test_read_nanoaod() -> None:
    table = ev.read_nanoaod(_data_file(NANOAOD_FILE))
    assert table.num_rows == 200
    assert table.schema.equals(ev.NANOAOD_JETS, check_metadata=True)
    n_jet = table.column("nJet").to_numpy()
    for name in ("Jet_pt", "Jet_eta", "Jet_phi", "Jet_mass", "Jet_btagDeepB"):
        column = table.column(name).combine_chunks()
        assert np.array_equal(np.diff(column.offsets.to_numpy()), n_jet)
    assert table.column("event").to_numpy().min() > 0


def test_read_nanoaod_subset_and_extra_branch() -> None:
    table = ev.read_nanoaod(
        _data_file(NANOAOD_FILE), branches=("Jet_jetId", "Jet_pt"), entry_stop=10
    )
    assert table.num_rows == 10
    assert table.column_names == ["Jet_jetId", "Jet_pt"]
    assert table.schema.field("Jet_pt").equals(ev.NANOAOD_JETS.field("Jet_pt"), check_metadata=True)
    assert table.schema.field("Jet_jetId").type == pa.list_(
        pa.field("item", pa.int32(), nullable=False)
    )
    assert table.schema.metadata is None


def test_read_nanoaod_missing_branch() -> None:
    with pytest.raises(KeyError, match="Jet_ptt"):
        ev.read_nanoaod(_data_file(NANOAOD_FILE), branches=("Jet_ptt",))


def test_read_events_hzz() -> None:
    path = _data_file(HZZ_FILE)
    table = ev.read_events(path, "events")
    assert table.num_rows == 2421
    assert table.schema.metadata is None
    assert table.schema.field("Jet_Px").type == pa.list_(
        pa.field("item", pa.float32(), nullable=False)
    )
    for field in table.schema:
        assert not isinstance(field.type, pa.ExtensionType)
    subset = ev.read_events(path, "events", filter_name=["NMuon", "Muon_P*"], entry_stop=100)
    assert subset.column_names == ["NMuon", "Muon_Px", "Muon_Py", "Muon_Pz"]
    assert subset.num_rows == 100
    n_muon = subset.column("NMuon").to_numpy()
    offsets = subset.column("Muon_Px").combine_chunks().offsets.to_numpy()
    assert np.array_equal(np.diff(offsets), n_muon)


@pytest.mark.parametrize("module", ["uproot", "awkward"])
def test_readers_name_the_extra(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'arrowinfer\[awkward\]'"):
        ev.read_events("no-such-file.root", "Events")
    with pytest.raises(ModuleNotFoundError, match=module):
        ev.read_nanoaod("no-such-file.root")
