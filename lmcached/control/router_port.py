"""Routers' lookups on the control port: binary LOOKUP frames in, each instance's matched prefix out, in microseconds.

A router asks this on its hot path, per request, so the connection leaves asyncio's streams once the hello is
done (their per-read timeouts and buffers cost more than the lookup) and becomes a plain Protocol: each LOOKUP
that has fully arrived is answered from the index right in `data_received`, on the event loop (the walk is
microseconds: a thread hop would cost more), and the REPLY says how long the controller spent on it ("us").

A LOOKUP's header says "by": "keys" (payload: little-endian uint64 chunk keys the router hashed itself,
lmcached.wire.chunks.chunk_spans) or "tokens" (payload: little-endian uint32 token ids, cut and hashed here, with
"salt" if any); the REPLY's "instances" maps each instance holding a prefix to [location, tokens, chunks].
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from lmcached.config import Config
from lmcached.control.index import ChunkIndex
from lmcached.control.lmcache_port import with_lmcache_instances
from lmcached.errors import InvalidRequest, LmcachedError, ProtocolError
from lmcached.wire.chunks import chunk_spans
from lmcached.wire.frames import PREFIX_BYTES, Kind, decode_header, decode_prefix, encode_frame

log = logging.getLogger(__name__)

#: The most keys (or tokens) one LOOKUP may carry: a 1M-token prompt as token ids.
MAX_LOOKUP_ITEMS = 1 << 20
MAX_LOOKUP_PAYLOAD = MAX_LOOKUP_ITEMS * 8


def answer_lookup(index: ChunkIndex, config: Config, header: dict[str, Any], payload: bytes | memoryview) -> dict[str, list[Any]]:
    """instance -> [location, tokens, chunks] for a LOOKUP; InvalidRequest for a malformed one."""
    by = header.get("by", "keys")
    if by == "keys":
        if len(payload) % 8:
            raise InvalidRequest("a LOOKUP by keys carries little-endian uint64 keys: its payload is a multiple of 8 bytes")
        found = index.lookup_keys(np.frombuffer(payload, dtype="<u8").tolist(), config.chunk_size)
    elif by == "tokens":
        if len(payload) % 4:
            raise InvalidRequest("a LOOKUP by tokens carries little-endian uint32 token ids: its payload is a multiple of 4 bytes")
        salt = header.get("salt")
        if salt is not None and not isinstance(salt, str):
            raise InvalidRequest("salt must be a string")
        spans = chunk_spans(np.frombuffer(payload, dtype="<u4"), config.chunk_size, config.save_unfull_chunk, salt)
        held = with_lmcache_instances(index, np.frombuffer(payload, dtype="<u4").tolist(), index.lookup(spans))
        found = {inst: (loc, tokens, -(-tokens // config.chunk_size)) for inst, (loc, tokens) in held.items()}
    else:
        raise InvalidRequest(f"a LOOKUP is by 'keys' or 'tokens', not {by!r}")
    return {inst: [loc, tokens, chunks] for inst, (loc, tokens, chunks) in found.items()}


class RouterProtocol(asyncio.Protocol):
    """One router's connection after its hello. `closed` resolves when it ends."""

    def __init__(self, index: ChunkIndex, config: Config, transport: asyncio.Transport, peer: Any) -> None:
        self.index = index
        self.config = config
        self.transport = transport
        self.peer = peer
        self.buffer = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answered = 0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._answer_complete_frames()
        except (ProtocolError, LmcachedError) as exc:
            log.warning("router %s: %s; closing", self.peer, exc)
            self.transport.write(encode_frame(Kind.ERROR, {"detail": str(exc), "status": exc.http_status}))
            self.transport.close()

    def _answer_complete_frames(self) -> None:
        buffer = self.buffer
        start = 0
        while len(buffer) - start >= PREFIX_BYTES:
            kind, header_len, payload_len = decode_prefix(bytes(buffer[start : start + PREFIX_BYTES]), MAX_LOOKUP_PAYLOAD)
            end = start + PREFIX_BYTES + header_len + payload_len
            if len(buffer) < end:
                break  # the rest of this frame is still on its way
            if kind != Kind.LOOKUP:
                raise ProtocolError(f"unexpected {kind.name} frame from a router (it sends LOOKUP)")
            began = time.perf_counter()
            head_end = start + PREFIX_BYTES + header_len
            header = decode_header(bytes(buffer[start + PREFIX_BYTES : head_end])) if header_len else {}
            reply: dict[str, Any] = {"req_id": header.get("req_id")}
            try:
                reply["instances"] = answer_lookup(self.index, self.config, header, memoryview(buffer)[head_end:end])
            except InvalidRequest as exc:
                reply |= {"error": str(exc), "status": exc.http_status}
            reply["us"] = round((time.perf_counter() - began) * 1e6, 1)
            self.transport.write(encode_frame(Kind.REPLY, reply))
            self.answered += 1
            start = end
        if start:
            del buffer[:start]

    def pause_writing(self) -> None:  # a router that does not read its replies stops being read
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
