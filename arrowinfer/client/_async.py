"""``AsyncClient``: the asyncio twin of ``Client``, with no thread per request.

>>> async with AsyncClient("grpc://127.0.0.1:8815") as client:
...     result = await client.infer("facile", {"hits": hits})

pyarrow's Flight has no asyncio API, so each blocking step (making the transport,
a first schema lookup, writing a request) runs in order on one I/O thread of the client,
and its outcome comes back to the event loop with ``call_soon_threadsafe``; results are
awaited on the futures the transport's reader threads resolve. Nothing blocks the loop,
and the loop's default executor is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from ..errors import Timeout
from ._base import USE_CLIENT_DEFAULT, BaseClient, UseClientDefault, model_metadata, split_name
from ._convert import regroup
from ._transport import Transport

__all__ = ["AsyncClient"]

_T = TypeVar("_T")


class _IOThread:
    """One thread that runs an :class:`AsyncClient`'s blocking steps, in order.

    Each step's outcome goes back to the awaiting event loop with ``call_soon_threadsafe``.
    Steps are short: opening a connection or a stream, a schema lookup, writing a request
    (which waits only when the server does not keep up); waiting for results happens on
    the event loop, on futures the transport's reader threads resolve.
    """

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            job = None

    def put(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread, after every job put before it."""
        self._jobs.put(job)

    def call(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
        """``func(*args, **kwargs)`` on the thread; a future of the running loop for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def job() -> None:
            try:
                result = func(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
                _settle(loop, future, None, err)
            else:
                _settle(loop, future, result, None)

        self.put(job)
        return future

    def stop(self) -> None:
        """End the thread once the jobs put before are done."""
        self._jobs.put(None)


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    """Resolve an asyncio future from another thread (unless it was cancelled meanwhile)."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it any more
        loop.call_soon_threadsafe(settle)


class AsyncClient(BaseClient):
    """The asyncio twin of :class:`Client`: the same parameters, the same names as coroutines.

    Nothing blocks the event loop, and no thread is taken per request: the blocking steps
    (connecting, a first schema lookup, writing a request) run in order on one I/O thread
    of this client, and results are awaited on the futures the transport's reader threads
    resolve, bridged to the loop. The transport is made on that thread too (a
    shared-memory probe may take a moment); ``async with`` waits for it, and raises its
    error. Close with ``await client.aclose()`` or ``async with``.
    """

    def _start(self) -> None:
        self._io = _IOThread("arrowinfer-async-io")
        # a client dropped without aclose() does not keep its thread waiting forever
        weakref.finalize(self, self._io.stop)
        self._made: Future[Transport] = Future()
        self._io.put(self._make)

    def _make(self) -> None:
        try:
            self._transport = self._make_transport()
        except BaseException as err:  # noqa: BLE001 - every call of the client raises it
            self._made.set_exception(err)
        else:
            self._made.set_result(self._transport)

    def _live(self) -> Transport:
        """The transport (on the I/O thread, after it was made), or the error making it."""
        return self._made.result()

    async def _call(self, func: Callable[[Transport], _T]) -> _T:
        """``func(transport)`` on the I/O thread, awaited."""
        return await self._io.call(lambda: func(self._live()))

    async def models(self) -> dict[str, pa.Schema]:
        """See :meth:`Client.models`."""
        return self._latest(await self._call(lambda t: t.models(timeout=self.timeout)))

    async def metadata(self, model: str, *, version: str | int | None = None) -> dict[str, Any]:
        """See :meth:`Client.metadata`."""
        name, ver = split_name(model, version)
        return await self._call(lambda t: model_metadata(t, self.timeout, name, ver))

    async def schema(self, model: str, *, version: str | int | None = None) -> pa.Schema:
        """See :meth:`Client.schema`."""
        return await self._schema(*split_name(model, version))

    async def _schema(self, model: str, version: str | None) -> pa.Schema:
        cached = self._cached_schema(model, version)
        if cached is not None:
            return cached
        schema = await self._call(lambda t: t.schema(model, version, timeout=self.timeout))
        return self._remember_schema(model, version, schema)

    async def _submit(
        self, name: str, ver: str | None, data: Any, cast: str | None = None
    ) -> asyncio.Future[pa.RecordBatch]:
        """Check and send one request; an asyncio future of its result."""
        batch, events = self._request(name, data, await self._schema(name, ver), cast)
        sent = await self._call(lambda t: t.submit(name, ver, batch))
        result = asyncio.wrap_future(sent)  # its callback settles it on this loop: no thread
        if events is None:
            return result
        return asyncio.ensure_future(_regrouped(result, events))

    async def infer(
        self,
        model: str,
        data: Any,
        *,
        version: str | int | None = None,
        timeout: float | UseClientDefault | None = USE_CLIENT_DEFAULT,
        cast: str | None = None,
    ) -> pa.RecordBatch:
        """See :meth:`Client.infer`."""
        name, ver = split_name(model, version)
        wait = self._wait_for(timeout)
        result = await self._submit(name, ver, data, cast)
        try:
            return self._received(name, await asyncio.wait_for(result, wait))
        except asyncio.TimeoutError:
            raise Timeout(f"model {name!r}: no answer within {wait} s") from None

    async def stream(
        self,
        model: str,
        data: Iterable[Any],
        *,
        version: str | int | None = None,
        window: int = 16,
        errors: str = "raise",
        cast: str | None = None,
    ) -> AsyncIterator[Any]:
        """See :meth:`Client.stream`: results in order, at most ``window`` in flight;
        ``errors="return"`` yields each request's result or its exception."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        name, ver = split_name(model, version)
        in_flight: deque[asyncio.Future[pa.RecordBatch]] = deque()

        async def outcome(future: asyncio.Future[pa.RecordBatch]) -> Any:
            if errors == "raise":
                return self._received(name, await future)
            try:
                return self._received(name, await future)
            except Exception as err:  # noqa: BLE001 - the request's outcome, in order
                return err

        for item in data:
            if len(in_flight) >= window:
                yield await outcome(in_flight.popleft())
            try:
                in_flight.append(await self._submit(name, ver, item, cast))
            except Exception as err:
                if errors == "raise":
                    raise
                refused: asyncio.Future[pa.RecordBatch] = asyncio.get_running_loop().create_future()
                refused.set_exception(err)
                in_flight.append(refused)
        while in_flight:
            yield await outcome(in_flight.popleft())

    async def aclose(self) -> None:
        """Close the streams and the connection; the I/O thread ends."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            if self._made.exception() is None:
                self._made.result().close()

        try:
            await self._io.call(close)
        finally:
            self._io.stop()

    async def __aenter__(self) -> AsyncClient:
        try:
            await self._io.call(self._made.result)  # the transport is made, or its error
        except BaseException:
            await self.aclose()  # __aexit__ will not run: end the I/O thread here
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _regrouped(result: asyncio.Future[pa.RecordBatch], events: np.ndarray) -> pa.RecordBatch:
    return regroup(await result, events)
