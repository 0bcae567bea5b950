"""The ``arrowinfer`` command, run in-process against a real server."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowinfer import tensors
from arrowinfer.cli import main
from arrowinfer.client import Client
from arrowinfer.examples import ALL_MODELS
from arrowinfer.server import Server

MODELS = ["facile", "identity", "jet_tagger", "toptag_cnn", "track_sum"]


def test_examples_writes_the_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "repo"
    assert main(["examples", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        assert (target / name / "config.pbtxt").stat().st_size > 0
        assert (target / name / "1" / "model.onnx").stat().st_size > 0
    # a second run keeps what is there; --overwrite rewrites it
    config = target / "facile" / "config.pbtxt"
    config.write_text(config.read_text() + "\n# local edit\n")
    assert main(["examples", str(target)]) == 0
    assert "# local edit" in config.read_text()
    assert main(["examples", str(target), "--overwrite"]) == 0
    assert "# local edit" not in config.read_text()


def test_models_lists_the_served_models(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", server.location]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == MODELS
    assert "points: list<item: fixed_size_list<item: float>[2]>" in lines[2]
    assert "hits: extension<arrow.fixed_shape_tensor" in lines[0]


@pytest.fixture(scope="module")
def events_table() -> pa.Table:
    """1000 HCAL channels under another column name, and a column the model does not take."""
    values = np.random.default_rng(0).standard_normal((1000, 15), dtype=np.float32)
    return pa.table({"channel": np.arange(1000), "h": tensors.from_numpy(values)})


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=300)
    elif path.suffix == ".arrows":
        with pa.ipc.new_stream(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=256)
    else:
        with pa.ipc.new_file(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=256)
    return path


def read(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("in.parquet", "out.parquet"),
        ("in.parquet", "out.arrow"),
        ("in.arrow", "out.parquet"),
        ("in.arrows", "out.arrow"),
    ],
)
def test_infer_a_file(
    server: Server,
    events_table: pa.Table,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    target: str,
) -> None:
    path = write(events_table, tmp_path / source)
    out = tmp_path / target
    args = ["infer", server.location, "facile", str(path), str(out), "--column", "hits=h"]
    assert main([*args, "--batch-rows", "128", "-q"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1000 events to {out}"
    result = read(out)
    assert result.num_rows == events_table.num_rows
    assert result.schema.names == ["energy"]
    assert result.schema.metadata is None  # the server times of each request are dropped
    with Client(server.location) as client:
        direct = client.infer("facile", {"hits": events_table.column("h")})
    np.testing.assert_allclose(
        result.column("energy").to_numpy(),
        tensors.to_numpy(direct.column("energy")),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("target", ["out.arrow", "out.parquet"])
def test_infer_a_file_with_the_models_column_names(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    values = np.random.default_rng(1).standard_normal((10, 1024), dtype=np.float32)
    path = write(pa.table({"INPUT0": tensors.from_numpy(values)}), tmp_path / "in.arrow")
    out = tmp_path / target
    assert main(["infer", server.location, "identity/1", str(path), str(out), "-q"]) == 0
    np.testing.assert_array_equal(tensors.to_numpy(read(out).column("OUTPUT0")), values)
    capsys.readouterr()


def test_errors_print_their_type_and_exit_1(
    server: Server, events_table: pa.Table, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(events_table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert main(["infer", server.location, "nope", str(path), str(out), "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("ModelNotFound: model 'nope' is not served (available: facile")
    assert captured.out == ""
    assert not out.exists()

    # the file's column is not what the model takes
    assert main(["infer", server.location, "facile", str(path), str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("InvalidInput: model 'facile': ")
    assert "no column ['hits']" in err
    assert "got ['channel', 'h']" in err


def test_no_server_is_an_error_too(
    events_table: pa.Table, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"grpc://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert main(["models", url]) == 1
        assert capsys.readouterr().err.startswith("ServerUnavailable: ")
        path = write(events_table, tmp_path / "in.parquet")
        assert main(["infer", url, "facile", str(path), str(tmp_path / "out.arrow")]) == 1
        assert capsys.readouterr().err.startswith("ServerUnavailable: ")


@pytest.mark.parametrize("url", ["127.0.0.1:8815", "http://127.0.0.1:8000"])
def test_models_with_a_bad_url_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line naming the URL and the schemes, as ``infer`` says it (not a traceback)."""
    assert main(["models", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"arrowinfer models: bad server URL {url!r}: expected SCHEME://")
    assert "Traceback" not in err


def test_the_kserve_port_is_named_when_given_as_flight(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Flight client at the KServe gRPC port gets gRPC's "Method not found": say why."""
    url = f"grpc://127.0.0.1:{server.kserve_port}"
    assert main(["models", url]) == 1
    err = capsys.readouterr().err
    assert "not an Arrow Flight server: a KServe/Triton gRPC port" in err
    assert err.count(url) == 1  # named once


def test_an_unknown_option_points_to_the_commands_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--backend-config=onnxruntime,x=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --backend-config=onnxruntime,x=1 (tritonserver's" in err
    assert "which arrowinfer lacks; see arrowinfer serve --help)" in err
    with pytest.raises(SystemExit):
        main(["serve", "--log-verbsoe=1"])  # a typo is no tritonserver flag
    assert "--log-verbsoe=1 (see arrowinfer serve --help)" in capsys.readouterr().err


def test_serve_takes_tritons_allow_and_log_verbose_flags() -> None:
    """A tritonserver command line's common flags work: --allow-http/-grpc/-metrics=false
    turn those ports off, --log-verbose=1 logs debug messages."""
    from arrowinfer.cli import parser

    args = parser().parse_args(["serve", "--allow-http=false", "--allow-grpc", "0"])
    assert (args.allow_http, args.allow_grpc, args.allow_metrics) == (False, False, True)
    assert parser().parse_args(["serve", "--log-verbose=1"]).log_verbose == 1


@pytest.mark.parametrize("mapping", ["hits", "=h", "hits=", "hits=a,,b"])
def test_a_bad_column_mapping_is_a_usage_error(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str], mapping: str
) -> None:
    args = ["infer", server.location, "facile", "in.parquet", "out.parquet", "--column", mapping]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert f"expected NAME=COLUMN[,COLUMN...], got {mapping!r}" in capsys.readouterr().err


def test_bench_is_part_of_the_package_and_writes_only_where_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from arrowinfer.bench import transports

    # imported as a module of the package, never run from the source tree by path
    assert Path(transports.__file__).parent.name == "bench"
    assert Path("arrowinfer-bench-results") == transports.RESULTS  # relative: the cwd
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["bench", "--update-readme", "README.md"])  # no README here: refused first
    assert info.value.code == 2
    assert "--update-readme: no such file 'README.md'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bench_help_is_the_benchmarks_own(capsys: pytest.CaptureFixture[str]) -> None:
    """``arrowinfer bench --help`` lists the options the benchmark takes, every one."""
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: arrowinfer bench")
    for option in ("--quick", "--triton-url", "--triton-http-url", "--out", "--update-readme"):
        assert option in out


@pytest.mark.parametrize("flag", ["--kserve-port", "--grpc-port"])
def test_serve_takes_tritons_name_for_the_grpc_port(flag: str) -> None:
    from arrowinfer.cli import parser

    args = parser().parse_args(["serve", "repo", flag, "9001"])
    assert args.kserve_port == 9001


EXPLICIT = ["--model-control-mode", "explicit"]


@pytest.mark.parametrize(
    ("argv", "models"),
    [
        ([], None),
        (["--load-model", "facile", "--model", "identity"], ["facile", "identity"]),
        (["--load-model=*"], None),
        # Triton's explicit mode loads only what --load-model names: nothing by default
        (EXPLICIT, []),
        ([*EXPLICIT, "--load-model=facile"], ["facile"]),
        ([*EXPLICIT, "--load-model=*"], None),
        (["--model-control-mode", "poll"], None),
    ],
)
def test_serve_takes_tritons_load_model(argv: list[str], models: list[str] | None) -> None:
    from arrowinfer.cli import _models_to_load, parser

    assert _models_to_load(parser().parse_args(["serve", "repo", *argv])) == models


def test_load_model_star_must_be_alone() -> None:
    """As tritonserver: '*' beside another --load-model is an error, not 'every model'."""
    from arrowinfer.cli import _models_to_load, parser

    args = parser().parse_args(["serve", "repo", "--load-model=facile", "--load-model=*"])
    with pytest.raises(SystemExit, match="'\\*' must be the only model named"):
        _models_to_load(args)


def test_serve_takes_one_repository(
    example_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tritonserver takes several --model-repository; arrowinfer serves one, and says so."""
    repo = str(example_repository)
    for argv in (
        ["--model-repository", repo, "--model-repository", repo],
        [repo, "--model-repository", repo],
    ):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert "one model repository is served, 2 were given" in err


def test_version_and_a_closed_pipe(server: Server) -> None:
    """``arrowinfer --version``; ``arrowinfer models URL | head -1`` ends quietly."""
    import shlex
    import subprocess
    import sys

    version = [sys.executable, "-m", "arrowinfer.cli", "--version"]
    done = subprocess.run(version, check=True, capture_output=True, text=True)
    assert done.stdout.startswith("arrowinfer ")
    # a reader that stops at once, as `| head -0` (`true` never reads)
    command = f"{shlex.quote(sys.executable)} -m arrowinfer.cli models {server.location} | true"
    piped = subprocess.run(command, shell=True, check=True, capture_output=True, text=True)
    assert "Traceback" not in piped.stderr
    assert "BrokenPipeError" not in piped.stderr
