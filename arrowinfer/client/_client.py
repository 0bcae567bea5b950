"""``Client``: the synchronous client, safe to share between threads.

>>> with Client("grpc://127.0.0.1:8815") as client:
...     result = client.infer("facile", {"hits": hits})       # pa.RecordBatch
...     future = client.infer_async("facile", {"hits": hits}) # concurrent.futures.Future
...     for result in client.stream("jet_tagger", batches):   # pipelined, in order
...         ...

Requests from every thread to one model are pipelined on one Flight stream. Requests are
checked against the model's signature (fetched once and cached) before they are sent, so
mistakes are reported locally with the server's message. Its I/O happens on the calling
thread (and on the transport's reader threads); :class:`~arrowinfer.client.AsyncClient` is
its asyncio twin.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, overload

import numpy as np
import pyarrow as pa

from ..errors import Timeout
from ._base import (
    CLIENT_OPTIONS,
    DEFAULT_TIMEOUT,
    USE_CLIENT_DEFAULT,
    BaseClient,
    UseClientDefault,
    model_metadata,
    servers,
    split_name,
)
from ._convert import regroup
from ._transport import Transport

__all__ = ["CLIENT_OPTIONS", "DEFAULT_TIMEOUT", "USE_CLIENT_DEFAULT", "Client", "servers"]


class Client(BaseClient):
    """A client of one or several arrowinfer servers, with an optional local fallback.

    Parameters
    ----------
    url
        A server: ``grpc://host:port`` (Flight over TCP), ``grpc+tls://host:port``,
        ``grpc+unix:///path/to/socket``, or ``shm://host:port`` / ``shm+unix:///path``
        (shared memory with a server on this host; results are views of it). Several
        servers: a list, a comma-separated string, or ``"@FILE"`` (one URL per line).
        Default: ``$ARROWINFER_SERVERS``, else ``grpc://127.0.0.1:8815`` (none with
        ``fallback="local"``: laptop mode).
    timeout
        Seconds each call waits for its answer (None: no limit).
    compression
        ``"zstd"`` or ``"lz4"``: compress the Arrow buffers both ways (slow links).
    transport
        Use this transport instead of one made from ``url``.
    shm
        ``"auto"``: shared memory when the server is on this host, else Flight (decided
        once, here); True: shared memory or an error. See ``arrowinfer.client._shm``.
    retries
        More tries, on other servers, for a request that failed in transport (connection
        refused or reset, server gone, ``attempt_timeout``); never for a bad request.
    attempt_timeout
        Seconds one try may take before the request moves to another server (None: no
        limit, so a server that hangs holds a ``stream()`` forever: set it in production).
    health_interval
        Seconds between background health checks of the servers.
    fallback
        ``"error"`` (default): raise ``ServerUnavailable`` naming the servers tried when
        none can run a request. ``"local"``: run the model in this process from
        ``repository``, with a ``FallbackWarning`` and a count in :attr:`counters`.
    repository
        The model repository for ``fallback="local"``.
    verify_fallback
        True (default): once a server has reported the sha256 of a model's file (every
        result carries it), the local fallback refuses to run a local file whose sha256
        differs (``ModelError``, counted as ``fallbacks_refused``): its results would not
        be the server's. False: run it anyway. Without any server ever reached (laptop mode)
        there is nothing to compare; results carry the local file's sha256.
    token
        A bearer token for servers that ask for one (``arrowinfer serve
        --auth-token-file``); sent on every call. Use TLS, or it travels in clear text.
    **options
        Only these names (:data:`CLIENT_OPTIONS`); any other is a TypeError. TLS and the
        rest of ``pyarrow.flight.FlightClient``: ``tls_root_certs``, ``cert_chain``,
        ``private_key``, ``override_hostname``, ``disable_server_verification``,
        ``middleware``, ``write_size_limit_bytes``, ``generic_options``. Shared memory:
        ``copy_results``, ``min_shm_bytes``, ``max_free_regions``, ``probe_timeout`` (see
        :class:`~arrowinfer.client.ShmTransport`).
    """

    def _start(self) -> None:
        self._transport = self._make_transport()

    @property
    def _live(self) -> Transport:
        assert self._transport is not None  # made in __init__
        return self._transport

    def models(self) -> dict[str, pa.Schema]:
        """The served models and their input schemas (latest version of each)."""
        return self._latest(self._live.models(timeout=self.timeout))

    def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """The model's inputs, outputs and versions (KServe ModelMetadata) and its config."""
        return model_metadata(self._live, self.timeout, *split_name(model, version))

    def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """The model's input signature (cached)."""
        return self._schema(*split_name(model, version))

    def _schema(self, model: str, version: str | None) -> pa.Schema:
        cached = self._cached_schema(model, version)
        if cached is not None:
            return cached
        schema = self._live.schema(model, version, timeout=self.timeout)
        return self._remember_schema(model, version, schema)

    def infer(
        self,
        model: str,
        data: Any,
        *,
        version: str | int | None = None,
        timeout: float | UseClientDefault | None = USE_CLIENT_DEFAULT,
        cast: str | None = None,
    ) -> pa.RecordBatch:
        """Run a model over a batch of events; one result row per input row.

        Parameters
        ----------
        model
            Model name (``"name/version"`` also works).
        data
            ``pa.RecordBatch``, ``pa.Table``, dict of numpy arrays / ``Ragged`` / Arrow
            arrays, or an awkward record array, one column per model input.
        version
            A model version (default: the latest).
        timeout
            Seconds to wait (default: the client's).
        cast
            None (default): an input of another element type than the model's (float64
            for a float32 model, say) is an ``InvalidInput``. ``"same_kind"``: convert what
            numpy converts with ``casting="same_kind"`` (float64 -> float32, never float ->
            int), one copy of that input.

        Returns
        -------
        pyarrow.RecordBatch
            One column per model output; zero rows for a request of zero rows (the model is
            not run). Its schema metadata holds the server-side times
            (:func:`arrowinfer.client.server_times`) and the provenance
            (:func:`arrowinfer.client.provenance`: ``model``, ``model_version``,
            ``model_sha256``, ``execution_provider``). A :class:`TruncationWarning`, once
            per model, says that ragged inputs were cut to the model's size.

        Raises
        ------
        InvalidInput
            Before anything is sent, when ``data`` does not fit the model's signature.
        ModelNotFound, TransportError, ServerError
            From the server (see :mod:`arrowinfer.errors`).
        """
        name, ver = split_name(model, version)
        wait = self._wait_for(timeout)
        future = self._submit(name, ver, data, cast)
        try:
            return self._received(name, future.result(wait))
        except FutureTimeout:
            future.cancel()
            raise Timeout(f"model {name!r}: no answer within {wait} s") from None

    def infer_async(
        self, model: str, data: Any, *, version: str | int | None = None, cast: str | None = None
    ) -> Future[pa.RecordBatch]:
        """Like :meth:`infer`, but returns at once with a ``concurrent.futures.Future``."""
        name, ver = split_name(model, version)
        future = self._submit(name, ver, data, cast)
        future.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() else self._received(name, f.result())
        )
        return future

    def _submit(
        self, name: str, ver: str | None, data: Any, cast: str | None
    ) -> Future[pa.RecordBatch]:
        """Check and send one request; its future (per-event collections regrouped)."""
        batch, events = self._request(name, data, self._schema(name, ver), cast)
        sent = self._live.submit(name, ver, batch)
        if events is None:
            return sent
        out: Future[pa.RecordBatch] = Future()

        def settle(done: Future[pa.RecordBatch]) -> None:
            if done.cancelled():
                out.cancel()
            elif (err := done.exception()) is not None:
                out.set_exception(err)
            else:
                out.set_result(regroup(done.result(), events))

        sent.add_done_callback(settle)
        return out

    @overload
    def stream(
        self,
        model: str,
        data: Iterable[Any],
        *,
        version: str | int | None = None,
        window: int = 16,
        errors: Literal["raise"] = "raise",
        cast: str | None = None,
    ) -> Iterator[pa.RecordBatch]: ...

    @overload
    def stream(
        self,
        model: str,
        data: Iterable[Any],
        *,
        version: str | int | None = None,
        window: int = 16,
        errors: Literal["return"],
        cast: str | None = None,
    ) -> Iterator[pa.RecordBatch | Exception]: ...

    def stream(
        self,
        model: str,
        data: Iterable[Any],
        *,
        version: str | int | None = None,
        window: int = 16,
        errors: str = "raise",
        cast: str | None = None,
    ) -> Iterator[pa.RecordBatch] | Iterator[pa.RecordBatch | Exception]:
        """Pipeline many requests on one stream; yields their results in order.

        At most ``window`` requests are in flight at once.

        ``errors="raise"`` (default): the first request that fails (refused here before it
        is sent, or by the server) raises its error, and the stream ends there: results
        of later requests already sent are lost to the caller. ``errors="return"``: every
        request yields, in order, its result or its exception (an ``Exception`` instance,
        not raised), and the stream goes on: one bad event does not lose the others.
        ``cast`` as for :meth:`infer`.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        name, ver = split_name(model, version)
        if errors == "return":
            return self._outcomes(name, ver, data, window, cast)
        return self._results(name, ver, data, window, cast)

    def _results(
        self, name: str, ver: str | None, data: Iterable[Any], window: int, cast: str | None
    ) -> Iterator[pa.RecordBatch]:
        """``stream(errors="raise")``: one stream of the transport, results in order."""
        groupings: deque[np.ndarray | None] = deque()  # one per request sent, in order

        def requests() -> Iterator[pa.RecordBatch]:
            for item in data:
                batch, events = self._request(name, item, self._schema(name, ver), cast)
                groupings.append(events)
                yield batch

        for result in self._live.stream(name, ver, requests(), window):
            yield self._received(name, regroup(result, groupings.popleft()))

    def _outcomes(
        self, name: str, ver: str | None, data: Iterable[Any], window: int, cast: str | None
    ) -> Iterator[pa.RecordBatch | Exception]:
        """``stream(errors="return")``: each request's result or exception, in order."""
        in_flight: deque[Future[pa.RecordBatch]] = deque()

        def outcome(future: Future[pa.RecordBatch]) -> pa.RecordBatch | Exception:
            error = future.exception()
            return self._received(name, future.result()) if error is None else error

        for item in data:
            if len(in_flight) >= window:
                yield outcome(in_flight.popleft())
            try:
                future = self._submit(name, ver, item, cast)
            except Exception as err:  # noqa: BLE001 - refused here: this request's outcome
                future = Future()
                future.set_exception(err)
            in_flight.append(future)
        while in_flight:
            yield outcome(in_flight.popleft())

    def close(self) -> None:
        """Close the streams and the connection."""
        if not self._closed:
            self._closed = True
            self._live.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
