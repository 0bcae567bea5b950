"""Backends run one model version on one device: the only place onnxruntime (and CuPy) are imported.

``create_backend(model)`` picks the backend from the model's config. Importing this package
imports neither onnxruntime nor CuPy; they load when a backend is created.
"""

from __future__ import annotations

from .base import Backend, Timings, create_backend

__all__ = ["Backend", "Timings", "create_backend"]
