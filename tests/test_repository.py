"""The Triton-layout model repository: configs, versions, completion from the graph, errors."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Callable, Sequence

import onnx
import pyarrow as pa
import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from arrowinfer import examples
from arrowinfer.config import _normalize as normalize
from arrowinfer.config import config_json
from arrowinfer.errors import ModelError, ModelNotFound
from arrowinfer.repository import (
    DEFAULT_MAX_BATCH_SIZE,
    ModelVersion,
    Repository,
    complete_config,
    load_model,
    read_config,
)

FP32 = TensorProto.FLOAT
Dims = Sequence[int | str]

# --------------------------------------------------------------------------------------
# Building ONNX models and repositories
# --------------------------------------------------------------------------------------


def _value(name: str, elem: int, dims: Dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def onnx_model(
    nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]],
    inputs: Sequence[tuple[str, int, Dims]],
    outputs: Sequence[tuple[str, int, Dims]],
) -> onnx.ModelProto:
    """A small ONNX model: nodes as (op, inputs, outputs), tensors as (name, type, dims)."""
    graph = helper.make_graph(
        [helper.make_node(op, list(i), list(o)) for op, i, o in nodes],
        "test",
        [_value(*t) for t in inputs],
        [_value(*t) for t in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def identity(elem: int = FP32, dims: Dims = ("batch", 4), x: str = "x", y: str = "y") -> bytes:
    return onnx_model(
        [("Identity", [x], [y])], [(x, elem, dims)], [(y, elem, dims)]
    ).SerializeToString()


def add_relu(dims: Dims = ("batch", 3)) -> bytes:
    """``out = Relu(a + b)``."""
    return onnx_model(
        [("Add", ["a", "b"], ["s"]), ("Relu", ["s"], ["out"])],
        [("a", FP32, dims), ("b", FP32, dims)],
        [("out", FP32, dims)],
    ).SerializeToString()


def write_model(
    repo: pathlib.Path,
    name: str,
    config: str | None,
    versions: dict[str, bytes] | None = None,
) -> pathlib.Path:
    """``repo/name/config.pbtxt`` (unless None) and ``repo/name/<v>/model.onnx``."""
    model_dir = repo / name
    model_dir.mkdir(parents=True)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    for version, data in (versions if versions is not None else {"1": identity()}).items():
        (model_dir / version).mkdir()
        (model_dir / version / "model.onnx").write_bytes(data)
    return model_dir


def config_of(name: str, max_batch_size: int = 4, dims: str = "4", **extra: str) -> str:
    """A config of the ``identity()`` model, with optional extra lines."""
    return "\n".join(
        [
            f'name: "{name}"',
            'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch_size}",
            f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims} ] }} ]',
            f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {dims} ] }} ]',
            *extra.values(),
        ]
    )


def param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'


def meta(field: pa.Field) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}


# --------------------------------------------------------------------------------------
# Every config feature, through Triton's ModelConfig
# --------------------------------------------------------------------------------------

# A jet-tagger-like model: ragged points with a server-filled mask, a reshaped input and an
# input with a variable per-entry dimension.
FULL_GRAPH = onnx_model(
    [
        ("Mul", ["points", "mask"], ["masked"]),
        ("Relu", ["flat"], ["flat_out"]),
        ("Identity", ["hits"], ["hits_out"]),
    ],
    [
        ("points", FP32, ("batch", 10, 2)),
        ("mask", FP32, ("batch", 10, 1)),
        ("flat", FP32, ("batch", 2, 3)),
        ("hits", TensorProto.INT64, ("batch", "n")),
    ],
    [
        ("masked", FP32, ("batch", 10, 2)),
        ("flat_out", FP32, ("batch", 2, 3)),
        ("hits_out", TensorProto.INT64, ("batch", "n")),
    ],
).SerializeToString()

FULL_CONFIG = """
# every feature arrowinfer reads, in Triton's text format
name: "full"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "points" data_type: TYPE_FP32 dims: [ 10, 2 ] },
  { name: "mask" data_type: TYPE_FP32 dims: [ 10, 1 ] },
  { name: "flat" data_type: TYPE_FP32 dims: [ 6 ] reshape: { shape: [ 2, 3 ] } },
  { name: "hits" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [
  { name: "masked" data_type: TYPE_FP32 dims: [ 10, 2 ] },
  { name: "flat_out" data_type: TYPE_FP32 dims: [ 2, 3 ] },
  { name: "hits_out" data_type: TYPE_INT64 dims: [ -1 ] }
]
dynamic_batching {
  max_queue_delay_microseconds: 250
  preferred_batch_size: [ 4, 8 ]
  default_queue_policy { max_queue_size: 16 }
}
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { latest { num_versions: 2 } }
parameters { key: "arrowinfer.ragged_inputs" value { string_value: " points , " } }
parameters { key: "arrowinfer.mask_input" value { string_value: "mask" } }
parameters { key: "arrowinfer.pad_value" value { string_value: "-1.5" } }
parameters { key: "intra_op_thread_count" value { string_value: "2" } }
"""


@pytest.fixture
def full(tmp_path: pathlib.Path) -> list[ModelVersion]:
    write_model(tmp_path, "full", FULL_CONFIG, {"1": FULL_GRAPH, "2": FULL_GRAPH, "3": FULL_GRAPH})
    return Repository(tmp_path).load("full")


def test_full_config_is_triton_model_config(full: list[ModelVersion]) -> None:
    config = full[0].config
    assert isinstance(config, mc.ModelConfig)
    # Nothing to complete: the loaded config is what Triton's classes parse, plus what
    # Triton's normalization names (the instance group, the model file)
    expected = text_format.Parse(FULL_CONFIG, mc.ModelConfig())
    expected.instance_group[0].name = "full_0"
    expected.default_model_filename = "model.onnx"
    assert config == expected
    assert config.name == "full"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert full[0].max_batch_size == 8
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 250
    assert list(batching.preferred_batch_size) == [4, 8]
    assert batching.default_queue_policy.max_queue_size == 16
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_CPU)
    ]
    flat = config.input[2]
    assert (flat.name, list(flat.dims), list(flat.reshape.shape)) == ("flat", [6], [2, 3])
    assert config.input[3].data_type == mc.TYPE_INT64
    assert list(config.input[3].dims) == [-1]


def test_full_config_arrowinfer_parameters(full: list[ModelVersion]) -> None:
    for mv in full:
        assert mv.ragged_inputs == ("points",)
        assert mv.mask_input == "mask"
        assert mv.pad_value == -1.5
        assert mv.parameter("intra_op_thread_count") == "2"
        assert mv.parameter("arrowinfer.pad_value") == "-1.5"
        assert mv.parameter("no.such.key") is None
        assert mv.parameter("no.such.key", "dflt") == "dflt"


def test_full_config_signatures(full: list[ModelVersion]) -> None:
    mv = full[-1]
    assert mv.name == "full"
    assert mv.version == 3
    assert mv.path.parts[-2:] == ("3", "model.onnx")
    # The mask is filled by the server: clients never send it.
    assert mv.inputs.names == ["points", "flat", "hits"]
    assert mv.inputs.metadata == {b"model": b"full", b"version": b"3"}
    points, flat, hits = mv.inputs
    assert points.type == pa.list_(pa.list_(pa.float32(), 2))
    assert meta(points) == {"datatype": "FP32", "shape": "[10, 2]", "ragged": "pad"}
    # reshape changes what the model sees, not what clients send
    assert flat.type == pa.fixed_shape_tensor(pa.float32(), [6])
    assert meta(flat) == {"datatype": "FP32", "shape": "[6]"}
    assert hits.type == pa.list_(pa.int64())
    assert meta(hits) == {"datatype": "INT64", "shape": "[-1]"}
    assert not any(f.nullable for f in mv.inputs)

    assert mv.outputs.names == ["masked", "flat_out", "hits_out"]
    masked, flat_out, hits_out = mv.outputs
    assert masked.type == pa.fixed_shape_tensor(pa.float32(), [10, 2])
    assert meta(masked) == {"datatype": "FP32", "shape": "[10, 2]"}
    assert flat_out.type == pa.fixed_shape_tensor(pa.float32(), [2, 3])
    assert hits_out.type == pa.list_(pa.int64())


POLICIES = [
    ("", [3]),  # Triton's default: the latest version
    ("version_policy: { latest { num_versions: 2 } }", [2, 3]),
    ("version_policy: { latest { num_versions: 9 } }", [1, 2, 3]),
    ("version_policy: { all { } }", [1, 2, 3]),
    ("version_policy: { specific { versions: [ 1, 3 ] } }", [1, 3]),
    ("version_policy: { specific { versions: 2 } }", [2]),
]


@pytest.mark.parametrize(("policy", "expected"), POLICIES)
def test_version_policy(tmp_path: pathlib.Path, policy: str, expected: list[int]) -> None:
    model_dir = write_model(
        tmp_path,
        "m",
        config_of("m", policy=policy),
        {"1": identity(), "2": identity(), "3": identity()},
    )
    # Not versions: a directory without model.onnx, non-numeric and non-ASCII digit names.
    (model_dir / "7").mkdir()
    for junk in ("latest", "²"):
        (model_dir / junk).mkdir()
        (model_dir / junk / "model.onnx").write_bytes(identity())
    versions = Repository(tmp_path).load("m")
    assert [v.version for v in versions] == expected
    assert [v.path for v in versions] == [model_dir / str(n) / "model.onnx" for n in expected]
    assert all(v.inputs.metadata[b"version"] == str(v.version).encode() for v in versions)


def test_version_policy_specific_version_missing(tmp_path: pathlib.Path) -> None:
    policy = "version_policy: { specific { versions: [ 1, 4 ] } }"
    model_dir = write_model(tmp_path, "m", config_of("m", policy=policy))
    with pytest.raises(ModelError, match=r"versions \[4\]") as info:
        load_model(model_dir)
    assert str(model_dir) in str(info.value)


def test_default_model_filename(tmp_path: pathlib.Path) -> None:
    model_dir = tmp_path / "named"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "net.onnx").write_bytes(identity())
    (model_dir / "config.pbtxt").write_text(
        config_of("named", f='default_model_filename: "net.onnx"')
    )
    (version,) = load_model(model_dir)
    assert version.path == model_dir / "1" / "net.onnx"


def test_backend_without_platform(tmp_path: pathlib.Path) -> None:
    config = config_of("m").replace('platform: "onnxruntime_onnx"', 'backend: "onnxruntime"')
    (version,) = load_model(write_model(tmp_path, "m", config))
    assert version.config.backend == "onnxruntime"


# --------------------------------------------------------------------------------------
# A model without config.pbtxt: completed from the graph
# --------------------------------------------------------------------------------------


def test_configless_batching_model(tmp_path: pathlib.Path) -> None:
    model_dir = write_model(tmp_path, "auto", None, {"1": add_relu()})
    (version,) = load_model(model_dir)
    config = version.config
    assert config.name == "auto"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("a", mc.TYPE_FP32, [3]),
        ("b", mc.TYPE_FP32, [3]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("out", mc.TYPE_FP32, [3])
    ]
    assert version.inputs.names == ["a", "b"]
    assert version.inputs.field("a").type == pa.fixed_shape_tensor(pa.float32(), [3])
    assert version.outputs.field("out").type == pa.fixed_shape_tensor(pa.float32(), [3])
    assert (version.ragged_inputs, version.mask_input, version.pad_value) == ((), None, 0.0)
    assert not (model_dir / "config.pbtxt").exists()  # completion never writes files


@pytest.mark.parametrize(
    ("inputs", "output"),
    [
        ([("a", (2, 3)), ("b", (2, 3))], (2, 3)),  # no batch dimension at all
        ([("a", ("batch", 3)), ("b", (1, 3))], ("batch", 3)),  # one fixed first dimension
    ],
)
def test_configless_model_without_batching(
    tmp_path: pathlib.Path, inputs: list[tuple[str, Dims]], output: Dims
) -> None:
    graph = onnx_model(
        [("Add", ["a", "b"], ["out"])],
        [(n, FP32, d) for n, d in inputs],
        [("out", FP32, output)],
    )
    (version,) = load_model(write_model(tmp_path, "fixed", None, {"1": graph.SerializeToString()}))
    assert version.max_batch_size == 0
    assert version.config.platform == "onnxruntime_onnx"
    # Without batching the dims are the whole shape; symbolic dims become -1.
    expected = [[-1 if isinstance(d, str) else d for d in dims] for _, dims in inputs]
    assert [list(i.dims) for i in version.config.input] == expected


@pytest.mark.parametrize("max_batch_size", [0, 8])
def test_config_is_normalized_as_tritons(tmp_path: pathlib.Path, max_batch_size: int) -> None:
    """What Triton's normalization fills in, and its JSON writes even at the default: the
    fields Triton's clients read by key (coffea's triton_wrapper takes
    ``dynamic_batching.preferred_batch_size[0]``; scripts index ``max_batch_size``)."""
    batching = "dynamic_batching { }" if max_batch_size else ""
    config = config_of("norm", max_batch_size, "4" if max_batch_size else "-1, 4", b=batching)
    (version,) = load_model(write_model(tmp_path, "norm", config))
    full = config_json(version.config)
    assert full["max_batch_size"] == max_batch_size
    assert full["backend"] == "onnxruntime"
    assert full["version_policy"] == {"latest": {"num_versions": 1}}
    assert full["default_model_filename"] == "model.onnx"
    assert [(g["name"], g["kind"], g["count"]) for g in full["instance_group"]] == [
        ("norm_0", "KIND_CPU", 1)
    ]
    assert full["input"][0]["format"] == "FORMAT_NONE"
    assert full["input"][0]["optional"] is False
    assert full["output"][0]["label_filename"] == ""
    assert full["batch_input"] == []
    if max_batch_size:  # as Triton: the preferred size is max_batch_size when none is given
        assert full["dynamic_batching"]["preferred_batch_size"] == [8]
        assert full["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    else:
        assert "dynamic_batching" not in full


def _checksummed(parameters: dict[str, str], agent: str = "checksum") -> str:
    """``config_of("sum")`` with a repository agent of these parameters."""
    pairs = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in parameters.items())
    agents = f'model_repository_agents {{ agents [ {{ name: "{agent}" {pairs} }} ] }}'
    return config_of("sum", a=agents)


def test_the_checksum_agent_checks_files_before_loading(tmp_path: pathlib.Path) -> None:
    """Triton's checksum repository agent (CMS's model tools write it): 'MD5:<file>' with
    the file's sum, the file relative to the model directory; the model loads only when
    every sum matches."""
    graph = identity()
    right = hashlib.md5(graph).hexdigest()
    repo = tmp_path / "good"
    write_model(repo, "sum", _checksummed({"MD5:1/model.onnx": right}), {"1": graph})
    (version,) = load_model(repo / "sum")
    assert version.config.model_repository_agents.agents[0].name == "checksum"

    wrong = "0" * 32
    bad = tmp_path / "bad"
    write_model(bad, "sum", _checksummed({"md5:1/model.onnx": wrong}), {"1": graph})
    with pytest.raises(ModelError, match=f"MD5 differs \\(expected {wrong}, got {right}\\)"):
        load_model(bad / "sum")


@pytest.mark.parametrize(
    ("parameters", "agent", "words"),
    [
        ({"MD5:1/model.onnx": "x"}, "encrypt", "agent 'encrypt' is not available"),
        ({"SHA1:1/model.onnx": "x"}, "checksum", "expected 'MD5:<file"),
        ({"MD5:": "x"}, "checksum", "expected 'MD5:<file"),
        ({"MD5:2/model.onnx": "x"}, "checksum", "no such file"),
        ({"MD5:../../etc/passwd": "x"}, "checksum", "no such file in the model directory"),
        ({"MD5:1": "x"}, "checksum", "no such file"),  # a directory
    ],
)
def test_repository_agents_that_cannot_run_refuse_the_model(
    tmp_path: pathlib.Path, parameters: dict[str, str], agent: str, words: str
) -> None:
    """As Triton: a model is never served with an agent unrun or a sum unchecked."""
    write_model(tmp_path, "sum", _checksummed(parameters, agent))
    with pytest.raises(ModelError, match=re.escape(words)) as caught:
        load_model(tmp_path / "sum")
    assert "model_repository_agents" in str(caught.value)


ELEMENT_TYPES = {
    TensorProto.BOOL: ("TYPE_BOOL", pa.bool_()),
    TensorProto.UINT8: ("TYPE_UINT8", pa.uint8()),
    TensorProto.UINT16: ("TYPE_UINT16", pa.uint16()),
    TensorProto.UINT32: ("TYPE_UINT32", pa.uint32()),
    TensorProto.UINT64: ("TYPE_UINT64", pa.uint64()),
    TensorProto.INT8: ("TYPE_INT8", pa.int8()),
    TensorProto.INT16: ("TYPE_INT16", pa.int16()),
    TensorProto.INT32: ("TYPE_INT32", pa.int32()),
    TensorProto.INT64: ("TYPE_INT64", pa.int64()),
    TensorProto.FLOAT16: ("TYPE_FP16", pa.float16()),
    TensorProto.FLOAT: ("TYPE_FP32", pa.float32()),
    TensorProto.DOUBLE: ("TYPE_FP64", pa.float64()),
}

GRAPH_PATH = pathlib.Path("repo/m/1/model.onnx")


@settings(deadline=None, max_examples=60)
@given(
    elem=st.sampled_from(sorted(ELEMENT_TYPES)),
    shape=st.lists(st.one_of(st.integers(1, 5), st.sampled_from(["batch", "n"])), max_size=4),
)
def test_completion_round_trip(elem: int, shape: list[int | str]) -> None:
    """Completing from any graph gives its types and dims, and checks against it again."""
    graph = onnx.load_from_string(identity(elem, shape))
    config = complete_config(mc.ModelConfig(), graph, GRAPH_PATH)
    # Batching when the first dimension is symbolic; the dims are then the rest.
    batch = bool(shape) and isinstance(shape[0], str)
    assert config.max_batch_size == (DEFAULT_MAX_BATCH_SIZE if batch else 0)
    assert config.platform == "onnxruntime_onnx"
    want_dims = [-1 if isinstance(d, str) else d for d in shape[batch:]]
    triton, _ = ELEMENT_TYPES[elem]
    for entry in (*config.input, *config.output):
        assert mc.DataType.Name(entry.data_type) == triton
        assert list(entry.dims) == want_dims
    # A completed config agrees with its graph: completing it again changes nothing.
    assert complete_config(config, graph, GRAPH_PATH) == config


@pytest.mark.parametrize("elem", sorted(ELEMENT_TYPES))
def test_signature_element_types(tmp_path: pathlib.Path, elem: int) -> None:
    (version,) = load_model(write_model(tmp_path, "m", None, {"1": identity(elem, ("batch",))}))
    triton, arrow = ELEMENT_TYPES[elem]
    assert mc.DataType.Name(version.config.input[0].data_type) == triton
    for field in (version.inputs.field("x"), version.outputs.field("y")):
        assert field.type == arrow  # one value per entry: a primitive column
        assert meta(field) == {"datatype": triton.removeprefix("TYPE_"), "shape": "[]"}


def test_partial_config_is_completed(tmp_path: pathlib.Path) -> None:
    """A config with inputs but no outputs gets its outputs from the graph."""
    config = "\n".join(config_of("m").splitlines()[:4])
    (version,) = load_model(write_model(tmp_path, "m", config))
    assert [(o.name, list(o.dims)) for o in version.config.output] == [("y", [4])]
    assert version.max_batch_size == 4


# --------------------------------------------------------------------------------------
# A config that disagrees with its graph
# --------------------------------------------------------------------------------------

INCONSISTENT = {
    "data type": (
        config_of("m").replace(
            "TYPE_FP32 dims: [ 4 ] } ]\noutput", "TYPE_INT32 dims: [ 4 ] } ]\noutput"
        ),
        ["input 'x'", "config says TYPE_INT32", "model.onnx says TYPE_FP32"],
    ),
    "output data type": (
        config_of("m").replace(
            'output [ { name: "y" data_type: TYPE_FP32', 'output [ { name: "y" data_type: TYPE_FP16'
        ),
        ["output 'y'", "TYPE_FP16", "TYPE_FP32"],
    ),
    "dims": (
        config_of("m", dims="5"),
        ["input 'x'", "config says dims [-1, 5]", "model.onnx says [-1, 4]"],
    ),
    "rank": (
        config_of("m", dims="2, 2"),
        ["input 'x'", "[-1, 2, 2]", "[-1, 4]"],
    ),
    "reshape": (
        config_of("m").replace(
            "dims: [ 4 ] } ]\noutput", "dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]\noutput"
        ),
        ["input 'x'", "[-1, 2, 2]", "[-1, 4]"],
    ),
    "no batching": (
        config_of("m", max_batch_size=0),
        ["input 'x'", "config says dims [4]", "model.onnx says [-1, 4]"],
    ),
    "unknown input": (
        config_of("m").replace('input [ { name: "x"', 'input [ { name: "z"'),
        ["input 'z'", "not in the ONNX graph", "['x']"],
    ),
    "unknown output": (
        config_of("m").replace('output [ { name: "y"', 'output [ { name: "w"'),
        ["output 'w'", "not in the ONNX graph", "['y']"],
    ),
}


def test_config_missing_a_graph_input(tmp_path: pathlib.Path) -> None:
    """Every graph input must be configured: onnxruntime cannot run without it."""
    config = """
