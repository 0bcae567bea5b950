"""A model repository in Triton's layout: ``REPO/<model>/config.pbtxt``, ``REPO/<model>/<version>/model.onnx``.

``config.pbtxt`` is Triton's ``ModelConfig`` in protobuf text format, parsed with the
generated classes that tritonclient ships, so an existing Triton repository of ONNX models
serves unchanged. A model without ``config.pbtxt`` gets its config completed from the ONNX
graph, as Triton does with strict model config off; a config that disagrees with the graph
is an error naming the file, the tensor and both values.
(Reading, completing and checking a config is :mod:`arrowinfer.config`.)

arrowinfer's own settings live in the config's ``parameters`` map:

``arrowinfer.ragged_inputs``
    Comma-separated inputs that clients send as a list per batch entry (jets, particles,
    hits); the server pads or truncates each entry to the model's first per-entry dimension.
``arrowinfer.mask_input``
    A model input the server fills with 1 where an entry has an item and 0 in the padding;
    clients do not send it.
``arrowinfer.pad_value``
    The value padding is filled with (default 0).
``arrowinfer.max_request_rows``
    The most rows (events, jets, ...) one request may have (default: no limit); a bigger
    request is refused with ``InvalidInput`` before it is queued.
``arrowinfer.warmup``
    ``false`` skips the warm-up run a model without ``model_warmup`` gets at load (one
    entry of zeros per instance; see :func:`default_warmup`).

Triton's onnxruntime-backend parameters ``intra_op_thread_count`` and
``inter_op_thread_count`` are honoured as well.

Names a client sends are looked up among the models found on disk; they never become paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2 as mc

from .config import (
    BATCH_INPUT_KINDS,
    DEFAULT_MAX_BATCH_SIZE,
    BatchInput,
    ModelConfig,
    check_priorities,
    complete_config,
    dims_text,
    graph_io,
    ragged_batching,
    read_config,
    unimplemented_fields,
)
from .errors import ModelError, ModelNotFound
from .schema import TensorSpec, datatype, signature, tensor_specs

__all__ = [
    "BATCH_INPUT_KINDS",
    "DEFAULT_MAX_BATCH_SIZE",
    "BatchInput",
    "ModelConfig",
    "ModelVersion",
    "Repository",
    "complete_config",
    "default_warmup",
    "load_model",
    "read_config",
    "warmup_requests",
]

log = logging.getLogger(__name__)

#: What a model directory may be called (names clients send are looked up, never paths).
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelVersion:
    """One loadable version of a model: its config, its ONNX file and its Arrow signatures.

    ``inputs`` is what clients send (ragged inputs as lists, without the mask input the
    server fills); ``outputs`` is what they get back. ``ragged_batch_inputs`` are the
    inputs with Triton's ``allow_ragged_batch``: the requests' values are concatenated
    without padding into one 1-D tensor, described to the model by ``batch_inputs``
    (which the server computes; clients never send them).
    """

    name: str
    version: int
    path: Path
    config: ModelConfig = field(repr=False)
    inputs: pa.Schema = field(repr=False)
    outputs: pa.Schema = field(repr=False)
    ragged_inputs: tuple[str, ...] = ()
    mask_input: str | None = None
    pad_value: float = 0.0
    max_request_rows: int | None = None
    ragged_batch_inputs: tuple[str, ...] = ()
    batch_inputs: tuple[BatchInput, ...] = ()
    #: The lines of each output's ``label_filename``, for the classification extension.
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    sha256: str = ""  # of the model file (hex): every result names the file that made it

    # read once: every request reads them (a protobuf field; tensor_specs parses metadata)
    @cached_property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size)

    @cached_property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """What :attr:`inputs` was made from, in its order."""
        return tuple(tensor_specs(self.inputs))

    @cached_property
    def mask_spec(self) -> TensorSpec | None:
        """The mask input (:attr:`mask_input`) as the config declares it; None without one.
        Not in :attr:`inputs` (the server fills it), but KServe clients may send it."""
        entries = [e for e in self.config.input if e.name == self.mask_input]
        return _specs(entries, set())[0] if entries else None

    @cached_property
    def dense_inputs(self) -> bool:
        """Whether every input is a dense number tensor: no strings, no ragged inputs (so
        no mask), no ragged batching. Such a model takes KServe's tensors as they are
        (:class:`arrowinfer.dense.DenseBatch`); the others need the Arrow path."""
        return not (
            self.ragged_inputs or self.mask_input or self.ragged_batch_inputs or self.batch_inputs
        ) and all(s.datatype.kserve != "BYTES" for s in self.input_specs)

    @cached_property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """What :attr:`outputs` was made from, in its order."""
        return tuple(tensor_specs(self.outputs))

    def parameter(self, key: str, default: str | None = None) -> str | None:
        """A value of the config's ``parameters`` map."""
        if key in self.config.parameters:
            return str(self.config.parameters[key].string_value)
        return default

    def metadata(self, *, mask: bool = False) -> dict[str, Any]:
        """KServe's ``ModelMetadata`` of this version as JSON.

        Parameters
        ----------
        mask
            List the ``arrowinfer.mask_input`` too. KServe clients send ragged inputs padded
            and may send the mask with them; Flight clients send lists and never the mask
            (the server fills it), so it is left out by default.

        Returns
        -------
        dict
            ``{"name", "versions": [str], "platform", "inputs", "outputs"}``; each tensor is
            ``{"name", "datatype": "FP32"..., "shape": [int]}`` with -1 for the batch
            dimension of a batching model.
        """
        batch = [-1] if self.max_batch_size > 0 else []

        def tensors(entries: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": e.name,
                    "datatype": datatype(mc.DataType.Name(e.data_type)).kserve,
                    "shape": batch + list(e.dims),
                }
                for e in entries
            ]

        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": self.config.platform or "onnxruntime_onnx",
            "inputs": tensors(c for c in self.config.input if mask or c.name != self.mask_input),
            "outputs": tensors(self.config.output),
        }


