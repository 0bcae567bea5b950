"""Triton's system shared-memory extension over KServe gRPC and HTTP.

Used as CMSSW's SonicTriton and tritonclient's ``simple_*_shm_client`` examples use it:
regions made with ``tritonclient.utils.shared_memory``, registered by name, inputs read
from and outputs written to them. Real servers on loopback, no mocks; the values are
compared with onnxruntime, and the refusals (regions outside their file, offsets outside
a region, a file shrunk after registration, paths and symlinks as keys) with the error
codes Triton gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from _pbparams import set_parameter
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from arrowinfer.errors import InvalidInput, RegionNotFound, Unauthenticated
from arrowinfer.server import Server
from arrowinfer.server._v2memory import Peer, SystemRegions

WAIT = 30.0
ROWS = 5
HITS = np.random.default_rng(5).standard_normal((ROWS, 15), dtype=np.float32)


def energy(server: Server, hits: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(server.core.get("facile").version.path))
    return session.run(["energy"], {"hits": hits})[0]


@pytest.fixture(scope="module")
def server(example_repository: Path) -> Iterator[Server]:
    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=None,
        models=["facile", "identity"],
    ) as running:
        yield running


@pytest.fixture(params=["grpc", "http"])
def client(request: pytest.FixtureRequest, server: Server) -> Iterator[Any]:
    """A tritonclient of either protocol (their shared-memory calls have the same names)."""
    if request.param == "grpc":
        triton: Any = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    else:
        triton = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        yield triton
    finally:
        triton.unregister_system_shared_memory()
        triton.close()


@pytest.fixture
def region() -> Iterator[tuple[str, Any]]:
    """A fresh shared-memory object: its key and tritonclient's handle (removed after)."""
    key = f"/arrowinfer-test-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region("region", key, 4096)
    try:
        yield key, handle
    finally:
        shm.destroy_shared_memory_region(handle)


def module_of(client: Any) -> Any:
    return tg if isinstance(client, tg.InferenceServerClient) else th


def status_names(client: Any) -> list[str]:
    status = client.get_system_shared_memory_status()
    if isinstance(client, tg.InferenceServerClient):
        return sorted(status.regions)
    return sorted(r["name"] for r in status)


def code(err: InferenceServerException) -> str:
    return str(err.status())


def bad_argument(client: Any) -> str:
    return "StatusCode.INVALID_ARGUMENT" if module_of(client) is tg else "400"


def not_found(client: Any) -> str:
    """Triton's code for a region not registered ("Unable to find shared memory region")."""
    return "StatusCode.NOT_FOUND" if module_of(client) is tg else "404"


def test_simple_shm_infer(server: Server, client: Any, region: tuple[str, Any]) -> None:
    """tritonclient's simple shm example: input and output in one region, by offset."""
    key, handle = region
    mod = module_of(client)
    shm.set_shared_memory_region(handle, [HITS])
    client.register_system_shared_memory("data", key, 4096)
    assert status_names(client) == ["data"]
    tensor = mod.InferInput("hits", [ROWS, 15], "FP32")
    tensor.set_shared_memory("data", HITS.nbytes)
    output = mod.InferRequestedOutput("energy")
    output.set_shared_memory("data", ROWS * 4, offset=2048)
    result = client.infer("facile", [tensor], outputs=[output])
    out = result.get_output("energy")
    params = out.parameters if mod is tg else out["parameters"]
    if mod is tg:
        assert params["shared_memory_region"].string_param == "data"
        assert params["shared_memory_byte_size"].int64_param == ROWS * 4
    else:
        assert params["shared_memory_region"] == "data"
        assert params["shared_memory_byte_size"] == ROWS * 4
    got = shm.get_contents_as_numpy(handle, np.float32, [ROWS, 1], offset=2048)
    np.testing.assert_array_equal(got, energy(server, HITS))
    client.unregister_system_shared_memory("data")
    assert status_names(client) == []


