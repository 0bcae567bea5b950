"""Security: TLS, bearer tokens, request limits and names that never become paths.

Real servers on ephemeral loopback ports with a self-signed certificate made here (by the
``openssl`` command), Flight through :class:`Client` and KServe through tritonclient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from pyarrow import flight
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from arrowinfer import tensors
from arrowinfer.client import Client, FlightTransport, LocalTransport, conform, to_record_batch
from arrowinfer.errors import (
    InvalidInput,
    ModelError,
    ModelNotFound,
    ServerUnavailable,
    TransportError,
    Unauthenticated,
    from_flight,
)
from arrowinfer.examples import write_example_repository
from arrowinfer.repository import Repository
from arrowinfer.server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import arrowinfer_server

WAIT = 30.0  # the longest any one answer may take: bounds every test
TOKEN = "s3cret-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}
HITS = np.random.default_rng(11).standard_normal((7, 15), dtype=np.float32)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (PEM files)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def secure(example_repository: Path, certificate: tuple[Path, Path]) -> Iterator[Server]:
    """A server with TLS on Flight and KServe, and a bearer token required."""
    cert, key = certificate
    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        metrics_port=None,
        models=["facile", "identity"],
        tls_cert=cert,
        tls_key=key,
        auth_tokens={TOKEN, "another-token"},
    ) as running:
        yield running


@pytest.fixture
def root_certs(certificate: tuple[Path, Path]) -> bytes:
    return certificate[0].read_bytes()


def energy(example_repository: Path, values: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(example_repository / "facile" / "1" / "model.onnx"))
    return session.run(["energy"], {"hits": values})[0]


def inference_count(server: Server, model: str) -> int:
    (stats,) = server.core.statistics(model)
    return int(stats["inference_count"])


def kserve(server: Server, certificate: tuple[Path, Path]) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(
        f"127.0.0.1:{server.kserve_port}", ssl=True, root_certificates=str(certificate[0])
    )


def kserve_inputs(values: np.ndarray) -> list[tg.InferInput]:
    tensor = tg.InferInput("hits", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return [tensor]


# -- TLS -----------------------------------------------------------------------------------


def test_tls_location_and_flight_infer(
    secure: Server, root_certs: bytes, example_repository: Path
) -> None:
    assert secure.location.startswith("grpc+tls://127.0.0.1:")
    with Client(secure.location, tls_root_certs=root_certs, token=TOKEN, timeout=WAIT) as client:
        result = client.infer("facile", {"hits": HITS})
        assert client.models().keys() == {"facile", "identity"}
    np.testing.assert_array_equal(
        tensors.to_numpy(result.column("energy")), energy(example_repository, HITS)[:, 0]
    )


def test_tls_by_host_name(secure: Server, root_certs: bytes) -> None:
    url = secure.location.replace("127.0.0.1", "localhost")
    with Client(url, tls_root_certs=root_certs, token=TOKEN, timeout=WAIT) as client:
        assert client.infer("facile", {"hits": HITS}).num_rows == len(HITS)


def test_kserve_tls_infer(
    secure: Server, certificate: tuple[Path, Path], example_repository: Path
) -> None:
    client = kserve(secure, certificate)
    try:
        assert client.is_server_live(headers=AUTH, client_timeout=WAIT)
        result = client.infer("facile", kserve_inputs(HITS), headers=AUTH, client_timeout=WAIT)
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("energy"), energy(example_repository, HITS))


def test_plaintext_client_to_tls_server_is_a_transport_error(secure: Server) -> None:
    plain = secure.location.replace("grpc+tls://", "grpc://")
    start = time.monotonic()
    with (
        Client(plain, token=TOKEN, retries=0, timeout=WAIT) as client,
        pytest.raises(TransportError),
    ):
        client.infer("facile", {"hits": HITS})
    with (
        Client([plain], token=TOKEN, retries=1, timeout=WAIT) as client,
        pytest.raises(ServerUnavailable, match=plain),
    ):
        client.infer("facile", {"hits": HITS})
    triton = tg.InferenceServerClient(f"127.0.0.1:{secure.kserve_port}")
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            triton.infer("facile", kserve_inputs(HITS), headers=AUTH, client_timeout=WAIT)
    finally:
        triton.close()
    assert time.monotonic() - start < WAIT


def test_tls_client_without_the_certificate_is_refused(secure: Server) -> None:
    with (
        Client(secure.location, token=TOKEN, retries=0, timeout=WAIT) as client,
        pytest.raises(TransportError),
    ):
        client.infer("facile", {"hits": HITS})


def test_tls_needs_both_files(example_repository: Path, certificate: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        Server(example_repository, port=0, kserve_port=None, tls_cert=certificate[0])


# -- bearer tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", "Bearer", TOKEN[:-1]])
def test_flight_refuses_a_missing_or_wrong_token(
    secure: Server, root_certs: bytes, token: str | None
) -> None:
    before = inference_count(secure, "facile")
    with Client(secure.location, tls_root_certs=root_certs, token=token, timeout=WAIT) as client:
        with pytest.raises(Unauthenticated, match="bearer token"):
            client.infer("facile", {"hits": HITS})
        with pytest.raises(Unauthenticated):
            client.models()
        assert client.counters.get("retries", 0) == 0
    # straight to do_exchange, without the schema lookup the client does first
    transport = FlightTransport(secure.location, tls_root_certs=root_certs, token=token)
    try:
        with Client(secure.location, tls_root_certs=root_certs, token=TOKEN, timeout=WAIT) as good:
            schema = good.schema("facile")
        batch = conform(to_record_batch({"hits": HITS}), schema, model="facile")
        try:
            future = transport.submit("facile", None, batch)
        except Unauthenticated:
            pass
        else:
            with pytest.raises(Unauthenticated):
                future.result(WAIT)
        with pytest.raises(Unauthenticated):
            transport.action("model.load", {"model": "facile"})
    finally:
        transport.close()
    assert inference_count(secure, "facile") == before  # no model ran


def test_flight_accepts_every_listed_token(secure: Server, root_certs: bytes) -> None:
    for token in (TOKEN, "another-token"):
        with Client(
            secure.location, tls_root_certs=root_certs, token=token, timeout=WAIT
        ) as client:
            assert client.infer("facile", {"hits": HITS}).num_rows == len(HITS)


def test_raw_flight_call_without_token_is_unauthenticated(
    secure: Server, root_certs: bytes
) -> None:
    with flight.connect(secure.location, tls_root_certs=root_certs) as raw:
        options = flight.FlightCallOptions(timeout=WAIT)
        with pytest.raises(flight.FlightUnauthenticatedError):
            list(raw.do_action(flight.Action("health", b""), options=options))
        with pytest.raises(flight.FlightUnauthenticatedError):
            list(raw.list_flights(options=options))


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"x": "y"}])
def test_kserve_refuses_a_missing_or_wrong_token(
    secure: Server, certificate: tuple[Path, Path], headers: dict[str, str] | None
) -> None:
    before = inference_count(secure, "facile")
    client = kserve(secure, certificate)
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.infer("facile", kserve_inputs(HITS), headers=headers, client_timeout=WAIT)
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.load_model("facile", headers=headers, client_timeout=WAIT)
        # the bidirectional stream is refused too
        errors: list[Any] = []
        done = threading.Event()

        def callback(result: Any, error: Any) -> None:
            errors.append(error)
            done.set()

        client.start_stream(callback, headers=headers)
        with contextlib.suppress(InferenceServerException):  # when the refusal came first
            client.async_stream_infer("facile", kserve_inputs(HITS))
        assert done.wait(WAIT)
        client.stop_stream()
        assert errors
        assert "UNAUTHENTICATED" in str(errors[0])
    finally:
        client.close()
    assert inference_count(secure, "facile") == before  # no model ran


def test_kserve_stream_with_token(secure: Server, certificate: tuple[Path, Path]) -> None:
    client = kserve(secure, certificate)
    results: list[Any] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        results.append(error or result)
        done.set()

    try:
        client.start_stream(callback, headers=AUTH)
        client.async_stream_infer("facile", kserve_inputs(HITS))
        assert done.wait(WAIT)
        client.stop_stream()
    finally:
        client.close()
    assert results[0].as_numpy("energy").shape == (len(HITS), 1)


def test_tokens_without_tls(example_repository: Path) -> None:
    with Server(
        example_repository,
        port=0,
        kserve_port=0,
        metrics_port=None,
        models=["identity"],
        auth_tokens=[TOKEN],
    ) as server:
        assert server.location.startswith("grpc://")
        values = {"INPUT0": np.ones((2, 1024), np.float32)}
        with Client(server.location, token=TOKEN, timeout=WAIT) as client:
            assert client.infer("identity", values).num_rows == 2
        with (
            Client(server.location, timeout=WAIT) as client,
            pytest.raises(Unauthenticated),
        ):
            client.infer("identity", values)
        stub = grpc.insecure_channel(f"127.0.0.1:{server.kserve_port}")
        try:
            live = stub.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=lambda _: b"",
                response_deserializer=lambda raw: raw,
            )
            with pytest.raises(grpc.RpcError) as info:
                live(None, timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            answer = live(None, timeout=WAIT, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert pb.ServerLiveResponse.FromString(answer).live
        finally:
            stub.close()


def test_empty_token_set_is_refused(example_repository: Path) -> None:
    with pytest.raises(ValueError, match="auth_tokens"):
        Server(example_repository, port=0, kserve_port=None, auth_tokens=[])


def test_bad_client_token_fails_before_any_io() -> None:
    with pytest.raises(ValueError, match="token"):
        Client("grpc://127.0.0.1:1", token="two words")


def test_health_checks_survive_a_wrong_token(
    secure: Server, root_certs: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The background health check gets Unauthenticated: it goes on, the thread lives."""
    caplog.set_level(logging.DEBUG, logger="arrowinfer.client._failover")
    with Client(
        secure.location, tls_root_certs=root_certs, token="wrong", health_interval=0.05
    ) as client:
        deadline = time.monotonic() + WAIT
        while sum("health check" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, "no health checks"
            threading.Event().wait(0.02)
        assert client._transport._health.is_alive()  # type: ignore[attr-defined]


def test_cli_serves_tls_and_tokens(
    example_repository: Path, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may call\n\n{TOKEN}  # the test\nsecond\n")
    cert, key = certificate
    extra = ["--model", "facile", "--tls-cert", str(cert), "--tls-key", str(key)]
    with arrowinfer_server(example_repository, *extra, "--auth-token-file", str(tokens)) as (
        _,
        location,
    ):
        assert location.startswith("grpc+tls://")
        for token in (TOKEN, "second"):
            with Client(
                location, tls_root_certs=cert.read_bytes(), token=token, timeout=WAIT
            ) as client:
                assert client.infer("facile", {"hits": HITS}).num_rows == len(HITS)
        with (
            Client(location, tls_root_certs=cert.read_bytes(), token="test") as client,
            pytest.raises(Unauthenticated),
        ):
            client.infer("facile", {"hits": HITS})


def test_cli_refuses_half_a_tls_setup(example_repository: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    for extra in (["--tls-cert", str(empty)], ["--auth-token-file", str(empty)]):
        done = subprocess.run(
            [
                *(sys.executable, "-m", "arrowinfer.cli", "serve", str(example_repository)),
                *("--port", "0", "--kserve-port", "-1", "--http-port", "-1"),
                *("--metrics-port", "-1", *extra),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "arrowinfer serve:" in done.stderr


# -- limits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """facile with at most 100 rows per request."""
    repo = write_example_repository(tmp_path_factory.mktemp("limited"), models=["facile"])
    config = repo / "facile" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "arrowinfer.max_request_rows" value { string_value: "100" } }\n'
    )
    return repo


def test_max_request_rows(limited: Path) -> None:
    values = np.zeros((101, 15), np.float32)
    with Server(limited, port=0, kserve_port=0, metrics_port=None) as server:
        with Client(server.location, timeout=WAIT, fallback="local", repository=limited) as client:
            assert client.infer("facile", {"hits": values[:100]}).num_rows == 100
            with pytest.raises(InvalidInput, match=r"too many rows.*<= 100 rows.*101 rows"):
                client.infer("facile", {"hits": values})
            # a request error: never retried, never sent to the fallback
            assert client.counters.get("retries", 0) == 0
            assert client.counters.get("fallbacks", 0) == 0
        triton = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
        try:
            with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*too many rows"):
                triton.infer("facile", kserve_inputs(values), client_timeout=WAIT)
        finally:
            triton.close()
        assert inference_count(server, "facile") == 100
    local = LocalTransport(limited)  # the fallback enforces the same limit
    try:
        schema = local.schema("facile", None)
        request = conform(to_record_batch({"hits": values}), schema, model="facile")
        with pytest.raises(InvalidInput, match="too many rows"):
            local.submit("facile", None, request).result(WAIT)
    finally:
        local.close()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_request_rows_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    repo = write_example_repository(tmp_path, models=["facile"])
    config = repo / "facile" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + f'parameters {{ key: "arrowinfer.max_request_rows" value {{ string_value: "{value}" }} }}\n'
    )
    with pytest.raises(ModelError, match="max_request_rows"):
        Repository(repo).load("facile")


# -- names never become paths --------------------------------------------------------------

BAD_NAMES = ["../x", "..", ".", "/etc/passwd", "a/b", "facile/../facile", "../outside/facile", ""]


@pytest.fixture(scope="module")
def fenced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server over ``BASE/repo``; a valid model lies outside it, in ``BASE/outside``."""
    base = tmp_path_factory.mktemp("fenced")
    repo = write_example_repository(base / "repo", models=["facile"])
    write_example_repository(base / "outside", models=["facile", "identity"])
    (base / "x").mkdir()
    # explicit: the load and unload calls run, and must still never reach the files
    with Server(repo, port=0, kserve_port=0, metrics_port=None, model_control="explicit") as server:
        yield server, base


def _snapshot(base: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(base.rglob("*"))}


def test_model_names_never_reach_the_filesystem(fenced: tuple[Server, Path]) -> None:
    server, base = fenced
    names = [*BAD_NAMES, str(base / "outside" / "facile"), str(base / "outside")]
    before_files = _snapshot(base)
    before_index = server.core.index()
    with flight.connect(server.location) as raw:
        options = flight.FlightCallOptions(timeout=WAIT)
        for name in names:
            for action in ("model.load", "model.config"):
                body = json.dumps({"model": name}).encode()
                with pytest.raises(flight.FlightError) as info:
                    list(raw.do_action(flight.Action(action, body), options=options))
                error = from_flight(info.value)
                if name == "":
                    assert isinstance(error, InvalidInput)  # "the action needs {'model': ...}"
                else:
                    assert isinstance(error, ModelNotFound), (action, name, error)
            # unloading what is not served succeeds, as Triton's, and touches nothing
            body = json.dumps({"model": name}).encode()
            if name:
                (answer,) = raw.do_action(flight.Action("model.unload", body), options=options)
                assert json.loads(answer.body.to_pybytes()) == {}
    triton = tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}")
    try:
        for name in names:
            if not name:
                continue
            with pytest.raises(InferenceServerException) as info:
                triton.load_model(name, client_timeout=WAIT)
            assert info.value.status() == "StatusCode.NOT_FOUND", (name, info.value)
    finally:
        triton.close()
    assert server.core.index() == before_index
    assert [m.version.name for m in server.core.served()] == ["facile"]
    assert _snapshot(base) == before_files


def test_descriptor_and_version_names_never_reach_the_filesystem(
    fenced: tuple[Server, Path],
) -> None:
    server, base = fenced
    with Client(server.location, timeout=WAIT, retries=0) as client:
        for name in ("../outside/facile", str(base / "outside" / "facile"), "a/b/c"):
            with pytest.raises(ModelNotFound):
                client.infer(name, {"hits": HITS})
        for version in ("../1", "1/../1", "/1", "x"):
            with pytest.raises(ModelNotFound):
                client.infer("facile", {"hits": HITS}, version=version)
