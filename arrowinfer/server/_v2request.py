"""A KServe v2 inference request as plain values, which both v2 front ends build.

gRPC builds it from its ``ModelInferRequest`` protobuf (:func:`from_protobuf`), HTTP/REST
from its JSON header and binary parts, without making a protobuf message first (its
description cost as much as the checks that follow). The rules for what a request holds
then live once (:mod:`._v2`, :mod:`._v2tensors`). The field names are KServe's
(grpc_service.proto, Triton's protocol/extension_*.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from tritonclient.grpc import service_pb2 as pb

from ..errors import InvalidInput

__all__ = [
    "InferRequest",
    "InputTensor",
    "Parameter",
    "RequestedOutput",
    "from_protobuf",
    "int_parameter",
]

#: A parameter's value: KServe's ``InferParameter`` is one of bool, int64, uint64, double,
#: string; JSON's are the same kinds. None: a protobuf parameter with no value set.
Parameter = bool | int | float | str | None

#: One past the largest int a parameter may hold (uint64's; tritonclient sends int64 or
#: uint64).
_INT_END = 2**64


class InputTensor(NamedTuple):
    """One input tensor's description (``ModelInferRequest.InferInputTensor``)."""

    name: str
    datatype: str  # KServe's, e.g. FP32
    shape: tuple[int, ...]
    parameters: Mapping[str, Parameter]
    #: gRPC's typed contents (``InferTensorContents``) when it has any, else None
    contents: Any = None


class RequestedOutput(NamedTuple):
    """One requested output (``ModelInferRequest.InferRequestedOutputTensor``)."""

    name: str
    parameters: Mapping[str, Parameter]


class InferRequest(NamedTuple):
    """An inference request: what ``ModelInferRequest`` holds, as plain values.

    ``raw``: the data of each input not in shared memory, in input order (gRPC's
    ``raw_input_contents``; HTTP's binary data as views of the body, or its JSON data as
    bytes in the same layout); empty when the inputs have typed contents.
    """

    model_name: str
    model_version: str
    id: str
    parameters: Mapping[str, Parameter]
    inputs: Sequence[InputTensor]
    outputs: Sequence[RequestedOutput]
    raw: Sequence[bytes | memoryview]


def _value(param: Any) -> Parameter:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def _parameters(params: Any) -> Mapping[str, Parameter]:
    return {key: _value(p) for key, p in params.items()} if params else {}


def from_protobuf(request: pb.ModelInferRequest) -> InferRequest:
    """The request a ``ModelInferRequest`` describes (its raw contents read once: protobuf
    copies a bytes field on every access)."""
    inputs = [
        InputTensor(
            t.name,
            t.datatype,
            tuple(t.shape),
            _parameters(t.parameters),
            # not HasField: a client may send an empty contents message beside raw data
            t.contents if t.contents.ListFields() else None,
        )
        for t in request.inputs
    ]
    outputs = [RequestedOutput(o.name, _parameters(o.parameters)) for o in request.outputs]
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        _parameters(request.parameters),
        inputs,
        outputs,
        list(request.raw_input_contents),
    )


def int_parameter(
    params: Mapping[str, Parameter], key: str, *, model: str, tensor: str | None = None
) -> int:
    """An integer parameter >= 0 (0 when absent), as Triton reads ``priority``,
    ``timeout`` and the shared-memory offsets and sizes (of ``tensor``, if given).

    Raises
    ------
    InvalidInput
        A value of another kind (Triton refuses them too: a double is not read as 0), a
        negative one, or one beyond uint64.
    """
    value = params.get(key, 0)
    if type(value) is not int:
        got = {bool: "true/false", float: "a float", str: "a string"}.get(type(value))
        raise InvalidInput(
            f"parameter {key!r} must be an integer",
            model=model,
            input=tensor,
            got=got or "no value",
        )
    if not 0 <= value < _INT_END:
        raise InvalidInput(
            f"parameter {key!r} must be an integer from 0 to 2**64 - 1",
            model=model,
            input=tensor,
            got=value,
        )
    return value