def test_mixed_shm_and_sent_inputs(server: Server, region: tuple[str, Any]) -> None:
    """An output in a region beside an input sent in the request (gRPC raw contents)."""
    key, handle = region
    client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    try:
        client.register_system_shared_memory("out", key, 4096)
        tensor = tg.InferInput("hits", [ROWS, 15], "FP32")
        tensor.set_data_from_numpy(HITS)
        output = tg.InferRequestedOutput("energy")
        output.set_shared_memory("out", ROWS * 4)
        client.infer("facile", [tensor], outputs=[output])
        got = shm.get_contents_as_numpy(handle, np.float32, [ROWS, 1])
        np.testing.assert_array_equal(got, energy(server, HITS))
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_regions_are_shared_by_grpc_and_http(server: Server, region: tuple[str, Any]) -> None:
    key, _ = region
    grpc_client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    http_client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        grpc_client.register_system_shared_memory("both", key, 1024, offset=64)
        (entry,) = http_client.get_system_shared_memory_status()
        assert entry == {"name": "both", "key": key, "offset": 64, "byte_size": 1024}
        http_client.unregister_system_shared_memory("both")
        assert status_names(grpc_client) == []
    finally:
        grpc_client.unregister_system_shared_memory()
        grpc_client.close()
        http_client.close()


def test_forwarded_headers_do_not_change_the_peer(server: Server, region: tuple[str, Any]) -> None:
    """The HTTP port is no proxy's backend: who a peer is (for the regions it may use) comes
    from its socket, never from ``X-Forwarded-For``, which any local client can write."""
    key, _ = region
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        client.register_system_shared_memory(
            "forwarded", key, 1024, headers={"X-Forwarded-For": "10.1.2.3"}
        )
        assert status_names(client) == ["forwarded"]
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_register_refusals(client: Any, region: tuple[str, Any], tmp_path: Path) -> None:
    key, _ = region
    link = f"/arrowinfer-link-{uuid.uuid4().hex[:8]}"
    os.symlink(f"/dev/shm{key}", f"/dev/shm{link}")
    try:
        cases = [
            ("whole", key, 4097, 0, "outside"),  # larger than the file
            ("shifted", key, 4000, 100, "outside"),
            ("path", "/../etc/passwd", 16, 0, "plain shm name"),
            ("nested", "/a/b", 16, 0, "plain shm name"),
            ("missing", "/arrowinfer-no-such-region", 16, 0, "no shared-memory region"),
            ("link", link, 16, 0, "cannot open"),  # O_NOFOLLOW
        ]
        for name, where, size, offset, words in cases:
            with pytest.raises(InferenceServerException) as caught:
                client.register_system_shared_memory(name, where, size, offset=offset)
            assert code(caught.value) == bad_argument(client), name
            assert words in caught.value.message(), name
        client.register_system_shared_memory("once", key, 16)
        with pytest.raises(InferenceServerException) as caught:
            client.register_system_shared_memory("once", key, 16)
        assert "already registered" in caught.value.message()
        assert status_names(client) == ["once"]
    finally:
        os.unlink(f"/dev/shm{link}")


def test_out_of_range_places_are_refused(
    server: Server, client: Any, region: tuple[str, Any]
) -> None:
    key, handle = region
    mod = module_of(client)
    shm.set_shared_memory_region(handle, [HITS])
    client.register_system_shared_memory("small", key, 512)
    before = server.core.statistics("facile")[0]["inference_count"]

    def attempt(offset: int, size: int, out_offset: int = 0, out_size: int = ROWS * 4) -> str:
        tensor = mod.InferInput("hits", [ROWS, 15], "FP32")
        tensor.set_shared_memory("small", size, offset=offset)
        output = mod.InferRequestedOutput("energy")
        output.set_shared_memory("small", out_size, offset=out_offset)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("facile", [tensor], outputs=[output])
        assert code(caught.value) == bad_argument(client)
        return caught.value.message()

    assert "outside region" in attempt(300, HITS.nbytes)  # 300 + 300 > 512
    assert "does not match the shape" in attempt(0, HITS.nbytes - 4)
    # a requested output is named as one, not as an input
    assert "output 'energy': system shared memory: offset and size lie outside" in attempt(
        0, HITS.nbytes, out_offset=500
    )
    assert "output 'energy': the output does not fit" in attempt(
        0, HITS.nbytes, out_offset=400, out_size=4
    )
    tensor = mod.InferInput("hits", [ROWS, 15], "FP32")
    tensor.set_shared_memory("unknown", HITS.nbytes)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("facile", [tensor])
    assert code(caught.value) == not_found(client)
    assert "model 'facile', input 'hits': system shared memory: no region 'unknown'" in (
        caught.value.message()
    )
    # the output that did not fit ran the model; nothing else did
    assert server.core.statistics("facile")[0]["inference_count"] == before + ROWS


