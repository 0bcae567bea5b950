"""The KServe v2 gRPC front end (Triton's ``inference.GRPCInferenceService``).

A thin adapter over the same :class:`~arrowinfer.server.InferenceCore` as Flight: every
RPC is protobuf -> core -> protobuf, so both protocols share the repository, the dynamic
batchers and the statistics. ``tritonclient.grpc`` (and CMSSW's SonicTriton) talk to it
unchanged; the generated classes come from tritonclient (``service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``).

Implemented: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``,
``ModelMetadata``, ``ModelConfig``, ``ModelInfer``, ``ModelStreamInfer``,
``ModelStatistics``, ``RepositoryIndex``, ``RepositoryModelLoad``,
``RepositoryModelUnload`` and the system shared-memory RPCs
(``SystemSharedMemoryRegister``, ``...Unregister``, ``...Status``; the rules are
:mod:`._v2memory`'s). The CUDA shared-memory RPCs answer ``UNIMPLEMENTED`` with a message
saying so; the trace and log-settings RPCs answer ``UNIMPLEMENTED`` (the generated base
class). What the gRPC and HTTP front ends share lives in :mod:`._v2`, :mod:`._v2tensors`
and :mod:`._v2memory`.

Inference
---------
- A request tensor of a batching model (``max_batch_size > 0``) has shape
  ``[batch, *dims]``; of a non-batching model, exactly ``dims``. Its data is either
  ``raw_input_contents`` (little-endian, row-major; then for every input, as Triton
  requires) or the typed ``contents`` (``fp32_contents``, ``int_contents``, ...; FP16 has
  none and must be raw). Raw data becomes an Arrow column without a further copy
  (``np.frombuffer`` over the message's bytes); typed contents are copied once into numpy.
- The request then goes through :meth:`InferenceCore.submit` (validation, dynamic batching)
  like a Flight request. Errors carry Triton's status codes, from the one table in
  :mod:`arrowinfer.errors` (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...); anything
  unexpected is INTERNAL with a generic message, and its traceback goes to the log.
- The response has the requested outputs (all when none is named), in
  ``raw_output_contents`` with shape ``[batch, *dims]``, as Triton answers. Its
  ``parameters`` carry the server-side times (``queue_ns``, ``compute_input_ns``,
  ``compute_infer_ns``, ``compute_output_ns``), as Flight's ``app_metadata`` does.
- Request parameters, in Triton's meaning (its schedule-policy extension): ``priority``
  (1 the highest; 0 or beyond ``priority_levels``: the model's default level) and
  ``timeout``, a **queue** timeout in microseconds, honoured only when the model's queue
  policy has ``allow_timeout_override`` and only to shorten its
  ``default_timeout_microseconds``; a request still queued when it expires is answered at
  once with UNAVAILABLE "Request timeout expired" (``timeout_action: REJECT``) or moved
  behind the others (``DELAY``). Only the gRPC deadline (tritonclient's ``client_timeout``)
  bounds the whole wait, with DEADLINE_EXCEEDED. (Before, ``timeout`` bounded the whole
  wait like a deadline; it no longer does.) The sequence flags are accepted and ignored (no
  sequence batcher). ``shared_memory_region``, ``shared_memory_offset`` and
  ``shared_memory_byte_size`` on an input or output place it in a registered system
  shared-memory region.
- The classification extension: a requested output with the ``classification`` parameter
  (tritonclient's ``class_count``) comes back as ``BYTES`` of shape ``[batch, k]`` (``[k]``
  without batching), the ``k`` highest scores of each row as ``"score:index:label"``, the
  label from the output's ``label_filename`` (``"score:index"`` without one), as Triton
  answers.
- **Variable dims** (``-1`` anywhere in ``dims``) take any size >= 0, one size for the
  whole request tensor, as in Triton.
- A request with more rows than ``max_batch_size`` is refused as Triton refuses it
  (INVALID_ARGUMENT "inference request batch-size must be <= N"), unless the model's config
  has the parameter ``arrowinfer.kserve_split_oversized: "true"``: then it is split and
  joined again, as Flight and shared-memory requests always are.
- **Ragged inputs travel padded.** A model whose config makes inputs ragged
  (``arrowinfer.ragged_inputs``, such as the example ``jet_tagger``'s ``points`` and
  ``features``) takes over KServe the dense tensors its metadata shows (``[-1, 100, 2]``),
  and its mask input (``arrowinfer.mask_input``, listed in the metadata) may be sent with
  them: it says how many items of each row are real (they come first, the padding after).
  Without it every position is real. The server pads each row again with
  ``arrowinfer.pad_value`` and fills the mask itself, exactly as for a Flight request of
  lists, so the padding values a KServe client sends do not reach the model. Triton's
  ragged batching (``allow_ragged_batch`` inputs) is served too: each request row ``[n]``
  of any ``n`` is one list, concatenated with the others without padding
  (docs/protocol-support.md).
- ``ModelStreamInfer`` serves a stream's requests pipelined, in order, and puts a failed
  request's error in ``ModelStreamInferResponse.error_message`` (with the request's ``id``
  in ``infer_response``) as Triton does; the stream goes on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ..errors import ArrowInferError, Unsupported, error_to_dict, grpc_status
from ..protocol import dump_json, host_port
from . import _v2
from ._auth import ModelControl
from ._core import InferenceCore, unexpected
from ._ordered import MAX_PENDING, MAX_PENDING_BYTES
from ._v2memory import CUDA_UNSUPPORTED, Peer, SystemRegions, cuda_status
from ._v2request import from_protobuf
from ._v2tensors import InferAnswer

__all__ = ["MAX_MESSAGE_BYTES", "KServeService", "start_kserve", "status_of"]

log = logging.getLogger(__name__)

#: gRPC message size limit both ways (Triton's and tritonclient's: INT32_MAX).
MAX_MESSAGE_BYTES = 2**31 - 1

#: Room for the protobuf fields around a request's data (names, shapes, parameters).
_ENVELOPE_BYTES = 1 << 20

# -- errors: the one place that maps exceptions to status codes --------------------------


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message an exception travels as (:func:`errors.grpc_status`).

    arrowinfer errors take their code from :data:`arrowinfer.errors.STATUS_CODES` (the most
    specific class wins) and keep their message; anything else is INTERNAL with a generic
    message (log it yourself).
    """
    name, message = grpc_status(err)
    return getattr(grpc.StatusCode, name), message


