"""kvtc in the fleet: workers learn or are sent codebooks, keep them with their chunks, send them ahead of moved
blobs and keep them beside their chunks in Redis — so a kvtc blob is never stored where it cannot be decoded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from lmcached.codecs.kvtc import Codebook, codebook_of

from lmcached.client import AsyncKVClient
from lmcached.errors import LmcachedError
from lmcached.fleet.redis_servers import RedisServer, free_port
from lmcached.wire.chunk import CPU, DISK, REMOTE
from lmcached.worker.codebooks import LEARN_MIN_TOKENS, Codebooks
from lmcached.worker.instance import Worker

from .conftest import INSTANCE, Running, make_kv, test_config

#: One model's KV with correlated channels (what kvtc is for), 16-token chunks as in every test config.
LAYERS, CHANNELS = 4, 64


def model_kv(tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(LAYERS, CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(99)) / CHANNELS**0.5
    x = torch.randn(2, LAYERS, tokens, CHANNELS, generator=gen) * torch.linspace(0.2, 3.0, CHANNELS)
    return (x @ mix + torch.linspace(-1, 1, CHANNELS)).half()


async def worker(**config: object) -> Worker:
    w = Worker(test_config(enable_controller=False, **config))
    await w.start(connect=False)
    return w


async def store(w: Worker, tokens: list[int], kv: torch.Tensor) -> list[int]:
    async with AsyncKVClient(f"127.0.0.1:{w.data_port}") as client:
        assert await client.store(tokens, kv) == len(tokens)
        return [s.key for s in client.spans(tokens)]


async def retrieve(w: Worker, tokens: list[int]) -> torch.Tensor | None:
    async with AsyncKVClient(f"127.0.0.1:{w.data_port}") as client:
        return await client.retrieve(tokens)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    a, b = await worker(local_disk=str(tmp_path / "a")), await worker()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


# ---------------------------------------------------------------------------------------------- one worker
async def test_a_worker_learns_a_codebook_from_its_chunks_and_keeps_it_on_disk(pair: tuple[Worker, Worker], tmp_path: Path) -> None:
    a, _ = pair
    few = list(range(64))
    few_keys = await store(a, few, model_kv(len(few), seed=1))
    with pytest.raises(LmcachedError, match=f"too few to learn one from \\(at least {LEARN_MIN_TOKENS}\\).*calibrate"):
        await a.execute("compress", {"location": CPU, "keys": few_keys, "method": "kvtc"})
    tokens = list(range(1000, 1000 + LEARN_MIN_TOKENS))
    kv = model_kv(len(tokens), seed=2)
    keys = await store(a, tokens, kv)
    result = await a.execute("compress", {"location": CPU, "keys": keys, "method": "kvtc"})
    assert result["chunks"] == len(keys) and result["bytes_after"] * 1.5 < result["bytes_before"]  # (16-token chunks: headers weigh)
    got = await retrieve(a, tokens)
    assert got is not None and relative_error(got, kv) < 0.2
    book = a.storage.codebooks.current(LAYERS, CHANNELS)
    assert book is not None and (tmp_path / "a" / "codebooks" / f"{book.digest}.kvtcbook").is_file()
    # A later compress of the same shape uses the same codebook (even a prompt too short to learn from).
    result = await a.execute("compress", {"location": CPU, "keys": few_keys, "method": "kvtc"})
    assert result["chunks"] == len(few_keys)
    chunk = a.backends[CPU].get(few_keys[0])
    assert chunk is not None and codebook_of(chunk.data) == book.digest


async def test_kvtc_chunks_on_disk_decode_after_a_restart(tmp_path: Path) -> None:
    tokens = list(range(LEARN_MIN_TOKENS))
    a = await worker(local_disk=str(tmp_path / "disk"))
    try:
        keys = await store(a, tokens, model_kv(len(tokens), seed=3))
        await a.flush_disk()
        await a.execute("clear", {"location": CPU, "keys": None})
        result = await a.execute("compress", {"location": DISK, "keys": keys, "method": "kvtc"})
        assert result["chunks"] == len(keys)
        before = await retrieve(a, tokens)
    finally:
        await a.stop()
    again = await worker(local_disk=str(tmp_path / "disk"))
    try:
        assert again.backends[DISK].info(keys[0]).method == "kvtc"  # type: ignore[union-attr]
        after = await retrieve(again, tokens)
        assert before is not None and after is not None and torch.equal(after, before)
    finally:
        await again.stop()


# ---------------------------------------------------------------------------------------------- between workers
async def test_a_move_sends_the_codebook_ahead_of_the_blobs(pair: tuple[Worker, Worker], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    tokens = list(range(LEARN_MIN_TOKENS))
    keys = await store(a, tokens, model_kv(len(tokens), seed=4))
    await a.execute("compress", {"location": CPU, "keys": keys, "method": "kvtc"})
    decoded_at_a = await retrieve(a, tokens)
    target = {"target_address": f"127.0.0.1:{b.data_port}", "target_location": CPU}
    result = await a.execute("move", {"location": CPU, "keys": keys, "copy": True, **target})
    assert result["num_tokens"] == len(tokens)
    book = a.storage.codebooks.current(LAYERS, CHANNELS)
    assert book is not None and b.storage.codebooks.find(book.digest) is not None
    got = await retrieve(b, tokens)
    assert got is not None and decoded_at_a is not None and torch.equal(got, decoded_at_a)
    # Sent once: a second move finds the codebook there and sends only the blobs.
    sent: list[str] = []
    original = AsyncKVClient.put_codebook

    async def counting(self: AsyncKVClient, digest: str, data: bytes, current: bool = False) -> None:
        sent.append(digest)
        await original(self, digest, data, current)

    monkeypatch.setattr(AsyncKVClient, "put_codebook", counting)
    await a.execute("move", {"location": CPU, "keys": keys, "copy": True, **target})
    assert sent == []


async def test_a_kvtc_blob_whose_codebook_a_worker_lacks_is_refused(pair: tuple[Worker, Worker]) -> None:
    a, b = pair
    tokens = list(range(LEARN_MIN_TOKENS))
    keys = await store(a, tokens, model_kv(len(tokens), seed=5))
    await a.execute("compress", {"location": CPU, "keys": keys[:2], "method": "kvtc"})
    chunks = [a.backends[CPU].get(k) for k in keys[:2]]
    async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
        with pytest.raises(LmcachedError, match="kvtc chunks need codebook .* send it first"):
            await client.store_chunks(chunks)  # type: ignore[arg-type]
        # A codebook that is not what its sender calls it is refused too, and nothing is kept.
        book = a.storage.codebooks.current(LAYERS, CHANNELS)
        assert book is not None
        with pytest.raises(LmcachedError, match="is "):
            await client.put_codebook("0" * 32, book.to_bytes())
    assert len(b.backends[CPU]) == 0 and b.storage.codebooks.find(book.digest) is None


async def test_calibrated_codebooks_sent_as_current_are_used_at_once(pair: tuple[Worker, Worker]) -> None:
    """What `lmcached calibrate` does to a running worker: no learning needed, even for a short prompt."""
    _, b = pair
    book = Codebook.fit([model_kv(512, seed) for seed in (10, 11)])
    async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
        assert not await client.has_codebook(book.digest)
        await client.put_codebook(book.digest, book.to_bytes(), current=True)
        assert await client.has_codebook(book.digest)
    tokens = list(range(48))
    keys = await store(b, tokens, model_kv(len(tokens), seed=12))
    assert (await b.execute("compress", {"location": CPU, "keys": keys, "method": "kvtc"}))["chunks"] == 3
    assert codebook_of(b.backends[CPU].get(keys[0]).data) == book.digest  # type: ignore[union-attr]


def test_codebooks_keep_their_current_choice_across_instances(tmp_path: Path) -> None:
    first = Codebooks(tmp_path)
    old, new = (Codebook.fit([model_kv(256, seed)]) for seed in (20, 21))
    first.install(old)
    first.install(new)
    later = Codebooks(tmp_path)
    assert later.current(LAYERS, CHANNELS).digest == new.digest  # type: ignore[union-attr]
    assert later.get(old.digest).digest == old.digest  # older blobs still decode
    assert later.current(LAYERS, CHANNELS + 1) is None
    # A choice written by another process (lmcached calibrate --codebooks DIR) is seen without a restart.
    other = Codebooks(tmp_path)
    other.install(old)
    assert later.current(LAYERS, CHANNELS).digest == old.digest  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------- Redis
async def test_redis_keeps_the_codebook_beside_kvtc_chunks_for_other_workers() -> None:
    with RedisServer(free_port()) as redis:
        a = await worker(remote_url=redis.url, remote_scan_interval=0.2)
        b = await worker(remote_url=redis.url, remote_scan_interval=0.2)
        try:
            tokens = list(range(LEARN_MIN_TOKENS))
            kv = model_kv(len(tokens), seed=6)
            keys = await store(a, tokens, kv)
            await a.storage.flush_behind()
            result = await a.execute("compress", {"location": REMOTE, "keys": keys, "method": "kvtc"})
            assert result["chunks"] == len(keys)
            book = a.storage.codebooks.current(LAYERS, CHANNELS)
            assert book is not None
            assert redis.cli("EXISTS", f"lmcached:codebook:{book.digest}").strip() == "1"
            assert book.digest not in b.storage.codebooks.store._books  # b has never seen it
            await b.execute("clear", {"location": CPU, "keys": None})
            got = await retrieve(b, tokens)  # every chunk from Redis, kvtc-coded, its codebook fetched there
            assert got is not None and relative_error(got, kv) < 0.2
            assert book.digest in b.storage.codebooks.store._books
            # A third worker that finds the codebook evicted from Redis: a clean miss, not an error.
            redis.cli("DEL", f"lmcached:codebook:{book.digest}")
            c = await worker(remote_url=redis.url, remote_scan_interval=0.2)
            try:
                assert await retrieve(c, tokens) is None
                assert len(c.backends[CPU]) == 0  # and nothing undecodable was kept in its RAM
            finally:
                await c.stop()
        finally:
            await a.stop()
            await b.stop()


# ---------------------------------------------------------------------------------------------- the HTTP API
async def test_compress_kvtc_over_http(running: Running) -> None:
    tokens = list(range(LEARN_MIN_TOKENS))
    kv = make_kv(len(tokens), seed=7)
    await running.store(tokens, kv)
    base = {"instance_id": INSTANCE, "location": CPU, "tokens": tokens}
    status, body = await running.post("/compress", {**base, "method": "kvtc", "quality": 3})
    assert status == 400 and "cachegen" in body["detail"]
    status, body = await running.post("/compress", {**base, "method": "kvtc"})
    assert status == 200
    event = await running.wait_event(body["event_id"])
    assert event["status"] == "finished" and event["result"]["bytes_after"] < event["result"]["bytes_before"]
    _, instances = await running.get("/instances")
    assert instances[INSTANCE]["locations"][CPU]["compressed_chunks"] == len(tokens) // 16
    async with AsyncKVClient(running.data) as client:
        got = await client.retrieve(tokens)
    assert got is not None and got.shape == kv.shape and relative_error(got, kv) < 0.25
    status, body = await running.post("/decompress", {**base, "method": "kvtc"})
    assert (await running.wait_event(body["event_id"]))["status"] == "finished"


# ---------------------------------------------------------------------------------------------- lmcached calibrate
def calibrate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmcached", "calibrate", *args], capture_output=True, text=True, timeout=600)


async def test_calibrate_runs_text_through_the_model_and_hands_the_codebook_to_a_worker(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(topics[name] for name in ("execmodel", "import", "types")))
    w = await worker()
    try:
        loop = asyncio.get_running_loop()
        books = str(tmp_path / "books")
        args = (str(text), "--worker", f"127.0.0.1:{w.data_port}", "--codebooks", books, "--max-tokens", "1024", "--probes", "1")
        done = await loop.run_in_executor(None, lambda: calibrate_cli(*args))
        assert done.returncode == 0, done.stderr
        digest = done.stdout.split("kvtc codebook ")[1].split()[0]
        assert "for 30 layers × 192 channels, from 1024 tokens in 2 windows, layer steps" in done.stdout
        assert "for a KL budget of 0.006 from 1 probed windows" in done.stdout
        assert "layer costs measured on window 1 of 1" in done.stderr  # progress
        book = w.storage.codebooks.current(30, 192)  # SmolLM2's shape: the worker's kvtc uses it now
        assert book is not None and book.digest == digest
        assert book.step_scale is not None and book.step_scale.shape == (2, 30) and book.step_scale.max() > 3 * book.step_scale.min()
        assert Codebooks(tmp_path / "books").current(30, 192).digest == digest  # type: ignore[union-attr]
    finally:
        await w.stop()
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    done = calibrate_cli(str(short), "--worker", "")
    assert done.returncode == 2 and "--codebooks" in done.stderr
    done = calibrate_cli(str(short), "--codebooks", str(tmp_path / "books"))
    assert done.returncode == 1 and "too few to calibrate on" in done.stderr
    done = calibrate_cli(str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = calibrate_cli(str(text), "--worker", "", "--codebooks", str(tmp_path / "books"), "--kl-budget", "0")
    assert done.returncode == 2 and "--kl-budget above 0" in done.stderr