def _versions(model_dir: Path, config: ModelConfig) -> list[int]:
    """The versions a config's version_policy selects among the version directories."""
    filename = config.default_model_filename or "model.onnx"
    found = sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.name.isascii() and p.name.isdigit() and (p / filename).is_file()
    )
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        chosen = found
    elif which == "specific":
        missing = sorted(set(policy.specific.versions) - set(found))
        if missing:
            raise ModelError(
                f"{model_dir}: version_policy asks for versions {missing}, which have no {filename}"
            )
        chosen = sorted(policy.specific.versions)
    else:
        latest = policy.latest.num_versions if which == "latest" else 1
        chosen = found[-max(latest, 1) :]
    if not chosen:
        raise ModelError(f"{model_dir}: no version directory with a {filename} (e.g. 1/{filename})")
    return chosen


def _parameters(config: ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _specs(entries: object, ragged: set[str]) -> list[TensorSpec]:
    out = []
    for entry in entries:  # type: ignore[attr-defined]
        try:
            dt = datatype(mc.DataType.Name(entry.data_type))
        except TypeError as err:
            raise TypeError(f"tensor {entry.name!r}: {err}") from None
        out.append(
            TensorSpec(
                entry.name,
                dt,
                tuple(entry.dims),
                ragged=entry.name in ragged,
                optional=bool(getattr(entry, "optional", False)),
            )
        )
    return out


def _mark_ragged_batch(schema: pa.Schema, names: tuple[str, ...]) -> pa.Schema:
    """Mark ragged-batch inputs (field metadata ``ragged: batch``): a list per row, of any
    length, which requests need not agree on (see :func:`arrowinfer.schema.validate`)."""
    for name in names:
        i = schema.get_field_index(name)
        field = schema.field(i)
        schema = schema.set(i, field.with_metadata({**(field.metadata or {}), b"ragged": b"batch"}))
    return schema


def _labels(model_dir: Path, filename: str) -> tuple[str, ...]:
    """One label per line of an output's ``label_filename`` (in the model's directory)."""
    path = model_dir / filename
    if path.name != filename or not path.is_file():
        raise ModelError(
            f"{model_dir / 'config.pbtxt'}: label_filename {filename!r}: no such file in "
            f"{model_dir}"
        )
    try:
        return tuple(path.read_text().splitlines())
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read the labels: {err}") from err


def check_repository_agents(config: ModelConfig, model_dir: Path) -> None:
    """Run the config's ``model_repository_agents`` before the model loads, as Triton does.

    Only Triton's ``checksum`` agent exists here: each parameter ``MD5:<file>`` (the file
    relative to the model directory, the algorithm in any case) gives the file's expected
    MD5 as lowercase hex (what CMS's model tools write). Any other agent is refused, as
    Triton refuses an agent it has no library for: loading without it could serve files
    nobody checked.

    Raises
    ------
    ModelError
        An unknown agent or algorithm, a file outside the model directory or missing, or a
        checksum that differs (naming the file and both sums).
    """
    config_path = model_dir / "config.pbtxt"
    root = model_dir.resolve()
    for agent in config.model_repository_agents.agents:
        if agent.name != "checksum":
            raise ModelError(
                f"{config_path}: model_repository_agents: agent {agent.name!r} is not "
                "available (arrowinfer runs Triton's 'checksum' agent only)"
            )
        for key, expected in sorted(agent.parameters.items()):
            algorithm, _, name = key.partition(":")
            where = f"{config_path}: model_repository_agents: checksum {key!r}"
            if algorithm.lower() != "md5" or not name:
                raise ModelError(f"{where}: expected 'MD5:<file in the model directory>'")
            path = (model_dir / name).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                raise ModelError(f"{where}: no such file in the model directory")
            digest = hashlib.md5(usedforsecurity=False)
            with path.open("rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != expected:
                raise ModelError(
                    f"{where}: the file's MD5 differs (expected {expected}, "
                    f"got {digest.hexdigest()})"
                )


def load_model(model_dir: Path) -> list[ModelVersion]:
    """Read one model's config and the versions its version policy selects.

    Raises
    ------
    ModelError
        For an unreadable or invalid config, a sequence model (``sequence_batching``), a
        corrupt ONNX file, a config that disagrees with the graph, an unsupported data
        type or no version to serve; the message names the file and the problem.
    """
    config_path = model_dir / "config.pbtxt"
    config = read_config(config_path) if config_path.exists() else mc.ModelConfig()
    if config.name and config.name != model_dir.name:
        raise ModelError(
            f"{config_path}: name {config.name!r} differs from its directory {model_dir.name!r}"
        )
    config.name = model_dir.name
    ragged_batch, batch_inputs = ragged_batching(config, config_path)
    if config.backend not in ("", "onnxruntime") or config.platform not in ("", "onnxruntime_onnx"):
        raise ModelError(
            f"{config_path}: platform {config.platform!r} / backend {config.backend!r} is not "
            "served here (only onnxruntime_onnx)"
        )
    check_repository_agents(config, model_dir)
    ignored = unimplemented_fields(config, config_path)
    if ignored:
        log.warning(
            "%s: arrowinfer does not implement config field(s) %s; they are ignored "
            "(docs/model-config.md)",
            config_path,
            ", ".join(ignored),
        )
    check_priorities(config, config_path)
    versions = []
    for number in _versions(model_dir, config):
        path = model_dir / str(number) / (config.default_model_filename or "model.onnx")
        try:
            graph = onnx.load(str(path), load_external_data=False)
        except (OSError, DecodeError, ValueError) as err:
            raise ModelError(f"{path}: not a readable ONNX model: {err}") from err
        if not graph.HasField("graph") or not graph.graph.output:
            # Protobuf parses an empty file (and some garbage) as an empty ModelProto.
            raise ModelError(f"{path}: not a readable ONNX model: no graph with outputs")
        full = complete_config(config, graph, path)
        params = _parameters(full)
        ragged = {
            n.strip() for n in params.get("arrowinfer.ragged_inputs", "").split(",") if n.strip()
        }
        mask = params.get("arrowinfer.mask_input") or None
        names = {i.name for i in full.input}
        unknown = sorted((ragged | ({mask} if mask else set())) - names)
        if unknown:
            raise ModelError(
                f"{config_path}: parameters name inputs {unknown} that the model does not have"
            )
        if mask and not ragged:
            raise ModelError(
                f"{config_path}: arrowinfer.mask_input {mask!r} needs arrowinfer.ragged_inputs"
            )
        optional = {e.name for e in full.input if e.optional}
        if optional & (ragged | {mask}):
            raise ModelError(
                f"{config_path}: ragged or mask inputs {sorted(optional & (ragged | {mask}))} "
                "cannot be optional"
            )
        required = {v.name for v in graph_io(graph)[0]}
        for name in sorted(optional & required):
            log.warning(
                "%s: input %r is optional in the config, but the ONNX graph has no default "
                "for it: a request without it will fail in onnxruntime",
                config_path,
                name,
            )
        for entry in full.input:
            if (entry.name in ragged or entry.name == mask) and (
                not entry.dims or any(d < 0 for d in entry.dims)
            ):
                raise ModelError(
                    f"{config_path}: input {entry.name!r}: a ragged or mask input needs fixed "
                    f"dims to pad to, config says {dims_text(entry.dims)}"
                )
        try:
            inputs = signature(
                [s for s in _specs(full.input, ragged) if s.name != mask],
                metadata={"model": full.name, "version": str(number)},
            )
            outputs = signature(_specs(full.output, set()))
            inputs = _mark_ragged_batch(inputs, ragged_batch)
        except TypeError as err:
            source = config_path if config_path.exists() else path
            raise ModelError(f"{source}: {err}") from err
        try:
            pad_value = float(params.get("arrowinfer.pad_value", "0"))
        except ValueError as err:
            raise ModelError(f"{config_path}: arrowinfer.pad_value: {err}") from err
        max_rows_text = params.get("arrowinfer.max_request_rows", "").strip()
        try:
            max_request_rows = int(max_rows_text) if max_rows_text else None
            if max_request_rows is not None and max_request_rows < 1:
                raise ValueError(f"must be at least 1, got {max_request_rows}")
        except ValueError as err:
            raise ModelError(f"{config_path}: arrowinfer.max_request_rows: {err}") from err
        labels = {
            o.name: _labels(model_dir, o.label_filename) for o in full.output if o.label_filename
        }
        versions.append(
            ModelVersion(
                name=full.name,
                version=number,
                path=path,
                config=full,
                inputs=inputs,
                outputs=outputs,
                ragged_inputs=tuple(sorted(ragged)),
                mask_input=mask,
                ragged_batch_inputs=ragged_batch,
                batch_inputs=batch_inputs,
                pad_value=pad_value,
                max_request_rows=max_request_rows,
                labels=labels,
                sha256=file_sha256(path),
            )
        )
    return versions


def warmup_requests(version: ModelVersion) -> list[tuple[str, int, pa.RecordBatch]]:
    """The config's ``model_warmup`` samples as requests: ``(name, runs, batch)``.

    As Triton defines them: ``batch_size`` rows (one entry for a model without batching),
    each input's ``dims``, and its data ``zero_data``, ``random_data`` or
    ``input_data_file`` (raw little-endian values, row-major, in the model directory's
    ``warmup/`` folder; one entry's worth, repeated for every row). ``count`` runs (at
    least one). A ragged input is sent at full length; the mask input is the server's.

    Raises
    ------
    ModelError
        A sample that names unknown inputs, has another data type, or a missing or
        wrongly sized file.
    """
    from .schema import to_column
    from .tensors import Ragged

    config_path = version.path.parent.parent / "config.pbtxt"
    fields = {f.name: f for f in version.inputs}
    rng = np.random.default_rng(0)
    out = []
    for sample in version.config.model_warmup:
        where = f"{config_path}: model_warmup {sample.name!r}"
        rows = max(int(sample.batch_size), 1)
        names, columns = [], []
        for name, spec in sample.inputs.items():
            if name == version.mask_input:
                continue
            if name not in fields:
                raise ModelError(f"{where}: no input {name!r} (inputs: {sorted(fields)})")
            try:
                dt = datatype(mc.DataType.Name(spec.data_type)).numpy
            except TypeError as err:
                raise ModelError(f"{where}: input {name!r}: {err}") from None
            want = fields[name].metadata[b"datatype"].decode()
            if datatype(dt).kserve != want:
                raise ModelError(
                    f"{where}: input {name!r} is {want}, the sample says "
                    f"{mc.DataType.Name(spec.data_type)}"
                )
            dims = tuple(int(d) for d in spec.dims)
            if any(d < 0 for d in dims):
                raise ModelError(f"{where}: input {name!r}: dims must be concrete, got {dims}")
            which = spec.WhichOneof("input_data_type")
            size = int(np.prod(dims))
            if dt == object:  # strings: empty ones (files of strings are not read here)
                if which == "input_data_file":
                    raise ModelError(f"{where}: input {name!r}: input_data_file of strings")
                entry = np.full(dims, "", dtype=object)
            elif which == "input_data_file":
                path = version.path.parent.parent / "warmup" / spec.input_data_file
                if path.name != spec.input_data_file or not path.is_file():
                    raise ModelError(f"{where}: input {name!r}: no file warmup/{path.name}")
                one = np.fromfile(path, dtype=dt.newbyteorder("<")).astype(dt, copy=False)
                if one.size != size:
                    raise ModelError(
                        f"{where}: input {name!r}: {path} has {one.size} values, dims "
                        f"{list(dims)} need {size}"
                    )
                entry = one.reshape(dims)
            elif which == "random_data" and dt.kind == "f":
                entry = rng.standard_normal(dims).astype(dt)
            elif which == "random_data":
                entry = rng.integers(0, 2 if dt.kind == "b" else 100, dims).astype(dt)
            else:
                entry = np.zeros(dims, dtype=dt)
            data = np.ascontiguousarray(np.broadcast_to(entry, (rows, *dims)))
            field = fields[name]
            if name in version.ragged_inputs:
                offsets = np.arange(rows + 1, dtype=np.int32) * (dims[0] if dims else 1)
                columns.append(to_column(field, Ragged(offsets, data.reshape(-1, *dims[1:]))))
            else:
                columns.append(to_column(field, data))
            names.append(name)
        if not columns:
            raise ModelError(f"{where}: no inputs")
        out.append(
            (sample.name, max(int(sample.count), 1), pa.RecordBatch.from_arrays(columns, names))
        )
    return out


def default_warmup(version: ModelVersion) -> pa.RecordBatch:
    """One entry of zeros for every required input (``-1`` dims of size 1).

    The first onnxruntime run of a session costs hundreds of milliseconds (it sets up its
    kernels, memory arena and threads); run at load, it is not a client's first request.
    """
    from .schema import to_column
    from .tensors import Ragged

    names, columns = [], []
    for column_field, spec in zip(version.inputs, version.input_specs, strict=True):
        if spec.optional:
            continue
        dims = tuple(1 if d < 0 else d for d in spec.shape)
        data = np.zeros((1, *dims), dtype=spec.datatype.numpy)
        if data.dtype == object:
            data[...] = ""  # a string tensor of empty strings
        if spec.ragged:
            offsets = np.array([0, dims[0]], dtype=np.int32)
            columns.append(to_column(column_field, Ragged(offsets, data.reshape(-1, *dims[1:]))))
        else:
            columns.append(to_column(column_field, data))
        names.append(column_field.name)
    return pa.RecordBatch.from_arrays(columns, names)


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in blocks (models can be large)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    except OSError as err:
        raise ModelError(f"{path}: cannot read: {err.strerror or err}") from err
    return digest.hexdigest()


class Repository:
    """The models of one repository directory, found by listing it (never by client paths).

    Parameters
    ----------
    path
        The repository directory: one sub-directory per model.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelError(f"{self.path}: model repository not found (not a directory)")

    def names(self) -> list[str]:
        """The model directories in the repository, sorted."""
        return sorted(
            p.name
            for p in self.path.iterdir()
            if p.is_dir() and _NAME.match(p.name) and not p.name.startswith(".")
        )

    def model_dir(self, name: str) -> Path:
        """The directory of a model, looked up among :meth:`names`.

        Raises
        ------
        ModelNotFound
            For any name that is not a model directory here (including ``..`` and paths).
        """
        names = self.names()
        if name not in names:
            raise ModelNotFound(name, names)
        return self.path / name

    def load(self, name: str) -> list[ModelVersion]:
        """Load one model's selected versions (see :func:`load_model`)."""
        return load_model(self.model_dir(name))
