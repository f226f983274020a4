"""The RAM arena as a same-host client sees it: what it needs to map the worker's memfd (ShmInfo, sent in the
data plane's welcome) and its mapping (ArenaView). The worker's side, which allocates blocks in it, is
lmcached.worker.arena."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

PAGE = mmap.PAGESIZE
#: The granularity at which a client remembers which parts of the arena it has mapped in.
REGION = 2 * 1024 * 1024
#: The first page holds a magic and a random token, so a client that maps the segment knows it is this one.
HEADER = PAGE
MAGIC = b"LMCARENA"


#: madvise(MADV_POPULATE_WRITE) (Linux 5.14): map and fault a range in, in one call, no trap per page. Python's
#: mmap module does not name it on every version, so its number.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def populate(mm: mmap.mmap, start: int, length: int) -> bool:
    """Fault a page-aligned range of a mapping in; False where the kernel cannot (the caller touches pages)."""
    try:
        mm.madvise(MADV_POPULATE_WRITE, start, length)
    except (OSError, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class ShmInfo:
    """What a same-host client needs to map the arena (sent in the data plane's welcome)."""

    pid: int
    fd: int
    size: int
    token: str
    #: Bytes from the start of the arena whose pages exist already (a client maps them in up front).
    prefaulted: int = 0

    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"

    def as_wire(self) -> dict[str, object]:
        return {"pid": self.pid, "fd": self.fd, "size": self.size, "token": self.token, "prefaulted": self.prefaulted}


class ArenaView:
    """A same-host client's mapping of a worker's arena."""

    def __init__(self, info: ShmInfo) -> None:
        fd = os.open(info.path(), os.O_RDWR)
        try:
            # (Not MAP_POPULATE: on a memfd it would allocate every page of the arena, used or not.)
            self._mm = mmap.mmap(fd, info.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if bytes(self._mm[: len(MAGIC) + 32]) != MAGIC + info.token.encode():
            self._mm.close()
            raise OSError("the shared-memory segment is not the worker's arena (another host or process)")
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        #: Which REGION-sized stretches of the arena this process has mapped in already. A mapping, once made,
        #: stays (the worker never gives pages back), so each stretch is populated once, not on every store
        #: (asking again walks the page tables: 12 ms of a 80 ms 377 MB store, measured).
        self._mapped = np.zeros((info.size + REGION - 1) // REGION, dtype=bool)
        # Map the pages the worker has already faulted in: first stores then write without a fault per page
        # in this process (~0.25 ms per MB, measured; populating costs ~0.1 ms per MB, once, here).
        if info.prefaulted > HEADER:
            self.populate(HEADER, info.prefaulted - HEADER)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.array[offset : offset + nbytes]

    def populate(self, offset: int, nbytes: int) -> None:
        """Map a block's pages into this process before it is written (the stretches not mapped yet)."""
        first, last = offset // REGION, (offset + max(nbytes, 1) - 1) // REGION
        todo = np.flatnonzero(~self._mapped[first : last + 1])
        if not todo.size:
            return
        start = (first + int(todo[0])) * REGION
        end = min((first + int(todo[-1]) + 1) * REGION, self._mm.size())
        if populate(self._mm, start, end - start):  # one call for the whole span (a stretch mapped twice is harmless)
            self._mapped[first + todo] = True