@pytest.mark.parametrize(
    ("place", "words"),
    [
        ({"shared_memory_offset": 1.5}, ["'shared_memory_offset'", "integer", "got a float"]),
        ({"shared_memory_offset": -4}, ["'shared_memory_offset'", "integer from 0"]),
        ({"shared_memory_byte_size": "300"}, ["'shared_memory_byte_size'", "got a string"]),
        ({"shared_memory_byte_size": True}, ["'shared_memory_byte_size'", "got true/false"]),
        ({"shared_memory_region": 7}, ["region's name"]),
    ],
    ids=["float-offset", "negative-offset", "string-size", "bool-size", "number-region"],
)
def test_places_of_the_wrong_kind_are_refused(
    server: Server, region: tuple[str, Any], place: dict[str, Any], words: list[str]
) -> None:
    """An offset or size must be an integer >= 0 and a region a name, as Triton reads them
    (a float is not read as 0); over HTTP's JSON and gRPC's protobuf parameters alike."""
    key, handle = region
    shm.set_shared_memory_region(handle, [HITS])
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        client.register_system_shared_memory("kinds", key, 4096)
        params = {"shared_memory_region": "kinds", "shared_memory_byte_size": HITS.nbytes, **place}
        tensor = {"name": "hits", "shape": [ROWS, 15], "datatype": "FP32", "parameters": params}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.http_port}/v2/models/facile/infer",
            data=json.dumps({"inputs": [tensor]}).encode(),
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=WAIT)
        assert caught.value.code == 400
        message = json.loads(caught.value.read())["error"]
        for word in [*words, "'facile'", "'hits'"]:
            assert word in message

        grpc_request = pb.ModelInferRequest(model_name="facile")
        grpc_tensor = grpc_request.inputs.add(name="hits", datatype="FP32", shape=[ROWS, 15])
        for name, value in params.items():
            set_parameter(grpc_tensor.parameters[name], value)
        with grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(grpc_request, timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == message
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_shared_memory_and_typed_contents_together_are_refused(
    server: Server, region: tuple[str, Any]
) -> None:
    """gRPC can name a region and send typed contents too: which is the data? Refused
    (HTTP's parser refuses 'data' beside 'shared_memory_region' the same way)."""
    key, _ = region
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        client.register_system_shared_memory("both", key, 4096)
        request = pb.ModelInferRequest(model_name="facile")
        tensor = request.inputs.add(name="hits", datatype="FP32", shape=[ROWS, 15])
        set_parameter(tensor.parameters["shared_memory_region"], "both")
        set_parameter(tensor.parameters["shared_memory_byte_size"], HITS.nbytes)
        tensor.contents.fp32_contents.extend(HITS.ravel().tolist())
        with grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=WAIT)
    finally:
        client.unregister_system_shared_memory()
        client.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    for words in ("in shared memory or in the request, not both", "'facile'", "'hits'"):
        assert words in details


def test_a_shrunk_region_is_an_error_not_a_crash(
    server: Server, client: Any, region: tuple[str, Any]
) -> None:
    key, _ = region
    mod = module_of(client)
    client.register_system_shared_memory("shrinks", key, 4096)
    os.truncate(f"/dev/shm{key}", 100)  # the client shrinks its file after registering
    tensor = mod.InferInput("hits", [ROWS, 15], "FP32")
    tensor.set_shared_memory("shrinks", HITS.nbytes)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("facile", [tensor])
    assert "smaller than when registered" in caught.value.message()
    sent = mod.InferInput("hits", [ROWS, 15], "FP32")
    sent.set_data_from_numpy(HITS)
    output = mod.InferRequestedOutput("energy")
    output.set_shared_memory("shrinks", ROWS * 4, offset=1000)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("facile", [sent], outputs=[output])
    assert "smaller than when registered" in caught.value.message()
    assert os.path.getsize(f"/dev/shm{key}") == 100  # the server did not grow it back
    assert client.is_server_live()


def test_cuda_shared_memory_is_unsupported(client: Any) -> None:
    """Registering is refused; as on a Triton built without GPUs there are then no CUDA
    regions, so status is empty and unregistering succeeds: tritonclient's shm examples
    unregister both kinds before they start."""
    with pytest.raises(InferenceServerException) as caught:
        client.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 16)  # base64
    expected = "StatusCode.UNIMPLEMENTED" if module_of(client) is tg else "501"
    assert code(caught.value) == expected
    assert "CUDA shared memory is not supported" in caught.value.message()
    status = client.get_cuda_shared_memory_status()
    assert (list(status.regions) if module_of(client) is tg else status) == []
    with pytest.raises(InferenceServerException) as caught:
        client.get_cuda_shared_memory_status("gpu")
    assert code(caught.value) == not_found(client)
    assert "no region 'gpu' is registered" in caught.value.message()
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("gpu")


