"""`lmcached serve`: the controller (HTTP 9000), the control port (9001) and the embedded default instance
(data plane 8001) in one asyncio process, started and stopped in a fixed order (signals: `cli.run_daemon`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lmcached.config import Config
from lmcached.control.controller import Controller
from lmcached.service import notify
from lmcached.wire.handshake import address_list, dialable_host
from lmcached.wire.tls import server_context
from lmcached.worker.instance import Worker

log = logging.getLogger(__name__)

#: How long running operations get to finish on shutdown before they are cancelled.
DRAIN_TIMEOUT_S = 5.0


@dataclass
class Ports:
    http: int
    monitor: int
    data: int


class Daemon:
    """The parts of `lmcached serve`, so tests can start and stop them in-process on port 0."""

    def __init__(self, config: Config, embedded: bool = True) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="lmcached")
        self.controller = Controller(config)
        self.worker: Worker | None = None
        self.embedded = embedded
        self._runner: web.AppRunner | None = None
        self.ports: Ports | None = None

    async def start(self) -> Ports:
        """Open every port and start the embedded instance; on a failure, what was opened is closed again."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Ports:
        config = self.config
        self._runner = web.AppRunner(self.controller.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        tls = server_context(config)
        site = web.TCPSite(self._runner, config.host, config.port, ssl_context=tls)
        await site.start()
        http_port = self._runner.addresses[0][1]
        await self.controller.hub.start(config.host, config.monitor_port, tls)
        assert self.controller.hub.port is not None
        await self.controller.role.start()
        lmcache = self.controller.lmcache_port
        if lmcache is not None and config.lmcache_pull_port is not None and config.lmcache_reply_port is not None:
            await lmcache.start(config.host, config.lmcache_pull_port, config.lmcache_reply_port)
        data_port = 0
        if self.embedded:
            own = f"{dialable_host(config.host)}:{self.controller.hub.port}"
            # In a failover group the embedded instance follows the active controller too: its own first, then
            # the group's worker ports as controller_url lists them.
            others = [a for a in address_list(config.controller_url) if a != own] if config.controller_peers else []
            worker_config = config.replace(controller_url=",".join([own, *others]), enable_controller=True)
            self.worker = Worker(worker_config, executor=self.executor)
            await self.worker.start()
            data_port = self.worker.data_port
            if self.controller.role.active:  # a standby's instance registers wherever the active one is
                await asyncio.wait_for(self.worker.connected.wait(), 10)
        self.ports = Ports(http_port, self.controller.hub.port, data_port)
        return self.ports

    async def stop(self) -> None:
        """Stop accepting, let operations finish (bounded), then close workers, the control port and HTTP."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        await self.controller.drain(DRAIN_TIMEOUT_S)
        if self.worker is not None:
            await self.worker.stop()
        await self.controller.role.stop()
        if self.controller.lmcache_port is not None:
            await self.controller.lmcache_port.stop()
        await self.controller.hub.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self.executor.shutdown(wait=False, cancel_futures=True)


def warn_if_open(config: Config) -> None:
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.auth_token:
        print(
            f"warning: listening on {config.host} without --auth-token: anyone who can reach these ports can "
            "read, move and clear the cache",
            file=sys.stderr,
        )


async def run(config: Config, stop: asyncio.Event, engine: dict[str, Any] | None = None, embedded: bool = True) -> None:
    """Run until `stop` is set. With `engine` ({"port", "model"}), the engine is served from this process
    too, on the embedded instance; without `embedded`, only the controller runs (data port 0 in the ready line)."""
    warn_if_open(config)
    daemon = Daemon(config, embedded)
    ports = await daemon.start()
    engine_task = None
    if engine is not None:
        from lmcached.engine.model import load_model
        from lmcached.engine.server import run_engine

        loaded = await asyncio.get_running_loop().run_in_executor(daemon.executor, load_model, engine.get("model"))
        worker = f"{dialable_host(config.host)}:{ports.data}"  # where the embedded instance listens
        engine_task = asyncio.create_task(run_engine(loaded, config.host, int(engine["port"]), worker, config.auth_token, stop))
    # One machine-readable line, so scripts and tests started with port 0 learn the real ports.
    ready = {
        "http": ports.http,
        "monitor": ports.monitor,
        "data": ports.data,
        "host": config.host,
        "instance_id": config.lmcache_instance_id if embedded else None,
    }
    print("lmcached ready " + json.dumps(ready), flush=True)
    notify("READY=1", f"STATUS=controller on {config.host}:{ports.http}" + (f", worker data plane on {ports.data}" if embedded else ""))
    try:
        await stop.wait()
    finally:
        if engine_task is not None:
            await engine_task
        await daemon.stop()
