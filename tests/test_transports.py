"""The data plane's two transports, socket and same-host shared memory: the same results bit for bit, the
arena (the RAM tier's preallocated memory) reused, and nothing lost or torn when a client or the worker dies
in the middle of a transfer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcached.client import KVClient
from lmcached.errors import InvalidRequest, LmcachedError
from lmcached.wire.chunk import CPU

from .conftest import Running, make_kv, serving, start_process, stop_serve, test_config

TRANSPORTS = pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])


def client(running: Running, shared_memory: bool) -> KVClient:
    c = KVClient(running.data, shared_memory=shared_memory)
    c.connect()
    assert c.transport == ("shared memory" if shared_memory else "socket")
    return c


@TRANSPORTS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
async def test_both_transports_are_bit_exact(running: Running, shared_memory: bool, dtype: torch.dtype) -> None:
    tokens = list(range(16 * 5 + 7))  # a partial last chunk too
    kv = make_kv(len(tokens), dtype=dtype)

    def run() -> None:
        c = client(running, shared_memory)
        try:
            assert c.store(tokens, kv) == len(tokens)
            assert c.lookup(tokens) == len(tokens)
            out = c.retrieve(tokens)
            assert out is not None and out.dtype == dtype and torch.equal(out, kv)
            buffer = torch.zeros(2, kv.shape[1], 200, kv.shape[3], dtype=dtype)
            into = c.retrieve(tokens, out=buffer)  # into the caller's buffer
            assert into is not None and into.data_ptr() == buffer.data_ptr() and torch.equal(into, kv)
            with pytest.raises(InvalidRequest, match="out must"):
                c.retrieve(tokens, out=torch.zeros(2, 1, 200, 3, dtype=dtype))
        finally:
            c.close()

    await asyncio.to_thread(run)


@TRANSPORTS
async def test_compressed_and_disk_chunks_come_back_over_either_transport(running: Running, shared_memory: bool) -> None:
    tokens = list(range(1000, 1000 + 16 * 4))
    kv = make_kv(len(tokens), seed=3)
    await running.store(tokens, kv)
    instance = "lmcache_default_instance"
    status, body = await running.post("/compress", {"instance_id": instance, "location": CPU, "tokens": tokens[:32], "method": "cachegen"})
    assert status == 200 and (await running.wait_event(body["event_id"]))["status"] == "finished"
    worker = running.daemon.worker
    assert worker is not None
    last = KVClient(running.data).spans(tokens)[-1].key
    worker.backends[CPU].remove(last)  # the last chunk now comes from the disk tier

    def run() -> torch.Tensor | None:
        c = client(running, shared_memory)
        try:
            return c.retrieve(tokens)
        finally:
            c.close()

    out = await asyncio.to_thread(run)
    assert out is not None and out.shape == kv.shape
    assert torch.equal(out[:, :, 32:], kv[:, :, 32:])  # raw chunks exact (one from disk); the first two went through cachegen
    assert (out[:, :, :32].float() - kv[:, :, :32].float()).norm() < 0.3 * kv[:, :, :32].float().norm()


@TRANSPORTS
async def test_a_hit_is_lent_in_place_over_shared_memory_and_kept_until_the_reader_is_done(running: Running, shared_memory: bool) -> None:
    """retrieve_in_place: over shared memory, the chunks as tensors over the worker's arena (no copy), held
    under a lease — a clear and new stores meanwhile write elsewhere — and given back when the block ends; over
    the socket, None (the caller retrieves)."""
    worker = running.daemon.worker
    assert worker is not None
    tokens = list(range(16 * 3 + 5))
    kv = make_kv(len(tokens), seed=11)
    await running.store(tokens, kv)

    def run() -> None:
        c = client(running, shared_memory)
        try:
            with c.retrieve_in_place(tokens) as pieces:
                if not shared_memory:
                    assert pieces is None
                    return
                assert pieces is not None and [first for first, _ in pieces] == [0, 16, 32, 48]
                arena = c._arena
                assert arena is not None
                low, high = arena.array.ctypes.data, arena.array.ctypes.data + arena.array.size
                assert all(low <= piece.data_ptr() < high for _, piece in pieces)  # the worker's memory, not a copy
                asyncio.run_coroutine_threadsafe(worker.execute("clear", {"location": CPU, "keys": None}), loop).result(30)
                for i in range(6):  # fill the arena with other chunks
                    other = list(range(100_000 * (i + 1), 100_000 * (i + 1) + 16 * 3))
                    asyncio.run_coroutine_threadsafe(worker.store(chunks_of(other, make_kv(len(other), seed=50 + i))), loop).result(30)
                assert torch.equal(torch.cat([piece for _, piece in pieces], dim=2), kv)  # untouched while lent
            again = c.retrieve(tokens)  # the lease given back, the connection answers (from the disk tier now)
            assert again is not None and torch.equal(again, kv)
        finally:
            c.close()

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(run)


async def test_a_worker_can_refuse_shared_memory(tmp_path: Path) -> None:
    async with serving(test_config(shared_memory=False)) as run:
        c = KVClient(run.data)
        await asyncio.to_thread(c.connect)
        try:
            assert c.transport == "socket"
        finally:
            c.close()


async def test_a_leased_block_is_not_reused_until_the_reader_lets_go(running: Running) -> None:
    """A shared-memory reader holds its blocks: a clear and new stores meanwhile write elsewhere."""
    from lmcached.worker.dataplane_shm import ShmSession

    worker = running.daemon.worker
    assert worker is not None
    tokens = list(range(16 * 3))
    kv = make_kv(len(tokens), seed=7)
    await running.store(tokens, kv)
    session = ShmSession(worker.storage)
    keys = [s.key for s in KVClient(running.data).spans(tokens)]
    lease = await session.lease({"keys": keys})
    arena = worker.storage.arena
    assert arena is not None
    before = [bytes(arena.array[o : o + 64]) for o in lease["offsets"]]
    await worker.execute("clear", {"location": CPU, "keys": None})
    for i in range(6):  # fill the arena with other chunks
        other = list(range(100_000 * (i + 1), 100_000 * (i + 1) + 16 * 3))
        await worker.store(chunks_of(other, make_kv(len(other), seed=50 + i)))
    assert [bytes(arena.array[o : o + 64]) for o in lease["offsets"]] == before  # untouched while leased
    session.release({"lease": lease["lease"]})
    session.close()


def chunks_of(tokens: list[int], kv: torch.Tensor) -> list:  # type: ignore[type-arg]
    from lmcached.wire.chunk import Chunk
    from lmcached.wire.chunks import chunk_spans
    from lmcached.wire.tensors import byte_view

    out = []
    for span in chunk_spans(tokens, 16):
        part = kv[:, :, span.start : span.end].contiguous()
        out.append(Chunk(span.key, span.num_tokens, tuple(part.shape), "float16", bytes(byte_view(part))))
    return out


# ---------------------------------------------------------------------------------------------- faults
DIE_MID_WRITE = textwrap.dedent(
    """
    import os, sys, torch
    from lmcached.client import KVClient, _Store, _rows
    from lmcached.wire.frames import Kind, frame_parts, encode_head
    address, transport = sys.argv[1], sys.argv[2]
    tokens = list(range(16 * 8))
    kv = torch.randn(2, 4, len(tokens), 64).half()
    c = KVClient(address, shared_memory=(transport == "shm"))
    c.connect()
    spans = c.spans(tokens)
    store = _Store(spans, kv, 1)
    if transport == "shm":
        c._send(frame_parts(Kind.SHM_STORE, {"req_id": 1, "chunks": store.metas}, []))
        reply = c._reply()
        rows = _rows(kv)
        span, meta = spans[0], store.metas[0]
        block = c._arena.view(reply["offsets"][0], meta["nbytes"])
        block[: meta["nbytes"] // 2] = 7  # half of the first chunk written, then gone: no commit
    else:
        sock = c._conn().sock
        sock.sendall(store.head)
        sock.sendall(bytes(sum(m["nbytes"] for m in store.metas) // 2))  # half the payload, then gone
    print("written", flush=True)
    os._exit(0)
    """
)


@TRANSPORTS
async def test_a_client_that_dies_mid_write_leaves_nothing_visible(running: Running, shared_memory: bool) -> None:
    worker = running.daemon.worker
    assert worker is not None and worker.storage.arena is not None
    arena = worker.storage.arena
    used_before = arena.used
    transport = "shm" if shared_memory else "socket"
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", DIE_MID_WRITE, running.data, transport], capture_output=True, text=True, timeout=60
    )
    assert "written" in done.stdout, done.stderr
    tokens = list(range(16 * 8))

    def check() -> None:
        c = KVClient(running.data, shared_memory=shared_memory)
        c.connect()
        try:
            assert c.lookup(tokens) == 0  # nothing of the half-written prompt is visible
            assert c.retrieve(tokens) is None
            kv = make_kv(len(tokens), layers=4, channels=64, seed=9)
            assert c.store(tokens, kv) == len(tokens)  # and the same prompt stores fine afterwards
            assert torch.equal(c.retrieve(tokens), kv)
        finally:
            c.close()

    deadline = time.monotonic() + 10
    while arena.used > used_before and time.monotonic() < deadline:  # the dead client's blocks come back
        arena.reclaim()
        await asyncio.sleep(0.05)
    assert arena.used <= used_before
    await asyncio.to_thread(check)


@TRANSPORTS
def test_a_worker_killed_mid_transfer_is_an_error_never_torn_kv(tmp_path: Path, shared_memory: bool) -> None:
    env = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "2"}
    worker = start_process(
        [sys.executable, "-m", "lmcached", "worker", "--port", "0", "--controller", "127.0.0.1:1"], "lmcached worker ready ", env
    )
    address = f"127.0.0.1:{worker.ports['data']}"
    tokens = list(range(256 * 24))
    kv = make_kv(len(tokens), layers=30, channels=192)  # ~140 MB: long enough to be cut in the middle
    outcome: dict[str, object] = {}

    def run() -> None:
        c = KVClient(address, shared_memory=shared_memory, timeout=20)
        try:
            c.connect()
            for _ in range(50):
                c.store(tokens, kv, dedupe=False)
                out = c.retrieve(tokens)
                assert out is None or torch.equal(out, kv[:, :, : out.shape[2]])  # whole chunks, right bytes
            outcome["result"] = "finished"
        except (LmcachedError, OSError) as exc:
            outcome["result"] = f"error: {exc}"
        except AssertionError as exc:
            outcome["result"] = f"torn: {exc}"
        finally:
            c.close()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    os.kill(worker.proc.pid, signal.SIGKILL)
    thread.join(60)
    stop_serve(worker)
    assert not thread.is_alive(), "the client hung on a dead worker"
    assert str(outcome.get("result", "")).startswith("error"), outcome


def test_a_client_maps_each_stretch_of_the_arena_in_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """ArenaView populates a block's pages before a write, but never the same stretch twice (asking the kernel
    again walks the page tables, a cost on every store); a block across stretches maps all of them."""
    import lmcached.wire.shm as shm_module
    import lmcached.worker.arena as arena_module

    arena = arena_module.Arena(8 * shm_module.REGION)
    try:
        view = shm_module.ArenaView(arena.shm)  # type: ignore[arg-type]
        calls: list[tuple[int, int]] = []
        real = shm_module.populate
        monkeypatch.setattr(shm_module, "populate", lambda mm, start, length: calls.append((start, length)) or real(mm, start, length))
        block = arena.alloc(3 * shm_module.REGION)  # from the header page on: spans four stretches
        assert block is not None
        offset = arena.offset_of(block)
        assert offset is not None
        view.populate(offset, block.nbytes)
        assert calls == [(0, 4 * shm_module.REGION)]
        view.populate(offset, block.nbytes)
        view.populate(offset + 100, 1000)
        assert len(calls) == 1  # already mapped: no call
        view.view(offset, block.nbytes)[:] = 7  # the client's writes are the worker's bytes
        assert int(block[0]) == 7 and int(block[-1]) == 7
        later = arena.alloc(shm_module.REGION)
        assert later is not None
        view.populate(arena.offset_of(later), later.nbytes)  # type: ignore[arg-type]
        assert calls[1] == (4 * shm_module.REGION, shm_module.REGION)  # only the stretch not mapped yet
    finally:
        arena.close()


def test_background_prefault_waits_while_a_store_writes() -> None:
    """The arena faults fresh pages in ahead of the stores in the background, but not while a store is
    writing into its blocks (it would take the cores and memory bandwidth from that copy); it catches up after."""
    from lmcached.worker.arena import Arena

    mb = 1024 * 1024
    arena = Arena(256 * mb)
    try:
        arena.prefault(32 * mb)
        start = arena.prefaulted
        with arena.writing():
            block = arena.alloc(30 * mb)  # past half the lead: the background thread is asked for more pages
            assert block is not None
            time.sleep(0.3)
            assert arena.prefaulted == start  # held back while the store writes
        deadline = time.monotonic() + 10
        while arena.prefaulted <= start and time.monotonic() < deadline:
            time.sleep(0.01)
        assert arena.prefaulted > start  # and done once it has finished
    finally:
        arena.close()


@pytest.mark.parametrize("kernel_populates", [True, False])
def test_prefaulting_never_touches_a_byte_of_a_stored_block(monkeypatch: pytest.MonkeyPatch, kernel_populates: bool) -> None:
    """Stores can run past the prefault frontier (the background thread runs only when the CPUs idle): faulting
    those pages in later must leave the chunks in them as they are — at a frontier that is not page-aligned
    (a proportional prefault of 2,000 bytes) and with or without the kernel's MADV_POPULATE_WRITE."""
    import lmcached.worker.arena as arena_module

    if not kernel_populates:
        monkeypatch.setattr(arena_module, "populate", lambda mm, start, length: False)
    arena = arena_module.Arena(64 * arena_module.PAGE)
    try:
        arena._extend(arena_module.HEADER + 2000)  # what prefault(2000) does first, without the thread
        blocks = [arena.alloc(2048) for _ in range(20)]  # one page each, past the frontier
        for i, block in enumerate(blocks):
            assert block is not None
            block[:] = i + 1
        arena._extend(arena.high_water + 2000, background=True)  # the background thread catching up
        assert arena.prefaulted > arena.high_water and arena.prefaulted % arena_module.PAGE == 0
        for i, block in enumerate(blocks):
            assert block is not None and bool((block == i + 1).all()), f"block {i} changed"
    finally:
        arena.close()
