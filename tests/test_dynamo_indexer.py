"""NVIDIA Dynamo's standalone KV indexer (`python -m dynamo.indexer`, its Rust radix tree, in its own venv:
scripts/dynamo_venv.sh) consumes lmcached's KV events and answers `/query` per tier: what RAM holds as `cpu`,
what the disk tier holds as `disk` (Dynamo counts a tier's prefix together with the faster tiers' blocks), through
store, clear from RAM, a move back to RAM and a clear of everything."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcached.fleet.redis_servers import free_port

from .conftest import CPU, DISK, INSTANCE, Running, make_kv, serving, test_config

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

ROOT = Path(__file__).parent.parent
DYNAMO_PYTHON = Path(os.environ.get("DYNAMO_VENV", ROOT / ".dynamo-venv")) / "bin" / "python"
TOKENS = list(range(500, 564))  # four chunks of 16


class DynamoIndexer:
    def __init__(self, events_endpoint: str, block_size: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(DYNAMO_PYTHON), "-m", "dynamo.indexer", "--block-size", str(block_size), "--port", str(self.port), "--threads", "1"]
            + ["--workers", f"1={events_endpoint}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/workers", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and self.process.poll() is None, "Dynamo's indexer did not start"
                time.sleep(0.2)

    def query(self, tokens: list[int]) -> dict[str, Any]:
        """Instance 1's matches per tier (tokens), or {} when it holds nothing of them."""
        body = json.dumps({"token_ids": tokens, "model_name": "default"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/query", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=5).read())
        found = answer.get("instances", {}).get("1", {})
        return {tier: found[tier] for tier in ("cpu", "disk") if tier in found}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def events_port() -> int:
    return free_port()


@pytest.fixture
def indexer(events_port: int) -> Iterator[DynamoIndexer]:
    if not DYNAMO_PYTHON.exists():
        pytest.skip(f"Dynamo's side venv is missing ({DYNAMO_PYTHON}): run scripts/dynamo_venv.sh")
    dynamo = DynamoIndexer(f"tcp://127.0.0.1:{events_port}", 16)
    yield dynamo
    dynamo.stop()


async def until(indexer: DynamoIndexer, expected: dict[str, int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (found := await asyncio.to_thread(indexer.query, TOKENS)) != expected:
        assert time.monotonic() < deadline, f"Dynamo's indexer says {found}, expected {expected}"
        await asyncio.sleep(0.1)


async def operate(run: Running, path: str, body: dict[str, Any]) -> None:
    status, answer = await run.post(path, body)
    assert status == 200 and (await run.wait_event(answer["event_id"]))["status"] == "finished", answer


async def test_dynamos_indexer_follows_lmcacheds_tiers(indexer: DynamoIndexer, events_port: int, tmp_path: Path) -> None:
    config = test_config(local_disk=str(tmp_path / "disk"), kv_events={"endpoint": f"tcp://*:{events_port}"})
    async with serving(config) as run:
        await asyncio.sleep(1.0)  # Dynamo's subscription joins (ZMQ's slow joiner)
        await run.store(TOKENS, make_kv(len(TOKENS)))
        await until(indexer, {"cpu": 64, "disk": 64})
        await operate(run, "/clear", {"instance_id": INSTANCE, "location": CPU, "tokens": TOKENS})
        await until(indexer, {"cpu": 0, "disk": 64})
        move = {"old_position": [INSTANCE, DISK], "new_position": [INSTANCE, CPU], "tokens": TOKENS[:32]}
        await operate(run, "/move", move)
        await until(indexer, {"cpu": 32, "disk": 64})  # two chunks in RAM, then two on disk: all of it within disk's reach
        await operate(run, "/clear", {"instance_id": INSTANCE, "location": CPU})
        await operate(run, "/clear", {"instance_id": INSTANCE, "location": DISK})
        await until(indexer, {})
