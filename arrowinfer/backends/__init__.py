"""Backends run one model version on one device: the only place onnxruntime (and CuPy) are imported.

``create_backend(model)`` picks the backend from the model's config: onnxruntime on the
CPU (``ort``), or batches assembled on a GPU with CuPy (``device``). Importing this package
imports neither onnxruntime nor CuPy; they load when a backend is created, CuPy through
``import_cupy(feature)``, whose error says how to install it.
"""

from __future__ import annotations

from ._cupy import import_cupy
from ._factory import create_backend
from .base import Backend, Timings

__all__ = ["Backend", "Timings", "create_backend", "import_cupy"]
