"""Bearer tokens and TLS material for the Flight and KServe front ends.

A server given tokens checks the ``authorization: Bearer <token>`` header of every call,
Flight (:class:`BearerTokenMiddleware`) and KServe gRPC (:class:`BearerTokenInterceptor`)
alike, before any handler runs: a call without a valid token ends with ``UNAUTHENTICATED``
and no model sees it. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from pyarrow import flight

from ..errors import RequestError, Unauthenticated, to_flight

__all__ = [
    "HEADERS_MIDDLEWARE",
    "MODEL_CONTROL_MODES",
    "BearerTokenInterceptor",
    "BearerTokenMiddleware",
    "HeadersMiddleware",
    "ModelControl",
    "TokenCheck",
    "read_tls",
    "read_token_file",
]

_DENIED = "missing or invalid bearer token (send 'authorization: Bearer <token>')"


class TokenCheck:
    """Is a header value ``Bearer <token>`` with one of these tokens?"""

    def __init__(self, tokens: Iterable[str]):
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("auth_tokens is empty: give at least one token (or None for none)")

    def __call__(self, values: Iterable[str | bytes]) -> bool:
        for value in values:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            scheme, _, token = raw.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                continue
            token = token.strip()
            # every token is compared, so the time taken says nothing about which matched
            matched = [hmac.compare_digest(token, t) for t in self._tokens]
            if any(matched):
                return True
        return False


class BearerTokenMiddleware(flight.ServerMiddlewareFactory):
    """Flight server middleware: refuses every call without a valid bearer token."""

    def __init__(self, check: TokenCheck):
        super().__init__()
        self._check = check

    def start_call(self, info: Any, headers: dict[str, list[str | bytes]]) -> None:
        if not self._check(headers.get("authorization", [])):
            raise to_flight(Unauthenticated(_DENIED))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """gRPC server interceptor: refuses every call without a valid bearer token."""

    def __init__(self, check: TokenCheck):
        self._check = check

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        metadata = handler_call_details.invocation_metadata or ()
        values = [value for key, value in metadata if key == "authorization"]
        handler = continuation(handler_call_details)
        if handler is None or self._check(values):
            return handler
        return _denying(handler)


def _deny(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **codec)
    return grpc.unary_unary_rpc_method_handler(_deny, **codec)


#: The name of :class:`HeadersMiddleware` in a Flight server's middleware.
HEADERS_MIDDLEWARE = "arrowinfer.headers"

#: Triton's ``--model-control-mode`` values.
MODEL_CONTROL_MODES = ("none", "explicit", "poll")


class _Headers(flight.ServerMiddleware):
    def __init__(self, headers: dict[str, list[str | bytes]]):
        self.headers = headers


class HeadersMiddleware(flight.ServerMiddlewareFactory):
    """Keeps each Flight call's headers, for handlers that need them (admin tokens)."""

    def start_call(self, info: Any, headers: dict[str, list[str | bytes]]) -> _Headers:
        return _Headers(headers)


def flight_authorization(context: Any) -> list[str | bytes]:
    """The ``authorization`` header values of a Flight call (with :class:`HeadersMiddleware`)."""
    middleware = context.get_middleware(HEADERS_MIDDLEWARE)
    return list(middleware.headers.get("authorization", [])) if middleware is not None else []


class ModelControl:
    """Who may load and unload models: Triton's ``--model-control-mode``.

    Parameters
    ----------
    mode
        ``none`` (default): the repository is loaded at start and load/unload calls are
        refused. ``explicit``: the calls are allowed; with ``admin`` only from a caller
        with one of its tokens, and when the server checks tokens at all
        (``tokens_on``) never without one. ``poll``: the server reloads models whose
        files change; the calls are refused.
    admin
        The admin tokens (``--admin-token-file``).
    tokens_on
        The server checks bearer tokens on every call.

    Raises
    ------
    ValueError
        An unknown mode.
    """

    def __init__(
        self, mode: str = "none", admin: TokenCheck | None = None, *, tokens_on: bool = False
    ):
        if mode not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model control mode must be one of {MODEL_CONTROL_MODES}, got {mode!r}"
            )
        self.mode = mode
        self._admin = admin
        self._tokens_on = tokens_on

    def check(self, action: str, authorization: Iterable[str | bytes]) -> None:
        """Allow ``action`` (``load``/``unload``) for a caller with these header values.

        Raises
        ------
        RequestError
            Model control is off (``none``) or automatic (``poll``).
        Unauthenticated
            Admin tokens are needed and the caller has none of them.
        """
        if self.mode != "explicit":
            raise RequestError(
                f"model {action} is not allowed: the server's model control mode is "
                f"{self.mode!r} (start it with --model-control-mode explicit to allow it)"
            )
        if self._admin is not None:
            if not self._admin(authorization):
                raise Unauthenticated(f"model {action} needs an admin token (--admin-token-file)")
        elif self._tokens_on:
            raise Unauthenticated(
                f"model {action} needs an admin token, and the server has none "
                "(start it with --admin-token-file)"
            )


def read_token_file(path: str | os.PathLike[str]) -> set[str]:
    """Tokens from a file, one per line; blank lines and ``#`` comments are skipped.

    Raises
    ------
    ValueError
        If the file holds no token.
    """
    lines = Path(path).read_text().splitlines()
    tokens = {line.split("#", 1)[0].strip() for line in lines} - {""}
    if not tokens:
        raise ValueError(f"{path}: no token in the file (one token per line)")
    return tokens


def read_tls(
    cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None
) -> tuple[bytes, bytes] | None:
    """The PEM certificate chain and private key, or None when TLS is off.

    Raises
    ------
    ValueError
        If only one of the two is given.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate (tls_cert) and its private key (tls_key)")
    return Path(cert).read_bytes(), Path(key).read_bytes()
