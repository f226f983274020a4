"""Scratch buffers the CPU codecs reuse, one set per thread: a KV daemon encodes and decodes the same chunk
shapes all day, and a fresh multi-MB buffer per call faulted its pages in every time (that, not the coding,
was half the time of a library call measured without the daemon's allocator tuning)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A reused array of `shape` and `dtype` for this thread (contents undefined). Valid until this thread
    asks for `name` again: never return it to a caller."""
    buffers: dict[str, np.ndarray] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    buf = buffers.get(name)
    if buf is None or buf.nbytes < size:
        buf = buffers[name] = np.empty(size, dtype=np.uint8)
    return buf[:size].view(dtype).reshape(shape)


def fresh_bytes(size: int) -> np.ndarray:
    """New memory for an output, from torch's allocator rather than numpy's: numpy asks the kernel for huge
    pages on every array of 4 MB or more, and where huge pages are granted on request (THP "madvise", with
    synchronous defragmentation — this VM's setting) the first write to a fresh 5.9 MB chunk stalled in page
    compaction: 3-11 ms against 1.7 ms with ordinary pages, measured with a caller holding 24 decoded chunks."""
    return torch.empty(size, dtype=torch.uint8).numpy()


#: Output buffers kept per thread and name: enough for a caller that holds a few decoded chunks at once.
_MAX_OUTPUTS = 8


def output(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An array to return to a caller, recycled from this thread's earlier outputs once nobody holds them any
    more (their reference count says so), else new. A decoded chunk then lands in memory whose pages are
    already there, the way a daemon's tuned allocator would give it, without tuning anyone's process."""
    pools: dict[str, list[np.ndarray]] = getattr(_local, "outputs", None) or {}
    _local.outputs = pools
    pool = pools.setdefault(name, [])
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    for i in range(len(pool)):
        # Free when only the pool and getrefcount's argument refer to it (a view handed out holds it too).
        if sys.getrefcount(pool[i]) <= 2 and pool[i].nbytes >= size:
            return pool[i][:size].view(dtype).reshape(shape)
    buf = fresh_bytes(size)
    if len(pool) < _MAX_OUTPUTS:
        pool.append(buf)
    return buf[:size].view(dtype).reshape(shape)