name: "m"
max_batch_size: 4
input [ { name: "a" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "out" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
    model_dir = write_model(tmp_path, "m", config, {"1": add_relu()})
    with pytest.raises(ModelError) as info:
        load_model(model_dir)
    message = str(info.value)
    assert str(model_dir / "1" / "model.onnx") in message
    assert "graph inputs ['b'] are not in the config's inputs (config inputs: ['a'])" in message


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_config_disagrees_with_graph(tmp_path: pathlib.Path, case: str) -> None:
    config, expected = INCONSISTENT[case]
    model_dir = write_model(tmp_path, "m", config)
    with pytest.raises(ModelError) as info:
        load_model(model_dir)
    message = str(info.value)
    assert str(model_dir / "1" / "model.onnx") in message
    for part in expected:
        assert part in message


def test_batching_needs_variable_first_dimension(tmp_path: pathlib.Path) -> None:
    """As Triton: max_batch_size > 0 with a graph whose first dimension is fixed is an error."""
    model_dir = write_model(tmp_path, "m", config_of("m"), {"1": identity(dims=(1, 4))})
    with pytest.raises(ModelError, match=r"max_batch_size 4.*model\.onnx says \[1, 4\]") as info:
        load_model(model_dir)
    assert str(model_dir / "1" / "model.onnx") in str(info.value)


def test_input_served_by_initializer_need_not_be_configured(tmp_path: pathlib.Path) -> None:
    """Graph inputs that have an initializer are weights, not inputs clients send."""
    graph = onnx_model(
        [("Add", ["x", "w"], ["y"])],
        [("x", FP32, ("batch", 4)), ("w", FP32, (4,))],
        [("y", FP32, ("batch", 4))],
    )
    graph.graph.initializer.append(helper.make_tensor("w", FP32, [4], [1.0] * 4))
    (version,) = load_model(
        write_model(tmp_path, "m", config_of("m"), {"1": graph.SerializeToString()})
    )
    assert version.inputs.names == ["x"]


# --------------------------------------------------------------------------------------
# Bad models: each a ModelError naming the file, and the others still load
# --------------------------------------------------------------------------------------


def _string_model(repo: pathlib.Path, name: str) -> pathlib.Path:
    # strings are served, but not with a variable dim after the first (no Arrow type for it)
    config = config_of(name, dims="2, -1").replace("TYPE_FP32", "TYPE_STRING")
    model = identity(TensorProto.STRING, dims=("batch", 2, "k"))
    return write_model(repo, name, config, {"1": model})


def _config_is_a_directory(repo: pathlib.Path, name: str) -> pathlib.Path:
    model_dir = write_model(repo, name, None)
    (model_dir / "config.pbtxt").mkdir()
    return model_dir


def _config_not_utf8(repo: pathlib.Path, name: str) -> pathlib.Path:
    model_dir = write_model(repo, name, None)
    (model_dir / "config.pbtxt").write_bytes(b'name: "\xff\xfe"\n')
    return model_dir


def _no_version(repo: pathlib.Path, name: str) -> pathlib.Path:
    return write_model(repo, name, config_of(name), {})


# name -> (writes the model, returns its directory; file the message names; what it says)
Writer = Callable[[pathlib.Path, str], pathlib.Path]
BAD: dict[str, tuple[Writer, str, list[str]]] = {
    "corrupt_onnx": (
        lambda r, n: write_model(r, n, config_of(n), {"1": b"not an onnx model"}),
        "1/model.onnx",
        ["not a readable ONNX model"],
    ),
    "empty_onnx": (
        lambda r, n: write_model(r, n, None, {"1": b""}),
        "1/model.onnx",
        ["not a readable ONNX model"],
    ),
    "truncated_onnx": (
        lambda r, n: write_model(r, n, config_of(n), {"1": add_relu()[:-7]}),
        "1/model.onnx",
        ["not a readable ONNX model"],
    ),
    "config_syntax": (
        lambda r, n: write_model(r, n, f'name: "{n}"\nmax_batch_size: 4\ninput [ {{ name: "x" ]\n'),
        "config.pbtxt",
        ["invalid model config", "3:"],
    ),
    "config_unknown_field": (
        lambda r, n: write_model(r, n, f'name: "{n}"\nmax_batch: 4\n'),
        "config.pbtxt",
        ["invalid model config", "2:1", "max_batch"],
    ),
    "config_bad_enum": (
        lambda r, n: write_model(r, n, config_of(n).replace("TYPE_FP32", "TYPE_FLOAT", 1)),
        "config.pbtxt",
        ["invalid model config", "TYPE_FLOAT"],
    ),
    "config_directory": (_config_is_a_directory, "config.pbtxt", ["cannot read"]),
    "config_not_utf8": (_config_not_utf8, "config.pbtxt", ["cannot read", "UTF-8"]),
    "no_version": (_no_version, "no_version", ["no version directory", "model.onnx"]),
    "string_tensor": (_string_model, "config.pbtxt", ["x", "strings", "variable dim"]),
    "bf16_tensor": (
        lambda r, n: write_model(r, n, None, {"1": identity(TensorProto.BFLOAT16)}),
        "1/model.onnx",
        ["'x'", "TYPE_BF16"],
    ),
    "complex_tensor": (
        lambda r, n: write_model(r, n, None, {"1": identity(TensorProto.COMPLEX64)}),
        "1/model.onnx",
        ["'x'", "unsupported ONNX element type"],
    ),
    "ragged_unknown": (
        lambda r, n: write_model(r, n, config_of(n, p=param("arrowinfer.ragged_inputs", "x,jets"))),
        "config.pbtxt",
        ["parameters name inputs ['jets']"],
    ),
    "mask_unknown": (
        lambda r, n: write_model(
            r,
            n,
            config_of(
                n,
                r=param("arrowinfer.ragged_inputs", "x"),
                m=param("arrowinfer.mask_input", "mask"),
            ),
        ),
        "config.pbtxt",
        ["parameters name inputs ['mask']"],
    ),
    "mask_without_ragged": (
        lambda r, n: write_model(r, n, config_of(n, m=param("arrowinfer.mask_input", "x"))),
        "config.pbtxt",
        ["arrowinfer.mask_input 'x'", "arrowinfer.ragged_inputs"],
    ),
    "ragged_variable_dims": (
        lambda r, n: write_model(
            r, n, config_of(n, dims="-1", p=param("arrowinfer.ragged_inputs", "x"))
        ),
        "config.pbtxt",
        ["input 'x'", "[-1]"],
    ),
    "pad_value": (
        lambda r, n: write_model(
            r,
            n,
            config_of(
                n,
                r=param("arrowinfer.ragged_inputs", "x"),
                p=param("arrowinfer.pad_value", "zero"),
            ),
        ),
        "config.pbtxt",
        ["arrowinfer.pad_value", "zero"],
    ),
    "other_name": (
        lambda r, n: write_model(r, n, config_of("someone_else")),
        "config.pbtxt",
        ["'someone_else'", "differs from its directory 'other_name'"],
    ),
    "tensorflow": (
        lambda r, n: write_model(
            r, n, config_of(n).replace("onnxruntime_onnx", "tensorflow_savedmodel")
        ),
        "config.pbtxt",
        ["'tensorflow_savedmodel'", "only onnxruntime_onnx"],
    ),
    "python_backend": (
        lambda r, n: write_model(
            r, n, config_of(n).replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        ),
        "config.pbtxt",
        ["backend 'python'"],
    ),
}


def _check_message(err: ModelError, repo: pathlib.Path, name: str) -> None:
    _, file, parts = BAD[name]
    message = str(err)
    path = repo / name if file == name else repo / name / file
    assert str(path) in message
    for part in parts:
        assert part in message


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_model(tmp_path: pathlib.Path, name: str) -> None:
    write, _, _ = BAD[name]
    write(tmp_path, name)
    with pytest.raises(ModelError) as info:
        Repository(tmp_path).load(name)
    _check_message(info.value, tmp_path, name)


def test_syntax_error_has_protobuf_line_and_column(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nmax_batch_size: four\n')
    with pytest.raises(ModelError) as info:
        read_config(path)
    assert re.search(rf"^{re.escape(str(path))}: invalid model config: .*2:17\b", str(info.value))


def load_each(repo: Repository) -> tuple[dict[str, list[ModelVersion]], dict[str, ModelError]]:
    """Every model of ``repo`` loaded on its own: the versions, or the error, by name."""
    loaded: dict[str, list[ModelVersion]] = {}
    failed: dict[str, ModelError] = {}
    for name in repo.names():
        try:
            loaded[name] = repo.load(name)
        except ModelError as err:
            failed[name] = err
    return loaded, failed


def test_bad_models_do_not_stop_the_good_ones_loading(tmp_path: pathlib.Path) -> None:
    for name, (write, _, _) in BAD.items():
        write(tmp_path, name)
    write_model(tmp_path, "good", config_of("good"))
    write_model(tmp_path, "good_configless", None, {"1": add_relu()})
    repo = Repository(tmp_path)
    loaded, failed = load_each(repo)
    assert sorted(loaded) == ["good", "good_configless"]
    assert [v.version for v in loaded["good"]] == [1]
    assert sorted(failed) == sorted(BAD)
    for name, err in failed.items():
        assert isinstance(err, ModelError)
        _check_message(err, tmp_path, name)


# --------------------------------------------------------------------------------------
# Names: looked up among the directories, never turned into paths
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    root = tmp_path_factory.mktemp("named")
    repo = root / "models"
    for name in ("jet_tagger", "facile", "identity"):
        write_model(repo, name, None)
    # Things beside the models that are not models
    write_model(root, "outside", None)  # a model directory outside the repository
    (repo / ".hidden").mkdir()
    (repo / "with space").mkdir()
    (repo / "README.md").write_text("not a model")
    return Repository(repo)


def test_names(named_repo: Repository) -> None:
    assert named_repo.names() == ["facile", "identity", "jet_tagger"]
    assert named_repo.model_dir("facile") == named_repo.path / "facile"


@pytest.mark.parametrize(
    "name", ["../outside", "/etc", "a/b", "", ".", "..", ".hidden", "with space", "README.md"]
)
def test_model_dir_refuses_what_is_not_a_model_name(named_repo: Repository, name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        named_repo.model_dir(name)
    assert isinstance(info.value, KeyError)
    assert info.value.model == name
    assert "facile, identity, jet_tagger" in str(info.value)
    with pytest.raises(ModelNotFound):
        named_repo.load(name)


def test_unknown_name_lists_close_matches(named_repo: Repository) -> None:
    with pytest.raises(
        ModelNotFound,
        match=r"'jet_taggr' is not served \(did you mean: jet_tagger; available: facile, ",
    ):
        named_repo.model_dir("jet_taggr")
    with pytest.raises(ModelNotFound, match=r"available: facile, identity, jet_tagger"):
        named_repo.model_dir("zzz")


@settings(deadline=None, max_examples=100)
@given(
    st.text(alphabet=st.sampled_from("abcdefijlt_./\\ -~\x00"), max_size=12) | st.text(max_size=8)
)
def test_model_dir_is_always_a_listed_model(named_repo: Repository, name: str) -> None:
    try:
        path = named_repo.model_dir(name)
    except ModelNotFound:
        assert name not in named_repo.names()
    else:
        assert name in named_repo.names()
        assert path.parent == named_repo.path
        assert path.name == name


@pytest.mark.parametrize("make", ["missing", "file"])
def test_repository_must_be_a_directory(tmp_path: pathlib.Path, make: str) -> None:
    path = tmp_path / "models"
    if make == "file":
        path.write_text("")
    with pytest.raises(ModelError, match="model repository not found") as info:
        Repository(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------
# The example repository
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[ModelVersion]]:
    repo = examples.write_example_repository(tmp_path_factory.mktemp("examples"))
    loaded, failed = load_each(Repository(repo))
    assert failed == {}
    return loaded


def test_metadata_is_kserve_model_metadata(example_models: dict[str, list[ModelVersion]]) -> None:
    [tagger] = example_models["jet_tagger"]
    meta = tagger.metadata()
    assert meta["name"] == "jet_tagger"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    # the batch dimension is -1; the mask input, filled by the server, is left out
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("points", "FP32", [-1, 100, 2]),
        ("features", "FP32", [-1, 100, 7]),
    ]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]
    assert json.loads(json.dumps(meta)) == meta  # plain JSON, as the actions send it


def test_example_repository_loads_completely(example_models: dict[str, list[ModelVersion]]) -> None:
    assert sorted(example_models) == sorted(examples.EXAMPLE_MODELS)
    for name, versions in example_models.items():
        assert [v.version for v in versions] == [1]
        config = versions[0].config
        expected = text_format.Parse(examples.config_text(name), mc.ModelConfig())
        normalize(expected)  # what Triton's normalization names: not written in the files
        assert config == expected  # the written configs are complete


def test_example_jet_tagger_signature(example_models: dict[str, list[ModelVersion]]) -> None:
    (jet,) = example_models["jet_tagger"]
    assert jet.inputs.names == ["points", "features"]  # not "mask": the server fills it
    assert jet.inputs.field("points").type == pa.list_(pa.list_(pa.float32(), 2))
    assert jet.inputs.field("features").type == pa.list_(pa.list_(pa.float32(), 7))
    assert json.loads(meta(jet.inputs.field("features"))["shape"]) == [100, 7]
    assert jet.ragged_inputs == ("features", "points")
    assert jet.mask_input == "mask"
    assert jet.pad_value == 0.0
    assert jet.max_batch_size == 1024
    assert list(jet.config.dynamic_batching.preferred_batch_size) == [64, 256]
    assert jet.outputs.names == ["probabilities"]
    assert jet.outputs.field("probabilities").type == pa.fixed_shape_tensor(pa.float32(), [5])


def test_example_signatures(example_models: dict[str, list[ModelVersion]]) -> None:
    (facile,) = example_models["facile"]
    assert facile.inputs.field("hits").type == pa.fixed_shape_tensor(pa.float32(), [15])
    energy = facile.outputs.field("energy")
    assert energy.type == pa.float32()  # dims [1]: one value per entry
    assert meta(energy) == {"datatype": "FP32", "shape": "[1]"}
    (cnn,) = example_models["toptag_cnn"]
    assert cnn.inputs.field("image").type == pa.fixed_shape_tensor(pa.float32(), [1, 37, 37])
    assert cnn.parameter("intra_op_thread_count") == "2"
    (ident,) = example_models["identity"]
    assert ident.inputs.field("INPUT0").type == pa.fixed_shape_tensor(pa.float32(), [1024])
    assert ident.outputs.names == ["OUTPUT0"]
    assert ident.inputs.metadata == {b"model": b"identity", b"version": b"1"}


def test_sequence_models_are_refused(tmp_path: pathlib.Path) -> None:
    """A sequence (stateful) model is not served as if it were stateless."""
    config = config_of("seq", f="sequence_batching { max_sequence_idle_microseconds: 5000 }")
    with pytest.raises(ModelError, match=r"config\.pbtxt: sequence_batching: .*sequence"):
        load_model(write_model(tmp_path, "seq", config))
    (version,) = load_model(write_model(tmp_path, "plain", config_of("plain")))
    assert version.name == "plain"


def test_model_metadata_lists_every_served_version(tmp_path: pathlib.Path) -> None:
    """Triton's model metadata: ``versions`` are the ready versions a client may ask for,
    all of them when no version is asked, the one asked for otherwise; on every front end."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from arrowinfer.client import Client
    from arrowinfer.server import Server

    policy = "version_policy: { all { } }"
    versions = {"1": identity(), "2": identity(), "10": identity()}
    write_model(tmp_path, "m", config_of("m", policy=policy), versions)
    with Server(tmp_path, port=0, kserve_port=0, http_port=0, metrics_port=None) as server:
        with th.InferenceServerClient(f"127.0.0.1:{server.http_port}") as http_client:
            assert http_client.get_model_metadata("m")["versions"] == ["1", "2", "10"]
            assert http_client.get_model_metadata("m", "2")["versions"] == ["2"]
        with tg.InferenceServerClient(f"127.0.0.1:{server.kserve_port}") as grpc_client:
            assert grpc_client.get_model_metadata("m").versions == ["1", "2", "10"]
            assert grpc_client.get_model_metadata("m", "1").versions == ["1"]
        for url in (server.location, "local"):  # and in-process
            with Client(url, fallback="local", repository=tmp_path) as client:
                assert client.metadata("m")["versions"] == ["1", "2", "10"]
                assert client.metadata("m", version=2)["versions"] == ["2"]
