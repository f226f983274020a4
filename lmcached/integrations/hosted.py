"""An lmcached instance hosted inside another process (a serving engine): a Worker — storage, data plane and
controller link — on its own event loop in a background thread, so the host's threads are never blocked by it
and it never blocks them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from lmcached.config import Config
from lmcached.integrations.cpus import pin
from lmcached.wire.chunks import WHOLE, Shard
from lmcached.worker.instance import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 35.0  # the disk write-behind gets its own 30 s to drain


class HostedInstance:
    """Start with `start()` (returns the data-plane address once it accepts connections), stop with `stop()`."""

    def __init__(self, config: Config, shard: Shard = WHOLE, cpus: frozenset[int] | None = None) -> None:
        self.config = config
        #: The cores its thread (and the threads that thread starts) run on; None: the host's binding.
        self.cpus = cpus
        #: A tensor-parallel rank hosts its own part of the instance, on lmcache_worker_port + rank.
        self.shard = shard
        self.worker: Worker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="lmcached-instance", daemon=True)
        self._thread.start()
        return ready.result(START_TIMEOUT_S)

    def _run(self, ready: concurrent.futures.Future[str]) -> None:
        pin(self.cpus)
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def begin() -> str:
            port = self.config.lmcache_worker_port
            self.worker = Worker(self.config, shard=self.shard, data_port=port + self.shard.rank if port else port)
            await self.worker.start()
            return self.worker.data_plane.address

        try:
            ready.set_result(loop.run_until_complete(begin()))
        except BaseException as exc:  # the host sees why the instance could not start
            ready.set_exception(exc)
            loop.close()
            return
        try:
            loop.run_forever()
        finally:
            loop.close()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the instance's loop (from any other thread) and wait for its result."""
        if self._loop is None or self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("the lmcached instance is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        loop, worker = self._loop, self.worker
        if loop is None or worker is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(worker.stop(), loop).result(STOP_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("lmcached instance did not stop cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
