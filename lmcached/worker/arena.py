"""The RAM tier's memory: one shared-memory segment, allocated once at start-up and reused for every chunk.

Fresh multi-MB allocations per chunk are what made the cold path slow: every received chunk faulted its pages
in (and glibc unmapped them again on free). The arena is a memfd of `max_local_cpu_size` bytes, mapped once;
its pages are faulted in at start-up (up to `local_cpu_prefault` GB, before the worker says it is ready), and blocks freed by
evictions are reused, never returned to the kernel. Because it is a memfd, a client on the same host can map
it too (`/proc/<pid>/fd/<fd>`, same user only) and move KV through it without any socket copy (see
`dataplane_shm`).

A block's bytes are handed out as a numpy uint8 view. A block that leaves the RAM tier is not reused while
anything still holds its view (a retrieve being sent, a compress reading it, a shared-memory client's lease):
Python's reference count on the view says when nobody does. So no reader ever sees a block rewritten under it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np

from lmcached.wire.shm import HEADER, MAGIC, PAGE, ShmInfo, populate

log = logging.getLogger(__name__)


def _round_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Arena:
    """A memfd-backed region with a first-fit, coalescing, page-aligned allocator. Thread-safe."""

    def __init__(self, capacity: int, name: str = "lmcached-ram") -> None:
        self.capacity = _round_up(max(capacity, PAGE))
        self.size = HEADER + self.capacity
        if hasattr(os, "memfd_create"):
            self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:  # not Linux: the arena still saves allocations, but no client can map it (no shared memory)
            self.fd = None
            self._mm = mmap.mmap(-1, self.size)
        self.token = secrets.token_hex(16)
        self._mm[: len(MAGIC) + 32] = MAGIC + self.token.encode()
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self._lock = threading.Lock()
        #: free blocks as (offset, size), sorted by offset, never adjacent (coalesced)
        self._free: list[tuple[int, int]] = [(HEADER, self.capacity)]
        #: blocks given back while something may still read them: (view, offset, size)
        self._retired: list[tuple[np.ndarray, int, int]] = []
        self.used = 0
        self.prefaulted = 0
        self.high_water = HEADER
        self._ahead = 0
        self._more = threading.Event()
        self._ahead_thread: threading.Thread | None = None
        self._closed = False
        #: Stores writing into blocks right now (a socket receive, a same-host client's copy): the background
        #: prefault waits for them (zeroing pages beside a copy halved the copy's speed on two cores, measured).
        self._writers = 0

    @property
    def shm(self) -> ShmInfo | None:
        """What a same-host client needs to map the arena; None where it cannot be shared."""
        return None if self.fd is None else ShmInfo(os.getpid(), self.fd, self.size, self.token, self.prefaulted)

    # ---------------------------------------------------------------- blocks
    def alloc(self, nbytes: int) -> np.ndarray | None:
        """A view of `nbytes` fresh bytes, or None when no free block is large enough."""
        need = _round_up(max(nbytes, 1))
        with self._lock:
            if self._retired:  # blocks freed since: reused first (lowest offsets first), their pages are warm
                self._reclaim()
            block = self._take(need)
            if block is None:
                return None
            self.used += need
            self.high_water = max(self.high_water, block + need)
            if self._ahead and self.prefaulted - self.high_water < self._ahead // 2:
                self._more.set()  # the background thread keeps fresh pages ready ahead of the stores
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

    def reclaim(self) -> None:
        """Reuse retired blocks nobody reads any more now (an allocation that finds no room does this too)."""
        with self._lock:
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

    # ---------------------------------------------------------------- pages
    def begin_write(self) -> None:
        """A store starts writing into blocks: background page faulting pauses until it ends."""
        with self._lock:
            self._writers += 1

    def end_write(self) -> None:
        with self._lock:
            self._writers = max(self._writers - 1, 0)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self.begin_write()
        try:
            yield
        finally:
            self.end_write()

    def prefault(self, nbytes: int) -> None:
        """Fault the first `nbytes` of the arena in (a cold first store then lands in memory that is there),
        and from then on keep `nbytes` of fresh pages faulted in ahead of the highest block handed out, in a
        background thread, up to the capacity: a store never pays for zeroing new pages itself."""
        self._extend(HEADER + min(nbytes, self.capacity))
        self._ahead = nbytes
        if nbytes > 0 and self._ahead_thread is None:
            self._ahead_thread = threading.Thread(target=self._keep_ahead, name="lmcached-prefault", daemon=True)
            self._ahead_thread.start()

    def _extend(self, end: int, background: bool = False) -> None:
        # Whole pages only, and never a write: blocks past the frontier may hold chunks already (stores can
        # outrun this thread, which runs only when the CPUs idle). Writing a zero per page "because they are
        # zero already" corrupted them — one byte pair per page, at whatever offset the frontier stood.
        end = _round_up(min(end, self.size))
        step = 4 * 1024 * 1024  # the kernel faults a step in at a time; small steps keep the GIL fair
        for start in range(_round_up(self.prefaulted or HEADER), end, step):
            while background and self._writers and not self._closed:
                time.sleep(0.005)  # a store is writing: its copy gets the cores and the memory bandwidth
            if self._closed:
                return
            stop = min(start + step, end)
            if not populate(self._mm, start, stop - start):
                # A kernel without MADV_POPULATE_WRITE (< 5.14): a read per page faults a shared page in too,
                # and leaves its bytes as they are.
                int(self.array[start:stop:PAGE].sum())
            self.prefaulted = stop

    def _keep_ahead(self) -> None:
        _yield_to_foreground()
        while not self._closed:
            self._more.wait()
            self._more.clear()
            if not self._closed and self.prefaulted < self.size:
                self._extend(self.high_water + self._ahead, background=True)

    def close(self) -> None:
        self._closed = True
        self._more.set()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        # The mapping itself stays until the process ends if views of it are still alive (mmap refuses to
        # close under exported buffers); the memfd's memory goes back to the kernel with the last mapping.


def _yield_to_foreground() -> None:
    """Run the calling thread only when the CPUs have nothing else to do (SCHED_IDLE, else the lowest nice).

    Faulting fresh pages in ahead of the stores is background work; at normal priority it took a core from
    the store it runs beside (a same-host client's copy into the arena ran at half speed, measured)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except (AttributeError, OSError):
            pass  # not Linux: the thread keeps the process's priority
