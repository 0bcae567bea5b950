"""CuPy, imported only when a feature needs it, with the fix in the error message.

``import arrowinfer`` never imports CuPy; :func:`import_cupy` does, at the point of use, as
awkward's ``_connect/cuda`` and uproot's ``extras`` do for their optional dependencies.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["import_cupy"]

INSTALL = "pip install 'arrowinfer[gpu]'"


def import_cupy(feature: str) -> ModuleType:
    """The ``cupy`` module, once it is known to see at least one CUDA device.

    Parameters
    ----------
    feature
        What needs CuPy, for the error message ("device-side batching of model 'x'").

    Raises
    ------
    ModuleNotFoundError
        CuPy is not installed; the message says how to install it.
    RuntimeError
        CuPy is installed but cannot be used: it fails to load its CUDA libraries, there
        is no CUDA driver, or the driver sees no device.
    """
    try:
        import cupy
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{feature} needs CuPy: {INSTALL} (CuPy for CUDA 12; use the cupy-cudaXXx "
            "package that matches the machine's CUDA driver)",
            name="cupy",
        ) from err
    except ImportError as err:  # installed, but its CUDA libraries do not load
        raise RuntimeError(
            f"{feature}: CuPy is installed but does not import ({err}); check that the "
            "cupy-cudaXXx package matches the CUDA driver (nvidia-smi)"
        ) from err
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except (RuntimeError, OSError) as err:  # CUDARuntimeError is a RuntimeError
        raise RuntimeError(
            f"{feature}: CuPy finds no usable CUDA driver ({err}); run on a machine with an "
            "NVIDIA GPU, or on the CPU (--device cpu)"
        ) from err
    if count == 0:
        raise RuntimeError(
            f"{feature}: CuPy sees no CUDA device (CUDA_VISIBLE_DEVICES?); run on a machine "
            "with an NVIDIA GPU, or on the CPU (--device cpu)"
        )
    return cupy
