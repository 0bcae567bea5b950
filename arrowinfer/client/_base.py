"""What ``Client`` and ``AsyncClient`` share, with no I/O of its own (as httpx's BaseClient).

The configuration and its checks (unknown options are refused), the server list
(``$ARROWINFER_SERVERS``), the schema cache, request building and the failover policy: the
transport a client makes, where its subclass does I/O.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ._convert import conform, per_object, to_record_batch, truncation
from ._failover import FailoverTransport
from ._shm import SHM_OPTIONS, check_shm, make_transport
from ._transport import (
    FLIGHT_OPTIONS,
    Transport,
    check_compression,
    check_options,
    check_token,
    check_url,
)

__all__ = [
    "CLIENT_OPTIONS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "USE_CLIENT_DEFAULT",
    "BaseClient",
    "TruncationWarning",
    "UseClientDefault",
    "servers",
    "split_name",
]

#: Seconds a call waits for its answer unless told otherwise.
DEFAULT_TIMEOUT = 60.0

#: The server a client talks to when given none (and ``$ARROWINFER_SERVERS`` is unset).
DEFAULT_URL = "grpc://127.0.0.1:8815"

#: The keyword options a client takes besides its own parameters: those of
#: ``pyarrow.flight.FlightClient`` (TLS and others) and of shared memory, by name.
CLIENT_OPTIONS = FLIGHT_OPTIONS | SHM_OPTIONS


class TruncationWarning(UserWarning):
    """A request's ragged inputs had more items than the model takes: some were cut."""


