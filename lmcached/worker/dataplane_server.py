"""A worker's data plane (port 8001): engines store, look up and retrieve chunks of a Storage over TCP frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import traceback
from typing import Any

from lmcached.config import Config
from lmcached.errors import CodecError, LmcachedError, ProtocolError, Unauthorized
from lmcached.wire.chunk import CPU, Chunk
from lmcached.wire.dataplane import check_keys, chunk_headers
from lmcached.wire.frames import (
    HELLO_TIMEOUT_S,
    MAX_DATA_PAYLOAD_BYTES,
    Kind,
    frame_parts,
    read_frame_head,
    read_payload,
    read_payload_into,
)
from lmcached.wire.handshake import receive_hello
from lmcached.wire.sockio import SocketStream, serve_sockets
from lmcached.wire.tls import server_context
from lmcached.worker.dataplane_shm import ShmSession
from lmcached.worker.storage import Storage, raw_nbytes

log = logging.getLogger(__name__)


def _clear_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames in an exception's traceback, and in those of its causes."""
    seen = 0
    while exc is not None and seen < 8:
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
        seen += 1


class DataPlaneServer:
    """Serves one Storage on host:port; `identity` (instance and worker ids) goes into every welcome."""

    def __init__(self, storage: Storage, config: Config, host: str, port: int, identity: dict[str, Any]) -> None:
        self.storage = storage
        self.config = config
        self.host = host
        self.port = port
        self.identity = identity
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._client_tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._listener, self._accept_task = await serve_sockets(self.host, self.port, self._serve_client, server_context(self.config))
        self.port = self._listener.getsockname()[1]

    async def stop(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._client_tasks):
            task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)

    async def _serve_client(self, stream: SocketStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._client_tasks.add(task)
        shm = ShmSession(self.storage)
        try:
            if await receive_hello(stream, self.config.auth_token) is None:
                return
            welcome = {
                "chunk_size": self.config.chunk_size,
                **self.identity,
                "save_unfull_chunk": self.config.save_unfull_chunk,
            }
            if self.storage.lineage is not None:
                welcome["lineage"] = True  # send each chunk's tokens and parent with it (KV events, LMCache's hashes)
            shm_info = self.storage.arena.shm if self.storage.arena is not None else None
            if shm_info is not None and self.config.shared_memory:
                welcome["shm"] = shm_info.as_wire()  # a client on this host may map the arena
            await stream.sendall(frame_parts(Kind.WELCOME, welcome, []))
            while True:
                head = await read_frame_head(stream, MAX_DATA_PAYLOAD_BYTES)
                if head is None:
                    return
                await self._answer(stream, *head, shm)
        except (ProtocolError, Unauthorized) as exc:
            log.warning("data-plane peer %s: %s; closing", stream.peername(), exc)
            with contextlib.suppress(OSError):
                await stream.sendall(frame_parts(Kind.ERROR, {"detail": str(exc), "status": exc.http_status}, []))
        except asyncio.TimeoutError:
            log.warning("data-plane peer %s sent no hello in %.0fs; closing", stream.peername(), HELLO_TIMEOUT_S)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            shm.close()
            self._client_tasks.discard(task)
            stream.close()

    async def _reply(self, stream: SocketStream, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        await stream.sendall(frame_parts(Kind.REPLY, header, payloads or []))

    async def _answer(self, stream: SocketStream, kind: Kind, header: dict[str, Any], payload_len: int, shm: ShmSession) -> None:
        req_id = header.get("req_id")
        if kind == Kind.STORE:
            location = header.get("location")
            arena = self.storage.arena if location in (None, CPU) else None
            with arena.writing() if arena is not None else contextlib.nullcontext():
                chunks = await self._receive_chunks(stream, header, payload_len, into_arena=arena is not None)
            try:
                stored = await self.storage.store(chunks, location)
            except LmcachedError as exc:
                await self._reply(stream, {"req_id": req_id, "error": str(exc), "status": exc.http_status})
                return
            finally:
                self.storage.release_unkept(chunks)
            await self._reply(stream, {"req_id": req_id, "num_tokens": stored})
            return
        if kind == Kind.CODEBOOK:
            await self._answer_codebook(stream, header, payload_len)
            return
        if payload_len:
            raise ProtocolError(f"{kind.name} frames carry no payload")
        if kind in (Kind.SHM_STORE, Kind.SHM_COMMIT, Kind.SHM_RETRIEVE, Kind.SHM_RELEASE):
            await self._answer_shm(stream, kind, header, shm)
        elif kind == Kind.LOOKUP:
            # A client's store asks first what is held already ("dedupe"): not a lookup an engine made.
            then = check_keys(header, "then") if "then" in header else None
            held = await self.storage.lookup(check_keys(header), engine=not header.get("dedupe"), then=then)
            await self._reply(stream, {"req_id": req_id, "num_tokens": held})
        elif kind == Kind.RETRIEVE:
            try:
                chunks = await self.storage.retrieve(check_keys(header))
            except LmcachedError as exc:
                await self._reply(stream, {"req_id": req_id, "error": str(exc), "status": exc.http_status})
                return
            await self._reply(stream, {"req_id": req_id, "chunks": [c.meta() for c in chunks]}, [c.data for c in chunks])
        else:
            raise ProtocolError(f"unexpected {kind.name} frame on the data plane")

    async def _answer_codebook(self, stream: SocketStream, header: dict[str, Any], payload_len: int) -> None:
        """Whether this worker has kvtc codebook `digest` (no payload), or keep the one in the payload; with
        "current", new kvtc blobs of its shape use it (`lmcached calibrate`)."""
        req_id, digest = header.get("req_id"), header.get("digest")
        if not isinstance(digest, str):
            raise ProtocolError("a CODEBOOK frame names its codebook's digest")
        codebooks = self.storage.codebooks
        if not payload_len:
            have = await self.storage.run(codebooks.find, digest) is not None
            await self._reply(stream, {"req_id": req_id, "have": have})
            return
        data = await read_payload(stream, payload_len)
        try:
            book = await self.storage.run(_codebook_from, data, digest)
            await self.storage.run(codebooks.install, book, bool(header.get("current", False)))
        except LmcachedError as exc:
            await self._reply(stream, {"req_id": req_id, "error": str(exc), "status": exc.http_status})
            return
        await self._reply(stream, {"req_id": req_id, "have": True, "layers": book.layers, "channels": book.channels})

    async def _answer_shm(self, stream: SocketStream, kind: Kind, header: dict[str, Any], shm: ShmSession) -> None:
        req_id = header.get("req_id")
        if kind == Kind.SHM_RELEASE:
            shm.release(header)
            return
        try:
            if kind == Kind.SHM_STORE:
                answer = shm.reserve(header)
            elif kind == Kind.SHM_COMMIT:
                answer = {"num_tokens": await shm.commit(header)}
            else:
                answer = await shm.lease(header)
        except LmcachedError as exc:
            if isinstance(exc, ProtocolError):
                raise
            answer = {"error": str(exc), "status": exc.http_status}
        await self._reply(stream, {"req_id": req_id, **answer})

    def _reserve(self, nbytes: int) -> Any | None:
        """An arena block for a chunk on its way in, or None (fresh memory) when there is none to be had."""
        return self.storage.reserve(nbytes) if nbytes else None

    async def _receive_chunks(self, stream: SocketStream, header: dict[str, Any], payload_len: int, into_arena: bool) -> list[Chunk]:
        """The chunks of a STORE, each received straight into its own buffer: an arena block when the RAM tier
        will keep it (memory faulted in already, reused), else fresh memory. A client that dies mid-payload
        leaves nothing behind: the blocks received so far go back to the arena."""
        metas = chunk_headers(header)
        if sum(m["nbytes"] for m in metas) != payload_len:
            raise ProtocolError("chunk sizes do not add up to the payload length")
        self.storage.learn_lineage(metas)
        for meta in metas:
            if meta.get("method") is None and raw_nbytes(tuple(meta["shape"]), meta["dtype"]) != meta["nbytes"]:
                raise ProtocolError(f"chunk {meta['key']:016x}: {meta['nbytes']} bytes do not match shape {meta['shape']}")
        chunks: list[Chunk] = []
        try:
            for meta in metas:
                block = self._reserve(meta["nbytes"]) if into_arena else None
                if block is None:
                    data = await read_payload(stream, meta["nbytes"])
                else:
                    chunks.append(Chunk.from_meta(meta, block))  # before the read: freed if the read fails
                    await read_payload_into(stream, memoryview(block))
                    continue
                chunks.append(Chunk.from_meta(meta, data))
        except BaseException as exc:
            self.storage.release_unkept(chunks)
            # The exception's traceback keeps the frames that were reading alive (until the cycle collector
            # runs), and with them the blocks: let go of those now, so the arena can reuse them at once.
            chunks.clear()
            block = None  # noqa: F841
            _clear_frames(exc)
            raise
        return chunks


def _codebook_from(data: bytes | bytearray, digest: str) -> Any:
    """The codebook in `data`, checked to be the one its sender named (blocking: it hashes megabytes)."""
    from lmcached.codecs.kvtc import Codebook

    book = Codebook.from_bytes(bytes(data))
    if book.digest != digest:
        raise CodecError(f"the codebook sent as {digest} is {book.digest}")
    return book
