"""KServe v2 tensors (an :class:`~._v2request.InferRequest`'s) -> the core's batches (dense
tensors, or Arrow where the model needs it), and results -> answers (values the front ends
serialize), for the v2 front ends.

Kept apart from the gRPC servicer, as KServe's own Python server keeps its conversion
apart, so that an HTTP/REST front end of the same protocol shares it. The rules (shapes,
raw versus typed contents, ragged inputs, refused parameters) are those of
:mod:`arrowinfer.server._kserve`'s docstring.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from tritonclient.grpc import service_pb2 as pb

from ..batching import Completed
from ..dense import DenseBatch, entry_fits
from ..errors import InvalidInput, RegionNotFound
from ..protocol import SERVER_TIMES
from ..repository import ModelVersion
from ..schema import TensorSpec, to_column
from ..tensors import Ragged, layout, ragged_to_numpy, to_numpy
from ._v2memory import NO_PEER, Peer, SystemRegions
from ._v2request import InferRequest, InputTensor, Parameter, RequestedOutput, int_parameter

__all__ = [
    "SPLIT_PARAMETER",
    "InferAnswer",
    "OutputTensor",
    "infer_response",
    "input_array",
    "request_batch",
    "requested_outputs",
]

#: The typed ``InferTensorContents`` field of each KServe datatype, and its numpy type.
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}

#: The model config parameter that lets KServe requests exceed ``max_batch_size`` (split).
SPLIT_PARAMETER = "arrowinfer.kserve_split_oversized"

#: The parameters that place a tensor in a system shared-memory region.
_SHM_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def named(
    err: InvalidInput, model: str, tensor: str | None = None, *, output: str | None = None
) -> InvalidInput:
    """``err`` with the model and input ``tensor`` added where it does not name them; with
    ``output``, the tensor it names is that requested output (helpers that serve both say
    "input")."""
    as_output = output is not None
    return InvalidInput(
        err.reason,
        model=err.model or model,
        input=None if as_output else err.input or tensor,
        output=(err.output or err.input or output) if as_output else err.output,
        expected=err.expected,
        got=err.got,
    )


@contextlib.contextmanager
def naming(model: str, tensor: str | None = None, *, output: str | None = None) -> Iterator[None]:
    """Add the model and tensor to an error raised where they are not known (a region's,
    a JSON tensor's): :func:`named`."""
    try:
        yield
    except (InvalidInput, RegionNotFound) as err:
        raise _renamed(err, model, tensor, output=output) from None


def _renamed(
    err: InvalidInput | RegionNotFound,
    model: str,
    tensor: str | None = None,
    *,
    output: str | None = None,
) -> InvalidInput | RegionNotFound:
    """:func:`named` for either error a place in shared memory raises; a region not found
    stays NOT_FOUND, as Triton's, with the same words added."""
    if isinstance(err, InvalidInput):
        return named(err, model, tensor, output=output)
    return RegionNotFound(str(named(InvalidInput(str(err)), model, tensor, output=output)))


class ShmPlace(NamedTuple):
    """Where a tensor lies in a system shared-memory region."""

    region: str
    offset: int
    byte_size: int


def shm_place(
    params: Mapping[str, Parameter], regions: SystemRegions | None, *, model: str, tensor: str
) -> ShmPlace | None:
    """The region, offset and byte size a tensor's parameters name, or None for none.

    Raises
    ------
    InvalidInput
        Shared-memory parameters without a server that serves regions, without the
        region's name and byte size, or of the wrong kinds (a name, then integers >= 0).
    """
    if not params or not any(key in params for key in _SHM_PARAMETERS):
        return None
    if regions is None:
        raise InvalidInput(
            "system shared memory is not served here; send the data", model=model, input=tensor
        )
    if "shared_memory_region" not in params or "shared_memory_byte_size" not in params:
        raise InvalidInput(
            "shared memory needs shared_memory_region and shared_memory_byte_size",
            model=model,
            input=tensor,
        )
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise InvalidInput(
            "shared_memory_region must be a region's name", model=model, input=tensor, got=region
        )
    return ShmPlace(
        region,
        int_parameter(params, "shared_memory_offset", model=model, tensor=tensor),
        int_parameter(params, "shared_memory_byte_size", model=model, tensor=tensor),
    )


def _dims_match(expected: tuple[int, ...], got: tuple[int, ...]) -> bool:
    """Triton's rule: equal dims, ``-1`` taking any size >= 0."""
    if expected == got:
        return True
    if expected in ((), (1,)) and got in ((), (1,)):
        return True
    return entry_fits(expected, got)


#: The most elements a tensor's shape may describe (its nonzero dims' product): numpy
#: refuses a shape beyond 2**63 bytes even when a zero dim leaves it empty.
_MAX_ELEMENTS = 2**59


def input_array(
    spec: TensorSpec,
    tensor: InputTensor,
    raw: bytes | memoryview | None,
    *,
    model: str,
    batching: bool,
) -> np.ndarray:
    """One request tensor as numpy of shape ``[rows, *spec.shape]``; raw data is viewed.

    Raises
    ------
    InvalidInput
        Wrong datatype or shape, data that does not match the shape, both raw and typed
        contents, or typed values out of range for the datatype.
    """
    dt = spec.datatype
    if tensor.datatype != dt.kserve:
        raise InvalidInput(
            "wrong datatype", model=model, input=spec.name, expected=dt.kserve, got=tensor.datatype
        )
    shape = tensor.shape
    per_entry = shape[1:] if batching else shape
    if shape and min(shape) < 0:  # Triton: "All input dimensions should be specified"
        raise InvalidInput(
            "wrong shape: every dim must be given, as a size >= 0 (-1 is for configs)",
            model=model,
            input=spec.name,
            got=list(shape),
        )
    if (batching and not shape) or not _dims_match(spec.shape, per_entry):
        expected = [-1, *spec.shape] if batching else list(spec.shape)
        raise InvalidInput(
            "wrong shape", model=model, input=spec.name, expected=expected, got=list(shape)
        )
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:  # numpy's bound, zeros or not
        raise InvalidInput(
            "wrong shape: more elements than an array can hold",
            model=model,
            input=spec.name,
            expected=f"dims whose product (zeros left out) is at most {_MAX_ELEMENTS}",
            got=list(shape),
        )
    rows = shape[0] if batching else 1
    count = math.prod(shape)
    per_row = per_entry if -1 in spec.shape else spec.shape  # [] and [1] are one value
    if raw is not None and tensor.contents is not None:
        raise InvalidInput(
            "both raw_input_contents and typed contents given; use one",
            model=model,
            input=spec.name,
        )
    if dt.kserve == "BYTES":
        return _bytes_input(spec, tensor, raw, count, model=model).reshape((rows, *per_row))
    if raw is not None:
        nbytes = count * dt.numpy.itemsize
        if len(raw) != nbytes:
            raise InvalidInput(
                "the input's data does not match the shape",
                model=model,
                input=spec.name,
                expected=f"{nbytes} bytes ({list(shape)} x {dt.kserve})",
                got=f"{len(raw)} bytes",
            )
        values = np.frombuffer(raw, dtype=dt.numpy.newbyteorder("<"))
        if dt.kserve == "BOOL":  # a byte each: any but 0 is true, as Arrow's bits read it
            values = values.view(np.uint8) != 0
    else:
        field, wire = _CONTENTS.get(dt.kserve, ("", dt.numpy))
        given = _given(tensor)
        if not field or given != [field]:
            raise InvalidInput(
                "no data: send raw_input_contents or the typed contents of its datatype",
                model=model,
                input=spec.name,
                expected=field or "raw_input_contents (no typed contents for " + dt.kserve + ")",
                got=", ".join(given) or "nothing",
            )
        typed = np.array(getattr(tensor.contents, field), dtype=wire)
        if len(typed) != count:
            raise InvalidInput(
                f"{field} does not match the shape",
                model=model,
                input=spec.name,
                expected=f"{count} values ({list(shape)})",
                got=f"{len(typed)} values",
            )
        values = typed.astype(dt.numpy, copy=False)
        if values.dtype != wire and not np.array_equal(values, typed):
            raise InvalidInput(f"values out of range for {dt.kserve}", model=model, input=spec.name)
    return values.reshape((rows, *per_row))


def _bytes_input(
    spec: TensorSpec,
    tensor: InputTensor,
    raw: bytes | memoryview | None,
    count: int,
    *,
    model: str,
) -> np.ndarray:
    """A BYTES tensor's ``count`` elements as an object array of ``bytes``.

    Raw contents are KServe's: each element a 4-byte little-endian length, then its bytes;
    typed contents are ``bytes_contents`` (:func:`input_array` refused both at once).
    """
    if raw is not None:
        items: list[bytes] = []
        offset = 0
        view = memoryview(raw)
        while offset < len(view) and len(items) < count:
            if offset + 4 > len(view):
                break
            length = int.from_bytes(view[offset : offset + 4], "little")
            offset += 4
            if offset + length > len(view):
                break
            items.append(bytes(view[offset : offset + length]))
            offset += length
        if len(items) != count or offset != len(view):
            raise InvalidInput(
                "raw_input_contents is not the BYTES elements of the shape "
                "(each a 4-byte little-endian length, then its bytes)",
                model=model,
                input=spec.name,
                expected=f"{count} elements",
                got=f"{len(items)} elements in {len(view)} bytes",
            )
    else:
        given = _given(tensor)
        if given != ["bytes_contents"]:
            raise InvalidInput(
                "no data: send raw_input_contents or bytes_contents",
                model=model,
                input=spec.name,
                got=", ".join(given) or "nothing",
            )
        items = list(tensor.contents.bytes_contents)  # _given saw it
        if len(items) != count:
            raise InvalidInput(
                "bytes_contents does not match the shape",
                model=model,
                input=spec.name,
                expected=f"{count} values",
                got=f"{len(items)} values",
            )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _given(tensor: InputTensor) -> list[str]:
    """The typed contents fields a tensor sets (gRPC only)."""
    contents = tensor.contents
    return [] if contents is None else [f.name for f, _ in contents.ListFields()]


def _expected_bytes(spec: TensorSpec, tensor: InputTensor) -> int:
    return math.prod(tensor.shape) * spec.datatype.numpy.itemsize


def request_batch(
    version: ModelVersion,
    request: InferRequest,
    *,
    regions: SystemRegions | None = None,
    peer: Peer = NO_PEER,
    max_bytes: int | None = None,
) -> pa.RecordBatch | DenseBatch:
    """A v2 request as the batch the core takes: its tensors as they are (a
    :class:`~arrowinfer.dense.DenseBatch`) for a model whose inputs are all dense numbers
    (:attr:`~arrowinfer.repository.ModelVersion.dense_inputs`), else an Arrow record batch
    (one column per input).

    An input in system shared memory (``shared_memory_*`` parameters) is read from the
    peer's region (``regions``); ``request.raw`` then holds the other inputs' data, in
    order (HTTP's binary data as views of the body, not copies). Their sizes together are
    at most ``max_bytes`` (the model's ``max_request_bytes``), checked before any is read:
    a region can be far larger than any request a server takes.

    Raises
    ------
    InvalidInput
        Refused parameters, ragged inputs, unknown inputs, data that does not match an
        input's datatype and shape (see :func:`input_array`), or a shared-memory place
        that is not the peer's or lies outside its region.
    """
    name = version.name
    specs = {s.name: s for s in version.input_specs}
    mask_spec = version.mask_spec
    if mask_spec is not None:
        specs[mask_spec.name] = mask_spec
    places = [shm_place(t.parameters, regions, model=name, tensor=t.name) for t in request.inputs]
    sent = places.count(None)  # inputs whose data came in the request
    if sent < len(places) and max_bytes is not None:
        in_shm = sum(place.byte_size for place in places if place is not None)
        if in_shm > max_bytes:
            raise InvalidInput(
                "the request is too large (max_request_bytes)",
                model=name,
                expected=f"<= {max_bytes} bytes of data",
                got=f"{in_shm} bytes in shared memory",
            )
    raw_contents = request.raw
    if raw_contents and len(raw_contents) != sent:
        raise InvalidInput(
            "raw_input_contents must have one entry per input not in shared memory",
            model=name,
            expected=sent,
            got=len(raw_contents),
        )
    raw_index = 0
    batching = version.max_batch_size > 0
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in specs:
            raise InvalidInput(
                f"unexpected input {tensor.name!r}",
                model=name,
                expected=list(specs),
                got=tensor.name,
            )
        if tensor.name in arrays:
            raise InvalidInput("input given twice", model=name, input=tensor.name)
        place = places[i]
        raw: bytes | memoryview | None
        if place is not None:
            if tensor.contents is not None:  # gRPC: HTTP's parser refused it already
                raise InvalidInput(
                    "an input's data is in shared memory or in the request, not both",
                    model=name,
                    input=tensor.name,
                    got="'shared_memory_region' and typed contents",
                )
            spec = specs[tensor.name]
            expected = _expected_bytes(spec, tensor)
            # checked before reading: no huge reads (BYTES elements have no fixed size)
            if spec.datatype.kserve != "BYTES" and place.byte_size != expected:
                raise InvalidInput(
                    "shared_memory_byte_size does not match the shape",
                    model=name,
                    input=tensor.name,
                    expected=expected,
                    got=place.byte_size,
                )
            assert regions is not None  # shm_place refused it otherwise
            with naming(name, tensor.name):
                raw = regions.read(peer, place.region, place.offset, place.byte_size)
        elif raw_contents:
            raw = raw_contents[raw_index]
            raw_index += 1
        else:
            raw = None
        arrays[tensor.name] = input_array(
            specs[tensor.name], tensor, raw, model=name, batching=batching
        )
    counts = _counts(version, arrays)
    if counts is not None and any(
        len(arrays[n]) != len(counts) for n in version.ragged_inputs if n in arrays
    ):
        raise InvalidInput(
            "inputs have different batch sizes",
            model=name,
            got={n: len(a) for n, a in arrays.items()},
        )
    if mask_spec is not None:
        arrays.pop(mask_spec.name, None)  # the server makes it from the counts, as for Flight
    if not arrays:
        raise InvalidInput("the request has no inputs", model=name, expected=version.inputs.names)
    rows = {len(a) for a in arrays.values()}
    if len(rows) > 1:
        raise InvalidInput(
            "inputs have different batch sizes",
            model=name,
            got={n: len(a) for n, a in arrays.items()},
        )
    (count,) = rows
    limit = version.max_batch_size
    if batching and count > limit and version.parameter(SPLIT_PARAMETER, "") != "true":
        # Triton's answer; Flight and shm split such a request, KServe only when asked to
        raise InvalidInput(
            f"inference request batch-size must be <= {limit} for '{name}'; the config "
            f"parameter {SPLIT_PARAMETER}: true splits larger requests",
            model=name,
            got=f"{count} rows",
        )
    if version.dense_inputs:  # the tensors as they are: no Arrow to build and take apart
        return DenseBatch(arrays)
    columns = [
        to_column(
            version.inputs.field(n),
            _unpadded(a, counts) if n in version.ragged_inputs else a,
        )
        for n, a in arrays.items()
    ]
    # the model's own fields (nullability included): the core then needs no type check
    schema = version.inputs
    if list(arrays) != schema.names:
        schema = pa.schema([schema.field(n) for n in arrays])
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _counts(version: ModelVersion, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Real items per row of a model with ragged inputs sent padded (KServe tensors are dense).

    From the mask when the request has it (real items first, then padding, in every row);
    without it every position is real, as the request's shape says.

    Raises
    ------
    InvalidInput
        A mask that is not a prefix of real items in some row.
    """
    if not version.ragged_inputs:
        return None
    mask = arrays.get(version.mask_input) if version.mask_input else None
    if mask is None:
        first = next((arrays[n] for n in version.ragged_inputs if n in arrays), None)
        if first is None:
            return None
        return np.full(len(first), first.shape[1], dtype=np.int64)
    rows, length = mask.shape[:2]
    real = mask.reshape(rows, length, -1).astype(bool).any(axis=2)
    counts = real.sum(axis=1)
    if not np.array_equal(real, np.arange(length) < counts[:, None]):
        raise InvalidInput(
            "the mask must mark the real items first and the padding after them in every row",
            model=version.name,
            input=version.mask_input,
        )
    return counts.astype(np.int64)


def _unpadded(array: np.ndarray, counts: np.ndarray | None) -> Ragged:
    """A padded ragged input ``(rows, length, *item)`` as the real items of each row."""
    rows, length = array.shape[:2]
    if counts is None:
        counts = np.full(rows, length, dtype=np.int64)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    if int(offsets[-1]) == rows * length:
        values = array.reshape((rows * length, *array.shape[2:]))  # all real: a view
    else:
        values = array[np.arange(length) < counts[:, None]]  # the real items: one copy
    return Ragged(offsets, values)


def requested_outputs(
    version: ModelVersion,
    request: InferRequest,
    *,
    regions: SystemRegions | None = None,
    peer: Peer = NO_PEER,
) -> list[TensorSpec]:
    """The outputs a request asks for (all of them when it names none), in its order,
    each once: an output named twice is answered once, as Triton 2.51 does (checked).

    An output to be written into system shared memory must name a region of the peer's
    (checked here, before the request runs).

    Raises
    ------
    InvalidInput
        An unknown output, a refused parameter on one, or an unknown region.
    """
    specs = list(version.output_specs)
    if not request.outputs:
        return specs
    by_name = {s.name: s for s in specs}
    out = []
    answered: set[str] = set()
    for requested in request.outputs:
        spec = by_name.get(requested.name)
        if spec is None:
            raise InvalidInput(
                f"unknown output {requested.name!r}",
                model=version.name,
                expected=list(by_name),
                got=requested.name,
            )
        if _class_count(requested, version.name) and spec.datatype.kserve == "BYTES":
            raise InvalidInput(  # checked now, before the request runs
                "classification ranks numbers, not BYTES", model=version.name, output=spec.name
            )
        try:  # (not `with naming`: a context manager costs a few us per output, every time)
            place = shm_place(requested.parameters, regions, model=version.name, tensor=spec.name)
            if place is not None:
                assert regions is not None  # shm_place refused it otherwise
                regions.check(peer, place.region, place.offset, place.byte_size)  # before it runs
        except (InvalidInput, RegionNotFound) as err:
            raise _renamed(err, version.name, output=spec.name) from None
        if spec.name not in answered:
            answered.add(spec.name)
            out.append(spec)
    return out


def _class_count(requested: RequestedOutput, model: str) -> int:
    """The ``classification`` parameter of a requested output (0: not asked for).

    Raises
    ------
    InvalidInput
        Not an integer >= 1.
    """
    if "classification" not in requested.parameters:
        return 0
    count = requested.parameters["classification"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidInput(
            "parameter 'classification' (class_count) must be an integer >= 1",
            model=model,
            output=requested.name,
            got=repr(count),  # '3', a string, shows as one
        )
    return count


def _classified(array: np.ndarray, count: int, labels: tuple[str, ...]) -> list[bytes]:
    """Triton's classification: each row's ``count`` best scores as "score:index[:label]"."""
    rows = array.reshape(len(array), math.prod(array.shape[1:]))  # -1 fails for 0 rows
    count = min(count, rows.shape[1])
    # stable, highest first; ties keep the lower index first, as a sort by score does
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    out = []
    for row, indices in zip(rows, order, strict=True):
        for index in indices:
            text = f"{float(row[index]):f}:{int(index)}"
            if index < len(labels):
                text += f":{labels[index]}"
            out.append(text.encode())
    return out


def _varint(value: int) -> bytes:
    """A protobuf base-128 varint (little-endian groups of 7 bits)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: The key of ``raw_output_contents`` (field 6, length-delimited) and of a
#: ``ModelStreamInferResponse``'s ``infer_response`` (field 2): grpc_service.proto.
_RAW_OUTPUT_KEY = b"\x32"
_STREAM_RESPONSE_KEY = b"\x12"


class OutputTensor(NamedTuple):
    """One output of an answer: what ``ModelInferResponse.InferOutputTensor`` holds."""

    name: str
    datatype: str  # KServe's, e.g. FP32
    shape: list[int]
    #: where it lies in system shared memory (``shared_memory_region``, ...); else empty
    parameters: dict[str, int | str]


def _set_parameters(target: Any, parameters: dict[str, int | str]) -> None:
    for key, value in parameters.items():
        if isinstance(value, int):
            target[key].int64_param = value
        else:
            target[key].string_param = value


class InferAnswer(NamedTuple):
    """A ``ModelInferResponse`` as values, its outputs' bytes (``payloads``) as views of
    the outputs; the HTTP front end writes JSON from the values, the gRPC one protobuf.

    protobuf's serializer copies a large bytes field several times (upb: 6.4 ms for one
    4 MB output, against 0.4 ms for a join): :meth:`serialize` writes the
    ``raw_output_contents`` after the message's other fields, which protobuf's wire format
    allows (fields in any order, repeated ones appended); the bytes equal
    ``SerializeToString`` of the full message (``tests/test_kserve.py``).
    """

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    payloads: list[bytes | memoryview]
    #: the server-side times and the provenance (int or str)
    parameters: dict[str, int | str]

    def message(self) -> pb.ModelInferResponse:
        """The protobuf message without its ``raw_output_contents``."""
        response = pb.ModelInferResponse(
            model_name=self.model_name, model_version=self.model_version, id=self.id
        )
        for output in self.outputs:
            tensor = response.outputs.add(
                name=output.name, datatype=output.datatype, shape=output.shape
            )
            _set_parameters(tensor.parameters, output.parameters)
        _set_parameters(response.parameters, self.parameters)
        return response

    def serialize(self) -> bytes:
        parts: list[bytes | memoryview] = [self.message().SerializeToString()]
        for payload in self.payloads:
            parts += [_RAW_OUTPUT_KEY, _varint(len(payload)), payload]
        return b"".join(parts)

    def serialize_in_stream(self) -> bytes:
        """As the ``infer_response`` of a ``ModelStreamInferResponse`` without an error."""
        inner = self.serialize()
        return b"".join([_STREAM_RESPONSE_KEY, _varint(len(inner)), inner])


def _bytes_tensor(items: list[bytes]) -> bytes:
    """KServe's raw BYTES contents: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def _output_array(
    column: pa.Array | pa.ChunkedArray | np.ndarray, name: str, model: str
) -> np.ndarray:
    if isinstance(column, np.ndarray):  # a DenseBatch's result
        return column
    if not layout(column.type).ragged:
        return to_numpy(column)
    ragged = ragged_to_numpy(column)  # a variable output dimension: fine if all rows agree
    counts = ragged.counts
    if not len(counts):  # no rows: nothing to disagree (the caller names the dims)
        return ragged.values.reshape((0, 0, *ragged.values.shape[1:]))
    if np.all(counts == counts[0]):
        return ragged.values.reshape((len(counts), int(counts[0]), *ragged.values.shape[1:]))
    raise InvalidInput(
        "output has a different length per row; KServe tensors cannot hold it, use Arrow Flight",
        model=model,
        output=name,
    )


def _place_output(
    name: str,
    payload: bytes | memoryview,
    params: Mapping[str, Parameter] | None,
    regions: SystemRegions | None,
    peer: Peer,
    version: ModelVersion,
) -> tuple[bytes | memoryview, dict[str, int | str]]:
    """An output's raw data for the response, or written into its shared-memory place
    (then ``b""``, which keeps the raw outputs in step with the outputs); and the output's
    parameters, which say where it was written.

    Raises
    ------
    InvalidInput
        The output does not fit its place.
    """
    try:  # (not `with naming`: see requested_outputs)
        place = shm_place(params or {}, regions, model=version.name, tensor=name)
    except InvalidInput as err:
        raise named(err, version.name, output=name) from None
    if place is None:
        return payload, {}
    size = len(payload)
    if size > place.byte_size:
        raise InvalidInput(
            "the output does not fit its shared_memory_byte_size",
            model=version.name,
            output=name,
            expected=size,
            got=place.byte_size,
        )
    assert regions is not None  # shm_place refused it otherwise
    with naming(version.name, output=name):
        regions.write(peer, place.region, place.offset, payload)
    where: dict[str, int | str] = {
        "shared_memory_region": place.region,
        "shared_memory_byte_size": size,
    }
    if place.offset:
        where["shared_memory_offset"] = place.offset
    return b"", where


def infer_response(
    version: ModelVersion,
    request: InferRequest,
    outputs: list[TensorSpec],
    done: Completed,
    *,
    regions: SystemRegions | None = None,
    peer: Peer = NO_PEER,
) -> InferAnswer:
    """The response to ``request``: the ``outputs`` of ``done.batch`` as raw tensors.

    Each output has shape ``[batch, *dims]`` (a non-batching model: ``dims``) in
    ``raw_output_contents`` (kept apart, as views of the outputs, until the answer is
    serialized: :class:`InferAnswer`); the server-side times and the provenance (``model``,
    ``model_version``, ``model_sha256``, ``execution_provider``) go in ``parameters``. An
    output the request placed in system shared memory is written there; its
    ``raw_output_contents`` entry is empty and its parameters say where it lies
    (``shared_memory_region``, ``shared_memory_byte_size``, ``shared_memory_offset``).

    Raises
    ------
    InvalidInput
        An output has a different length per row (a KServe tensor cannot hold it), or
        does not fit its shared-memory place.
    """
    batching = version.max_batch_size > 0
    params = {r.name: r.parameters for r in request.outputs}
    classes = {o.name: _class_count(o, version.name) for o in request.outputs}
    described: list[OutputTensor] = []
    payloads: list[bytes | memoryview] = []
    for spec in outputs:
        array = _output_array(done.batch.column(spec.name), spec.name, version.name)
        kserve = spec.datatype.kserve
        payload: bytes | memoryview
        if all(d >= 0 for d in spec.shape):
            entry = spec.shape
        elif len(array):
            entry = array.shape[1:]
        else:  # no rows, the model not run: no entry to take a variable dim from
            entry = tuple(max(d, 0) for d in spec.shape)
        if classes.get(spec.name):
            items = _classified(array, classes[spec.name], version.labels.get(spec.name, ()))
            per_row = min(classes[spec.name], math.prod(entry))
            shape = [len(array), per_row] if batching else [per_row]
            kserve, payload = "BYTES", _bytes_tensor(items)
        else:
            shape = [len(array), *entry] if batching else list(entry)
            if array.dtype == object:  # strings: KServe's length-prefixed BYTES elements
                items = [v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
                payload = _bytes_tensor(items)
            else:
                payload = np.ascontiguousarray(array).view(np.uint8).reshape(-1).data
        payload, where = _place_output(
            spec.name, payload, params.get(spec.name), regions, peer, version
        )
        described.append(OutputTensor(spec.name, kserve, shape, where))
        payloads.append(payload)
    parameters: dict[str, int | str] = {key: getattr(done, key) for key in SERVER_TIMES}
    for key, value in done.metadata.items():  # provenance, truncation
        parameters[key] = value if isinstance(value, int) else str(value)
    return InferAnswer(
        version.name, str(version.version), request.id, described, payloads, parameters
    )