class UseClientDefault:
    """The type of :data:`USE_CLIENT_DEFAULT` (``None`` already means "no limit")."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()


def split_name(model: str, version: str | int | None) -> tuple[str, str | None]:
    """``("name", None)`` from ``"name/version"`` or a model and a version (None: latest)."""
    if version is None and "/" in model:
        model, version = model.split("/", 1)
    return model, (None if version in (None, "") else str(version))


def servers(urls: str | Sequence[str] | None) -> list[str]:
    """The server list: the argument, else ``$ARROWINFER_SERVERS``.

    Either may be one URL, several separated by commas or whitespace, or ``@FILE`` naming a
    file with one URL per line (``#`` comments allowed) — how batch jobs find servers that a
    Slurm or HTCondor job published.
    """
    if urls is None:
        urls = os.environ.get("ARROWINFER_SERVERS", "")
    if isinstance(urls, str):
        text = urls.strip()
        if text.startswith("@"):
            lines = Path(text[1:]).expanduser().read_text().splitlines()
            text = " ".join(line.split("#", 1)[0] for line in lines)
        urls = text.replace(",", " ").split()
    return list(urls)


class BaseClient:
    """What :class:`Client` and :class:`AsyncClient` share, with no I/O of its own.

    The configuration and its checks, the server list, the schema cache, building and
    checking requests, and the failover policy (the transport :meth:`_make_transport`
    makes, which the subclasses call where their I/O may happen). The parameters are
    :class:`Client`'s.

    Raises
    ------
    TypeError
        An unknown keyword option (pass TLS and Flight options by their documented names,
        :data:`CLIENT_OPTIONS`).
    ValueError
        A bad value of ``compression``, ``shm``, ``fallback`` or ``token``.

    Every result's schema metadata names what produced it (``provenance(result)``: model,
    version, ``model_sha256``, execution provider); a result whose request's ragged inputs
    were cut to the model's size warns once per model (:class:`TruncationWarning`).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        compression: str | None = None,
        transport: Transport | None = None,
        shm: bool | str = False,
        retries: int = 2,
        attempt_timeout: float | None = None,
        health_interval: float = 2.0,
        fallback: str = "error",
        repository: str | os.PathLike[str] | None = None,
        token: str | None = None,
        verify_fallback: bool = True,
        **options: Any,
    ):
        check_options(type(self).__name__, options, CLIENT_OPTIONS)
        check_compression(compression)
        check_shm(shm)
        if token is not None:
            check_token(token)
            options["token"] = token  # for FlightTransport, through make_transport
        if fallback not in ("error", "local"):
            raise ValueError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if fallback == "local" and repository is None:
            raise ValueError("fallback='local' needs repository=<model repository directory>")
        urls = [u for u in servers(url) if u != "local"]
        for u in urls:
            check_url(u)
        if not urls and fallback == "error":
            urls = [DEFAULT_URL]
        self.url = ",".join(urls) or "local"
        self.timeout = timeout
        self._urls = urls
        self._given = transport
        self._shm = shm
        self._compression = compression
        self._options = options
        self._retries = retries
        self._attempt_timeout = attempt_timeout
        self._health_interval = health_interval
        self._repository = repository if fallback == "local" else None
        self._verify_fallback = verify_fallback
        self._truncated_models: set[str] = set()  # warned about already
        self._transport: Transport | None = None
        self._schemas: dict[tuple[str, str | None], pa.Schema] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._start()

    def _start(self) -> None:
        """Make the transport, where the subclass does its I/O (the last step of __init__)."""
        raise NotImplementedError

    def _make_transport(self) -> Transport:
        """The transport the configuration asks for (may do I/O: a shared-memory probe).

        One server without retries is its own transport; otherwise a
        :class:`~arrowinfer.client.FailoverTransport` over all of them, with the local
        fallback (onnxruntime, imported only then) when asked for.
        """
        if self._given is not None:
            return self._given
        members = [
            make_transport(u, shm=self._shm, compression=self._compression, **self._options)
            for u in self._urls
        ]
        local = None
        if self._repository is not None:
            from ._local import LocalTransport  # onnxruntime and onnx: only for the fallback

            local = LocalTransport(self._repository)
        simple = self._retries == 0 and self._attempt_timeout is None
        if len(members) == 1 and local is None and simple:
            return members[0]
        return FailoverTransport(
            members,
            retries=self._retries,
            attempt_timeout=self._attempt_timeout,
            health_interval=self._health_interval,
            fallback=local,
            verify_fallback=self._verify_fallback,
        )

    @property
    def transports(self) -> list[Transport]:
        """The transport to each server (Flight, shared memory), in the order given."""
        if self._transport is None:
            return []
        members = getattr(self._transport, "members", None)
        return list(members) if members is not None else [self._transport]

    @property
    def counters(self) -> dict[str, int]:
        """Requests, retries, fallbacks (calls run in this process) and failures so far."""
        return dict(getattr(self._transport, "counters", {}))

    def _cached_schema(self, model: str, version: str | None) -> pa.Schema | None:
        with self._lock:
            return self._schemas.get((model, version))

    def _remember_schema(self, model: str, version: str | None, schema: pa.Schema) -> pa.Schema:
        with self._lock:
            self._schemas[(model, version)] = schema
        return schema

    @staticmethod
    def _request(
        model: str, data: Any, schema: pa.Schema, cast: str | None = None
    ) -> tuple[pa.RecordBatch, np.ndarray | None]:
        """The request for ``data``, checked against and shaped to the model's ``schema``
        (``cast`` as for ``Client.infer``).

        With it, the event offsets to :func:`regroup` its result by when ``data`` held
        per-event collections for a per-object model (see :func:`per_object`), else None.
        """
        batch, events = per_object(to_record_batch(data), schema, model=model)
        return conform(batch, schema, model=model, cast=cast), events

    def _received(self, model: str, result: pa.RecordBatch) -> pa.RecordBatch:
        """A result, after a :class:`TruncationWarning` (once per model) if its request's
        ragged inputs were cut to the model's size."""
        entries, items = truncation(result)
        if entries:
            with self._lock:
                first = model not in self._truncated_models
                self._truncated_models.add(model)
            if first:
                warnings.warn(
                    f"model {model!r}: {entries} entries of a request had more items than the "
                    f"model takes; {items} items were cut (the server pads or truncates "
                    "ragged inputs to the model's size; counted in its statistics)",
                    TruncationWarning,
                    stacklevel=3,
                )
        return result

    @staticmethod
    def _latest(listing: dict[str, dict[str, pa.Schema]]) -> dict[str, pa.Schema]:
        """Each model's latest version's schema, by name."""
        return {
            name: versions[max(versions, key=int)] for name, versions in sorted(listing.items())
        }

    def _wait_for(self, timeout: float | UseClientDefault | None) -> float | None:
        return self.timeout if isinstance(timeout, UseClientDefault) else timeout


def model_metadata(
    transport: Transport, timeout: float | None, model: str, version: str | None
) -> dict[str, Any]:
    """A model's KServe ModelMetadata with its config under ``"config"`` (two actions)."""
    body = {"model": model, "version": version}
    meta = transport.action("model.metadata", body, timeout=timeout)
    meta["config"] = transport.action("model.config", body, timeout=timeout)
    return dict(meta)
