"""A stand-in for the part of CuPy that ``arrowinfer.backends.device`` uses, over numpy.

It lets CI run the CuPy branch of the device path (pinned staging, asynchronous copies on
a stream, IOBinding on data pointers) without a GPU. It checks what CuPy checks
(``set``/``get``: numpy source, same dtype and shape, contiguous target) and mimics
asynchrony: a host-to-device ``set`` only copies when its stream is synchronized, or
when a later kernel (an ``xp`` function, a ufunc, fancy indexing of a device array) or a
``get`` runs after it in stream order. A missing ``synchronize`` before the model reads the
buffers, or a staging buffer overwritten before its copy ran, gives wrong numbers.
Every host-to-device copy is recorded with whether its source was pinned memory.

Not a GPU: memory is host memory, and "device" pointers are host pointers, so an
onnxruntime CPU session can be bound to them with ``device_type="cpu"``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

_pending: list[Callable[[], None]] = []
_pinned: list[tuple[int, int, weakref.ref[Any]]] = []
#: (bytes, from pinned memory) of every host-to-device copy, and bytes of every copy back
h2d: list[tuple[int, bool]] = []
d2h: list[int] = []


def reset() -> None:
    _flush()
    h2d.clear()
    d2h.clear()


def _flush() -> None:
    while _pending:
        _pending.pop(0)()


def _plain(x: Any) -> Any:
    return x.view(np.ndarray) if isinstance(x, ndarray) else x


def _wrap(x: Any) -> Any:
    return x.view(ndarray) if type(x) is np.ndarray else x


def _is_pinned(array: np.ndarray) -> bool:
    start = array.ctypes.data
    _pinned[:] = [p for p in _pinned if p[2]() is not None]
    return any(a <= start and start + array.nbytes <= b for a, b, _ in _pinned)


class _Pointer(SimpleNamespace):
    ptr: int


class ndarray(np.ndarray):  # named as cupy.ndarray
    """A "device" array: numpy memory, CuPy's transfer methods."""

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _flush()
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(x) for x in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return tuple(_wrap(r) for r in result) if isinstance(result, tuple) else _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        _flush()
        return _wrap(super().__array_function__(func, types, args, kwargs))

    def __getitem__(self, key: Any) -> Any:
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, np.ndarray | list) for k in keys):
            _flush()  # a gather is a kernel; slices are views and run nothing
        return super().__getitem__(key)

    @property
    def data(self) -> Any:  # type: ignore[override]
        return _Pointer(ptr=self.ctypes.data)

    def set(self, arr: Any, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not self.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        h2d.append((arr.nbytes, _is_pinned(arr)))
        dst = self.view(np.ndarray)
        src = np.ascontiguousarray(arr)  # read when the copy runs, not now
        _pending.append(lambda: np.copyto(dst, src))

    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> np.ndarray:
        _flush()
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif out.dtype != self.dtype or out.shape != self.shape:
            raise ValueError(f"out {out.dtype}{out.shape} for {self.dtype}{self.shape}")
        np.copyto(out, self.view(np.ndarray))
        d2h.append(out.nbytes)
        return out


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    return a.get(stream=stream) if isinstance(a, ndarray) else np.asarray(a)


def __getattr__(name: str) -> Any:
    """Array functions: numpy's, run in stream order, returning "device" arrays."""
    func = getattr(np, name)
    if not callable(func) or isinstance(func, type):
        return func

    def run(*args: Any, **kwargs: Any) -> Any:
        _flush()
        return _wrap(func(*args, **kwargs))

    return run


class _PinnedMemory(bytearray):
    """Page-locked memory, as far as this fake knows (weakly referenced)."""


def _alloc_pinned_memory(size: int) -> _PinnedMemory:
    memory = _PinnedMemory(size)
    start = np.frombuffer(memory, dtype=np.uint8).ctypes.data
    _pinned.append((start, start + size, weakref.ref(memory)))
    return memory


class _Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int = 0):
        self.ptr = id(self)

    def synchronize(self) -> None:
        _flush()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _Device:
    def __init__(self, device: int | None = None):
        self.id = device or 0

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def synchronize(self) -> None:
        _flush()


class _Event:
    def __init__(self, block: bool = False, disable_timing: bool = False):
        self.time = 0.0

    def record(self, stream: Any = None) -> None:
        _flush()
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        _flush()


def _get_elapsed_time(start: _Event, end: _Event) -> float:
    return (end.time - start.time) * 1e3  # milliseconds


cuda = SimpleNamespace(
    Stream=_Stream,
    Device=_Device,
    Event=_Event,
    get_elapsed_time=_get_elapsed_time,
    alloc_pinned_memory=_alloc_pinned_memory,
    runtime=SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda device: {"name": b"fake GPU (numpy)", "totalGlobalMem": 0},
    ),
)
