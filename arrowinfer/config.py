"""Triton's ``ModelConfig`` for ONNX models: read, completed from the graph, checked.

A ``config.pbtxt`` is parsed with the generated classes tritonclient ships (never by hand).
What it leaves out is completed from the ONNX graph as Triton's auto-complete does; what it
says is checked against the graph; fields arrowinfer does not implement are named
(:func:`unimplemented_fields`), and those a model's results depend on are refused.
:mod:`arrowinfer.repository` uses these to load model versions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnx
from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from .errors import ModelError
from .schema import datatype

__all__ = [
    "BATCH_INPUT_KINDS",
    "DEFAULT_MAX_BATCH_SIZE",
    "BatchInput",
    "ModelConfig",
    "check_priorities",
    "complete_config",
    "config_json",
    "dims_text",
    "graph_io",
    "ragged_batching",
    "read_config",
    "unimplemented_fields",
]

ModelConfig: TypeAlias = mc.ModelConfig

#: Triton's default when it completes a batching model's config from the model file.
DEFAULT_MAX_BATCH_SIZE = 4

_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}


#: Triton's ``batch_input`` kinds that are served (the ones ragged batching needs).
BATCH_INPUT_KINDS = (
    "BATCH_ELEMENT_COUNT",
    "BATCH_ACCUMULATED_ELEMENT_COUNT",
    "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO",
    "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE",
)


@dataclass(frozen=True)
class BatchInput:
    """One of Triton's ``batch_input``: a tensor the server makes for each batch.

    ``kind`` is one of :data:`BATCH_INPUT_KINDS`; ``target`` the model input it fills;
    ``dtype`` its numpy type; ``source`` the ragged-batch input whose element counts (per
    row: the number of values of that row) it describes. For a batch of B rows with
    counts ``c``: ``BATCH_ELEMENT_COUNT`` is ``c`` ([B]), ``..._ACCUMULATED_...`` is
    ``cumsum(c)`` ([B]), ``..._WITH_ZERO`` is ``[0, *cumsum(c)]`` ([B + 1], the offsets
    of each row's values), ``BATCH_MAX_ELEMENT_COUNT_AS_SHAPE`` has shape ``[max(c)]``
    (its values are zeros; only its shape says something).
    """

    kind: str
    target: str
    dtype: np.dtype
    source: str


def dims_text(dims: object) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"  # type: ignore[attr-defined]


def read_config(path: Path) -> ModelConfig:
    """Parse one ``config.pbtxt`` into Triton's ``ModelConfig``.

    Raises
    ------
    ModelError
        Naming the file and protobuf's complaint (line and column).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ModelError(f"{path}: cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: cannot read: not UTF-8 text ({err})") from err
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as err:
        raise ModelError(f"{path}: invalid model config: {err}") from err


def graph_io(
    model: onnx.ModelProto,
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Required inputs, outputs, and inputs with a default (an initializer of the same name)."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    defaults = [v for v in model.graph.input if v.name in initializers]
    return inputs, list(model.graph.output), defaults


def _onnx_dims(value: onnx.ValueInfoProto) -> list[int]:
    """Dims of an ONNX tensor, -1 for symbolic or unknown ones."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]


def _onnx_type(value: onnx.ValueInfoProto, path: Path) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in _ONNX_TO_TRITON:
        raise ModelError(f"{path}: tensor {value.name!r} has unsupported ONNX element type {elem}")
    return _ONNX_TO_TRITON[elem]


def complete_config(config: ModelConfig, model: onnx.ModelProto, path: Path) -> ModelConfig:
    """Fill in what a config leaves out from the ONNX graph, and check the rest against it.

    Like Triton's auto-complete: missing inputs and outputs are taken from the graph, and a
    graph whose tensors all have a variable first dimension gets batching
    (``max_batch_size`` :data:`DEFAULT_MAX_BATCH_SIZE`) when the config does not say.

    Raises
    ------
    ModelError
        When the config and the graph disagree: naming the file, the tensor and both values.
    """
    config = mc.ModelConfig.FromString(config.SerializeToString())
    graph_inputs, graph_outputs, defaults = graph_io(model)
    all_tensors = graph_inputs + graph_outputs
    if not config.input and not config.output and not config.max_batch_size:
        batchable = all(_onnx_dims(v)[:1] == [-1] for v in all_tensors)
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
    if not config.platform and not config.backend:
        config.platform = "onnxruntime_onnx"
    batch = 1 if config.max_batch_size > 0 else 0
    # Ragged-batch inputs reach the model concatenated (1-D, no batch dimension), and
    # batch inputs are made by the server: neither has the batch dimension of the others.
    ragged_batch = {e.name for e in config.input if e.allow_ragged_batch}
    targets = {t for b in config.batch_input for t in b.target_name}
    for kind, graph, entries in (
        ("input", graph_inputs, config.input),
        ("output", graph_outputs, config.output),
    ):
        # an input with a default (an initializer) may be named too; it is then optional
        by_name = {v.name: v for v in graph + (defaults if kind == "input" else [])}
        if batch:
            for value in graph:
                if kind == "input" and value.name in ragged_batch | targets:
                    continue
                if _onnx_dims(value)[:1] != [-1]:
                    raise ModelError(
                        f"{path}: {kind} {value.name!r}: config says max_batch_size "
                        f"{config.max_batch_size}, which needs a variable first dimension, "
                        f"model.onnx says {dims_text(_onnx_dims(value))}"
                    )
        if not entries:
            for value in graph:
                if kind == "input" and value.name in targets:
                    continue
                entry = entries.add()
                entry.name = value.name
                entry.data_type = mc.DataType.Value(_onnx_type(value, path))
                entry.dims.extend(_onnx_dims(value)[batch:])
            continue
        for entry in entries:
            if entry.name not in by_name:
                raise ModelError(
                    f"{path}: config {kind} {entry.name!r} is not in the ONNX graph "
                    f"(graph {kind}s: {sorted(by_name)})"
                )
            value = by_name[entry.name]
            if kind == "input" and value in defaults and not entry.optional:
                entry.optional = True  # the graph has its value when a request has none
            graph_type = _onnx_type(value, path)
            config_type = mc.DataType.Name(entry.data_type)
            if graph_type != config_type:
                raise ModelError(
                    f"{path}: {kind} {entry.name!r}: config says {config_type}, "
                    f"model.onnx says {graph_type}"
                )
            graph_dims = _onnx_dims(value)
            if kind == "input" and entry.name in ragged_batch:
                if len(graph_dims) != 1:
                    raise ModelError(
                        f"{path}: input {entry.name!r} has allow_ragged_batch, so the model "
                        f"takes it concatenated as one 1-D tensor; model.onnx says "
                        f"{dims_text(graph_dims)}"
                    )
                continue
            dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
            want = ([-1] if batch else []) + dims
            if len(graph_dims) != len(want) or any(
                g not in (-1, w) and w != -1 for g, w in zip(graph_dims, want, strict=True)
            ):
                raise ModelError(
                    f"{path}: {kind} {entry.name!r}: config says dims {dims_text(want)} "
                    f"(batch dimension included as -1), model.onnx says {dims_text(graph_dims)}"
                )
        missing = sorted({v.name for v in graph} - {e.name for e in entries} - targets)
        if kind == "input" and missing:
            raise ModelError(
                f"{path}: graph inputs {missing} are not in the config's inputs "
                f"(config inputs: {sorted(e.name for e in entries)})"
            )
    _normalize(config)
    return config


def _normalize(config: ModelConfig) -> None:
    """Fill in what Triton's model-config normalization does, so that clients reading the
    config find the fields they read from Triton's (``preferred_batch_size`` is what
    coffea's triton_wrapper takes as the batch size). None of it changes how the model is
    served: a preferred size of ``max_batch_size`` batches as no preferred size does."""
    if config.platform == "onnxruntime_onnx" and not config.backend:
        config.backend = "onnxruntime"
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if not config.default_model_filename:
        config.default_model_filename = "model.onnx"
    if not config.instance_group:  # one instance on the CPU: what is served without one
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{i}"
    batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
    if batching and not config.dynamic_batching.preferred_batch_size:
        config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)


#: The ModelConfig fields arrowinfer implements, per message (the rest: see unimplemented_fields).
_SUPPORTED: dict[str, set[str]] = {
    "ModelConfig": {
        "name",
        "platform",
        "backend",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "default_model_filename",
        "parameters",
        "model_warmup",
        "batch_input",
        "model_repository_agents",  # Triton's checksum agent: repository.check_repository_agents
    },
    "ModelInput": {"name", "data_type", "dims", "reshape", "optional", "allow_ragged_batch"},
    "ModelOutput": {"name", "data_type", "dims", "reshape", "label_filename"},
    "ModelDynamicBatching": {
        "preferred_batch_size",
        "max_queue_delay_microseconds",
        "preserve_ordering",  # always: results come back in request order
        "priority_levels",
        "default_priority_level",
        "default_queue_policy",
        "priority_queue_policy",
    },
    "ModelInstanceGroup": {"name", "kind", "count"},
}

#: Fields whose meaning a model's results depend on: refused rather than ignored.
_REFUSED: dict[str, str] = {
    "sequence_batching": "stateful models need Triton's sequence batcher, which arrowinfer "
    "does not have",
    "ensemble_scheduling": "ensembles are not served",
    "model_transaction_policy": "decoupled models (several responses per request) are not served",
}


def unimplemented_fields(config: ModelConfig, path: Path) -> list[str]:
    """The fields of ``config`` that arrowinfer does not implement (dotted paths).

    Raises
    ------
    ModelError
        For a field in :data:`_REFUSED` (a model that would give wrong results without it).
    """
    for name, why in _REFUSED.items():
        if config.HasField(name) and (
            name != "model_transaction_policy" or config.model_transaction_policy.decoupled
        ):
            raise ModelError(f"{path}: {name}: {why}")
    ignored: list[str] = []

    def walk(message: Any, prefix: str) -> None:
        supported = _SUPPORTED.get(message.DESCRIPTOR.name)
        for descriptor, value in message.ListFields():
            where = f"{prefix}{descriptor.name}"
            if descriptor.name == "model_transaction_policy":
                continue  # not decoupled: nothing to do
            if descriptor.name == "format" and value == mc.ModelInput.FORMAT_NONE:
                continue
            if supported is not None and descriptor.name not in supported:
                ignored.append(where)
            elif descriptor.message_type is not None and descriptor.message_type.name in _SUPPORTED:
                items = [value] if hasattr(value, "DESCRIPTOR") else value  # repeated or one
                for item in items:
                    walk(item, where + ".")

    walk(config, "")
    return sorted(set(ignored))


def check_priorities(config: ModelConfig, path: Path) -> None:
    dynamic = config.dynamic_batching
    levels = dynamic.priority_levels
    if levels and not 1 <= dynamic.default_priority_level <= levels:
        raise ModelError(
            f"{path}: dynamic_batching.default_priority_level must be in 1..{levels} "
            f"(priority_levels), got {dynamic.default_priority_level}"
        )
    beyond = sorted(k for k in dynamic.priority_queue_policy if not 1 <= k <= max(levels, 0))
    if beyond:
        raise ModelError(
            f"{path}: dynamic_batching.priority_queue_policy has levels {beyond} beyond "
            f"priority_levels {levels}"
        )


def ragged_batching(
    config: ModelConfig, config_path: Path
) -> tuple[tuple[str, ...], tuple[BatchInput, ...]]:
    """The ``allow_ragged_batch`` inputs and the ``batch_input`` entries of a config.

    Raises
    ------
    ModelError
        Ragged batching without batching, a batch input of a kind not served, without
        exactly one target, with a source that is not a ragged-batch input, or of a data
        type other than INT32, INT64 or FP32.
    """
    ragged = tuple(e.name for e in config.input if e.allow_ragged_batch)
    if ragged and config.max_batch_size <= 0:
        raise ModelError(
            f"{config_path}: allow_ragged_batch on {list(ragged)} needs batching "
            "(max_batch_size > 0)"
        )
    out = []
    for entry in config.batch_input:
        kind = mc.BatchInput.Kind.Name(entry.kind)
        where = f"{config_path}: batch_input {list(entry.target_name)}"
        if kind not in BATCH_INPUT_KINDS:
            raise ModelError(f"{where}: kind {kind} is not served (served: {BATCH_INPUT_KINDS})")
        if len(entry.target_name) != 1 or len(entry.source_input) != 1:
            raise ModelError(f"{where}: give exactly one target_name and one source_input")
        (source,) = entry.source_input
        if source not in ragged:
            raise ModelError(
                f"{where}: source_input {source!r} is not an input with allow_ragged_batch "
                f"(those are {list(ragged)})"
            )
        type_name = mc.DataType.Name(entry.data_type)
        if type_name not in ("TYPE_INT32", "TYPE_INT64", "TYPE_FP32"):
            raise ModelError(f"{where}: data_type {type_name}: use TYPE_INT32, INT64 or FP32")
        dtype = datatype(type_name).numpy
        out.append(BatchInput(kind, entry.target_name[0], dtype, source))
    return ragged, tuple(out)


#: MessageToDict's option to write fields at their default values (renamed in protobuf 5.26).
_WITH_DEFAULTS = (
    "always_print_fields_with_no_presence"
    if "always_print_fields_with_no_presence"
    in inspect.signature(json_format.MessageToDict).parameters
    else "including_default_value_fields"
)


def config_json(config: ModelConfig) -> dict[str, Any]:
    """A model config as Triton's HTTP endpoint writes it: protobuf's JSON names
    (``preserving_proto_field_name``), every scalar, list and map field even at its default
    (``"max_batch_size": 0``, ``"optional": false``: clients index them), and 64-bit
    integers as numbers (``"dims": [15]``; protobuf writes ``["15"]``,
    triton-inference-server/server#1664). The server and the in-process fallback give the
    same.
    """
    options: dict[str, Any] = {"preserving_proto_field_name": True, _WITH_DEFAULTS: True}
    return _json_numbers(config, json_format.MessageToDict(config, **options))


_INT64 = frozenset(
    (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    )
)


def _json_numbers(message: Message, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` (``message`` as protobuf's ``MessageToDict`` gives it) with its 64-bit
    integers as JSON numbers, in place: protobuf writes them as strings (``"dims":
    ["15"]``), Triton as numbers (triton-inference-server/server#1664)."""
    for field in message.DESCRIPTOR.fields:
        if field.name not in value:
            continue
        got, text = getattr(message, field.name), value[field.name]
        repeated = isinstance(text, list)  # a repeated field is a JSON list, a map an object
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            for key, sub in got.items():  # JSON's keys are strings (map<uint64, ...> too)
                if entry.type in _INT64:
                    text[str(key)] = int(text[str(key)])
                elif entry.message_type is not None:
                    _json_numbers(sub, text[str(key)])
        elif field.message_type is not None:
            for sub, sub_text in zip(got, text, strict=True) if repeated else [(got, text)]:
                _json_numbers(sub, sub_text)
        elif field.type in _INT64:
            value[field.name] = [int(v) for v in text] if repeated else int(text)
    return value
