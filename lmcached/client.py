"""KVClient / AsyncKVClient: store, look up and retrieve a prompt's KV on a worker's data plane.

    with KVClient("127.0.0.1:8001") as c:
        c.store(tokens, kv)      # kv: torch.Tensor [2, L, len(tokens), C]; returns tokens stored
        c.lookup(tokens)         # -> cached prefix length
        c.retrieve(tokens)       # -> torch.Tensor [2, L, n, C] for the cached prefix, or None

KV travels as raw bytes in frames. The blocking client reads payloads straight into the result's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmcached.errors import InvalidRequest, LmcachedError, ProtocolError, Unauthorized
from lmcached.wire.chunk import Chunk
from lmcached.wire.chunks import WHOLE, ChunkSpan, Shard, chunk_spans, continuation_spans, tokens_array
from lmcached.wire.dataplane import CLIENT_ROLE, chunk_headers
from lmcached.wire.frame_socket import FrameSocket
from lmcached.wire.frames import (
    MAX_CONTROL_PAYLOAD_BYTES,
    MAX_DATA_PAYLOAD_BYTES,
    PREFIX_BYTES,
    Kind,
    decode_header,
    decode_prefix,
    encode_frame,
    encode_head,
    frame_parts,
    read_frame_head,
    read_payload,
)
from lmcached.wire.handshake import ROUTER_ROLE, parse_address
from lmcached.wire.kv_events import chain_lineages
from lmcached.wire.shm import ArenaView, ShmInfo
from lmcached.wire.sockio import SocketStream
from lmcached.wire.tensors import byte_view, check_kv, dtype_from_name, dtype_name
from lmcached.wire.tls import plain_server, plain_to_tls, speaks_tls, speaks_tls_async, tls_to_plain


class DataPlaneError(LmcachedError):
    """The worker refused a data-plane request (it says why)."""


class _Staging:
    """One reusable buffer per client that every chunk passes through on its way in or out.

    A chunk slice of a [2, L, T, C] tensor is strided, so it is copied once either way; copying into the
    same buffer each time touches its pages once, instead of faulting in fresh memory per chunk (which
    halved throughput for 34 MB Llama-8B chunks, above glibc's mmap threshold).
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n].view(dtype).view(tuple(shape))


class _Store:
    """A STORE frame for spans of `kv`: its head now, each chunk's bytes staged just before it is sent."""

    def __init__(self, spans: list[ChunkSpan], kv: torch.Tensor, req_id: int, lineage: dict[int, dict[str, Any]] | None = None) -> None:
        self.spans, self.kv = spans, kv
        dtype = dtype_name(kv.dtype)
        _, layers, _, channels = kv.shape
        item = kv.element_size()
        self.metas = metas = [
            {
                "key": s.key,
                "num_tokens": s.num_tokens,
                "shape": [2, layers, s.num_tokens, channels],
                "dtype": dtype,
                "method": None,
                "nbytes": 2 * layers * s.num_tokens * channels * item,
                **(lineage[s.key] if lineage is not None else {}),
            }
            for s in spans
        ]
        self.head = encode_head(Kind.STORE, {"req_id": req_id, "chunks": metas}, sum(m["nbytes"] for m in metas))

    def chunks(self, staging: _Staging) -> Iterator[memoryview]:
        for span in self.spans:
            part = self.kv[:, :, span.start : span.end, :]
            staged = staging.tensor(part.shape, part.dtype)
            staged.copy_(part)
            yield byte_view(staged)


def _lineage(spans: list[ChunkSpan], tokens: Sequence[int], salt: str | None) -> dict[int, dict[str, Any]]:
    """Each chunk's parent key and tokens (and the salt), for a worker that publishes KV events: routers
    rebuild keys from the tokens."""
    return {key: lineage.as_meta() for key, lineage in chain_lineages(spans, tokens, salt).items()}


