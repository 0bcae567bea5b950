"""Per-event collections sent to per-object models: flattened, inferred, regrouped per event.

``facile`` takes one HCAL hit per row and ``jet_tagger`` one jet per row; a physicist holds
hits and jets per event. ``Client.infer`` takes the per-event lists as they are and answers
with per-event lists of results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest

from arrowinfer import tensors
from arrowinfer.client import AsyncClient, Client
from arrowinfer.client._convert import per_object, regroup
from arrowinfer.errors import InvalidInput
from arrowinfer.server import Server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.location) as c:
        yield c


@pytest.fixture(scope="module")
def facile(example_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(example_repository / "facile" / "1" / "model.onnx"))


def per_event_hits(counts: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = np.random.default_rng(seed).standard_normal((offsets[-1], 15), dtype=np.float32)
    return offsets, values


def test_facile_on_hits_per_event(client: Client, facile: ort.InferenceSession) -> None:
    counts = [3, 0, 5, 1, 0]
    offsets, values = per_event_hits(counts)
    result = client.infer("facile", {"hits": tensors.Ragged(offsets, values)})
    assert result.num_rows == len(counts)
    energy = result.column("energy")
    assert pa.types.is_list(energy.type)
    np.testing.assert_array_equal(energy.value_lengths().to_numpy(), counts)
    expected = facile.run(["energy"], {"hits": values})[0].reshape(-1)
    got = np.asarray(tensors.to_numpy(energy.flatten())).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_slice_of_events_sends_only_its_hits(client: Client) -> None:
    offsets, values = per_event_hits([2, 4, 1, 3], seed=1)
    batch = pa.RecordBatch.from_arrays(
        [tensors.ragged_from_numpy(offsets, values)], names=["hits"]
    ).slice(1, 2)
    result = client.infer("facile", batch)
    np.testing.assert_array_equal(result.column("energy").value_lengths().to_numpy(), [4, 1])
    alone = client.infer("facile", {"hits": values[2:7]})
    np.testing.assert_array_equal(
        tensors.to_numpy(result.column("energy").flatten()),
        tensors.to_numpy(alone.column("energy")),
    )


def test_jets_per_event_to_the_per_jet_tagger(client: Client) -> None:
    rng = np.random.default_rng(2)
    jets_per_event = [2, 0, 3]
    constituents = rng.integers(1, 30, size=sum(jets_per_event)).astype(np.int32)
    inner = np.concatenate([[0], np.cumsum(constituents)]).astype(np.int32)
    total = int(inner[-1])
    outer = pa.array(np.concatenate([[0], np.cumsum(jets_per_event)]).astype(np.int32))

    def per_event(width: int) -> pa.Array:
        jets = tensors.ragged_from_numpy(inner, rng.standard_normal((total, width), np.float32))
        return pa.ListArray.from_arrays(outer, jets)

    points, features = per_event(2), per_event(7)
    result = client.infer("jet_tagger", {"points": points, "features": features})
    probabilities = result.column("probabilities")
    np.testing.assert_array_equal(probabilities.value_lengths().to_numpy(), jets_per_event)
    flat = client.infer("jet_tagger", {"points": points.flatten(), "features": features.flatten()})
    np.testing.assert_array_equal(
        tensors.to_numpy(probabilities.flatten()),
        tensors.to_numpy(flat.column("probabilities")),
    )


def test_collections_of_different_lengths_are_refused(server: Server) -> None:
    offsets = pa.array([0, 1, 3], pa.int32())
    points = pa.ListArray.from_arrays(offsets, pa.array([[[0.0, 0.0]]] * 3))
    other = pa.ListArray.from_arrays(pa.array([0, 2, 3], pa.int32()), pa.array([[[0.0] * 7]] * 3))
    schema = Client(server.location).schema("jet_tagger")
    batch = pa.RecordBatch.from_arrays([points, other], names=["points", "features"])
    with pytest.raises(InvalidInput, match="different lengths"):
        per_object(batch, schema, model="jet_tagger")


def test_stream_and_async_regroup_too(server: Server, client: Client) -> None:
    requests = [per_event_hits([n, 0, 2], seed=n) for n in (1, 4, 0)]
    streamed = list(client.stream("facile", ({"hits": tensors.Ragged(*r)} for r in requests)))
    one_by_one = [client.infer("facile", {"hits": tensors.Ragged(*r)}) for r in requests]
    for got, want in zip(streamed, one_by_one, strict=True):
        assert got.column("energy").equals(want.column("energy"))

    async def run() -> list[pa.RecordBatch]:
        async with AsyncClient(server.location) as aclient:
            return list(
                await asyncio.gather(
                    *(aclient.infer("facile", {"hits": tensors.Ragged(*r)}) for r in requests)
                )
            )

    for got, want in zip(asyncio.run(run()), one_by_one, strict=True):
        assert got.column("energy").equals(want.column("energy"))


def test_regroup_is_a_view_of_the_results() -> None:
    result = pa.RecordBatch.from_arrays([pa.array(np.arange(5, dtype=np.float32))], ["y"])
    grouped = regroup(result, np.array([0, 2, 2, 5]))
    assert grouped.column("y").to_pylist() == [[0.0, 1.0], [], [2.0, 3.0, 4.0]]
    values = np.asarray(grouped.column("y").values.to_numpy(zero_copy_only=True))
    assert np.shares_memory(values, result.column("y").to_numpy(zero_copy_only=True))
    assert regroup(result, None) is result


def test_events_without_any_hits(client: Client) -> None:
    empty = tensors.Ragged(np.zeros(4, np.int32), np.zeros((0, 15), np.float32))
    result = client.infer("facile", {"hits": empty})
    assert result.column("energy").to_pylist() == [[], [], []]
