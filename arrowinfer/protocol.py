"""The wire protocol's constants and codecs, shared by ``client/`` and ``server/``.

Everything both sides must agree on lives here once: the descriptor of shared-memory
sessions, the keys of the server-side times a result carries, the ``goaway`` control
message, the (bounded) parsing of the JSON metadata that travels beside Arrow data, and the
test of whether an address or a gRPC peer is on this host.

Only the standard library and pyarrow are imported: the lean client uses this module.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from pyarrow import flight

from .errors import InvalidInput

__all__ = [
    "GOAWAY",
    "MAX_JSON_BYTES",
    "MAX_JSON_CONTAINERS",
    "MAX_JSON_DEPTH",
    "PROVENANCE",
    "RESULT_KEYS",
    "SERVER_TIMES",
    "SHM_DESCRIPTOR",
    "TRUNCATION",
    "dump_json",
    "goaway",
    "goaway_reason",
    "host_port",
    "is_loopback_host",
    "is_shm_descriptor",
    "parse_json",
    "peer_is_local",
    "result_metadata",
    "shm_descriptor",
]

#: The descriptor path of the shared-memory control channel (a Flight ``do_exchange``).
SHM_DESCRIPTOR = "arrowinfer.shm"

#: Where the time of a request went in the server (ns): keys of a result's metadata
#: (Flight ``app_metadata``, shm replies, KServe ``parameters``) and of its schema metadata
#: on the client.
SERVER_TIMES = ("queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns")

#: What produced a result, carried by every result beside its times: the model's name, its
#: version, the sha256 (hex) of the model file, and where it ran (onnxruntime's execution
#: provider, e.g. ``CPUExecutionProvider``). Keys as for :data:`SERVER_TIMES`.
PROVENANCE = ("model", "model_version", "model_sha256", "execution_provider")

#: Present when padding to the model's fixed size cut the request's ragged inputs: how many
#: of its entries lost items, and how many items they lost.
TRUNCATION = ("truncated_entries", "truncated_items")

#: Every key a result's metadata may carry beside its data.
RESULT_KEYS = SERVER_TIMES + PROVENANCE + TRUNCATION

#: The key of the control message that asks a client to finish a stream:
#: ``{"goaway": reason}``, metadata only. Requests already sent still get their replies.
GOAWAY = "goaway"

#: The largest JSON message accepted (bytes): a request's metadata, an action's body, a
#: shared-memory message. An action body may carry a model config, hence not tiny.
MAX_JSON_BYTES = 4 * 1024 * 1024

#: The deepest nesting of arrays and objects accepted in a JSON message.
MAX_JSON_DEPTH = 32

#: The most arrays and objects in one JSON message: each costs Python ~60 bytes or more
#: for its 2 bytes of text (``[]``), so a body of them would cost 30 times its size. A
#: JSON tensor nests one array per row at most (large tensors belong in binary data).
MAX_JSON_CONTAINERS = 1 << 22


def shm_descriptor() -> flight.FlightDescriptor:
    """The descriptor a client opens a shared-memory session with."""
    return flight.FlightDescriptor.for_path(SHM_DESCRIPTOR)


def is_shm_descriptor(descriptor: flight.FlightDescriptor) -> bool:
    """Is this the descriptor of the shared-memory control channel?"""
    path = descriptor.path or []
    return (
        descriptor.descriptor_type == flight.DescriptorType.PATH
        and len(path) == 1
        and path[0] in (SHM_DESCRIPTOR, SHM_DESCRIPTOR.encode())
    )


def result_metadata(message: Mapping[str, Any]) -> dict[bytes, bytes]:
    """A reply's :data:`RESULT_KEYS` (times, provenance, truncation; from a parsed JSON
    message) as the schema metadata of its result on the client."""
    return {key.encode(): str(message[key]).encode() for key in RESULT_KEYS if key in message}


def goaway(reason: str) -> bytes:
    """The control message that asks a client to finish its stream."""
    return dump_json({GOAWAY: reason})


def goaway_reason(message: Mapping[str, Any]) -> str | None:
    """The reason of a ``goaway`` control message; None when ``message`` is not one."""
    return str(message[GOAWAY]) if GOAWAY in message else None


#: One compact encoder for every message: ``json.dumps`` with ``separators`` would build a
#: new encoder per call, a measurable share of a one-row request's server time.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dump_json(value: Any) -> bytes:
    """A JSON message as bytes (compact, UTF-8)."""
    return _ENCODER.encode(value).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# made once: json.loads with a keyword argument builds a decoder on every call
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_DECODER_WITH_NAN = json.JSONDecoder()


#: Objects' braces as brackets (the depth is of both together); quotes kept, all else gone.
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_NOT_QUOTES_OR_BRACKETS = bytes(sorted(set(range(256)) - set(b'"[]{}')))
#: A string, once escapes are gone; one that is not closed runs to the end, so that a
#: match never fails (a failed match is tried again from the next quote: quadratic).
_STRING = re.compile(rb'"[^"]*(?:"|\Z)')


def _check_nesting(raw: bytes, what: str) -> None:
    """Refuse text nested deeper than :data:`MAX_JSON_DEPTH`, or with more than
    :data:`MAX_JSON_CONTAINERS` arrays and objects, read from the text before decoding.

    It must be checked before decoding: json's decoder recurses once per level, and a
    deep enough text reaches Python's recursion limit, where whatever else runs meanwhile
    (a finalizer the garbage collector calls) fails too. Every step is a bytes method or a
    regex that never fails to match, so a text costs its length, whatever it holds:

    - the count of containers includes brackets inside strings (a text with two million
      of them is refused however they are quoted);
    - escapes go (``\\\\`` then ``\\"``), then all but quotes and brackets, then pairs
      of adjacent quotes (nothing structural lies between them), then each string;
    - each round removes the innermost pairs (``[]`` only: ``bytes.replace`` does not look
      again where it removed one), so a text nested ``d`` deep is gone after ``d`` rounds.

    A quote or backslash outside a string (not JSON) can shift what counts as inside a
    string only after the point where the decoder stops at it.
    """
    brackets = raw.translate(_AS_BRACKETS, _NOT_BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:
        return  # too few brackets to be that deep: most messages
    if len(brackets) > 2 * MAX_JSON_CONTAINERS:
        raise InvalidInput(
            f"{what} has too many arrays and objects (send large tensors as binary data)",
            expected=f"at most {MAX_JSON_CONTAINERS}",
            got=len(brackets) // 2,
        )
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    text = text.translate(_AS_BRACKETS, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
    brackets = _STRING.sub(b"", text)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return
        inner = brackets.replace(b"[]", b"")
        if inner == brackets:
            raise InvalidInput(f"{what} is not JSON: its brackets do not pair")
        brackets = inner
    if brackets:
        raise InvalidInput(
            f"{what} is nested too deeply", expected=f"at most {MAX_JSON_DEPTH}", got="more"
        )


def parse_json(
    data: bytes | pa.Buffer | None,
    what: str = "metadata",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    allow_nan: bool = False,
) -> dict[str, Any]:
    """A JSON object received from the other side; ``{}`` for no data.

    Every byte is untrusted: the text must be UTF-8 (not the UTF-16/32 that ``json.loads``
    would guess), at most ``max_bytes`` long, nested at most :data:`MAX_JSON_DEPTH` deep,
    and an object at the top. ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, but what
    ``json.dumps`` writes for such floats) only with ``allow_nan``.

    Raises
    ------
    InvalidInput
        Naming ``what`` and what is wrong with it.
    """
    if data is None:
        return {}
    size = data.size if isinstance(data, pa.Buffer) else len(data)
    if size == 0:
        return {}
    if size > max_bytes:
        raise InvalidInput(f"{what} is too large", expected=f"at most {max_bytes} bytes", got=size)
    raw = data.to_pybytes() if isinstance(data, pa.Buffer) else bytes(data)
    _check_nesting(raw, what)
    try:
        value = (_DECODER_WITH_NAN if allow_nan else _DECODER).decode(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{what} is not UTF-8: {err.reason} at byte {err.start}") from None
    except ValueError as err:
        raise InvalidInput(f"{what} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInput(
            f"{what} must be a JSON object", expected="object", got=type(value).__name__
        )
    return value


def host_port(host: str, port: int) -> str:
    """``host:port`` as URIs and gRPC write it: an IPv6 address in brackets (``[::1]:8815``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """Is a host name or address this host's loopback (``localhost``, 127/8, ``::1``)?

    Brackets (``[::1]``), an IPv6 zone (``::1%lo``) and IPv4-mapped IPv6 addresses
    (``::ffff:127.0.0.1``) are understood.
    """
    host = host.strip()
    if host.lower() == "localhost":
        return True
    host = host.removeprefix("[").removesuffix("]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def peer_is_local(peer: str) -> bool:
    """Is a gRPC peer (``context.peer()``) on this host: loopback IPv4/IPv6, or a Unix socket?

    Peers look like ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``ipv6:%5B::1%5D:5000``
    or ``unix:/path``.
    """
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    rest = urllib.parse.unquote(rest)
    if kind == "ipv6" and rest.startswith("["):
        host = rest[1 : rest.find("]")]
    elif kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
    else:
        return False
    return host.lower() != "localhost" and is_loopback_host(host)
