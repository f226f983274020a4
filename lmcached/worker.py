"""A worker (storage instance): its backends, its data plane (port 8001) and its link to the controller."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from lmcached.backends import (
    CPU,
    DISK,
    Backend,
    Chunk,
    ChunkInfo,
    LocalCPUBackend,
    LocalDiskBackend,
    check_location,
)
from lmcached.config import Config
from lmcached.dataplane import check_keys, chunk_headers
from lmcached.errors import InvalidRequest, LmcachedError, NotFound, ProtocolError, Unauthorized
from lmcached.frames import (
    HELLO_TIMEOUT_S,
    MAX_DATA_PAYLOAD_BYTES,
    ByteReader,
    Kind,
    frame_parts,
    read_frame,
    read_frame_head,
    read_payload,
    write_frame,
)
from lmcached.sockio import SocketStream, serve_sockets

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Reports of admitted/evicted chunks are batched for this long (or this many) before they are sent.
REPORT_INTERVAL_S = 0.05
REPORT_BATCH = 4096
#: Disk writes queued behind RAM are bounded to this many bytes; a store waits when they reach it.
WRITE_BEHIND_BYTES = 512 * 1024 * 1024
DISK_DRAIN_TIMEOUT_S = 30.0
#: A full resync is sent in frames of this many chunks.
RESYNC_BATCH = 20000
WORKER_ROLE = "worker"


def parse_address(address: str, default_port: int) -> tuple[str, int]:
    """'host:port' (or 'host', or ':port') to a pair; LMCache writes controller_url without a scheme."""
    text = address.removeprefix("tcp://").removeprefix("http://")
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise InvalidRequest(f"bad address {address!r}: expected HOST:PORT") from None


def encode_chunk(chunk: Chunk, method: str) -> Chunk:
    """Compress a raw chunk with a codec (runs in the executor)."""
    from lmcached.codecs import get_codec
    from lmcached.tensors import from_bytes

    kv = from_bytes(chunk.data, chunk.shape, chunk.dtype)
    return replace(chunk, data=get_codec(method).encode(kv), method=method)


def decode_chunk(chunk: Chunk) -> Chunk:
    """Turn a compressed chunk back into raw bytes (runs in the executor)."""
    from lmcached.codecs import get_codec
    from lmcached.tensors import byte_view, dtype_name

    assert chunk.method is not None
    kv = get_codec(chunk.method).decode(chunk.data)
    if tuple(kv.shape) != chunk.shape or dtype_name(kv.dtype) != chunk.dtype:
        raise LmcachedError(f"chunk {chunk.key:016x} decoded to {list(kv.shape)} {kv.dtype}, expected {chunk.shape}")
    return replace(chunk, data=bytes(byte_view(kv)), method=None)


def raw_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}.get(dtype)
    if itemsize is None:
        raise ProtocolError(f"unsupported KV dtype {dtype!r}")
    return math.prod(shape) * itemsize


def token_matches(expected: str | None, given: Any) -> bool:
    """Constant-time token check (no token configured: everything passes)."""
    if expected is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


async def receive_hello(reader: ByteReader, token: str | None) -> dict[str, Any] | None:
    """A connection's first frame: a hello, within HELLO_TIMEOUT_S, carrying the token when one is set.
    None when the peer left without a word; asyncio.TimeoutError, ProtocolError or Unauthorized otherwise."""
    hello = await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT_S)
    if hello is None:
        return None
    if hello.kind != Kind.HELLO:
        raise ProtocolError("the first frame must be a hello")
    if not token_matches(token, hello.header.get("token")):
        raise Unauthorized("bad or missing auth token")
    return hello.header


class Worker:
    """One storage instance: LocalCPUBackend (+ LocalDiskBackend), a data-plane server, a controller link."""

    def __init__(
        self,
        config: Config,
        *,
        instance_id: str | None = None,
        worker_id: str | None = None,
        data_host: str | None = None,
        data_port: int | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.instance_id = instance_id or config.lmcache_instance_id
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.data_host = data_host or config.host
        self.data_port = config.lmcache_worker_port if data_port is None else data_port
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="lmcached")
        self.backends: dict[str, Backend] = {}
        if config.local_cpu:
            self.backends[CPU] = LocalCPUBackend(config.max_local_cpu_bytes)
        self._pending: dict[tuple[str, int], ChunkInfo | None] = {}
        # Disk write-behind: with RAM in front, a store returns once RAM holds the chunks; the disk copy
        # follows in order (an fsync per chunk made stores 5x slower: 0.33 vs 1.6 GB/s, measured).
        self._disk_queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._disk_pending_bytes = 0
        self._disk_room = asyncio.Event()
        self._disk_writer: asyncio.Task[None] | None = None
        self._report_ready = asyncio.Event()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._client_tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.connected = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def start(self, connect: bool = True) -> None:
        """Open the disk backend, start the data plane and (if a controller is configured) dial it."""
        disk = self.config.local_disk_path
        if disk is not None:
            self.backends[DISK] = await self._run(LocalDiskBackend, disk, self.config.max_local_disk_bytes)
        if not self.backends:
            raise InvalidRequest("the worker has no storage: enable local_cpu or set local_disk")
        if DISK in self.backends and CPU in self.backends:
            self._disk_writer = asyncio.create_task(self._write_behind_loop(), name="disk-write-behind")
        self._listener, self._accept_task = await serve_sockets(self.data_host, self.data_port, self._serve_client)
        self.data_port = self._listener.getsockname()[1]
        log.info("worker %s/%s data plane on %s:%d", self.instance_id, self.worker_id, self.data_host, self.data_port)
        if connect and self.config.enable_controller:
            self._link_task = asyncio.create_task(self._controller_loop(), name="controller-link")

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError, LmcachedError, asyncio.TimeoutError):  # tell the controller this is a shutdown, not a loss
            await asyncio.wait_for(self._send(Kind.GOODBYE, {}, flush_first=True), 1.0)
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._client_tasks):
            task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)
        if self._disk_writer is not None:  # what RAM already holds reaches the disk before we go
            try:
                await asyncio.wait_for(self._disk_queue.join(), DISK_DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("stopping with %d chunk(s) not yet written to disk", self._disk_queue.qsize())
            self._disk_writer.cancel()
            await asyncio.gather(self._disk_writer, return_exceptions=True)
        if self._own_executor:
            self.executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---------------------------------------------------------------- storage
    def _note(self, location: str, key: int) -> None:
        """Queue a report of a chunk's current state at `location` (None when it left)."""
        self._pending[(location, key)] = self.backends[location].info(key)
        self._report_ready.set()

    def backend(self, location: str) -> Backend:
        check_location(location)
        try:
            return self.backends[location]
        except KeyError:
            raise NotFound(f"instance {self.instance_id} has no {location} (enable it in the config)") from None

    async def _put(self, location: str, chunk: Chunk) -> None:
        backend = self.backends[location]
        evicted = await self._run(backend.put, chunk) if location == DISK else backend.put(chunk)
        for key in evicted:
            self._note(location, key)
        self._note(location, chunk.key)

    async def store(self, chunks: list[Chunk], location: str | None = None) -> int:
        """Admit chunks; with no location, to RAM and (write-behind) disk, as LMCache does. Returns tokens stored."""
        locations = [location] if location else list(self.backends)
        for loc in locations:
            self.backend(loc)
        behind = location is None and self._disk_writer is not None
        stored = 0
        for chunk in chunks:
            for loc in locations:
                if loc == DISK and behind:
                    await self._queue_disk_write(chunk)
                else:
                    await self._put(loc, chunk)
            stored += chunk.num_tokens
        await self.flush_reports()
        return stored

    async def _queue_disk_write(self, chunk: Chunk) -> None:
        while self._disk_pending_bytes >= WRITE_BEHIND_BYTES:  # backpressure: pending writes stay bounded
            self._disk_room.clear()
            await self._disk_room.wait()
        self._disk_pending_bytes += chunk.nbytes
        self._disk_queue.put_nowait(chunk)

    async def _write_behind_loop(self) -> None:
        while True:
            chunk = await self._disk_queue.get()
            try:
                await self._put(DISK, chunk)
            except (LmcachedError, OSError) as exc:
                log.warning("chunk %016x not written to disk: %s", chunk.key, exc)
            finally:
                self._disk_pending_bytes -= chunk.nbytes
                self._disk_room.set()
                self._disk_queue.task_done()

    async def flush_disk(self) -> None:
        """Wait until every queued disk write has landed (before any command touches the disk)."""
        if self._disk_writer is not None:
            await self._disk_queue.join()

    async def _get(self, location: str, key: int) -> Chunk | None:
        backend = self.backends[location]
        if location == DISK:
            chunk = await self._run(backend.get, key)
            if chunk is None and key in getattr(backend, "dropped_corrupt", ()):
                self._note(location, key)
            return chunk
        return backend.get(key)

    async def prefix(self, keys: list[int]) -> list[Chunk]:
        """The stored chunks of the longest cached prefix of `keys`, RAM first, then disk."""
        found: list[Chunk] = []
        for key in keys:
            chunk = None
            for location, backend in self.backends.items():
                if key in backend:
                    chunk = await self._get(location, key)
                    if chunk is not None:
                        break
            if chunk is None:
                break
            found.append(chunk)
        return found

    def lookup(self, keys: list[int]) -> int:
        tokens = 0
        for key in keys:
            info = next((b.info(key) for b in self.backends.values() if key in b), None)
            if info is None:
                break
            tokens += info.num_tokens
        return tokens

    async def retrieve(self, keys: list[int]) -> list[Chunk]:
        """The cached prefix as raw chunks, decoding compressed ones off the event loop."""
        chunks = await self.prefix(keys)
        return list(await asyncio.gather(*(self._run(decode_chunk, c) if c.method else _done(c) for c in chunks)))

    # ---------------------------------------------------------------- commands from the controller
    async def execute(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one controller command; raises LmcachedError subclasses for refusals."""
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise InvalidRequest(f"unknown worker command {op!r}")
        if DISK in (args.get("location"), args.get("target_location")):
            await self.flush_disk()  # a clear or compress must not be overtaken by a queued write
        return await handler(args)

    async def _op_health(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def _op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.info()

    def info(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "data_address": f"{self.data_host}:{self.data_port}",
            "locations": {name: b.stats() for name, b in self.backends.items()},
            "pid": os.getpid(),
        }

    async def _transform(
        self, args: dict[str, Any], skip_reason: Callable[[Chunk], str | None], fn: Callable[[Chunk], Chunk]
    ) -> dict[str, Any]:
        """Re-encode chunks in place. A chunk `skip_reason` names is left alone, and so is a compressed chunk
        whose re-encoding would be larger (a lossy blob re-encoded losslessly only grows); the result counts
        skipped chunks by reason."""
        location = args["location"]
        backend = self.backend(location)
        before = after = tokens = count = 0
        skipped: dict[str, int] = {}

        async def one(key: int) -> None:
            nonlocal before, after, tokens, count
            chunk = await self._get(location, key)
            if chunk is None:
                return
            reason = skip_reason(chunk)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                return
            new = await self._run(fn, chunk)
            if chunk.method is not None and new.method is not None and new.nbytes >= chunk.nbytes:
                reason = f"kept {chunk.method}, smaller than {new.method}"
                skipped[reason] = skipped.get(reason, 0) + 1
                return
            # Swap only if nobody changed the chunk meanwhile; the old bytes stay until the new ones are whole.
            swapped = await self._run(backend.replace_if_same, chunk, new) if location == DISK else backend.replace_if_same(chunk, new)
            if swapped:
                self._note(location, key)
                before += chunk.nbytes
                after += new.nbytes
                tokens += chunk.num_tokens
                count += 1

        await asyncio.gather(*(one(k) for k in args["keys"]))
        return {"num_tokens": tokens, "chunks": count, "bytes_before": before, "bytes_after": after, "skipped": skipped}

    async def _op_compress(self, args: dict[str, Any]) -> dict[str, Any]:
        method = args["method"]
        return await self._transform(
            args,
            lambda c: f"already compressed with {method}" if c.method == method else None,
            lambda c: encode_chunk(decode_chunk(c) if c.method else c, method),
        )

    async def _op_decompress(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._transform(args, lambda c: "not compressed" if c.method is None else None, decode_chunk)

    async def _set_pinned(self, args: dict[str, Any], pinned: bool) -> dict[str, Any]:
        location = args["location"]
        backend = self.backend(location)
        tokens = 0
        for key in args["keys"]:
            info = backend.info(key)
            done = await self._run(backend.set_pinned, key, pinned) if location == DISK else backend.set_pinned(key, pinned)
            if done and info is not None:
                tokens += info.num_tokens
                self._note(location, key)
        return {"num_tokens": tokens}

    async def _op_pin(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_pinned(args, True)

    async def _op_unpin(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_pinned(args, False)

    async def _op_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        location = args["location"]
        backend = self.backend(location)
        keys = args.get("keys")
        tokens = 0
        for key in backend.keys() if keys is None else keys:
            info = backend.info(key)
            if info is None:
                continue
            removed = await self._run(backend.remove, key) if location == DISK else backend.remove(key)
            if removed:
                tokens += info.num_tokens
                self._note(location, key)
        return {"num_tokens": tokens}

    async def _op_move(self, args: dict[str, Any]) -> dict[str, Any]:
        """Copy (or move) chunks to another location here or to another worker's data plane, blobs as they are."""
        location, target_location = args["location"], args["target_location"]
        self.backend(location)
        chunks: list[Chunk] = []
        for key in args["keys"]:
            chunk = await self._get(location, key)
            if chunk is None:
                break
            chunks.append(chunk)
        target = args.get("target_address")
        if target is None:
            self.backend(target_location)
            await self.store(chunks, target_location)
        else:
            from lmcached.client import AsyncKVClient

            async with AsyncKVClient(target, auth_token=self.config.auth_token) as client:
                await client.store_chunks(chunks, target_location)
        if not args.get("copy", False):
            await self._op_clear({"location": location, "keys": [c.key for c in chunks]})
        return {"num_tokens": sum(c.num_tokens for c in chunks)}

    # ---------------------------------------------------------------- data plane server
    async def _serve_client(self, stream: SocketStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._client_tasks.add(task)
        try:
            if await receive_hello(stream, self.config.auth_token) is None:
                return
            welcome = {
                "chunk_size": self.config.chunk_size,
                "instance_id": self.instance_id,
                "worker_id": self.worker_id,
                "save_unfull_chunk": self.config.save_unfull_chunk,
            }
            await stream.sendall(frame_parts(Kind.WELCOME, welcome, []))
            while True:
                head = await read_frame_head(stream, MAX_DATA_PAYLOAD_BYTES)
                if head is None:
                    return
                await self._answer(stream, *head)
        except (ProtocolError, Unauthorized) as exc:
            log.warning("data-plane peer %s: %s; closing", stream.peername(), exc)
            with contextlib.suppress(OSError):
                await stream.sendall(frame_parts(Kind.ERROR, {"detail": str(exc), "status": exc.http_status}, []))
        except asyncio.TimeoutError:
            log.warning("data-plane peer %s sent no hello in %.0fs; closing", stream.peername(), HELLO_TIMEOUT_S)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._client_tasks.discard(task)
            stream.close()

    async def _reply(self, stream: SocketStream, header: dict[str, Any], payloads: list[Any] | None = None) -> None:
        await stream.sendall(frame_parts(Kind.REPLY, header, payloads or []))

    async def _answer(self, stream: SocketStream, kind: Kind, header: dict[str, Any], payload_len: int) -> None:
        req_id = header.get("req_id")
        if kind == Kind.STORE:
            metas = chunk_headers(header)
            if sum(m["nbytes"] for m in metas) != payload_len:
                raise ProtocolError("chunk sizes do not add up to the payload length")
            chunks = []
            for meta in metas:
                data = await read_payload(stream, meta["nbytes"])  # straight into this chunk's own buffer
                chunk = Chunk.from_meta(meta, data)
                if chunk.method is None and raw_nbytes(chunk.shape, chunk.dtype) != chunk.nbytes:
                    raise ProtocolError(f"chunk {chunk.key:016x}: {chunk.nbytes} bytes do not match shape {list(chunk.shape)}")
                chunks.append(chunk)
            try:
                stored = await self.store(chunks, header.get("location"))
            except LmcachedError as exc:
                await self._reply(stream, {"req_id": req_id, "error": str(exc), "status": exc.http_status})
                return
            await self._reply(stream, {"req_id": req_id, "num_tokens": stored})
            return
        if payload_len:
            raise ProtocolError(f"{kind.name} frames carry no payload")
        if kind == Kind.LOOKUP:
            await self._reply(stream, {"req_id": req_id, "num_tokens": self.lookup(check_keys(header))})
        elif kind == Kind.RETRIEVE:
            try:
                chunks = await self.retrieve(check_keys(header))
            except LmcachedError as exc:
                await self._reply(stream, {"req_id": req_id, "error": str(exc), "status": exc.http_status})
                return
            await self._reply(stream, {"req_id": req_id, "chunks": [c.meta() for c in chunks]}, [c.data for c in chunks])
        else:
            raise ProtocolError(f"unexpected {kind.name} frame on the data plane")

    # ---------------------------------------------------------------- controller link
    async def _controller_loop(self) -> None:
        """Stay connected to the controller: reconnect with capped exponential backoff, resync each time."""
        host, port = parse_address(self.config.controller_url, 9001)
        delay = 0.1
        while not self._stopping:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                log.info("controller %s:%d unreachable (%s); retrying in %.1fs", host, port, exc.strerror, delay)
            else:
                try:
                    await self._controller_session(reader, writer)
                    delay = 0.1
                except (ProtocolError, Unauthorized, ConnectionError) as exc:
                    log.warning("controller link lost: %s", exc)
                finally:
                    self.connected.clear()
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _controller_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await write_frame(
            writer,
            Kind.HELLO,
            {
                "role": WORKER_ROLE,
                "instance_id": self.instance_id,
                "worker_id": self.worker_id,
                "data_address": f"{self.data_host}:{self.data_port}",
                "token": self.config.auth_token,
                "chunk_size": self.config.chunk_size,
                "locations": list(self.backends),
            },
        )
        welcome = await read_frame(reader)
        if welcome is None:
            raise ConnectionError("controller closed the connection during the hello")
        if welcome.kind == Kind.ERROR:
            raise Unauthorized(str(welcome.header.get("detail", "controller refused the hello")))
        if welcome.kind != Kind.WELCOME:
            raise ProtocolError(f"expected a welcome, got {welcome.kind.name}")
        self._link = _Link(writer)
        try:
            await self._resync()
            self.connected.set()
            log.info("worker %s registered with the controller", self.worker_id)
            await self._serve_link(reader)
        finally:
            self._link = None

    async def _serve_link(self, reader: asyncio.StreamReader) -> None:
        background = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._reports())]
        commands: set[asyncio.Task[None]] = set()
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    raise ConnectionError("controller closed the connection")
                if frame.kind == Kind.COMMAND:
                    task = asyncio.create_task(self._run_command(frame.header))
                    commands.add(task)
                    task.add_done_callback(commands.discard)
                elif frame.kind == Kind.ERROR:
                    raise ProtocolError(f"controller error: {frame.header.get('detail')}")
        finally:
            for task in [*background, *commands]:
                task.cancel()
            await asyncio.gather(*background, *commands, return_exceptions=True)

    async def _send(self, kind: Kind, header: dict[str, Any], flush_first: bool = False) -> None:
        """Send one frame to the controller (after any queued reports, when asked); drop it when offline."""
        link = self._link
        if link is None:
            return
        async with link.lock:
            if flush_first:
                await self._flush_locked(link.writer)
            await write_frame(link.writer, kind, header)

    async def _resync(self) -> None:
        """Send every key we hold, so a restarted controller heals its index (LMCache issue 2167)."""
        self._pending.clear()
        entries = [[loc, *info.as_wire()] for loc, backend in self.backends.items() for info in backend.infos()]
        for start in range(0, max(len(entries), 1), RESYNC_BATCH):
            await self._send(Kind.REPORT, {"full": start == 0, "admitted": entries[start : start + RESYNC_BATCH], "evicted": []})

    async def _heartbeats(self) -> None:
        while True:
            await self._send(Kind.HEARTBEAT, {"locations": {n: b.stats() for n, b in self.backends.items()}})
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _reports(self) -> None:
        while True:
            await self._report_ready.wait()
            await asyncio.sleep(REPORT_INTERVAL_S)
            self._report_ready.clear()
            await self.flush_reports()

    async def flush_reports(self) -> None:
        """Send queued admits/evicts now (a store does, so the controller sees chunks right after they land)."""
        link = self._link
        if link is None or not self._pending:
            return
        async with link.lock:
            await self._flush_locked(link.writer)

    async def _flush_locked(self, writer: asyncio.StreamWriter) -> None:
        while self._pending:
            batch = dict(itertools.islice(self._pending.items(), REPORT_BATCH))
            for key in batch:
                del self._pending[key]
            admitted = [[loc, *info.as_wire()] for (loc, _), info in batch.items() if info is not None]
            evicted = [[loc, key] for (loc, key), info in batch.items() if info is None]
            await write_frame(writer, Kind.REPORT, {"full": False, "admitted": admitted, "evicted": evicted})

    async def _run_command(self, header: dict[str, Any]) -> None:
        req_id = header.get("req_id")
        try:
            result = await self.execute(str(header.get("op")), header.get("args") or {})
            reply: dict[str, Any] = {"req_id": req_id, "ok": True, "result": result}
        except LmcachedError as exc:
            reply = {"req_id": req_id, "ok": False, "error": str(exc), "status": exc.http_status}
        except Exception as exc:  # a command's bug must not take the link down; the controller sees a failure
            log.exception("command %s failed", header.get("op"))
            reply = {"req_id": req_id, "ok": False, "error": f"{type(exc).__name__}: {exc}", "status": 500}
        # Reports go first, so the controller's index reflects the command by the time it sees the reply.
        await self._send(Kind.REPLY, reply, flush_first=True)


class _Link:
    """The live connection to the controller; one lock keeps frames from interleaving."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.lock = asyncio.Lock()


async def _done(value: T) -> T:
    return value
