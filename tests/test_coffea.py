"""``arrowinfer.coffea.InferenceWrapper`` inside coffea processors over the CMS NanoAOD sample."""

from __future__ import annotations

import pickle
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arrowinfer import events, tensors
from arrowinfer.client import Client
from arrowinfer.examples import ALL_MODELS, JET_SCORE_BRANCHES, write_example_repository
from arrowinfer.server import Server

ak = pytest.importorskip("awkward")
coffea_processor = pytest.importorskip("coffea.processor")
nanoevents = pytest.importorskip("coffea.nanoevents")
cloudpickle = pytest.importorskip("cloudpickle")

from arrowinfer.coffea import InferenceWrapper

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
FIELDS = [b.removeprefix("Jet_") for b in JET_SCORE_BRANCHES]  # pt, eta, ... as in events.Jet

# The processor pool's workers import nothing from tests/: send this module's classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class JetScore(InferenceWrapper):
    """jet_score on NanoEvents jets: one score per jet."""

    def prepare_awkward(self, jets: Any) -> dict[str, Any]:
        columns = [ak.values_astype(jets[f], np.float32)[..., np.newaxis] for f in FIELDS]
        return {"jet": ak.concatenate(columns, axis=-1)}


class Processor(coffea_processor.ProcessorABC):  # type: ignore[misc]
    def __init__(self, wrapper: JetScore):
        self.wrapper = wrapper

    def process(self, events: Any) -> dict[str, list[Any]]:
        scores = self.wrapper(events.Jet).score
        return {"rows": list(zip(ak.to_list(events.event), ak.to_list(scores), strict=True))}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


@pytest.fixture(scope="module")
def sample() -> Path:
    data = events.shared_data_dir()
    if data is None or not (data / SAMPLE).exists():
        pytest.fail(f"no {SAMPLE}: set $ARROWINFER_DATA to the directory that holds it")
    return data / SAMPLE


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"), models=ALL_MODELS)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    with Server(repository, port=0, kserve_port=None, metrics_port=None, models=["jet_score"]) as s:
        yield s


@pytest.fixture(scope="module")
def expected(server: Server, sample: Path) -> dict[int, list[float]]:
    """Scores per event number, through the client by hand."""
    table = events.read_nanoaod(sample, branches=("event", *JET_SCORE_BRANCHES))
    columns = [table.column(b).combine_chunks() for b in JET_SCORE_BRANCHES]
    values = np.stack([c.flatten().to_numpy().astype(np.float32) for c in columns], axis=1)
    with Client(server.location) as client:
        scores = tensors.to_numpy(client.infer("jet_score", {"jet": values}).column("score"))
    counts = columns[0].value_lengths().to_numpy()
    per_event = np.split(scores.ravel(), np.cumsum(counts)[:-1])
    return {
        int(e): list(s) for e, s in zip(table.column("event").to_numpy(), per_event, strict=True)
    }


def nanoevents_of(sample: Path, mode: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 2015 file lacks some cross-refs
        factory = nanoevents.NanoEventsFactory.from_root(
            {str(sample): "Events"}, mode=mode, schemaclass=nanoevents.NanoAODSchema
        )
        return factory.events()


def check(rows: list[tuple[int, list[float]]], expected: dict[int, list[float]]) -> None:
    got = dict(rows)
    assert sorted(got) == sorted(expected)
    assert sum(1 for s in got.values() if not s) > 0  # events without jets are there, empty
    for event, scores in expected.items():
        np.testing.assert_allclose(got[event], scores, rtol=1e-6, err_msg=str(event))


def test_processor_on_nanoevents(
    server: Server, sample: Path, expected: dict[int, list[float]]
) -> None:
    wrapper = JetScore("jet_score", server.location)
    out = Processor(wrapper).process(nanoevents_of(sample, "virtual"))
    check(out["rows"], expected)


def test_runner_pickles_the_wrapper_to_worker_processes(
    server: Server, sample: Path, expected: dict[int, list[float]]
) -> None:
    wrapper = JetScore("jet_score", server.location)
    wrapper(nanoevents_of(sample, "virtual").Jet[:3])  # used here first: it still pickles
    assert pickle.loads(pickle.dumps(wrapper)).client_options == wrapper.client_options
    runner = coffea_processor.Runner(
        executor=coffea_processor.FuturesExecutor(workers=2, status=False),
        schema=nanoevents.NanoAODSchema,
        chunksize=70,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = runner({"ttbar": [str(sample)]}, Processor(wrapper), treename="Events")
    check(out["rows"], expected)


def test_dask_nanoevents_are_lazy(
    server: Server, sample: Path, expected: dict[int, list[float]]
) -> None:
    lazy = nanoevents_of(sample, "dask")
    scores = JetScore("jet_score", server.location)(lazy.Jet).score
    assert type(scores).__module__.startswith("dask_awkward")
    event, score = ak.to_list(lazy.event.compute()), ak.to_list(scores.compute())
    check(list(zip(event, score, strict=True)), expected)


def test_local_fallback_when_the_server_is_gone(
    repository: Path, sample: Path, expected: dict[int, list[float]]
) -> None:
    with socket.socket() as refused:  # bound, not listening
        refused.bind(("127.0.0.1", 0))
        url = f"grpc://127.0.0.1:{refused.getsockname()[1]}"
        wrapper = JetScore("jet_score", [url], fallback="local", repository=repository)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = Processor(wrapper).process(nanoevents_of(sample, "virtual"))
    check(out["rows"], expected)
    with pytest.raises(ValueError, match="needs repository"):
        JetScore("jet_score", url, fallback="local")
    with pytest.raises(NotImplementedError, match="override it"):
        InferenceWrapper("jet_score", url)(1, 2)
