"""Writes that follow RAM to a slower tier (disk, the remote tier): off the store path, in order, bounded in bytes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from lmcached.errors import LmcachedError
from lmcached.wire.chunk import Chunk

log = logging.getLogger(__name__)

#: While the tier is down, the head of the queue is retried this often (the queue keeps its order).
RETRY_S = 0.5
#: Chunks already queued are written together up to this many bytes (the remote tier sends them in one go).
BATCH_BYTES = 64 * 1024 * 1024


class WriteBehind:
    """A queue of chunks written to one tier by one task, in order, in batches of what is already queued.

    `when_full="wait"` makes a store wait for room (the disk: slow but always there); `"drop"` lets the store
    go on and skips the tier's copy (the remote tier: an outage must not stall the engine; RAM still has the
    chunk). `is_outage(exc)` says which write errors mean "the tier is down": those are retried in order until
    it is back; any other error skips the chunk with a warning.
    """

    def __init__(
        self,
        tier: str,
        write: Callable[[list[Chunk]], Awaitable[None]],
        bound_bytes: int,
        when_full: str = "wait",
        is_outage: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self.tier = tier
        self._write = write
        self.bound_bytes = bound_bytes
        self.when_full = when_full
        self._is_outage = is_outage
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.pending_bytes = 0
        self.dropped = 0
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"write-behind-{self.tier}")

    def __len__(self) -> int:
        return self._queue.qsize()

    async def submit(self, chunk: Chunk) -> bool:
        """Queue a chunk; False when it was dropped because the queue is full (when_full="drop")."""
        while self.pending_bytes and self.pending_bytes + chunk.nbytes > self.bound_bytes:
            if self.when_full == "drop":
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning(
                        "%s write queue is full (%d bytes pending): %d chunk(s) not copied there",
                        self.tier,
                        self.pending_bytes,
                        self.dropped,
                    )
                return False
            self._room.clear()
            await self._room.wait()
        self.pending_bytes += chunk.nbytes
        self._queue.put_nowait(chunk)
        return True

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = batch[0].nbytes
            while not self._queue.empty() and size < BATCH_BYTES:
                batch.append(self._queue.get_nowait())
                size += batch[-1].nbytes
            try:
                while True:
                    try:
                        await self._write(batch)
                        break
                    except (LmcachedError, OSError) as exc:
                        if not self._is_outage(exc):
                            log.warning("%d chunk(s) from %016x on not written to %s: %s", len(batch), batch[0].key, self.tier, exc)
                            break
                        await asyncio.sleep(RETRY_S)  # the tier is down: keep the order, try again
            finally:
                self.pending_bytes -= size
                self._room.set()
                for _ in batch:
                    self._queue.task_done()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has landed; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> None:
        """Let queued writes land (bounded by `timeout`), then stop."""
        if not await self.drain(timeout):
            log.warning("stopping with %d chunk(s) not yet written to %s", self._queue.qsize(), self.tier)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