def test_without_shared_memory_the_calls_are_unimplemented(example_repository: Path) -> None:
    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=None,
        models=["facile"],
        shared_memory=False,
    ) as server:
        grpc_client = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
        http_client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            for triton, expected in (
                (grpc_client, "StatusCode.UNIMPLEMENTED"),
                (http_client, "501"),
            ):
                with pytest.raises(InferenceServerException) as caught:
                    triton.register_system_shared_memory("r", "/r", 16)
                assert code(caught.value) == expected
        finally:
            grpc_client.close()
            http_client.close()


def test_files_of_another_user_are_refused(client: Any, region: tuple[str, Any]) -> None:
    """Only files of the client's own user (the loopback peer's uid) can be registered."""
    key, _ = region
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(f"/dev/shm{key}", 54321, 54321)
    with pytest.raises(InferenceServerException) as caught:
        client.register_system_shared_memory("theirs", key, 16)
    assert code(caught.value) == bad_argument(client)
    assert "client's own user" in caught.value.message()


def test_remote_peers_need_allow_client_shm(region: tuple[str, Any]) -> None:
    key, _ = region
    remote = Peer("ipv4:192.0.2.7:40000")  # a documentation address: never this host
    with pytest.raises(InvalidInput, match="--allow-client-shm"):
        SystemRegions().register(remote, "r", key, 0, 16)
    admitted = SystemRegions(allow_remote=True)
    try:
        admitted.register(remote, "r", key, 0, 16)  # a file of the server's own user
        assert admitted.status(remote) == [{"name": "r", "key": key, "offset": 0, "byte_size": 16}]
        local = Peer("ipv4:127.0.0.1:1")
        with pytest.raises(Unauthenticated):  # a local peer whose user is unknown
            admitted.status(local)
    finally:
        admitted.close()


REMOTE = Peer("ipv4:192.0.2.7:40000")  # a documentation address: never this host


def open_fds(key: str) -> int:
    """How many of this process's descriptors are open on the shared-memory object `key`
    (only those: other tests' servers and threads open and close files meanwhile)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed since it was listed
            count += os.readlink(fd) == f"/dev/shm{key}"
    return count


@pytest.mark.parametrize("use", ["read", "write"])
def test_an_unregister_during_a_read_or_write_closes_the_file_after_it(
    region: tuple[str, Any], monkeypatch: pytest.MonkeyPatch, use: str
) -> None:
    """A region unregistered while a request reads or writes it keeps its file open until
    that request is done (Triton defers it too): a descriptor closed under the request
    could be another file's by the time it is used, and the request would read or write
    another client's data."""
    from arrowinfer.server import _v2memory

    key, handle = region
    shm.set_shared_memory_region(handle, [np.arange(16, dtype=np.uint8)])
    regions = SystemRegions(allow_remote=True)
    regions.register(REMOTE, "r", key, 0, 16)
    before = open_fds(key)
    call = getattr(os, "p" + use)
    seen: list[int] = []

    def unregistered_meanwhile(fd: int, *args: Any) -> Any:
        regions.unregister(REMOTE, "r")
        os.fstat(fd)  # still open: EBADF (or another file) otherwise
        seen.append(fd)
        return call(fd, *args)

    monkeypatch.setattr(_v2memory.os, "p" + use, unregistered_meanwhile)
    if use == "read":
        assert regions.read(REMOTE, "r", 4, 4) == bytes([4, 5, 6, 7])
    else:
        regions.write(REMOTE, "r", 4, b"\xff" * 4)
        assert shm.get_contents_as_numpy(handle, np.uint8, [16])[4:8].tolist() == [255] * 4
    monkeypatch.undo()
    assert len(seen) == 1
    assert open_fds(key) == before - 1  # closed once the request was done
    assert regions.status(REMOTE) == []
    with pytest.raises(RegionNotFound, match="no region 'r'"):
        regions.read(REMOTE, "r", 0, 4)
    regions.close()


