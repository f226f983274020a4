"""The worker's side of same-host shared memory on the data plane: KV moves through the RAM tier's arena
(lmcached.worker.arena) instead of the socket, which then carries only small frames.

Store: the client sends SHM_STORE with the chunks' metadata; the worker reserves an arena block for each and
answers their offsets; the client writes the KV there through its own mapping and sends SHM_COMMIT; only
then are the chunks stored (visible). A client that dies before committing leaves nothing visible: its
reserved blocks go back to the arena when its connection closes.

Retrieve: SHM_RETRIEVE answers the cached prefix's offsets in the arena (a chunk that lives elsewhere — disk,
decoded from a codec, the remote tier — is copied into a block first) under a lease: the worker keeps those
blocks from being reused until the client sends SHM_RELEASE or its connection closes.

Anything the arena cannot hold right now is answered with `"fallback": true`, and the client uses the socket
for that request. Only clients that mapped the arena (same host, same user: the memfd is opened through
/proc/<pid>/fd, and its random token checked) send these frames; auth happened at the hello.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from lmcached.errors import ProtocolError
from lmcached.wire.chunk import CPU, Chunk
from lmcached.wire.dataplane import check_keys, chunk_headers
from lmcached.worker.storage import Storage, raw_nbytes


@dataclass
class ShmSession:
    """One connection's reservations (stores not yet committed) and leases (retrieves not yet released)."""

    storage: Storage
    pending: dict[int, tuple[list[Chunk], str | None]] = field(default_factory=dict)
    leases: dict[int, list[Any]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def reserve(self, header: dict[str, Any]) -> dict[str, Any]:
        """SHM_STORE: arena blocks for the chunks; their offsets, or a fallback when the arena is short."""
        arena = self.storage.arena
        metas = chunk_headers(header)
        location = header.get("location")
        if arena is None or location not in (None, CPU):
            return {"fallback": True}
        chunks: list[Chunk] = []
        self.storage.learn_lineage(metas)
        for meta in metas:
            if meta.get("method") is None and raw_nbytes(tuple(meta["shape"]), meta["dtype"]) != meta["nbytes"]:
                raise ProtocolError(f"chunk {meta['key']:016x}: {meta['nbytes']} bytes do not match shape {meta['shape']}")
            block = self.storage.reserve(meta["nbytes"]) if meta["nbytes"] else None
            if block is None:
                self.storage.release_unkept(chunks)
                return {"fallback": True}
            chunks.append(Chunk.from_meta(meta, block))
        store_id = next(self._ids)
        self.pending[store_id] = (chunks, location)
        arena.begin_write()  # the client copies into the blocks until it commits (or its connection closes)
        return {"store": store_id, "offsets": [arena.offset_of(c.data) for c in chunks]}

    async def commit(self, header: dict[str, Any]) -> int:
        """SHM_COMMIT: store what the client wrote; the tokens stored."""
        entry = self.pending.pop(_int(header, "store"), None)
        if entry is None:
            raise ProtocolError("SHM_COMMIT names no pending store")
        chunks, location = entry
        self._end_write()
        try:
            return await self.storage.store(chunks, location)
        finally:
            self.storage.release_unkept(chunks)

    async def lease(self, header: dict[str, Any]) -> dict[str, Any]:
        """SHM_RETRIEVE: the cached prefix's offsets in the arena, held until released."""
        arena = self.storage.arena
        if arena is None:
            return {"fallback": True}
        chunks = await self.storage.retrieve(check_keys(header))
        held: list[Any] = []
        offsets: list[int] = []
        for chunk in chunks:
            data = chunk.data
            if not arena.owns(data):  # decoded, from disk or from Redis: give it a block for the reader
                block = arena.alloc(chunk.nbytes) if chunk.nbytes else None
                if block is None:
                    return {"fallback": True}  # the copies made so far are retired: dropping `held` frees them
                block[:] = memoryview(data).cast("B")
                data = block
                arena.free(block)  # retired at once: reused when the lease (the only holder) lets go
            held.append(data)
            offsets.append(arena.offset_of(data))  # type: ignore[arg-type]
        lease_id = next(self._ids)
        self.leases[lease_id] = held
        return {"lease": lease_id, "chunks": [c.meta() for c in chunks], "offsets": offsets}

    def _end_write(self) -> None:
        if self.storage.arena is not None:
            self.storage.arena.end_write()

    def release(self, header: dict[str, Any]) -> None:
        """SHM_RELEASE: the client has read a lease's blocks."""
        self.leases.pop(_int(header, "lease"), None)

    def close(self) -> None:
        """The connection ended: uncommitted stores vanish, leases end."""
        for chunks, _ in self.pending.values():
            self._end_write()
            self.storage.release_unkept(chunks)
        self.pending.clear()
        self.leases.clear()


def _int(header: dict[str, Any], name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int):
        raise ProtocolError(f"frame needs an integer {name!r}")
    return value
