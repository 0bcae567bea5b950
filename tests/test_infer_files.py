"""``arrowinfer infer`` over event files: ROOT, Parquet, Arrow; per-event and per-object models.

Real servers on loopback ports and the CMS open-data NanoAOD sample (../shared/data, or
$ARROWINFER_DATA); results are compared with the same events sent through the client by hand.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowinfer import tensors
from arrowinfer.cli import main
from arrowinfer.client import Client
from arrowinfer.events import shared_data_dir
from arrowinfer.examples import ALL_MODELS, write_example_repository
from arrowinfer.files import EventFiles, InferStats, infer_files
from arrowinfer.server import Server

uproot = pytest.importorskip("uproot")
ak = pytest.importorskip("awkward")

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
JET = "Jet_pt,Jet_eta,Jet_phi,Jet_mass,Jet_btagCSVV2,Jet_qgl,Jet_area,Jet_nConstituents"
JETS = "Jet_pt,Jet_eta,Jet_phi,Jet_mass,Jet_btagCSVV2"
KEEP = ["run", "luminosityBlock", "event"]


@pytest.fixture(scope="module")
def sample() -> Path:
    data = shared_data_dir()
    if data is None or not (data / SAMPLE).exists():
        pytest.fail(f"no {SAMPLE}: set $ARROWINFER_DATA to the directory that holds it")
    return data / SAMPLE


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_repository(tmp_path_factory.mktemp("models"), models=ALL_MODELS)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Server]:
    models = ["jet_score", "event_jets", "facile"]
    with Server(repository, port=0, kserve_port=None, metrics_port=None, models=models) as s:
        yield s


@pytest.fixture(scope="module")
def jets(sample: Path) -> dict[str, np.ndarray]:
    """The sample's jets by hand: per-event counts, ids and [n_jets, k] feature matrices."""
    with uproot.open(sample) as file:
        arrays = file["Events"].arrays([*KEEP, *JET.split(",")], library="np")
    counts = np.array([len(a) for a in arrays["Jet_pt"]])
    stack = lambda names: np.stack(
        [np.concatenate(arrays[n]).astype(np.float32) for n in names.split(",")], axis=1
    )
    return {
        "counts": counts,
        "jet": stack(JET),
        "jets": stack(JETS),
        **{k: arrays[k] for k in KEEP},
    }


