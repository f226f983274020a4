"""Tensor parallelism at the controller: one instance, one worker per rank, each holding its rank's part of
every chunk under keys of its own (chunks.Shard). Real workers and a real controller, in this process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmcached.client import AsyncKVClient
from lmcached.errors import CodecError, InvalidRequest
from lmcached.wire.chunks import Shard, chunk_spans, shards
from lmcached.wire.frames import Kind, read_frame, write_frame
from lmcached.worker.instance import Worker

from .conftest import CPU, Running, serving, test_config

DISK = "LocalDiskBackend"
WORLD = 3
TOKENS = list(range(100, 148))  # three chunks of 16
HEADS_PER_RANK = 32  # channels of one rank's part


def part_kv(rank: int, num_tokens: int) -> torch.Tensor:
    """One rank's part of the prompt's KV: its own values, so parts mixed up between ranks would show."""
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(2, 2, num_tokens, HEADS_PER_RANK, generator=generator).to(torch.float16)


@dataclass
class TpInstance:
    workers: list[Worker]

    @property
    def instance_id(self) -> str:
        return self.workers[0].instance_id

    async def store(self, tokens: list[int], ranks: range | list[int] | None = None) -> None:
        for rank in ranks if ranks is not None else range(WORLD):
            worker = self.workers[rank]
            async with AsyncKVClient(worker.data_plane.address, shard=worker.shard) as client:
                await client.store(tokens, part_kv(rank, len(tokens)))
            await worker.flush_disk()
            await worker.flush_reports()

    def parts(self, rank: int, location: str = CPU) -> dict[int, tuple[str | None, int]]:
        """rank's chunks at `location`: key -> (method, bytes)."""
        backend = self.workers[rank].storage.backends[location]
        return {info.key: (info.method, info.nbytes) for info in backend.infos()}


@asynccontextmanager
async def tp_instance(run: Running, instance_id: str, tmp_path: Path | None = None) -> AsyncIterator[TpInstance]:
    hub = f"127.0.0.1:{run.daemon.controller.hub.port}"
    workers = []
    for shard in shards(WORLD):
        disk = {"local_disk": str(tmp_path / f"{instance_id}-{shard.rank}")} if tmp_path is not None else {}
        config = test_config(controller_url=hub, lmcache_instance_id=instance_id, **disk)
        worker = Worker(config, shard=shard)
        await worker.start()
        workers.append(worker)
    try:
        for worker in workers:
            await asyncio.wait_for(worker.connected.wait(), 10)
        yield TpInstance(workers)
    finally:
        for worker in workers:
            await worker.stop()


async def lookup(run: Running, tokens: list[int]) -> dict[str, list[object]]:
    _, body = await run.post("/lookup", {"tokens": tokens})
    return body["layout_info"]


def test_each_rank_has_keys_of_its_own_and_a_world_of_one_keeps_the_chunks_keys() -> None:
    spans = chunk_spans(TOKENS, 16)
    assert Shard().spans(spans) == spans
    keys = [[s.key for s in shard.spans(spans)] for shard in shards(WORLD)]
    assert len({k for rank in keys for k in rank} | {s.key for s in spans}) == 4 * len(spans)  # all distinct
    assert [s.key for s in Shard(1, WORLD).spans(spans)] == keys[1]  # the same tokens: the same keys, anywhere
    with pytest.raises(InvalidRequest, match="rank 3 of 3"):
        Shard(3, WORLD)


async def test_a_prefix_is_cached_only_as_far_as_every_rank_holds_its_part(tmp_path: Path) -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        _, workers = await run.post("/query_worker_info", {"instance_id": "tp"})
        assert sorted(w["worker_id"] for w in workers["worker_infos"]) == [0, 1, 2]
        await tp.store(TOKENS, ranks=[0, 1])
        assert "tp" not in await lookup(run, TOKENS)  # rank 2 holds nothing yet
        await tp.store(TOKENS[:32], ranks=[2])
        assert (await lookup(run, TOKENS))["tp"] == [CPU, 32]  # every rank holds the first two chunks
        await tp.store(TOKENS, ranks=[2])
        assert (await lookup(run, TOKENS))["tp"] == [CPU, 48]
        async with run.http.get(run.base + "/instances") as response:
            described = (await response.json())["tp"]["workers"]
        assert sorted(w["tensor_parallel"]["rank"] for w in described) == [0, 1, 2]


