"""Running models in this process: SONIC's local fallback, and laptop mode.

:class:`LocalTransport` reads a model repository and runs its models with the same
backends the server uses (``arrowinfer.backends``), with the same checks (row counts, the
batch dimension of every output, 64-byte aligned inputs), so its results are the server's
bit for bit (``tests/test_reproducibility.py``). Each result's schema metadata carries its
provenance as a server's does (``model``, ``model_version``, ``model_sha256``,
``execution_provider``). It imports ``backends/``, never ``server/``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..backends import Backend, create_backend
from ..backends.base import truncation
from ..config import config_json
from ..errors import ArrowInferError, ModelNotFound, ServerError
from ..protocol import result_metadata
from ..repository import ModelVersion, Repository
from ..schema import validate
from ._transport import in_order

__all__ = ["LocalTransport"]


class LocalTransport:
    """Runs the models of a repository in-process, one backend per model version.

    Parameters
    ----------
    repository
        A Triton-layout model repository.
    device
        ``"cpu"`` (default) or ``"cuda:N"``.
    """

    location = "local"

    def __init__(self, repository: str | os.PathLike[str], *, device: str | None = "cpu"):
        self.repository = Repository(Path(repository))
        self.location = f"local:{self.repository.path}"
        self._device = device
        self._models: dict[tuple[str, str | None], tuple[ModelVersion, Backend]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arrowinfer-local")

    def _model(self, model: str, version: str | None) -> tuple[ModelVersion, Backend]:
        key = (model, version)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                versions = {str(v.version): v for v in self.repository.load(model)}
                chosen = versions.get(version) if version else versions[max(versions, key=int)]
                if chosen is None:
                    raise ModelNotFound(model, [f"{model}/{v}" for v in versions], version=version)
                loaded = (chosen, create_backend(chosen, device=self._device))
                self._models[key] = loaded
            return loaded

    def models(self, timeout: float | None = None) -> dict[str, dict[str, pa.Schema]]:
        out: dict[str, dict[str, pa.Schema]] = {}
        for name in self.repository.names():
            for version in self.repository.load(name):
                out.setdefault(name, {})[str(version.version)] = version.inputs
        return out

    def schema(self, model: str, version: str | None, timeout: float | None = None) -> pa.Schema:
        return self._model(model, version)[0].inputs

    def action(
        self, name: str, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        if name == "health":
            return {"live": True}
        body = body or {}
        version, _ = self._model(body["model"], body.get("version"))
        if name == "model.metadata":  # the versions as a server lists them
            metadata = version.metadata()
            if not body.get("version"):
                served = self.repository.load(body["model"])
                metadata["versions"] = [str(v.version) for v in served]
            return metadata
        if name == "model.config":
            return config_json(version.config)
        raise NotImplementedError(f"action {name!r} is not available in-process")

    def sha256(self, model: str, version: str | None) -> str:
        """The sha256 (hex) of the model file a request for ``model`` would run here."""
        return self._model(model, version)[0].sha256

    def _run(self, model: str, version: str | None, batch: pa.RecordBatch) -> pa.RecordBatch:
        chosen, backend = self._model(model, version)
        max_rows = chosen.max_request_rows if chosen.max_batch_size > 0 else 1
        validate(batch, chosen.inputs, model=model, max_rows=max_rows)  # as the server does
        start = time.perf_counter_ns()
        try:
            result = self._execute(chosen, backend, batch)
        except ArrowInferError:
            raise
        except Exception as err:  # onnxruntime's own errors: as the server reports them
            raise ServerError(f"model {model!r}: execution failed: {err}") from err
        # the backend checks the batch dimension of every output; this checks what it returned
        if result.num_rows != batch.num_rows:
            raise ServerError(
                f"model {model!r}: a result has {result.num_rows} rows for a request of "
                f"{batch.num_rows}"
            )
        elapsed = time.perf_counter_ns() - start
        truncated = truncation(chosen, batch)
        message: dict[str, Any] = {
            "compute_infer_ns": elapsed,
            "model": chosen.name,
            "model_version": str(chosen.version),
            "model_sha256": chosen.sha256,
            "execution_provider": backend.provider,
        }
        if truncated.entries:
            message.update(truncated_entries=truncated.entries, truncated_items=truncated.items)
        return result.replace_schema_metadata(result_metadata(message))

    @staticmethod
    def _execute(chosen: ModelVersion, backend: Backend, batch: pa.RecordBatch) -> pa.RecordBatch:
        if batch.num_rows == 0:  # as the server: no rows back, the model not run
            result = pa.RecordBatch.from_pylist([], schema=chosen.outputs)
        elif chosen.max_batch_size > 0 and batch.num_rows > chosen.max_batch_size:
            step = chosen.max_batch_size
            parts = [batch.slice(i, step) for i in range(0, batch.num_rows, step)]
            results: list[pa.RecordBatch] = []
            for part in parts:  # one execute per slice, as the server's batcher would
                results += backend.execute([part])[0]
            result = pa.concat_batches(results)
        else:
            [result], _ = backend.execute([batch])
        return result

    def submit(
        self, model: str, version: str | None, batch: pa.RecordBatch
    ) -> Future[pa.RecordBatch]:
        return self._pool.submit(self._run, model, version, batch)

    def stream(
        self, model: str, version: str | None, batches: Iterable[pa.RecordBatch], window: int
    ) -> Iterator[pa.RecordBatch]:
        return in_order(lambda b: self.submit(model, version, b), batches, window)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            backends = [b for _, b in self._models.values()]
            self._models.clear()
        for backend in backends:
            backend.close()
