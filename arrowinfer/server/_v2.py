"""What the KServe v2 front ends (gRPC and HTTP/REST) share, apart from tensor conversion.

Both front ends turn their wire request into an :class:`~._v2request.InferRequest` (gRPC
from its protobuf, HTTP from its JSON and binary parts), so the rules for inference live
once: here (submit, wait, timeouts) and in :mod:`._v2tensors` (tensors). Neither front end
imports the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NamedTuple

from .. import __version__
from ..batching import Completed, Submission
from ..errors import InvalidInput, ServerUnavailable, Timeout
from ..schema import TensorSpec
from ._core import InferenceCore, LoadedModel
from ._v2memory import NO_PEER, Peer, SystemRegions
from ._v2request import InferRequest, int_parameter
from ._v2tensors import InferAnswer, infer_response, request_batch, requested_outputs

__all__ = [
    "EXTENSIONS",
    "Pending",
    "Prepared",
    "check_load_parameters",
    "index",
    "prepare",
    "server_metadata",
    "submit",
    "wait_result",
    "wait_result_async",
]

#: Triton's protocol extensions both v2 front ends serve (``ServerMetadata.extensions``).
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
    "system_shared_memory",
)


def server_metadata() -> dict[str, Any]:
    """``ServerMetadata``: name, version and extensions."""
    return {"name": "arrowinfer", "version": __version__, "extensions": list(EXTENSIONS)}


def index(core: InferenceCore, ready_only: bool) -> list[dict[str, Any]]:
    """``RepositoryIndex``: every model directory (``ready_only``: the READY ones)."""
    entries = core.index()
    return [e for e in entries if e.get("state") == "READY"] if ready_only else entries


def check_load_parameters(model: str, keys: Iterable[str]) -> None:
    """Refuse ``RepositoryModelLoad`` parameters that would send a config or files.

    Raises
    ------
    InvalidInput
        Naming the parameters: the repository is the only source of models.
    """
    override = sorted(k for k in keys if k == "config" or k.startswith("file:"))
    if override:
        raise InvalidInput(
            f"loading with parameters {override} (a config or files sent by the client) is "
            "not supported; change the repository and load again",
            model=model,
        )


class Prepared(NamedTuple):
    """A request converted and checked, not yet submitted: what its response needs."""

    request: InferRequest
    model: LoadedModel
    outputs: list[TensorSpec]
    submission: Submission
    timeout: float | None

    def submitted(self, future: Future[Completed]) -> Pending:
        return Pending(
            self.request,
            self.model,
            self.outputs,
            future,
            self.timeout,
            self.submission.batch.nbytes,
        )


class Pending(NamedTuple):
    """A submitted request: what its response needs."""

    request: InferRequest
    model: LoadedModel
    outputs: list[TensorSpec]
    future: Future[Completed]
    timeout: float | None
    nbytes: int  # the request's Arrow data, for back-pressure


def _timeout(remaining: float | None) -> float | None:
    """Seconds to wait for a result: the transport's deadline (gRPC's; HTTP has none).

    The request's ``timeout`` parameter is Triton's queue timeout, which the batcher
    applies (:meth:`InferenceCore.submit`), not a bound on the whole wait.
    """
    # without a deadline gRPC gives an enormous number of seconds
    return None if remaining is None or remaining > 1e9 else max(remaining, 0.0)


def prepare(
    core: InferenceCore,
    request: InferRequest,
    remaining: float | None,
    *,
    regions: SystemRegions | None = None,
    peer: Peer = NO_PEER,
    draining: bool = False,
    model: LoadedModel | None = None,
) -> Prepared:
    """Convert and check one request (``remaining``: seconds the transport still allows).

    ``regions`` and ``peer`` serve inputs and outputs in Triton system shared memory.
    ``model``: the request's model, when the caller has looked it up.

    Raises
    ------
    ModelNotFound, InvalidInput, ServerUnavailable
        Nothing is queued.
    """
    if model is None:
        model = core.get(request.model_name, request.model_version or None)
    outputs = requested_outputs(model.version, request, regions=regions, peer=peer)
    batch = request_batch(
        model.version, request, regions=regions, peer=peer, max_bytes=model.max_request_bytes
    )
    params, name = request.parameters, request.model_name
    submission = core.check(
        model,
        batch,
        draining=draining,
        priority=int_parameter(params, "priority", model=name),
        timeout_us=int_parameter(params, "timeout", model=name),
    )
    return Prepared(request, model, outputs, submission, _timeout(remaining))


def submit(
    core: InferenceCore,
    request: InferRequest,
    remaining: float | None,
    *,
    regions: SystemRegions | None = None,
    peer: Peer = NO_PEER,
    draining: bool = False,
    inline: bool = False,
) -> Pending:
    """Convert, check and queue one request (:func:`prepare`, then
    :meth:`InferenceCore.submit`). ``inline``: run it in this thread when an instance is
    idle, for a caller that only waits for its result (never from an event loop).

    Raises
    ------
    ModelNotFound, InvalidInput, ServerBusy, ServerUnavailable
        Before anything is queued.
    """
    prepared = prepare(core, request, remaining, regions=regions, peer=peer, draining=draining)
    future = core.submit_checked(prepared.model, prepared.submission, inline=inline)
    return prepared.submitted(future)


def _timed_out(pending: Pending) -> Timeout:
    pending.future.cancel()
    return Timeout(
        f"model {pending.model.version.name!r}: no result within {pending.timeout:.3g} s"
    )


def wait_result(
    pending: Pending, *, regions: SystemRegions | None = None, peer: Peer = NO_PEER
) -> InferAnswer:
    """Block for a request's result; its answer (outputs in regions written there).

    Raises
    ------
    Timeout
        No result within the request's timeout (the request is cancelled).
    ServerUnavailable
        The request was cancelled before its batch ran.
    """
    try:
        done = pending.future.result(pending.timeout)
    except FutureTimeout:
        raise _timed_out(pending) from None
    except CancelledError:  # the client went away before its batch ran
        raise ServerUnavailable("the request was cancelled") from None
    return _answer(pending, done, regions, peer)


async def wait_result_async(
    pending: Pending, *, regions: SystemRegions | None = None, peer: Peer = NO_PEER
) -> InferAnswer:
    """:func:`wait_result` for an event loop: waits without holding a thread.

    If the waiting task is cancelled (the client went away), so is the request. (The
    thread that finishes the request wakes the loop with one callback: less work on the
    loop's thread than ``asyncio.wrap_future`` and ``asyncio.wait``, which chain futures
    and make a task's wait set for every request.)
    """
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: Future[Completed]) -> None:  # in the thread that finished the request
        if not loop.is_closed():
            loop.call_soon_threadsafe(_set, woken)

    pending.future.add_done_callback(wake)
    timer = None if pending.timeout is None else loop.call_later(pending.timeout, _set, woken)
    try:
        await woken
    except asyncio.CancelledError:
        pending.future.cancel()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if not pending.future.done():
        raise _timed_out(pending)
    if pending.future.cancelled():
        raise ServerUnavailable("the request was cancelled")
    return _answer(pending, pending.future.result(), regions, peer)


def _set(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _answer(
    pending: Pending, done: Completed, regions: SystemRegions | None, peer: Peer
) -> InferAnswer:
    version, request, outputs = pending.model.version, pending.request, pending.outputs
    return infer_response(version, request, outputs, done, regions=regions, peer=peer)
