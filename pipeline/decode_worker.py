"""The decode worker process and the wire format between it and the pool.

A worker runs untrusted media through native decoders (FFmpeg, libjpeg, libpng, libwebp), so it
is treated as something that may die or lie: the pool (`pipeline/decode_pool.py`) kills and
replaces it when it crashes, runs out of its memory limit or its time budget, and what it sends
back is never unpickled. A result travels as a small JSON header plus raw buffers (arrays as
bytes with an explicit dtype and shape); errors travel as the name of a domain error class.

Parent -> worker: one pickled call header (the function, by reference, and its small arguments),
then every `bytes` argument as its own raw message, so a 64 MB upload is not pickled.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import math
import os
import pickle
import resource
import traceback
from collections.abc import Callable
from multiprocessing import BufferTooShort
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from index import errors

# Result classes the parent may rebuild: only dataclasses from our own packages.
_TRUSTED_MODULES = ("pipeline.", "model.")
# dtypes an array may have on the wire: plain numbers, never objects.
_ARRAY_KINDS = "biuf"
# Decode results are model-sized frames (32 crops of 224x224x3 are 4.8 MB; an hour sampled at
# 1 fps, 0.5 GB): a header claiming more than this is a worker gone wrong, not a reason to allocate.
MAX_RESULT_BYTES = 4 * 1024**3
# The worker reports these instead of dying on its own; the pool then replaces it.
OUT_OF_MEMORY = "out_of_memory"


@dataclasses.dataclass(frozen=True)
class _Blob:
    """Placeholder in a pickled call for the i-th raw `bytes` argument sent after the header."""

    index: int


def send_call(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Parent side: the call header, then each bytes argument raw."""
    blobs: list[bytes] = []
    wire_args = []
    for a in args:
        if isinstance(a, (bytes, bytearray, memoryview)):
            wire_args.append(_Blob(len(blobs)))
            blobs.append(a)  # type: ignore[arg-type]
        else:
            wire_args.append(a)
    conn.send_bytes(pickle.dumps((fn, tuple(wire_args), len(blobs)), protocol=pickle.HIGHEST_PROTOCOL))
    for b in blobs:
        conn.send_bytes(b)


def _receive_call(conn: Connection) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    fn, wire_args, n_blobs = pickle.loads(conn.recv_bytes())  # from the parent: trusted
    blobs = [conn.recv_bytes() for _ in range(n_blobs)]
    return fn, tuple(blobs[a.index] if isinstance(a, _Blob) else a for a in wire_args)