def _public(err: Exception, rpc: str) -> Exception:
    """``err`` if it is arrowinfer's; else a generic error, its details logged with an id."""
    return err if isinstance(err, ArrowInferError) else unexpected(err, f"KServe {rpc}")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _unary(method: _Method) -> _Method:
    """Run a unary RPC; turn any exception into ``context.abort`` with its status code."""

    @functools.wraps(method)
    def rpc(self: KServeService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as err:  # noqa: BLE001 -- the one place errors become status codes
            err = _public(err, method.__name__)
            code, message = status_of(err)
            detail = dump_json(
                error_to_dict(err)
            ).decode()  # the class, for arrowinfer's own clients
        context.set_trailing_metadata((("arrowinfer-error", detail),))
        context.abort(code, message)

    return rpc  # type: ignore[return-value]


# -- the servicer -----------------------------------------------------------------------


class KServeService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Serves an :class:`InferenceCore` over the KServe v2 gRPC protocol.

    Register it with :func:`add_to_server` (its inference answers need their own
    serializers), or use :func:`start_kserve`.
    """

    def __init__(
        self,
        core: InferenceCore,
        model_control: ModelControl | None = None,
        regions: SystemRegions | None = None,
        max_streams: int | None = None,
    ):
        self.core = core
        self.control = model_control or ModelControl()
        self.regions = regions
        self.max_streams = max_streams
        # an open stream holds one of the server's threads, idle or not: the streams may
        # take only some, so that they cannot starve the unary calls (health, ModelInfer)
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams else None
        self.port: int | None = None  # set once bound: picks a peer's socket in /proc/net/tcp

    def _check_control(self, action: str, context: Any) -> None:
        metadata = context.invocation_metadata() or ()
        self.control.check(action, [value for key, value in metadata if key == "authorization"])

    def _peer(self, context: Any) -> Peer:
        return Peer(context.peer(), self.port)

    # -- health and metadata ------------------------------------------------------------

    @_unary
    def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_unary
    def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.server_ready())

    @_unary
    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.core.get(request.name, request.version or None)
        except ArrowInferError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.core.ready)

    @_unary
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**_v2.server_metadata())

    @_unary
    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        metadata = self.core.metadata(request.name, request.version, mask=True)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    @_unary
    def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = self.core.get(request.name, request.version or None)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.version.config)
        return response

    @_unary
    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        stats = self.core.statistics(request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(
            model_stats=[
                json_format.ParseDict(s, pb.ModelStatistics(), ignore_unknown_fields=True)
                for s in stats
            ]
        )

    # -- repository ---------------------------------------------------------------------

    @_unary
    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        entries = _v2.index(self.core, request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries]
        )

    @_unary
    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        self._check_control("load", context)
        _v2.check_load_parameters(request.model_name, request.parameters)
        self.core.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_unary
    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control("unload", context)
        self.core.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory ------------------------------------------------------------

    def _regions(self) -> SystemRegions:
        if self.regions is None:
            raise Unsupported("system shared memory is not served by this server")
        return self.regions

    @_unary
    def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions().register(
            self._peer(context), request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions().unregister(self._peer(context), request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_unary
    def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions().status(self._peer(context), request.name):
            response.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    @_unary
    def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise Unsupported(CUDA_UNSUPPORTED)

    @_unary
    def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # none is ever registered

    @_unary
    def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        cuda_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    # -- inference ----------------------------------------------------------------------

    def _submit(
        self,
        request: pb.ModelInferRequest,
        context: Any,
        *,
        draining: bool = False,
        inline: bool = False,
    ) -> _v2.Pending:
        return _v2.submit(
            self.core,
            from_protobuf(request),
            context.time_remaining(),
            regions=self.regions,
            peer=self._peer(context),
            draining=draining,
            inline=inline,
        )

    def _result(self, pending: _v2.Pending, context: Any) -> InferAnswer:
        return _v2.wait_result(pending, regions=self.regions, peer=self._peer(context))

    @_unary
    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> InferAnswer:
        # the handler thread only waits for the result: it may as well run the model
        pending = self._submit(request, context, inline=True)
        context.add_callback(pending.future.cancel)  # a request nobody waits for is dropped
        return self._result(pending, context)

    def ModelStreamInfer(
        self, request_iterator: Iterable[pb.ModelInferRequest], context: Any
    ) -> Iterator[pb.ModelStreamInferResponse | InferAnswer]:
        """Pipelined: requests are read and queued while earlier ones run; answers in order
        (an answer without an error as an :class:`InferAnswer`, see :func:`add_to_server`).
        Beyond ``max_streams`` open streams a new one is refused (RESOURCE_EXHAUSTED)."""
        if self._streams is not None and not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server serves at most {self.max_streams} ModelStreamInfer streams at "
                "once (each holds one of its threads); close one, or send ModelInfer calls",
            )
        try:
            yield from self._stream(request_iterator, context)
        finally:
            if self._streams is not None:
                self._streams.release()

    def _stream(
        self, request_iterator: Iterable[pb.ModelInferRequest], context: Any
    ) -> Iterator[pb.ModelStreamInferResponse | InferAnswer]:
        # back-pressure: at most MAX_PENDING requests (MAX_PENDING_BYTES of their data) whose
        # responses are not sent yet; beyond that the stream is not read, and a client that
        # does not read its responses is stopped by gRPC's flow control
        Entry = tuple[pb.ModelInferRequest, _v2.Pending | Exception, int]
        pending: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
        room = threading.Condition()
        held = [0, 0]  # requests, bytes

        def wait_for_room() -> bool:
            """Wait until the stream may read another request; False once the call is gone."""
            with room:
                while held[0] and (held[0] >= MAX_PENDING or held[1] >= MAX_PENDING_BYTES):
                    if not context.is_active():
                        return False
                    room.wait(0.2)
            return context.is_active()

        def read() -> None:
            requests = iter(request_iterator)
            try:
                while wait_for_room():
                    request = next(requests, None)
                    if request is None:
                        return
                    try:
                        # an open stream is served to its end, even while the server stops
                        item: _v2.Pending | Exception = self._submit(
                            request, context, draining=True
                        )
                    except Exception as err:  # noqa: BLE001 -- answered in its response
                        item = err
                    # (not len(raw_input_contents): protobuf copies each on access)
                    size = item.nbytes if isinstance(item, _v2.Pending) else 0
                    with room:
                        held[0] += 1
                        held[1] += size
                    pending.put((request, item, size))
            except grpc.RpcError as err:  # the client cancelled or went away
                log.debug("KServe stream closed while reading: %s", err)
            finally:
                pending.put(None)

        reader = threading.Thread(target=read, name="kserve-stream-reader", daemon=True)
        reader.start()
        while (entry := pending.get()) is not None:
            request, outcome, size = entry
            response: pb.ModelStreamInferResponse | InferAnswer
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                response = self._result(outcome, context)
            except Exception as err:  # noqa: BLE001 -- the stream's error_message, as Triton
                err = _public(err, "ModelStreamInfer")
                response = pb.ModelStreamInferResponse(
                    error_message=status_of(err)[1],
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            del entry, outcome, request  # drop the request's data before waiting to send
            yield response
            with room:
                held[0] -= 1
                held[1] -= size
                room.notify_all()
        reader.join()


#: The service's one streaming RPC (grpc_service.proto); every other one is unary.
_STREAMING = "ModelStreamInfer"


def _serialize_stream(response: pb.ModelStreamInferResponse | InferAnswer) -> bytes:
    if isinstance(response, InferAnswer):
        return response.serialize_in_stream()
    return response.SerializeToString()


def add_to_server(servicer: KServeService, server: grpc.Server) -> None:
    """Register ``servicer`` as ``inference.GRPCInferenceService`` on ``server``.

    As ``service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server`` does, except that the
    inference RPCs serialize their :class:`InferAnswer` themselves (outputs written
    without protobuf's copies).
    """
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.name == _STREAMING:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behavior,
                request_deserializer=request.FromString,
                response_serializer=_serialize_stream,
            )
        else:
            serialize = InferAnswer.serialize if method.name == "ModelInfer" else None
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=request.FromString,
                response_serializer=serialize or response.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def start_kserve(
    core: InferenceCore,
    host: str = "127.0.0.1",
    port: int = 8001,
    *,
    max_workers: int = 32,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_request_bytes: int | None = None,
    tls: tuple[bytes, bytes] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    model_control: ModelControl | None = None,
    regions: SystemRegions | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``core`` over KServe v2 gRPC on ``host:port``; returns the server and its port.

    Parameters
    ----------
    core
        The models to serve (the same core as the Flight service).
    host, port
        Where to listen; port 0 picks a free port (returned).
    max_workers
        Threads answering RPCs. Each open ``ModelStreamInfer`` stream holds one, and so does
        each ``ModelInfer`` while it waits for its batch: requests batch together only up to
        this many at a time. Streams may hold half of them at most (more are refused with
        RESOURCE_EXHAUSTED), so that idle streams cannot starve the unary calls.
    max_message_bytes
        Largest request or response (both ways), at least 256 MB; the default is Triton's.
    max_request_bytes
        Bound requests lower (the server's ``--max-request-bytes``): gRPC refuses a larger
        message, gzip/deflate-compressed or not (gRPC checks the decompressed size and
        stops decompressing there), before any of it reaches Python. A little room is
        left for the protobuf around the data.
    tls
        ``(certificate_chain, private_key)`` as PEM bytes: listen with TLS.
    interceptors
        gRPC server interceptors (the bearer-token check, say), run before every RPC.
    model_control
        Who may call ``RepositoryModelLoad``/``Unload`` (default: nobody).
    regions
        The server's system shared-memory regions (shared with its HTTP front end); None:
        the system shared-memory RPCs answer UNIMPLEMENTED.

    Raises
    ------
    OSError
        If the address cannot be bound (in use, say).
    """
    if max_message_bytes < 256 * 2**20:
        raise ValueError(f"max_message_bytes must be at least 256 MiB, got {max_message_bytes}")
    receive = max_message_bytes
    if max_request_bytes is not None:
        receive = min(receive, max_request_bytes + _ENVELOPE_BYTES)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kserve"),
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", receive),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent share
        ],
        interceptors=list(interceptors),
    )
    servicer = KServeService(core, model_control, regions, max_streams=max(1, max_workers // 2))
    add_to_server(servicer, server)
    address = host_port(host, port)
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, key = tls
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    except RuntimeError as err:
        bound = 0
        cause: BaseException | None = err
    else:
        cause = None
    if not bound:
        server.stop(None)
        raise OSError(f"KServe gRPC cannot listen on {address} (in use?)") from cause
    servicer.port = bound
    server.start()
    return server, bound
