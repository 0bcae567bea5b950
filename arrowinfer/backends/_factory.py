"""``create_backend``: the one place that picks a backend class for a model version.

It lives apart from :mod:`.base` because it imports the backends, which import the base
class: kept in ``base``, the two would import each other.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from ..repository import ModelVersion
from .base import Backend

__all__ = ["create_backend"]


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
    :class:`~arrowinfer.backends.ort.OnnxRuntimeBackend` on the CPU; so does a GPU model
    with ragged batching (``allow_ragged_batch``), run by onnxruntime's CUDA provider.

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
    if gpu is not None and not model.ragged_batch_inputs:
        from .device import DeviceBackend  # CuPy loads only when a GPU model does

        return DeviceBackend(model, device=gpu)
    from .ort import OnnxRuntimeBackend  # onnxruntime loads only when a model does

    # ragged batching is assembled on the host; onnxruntime's CUDA provider still runs it
    return OnnxRuntimeBackend(model, device=gpu or device)