class _Retrieve:
    """Assembles a retrieve reply chunk by chunk into one output tensor."""

    def __init__(self, metas: list[dict[str, Any]], out: torch.Tensor | None = None) -> None:
        self.metas = metas
        self.out: torch.Tensor | None = None
        if metas:
            first = metas[0]
            _, layers, _, channels = first["shape"]
            if any(m["shape"][1] != layers or m["shape"][3] != channels or m["dtype"] != first["dtype"] for m in metas):
                raise ProtocolError("the cached prefix mixes KV shapes or dtypes")
            total = sum(m["shape"][2] for m in metas)
            dtype = dtype_from_name(first["dtype"])
            if out is None:
                self.out = torch.empty((2, layers, total, channels), dtype=dtype)
            else:
                if out.dtype != dtype or out.dim() != 4 or tuple(out.shape[:2]) != (2, layers) or out.shape[3] != channels:
                    raise InvalidRequest(
                        f"out must be [2, {layers}, >= {total}, {channels}] {first['dtype']}, got {list(out.shape)} {out.dtype}"
                    )
                if out.shape[2] < total or not out.is_contiguous() or out.device.type != "cpu":
                    raise InvalidRequest(f"out must be a contiguous CPU tensor with room for {total} tokens")
                self.out = out[:, :, :total]

    def targets(self, staging: _Staging) -> Iterator[tuple[memoryview, Callable[[], None]]]:
        """(buffer to receive a chunk into, function that places it) for each chunk in order."""
        offset = 0
        for meta in self.metas:
            assert self.out is not None
            shape, tokens = meta["shape"], meta["shape"][2]
            if len(self.metas) == 1:  # one chunk is the whole output: receive straight into it
                yield byte_view_writable(self.out), lambda: None
                return
            staged = staging.tensor(shape, self.out.dtype)
            target = self.out[:, :, offset : offset + tokens, :]
            yield byte_view_writable(staged), lambda target=target, staged=staged: target.copy_(staged)
            offset += tokens


def _chunks_frame(chunks: Sequence[Chunk], location: str | None, req_id: int) -> list[Any]:
    header = {"req_id": req_id, "chunks": [c.meta() for c in chunks], "location": location}
    return frame_parts(Kind.STORE, header, [c.data for c in chunks])


def _check_reply(kind: Kind, header: dict[str, Any]) -> dict[str, Any]:
    if kind == Kind.ERROR:
        status = header.get("status")
        detail = str(header.get("detail", "worker error"))
        raise Unauthorized(detail) if status == 401 else ProtocolError(detail)
    if kind != Kind.REPLY:
        raise ProtocolError(f"expected a reply, got {kind.name}")
    if "error" in header:
        raise DataPlaneError(str(header["error"]))
    return header


