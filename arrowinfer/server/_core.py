"""The inference core every front end adapts: models, batchers, statistics, readiness.

Flight, KServe v2 gRPC and the shared-memory service all call the same
:class:`InferenceCore`, so they share the repository, the queues and the statistics.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import create_backend
from ..batching import Completed, DynamicBatcher, Submission
from ..config import config_json
from ..dense import AnyBatch, DenseBatch, validate_dense
from ..errors import InvalidInput, ModelError, ModelNotFound, ServerError, ServerUnavailable
from ..repository import ModelVersion, Repository, default_warmup, warmup_requests
from ..schema import check_data, validate
from ..statistics import ModelStatistics

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_BYTES_PARAMETER",
    "InferenceCore",
    "LoadedModel",
    "unexpected",
]

log = logging.getLogger(__name__)

#: The most bytes of data one request may make the server hold (``--max-request-bytes``).
MAX_REQUEST_BYTES = 1 << 30

#: The model config parameter that overrides it for one model.
MAX_REQUEST_BYTES_PARAMETER = "arrowinfer.max_request_bytes"


def unexpected(err: BaseException, what: str) -> ServerError:
    """The error a client gets for an exception the server did not expect.

    Its text, type and traceback may show server internals (paths, code, memory): they go
    to the log under a random incident id, and the client gets only that id.
    """
    incident = secrets.token_hex(6)
    log.error("%s failed (incident %s)", what, incident, exc_info=err)
    return ServerError(f"internal error (incident {incident}); the server log has the details")


def _check_name(name: object, version: object) -> None:
    """A model name is a string, a version a string or an integer (never a bool)."""
    if not isinstance(name, str):
        raise InvalidInput("a model name must be a string", got=type(name).__name__)
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        raise InvalidInput("a model version must be a string or an integer", got=repr(version))


def _request_limit(version: ModelVersion, default: int) -> int:
    """The model's ``arrowinfer.max_request_bytes`` parameter, else ``default``.

    Raises
    ------
    ModelError
        The parameter is not a positive integer.
    """
    param = version.config.parameters.get(MAX_REQUEST_BYTES_PARAMETER)
    text = param.string_value.strip() if param is not None else ""
    if not text:
        return default
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ModelError(
            f"model {version.name!r}: {MAX_REQUEST_BYTES_PARAMETER} must be a positive "
            f"integer (bytes), got {text!r}"
        )
    return limit


@dataclass
class LoadedModel:
    """One served model version with its batcher."""

    version: ModelVersion
    batcher: DynamicBatcher
    #: The most bytes of data one request may have (:data:`MAX_REQUEST_BYTES` or the model's).
    max_request_bytes: int = MAX_REQUEST_BYTES

    @property
    def statistics(self) -> ModelStatistics:
        return self.batcher.statistics


def _empty(model: LoadedModel) -> Future[Completed]:
    """The result of a request of no rows (an event without jets): the model not run."""
    empty: Future[Completed] = Future()
    empty.set_result(model.batcher.empty())
    return empty


def _warm_up(version: ModelVersion, backends: list[Any]) -> None:
    """Run the config's ``model_warmup`` samples on every instance, before it serves.

    Raises
    ------
    ModelError
        A sample that cannot be built or fails to run: the model does not load, as in Triton.
    """
    samples = warmup_requests(version)
    if not samples and version.parameter("arrowinfer.warmup", "true") != "false":
        # arrowinfer's own: a session's first run is slow (see default_warmup); a model
        # that cannot take zeros still loads, it only starts cold
        batch = default_warmup(version)
        for backend in backends:
            try:
                backend.execute([batch])
            except Exception as err:  # noqa: BLE001 -- logged; the model still serves
                log.warning("model %s: warm-up with zeros failed: %s", version.name, err)
                break
            finally:
                backend.take_counters()  # the warm-up's work (copies, say) is no request's
        return
    for backend in backends:
        for name, runs, batch in samples:
            validate(batch, version.inputs, model=version.name)
            for _ in range(runs):
                try:
                    backend.execute([batch])
                except Exception as err:
                    raise ModelError(
                        f"model {version.name!r}: warmup sample {name!r} failed: {err}"
                    ) from err
                finally:
                    backend.take_counters()
    if samples:
        log.info("model %s: %d warmup sample(s) run", version.name, len(samples))


class InferenceCore:
    """Loads models from a repository and runs requests through their batchers.

    Parameters
    ----------
    repository
        The model repository.
    device
        ``"cpu"`` or ``"cuda:N"`` for every model, overriding their instance groups.
    models
        Only these models are loaded at start (all when None).
    max_request_bytes
        The most bytes of data one request may have (its Arrow buffers, decompressed);
        a model's config parameter ``arrowinfer.max_request_bytes`` overrides it.
    """

    def __init__(
        self,
        repository: Repository,
        *,
        device: str | None = None,
        models: list[str] | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        strict_readiness: bool = False,
    ):
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self.repository = repository
        self.device = device
        self.max_request_bytes = max_request_bytes
        self._models: dict[str, dict[int, LoadedModel]] = {}
        self._failed: dict[str, str] = {}
        self._unloaded: dict[str, list[int]] = {}  # the versions an unload stopped serving
        self._lock = threading.RLock()
        self.strict_readiness = strict_readiness
        self.ready = False
        for name in models if models is not None else repository.names():
            try:
                self.load(name)
            except (ModelError, ModelNotFound) as err:
                log.error("model %s not loaded: %s", name, err)
                self._failed[name] = getattr(err, "reason", None) or str(err)
        self.ready = True

    @property
    def failed(self) -> dict[str, str]:
        """The models that failed to load and serve no version: name -> the error."""
        with self._lock:
            return dict(self._failed)

    def server_ready(self) -> bool:
        """Triton's server readiness: accepting requests and, with ``strict_readiness``
        (``--strict-readiness``), no model failed to load."""
        return self.ready and not (self.strict_readiness and self._failed)

    # -- models --------------------------------------------------------------------------

    def load(self, name: str) -> list[LoadedModel]:
        """Load (or reload) every selected version of a model.

        Raises
        ------
        ModelError
            Naming the file and the problem, by its path inside the repository: clients
            see these messages (``repository.index``), and the server's paths are not
            theirs to see.
        ModelNotFound
            No such model directory.
        """
        try:
            return self._load(name)
        except ModelNotFound as err:  # "failed to load", as Triton's message, which
            # tritonclient's model-control examples look for
            reason = "no such model in the repository"
            raise ModelNotFound(name, err.available, reason=reason) from None
        except ModelError as err:
            message = self._inside_repository(str(err))
            with self._lock:
                if name not in self._models:  # a model still served keeps its versions
                    self._failed[name] = message
            raise ModelError(message) from None

    def _inside_repository(self, text: str) -> str:
        """``text`` with the repository's own path left out of every file it names."""
        root = Path(self.repository.path)
        for prefix in {str(root), str(root.resolve())}:
            text = text.replace(prefix.rstrip(os.sep) + os.sep, "")
        return text

    def _load(self, name: str) -> list[LoadedModel]:
        versions = self.repository.load(name)
        loaded = {}
        try:
            for version in versions:
                limit = _request_limit(version, self.max_request_bytes)
                count = sum(g.count or 1 for g in version.config.instance_group) or 1
                backends = [create_backend(version, device=self.device) for _ in range(count)]
                _warm_up(version, backends)
                loaded[version.version] = LoadedModel(
                    version, DynamicBatcher(version, backends), limit
                )
        except Exception:
            for model in loaded.values():
                model.batcher.close()
            raise
        with self._lock:
            old = self._models.pop(name, {})
            self._models[name] = loaded
            self._failed.pop(name, None)
            self._unloaded.pop(name, None)
        for model in old.values():
            model.batcher.close()
        for model in loaded.values():
            v = model.version
            log.info(
                "loaded model %s version %d (%d instance(s), max_batch_size %d)",
                v.name,
                v.version,
                model.batcher.instances,
                v.max_batch_size,
            )
        return list(loaded.values())

    def unload(self, name: str) -> None:
        """Stop serving a model; queued requests finish first. A model not served is no
        error, as Triton's (clean-up code unloads what may not be loaded); one that failed
        to load is forgotten (it no longer holds readiness back)."""
        with self._lock:
            if name not in self._models:
                self._failed.pop(name, None)
                log.info("unload %r: not served", name)
                return
            old = self._models.pop(name)
            self._unloaded[name] = sorted(old)
        for model in old.values():
            model.batcher.close()
        log.info("unloaded model %s", name)

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """A served model version; the latest when ``version`` is None or empty.

        Raises
        ------
        ModelNotFound
            Listing the served models (or versions).
        InvalidInput
            ``name`` is not a string, or ``version`` not a string or integer.
        """
        _check_name(name, version)
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                raise ModelNotFound(name, self._models, reason=self._failed.get(name))
            if version in (None, "", -1):
                return versions[max(versions)]
            # ASCII digits only: int() would also take " 1", "+1" and other scripts' digits
            text = str(version)
            number = int(text) if text.isascii() and text.isdigit() and len(text) < 20 else -1
            if number not in versions:
                raise ModelNotFound(name, [f"{name}/{v}" for v in versions], version=str(version))
            return versions[number]

    def metadata(
        self, name: str, version: str | int | None = None, *, mask: bool = False
    ) -> dict[str, Any]:
        """KServe's model metadata (:meth:`ModelVersion.metadata`) of a served version; its
        ``versions`` list every served version of the model when ``version`` is None or
        empty, as Triton's (the versions a client may ask for), else that one.

        Raises
        ------
        ModelNotFound, InvalidInput
            As :meth:`get`.
        """
        model = self.get(name, version)
        metadata = model.version.metadata(mask=mask)
        if version in (None, "", -1):
            with self._lock:
                served = sorted(self._models.get(name, {model.version.version: model}))
            metadata["versions"] = [str(v) for v in served]
        return metadata

    def served(self) -> list[LoadedModel]:
        """Every served model version, by name then version."""
        with self._lock:
            return [
                m for name in sorted(self._models) for _, m in sorted(self._models[name].items())
            ]

    # -- inference -----------------------------------------------------------------------

    def submit(
        self,
        model: LoadedModel,
        batch: AnyBatch,
        *,
        draining: bool = False,
        priority: int = 0,
        timeout_us: int = 0,
        inline: bool = False,
    ) -> Future[Completed]:
        """Validate a request and queue it; the future gives its result.

        Every front end comes through here, and nothing reads the request's buffers before:
        first :func:`~arrowinfer.schema.check_data` (lengths, offsets and buffer sizes
        agree), then the model's signature (:func:`~arrowinfer.schema.validate`; for the
        KServe front ends' dense tensors, :func:`~arrowinfer.dense.validate_dense`).
        ``draining=True`` accepts it while the server stops (not ready, models still
        loaded): a request on a stream that was open before the stop began. ``priority``
        and ``timeout_us`` are the request's, in Triton's meaning (see
        :meth:`DynamicBatcher.submit`). ``inline=True`` runs it in this thread when an
        instance is idle (:meth:`DynamicBatcher.submit`): for a caller that has nothing
        else to do meanwhile.

        Raises
        ------
        InvalidInput, ServerBusy, ServerUnavailable
            At once, before anything is queued.
        """
        submission = self.check(
            model, batch, draining=draining, priority=priority, timeout_us=timeout_us
        )
        return self.submit_checked(model, submission, inline=inline)

    def submit_checked(
        self, model: LoadedModel, submission: Submission, *, inline: bool = False
    ) -> Future[Completed]:
        """:meth:`submit` for a request that :meth:`check` passed.

        Raises
        ------
        ServerBusy, ServerUnavailable
            At once, as :meth:`DynamicBatcher.submit`.
        """
        batch, shapes, priority, timeout_us = submission
        if batch.num_rows == 0:  # an event without jets: no rows back, the model not run
            return _empty(model)
        return model.batcher.submit(
            batch, shapes=shapes, priority=priority, timeout_us=timeout_us, inline=inline
        )

    def submit_many(
        self, model: LoadedModel, submissions: Sequence[Submission], *, inline: bool = False
    ) -> list[Future[Completed]]:
        """Requests that :meth:`check` passed and that arrived together, as
        :meth:`DynamicBatcher.submit_many` takes them: with ``inline=True`` they may run
        in this thread, merged. Errors in queueing them are in their futures."""
        live = [s for s in submissions if s.batch.num_rows]
        futures = iter(model.batcher.submit_many(live, inline=inline) if live else ())
        return [next(futures) if s.batch.num_rows else _empty(model) for s in submissions]

    def check(
        self,
        model: LoadedModel,
        batch: AnyBatch,
        *,
        draining: bool = False,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> Submission:
        """The checks of :meth:`submit`, without queueing: the request as
        :meth:`DynamicBatcher.submit_many` takes it.

        Raises
        ------
        InvalidInput, ServerUnavailable
            As :meth:`submit`.
        """
        if not self.ready and not draining:
            raise ServerUnavailable("the server is not ready (starting or shutting down)")
        version = model.version
        max_rows = version.max_request_rows if version.max_batch_size > 0 else 1
        dense = isinstance(batch, DenseBatch)
        if not dense:
            check_data(batch, version.inputs, model=version.name)
        size = batch.nbytes  # what the server holds for it (checked: buffers are real)
        if size > model.max_request_bytes:
            raise InvalidInput(
                "the request is too large (max_request_bytes)",
                model=version.name,
                expected=f"<= {model.max_request_bytes} bytes of data",
                got=f"{size} bytes",
            )
        if dense:
            if not version.dense_inputs:  # a front end's mistake: the backend needs Arrow
                raise ServerError(f"model {version.name!r} does not take dense tensors")
            shapes = validate_dense(
                batch, version.input_specs, model=version.name, max_rows=max_rows
            )
        else:
            shapes = validate(batch, version.inputs, model=version.name, max_rows=max_rows)
        return Submission(batch, shapes, priority, timeout_us)

    # -- management ----------------------------------------------------------------------

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model directory, its versions and state (an
        unloaded model's versions UNAVAILABLE with reason "unloaded", a model never loaded
        only its name, as Triton's)."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for name in self.repository.names():
                versions = self._models.get(name)
                if versions:
                    out.extend(
                        {"name": name, "version": str(v), "state": "READY", "reason": ""}
                        for v in sorted(versions)
                    )
                elif name in self._unloaded:
                    out.extend(
                        {
                            "name": name,
                            "version": str(v),
                            "state": "UNAVAILABLE",
                            "reason": "unloaded",
                        }
                        for v in self._unloaded[name]
                    )
                elif name in self._failed:
                    out.append(
                        {
                            "name": name,
                            "version": "",
                            "state": "UNAVAILABLE",
                            "reason": self._failed[name],
                        }
                    )
                else:  # never loaded (explicit mode): Triton gives only its name
                    out.append({"name": name})
        return out

    def config(self, model: LoadedModel) -> dict[str, Any]:
        """The model's complete config as Triton's JSON (:func:`~arrowinfer.config.config_json`)."""
        return config_json(model.version.config)

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """Triton's statistics of one model version, one model, or every model."""
        _check_name(name or "", version or None)
        if name:
            if version:
                return [self.get(name, version).statistics.as_dict()]
            with self._lock:
                if name not in self._models:
                    raise ModelNotFound(name, self._models)
                return [m.statistics.as_dict() for _, m in sorted(self._models[name].items())]
        return [m.statistics.as_dict() for m in self.served()]

    def close(self) -> None:
        """Not ready any more; finish queued requests, stop every model."""
        self.ready = False
        with self._lock:
            models = [m for versions in self._models.values() for m in versions.values()]
            self._models.clear()
        for model in models:
            model.batcher.close()