def _encode(value: Any, buffers: list[np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if arr.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"cannot send an array of dtype {arr.dtype}")
        buffers.append(arr)
        return {"t": "array", "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), buffers) for f in dataclasses.fields(value)}
        return {"t": "dataclass", "module": cls.__module__, "name": cls.__qualname__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return {"t": "tuple" if isinstance(value, tuple) else "list", "items": [_encode(v, buffers) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"t": "json", "v": value}
    raise TypeError(f"a decode result cannot hold {type(value).__name__}")


def _send_result(conn: Connection, value: Any) -> None:
    buffers: list[np.ndarray] = []
    try:
        header = {"ok": True, "value": _encode(value, buffers)}
    except TypeError as e:  # nothing sent yet: the pipe stays in step
        _send_error(conn, "TypeError", str(e))
        return
    conn.send_bytes(json.dumps(header).encode())
    for arr in buffers:
        conn.send_bytes(arr.reshape(-1).view(np.uint8).data)


def _send_error(conn: Connection, kind: str, message: str) -> None:
    conn.send_bytes(json.dumps({"ok": False, "error": kind, "message": message}).encode())


class WorkerFailed(Exception):
    """The worker answered with something that is neither a result nor a domain error."""


class DecoderRaised(WorkerFailed):
    """The decoder raised an unexpected exception; the worker itself is fine."""


def _trusted_class(module: str, name: str) -> type:
    if not module.startswith(_TRUSTED_MODULES):
        raise WorkerFailed(f"result class {module}.{name} is not one of ours")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise WorkerFailed(f"{module}.{name} is not a dataclass")
    return cls


class _Reader:
    """Parent side: rebuilds a result, receiving each array straight into its own memory."""

    def __init__(self, conn: Connection, wait: Callable[[], None]) -> None:
        self.conn, self.wait = conn, wait

    def value(self, node: Any) -> Any:
        t = node["t"]
        if t == "array":
            dtype = np.dtype(node["dtype"])
            if dtype.kind not in _ARRAY_KINDS:
                raise WorkerFailed(f"array of dtype {dtype} on the wire")
            shape = [int(d) for d in node["shape"]]
            if any(d < 0 for d in shape) or math.prod(shape) * dtype.itemsize > MAX_RESULT_BYTES:
                raise WorkerFailed(f"array of shape {shape} is larger than a decode result may be")
            arr = np.empty(shape, dtype)
            self.wait()
            if arr.nbytes == 0:
                self.conn.recv_bytes()
            else:
                try:
                    got = self.conn.recv_bytes_into(arr.reshape(-1).view(np.uint8))  # flat: sizes count in bytes
                except BufferTooShort:
                    raise WorkerFailed("array longer than its shape") from None
                if got != arr.nbytes:
                    raise WorkerFailed("array shorter than its shape")
            return arr
        if t == "dataclass":
            cls = _trusted_class(node["module"], node["name"])
            return cls(**{k: self.value(v) for k, v in node["fields"].items()})
        if t in ("tuple", "list"):
            items = [self.value(v) for v in node["items"]]
            return tuple(items) if t == "tuple" else items
        if t == "json":
            return node["v"]
        raise WorkerFailed(f"unknown node type {t!r}")


def receive_result(conn: Connection, wait: Callable[[], None]) -> Any:
    """Parent side: one answer. Returns the result, raises the worker's domain error, raises
    MemoryError when the worker ran out of its limit, WorkerFailed on anything else.
    `wait` blocks until the next message is there (or raises: timeout, dead worker)."""
    wait()
    try:
        header = json.loads(conn.recv_bytes())
    except ValueError as e:
        raise WorkerFailed(f"unreadable answer: {e}") from None
    if header.get("ok"):
        return _Reader(conn, wait).value(header["value"])
    kind, message = str(header.get("error")), str(header.get("message"))
    if kind == OUT_OF_MEMORY:
        raise MemoryError(message)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.ServiceError):
        raise cls(message)
    raise DecoderRaised(f"{kind}: {message}")


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own 64 MB arena of address space; FFmpeg's decode
    threads would spend the RLIMIT_AS headroom on reservations alone on a many-core host."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX = -8 in malloc.h
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _limit_memory(limit_mb: int) -> None:
    """Cap the address space at what the worker uses after its imports plus `limit_mb`: a bomb
    (a 60000x60000 PNG, a corrupt size field) hits MemoryError here instead of the host's OOM killer."""
    if limit_mb <= 0:
        return
    with open("/proc/self/statm") as f:
        vm_pages = int(f.read().split()[0])
    limit = vm_pages * os.sysconf("SC_PAGE_SIZE") + limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _is_out_of_memory(message: str) -> bool:
    """OpenCV reports a failed C++ allocation as cv2.error, not MemoryError."""
    m = message.lower()
    return "bad_alloc" in m or "failed to allocate" in m or ("insufficient" in m and "memory" in m)


def worker_main(conn: Connection, memory_limit_mb: int, cv_threads: int | None = None) -> None:
    """Entry point of a worker process: answer calls until the pipe closes. `cv_threads`: OpenCV's
    thread count in the worker (None: OpenCV's default, as decoding in the server had)."""
    if cv_threads is not None:
        import cv2

        cv2.setNumThreads(cv_threads)
    _few_malloc_arenas()
    _limit_memory(memory_limit_mb)
    while True:
        try:
            fn, args = _receive_call(conn)
        except (EOFError, OSError):
            return
        try:
            result = fn(*args)
        except errors.ServiceError as e:
            _send_error(conn, type(e).__name__, e.message)
            continue
        except MemoryError:
            _send_error(conn, OUT_OF_MEMORY, "decoding needed more memory than a worker may use")
            return  # the heap may be left fragmented or half-initialised: let the pool start a fresh one
        except Exception as e:
            # OpenCV raises cv2.error on some malformed inputs; say which, without a traceback in the answer.
            if _is_out_of_memory(str(e)):
                _send_error(conn, OUT_OF_MEMORY, "decoding needed more memory than a worker may use")
                return
            _send_error(conn, type(e).__name__, "".join(traceback.format_exception_only(e)).strip())
            continue
        try:
            _send_result(conn, result)
        except MemoryError:
            _send_error(conn, OUT_OF_MEMORY, "the decoded result did not fit in the worker's memory")
            return