def _dial(host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None, peer: str) -> socket.socket:
    """A connected blocking socket (TCP_NODELAY: frames are small or sent whole), over TLS with a context; a TLS
    handshake that fails says which side speaks what."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is None:
        return sock
    try:
        return ssl_context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLError as exc:
        sock.close()
        raise _tls_mismatch(exc, peer) from None


def _hello(token: str | None) -> dict[str, Any]:
    return {"role": CLIENT_ROLE, "token": token}


class KVClient:
    """A blocking data-plane client (one connection; not thread-safe: one per thread)."""

    def __init__(
        self,
        address: str,
        *,
        auth_token: str | None = None,
        timeout: float = 60.0,
        shared_memory: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        shard: Shard = WHOLE,
    ) -> None:
        self.address = address
        #: A tensor-parallel rank's client stores, finds and loads its own part of each chunk (chunks.Shard).
        self.shard = shard
        self._ssl = ssl_context  # a worker whose data plane speaks TLS: verified against this context's CA
        self._host, self._port = parse_address(address, 8001)
        self._token = auth_token
        self._timeout = timeout
        self._io: FrameSocket | None = None
        self._want_shm = shared_memory
        #: The worker's arena, mapped, when it offered one and this process could open it (same host and user).
        self._arena: ArenaView | None = None
        self._req_ids = itertools.count(1)
        self.chunk_size = 256
        self.save_unfull_chunk = True
        self.send_lineage = False

    def __enter__(self) -> KVClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = _dial(self._host, self._port, self._timeout, self._ssl, f"worker {self.address}")
        self._io = FrameSocket(sock)
        try:
            self._send(frame_parts(Kind.HELLO, _hello(self._token), []))
            kind, header, _ = self._read_head()
            welcome = header if kind == Kind.WELCOME else _check_reply(kind, header)
        except (ProtocolError, OSError) as exc:
            self.close()
            if self._ssl is None and speaks_tls(self._host, self._port):
                raise ConnectionError(plain_to_tls(f"worker {self.address}")) from None
            raise exc
        except BaseException:
            self.close()
            raise
        self.chunk_size = int(welcome["chunk_size"])
        self.save_unfull_chunk = bool(welcome.get("save_unfull_chunk", True))
        self.send_lineage = bool(welcome.get("lineage", False))  # the worker names chunks by their tokens too: send them
        self._arena = None
        offer = welcome.get("shm")
        if self._want_shm and isinstance(offer, dict):
            try:
                info = ShmInfo(
                    int(offer["pid"]), int(offer["fd"]), int(offer["size"]), str(offer["token"]), int(offer.get("prefaulted", 0))
                )
                self._arena = ArenaView(info)
            except (OSError, KeyError, TypeError, ValueError):
                self._arena = None  # another host, another user, another pid namespace: the socket it is

    @property
    def transport(self) -> str:
        """ "shared memory" when KV moves through the worker's arena, else "socket"."""
        return "shared memory" if self._arena is not None else "socket"

    def close(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None
        self._arena = None

    def spans(self, tokens: Sequence[int], salt: str | None = None) -> list[ChunkSpan]:
        return self.shard.spans(chunk_spans(tokens, self.chunk_size, self.save_unfull_chunk, salt))

    def store(
        self,
        tokens: Sequence[int],
        kv: torch.Tensor,
        skip_tokens: int = 0,
        salt: str | None = None,
        dedupe: bool = True,
        kv_start: int = 0,
    ) -> int:
        """Store the chunks of `tokens`' KV, except those wholly inside the first `skip_tokens` (the caller knows
        they are cached) and — with `dedupe`, one small round trip first — those the worker already holds, so
        storing a prompt again moves no KV. Returns the prompt's tokens the worker holds through this call
        (stored now, or found there). `salt` keys a tenant's chunks apart (vLLM's cache_salt). `kv` may cover
        only tokens [kv_start, len(tokens)) — a chunk boundary at or below `skip_tokens` — so that a caller
        never copies out KV it is not going to store."""
        kv = check_kv(kv, len(tokens) - _check_kv_start(kv_start, skip_tokens, self.chunk_size))
        spans = self.spans(tokens, salt)
        lineage = _lineage(spans, tokens, salt) if self.send_lineage else None
        held = self._held(spans) if dedupe and any(s.end > skip_tokens for s in spans) else 0
        found = sum(s.num_tokens for s in spans if s.end <= held)
        # (Token ranges from here on are in `kv`'s own numbering.)
        spans = [ChunkSpan(s.key, s.start - kv_start, s.end - kv_start) for s in spans if s.end > max(skip_tokens, held)]
        if not spans:
            return found
        store = _Store(spans, kv, next(self._req_ids), lineage)
        if self._arena is not None:
            stored = self._store_shm(store, kv)
            if stored is not None:
                return found + stored
        io = self._conn()
        io.send([store.head])
        # Each chunk's bytes are 2×L runs of the tensor's own memory (one per side and layer): sent from there
        # in one gather write, without staging the chunk in a buffer first.
        rows = _rows(kv.contiguous())
        for span in spans:
            io.send_buffers([row[span.start : span.end] for row in rows])
        return found + int(self._reply()["num_tokens"])

    def _store_shm(self, store: _Store, kv: torch.Tensor) -> int | None:
        """Write the chunks into the worker's arena and commit them; None when the worker asks for the socket."""
        assert self._arena is not None
        self._send(frame_parts(Kind.SHM_STORE, {"req_id": next(self._req_ids), "chunks": store.metas}, []))
        reply = self._reply()
        if reply.get("fallback"):
            return None
        rows = _rows(kv.contiguous())
        for span, meta, offset in zip(store.spans, store.metas, reply["offsets"], strict=True):
            self._arena.populate(offset, meta["nbytes"])  # map the block's pages in one call, not a fault a page
            block = self._arena.view(offset, meta["nbytes"]).reshape(rows.shape[0], span.num_tokens, rows.shape[2])
            _copy(block, rows[:, span.start : span.end])
        self._send(frame_parts(Kind.SHM_COMMIT, {"req_id": next(self._req_ids), "store": reply["store"]}, []))
        return int(self._reply()["num_tokens"])

    @contextlib.contextmanager
    def _lease(self, keys: list[int]) -> Iterator[tuple[list[dict[str, Any]], list[int]] | None]:
        """The worker's arena blocks of the cached prefix of `keys` — (chunk metadata, their offsets) — which
        it reuses for nothing else until the block ends; None when the worker asks for the socket."""
        assert self._arena is not None
        self._send(frame_parts(Kind.SHM_RETRIEVE, {"req_id": next(self._req_ids), "keys": keys}, []))
        reply = self._reply()
        if reply.get("fallback"):
            yield None
            return
        try:
            yield chunk_headers(reply), reply["offsets"]
        finally:  # the worker may reuse the blocks now (no reply: nothing to wait for)
            self._send(frame_parts(Kind.SHM_RELEASE, {"lease": reply["lease"]}, []))

    def _retrieve_shm(self, keys: list[int], out: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        """(True, the KV) read out of the worker's arena under a lease, or (False, None) to use the socket."""
        assert self._arena is not None
        with self._lease(keys) as lease:
            if lease is None:
                return False, None
            metas, offsets = lease
            retrieve = _Retrieve(metas, out)
            if retrieve.out is None:
                return True, None
            rows = _rows(retrieve.out if out is None else out)
            start = 0
            for meta, offset in zip(metas, offsets, strict=True):
                tokens = meta["shape"][2]
                block = self._arena.view(offset, meta["nbytes"]).reshape(rows.shape[0], tokens, rows.shape[2])
                _copy(rows[:, start : start + tokens], block)
                start += tokens
            return True, retrieve.out

    @contextlib.contextmanager
    def retrieve_in_place(self, tokens: Sequence[int], salt: str | None = None) -> Iterator[list[tuple[int, torch.Tensor]] | None]:
        """The cached prefix as (first token, [2, L, T, C]) tensors over the worker's own memory — no copy — to
        be read only, and only inside the with-block: the worker keeps the blocks under a lease until it ends.
        None where its memory is not shared with this process (another host, a chunk outside its arena): use
        retrieve(). A placement into an engine's cache reads each byte once, so a copy first would double it
        (and fault in fresh pages for it)."""
        if self._arena is None:
            yield None
            return
        with self._lease([s.key for s in self.spans(tokens, salt)]) as lease:
            if lease is None:
                yield None
                return
            pieces: list[tuple[int, torch.Tensor]] = []
            start = 0
            whole = torch.from_numpy(self._arena.array)  # all pieces slices of one tensor: one batch to place
            for meta, offset in zip(*lease, strict=True):
                dtype, shape = dtype_from_name(meta["dtype"]), tuple(meta["shape"])
                if meta["nbytes"] != math.prod(shape) * dtype.itemsize:
                    raise ProtocolError(f"a chunk of {meta['nbytes']} bytes cannot be {list(shape)} {meta['dtype']}")
                self._arena.populate(offset, meta["nbytes"])  # its pages mapped in one call, not a fault a page
                pieces.append((start, whole[offset : offset + meta["nbytes"]].view(dtype).view(shape)))
                start += shape[2]
            yield pieces

    def _held(self, spans: list[ChunkSpan]) -> int:
        """How many tokens of these chunks' prefix the worker holds (in any tier)."""
        self._send(frame_parts(Kind.LOOKUP, {"req_id": next(self._req_ids), "keys": [s.key for s in spans], "dedupe": True}, []))
        return int(self._reply()["num_tokens"])

    def lookup(self, tokens: Sequence[int], salt: str | None = None, continued: bool = False) -> int:
        """The length of `tokens`' prefix that the worker holds. `continued`: where that prefix ends at a whole
        chunk, ask once more whether a shorter prompt's last, partial chunk carries it further (a chat's previous
        round, stored with save_unfull_chunk): retrieve(tokens[:the answer]) then reads it."""
        spans = chunk_spans(tokens, self.chunk_size, self.save_unfull_chunk, salt)
        keys = [s.key for s in self.shard.spans(spans)]
        self._send(frame_parts(Kind.LOOKUP, {"req_id": next(self._req_ids), "keys": keys}, []))
        held = int(self._reply()["num_tokens"])
        whole = [s for s in spans if s.end <= held and s.num_tokens == self.chunk_size]
        if not continued or (whole[-1].end if whole else 0) != held:
            return held
        candidates = continuation_spans(tokens, whole, self.chunk_size, salt)
        if not candidates:
            return held
        # Only the candidates: the prefix before them was just found held, and asking for it again would check
        # (and count) it twice, the remote tier's part included.
        header = {"req_id": next(self._req_ids), "keys": [], "then": [s.key for s in self.shard.spans(candidates)]}
        self._send(frame_parts(Kind.LOOKUP, header, []))
        return held + int(self._reply()["num_tokens"])

    def retrieve(self, tokens: Sequence[int], salt: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The KV of the cached prefix [2, L, n, C] (compressed chunks come back decoded), or None.

        With `out` (a contiguous [2, L, >= len(tokens), C] tensor of the KV's dtype, e.g. a buffer the caller
        reuses) the KV lands there and the result is its first n tokens; else in a new tensor. Each chunk is
        received straight into its place (one scatter read per chunk), never staged."""
        keys = [s.key for s in self.spans(tokens, salt)]
        if self._arena is not None:
            done, kv = self._retrieve_shm(keys, out)
            if done:
                return kv
        self._send(frame_parts(Kind.RETRIEVE, {"req_id": next(self._req_ids), "keys": keys}, []))
        kind, header, payload_len = self._read_head()
        metas = chunk_headers(_check_reply(kind, header))
        if sum(m["nbytes"] for m in metas) != payload_len:
            raise ProtocolError("retrieve reply sizes do not add up")
        retrieve = _Retrieve(metas, out)
        if retrieve.out is None:
            return None
        rows = _rows(retrieve.out if out is None else out)
        offset = 0
        for meta in metas:
            tokens_here = meta["shape"][2]
            self._conn().recv_buffers([row[offset : offset + tokens_here] for row in rows])
            offset += tokens_here
        return retrieve.out

    # -- I/O
    def _conn(self) -> FrameSocket:
        if self._io is None:
            raise LmcachedError("KVClient is not connected (use it as a context manager or call connect())")
        return self._io

    def _send(self, parts: list[Any]) -> None:
        self._conn().send(parts)

    def _read_head(self) -> tuple[Kind, dict[str, Any], int]:
        return self._conn().read_head(MAX_DATA_PAYLOAD_BYTES)

    def _reply(self) -> dict[str, Any]:
        kind, header, payload_len = self._read_head()
        if payload_len:
            self._conn().recv(payload_len)
        return _check_reply(kind, header)


def _check_kv_start(kv_start: int, skip_tokens: int, chunk_size: int) -> int:
    """A KV tensor may start late only at a chunk boundary no later than the tokens to store."""
    if kv_start < 0 or kv_start % chunk_size or kv_start > skip_tokens:
        said = f"kv_start {kv_start} must be a chunk boundary ({chunk_size} tokens), at most skip_tokens {skip_tokens}"
        raise InvalidRequest(said, "kv_start")
    return kv_start


def _rows(kv: torch.Tensor) -> Any:
    """A contiguous [2, L, T, C] tensor as 2×L rows of T×C elements' bytes (numpy uint8 [2L, T, C×itemsize]):
    a chunk's payload is the same token range of every row, in order."""
    two, layers, tokens, channels = kv.shape
    return kv.view(torch.uint8).numpy().reshape(two * layers, tokens, channels * kv.element_size())


def _copy(dst: Any, src: Any) -> None:
    """Copy between numpy byte views with torch, which splits a large copy over its threads (numpy uses one):
    a copy through shared memory is bound by one core's memory bandwidth otherwise, half the machine's."""
    torch.from_numpy(dst).copy_(torch.from_numpy(src))


def _tls_mismatch(exc: ssl.SSLError, where: str) -> OSError:
    """What a failed TLS handshake means, in one line."""
    return ConnectionError(tls_to_plain(where) if plain_server(exc) else f"{where}: {exc}")


def byte_view_writable(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor, for reading a payload straight into it."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


class AsyncKVClient:
    """The asyncio twin of KVClient (zero-copy socket I/O too); its requests are serialised on one connection."""

    def __init__(
        self,
        address: str,
        *,
        auth_token: str | None = None,
        timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        shard: Shard = WHOLE,
    ) -> None:
        self.address = address
        self.shard = shard
        self._host, self._port = parse_address(address, 8001)
        self._token = auth_token
        self._timeout = timeout
        self._ssl = ssl_context
        self._stream: SocketStream | None = None
        self._staging = _Staging()
        self._lock = asyncio.Lock()
        self._req_ids = itertools.count(1)
        self.chunk_size = 256
        self.save_unfull_chunk = True
        self.send_lineage = False

    async def __aenter__(self) -> AsyncKVClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._stream = await SocketStream.connect(self._host, self._port, self._timeout, self._ssl)
        except ssl.SSLError as exc:
            raise _tls_mismatch(exc, f"worker {self.address}") from None
        try:
            await self._stream.sendall(frame_parts(Kind.HELLO, _hello(self._token), []))
            kind, header, _ = await self._read_head()
            welcome = header if kind == Kind.WELCOME else _check_reply(kind, header)
        except (ProtocolError, OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            if self._ssl is None and await speaks_tls_async(self._host, self._port):
                raise ConnectionError(plain_to_tls(f"worker {self.address}")) from None
            raise exc
        except BaseException:
            await self.close()
            raise
        self.chunk_size = int(welcome["chunk_size"])
        self.save_unfull_chunk = bool(welcome.get("save_unfull_chunk", True))
        self.send_lineage = bool(welcome.get("lineage", False))  # the worker names chunks by their tokens too: send them

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def spans(self, tokens: Sequence[int], salt: str | None = None) -> list[ChunkSpan]:
        return self.shard.spans(chunk_spans(tokens, self.chunk_size, self.save_unfull_chunk, salt))

    async def store(
        self, tokens: Sequence[int], kv: torch.Tensor, skip_tokens: int = 0, salt: str | None = None, dedupe: bool = True
    ) -> int:
        """Store the chunks of `tokens`' KV, except those wholly inside the first `skip_tokens` (already cached:
        storing them again would replace a compressed chunk with its raw bytes) and, with `dedupe`, those the
        worker already holds (asked first, in one small round trip). Returns the prompt's tokens the worker
        holds through this call (stored now, or found there)."""
        kv = check_kv(kv, len(tokens))
        spans = self.spans(tokens, salt)
        lineage = _lineage(spans, tokens, salt) if self.send_lineage else None
        async with self._lock:
            held = 0
            if dedupe and any(s.end > skip_tokens for s in spans):
                frame = frame_parts(Kind.LOOKUP, {"req_id": next(self._req_ids), "keys": [s.key for s in spans], "dedupe": True}, [])
                held = int((await self._request(frame))["num_tokens"])
            found = sum(s.num_tokens for s in spans if s.end <= held)
            spans = [s for s in spans if s.end > max(skip_tokens, held)]
            if not spans:
                return found
            store = _Store(spans, kv, next(self._req_ids), lineage)
            stream = self._conn()
            await stream.sendall([store.head])
            for view in store.chunks(self._staging):
                await stream.sendall([view])  # sent before the staging buffer is reused for the next chunk
            return found + int((await self._reply())["num_tokens"])

    async def store_chunks(self, chunks: Sequence[Chunk], location: str | None = None) -> int:
        """Store ready-made chunks (raw or compressed) as they are: how workers move KV to each other."""
        if not chunks:
            return 0
        async with self._lock:
            return int((await self._request(_chunks_frame(chunks, location, next(self._req_ids))))["num_tokens"])

    async def has_codebook(self, digest: str) -> bool:
        """Whether the worker holds kvtc codebook `digest` (or can fetch it from its remote tier)."""
        async with self._lock:
            return bool((await self._request(frame_parts(Kind.CODEBOOK, {"req_id": next(self._req_ids), "digest": digest}, [])))["have"])

    async def put_codebook(self, digest: str, data: bytes, current: bool = False) -> None:
        """Give the worker kvtc codebook `digest` (its bytes, checked against the digest there); with `current`,
        its new kvtc blobs of that shape use it from then on."""
        async with self._lock:
            head = {"req_id": next(self._req_ids), "digest": digest, "current": current}
            await self._request(frame_parts(Kind.CODEBOOK, head, [data]))

    async def lookup(self, tokens: Sequence[int], salt: str | None = None) -> int:
        """The length of `tokens`' prefix that the worker holds."""
        async with self._lock:
            frame = frame_parts(Kind.LOOKUP, {"req_id": next(self._req_ids), "keys": [s.key for s in self.spans(tokens, salt)]}, [])
            return int((await self._request(frame))["num_tokens"])

    async def retrieve(self, tokens: Sequence[int], salt: str | None = None) -> torch.Tensor | None:
        """The KV of the cached prefix [2, L, n, C] (compressed chunks come back decoded), or None."""
        async with self._lock:
            stream = self._conn()
            keys = [s.key for s in self.spans(tokens, salt)]
            await stream.sendall(frame_parts(Kind.RETRIEVE, {"req_id": next(self._req_ids), "keys": keys}, []))
            kind, header, payload_len = await self._read_head()
            metas = chunk_headers(_check_reply(kind, header))
            if sum(m["nbytes"] for m in metas) != payload_len:
                raise ProtocolError("retrieve reply sizes do not add up")
            retrieve = _Retrieve(metas)
            for buffer, place in retrieve.targets(self._staging):
                await asyncio.wait_for(stream.readinto(buffer), self._timeout)
                place()
            return retrieve.out

    def _conn(self) -> SocketStream:
        if self._stream is None:
            raise LmcachedError("AsyncKVClient is not connected (use `async with` or await connect())")
        return self._stream

    async def _read_head(self) -> tuple[Kind, dict[str, Any], int]:
        try:
            head = await asyncio.wait_for(read_frame_head(self._conn(), MAX_DATA_PAYLOAD_BYTES), self._timeout)
        except asyncio.IncompleteReadError:
            raise ProtocolError("worker closed the connection") from None
        if head is None:
            raise ProtocolError("worker closed the connection")
        return head

    async def _request(self, parts: list[Any]) -> dict[str, Any]:
        await self._conn().sendall(parts)
        return await self._reply()

    async def _reply(self) -> dict[str, Any]:
        kind, header, payload_len = await self._read_head()
        await read_payload(self._conn(), payload_len)
        return _check_reply(kind, header)


class IndexClient:
    """A router's view of the controller's index, on the control port (9001): which instance holds how much of a
    prompt, and in which tier, in one small binary round trip (blocking; one connection; not thread-safe).

        with IndexClient("controller:9001") as index:
            index.lookup(tokens)        # {"instance": ("LocalCPUBackend", tokens matched, chunks matched)}
            index.lookup_keys(keys)     # the same for chunk keys the router hashed itself (chunks.chunk_spans)
    """

    def __init__(
        self, address: str, *, auth_token: str | None = None, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.address = address
        self._host, self._port = parse_address(address, 9001)
        self._token = auth_token
        self._timeout = timeout
        self._ssl = ssl_context
        self._sock: socket.socket | None = None
        self._inbox = bytearray()  # what arrived and is not read yet: a reply is read in one recv, not two
        self._req_ids = itertools.count(1)
        self.chunk_size = 256
        #: Microseconds the controller spent on the last lookup (its reply says), without the network.
        self.server_us = 0.0

    def __enter__(self) -> IndexClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = _dial(self._host, self._port, self._timeout, self._ssl, f"controller {self.address}")
        self._sock = sock
        self._inbox.clear()
        try:
            sock.sendall(encode_frame(Kind.HELLO, {"role": ROUTER_ROLE, "token": self._token}))
            kind, header = self._read_frame()
            if kind == Kind.ERROR:
                detail = str(header.get("detail", "refused"))
                raise Unauthorized(detail) if header.get("status") == 401 else ProtocolError(f"controller {self.address}: {detail}")
            if kind != Kind.WELCOME:
                raise ProtocolError(f"controller {self.address} answered a hello with {kind.name}")
        except BaseException:
            self.close()
            raise
        self.chunk_size = int(header.get("chunk_size", 256))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_frame(self) -> tuple[Kind, dict[str, Any]]:
        """The next frame's kind and header (a router's frames carry no payload back)."""
        assert self._sock is not None
        inbox = self._inbox
        while True:
            if len(inbox) >= PREFIX_BYTES:
                kind, header_len, payload_len = decode_prefix(bytes(inbox[:PREFIX_BYTES]), MAX_CONTROL_PAYLOAD_BYTES)
                end = PREFIX_BYTES + header_len + payload_len
                if len(inbox) >= end:
                    header = decode_header(bytes(inbox[PREFIX_BYTES : PREFIX_BYTES + header_len])) if header_len else {}
                    del inbox[:end]
                    return kind, header
            data = self._sock.recv(65536)
            if not data:
                raise ProtocolError(f"controller {self.address} closed the connection")
            inbox += data

    def lookup(self, tokens: Sequence[int], salt: str | None = None) -> dict[str, tuple[str, int, int]]:
        """Each instance holding a prefix of `tokens`: (the tier with the longest one, its tokens, its chunks)."""
        header: dict[str, Any] = {"by": "tokens"} | ({"salt": salt} if salt is not None else {})
        return self._lookup(header, tokens_array(tokens).tobytes())

    def lookup_keys(self, keys: Sequence[int]) -> dict[str, tuple[str, int, int]]:
        """lookup() for a prompt already cut and hashed into chunk keys."""
        try:
            payload = np.asarray(keys, dtype="<u8").tobytes()
        except (OverflowError, ValueError, TypeError):
            raise InvalidRequest("keys must be 64-bit unsigned integers") from None
        return self._lookup({"by": "keys"}, payload)

    def _lookup(self, header: dict[str, Any], payload: bytes) -> dict[str, tuple[str, int, int]]:
        if self._sock is None:
            raise LmcachedError("IndexClient is not connected (use `with` or connect())")
        req_id = next(self._req_ids)
        self._sock.sendall(encode_frame(Kind.LOOKUP, {"req_id": req_id, **header}, payload))
        kind, reply = self._read_frame()
        if kind != Kind.REPLY or reply.get("req_id") != req_id:
            raise ProtocolError(f"controller {self.address} answered a lookup with {kind.name} {reply.get('detail', '')}".rstrip())
        self.server_us = float(reply.get("us", 0.0))
        if "error" in reply:
            raise InvalidRequest(str(reply["error"]))
        return {inst: (str(loc), int(tokens), int(chunks)) for inst, (loc, tokens, chunks) in reply["instances"].items()}