def test_each_user_has_its_own_region_names(
    server: Server, region: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name one user registered is free for another, and invisible to it: no user can
    take a name another's client will ask for, or learn which names it uses."""
    key, _ = region
    regions = server.regions
    assert regions is not None
    monkeypatch.setattr(regions, "allow_remote", True)  # two owners: this user, remote peers
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        regions.register(REMOTE, "input_data", key, 0, 16)
        client.register_system_shared_memory("input_data", key, 32)
        assert [r["byte_size"] for r in client.get_system_shared_memory_status()] == [32]
        assert [r["byte_size"] for r in regions.status(REMOTE)] == [16]
        client.unregister_system_shared_memory("input_data")
        assert [r["byte_size"] for r in regions.status(REMOTE)] == [16]
    finally:
        client.unregister_system_shared_memory()
        client.close()
        regions.unregister(REMOTE)


def test_an_output_into_an_unknown_region_is_not_found(client: Any) -> None:
    """NOT_FOUND as for an input, naming the model and the output; nothing runs."""
    mod = module_of(client)
    tensor = mod.InferInput("hits", [ROWS, 15], "FP32")
    tensor.set_data_from_numpy(HITS)
    output = mod.InferRequestedOutput("energy")
    output.set_shared_memory("nowhere", ROWS * 4)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("facile", [tensor], outputs=[output])
    assert code(caught.value) == not_found(client)
    assert "model 'facile', output 'energy': system shared memory: no region 'nowhere'" in (
        caught.value.message()
    )


def test_unregistering_a_name_not_registered_is_no_error(client: Any) -> None:
    """As Triton: clean-up code may unregister what it never registered; asking for its
    status is NOT_FOUND."""
    client.unregister_system_shared_memory("never-registered")
    assert status_names(client) == []
    with pytest.raises(InferenceServerException) as caught:
        client.get_system_shared_memory_status("never-registered")
    assert code(caught.value) == not_found(client)
    assert "no region 'never-registered' is registered" in caught.value.message()


def test_registrations_are_bounded(
    region: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each region holds an open file: a user may hold MAX_REGIONS_PER_USER, the server
    half its open-file limit, so that registering cannot use up the server's files."""
    from arrowinfer.server import _v2memory

    key, _ = region
    monkeypatch.setattr(_v2memory, "MAX_REGIONS_PER_USER", 3)
    regions = SystemRegions(allow_remote=True)
    before = open_fds(key)
    try:
        for i in range(3):
            regions.register(REMOTE, f"r{i}", key, 0, 16)
        with pytest.raises(InvalidInput, match="too many regions") as caught:
            regions.register(REMOTE, "r3", key, 0, 16)
        assert "at most 3 per user" in str(caught.value)
        assert open_fds(key) == before + 3  # the refused one opened nothing
        regions.unregister(REMOTE, "r0")
        regions.register(REMOTE, "r3", key, 0, 16)
        regions.limit = 3  # all users together
        monkeypatch.setattr(_v2memory, "MAX_REGIONS_PER_USER", 100)
        with pytest.raises(InvalidInput, match="too many regions"):
            regions.register(REMOTE, "r4", key, 0, 16)
    finally:
        regions.close()
    assert open_fds(key) == before
    assert _v2memory.max_regions() >= 64


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_shared_memory_input_is_bounded_before_it_is_read(
    example_repository: Path, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    """A region can be far larger than any request (a sparse file costs its client
    nothing): its inputs' sizes count against max_request_bytes before a byte is read."""
    key = f"/arrowinfer-test-{uuid.uuid4().hex[:12]}"
    size = 64 * 1024
    handle = shm.create_shared_memory_region("big", key, size)
    monkeypatch.setattr(
        SystemRegions, "read", lambda *a: pytest.fail("a request over the limit was read")
    )
    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        http_port=0,
        metrics_port=None,
        models=["identity"],
        max_request_bytes=size // 2,
    ) as server:
        mod: Any = tg if protocol == "grpc" else th
        port = server.kserve_port if protocol == "grpc" else server.http_port
        client = mod.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            client.register_system_shared_memory("big", key, size)
            tensor = mod.InferInput("INPUT0", [16, 1024], "FP32")
            tensor.set_shared_memory("big", size)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("identity", [tensor])
            assert code(caught.value) == bad_argument(client)
            message = caught.value.message()
            assert "too large (max_request_bytes)" in message
            assert "model 'identity'" in message
            assert f"{size} bytes in shared memory" in message
        finally:
            client.unregister_system_shared_memory()
            client.close()
            shm.destroy_shared_memory_region(handle)


@pytest.mark.slow
def test_a_client_racing_unregister_against_its_requests_harms_no_other(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack behind the region fix, with a well-behaved client beside it: one client
    unregisters and registers its region while its own requests use it, over and over;
    another registers a region, infers through it and unregisters, each time (so that the
    server opens files meanwhile, whose descriptors a too-early close would hand over).
    The good client's every answer is right, and nothing of the racer's lands in it."""
    from arrowinfer.server import _v2memory

    def slowly(call: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            time.sleep(0.002)  # widens the race: a few seconds then hit the old code
            return call(*args)

        return wrapped

    for name in ("pread", "pwrite"):
        monkeypatch.setattr(_v2memory.os, name, slowly(getattr(os, name)))
    rows = 4
    size = rows * 1024 * 4
    url = f"127.0.0.1:{server.kserve_port}"
    keys = {who: f"/arrowinfer-test-{who}-{uuid.uuid4().hex[:8]}" for who in ("good", "racer")}
    handles = {
        who: shm.create_shared_memory_region(who, key, 2 * size) for who, key in keys.items()
    }
    shm.set_shared_memory_region(handles["racer"], [np.full((rows, 1024), 7.0, np.float32)])
    stop = threading.Event()
    raced = {"infer": 0, "register": 0}
    wrong: list[str] = []

    def racer_infers() -> None:
        client = tg.InferenceServerClient(url)
        tensor = tg.InferInput("INPUT0", [rows, 1024], "FP32")
        tensor.set_shared_memory("racer", size)
        output = tg.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("racer", size, offset=size)
        sevens = np.full((rows, 1024), 7.0, np.float32)
        while not stop.is_set():
            shm.set_shared_memory_region(handles["racer"], [sevens * np.nan], offset=size)
            try:
                client.infer("identity", [tensor], outputs=[output])
            except InferenceServerException as err:  # its region may be gone: NOT_FOUND
                if err.status() != "StatusCode.NOT_FOUND":
                    wrong.append(f"{err.status()}: {err.message()}")
            else:  # it ran: on its own region, whatever happened to the name meanwhile
                got = shm.get_contents_as_numpy(handles["racer"], np.float32, [2 * rows, 1024])
                if not np.array_equal(got[rows:], sevens):
                    wrong.append("the racer's answer is not in its region")
            raced["infer"] += 1
        client.close()

    def racer_registers() -> None:
        client = tg.InferenceServerClient(url)
        while not stop.is_set():
            with contextlib.suppress(InferenceServerException):
                client.register_system_shared_memory("racer", keys["racer"], 2 * size)
            client.unregister_system_shared_memory("racer")
            raced["register"] += 1
        client.close()

    racers = [threading.Thread(target=f) for f in (racer_infers, racer_registers)]
    good = tg.InferenceServerClient(url)
    rng = np.random.default_rng(11)
    done = 0
    try:
        for thread in racers:
            thread.start()
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            data = rng.standard_normal((rows, 1024), dtype=np.float32)
            shm.set_shared_memory_region(handles["good"], [data])
            shm.set_shared_memory_region(
                handles["good"], [np.full((rows, 1024), np.nan, np.float32)], offset=size
            )
            good.register_system_shared_memory(f"good{done}", keys["good"], 2 * size)
            tensor = tg.InferInput("INPUT0", [rows, 1024], "FP32")
            tensor.set_shared_memory(f"good{done}", size)
            output = tg.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory(f"good{done}", size, offset=size)
            good.infer("identity", [tensor], outputs=[output])
            got = shm.get_contents_as_numpy(handles["good"], np.float32, [2 * rows, 1024])
            np.testing.assert_array_equal(got.view(np.uint32)[:rows], data.view(np.uint32))
            np.testing.assert_array_equal(got.view(np.uint32)[rows:], data.view(np.uint32))
            good.unregister_system_shared_memory(f"good{done}")
            done += 1
    finally:
        stop.set()
        for thread in racers:
            thread.join(WAIT)
        good.unregister_system_shared_memory()
        good.close()
        for handle in handles.values():
            shm.destroy_shared_memory_region(handle)
    assert not any(thread.is_alive() for thread in racers)
    assert min(done, raced["infer"], raced["register"]) > 10, (done, raced)
    assert not wrong, wrong[:3]
