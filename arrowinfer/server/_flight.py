"""The Arrow Flight front end (the protocol of DESIGN.md).

- ``list_flights``/``get_flight_info``/``get_schema``: one flight per ready model version,
  descriptor path ``[model, version]``, schema = the model's input signature.
- ``do_exchange`` on ``[model]`` or ``[model, version]``: each record batch the client
  writes is one request; the server writes exactly one result batch per request, in order.
  Requests are pipelined: the stream is read while earlier requests run. A failed request
  gets an empty batch whose ``app_metadata`` holds the error; a good one's ``app_metadata``
  holds the server-side times (``queue_ns``, ``compute_input_ns``, ...).
- ``do_action``: ``health``, ``ready``, ``server.metadata``, ``repository.index``,
  ``model.load``, ``model.unload``, ``model.config``, ``model.metadata``,
  ``model.statistics``. Bodies and results are JSON.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pyarrow as pa
from pyarrow import flight
from tritonclient.grpc import model_config_pb2 as mc

from .. import __version__
from ..batching import Completed
from ..errors import ArrowInferError, InvalidInput, error_to_dict, to_flight
from ..schema import datatype
from ._core import InferenceCore, LoadedModel

__all__ = ["ACTIONS", "FlightService", "model_metadata"]

log = logging.getLogger(__name__)

ACTIONS: dict[str, str] = {
    "health": "Is the server live? -> {live}",
    "ready": "Is the server (or {model, version}) ready? -> {ready}",
    "server.metadata": "Name, version and extensions of the server",
    "repository.index": "Every model in the repository, its versions and state",
    "model.load": "{model}: load or reload a model",
    "model.unload": "{model}: stop serving a model",
    "model.config": "{model, version?}: the model's complete config (Triton JSON)",
    "model.metadata": "{model, version?}: inputs and outputs (KServe ModelMetadata)",
    "model.statistics": "{model?, version?}: Triton statistics -> {model_stats}",
}


def _descriptor_model(descriptor: flight.FlightDescriptor) -> tuple[str, str | None]:
    path = [p.decode() if isinstance(p, bytes) else p for p in (descriptor.path or [])]
    if descriptor.descriptor_type != flight.DescriptorType.PATH or not 1 <= len(path) <= 2:
        raise InvalidInput(
            "a model is named by a path descriptor [model] or [model, version]",
            got=f"{descriptor!r}",
        )
    return path[0], (path[1] if len(path) == 2 else None)


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """KServe's ModelMetadata (shapes with -1 for the batch dimension) as JSON."""
    version = model.version
    batch = [-1] if version.max_batch_size > 0 else []

    def tensors(entries: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": e.name,
                "datatype": datatype(mc.DataType.Name(e.data_type)).kserve,
                "shape": batch + list(e.dims),
            }
            for e in entries
        ]

    return {
        "name": version.name,
        "versions": [str(version.version)],
        "platform": version.config.platform or "onnxruntime_onnx",
        "inputs": tensors(c for c in version.config.input if c.name != version.mask_input),
        "outputs": tensors(version.config.output),
    }


