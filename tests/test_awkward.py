"""``arrowinfer.awkward.infer``: awkward arrays of any nesting in, the same structure out."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from arrowinfer import events, tensors
from arrowinfer.client import Client
from arrowinfer.errors import InvalidInput
from arrowinfer.examples import (
    ALL_MODELS,
    EVENT_JETS_BRANCHES,
    JET_SCORE_BRANCHES,
    write_example_repository,
)
from arrowinfer.server import Server

ak = pytest.importorskip("awkward")
uproot = pytest.importorskip("uproot")

from arrowinfer.awkward import infer

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = write_example_repository(tmp_path_factory.mktemp("models"), models=ALL_MODELS)
    models = ["jet_score", "event_jets", "jet_tagger"]
    with Server(repository, port=0, kserve_port=None, metrics_port=None, models=models) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.location) as c:
        yield c


@pytest.fixture(scope="module")
def jets() -> ak.Array:
    """The sample's jets, events * var * {branch: float32}."""
    data = events.shared_data_dir()
    if data is None or not (data / SAMPLE).exists():
        pytest.fail(f"no {SAMPLE}: set $ARROWINFER_DATA to the directory that holds it")
    with uproot.open(data / SAMPLE) as file:
        return file["Events"].arrays(list(JET_SCORE_BRANCHES), library="ak")


def stack(array: ak.Array, branches: tuple[str, ...]) -> ak.Array:
    """events * var * len(branches) * float32, what a per-jet feature vector is."""
    columns = [ak.values_astype(array[b], np.float32)[..., np.newaxis] for b in branches]
    return ak.concatenate(columns, axis=-1)


def test_one_score_per_jet(client: Client, jets: ak.Array) -> None:
    features = stack(jets, JET_SCORE_BRANCHES)
    out = infer(client, "jet_score", {"jet": features})
    assert str(out.type) == "200 * var * {score: float32}"
    assert ak.all(ak.num(out.score) == ak.num(jets.Jet_pt))  # events.Jet's structure
    assert ak.sum(ak.num(out.score) == 0) > 0  # empty events stay, as empty lists
    direct = client.infer("jet_score", {"jet": ak.to_numpy(ak.flatten(features))})
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(out.score)), tensors.to_numpy(direct.column("score")).ravel()
    )


def test_one_result_per_event_over_its_ragged_jets(client: Client, jets: ak.Array) -> None:
    features = stack(jets, EVENT_JETS_BRANCHES)
    out = infer(client, "event_jets", {"jets": features}, batch_rows=37)  # several requests
    assert str(out.type) == "200 * {probabilities: 2 * float32}"
    counts = ak.to_numpy(ak.num(features))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ragged = tensors.Ragged(offsets, ak.to_numpy(ak.flatten(features)))
    direct = client.infer("event_jets", {"jets": ragged})
    np.testing.assert_allclose(
        ak.to_numpy(out.probabilities),
        tensors.to_numpy(direct.column("probabilities")),
        rtol=1e-6,
        atol=1e-7,
    )


def test_ragged_sub_collections_per_object(client: Client) -> None:
    # events * jets * constituents: jet_tagger takes one jet's constituents per entry
    table = events.synthetic_jet_constituents(6, seed=3)
    per_jet = {n: ak.from_arrow(table.column(n)) for n in ("points", "features")}
    jets_per_event = np.array([2, 0, 3, 0, 1])
    nested = {n: ak.unflatten(a, jets_per_event) for n, a in per_jet.items()}
    out = infer(client, "jet_tagger", nested)
    assert ak.to_list(ak.num(out.probabilities)) == [2, 0, 3, 0, 1]
    assert str(ak.type(out.probabilities)) == "5 * var * 5 * float32"
    direct = client.infer("jet_tagger", table.select(["points", "features"]))
    np.testing.assert_array_equal(
        ak.to_numpy(ak.flatten(out.probabilities)),
        tensors.to_numpy(direct.column("probabilities")),
    )


def test_only_empty_events(client: Client) -> None:
    features = ak.values_astype(ak.unflatten(ak.Array(np.zeros((0, 8))), [0, 0, 0]), np.float32)
    out = infer(client, "jet_score", {"jet": features})
    assert ak.to_list(out.score) == [[], [], []]


def test_wrong_inputs_are_clear_errors(client: Client, jets: ak.Array) -> None:
    features = stack(jets, JET_SCORE_BRANCHES)
    with pytest.raises(InvalidInput, match=r"expected \['jet'\], got \['jets'\]"):
        infer(client, "jet_score", {"jets": features})
    with pytest.raises(InvalidInput, match="wrong shape"):
        infer(client, "jet_score", {"jet": features[..., :5]})
    table = events.synthetic_jet_constituents(6, seed=3)
    tagger = {
        "points": ak.unflatten(ak.from_arrow(table.column("points")), [2, 0, 3, 0, 1]),
        "features": ak.unflatten(ak.from_arrow(table.column("features")), [1, 1, 3, 0, 1]),
    }
    with pytest.raises(InvalidInput, match="different structure"):
        infer(client, "jet_tagger", tagger)
    with pytest.raises(InvalidInput, match="cannot hold entries"):
        infer(client, "event_jets", {"jets": ak.Array(np.zeros((3, 5), np.float32))})
    # options that make a Client mean nothing beside a made one: refused, never dropped
    with pytest.raises(TypeError, match=r"options \['cast'\] make a Client"):
        infer(client, "jet_score", {"jet": features}, cast="same_kind")


def test_dask_awkward_is_lazy_and_equal(server: Server, jets: ak.Array) -> None:
    dak = pytest.importorskip("dask_awkward")
    features = stack(jets, JET_SCORE_BRANCHES)
    eager = infer(server.location, "jet_score", {"jet": features})
    lazy = infer(server.location, "jet_score", {"jet": dak.from_awkward(features, 4)})
    assert isinstance(lazy, dak.Array)
    assert lazy.npartitions == 4
    assert str(lazy.type).endswith("var * {score: float32}")
    assert ak.to_list(lazy.compute(scheduler="sync")) == ak.to_list(eager)
    with pytest.raises(TypeError, match="server URL"), Client(server.location) as c:
        infer(c, "jet_score", {"jet": dak.from_awkward(features, 2)})
