"""``arrowinfer.dask``: a model over Dask partitions, on a real two-process Dask cluster.

The servers run in this process (real Flight servers on loopback ports); the Dask workers
are separate processes that talk to them over TCP, one client per worker process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pd = pytest.importorskip("pandas", reason="arrowinfer.dask needs pandas (pip install '.[dask]')")
dd = pytest.importorskip("dask.dataframe", reason="needs dask[dataframe] (pip install '.[dask]')")
distributed = pytest.importorskip(
    "distributed", reason="needs dask.distributed (pip install '.[dask]')"
)

from arrowinfer import events, tensors
from arrowinfer.client import Client
from arrowinfer.dask import close_clients, infer_partitions
from arrowinfer.examples import JET_SCORE_BRANCHES, write_example_repository
from arrowinfer.server import Server

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def servers(example_repository: Path) -> Iterator[list[Server]]:
    options = {"port": 0, "kserve_port": None, "metrics_port": None}
    with (
        Server(example_repository, models=["jet_tagger", "facile"], **options) as one,
        Server(example_repository, models=["jet_tagger", "facile"], **options) as two,
    ):
        yield [one, two]


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.Client]:
    with (
        distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as local,
        distributed.Client(local) as client,
    ):
        yield client
    close_clients()  # the driver's own clients (schemas, metadata)


@pytest.fixture(scope="module")
def jets() -> pa.RecordBatch:
    return events.synthetic_jet_constituents(240, seed=3)


def reference(servers: list[Server], model: str, batch: pa.RecordBatch) -> np.ndarray:
    with Client(servers[0].location) as client:
        return tensors.to_numpy(client.infer(model, batch).column(0))


def inference_count(servers: list[Server], model: str) -> int:
    return sum(s.core.statistics(model)[0]["inference_count"] for s in servers)


def test_dataframe_partitions_match_one_process(
    servers: list[Server], cluster: distributed.Client, jets: pa.RecordBatch
) -> None:
    frame = pa.Table.from_batches([jets]).to_pandas(types_mapper=pd.ArrowDtype)
    frame.index = pd.RangeIndex(1000, 1000 + len(frame))
    collection = dd.from_pandas(frame, npartitions=6)
    before = inference_count(servers, "jet_tagger")

    out = infer_partitions(
        collection, "jet_tagger", servers=[s.location for s in servers], batch_rows=16
    )
    assert out.npartitions == collection.npartitions
    assert list(out.columns) == ["probabilities"]
    result = out.compute()

    assert isinstance(result["probabilities"].dtype, pd.ArrowDtype)
    assert result.index.equals(frame.index)  # aligned with the input partitions
    got = pa.chunked_array(result["probabilities"].array.__arrow_array__()).combine_chunks()
    assert isinstance(got.type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(tensors.to_numpy(got), reference(servers, "jet_tagger", jets))
    # every row went to the servers (and the reference run once more)
    assert inference_count(servers, "jet_tagger") - before == 2 * len(frame)


def test_columns_map_inputs_and_a_dead_server_is_skipped(
    servers: list[Server], cluster: distributed.Client, example_repository: Path
) -> None:
    values = np.random.default_rng(0).standard_normal((500, 15), dtype=np.float32)
    hits = pa.record_batch({"h": tensors.from_numpy(values)})
    frame = pa.Table.from_batches([hits]).to_pandas(types_mapper=pd.ArrowDtype)
    with Server(example_repository, port=0, kserve_port=None, metrics_port=None) as gone:
        dead = gone.location
    out = infer_partitions(
        dd.from_pandas(frame, npartitions=4),
        "facile",
        servers=[dead, servers[1].location],
        columns={"hits": "h"},
        retries=2,
        attempt_timeout=10,
    ).compute()
    want = reference(servers, "facile", pa.record_batch({"hits": hits.column(0)}))
    np.testing.assert_array_equal(out["energy"].to_numpy(dtype=np.float32), want)


def test_local_fallback_without_servers(
    cluster: distributed.Client, example_repository: Path, servers: list[Server]
) -> None:
    values = np.random.default_rng(1).standard_normal((64, 15), dtype=np.float32)
    frame = pd.DataFrame(
        {"hits": pd.Series(list(values), dtype=pd.ArrowDtype(pa.list_(pa.float32(), 15)))}
    )
    out = infer_partitions(
        dd.from_pandas(frame, npartitions=2),
        "facile",
        servers=[],
        fallback="local",
        repository=example_repository,
    ).compute()
    want = reference(servers, "facile", pa.record_batch({"hits": tensors.from_numpy(values)}))
    np.testing.assert_array_equal(out["energy"].to_numpy(dtype=np.float32), want)


def test_missing_columns_are_named_before_any_task(
    servers: list[Server], jets: pa.RecordBatch
) -> None:
    frame = pa.Table.from_batches([jets]).to_pandas(types_mapper=pd.ArrowDtype)
    collection = dd.from_pandas(frame[["points"]], npartitions=1)
    with pytest.raises(ValueError, match=r"needs columns \['features'\]"):
        infer_partitions(collection, "jet_tagger", servers=servers[0].location)
    with pytest.raises(ValueError, match="lacks"):
        infer_partitions(
            collection, "jet_tagger", servers=servers[0].location, columns={"nope": "points"}
        )


def test_dask_awkward_partitions(
    servers: list[Server], cluster: distributed.Client, jets: pa.RecordBatch
) -> None:
    ak = pytest.importorskip("awkward")
    dak = pytest.importorskip("dask_awkward", reason="needs dask-awkward")
    array = dak.from_awkward(ak.from_arrow(jets), npartitions=3)
    out = infer_partitions(array, "jet_tagger", servers=[s.location for s in servers])
    assert out.fields == ["probabilities"]
    result = out.compute()
    assert str(result.type) == f"{len(jets)} * {{probabilities: 5 * float32}}"
    np.testing.assert_array_equal(
        ak.to_numpy(result.probabilities), reference(servers, "jet_tagger", jets)
    )


def test_example_builds_jet_score_inputs_from_nanoaod(tmp_path: Path) -> None:
    data = events.shared_data_dir()
    sample = data / "nanoAOD_2015_CMS_Open_Data_ttbar.root" if data else None
    if sample is None or not sample.exists():
        pytest.skip("the shared NanoAOD sample is not here ($ARROWINFER_DATA)")
    pytest.importorskip("uproot")
    spec = importlib.util.spec_from_file_location(
        "dask_nanoaod", Path(__file__).parent.parent / "clients" / "dask_nanoaod.py"
    )
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    jets = example.jets_table(sample, entry_stop=50)
    nanoaod = events.read_nanoaod(sample, branches=JET_SCORE_BRANCHES, entry_stop=50)
    assert jets.num_rows == sum(
        nanoaod.column("Jet_pt").combine_chunks().value_lengths().to_pylist()
    )
    features = tensors.to_numpy(jets.column("features").combine_chunks())
    for i, branch in enumerate(JET_SCORE_BRANCHES):  # the real branches, one row per jet
        np.testing.assert_array_equal(
            features[:, i], nanoaod.column(branch).combine_chunks().flatten().to_numpy()
        )
    repository = write_example_repository(tmp_path, models=["jet_score"])
    with Client("local", fallback="local", repository=repository) as client:
        scores = client.infer("jet_score", {"jet": features})
    assert scores.num_rows == jets.num_rows