class FlightService(flight.FlightServerBase):
    """Serves an :class:`InferenceCore` over Arrow Flight.

    Parameters
    ----------
    core
        The models to serve.
    location
        Where to listen, e.g. ``grpc://127.0.0.1:8815`` (port 0 picks a free one) or
        ``grpc+unix:///path/to.sock``.
    **kwargs
        Passed to ``pyarrow.flight.FlightServerBase`` (TLS certificates, middleware, ...).
    """

    def __init__(self, core: InferenceCore, location: str, **kwargs: Any):
        super().__init__(location, **kwargs)
        self.core = core
        self._actions: dict[str, Callable[[dict[str, Any]], Any]] = {
            "health": lambda body: {"live": True},
            "ready": self._ready,
            "server.metadata": lambda body: {
                "name": "arrowinfer",
                "version": __version__,
                "extensions": ["model_repository", "statistics", "arrow_flight"],
            },
            "repository.index": lambda body: self.core.index(),
            "model.load": lambda body: {
                "loaded": [m.version.version for m in self.core.load(_required(body, "model"))]
            },
            "model.unload": lambda body: self.core.unload(_required(body, "model")) or {},
            "model.config": lambda body: self.core.config(self._model(body)),
            "model.metadata": lambda body: model_metadata(self._model(body)),
            "model.statistics": lambda body: {
                "model_stats": self.core.statistics(body.get("model"), body.get("version"))
            },
        }

    # -- discovery -----------------------------------------------------------------------

    def _info(self, model: LoadedModel) -> flight.FlightInfo:
        version = model.version
        descriptor = flight.FlightDescriptor.for_path(version.name, str(version.version))
        return flight.FlightInfo(version.inputs, descriptor, [], -1, -1)

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        for model in self.core.served():
            yield self._info(model)

    def get_flight_info(
        self, context: Any, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._info(self._lookup(descriptor))

    def get_schema(self, context: Any, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self._lookup(descriptor).version.inputs)

    def _lookup(self, descriptor: flight.FlightDescriptor) -> LoadedModel:
        try:
            return self.core.get(*_descriptor_model(descriptor))
        except ArrowInferError as err:
            raise to_flight(err) from None

    # -- inference -----------------------------------------------------------------------

    def do_exchange(
        self,
        context: Any,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        model = self._lookup(descriptor)
        results: queue.SimpleQueue[tuple[Future[Completed] | BaseException, Any] | None] = (
            queue.SimpleQueue()
        )
        writer_thread: threading.Thread | None = None
        failure: list[BaseException] = []
        try:
            for chunk in reader:
                if chunk.data is None:
                    continue  # a metadata-only message asks for nothing
                try:
                    request_meta = _json_or_empty(chunk.app_metadata)
                except InvalidInput as err:
                    request_meta = {"error": err}
                if writer_thread is None:
                    compression = request_meta.get("compression")
                    if compression not in (None, "zstd", "lz4_frame", "lz4"):
                        compression = None
                    compression = "lz4_frame" if compression == "lz4" else compression
                    options = pa.ipc.IpcWriteOptions(compression=compression)
                    writer.begin(model.version.outputs, options=options)
                    writer_thread = threading.Thread(
                        target=self._write_results,
                        args=(model, writer, results, failure),
                        name="flight-writer",
                        daemon=True,
                    )
                    writer_thread.start()
                future: Future[Completed] | BaseException
                try:
                    if "error" in request_meta:
                        raise request_meta["error"]
                    future = self.core.submit(model, chunk.data)
                except ArrowInferError as err:
                    future = err
                results.put((future, request_meta.get("id")))
                if failure:
                    break
        finally:
            results.put(None)
            if writer_thread is not None:
                writer_thread.join()
        if failure:
            raise to_flight(failure[0])

    @staticmethod
    def _write_results(
        model: LoadedModel,
        writer: flight.MetadataRecordBatchWriter,
        results: queue.SimpleQueue[tuple[Future[Completed] | BaseException, Any] | None],
        failure: list[BaseException],
    ) -> None:
        """Write results in request order as they complete (runs beside the reader)."""
        empty = None
        while (item := results.get()) is not None:
            outcome, request_id = item
            meta: dict[str, Any] = {} if request_id is None else {"id": request_id}
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                done = outcome.result()
            except ArrowInferError as err:
                if empty is None:
                    empty = pa.RecordBatch.from_pylist([], schema=model.version.outputs)
                meta["error"] = error_to_dict(err)
                batch = empty
            else:
                batch = done.batch
                meta.update(
                    queue_ns=done.queue_ns,
                    compute_input_ns=done.compute_input_ns,
                    compute_infer_ns=done.compute_infer_ns,
                    compute_output_ns=done.compute_output_ns,
                )
            if failure:
                continue  # the stream is gone; drain the queue so the reader can finish
            try:
                writer.write_with_metadata(batch, json.dumps(meta).encode())
            except (pa.ArrowException, OSError) as err:  # the client went away
                log.debug("stream closed while writing results: %s", err)
                failure.append(err)

    # -- actions -------------------------------------------------------------------------

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    def do_action(self, context: Any, action: flight.Action) -> Iterator[bytes]:
        handler = self._actions.get(action.type)
        try:
            if handler is None:
                raise InvalidInput(
                    f"unknown action {action.type!r}", expected=sorted(ACTIONS), got=action.type
                )
            body = _json_or_empty(action.body.to_pybytes() if action.body is not None else b"")
            result = handler(body)
        except ArrowInferError as err:
            raise to_flight(err) from None
        except Exception as err:
            log.exception("action %s failed", action.type)
            raise to_flight(err) from None
        yield json.dumps(result).encode()

    def _ready(self, body: dict[str, Any]) -> dict[str, bool]:
        if body.get("model"):
            try:
                self.core.get(body["model"], body.get("version"))
            except ArrowInferError:
                return {"ready": False}
            return {"ready": self.core.ready}
        return {"ready": self.core.ready}

    def _model(self, body: dict[str, Any]) -> LoadedModel:
        return self.core.get(_required(body, "model"), body.get("version"))


def _required(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"the action needs {{{key!r}: ...}} in its JSON body", got=body)
    return value


def _json_or_empty(data: bytes | pa.Buffer | None) -> dict[str, Any]:
    if not data:
        return {}
    raw = data.to_pybytes() if isinstance(data, pa.Buffer) else data
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise InvalidInput(f"metadata is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInput("metadata must be a JSON object", got=type(value).__name__)
    return value
