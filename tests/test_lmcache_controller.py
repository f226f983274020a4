"""lmcached workers in an LMCache-protocol fleet: LMCache 0.5.6's own controller (tests/peers/lmcache_controller.py,
run from its side venv, scripts/lmcache_venv.sh) registers an lmcached worker, and its lookup — the one vLLM
production-stack's kvaware router makes — names the lmcached instance for a prompt the worker holds, and stops
naming it once the chunks are cleared; the worker deregisters when it stops."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcached.client import AsyncKVClient
from lmcached.fleet.redis_servers import free_port

from .conftest import CPU, INSTANCE, make_kv, serving, test_config

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

ROOT = Path(__file__).parent.parent
LMCACHE_PYTHON = Path(os.environ.get("LMCACHE_VENV", ROOT / ".lmcache-venv")) / "bin" / "python"
PROMPT = list(range(1000, 1600))  # LMCache's 256-token chunks: two whole ones and a partial one of 88


class Peer:
    """A script of tests/peers/ run by LMCache's venv: one JSON request per line in, one line out."""

    def __init__(self, script: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(LMCACHE_PYTHON), str(ROOT / "tests" / "peers" / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self._line()
        assert line == "ready", f"{script} did not start: {line!r}"

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def ask(self, request: dict[str, Any]) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


class LMCacheController(Peer):
    """LMCache's controller: `ask` gets its lookups and registrations."""

    def __init__(self) -> None:
        self.pull, self.reply = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        super().__init__("lmcache_controller.py", self.pull, self.reply)

    def until(self, request: dict[str, Any], expected: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (answer := self.ask(request)) != expected:
            assert time.monotonic() < deadline, f"{request}: LMCache's controller says {answer}, expected {expected}"
            time.sleep(0.1)


@pytest.fixture
def lmcache_controller() -> Iterator[LMCacheController]:
    if not LMCACHE_PYTHON.exists():
        pytest.skip(f"LMCache's side venv is missing ({LMCACHE_PYTHON}): run scripts/lmcache_venv.sh")
    controller = LMCacheController()
    yield controller
    controller.stop()


async def test_lmcaches_own_controller_routes_to_an_lmcached_instance(lmcache_controller: LMCacheController, tmp_path: Path) -> None:
    config = test_config(chunk_size=256, controller_pull_url=lmcache_controller.pull, controller_reply_url=lmcache_controller.reply)
    async with serving(config) as run:
        await asyncio.to_thread(lmcache_controller.until, {"workers": INSTANCE}, [0])  # registered, as TP rank 0
        assert await asyncio.to_thread(lmcache_controller.ask, {"query_inst": "127.0.0.1"}) == INSTANCE  # by its IP
        assert await asyncio.to_thread(lmcache_controller.ask, {"lookup": PROMPT}) == {}

        async with AsyncKVClient(run.data) as client:
            assert await client.store(PROMPT, make_kv(len(PROMPT))) == len(PROMPT)
        # LMCache hashes the tokens its own way and finds lmcached's chunks: the whole prompt, partial chunk included.
        await asyncio.to_thread(lmcache_controller.until, {"lookup": PROMPT}, {INSTANCE: [CPU, 600]})
        assert await asyncio.to_thread(lmcache_controller.ask, {"lookup": PROMPT[:300]}) == {INSTANCE: [CPU, 256]}
        assert await asyncio.to_thread(lmcache_controller.ask, {"lookup": [7, *PROMPT]}) == {}

        _, answer = await run.post("/clear", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})
        assert (await run.wait_event(answer["event_id"]))["status"] == "finished"
        await asyncio.to_thread(lmcache_controller.until, {"lookup": PROMPT}, {})  # the evictions reached it
        link = run.daemon.worker.lmcache_link  # type: ignore[union-attr]
        assert link is not None and link.reported == 6 and link.skipped == 0
    await asyncio.to_thread(lmcache_controller.until, {"workers": INSTANCE}, [])  # deregistered on the way out


async def test_salted_chunks_are_not_reported_under_unsalted_hashes(lmcache_controller: LMCacheController) -> None:
    config = test_config(chunk_size=256, controller_pull_url=lmcache_controller.pull, controller_reply_url=lmcache_controller.reply)
    async with serving(config) as run:
        await asyncio.to_thread(lmcache_controller.until, {"workers": INSTANCE}, [0])
        async with AsyncKVClient(run.data) as client:
            await client.store(PROMPT, make_kv(len(PROMPT)), salt="tenant")
        link = run.daemon.worker.lmcache_link  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while link.skipped < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(lmcache_controller.ask, {"lookup": PROMPT}) == {}  # LMCache's lookup has no salt


def test_the_chunk_hash_is_lmcaches(tmp_path: Path) -> None:
    """lmcache_chunk_hash against LMCache's own ChunkedTokenDatabase, run in its venv."""
    if not LMCACHE_PYTHON.exists():
        pytest.skip(f"LMCache's side venv is missing ({LMCACHE_PYTHON}): run scripts/lmcache_venv.sh")
    from lmcached.wire.lmcache_protocol import lmcache_chunk_hash

    script = (
        "import json,sys; from lmcache.v1.token_database import ChunkedTokenDatabase as D; "
        "print(json.dumps([h for _, _, h in D().process_tokens(json.loads(sys.argv[1]), make_key=False)]))"
    )
    done = subprocess.run([str(LMCACHE_PYTHON), "-c", script, json.dumps(PROMPT)], capture_output=True, text=True, timeout=120)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours, parent = [], None
    for start in range(0, len(PROMPT), 256):
        parent = lmcache_chunk_hash(parent, PROMPT[start : start + 256])
        ours.append(parent)
    assert ours == theirs and len(ours) == 3


class LMCacheWorkerPeer(Peer):
    """LMCache's own worker link, reporting to `pull`/`reply`: `send` has it admit or evict a prompt's chunks."""

    def __init__(self, pull: str, reply: str, instance_id: str) -> None:
        super().__init__("lmcache_worker.py", pull, reply, instance_id, str(free_port()))

    def send(self, request: dict[str, Any]) -> None:
        assert self.ask(request) == "ok"


async def test_an_lmcache_workers_chunks_join_lmcacheds_index(tmp_path: Path) -> None:
    """A mixed fleet in one index: LMCache's own worker registers with lmcached's controller on LMCache's ports and
    reports a prompt under LMCache's hashes; /lookup (and the routers' binary lookup) names it beside the lmcached
    instance that holds the same prompt; operations on it are refused with a reason; it leaves on deregistering."""
    if not LMCACHE_PYTHON.exists():
        pytest.skip(f"LMCache's side venv is missing ({LMCACHE_PYTHON}): run scripts/lmcache_venv.sh")
    from lmcached.client import IndexClient

    async with serving(test_config(chunk_size=256, lmcache_pull_port=0, lmcache_reply_port=0)) as run:
        port = run.daemon.controller.lmcache_port
        assert port is not None
        peer = await asyncio.to_thread(LMCacheWorkerPeer, f"127.0.0.1:{port.pull_port}", f"127.0.0.1:{port.reply_port}", "lmcache-engine")
        try:
            status, infos = await run.post("/query_worker_info", {"instance_id": "lmcache-engine"})
            registered = [(i["worker_id"], i["protocol"]) for i in infos["worker_infos"]]
            assert status == 200 and registered == [(0, "lmcache")]  # as LMCache numbers its workers

            await asyncio.to_thread(peer.send, {"admit": PROMPT})
            await run.store(PROMPT, make_kv(len(PROMPT)))  # the same prompt in lmcached's own instance
            deadline = time.monotonic() + 10
            while (await run.post("/lookup", {"tokens": PROMPT}))[1]["layout_info"] != {INSTANCE: [CPU, 600], "lmcache-engine": [CPU, 600]}:
                assert time.monotonic() < deadline, (await run.post("/lookup", {"tokens": PROMPT}))[1]
                await asyncio.sleep(0.05)
            assert (await run.post("/lookup", {"tokens": PROMPT[:300]}))[1]["layout_info"]["lmcache-engine"] == [CPU, 256]

            def binary() -> dict[str, tuple[str, int, int]]:
                with IndexClient(f"127.0.0.1:{run.daemon.controller.hub.port}") as index:
                    return index.lookup(PROMPT)

            assert (await asyncio.to_thread(binary))["lmcache-engine"] == (CPU, 600, 3)

            status, answer = await run.post(
                "/compress", {"instance_id": "lmcache-engine", "location": CPU, "method": "lossless", "tokens": PROMPT}
            )
            assert status == 409 and "operates only on lmcached workers" in answer["detail"]

            await asyncio.to_thread(peer.send, {"evict": PROMPT[:256]})  # its first chunk: nothing of the prefix is left
            deadline = time.monotonic() + 10
            while "lmcache-engine" in (await run.post("/lookup", {"tokens": PROMPT}))[1]["layout_info"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

            await asyncio.to_thread(peer.send, {"close": True})
            deadline = time.monotonic() + 10
            while "lmcache-engine" in (await run.get("/instances"))[1]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            peer.stop()
