"""The backend interface, small enough for a CPU and a GPU backend side by side.

A backend takes a list of requests (record batches already validated against the model's
input signature) and returns one result batch per request, like a Triton backend's
``execute(requests) -> responses``: whether requests are merged on the host or assembled on
a device is the backend's business.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple

import pyarrow as pa
from tritonclient.grpc import model_config_pb2 as mc

from ..repository import ModelVersion

__all__ = ["Backend", "Timings", "create_backend"]


class Timings(NamedTuple):
    """Nanoseconds spent in one ``execute``, as Triton's statistics split them."""

    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int


class Backend(abc.ABC):
    """One instance of one model version (a Triton ``instance_group`` member)."""

    def __init__(self, model: ModelVersion):
        self.model = model

    @abc.abstractmethod
    def execute(self, requests: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], Timings]:
        """Run the model over the requests as one batch; one result per request, in order.

        Each result has the model's output signature and the row count of its request.
        """

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the instance's resources."""


def _gpu_device(model: ModelVersion, device: str | None) -> str | None:
    """The CUDA device a model runs on, or None for the CPU.

    ``device`` wins; without it, the first ``KIND_GPU`` instance group (and its first
    ``gpus`` entry) does.
    """
    if device is not None:
        return device if device.startswith("cuda") else None
    for group in model.config.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            return f"cuda:{group.gpus[0]}" if group.gpus else "cuda:0"
    return None


def create_backend(model: ModelVersion, *, device: str | None = None) -> Backend:
    """A backend instance for a model version, chosen from its ``instance_group`` kind.

    A GPU model (``device="cuda[:N]"``, or ``KIND_GPU`` in the config) gets a
    :class:`~arrowinfer.backends.device.DeviceBackend`: batches are assembled on the
    device with CuPy and run by onnxruntime's CUDA provider. Anything else gets an
    :class:`~arrowinfer.backends.ort.OnnxRuntimeBackend` on the CPU.

    Parameters
    ----------
    model
        The model version to run.
    device
        Overrides the config: ``"cpu"`` or ``"cuda:N"``.

    Raises
    ------
    ModelError
        If the model cannot be loaded, or asks for a GPU where CuPy, a CUDA device or
        onnxruntime's CUDA provider is missing (the message names the model and the fix).
    """
    gpu = _gpu_device(model, device)
    if gpu is not None:
        from .device import DeviceBackend  # CuPy loads only when a GPU model does

        return DeviceBackend(model, device=gpu)
    from .ort import OnnxRuntimeBackend  # onnxruntime loads only when a model does

    return OnnxRuntimeBackend(model, device=device)
