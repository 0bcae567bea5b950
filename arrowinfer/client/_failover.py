"""Several servers behind one transport: balancing, health, retries, failover, fallback.

- **Balancing:** each request goes to the healthy server with the fewest requests
  outstanding among those that serve its model (from each server's ``list_flights``).
- **Health:** a background thread asks every server ``health`` and its model list every
  ``health_interval`` seconds; a server that fails a request or a check is taken out, and
  comes back when it answers again.
- **Retries:** a request that fails because of the transport (connection refused or reset,
  server killed mid-stream, no answer within ``attempt_timeout``) is sent again to another
  server, after an exponential backoff, up to ``retries`` more times. A request that fails
  because of its content (:class:`~arrowinfer.errors.RequestError`) is not retried.
- **Fallback:** when no server could run a request, it runs on the ``fallback`` transport
  (the model in-process, :class:`~arrowinfer.client._local.LocalTransport`) with a warning,
  counted in :attr:`FailoverTransport.counters`; without a fallback the error names every
  server tried.
- **Same model:** every server result names the sha256 of the model file that made it.
  Once a server has reported a model's sha256, the fallback refuses (``ModelError``, counted
  as ``fallbacks_refused``) to run a local model file whose sha256 differs, unless
  ``verify_fallback=False``: its results would not be the server's. With no server ever
  reached (laptop mode) there is nothing to compare, and the fallback runs.

Every request resolves exactly once, so ``stream()`` yields one result per request, in
order, even when a server dies in the middle of it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import re
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..errors import (
    ArrowInferError,
    ModelError,
    ModelNotFound,
    ServerUnavailable,
    Timeout,
    TransportError,
)
from ._transport import Transport, in_order

__all__ = ["FailoverTransport", "FallbackWarning"]

log = logging.getLogger(__name__)


#: What gRPC appends to an error for its own debugging (up to the next server's error).
_GRPC_DEBUG = re.compile(r"\. gRPC client debug context:.*?(?=; grpc|; shm|$)", re.DOTALL)


class FallbackWarning(RuntimeWarning):
    """A model ran in this process because no server could run it."""


@dataclass(eq=False)
class _Member:
    location: str
    transport: Transport
    outstanding: int = 0
    healthy: bool = True
    models: set[str] | None = None  # None: not known yet
    failures: int = 0

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class _Scheduler:
    """One thread that runs delayed actions: retries after backoff, attempt timeouts."""

    def __init__(self) -> None:
        self._heap: list[_Timer] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="arrowinfer-scheduler", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, action: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, _Timer(time.monotonic() + delay, next(self._seq), action))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    not self._heap or self._heap[0].when > time.monotonic()
                ):
                    self._cond.wait(self._heap[0].when - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                timer = heapq.heappop(self._heap)
            try:
                timer.action()
            except Exception:
                log.exception("scheduled action failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)


class FailoverTransport:
    """A transport over several servers, with an optional in-process fallback.

    Parameters
    ----------
    members
        One transport per server (``FlightTransport``, ``ShmTransport``, ...).
    retries
        How many more servers (or times) to try after a transport failure.
    backoff
        Seconds before the first retry; doubled each time, with jitter.
    attempt_timeout
        Seconds one attempt may take before it counts as a transport failure and the
        request moves on (None: no limit).
    health_interval
        Seconds between background health checks of every server.
    fallback
        Where to run a request no server could run (None: raise instead).
    verify_fallback
        Refuse to fall back to a local model whose sha256 differs from the one a server
        reported for it (default True).
    """

    def __init__(
        self,
        members: list[Transport],
        *,
        retries: int = 2,
        backoff: float = 0.05,
        attempt_timeout: float | None = None,
        health_interval: float = 2.0,
        fallback: Transport | None = None,
        verify_fallback: bool = True,
    ):
        if not members and fallback is None:
            raise ValueError("no servers and no fallback: nothing can run a request")
        self._members = [_Member(getattr(t, "location", repr(t)), t) for t in members]
        self._retries = retries
        self._backoff = backoff
        self._attempt_timeout = attempt_timeout
        self._fallback = fallback
        self._verify_fallback = verify_fallback
        # (model, requested version) -> the model_sha256 a server reported last
        self._reported: dict[tuple[str, str | None], str] = {}
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._scheduler = _Scheduler()
        self._closed = threading.Event()
        self._health_interval = health_interval
        self._health = threading.Thread(
            target=self._check_health, name="arrowinfer-health", daemon=True
        )
        if self._members:
            self._health.start()

    @property
    def members(self) -> list[Transport]:
        """The servers' transports."""
        return [m.transport for m in self._members]

    @property
    def location(self) -> str:
        return ",".join(m.location for m in self._members) or "local"

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _timeout(self, timeout: float | None) -> float | None:
        """The deadline of one try at a call: ``timeout``, at most ``attempt_timeout``."""
        if self._attempt_timeout is None:
            return timeout
        return self._attempt_timeout if timeout is None else min(timeout, self._attempt_timeout)

    # -- choosing a server ---------------------------------------------------------------

    def _choose(self, model: str, tried: set[int]) -> _Member | None:
        """The least busy healthy server of the model not tried yet (else any untried one).

        When no server is known to serve the model (it was loaded since the last health
        check, say), every server is a candidate: one may have it by now.
        """
        with self._lock:
            claimed = any(m.serves(model) for m in self._members)
            candidates = [
                m for m in self._members if id(m) not in tried and (m.serves(model) or not claimed)
            ]
            healthy = [m for m in candidates if m.healthy] or candidates
            if not healthy:
                return None
            member = min(healthy, key=lambda m: m.outstanding)
            member.outstanding += 1
            return member

    def _release(self, member: _Member, ok: bool | None) -> None:
        """One attempt ended: ``ok`` True (answered), False (transport failure), None (other)."""
        with self._lock:
            member.outstanding -= 1
            if ok:
                member.failures = 0
                member.healthy = True
            elif ok is False:
                member.failures += 1
                if member.healthy:
                    log.warning("server %s taken out after a failure", member.location)
                member.healthy = False

    # -- requests ------------------------------------------------------------------------

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        result: Future[pa.RecordBatch] = Future()
        result.set_running_or_notify_cancel()
        self._count("requests")
        self._attempt(result, model, version, batch, tried=set(), attempt=0, errors=[])
        return result

    def _attempt(
        self,
        result: Future[pa.RecordBatch],
        model: str,
        version: str | None,
        batch: pa.RecordBatch,
        *,
        tried: set[int],
        attempt: int,
        errors: list[tuple[str, Exception]],
    ) -> None:
        if result.done():
            return
        member = self._choose(model, tried)
        if member is None:
            self._give_up(result, model, version, batch, errors)
            return
        tried.add(id(member))
        settled = threading.Lock()  # the answer and the attempt timeout race: first one wins

        def retry(error: Exception) -> None:
            errors.append((member.location, error))
            if attempt >= self._retries:
                self._give_up(result, model, version, batch, errors)
                return
            self._count("retries")
            delay = self._backoff * 2**attempt * (0.5 + random.random())
            if len(tried) >= len(self._members):
                tried.clear()  # every server had a go: start over after the backoff
            self._scheduler.call_later(
                delay,
                lambda: self._attempt(
                    result, model, version, batch, tried=tried, attempt=attempt + 1, errors=errors
                ),
            )

        def done(future: Future[pa.RecordBatch]) -> None:
            if not settled.acquire(blocking=False):
                return
            error = future.exception()
            if error is None:
                self._release(member, True)
                with self._lock:
                    if member.models is not None:
                        member.models.add(model)  # it has it, whatever the last check said
                answer = future.result()
                meta = answer.schema.metadata or {}
                sha = meta.get(b"model_sha256")
                if sha:  # asked for as given, and for the version that answered
                    served = meta.get(b"model_version", b"").decode() or version
                    with self._lock:
                        self._reported[(model, version)] = sha.decode()
                        self._reported[(model, served)] = sha.decode()
                if not result.done():
                    result.set_result(answer)
            elif isinstance(error, TransportError):
                self._release(member, False)
                retry(error)
            elif isinstance(error, ModelNotFound) and version is None:
                with self._lock:  # routing was stale: this server does not have it
                    if member.models is not None:
                        member.models.discard(model)
                self._release(member, None)
                retry(error)
            else:
                self._release(member, None)
                if not result.done():
                    result.set_exception(error)

        def timed_out() -> None:
            if settled.acquire(blocking=False):
                self._release(member, False)
                retry(Timeout(f"{member.location}: no answer within {self._attempt_timeout} s"))

        try:
            future = member.transport.submit(model, version, batch)
        except TransportError as err:
            failed: Future[pa.RecordBatch] = Future()
            failed.set_exception(err)
            done(failed)
            return
        except Exception as err:  # noqa: BLE001 - handed to the caller's future
            self._release(member, None)
            result.set_exception(err)
            return
        if self._attempt_timeout is not None:
            self._scheduler.call_later(self._attempt_timeout, timed_out)
        future.add_done_callback(done)

    def _give_up(
        self,
        result: Future[pa.RecordBatch],
        model: str,
        version: str | None,
        batch: pa.RecordBatch,
        errors: list[tuple[str, Exception]],
    ) -> None:
        if result.done():
            return
        if errors and all(isinstance(e, ModelNotFound) for _, e in errors):
            result.set_exception(errors[-1][1])  # the servers are up; none has the model
            return
        said = (str(e) if str(e).startswith(where) else f"{where}: {e}" for where, e in errors)
        detail = "; ".join(dict.fromkeys(said)) or f"no server serves model {model!r}"
        if self._fallback is not None:
            refused = self._refuse_fallback(model, version)
            if refused is not None:
                self._count("fallbacks_refused")
                result.set_exception(refused)
                return
            self._count("fallbacks")
            with self._lock:  # once per model; never without servers (laptop mode)
                first = model not in self._warned and bool(self._members)
                self._warned.add(model)
            if first:
                try:
                    brief = _GRPC_DEBUG.sub("", detail)  # gRPC's own context: for its logs
                    warnings.warn(
                        f"model {model!r}: no server could run it ({brief}); "
                        "running it in this process",
                        FallbackWarning,
                        stacklevel=2,
                    )
                except Warning as err:  # warnings are errors here (-W error): the caller's
                    result.set_exception(err)
                    return
            try:
                local = self._fallback.submit(model, version, batch)
            except Exception as err:  # noqa: BLE001 - handed to the caller's future
                result.set_exception(err)
                return
            local.add_done_callback(lambda f: _copy_outcome(f, result))
            return
        self._count("failures")
        servers = ", ".join(m.location for m in self._members) or "none"
        message = f"model {model!r}: no server could run it (servers tried: {servers}): {detail}"
        timed_out = bool(errors) and all(isinstance(e, Timeout) for _, e in errors)
        result.set_exception(Timeout(message) if timed_out else ServerUnavailable(message))

    def _refuse_fallback(self, model: str, version: str | None) -> ModelError | None:
        """Why the local model must not stand in for the server's (None: it may)."""
        with self._lock:
            reported = self._reported.get((model, version))
        if reported is None or not self._verify_fallback:
            return None
        try:
            local = self._fallback.sha256(model, version)  # type: ignore[union-attr]
        except Exception as err:  # noqa: BLE001 - the fallback cannot load it: say so
            return ModelError(f"model {model!r}: the local fallback cannot load it: {err}")
        if local == reported:
            return None
        return ModelError(
            f"model {model!r}: no server could run it, and the local fallback's model file "
            f"(sha256 {local}) differs from the server's (sha256 {reported}): its results "
            "would not be the server's; refusing to fall back (verify_fallback=False allows it)"
        )

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        """Requests each fail over on their own; results in order, exactly one each."""
        return in_order(lambda b: self.submit(model, version, b), batches, window)

    # -- calls that are not requests ------------------------------------------------------

    def _call(self, what: str, call: Callable[[Transport], Any], model: str | None = None) -> Any:
        """Run a call on healthy servers first (then the others, then the fallback).

        Every server is tried ``1 + retries`` times, with the requests' backoff between
        rounds, so a client that starts before its servers waits for them.
        """
        errors: dict[str, str] = {}
        for attempt in range(self._retries + 1 if self._members else 0):
            if attempt:
                time.sleep(self._backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            with self._lock:
                serving = [m for m in self._members if model is None or m.serves(model)]
                # none claims the model: ask them all, so a server can say ModelNotFound
                order = sorted(
                    serving or self._members, key=lambda m: (not m.healthy, m.outstanding)
                )
            for member in order:
                try:
                    return call(member.transport)
                except TransportError as err:
                    self._mark_down(member)
                    errors[member.location] = str(err)
        if self._fallback is not None:
            return call(self._fallback)
        detail = "; ".join(f"{where}: {err}" for where, err in errors.items()) or "no servers"
        raise ServerUnavailable(f"{what}: no server answered ({detail})")

    def _discover(self, timeout: float | None) -> None:
        """Ask the servers whose models are not known yet which they serve (once each).

        Routing by model then holds from the first request on, not only after the first
        health check.
        """
        with self._lock:
            unknown = [m for m in self._members if m.models is None]
        for member in unknown:
            try:
                models = set(member.transport.models(timeout=self._timeout(timeout)))
            except TransportError:
                self._mark_down(member)
                continue
            except ArrowInferError as err:  # it answers, but not to us (Unauthenticated)
                log.debug("server %s: %s", member.location, err)
                continue
            with self._lock:
                member.models = models
                member.healthy = True

    def _mark_down(self, member: _Member) -> None:
        with self._lock:
            member.healthy = False

    def models(self, timeout: float | None = None) -> dict[str, dict[str, pa.Schema]]:
        merged: dict[str, dict[str, pa.Schema]] = {}
        errors = []
        for member in list(self._members):
            try:
                listing = member.transport.models(timeout=self._timeout(timeout))
            except TransportError as err:  # named by its server once
                text = str(err)
                errors.append(
                    text if text.startswith(member.location) else f"{member.location}: {text}"
                )
                continue
            for name, versions in listing.items():
                merged.setdefault(name, {}).update(versions)
        if len(errors) == len(self._members):
            if self._fallback is not None:
                return self._fallback.models()
            raise ServerUnavailable(f"no server answered: {'; '.join(errors)}")
        return merged

    def schema(self, model: str, version: str | None, timeout: float | None = None) -> pa.Schema:
        self._discover(timeout)
        return self._call(
            f"model {model!r}",
            lambda t: t.schema(model, version, timeout=self._timeout(timeout)),
            model,
        )

    def action(
        self, name: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        model = (body or {}).get("model")
        return self._call(
            f"action {name!r}",
            lambda t: t.action(name, body, timeout=self._timeout(timeout)),
            model,
        )

    # -- health ----------------------------------------------------------------------------

    def _check_health(self) -> None:
        while not self._closed.wait(self._health_interval):
            for member in list(self._members):
                if self._closed.is_set():
                    return
                try:
                    member.transport.action("health", {}, timeout=self._health_interval)
                    models = set(member.transport.models(timeout=self._health_interval))
                except TransportError:
                    with self._lock:
                        if member.healthy and not self._closed.is_set():
                            log.warning("server %s taken out: health check failed", member.location)
                        member.healthy = False
                    continue
                except ArrowInferError as err:  # it answers, but not to us (Unauthenticated)
                    log.debug("server %s: health check: %s", member.location, err)
                    continue
                except Exception:
                    if self._closed.is_set():
                        return  # the transports were closed under the check
                    raise
                with self._lock:
                    if not member.healthy:
                        log.info("server %s is back", member.location)
                    member.healthy = True
                    member.failures = 0
                    member.models = models

    def health(self) -> dict[str, bool]:
        """Each server's state as this client sees it."""
        with self._lock:
            return {m.location: m.healthy for m in self._members}

    def close(self) -> None:
        self._closed.set()
        self._scheduler.close()
        for member in self._members:
            member.transport.close()
        if self._fallback is not None:
            self._fallback.close()


def _copy_outcome(source: Future[pa.RecordBatch], target: Future[pa.RecordBatch]) -> None:
    if target.done():
        return
    error = source.exception()
    if error is None:
        target.set_result(source.result())
    else:
        target.set_exception(error)