def read(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".root":
        with uproot.open(path) as file:
            table = ak.to_arrow_table(file["Events"].arrays(), extensionarray=False)
        # older uproot writers add a counter branch "nX" for each jagged branch X: not ours
        names = [
            n for n in table.column_names if not (n[:1] == "n" and n[1:] in table.column_names)
        ]
        # uproot keeps branches in its own order: put the kept columns first, as written
        order = [n for n in KEEP if n in names]
        return table.select(order + [n for n in names if n not in order])
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["infer", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_jet_scores(table: pa.Table, jets: dict[str, np.ndarray], expected: np.ndarray) -> None:
    assert table.column_names == [*KEEP, "score"]
    for name in KEEP:  # joined on run, luminosityBlock, event
        np.testing.assert_array_equal(table.column(name).to_numpy(), jets[name])
    score = table.column("score").combine_chunks()
    np.testing.assert_array_equal(score.value_lengths().to_numpy(), jets["counts"])
    np.testing.assert_allclose(score.flatten().to_numpy(), expected.reshape(-1), rtol=1e-6)


# -- per-object and per-event models on the real file --------------------------------------


@pytest.mark.parametrize("target", ["out.parquet", "out.arrow", "out.feather", "out.root"])
def test_per_jet_model_on_nanoaod(
    server: Server,
    sample: Path,
    jets: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
) -> None:
    out = tmp_path / target
    code, stdout, err = run(
        capsys, server.location, "jet_score", sample, out, "--input", f"jet={JET}",
        "--step-size", "64", "-q",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert stdout.strip() == f"wrote 200 events to {out}"
    with Client(server.location) as client:
        direct = client.infer("jet_score", {"jet": jets["jet"]})
    assert (jets["counts"] == 0).sum() > 0  # the sample has events without jets
    check_jet_scores(read(out), jets, tensors.to_numpy(direct.column("score")))
    assert [p.name for p in tmp_path.iterdir()] == [target]  # no temporary file left


def test_event_model_over_ragged_jets_served_local_and_fallback(
    server: Server,
    repository: Path,
    sample: Path,
    jets: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    offsets = np.concatenate([[0], np.cumsum(jets["counts"])]).astype(np.int32)
    with Client(server.location) as client:
        direct = client.infer("event_jets", {"jets": tensors.Ragged(offsets, jets["jets"])})
    expected = tensors.to_numpy(direct.column("probabilities"))
    with socket.socket() as refused:  # bound, not listening
        refused.bind(("127.0.0.1", 0))
        dead = f"grpc://127.0.0.1:{refused.getsockname()[1]}"
        for url, extra in (
            (server.location, []),
            ("local", ["--repository", repository]),
            (dead, ["--fallback", "local", "--repository", repository]),
        ):
            out = tmp_path / "out.parquet"
            code, _, err = run(
                capsys, url, "event_jets", sample, out, "--input", f"jets={JETS}", "-q", *extra
            )
            assert code == 0, err
            assert ("FallbackWarning" in err) == (url == dead)
            table = read(out)
            assert table.column_names == [*KEEP, "probabilities"]
            np.testing.assert_array_equal(table.column("event").to_numpy(), jets["event"])
            got = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_scalar_columns_stack_per_event_and_keep(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    hits = rng.standard_normal((50, 15), dtype=np.float32)
    table = pa.table({"id": np.arange(50), **{f"h{i}": hits[:, i] for i in range(15)}})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=20)
    out = tmp_path / "out.arrow"
    columns = ",".join(f"h{i}" for i in range(15))
    code, _, err = run(
        capsys, server.location, "facile", tmp_path / "in.parquet", out,
        "--column", f"hits={columns}", "--keep", "id", "--step-size", "7", "-q",
    )  # fmt: skip
    assert code == 0, err
    result = read(out)
    assert result.column_names == ["id", "energy"]
    np.testing.assert_array_equal(result.column("id").to_numpy(), np.arange(50))
    with Client(server.location) as client:
        direct = client.infer("facile", {"hits": hits})
    np.testing.assert_allclose(
        tensors.to_numpy(result.column("energy").combine_chunks()),
        tensors.to_numpy(direct.column("energy")),
        rtol=1e-6,
    )


def test_empty_events_and_several_files_by_glob(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = [2, 0, 3, 0, 0, 1]
    rng = np.random.default_rng(4)
    values = {n: rng.uniform(0.1, 50, sum(counts)).astype(np.float32) for n in JET.split(",")}
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    columns = {n: pa.ListArray.from_arrays(offsets, pa.array(v)) for n, v in values.items()}
    table = pa.table({"event": np.arange(6, dtype=np.uint64), **columns})
    pq.write_table(table.slice(0, 4), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(4), tmp_path / "part-1.parquet")
    out = tmp_path / "out.parquet"
    code, _, err = run(
        capsys, server.location, "jet_score", tmp_path / "part-*.parquet", out,
        "--input", f"jet={JET}", "-q",
    )  # fmt: skip
    assert code == 0, err
    result = read(out)
    assert result.column("event").to_pylist() == list(range(6))
    score = result.column("score").combine_chunks()
    assert score.value_lengths().to_pylist() == counts
    matrix = np.stack([values[n] for n in JET.split(",")], axis=1)
    with Client(server.location) as client:
        direct = tensors.to_numpy(client.infer("jet_score", {"jet": matrix}).column("score"))
    np.testing.assert_allclose(score.flatten().to_numpy(), direct.reshape(-1), rtol=1e-6)


# -- remote files ------------------------------------------------------------------------------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte ranges (what uproot asks a web server for)."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        ranges = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not ranges or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        parts = [r.split("-") for r in ranges.removeprefix("bytes=").split(",")]
        if len(parts) > 1:  # no multipart answers: uproot then asks range by range
            self.send_error(416)
            return None
        start, stop = int(parts[0][0]), min(int(parts[0][1]), len(data) - 1)
        body = data[start : stop + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """A loopback web server for ``directory``; yields its base URL."""
    handler = lambda *a: _RangeHandler(*a, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def http_url(sample: Path) -> Iterator[str]:
    with http_server(sample.parent) as base:
        yield f"{base}/{SAMPLE}"


def test_a_root_file_over_http(
    server: Server,
    http_url: str,
    jets: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out.parquet"
    code, _, err = run(
        capsys, server.location, "jet_score", http_url, out, "--input", f"jet={JET}",
        "--step-size", "100", "-q",
    )  # fmt: skip
    assert code == 0, err
    with Client(server.location) as client:
        direct = client.infer("jet_score", {"jet": jets["jet"]})
    check_jet_scores(read(out), jets, tensors.to_numpy(direct.column("score")))


@pytest.mark.parametrize("name", ["events.parquet", "events.arrow"])
def test_parquet_and_arrow_files_over_http(
    server: Server,
    jets: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    offsets = pa.array(np.concatenate([[0], np.cumsum(jets["counts"])]).astype(np.int32))
    columns = {
        c: pa.ListArray.from_arrays(offsets, pa.array(jets["jet"][:, i]))
        for i, c in enumerate(JET.split(","))
    }
    table = pa.table({**{k: jets[k] for k in KEEP}, **columns})
    served = tmp_path / "served"
    served.mkdir()
    if name.endswith(".parquet"):
        pq.write_table(table, served / name, row_group_size=64)
    else:
        with pa.ipc.new_file(served / name, table.schema) as writer:
            writer.write_table(table, max_chunksize=64)
    out = tmp_path / "out.parquet"
    with http_server(served) as base:
        code, _, err = run(
            capsys, server.location, "jet_score", f"{base}/{name}", out, "--input", f"jet={JET}",
            "--step-size", "50", "-q",
        )  # fmt: skip
    assert code == 0, err
    with Client(server.location) as client:
        direct = client.infer("jet_score", {"jet": jets["jet"]})
    check_jet_scores(read(out), jets, tensors.to_numpy(direct.column("score")))


# -- bounded memory, Ctrl-C --------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 000 events of three jets each, many steps long."""
    n = 20_000
    rng = np.random.default_rng(5)
    offsets = pa.array(np.arange(0, 3 * n + 1, 3, dtype=np.int32))
    columns = {
        c: pa.ListArray.from_arrays(offsets, pa.array(rng.uniform(1, 10, 3 * n).astype("f4")))
        for c in JET.split(",")
    }
    path = tmp_path_factory.mktemp("big") / "big.arrow"
    table = pa.table({"event": np.arange(n, dtype=np.uint64), **columns})
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table, max_chunksize=5000)
    return path


def test_a_file_larger_than_a_step_has_bounded_rows_in_flight(
    server: Server, big_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    with Client(server.location) as client:
        stats = infer_files(
            client, "jet_score", [str(big_file)], out,
            mapping={"jet": JET.split(",")}, step_size=500, window=3,
        )  # fmt: skip
    assert (stats.events, stats.chunks) == (20_000, 40)
    # read ahead of the results by at most the window (and the chunk being read)
    assert 500 < stats.max_in_flight <= (3 + 1) * 500
    assert pq.read_metadata(out).num_rows == 20_000


def test_reading_holds_one_step_not_the_file(tmp_path: Path) -> None:
    # pyarrow's Parquet pre-buffer would keep every column chunk read until the file closes
    n = 400_000
    values = pa.array(np.random.default_rng(6).uniform(1, 10, 3 * n).astype("f4"))
    jets = pa.ListArray.from_arrays(pa.array(np.arange(0, 3 * n + 1, 3, dtype=np.int32)), values)
    table = pa.table(
        {"event": np.arange(n, dtype=np.uint64), **dict.fromkeys(JET.split(","), jets)}
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=20_000)
    decoded = table.nbytes
    del table, jets, values
    files = EventFiles([str(tmp_path / "big.parquet")])
    before = pa.total_allocated_bytes()
    peak = 0
    for chunk in files.iterate(["event", *JET.split(",")], 1000):
        assert chunk.num_rows == 1000
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert peak < decoded / 4  # a few row groups of 20, not the 400 steps of the file


def test_interrupted_leaves_a_valid_partial_file(
    server: Server, big_file: Path, tmp_path: Path
) -> None:
    def stop_after_two(stats: InferStats) -> None:
        if stats.chunks == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out.root"
    with Client(server.location) as client:
        stats = infer_files(
            client, "jet_score", [str(big_file)], out, mapping={"jet": JET.split(",")},
            step_size=1000, on_chunk=stop_after_two,
        )  # fmt: skip
    assert stats.interrupted
    table = read(out)
    assert table.column("event").to_pylist() == list(range(2000))
    assert [p.name for p in tmp_path.iterdir()] == ["out.root"]


#: ``python -m arrowinfer.cli`` with Ctrl-C taken as a terminal's process takes it: a shell
#: that starts the tests in the background leaves SIGINT ignored, and children inherit that
#: (Python then installs no KeyboardInterrupt handler, and the command runs to its end).
_CLI_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('arrowinfer.cli', run_name='__main__', alter_sys=True)"
)


def test_ctrl_c_on_the_command(repository: Path, big_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    command = [
        sys.executable, "-c", _CLI_WITH_CTRL_C, "infer", "local", "jet_score", str(big_file),
        str(out), "--repository", str(repository), "--input", f"jet={JET}", "--step-size", "20",
        "-q",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        partial = tmp_path / ".out.parquet.partial"
        deadline = time.monotonic() + 60
        # the file grew past its header, then grew again: the first chunk was written whole
        # (and counted) before the second began, so one is done when the signal comes
        sizes: set[int] = set()
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                size = partial.stat().st_size
                if size > 200:
                    sizes.add(size)
                if len(sizes) >= 2:
                    break
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    rows = pq.read_table(out).column("event").to_pylist()
    assert 0 < len(rows) < 20_000
    assert rows == list(range(len(rows)))
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


# -- wrong arguments: one line, non-zero, nothing written ---------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "127.0.0.1:8815"}, "bad server URL '127.0.0.1:8815'"),
        ({"url": "http://127.0.0.1:1"}, "bad server URL"),
        ({"input": "missing.root"}, "missing.root: no such file"),
        ({"input": "none-*.root"}, "no file matches"),
        ({"input": "notes.txt"}, "unknown input format '.txt'"),
        ({"output": "out.csv"}, "unknown output format '.csv'"),
        ({"output": "nodir/out.parquet"}, "no such directory"),
        ({"output": "afile/out.parquet"}, "no such directory"),
        ({"extra": ["--tree", "Nope"]}, "no tree 'Nope' (trees: Events"),
        ({"extra": ["--keep", "nope"]}, "--keep: no column ['nope']"),
        ({"extra": ["--step-size", "0"]}, "--step-size must be at least 1"),
        ({"url": "local"}, "needs --repository"),
        ({"extra": ["--input", "jet=Jet_pt"]}, "InvalidInput: model 'jet_score'"),
        ({"extra": ["--input", "jet=Jet_nope"]}, "no column ['Jet_nope']"),
        (
            {"extra": ["--input", f"jet={JET.replace('Jet_mass', 'Jet_mas')}"]},
            "no column ['Jet_mas'] in",
        ),
        ({"extra": ["--input", "jets=Jet_pt"]}, "['jets'], which the model does not take; did"),
        ({"extra": ["--input", f"jet={JET.replace('Jet_mass', 'run')}"]}, "mix per-object"),
        ({"model": "nope"}, "ModelNotFound: model 'nope'"),
        ({"input": "empty.parquet"}, "empty.parquet: no events to run over"),
    ],
)
def test_wrong_arguments_are_one_line(
    server: Server,
    sample: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, object],
    message: str,
) -> None:
    os.chdir(tmp_path)
    Path("notes.txt").write_text("not events\n")
    Path("afile").write_text("a file, not a directory\n")
    pq.write_table(pa.table({"Jet_pt": pa.array([], pa.list_(pa.float32()))}), "empty.parquet")
    args = {
        "url": server.location,
        "model": "jet_score",
        "input": str(sample),
        "output": "out.parquet",
        "extra": [],
        **change,
    }
    extra = args.pop("extra")
    assert isinstance(extra, list)
    # a later --input of the same name replaces the first
    code, out, err = run(capsys, *args.values(), "-q", "--input", f"jet={JET}", *extra)
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty.parquet", "notes.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["infer", "grpc://127.0.0.1:1", "jet_score"], "the following arguments are required"),
        (["infer", "local", "m", "in.root", "out.parquet", "--input", "jet="], "NAME=COLUMN"),
    ],
)
def test_usage_errors_are_one_line_too(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "arrowinfer infer --help" in err
