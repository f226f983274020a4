"""The RAM tier's memory: one shared-memory segment, allocated once at start-up and reused for every chunk.

Fresh multi-MB allocations per chunk are what made the cold path slow: every received chunk faulted its pages
in (and glibc unmapped them again on free). The arena is a memfd of `max_local_cpu_size` bytes, mapped once;
its pages are faulted in in the background at start-up (up to `local_cpu_prefault` GB), and blocks freed by
evictions are reused, never returned to the kernel. Because it is a memfd, a client on the same host can map
it too (`/proc/<pid>/fd/<fd>`, same user only) and move KV through it without any socket copy (see
`dataplane_shm`).

A block's bytes are handed out as a numpy uint8 view. A block that leaves the RAM tier is not reused while
anything still holds its view (a retrieve being sent, a compress reading it, a shared-memory client's lease):
Python's reference count on the view says when nobody does. So no reader ever sees a block rewritten under it.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import secrets
import sys
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
#: The first page holds a magic and a random token, so a client that maps the segment knows it is this one.
HEADER = PAGE
MAGIC = b"LMCARENA"


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True, slots=True)
class ShmInfo:
    """What a same-host client needs to map the arena (sent in the data plane's welcome)."""

    pid: int
    fd: int
    size: int
    token: str

    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    def as_wire(self) -> dict[str, object]:
        return {"pid": self.pid, "fd": self.fd, "size": self.size, "token": self.token}


class ArenaFull(Exception):
    """No free block is large enough (even after waiting for readers to let go)."""


class Arena:
    """A memfd-backed region with a first-fit, coalescing, page-aligned allocator. Thread-safe."""

    def __init__(self, capacity: int, name: str = "lmcached-ram") -> None:
        self.capacity = _round_up(max(capacity, PAGE))
        self.size = HEADER + self.capacity
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.token = secrets.token_hex(16)
        self._mm[: len(MAGIC) + 32] = MAGIC + self.token.encode()
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self._lock = threading.Lock()
        #: free blocks as (offset, size), sorted by offset, never adjacent (coalesced)
        self._free: list[tuple[int, int]] = [(HEADER, self.capacity)]
        #: blocks given back while something may still read them: (view, offset, size)
        self._retired: list[tuple[np.ndarray, int, int]] = []
        self.used = 0
        self._prefault_stop = threading.Event()
        self._prefault: threading.Thread | None = None

    @property
    def shm(self) -> ShmInfo:
        return ShmInfo(os.getpid(), self.fd, self.size, self.token)

    # ---------------------------------------------------------------- blocks
    def alloc(self, nbytes: int) -> np.ndarray | None:
        """A view of `nbytes` fresh bytes, or None when no free block is large enough."""
        need = _round_up(max(nbytes, 1))
        with self._lock:
            block = self._take(need)
            if block is None and self._retired:
                self._reclaim()
                block = self._take(need)
            if block is None:
                return None
            self.used += need
            return self.array[block : block + nbytes]

    def _take(self, need: int) -> int | None:
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, size - need)
                return offset
        return None

    def offset_of(self, view: object) -> int | None:
        """Where a view lies in the arena, or None when it is not one of the arena's blocks."""
        if not self.owns(view):
            return None
        assert isinstance(view, np.ndarray)
        return int(view.__array_interface__["data"][0] - self.array.__array_interface__["data"][0])

    def owns(self, data: object) -> bool:
        return isinstance(data, np.ndarray) and data.base is self.array

    def free(self, view: object) -> None:
        """Give a block back; it is reused once nothing else holds `view` (or a memoryview of it)."""
        offset = self.offset_of(view)
        if offset is None:
            return
        with self._lock:
            self._retired.append((view, offset, _round_up(max(view.nbytes, 1))))  # type: ignore[attr-defined]
            self._reclaim()

    def _reclaim(self) -> None:
        """Move retired blocks nobody reads any more back to the free list (the lock is held)."""
        still: list[tuple[np.ndarray, int, int]] = []
        for entry in self._retired:
            # Two references when nobody reads it: the retired tuple's and getrefcount's own argument.
            if sys.getrefcount(entry[0]) > 2:
                still.append(entry)
                continue
            self._release(entry[1], entry[2])
        self._retired = still

    def _release(self, offset: int, size: int) -> None:
        self.used -= size
        i = bisect.bisect_left(self._free, (offset, 0))
        if i < len(self._free) and self._free[i][0] == offset + size:  # merge with the next block
            size += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous one
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (offset, size))

    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    # ---------------------------------------------------------------- pages
    def start_prefault(self, nbytes: int) -> None:
        """Fault the first `nbytes` of the arena in, in a background thread (a cold first store then lands in
        memory that is already there). Stops early when the arena closes."""
        nbytes = min(nbytes, self.capacity)
        if nbytes <= 0:
            return

        def touch() -> None:
            step = 64 * 1024 * 1024
            end = HEADER + nbytes
            for start in range(HEADER, end, step):
                if self._prefault_stop.is_set():
                    return
                stop = min(start + step, end)
                try:
                    self._mm.madvise(mmap.MADV_POPULATE_WRITE, start, stop - start)  # type: ignore[attr-defined]
                except (AttributeError, OSError, ValueError):
                    # Older kernels and Pythons: one write per page does the same (the pages are still zero).
                    self.array[start:stop:PAGE] = 0

        self._prefault = threading.Thread(target=touch, name="lmcached-prefault", daemon=True)
        self._prefault.start()

    def close(self) -> None:
        self._prefault_stop.set()
        if self._prefault is not None:
            self._prefault.join()
        try:
            os.close(self.fd)
        except OSError:
            pass
        # The mapping itself stays until the process ends if views of it are still alive (mmap refuses to
        # close under exported buffers); the memfd's memory goes back to the kernel with the last mapping.


class ArenaView:
    """A same-host client's mapping of a worker's arena."""

    def __init__(self, info: ShmInfo) -> None:
        fd = os.open(info.path(), os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, info.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if bytes(self._mm[: len(MAGIC) + 32]) != MAGIC + info.token.encode():
            self._mm.close()
            raise OSError("the shared-memory segment is not the worker's arena (another host or process)")
        self.array = np.frombuffer(self._mm, dtype=np.uint8)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.array[offset : offset + nbytes]