async def test_compress_acts_on_every_ranks_part_and_counts_chunks_once() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        _, answer = await run.post("/compress", {"instance_id": "tp", "location": CPU, "method": "cachegen", "tokens": TOKENS})
        assert answer["num_tokens"] == 48
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished", event
        assert event["result"]["chunks"] == 3 and event["result"]["num_tokens"] == 48
        for rank in range(WORLD):
            assert {method for method, _ in tp.parts(rank).values()} == {"cachegen"}
        # Each rank still loads its own part (lossy, so close, not equal), and only its own.
        for rank, worker in enumerate(tp.workers):
            async with AsyncKVClient(worker.data_plane.address, shard=worker.shard) as client:
                kv = await client.retrieve(TOKENS)
            assert kv is not None and kv.shape == (2, 2, 48, HEADS_PER_RANK)
            own = (kv.float() - part_kv(rank, 48).float()).abs().mean()
            other = (kv.float() - part_kv((rank + 1) % WORLD, 48).float()).abs().mean()
            assert own < 0.2 < 0.8 < other, (own, other)


async def test_a_compress_that_fails_on_one_rank_changes_no_rank() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        before = [tp.parts(rank) for rank in range(WORLD)]

        def broken(*args: object, **kwargs: object) -> None:
            raise CodecError("rank 2's codec broke")

        tp.workers[2].storage.encode = broken  # type: ignore[method-assign]
        _, answer = await run.post("/compress", {"instance_id": "tp", "location": CPU, "method": "cachegen", "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "failed"
        assert "rank 2" in event["error"] and "no rank's chunks were changed" in event["error"], event["error"]
        assert [tp.parts(rank) for rank in range(WORLD)] == before  # ranks 0 and 1 dropped what they had staged
        assert all(not w.storage._staged for w in tp.workers)


async def test_move_takes_every_ranks_part_to_the_same_rank_or_none() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp, tp_instance(run, "tp2") as tp2:
        await tp.store(TOKENS)
        _, answer = await run.post(
            "/move", {"old_position": ["tp", CPU], "new_position": ["tp2", CPU], "tokens": TOKENS[:32], "copy": True}
        )
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished" and event["result"]["num_tokens"] == 32, event
        for rank in range(WORLD):
            assert len(tp2.parts(rank)) == 2 and len(tp.parts(rank)) == 3
            assert set(tp2.parts(rank)) <= {s.key for s in Shard(rank, WORLD).spans(chunk_spans(TOKENS, 16))}
        assert (await lookup(run, TOKENS))["tp2"] == [CPU, 32]

        # Rank 1 of the target refuses: the copies ranks 0 and 2 made are taken back (not the chunks they held
        # before), and every source stays.
        async def refuse(*args: object, **kwargs: object) -> int:
            raise InvalidRequest("rank 1's store refused")

        tp2.workers[1].storage.store = refuse  # type: ignore[method-assign]
        before = [(tp.parts(rank), tp2.parts(rank)) for rank in range(WORLD)]
        _, answer = await run.post("/move", {"old_position": ["tp", CPU], "new_position": ["tp2", CPU], "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "failed" and "rank 1" in event["error"] and "nothing was moved" in event["error"], event
        assert [(tp.parts(rank), tp2.parts(rank)) for rank in range(WORLD)] == before

        del tp2.workers[1].storage.store  # the instance's own method again: now the move goes through, whole
        _, answer = await run.post("/move", {"old_position": ["tp", CPU], "new_position": ["tp2", CPU], "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished" and event["result"]["num_tokens"] == 48, event
        assert all(len(tp.parts(rank)) == 0 and len(tp2.parts(rank)) == 3 for rank in range(WORLD))


async def test_moving_between_instances_needs_the_same_tensor_parallel_size() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        status, body = await run.post(
            "/move", {"old_position": ["tp", CPU], "new_position": ["lmcache_default_instance", CPU], "tokens": TOKENS}
        )  # fmt: skip
        assert status == 400 and "tensor-parallel size 3" in body["detail"], body
        assert len(tp.parts(0)) == 3


async def test_a_rank_taken_or_a_different_world_size_is_refused() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp"):
        port = run.daemon.controller.hub.port
        for extra, why in (
            ({"rank": 1, "world_size": 3}, "rank 1 of instance 'tp' is held"),
            ({"rank": 0, "world_size": 2}, "tensor-parallel size 3"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            hello = {"role": "worker", "instance_id": "tp", "worker_id": "intruder", "data_address": "127.0.0.1:1", "chunk_size": 16}
            await write_frame(writer, Kind.HELLO, hello | extra)
            answer = await read_frame(reader)
            assert answer is not None and answer.kind == Kind.ERROR and why in answer.header["detail"], answer
            writer.close()
        _, workers = await run.post("/query_worker_info", {"instance_id": "tp"})
        assert len(workers["worker_infos"]) == 3


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--tp-rank", "1"], "give both --tp-rank and --tp-size, or neither"),
        (["--tp-rank", "3", "--tp-size", "3"], "tensor-parallel rank 3 of 3 is not a rank of that world"),
    ],
)
def test_the_worker_command_refuses_a_rank_outside_its_world(flags: list[str], error: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lmcached", "worker", "--port", "0", *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and error in done.stderr, done.stderr


async def test_the_tui_cannot_act_on_one_ranks_part_alone() -> None:
    """A monitor selects chunks by key, and on a tensor-parallel instance a key is one rank's part: refused,
    with the way that works (by tokens), and nothing changes."""
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        before = tp.parts(0)
        with pytest.raises(InvalidRequest, match="by tokens"):
            await run.daemon.controller.monitor_command(
                {"op": "compress", "method": "cachegen", "instance_id": "tp", "location": CPU, "keys": list(before)}
            )
        assert tp.parts(0) == before


async def test_pin_and_clear_act_on_every_ranks_part() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        _, answer = await run.post("/pin", {"instance_id": "tp", "location": CPU, "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished" and event["result"]["num_tokens"] == 48
        assert all(info.pinned for w in tp.workers for info in w.storage.backends[CPU].infos())
        _, answer = await run.post("/clear", {"instance_id": "tp", "location": CPU, "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished" and event["result"]["num_tokens"] == 48
        assert all(not tp.parts(rank) for rank in range(WORLD))


async def test_a_pin_that_fails_on_one_rank_leaves_every_ranks_pins_as_they_were() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        first = {s.key for s in Shard(0, WORLD).spans(chunk_spans(TOKENS[:16], 16))}
        _, answer = await run.post("/pin", {"instance_id": "tp", "location": CPU, "tokens": TOKENS[:16]})
        assert (await run.wait_event(answer["event_id"]))["status"] == "finished"

        async def broken(args: object, progress: object) -> dict[str, object]:
            raise InvalidRequest("rank 2 cannot pin")

        tp.workers[2].storage._op_pin = broken  # type: ignore[method-assign]
        _, answer = await run.post("/pin", {"instance_id": "tp", "location": CPU, "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "failed" and "no rank's pins were changed" in event["error"], event
        pinned = {info.key for info in tp.workers[0].storage.backends[CPU].infos() if info.pinned}
        assert pinned == first  # rank 0 unpinned the two it had pinned, and kept the one pinned before


async def test_a_clear_that_fails_on_one_rank_says_what_is_left_and_clearing_again_finishes_it() -> None:
    async with serving(test_config()) as run, tp_instance(run, "tp") as tp:
        await tp.store(TOKENS)
        clear = tp.workers[1].storage._op_clear

        async def broken(args: object, progress: object) -> dict[str, object]:
            raise InvalidRequest("rank 1 cannot clear")

        tp.workers[1].storage._op_clear = broken  # type: ignore[method-assign]
        _, answer = await run.post("/clear", {"instance_id": "tp", "location": CPU, "tokens": TOKENS})
        event = await run.wait_event(answer["event_id"])
        assert (
            event["status"] == "failed" and "rank 1" in event["error"] and "2 of 3 ranks removed their parts: clear again" in event["error"]
        )
        assert "tp" not in await lookup(run, TOKENS)  # no longer cached: rank 1's parts alone are not a chunk
        tp.workers[1].storage._op_clear = clear  # type: ignore[method-assign]
        _, answer = await run.post("/clear", {"instance_id": "tp", "location": CPU})
        assert (await run.wait_event(answer["event_id"]))["status"] == "finished"
        assert all(not tp.parts(rank) for rank in range(WORLD))
