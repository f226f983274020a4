from __future__ import annotations

import asyncio

import pytest
import torch

from lmcached.client import AsyncKVClient, KVClient
from lmcached.errors import LmcachedError

from .conftest import SEED_TOKENS, Running, make_kv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
async def test_store_lookup_retrieve_is_bit_exact(running: Running, dtype: torch.dtype) -> None:
    tokens = list(range(1000, 1050))  # chunk_size 16 in tests: 3 full chunks and a partial one
    kv = make_kv(len(tokens), dtype=dtype)

    def go() -> None:
        with KVClient(running.data) as client:
            assert client.store(tokens, kv) == 50
            assert client.lookup(tokens) == 50
            assert client.lookup(tokens[:40]) == 32  # prefix semantics: whole chunks only
            assert client.lookup([1, 2, 3]) == 0
            out = client.retrieve(tokens)
            assert out is not None and out.dtype == dtype
            assert torch.equal(out, kv)
            assert client.retrieve([9, 9, 9]) is None

    await asyncio.to_thread(go)


async def test_a_store_may_bring_only_the_kv_past_what_is_cached(running: Running) -> None:
    """kv_start: the caller copied out only the tokens from the first chunk it is storing (vLLM's connector on
    a chat's later round); what lands is the same as from the whole prompt's KV, and a bad start is refused."""
    tokens = list(range(7000, 7050))  # chunks of 16
    kv = make_kv(len(tokens))

    def go() -> None:
        with KVClient(running.data) as client:
            assert client.store(tokens[:32], kv[:, :, :32]) == 32
            assert client.store(tokens, kv[:, :, 32:], skip_tokens=32, kv_start=32) == 50
            assert torch.equal(client.retrieve(tokens), kv)
            for start, skip in ((8, 32), (48, 32), (-16, 0)):
                with pytest.raises(LmcachedError, match="kv_start"):
                    client.store(tokens, kv[:, :, max(start, 0) :], skip_tokens=skip, kv_start=start)
            with pytest.raises(LmcachedError, match="covers 50 tokens but 18"):  # the whole KV, said to start late
                client.store(tokens, kv, skip_tokens=32, kv_start=32)

    await asyncio.to_thread(go)


@pytest.mark.parametrize("rank", [None, 1])
async def test_a_longer_prompt_continues_a_stored_prompts_partial_last_chunk(running: Running, rank: int | None) -> None:
    """A chat's next round is its previous prompt plus more: with `continued`, a lookup matches the previous
    prompt's partial last chunk too (only its exact tokens after the same prefix), and retrieving the prompt
    cut there returns that KV. Also for a tensor-parallel rank's own keys."""
    from lmcached.wire.chunks import Shard

    shard = Shard() if rank is None else Shard(rank, 2)
    previous = list(range(3000, 3050))  # chunks of 16: three whole ones and a partial one of 2 tokens
    kv = make_kv(len(previous))

    def go() -> None:
        with KVClient(running.data, shard=shard) as client:
            assert client.store(previous, kv) == 50
            for more in (7, 20, 40):  # the next prompt ends in the same chunk, the next one, two further on
                prompt = previous + list(range(5000, 5000 + more))
                assert client.lookup(prompt) == 48  # whole chunks only
                assert client.lookup(prompt, continued=True) == 50
                out = client.retrieve(prompt[:50])
                assert out is not None and torch.equal(out, kv)
            changed = previous[:49] + [1] + list(range(5000, 5010))  # differs inside the partial chunk
            assert client.lookup(changed, continued=True) == 48
            assert client.lookup(previous, continued=True) == 50  # the stored prompt itself, as before
            assert client.lookup(previous[:40] + [7] * 30, continued=True) == 32  # nothing continued past chunk 2
            assert client.lookup(previous + [1, 2], salt="another tenant", continued=True) == 0
            short = list(range(8000, 8005))
            assert client.store(short, make_kv(5)) == 5
            assert client.lookup(short + [9, 9], continued=True) == 5  # a partial chunk right at the start

    await asyncio.to_thread(go)


async def test_async_client_matches_blocking_client(running: Running) -> None:
    kv = make_kv(len(SEED_TOKENS))
    async with AsyncKVClient(running.data) as client:
        assert await client.store(SEED_TOKENS, kv) == 12
        assert await client.lookup(SEED_TOKENS) == 12
        out = await client.retrieve(SEED_TOKENS)
    assert out is not None and torch.equal(out, kv)


async def test_store_refuses_kv_of_the_wrong_length(running: Running) -> None:
    async with AsyncKVClient(running.data) as client:
        with pytest.raises(LmcachedError, match="covers 5 tokens"):
            await client.store(SEED_TOKENS, make_kv(5))


async def test_retrieve_decodes_compressed_chunks(running: Running) -> None:
    tokens = list(range(64))
    kv = make_kv(64, dtype=torch.float32)
    async with AsyncKVClient(running.data) as client:
        await client.store(tokens, kv)
    status, body = await running.post(
        "/compress", {"instance_id": "lmcache_default_instance", "method": "lossless", "location": "LocalCPUBackend", "tokens": tokens}
    )
    assert status == 200 and body["num_tokens"] == 64
    assert (await running.wait_event(body["event_id"]))["status"] == "finished"
    # Raw in RAM is now compressed; the disk copy is still raw: clear it to force decoding.
    status, body = await running.post("/clear", {"instance_id": "lmcache_default_instance", "location": "LocalDiskBackend"})
    await running.wait_event(body["event_id"])
    async with AsyncKVClient(running.data) as client:
        out = await client.retrieve(tokens)
    assert out is not None and torch.equal(out, kv)


async def test_storing_what_the_worker_holds_moves_no_kv(running: Running) -> None:
    """The client asks first: chunks the worker holds are not sent again — so a compressed chunk is not
    replaced by its raw bytes, and only the new tail of a longer prompt travels."""
    tokens = list(range(5000, 5040))  # chunks of 16: two whole ones and a partial one
    await running.store(tokens[:32], make_kv(32))
    await running.post(
        "/compress", {"instance_id": "lmcache_default_instance", "method": "cachegen", "location": "LocalCPUBackend", "tokens": tokens[:32]}
    )
    await asyncio.sleep(0.2)
    cpu = running.daemon.worker.backends["LocalCPUBackend"]  # type: ignore[union-attr]
    compressed = {k for k in cpu.keys() if cpu.info(k).method == "cachegen"}  # type: ignore[union-attr]
    assert len(compressed) == 2

    def go() -> tuple[int, int]:
        with KVClient(running.data) as client:
            longer = client.store(tokens, make_kv(40))  # 32 tokens held, 8 new
            again = client.store(tokens, make_kv(40))
            return longer, again

    longer, again = await asyncio.to_thread(go)
    assert (longer, again) == (40, 40)
    assert all(cpu.info(k).method == "cachegen" for k in compressed)  # type: ignore[union-attr]  # still compressed
    async with AsyncKVClient(running.data) as client:
        assert await client.store(tokens, make_kv(40)) == 40
        assert await client.store(tokens, make_kv(40), dedupe=False) == 40  # sent in full when asked
    assert not any(cpu.info(k).method for k in compressed)  # type: ignore[union-attr]
