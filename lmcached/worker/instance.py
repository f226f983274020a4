"""A worker (storage instance): a Storage, served on a data plane (port 8001) and linked to the controller.

Each role lives in its own module and works alone: `storage.Storage` (backends and commands),
`dataplane_server.DataPlaneServer` (engines' stores and retrieves) and `controller_link.ControllerLink`
(registration, reports, heartbeats, commands). This class only puts them together and starts and stops
them in order; a host that runs an instance inside another process (an engine's connector) can take just
the roles it needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from concurrent.futures import Executor
from typing import Any

from lmcached.config import Config
from lmcached.wire.chunk import Chunk
from lmcached.wire.chunks import WHOLE, Shard
from lmcached.worker.backends import Backend
from lmcached.worker.commands import Progress
from lmcached.worker.controller_link import ControllerLink
from lmcached.worker.dataplane_server import DataPlaneServer
from lmcached.worker.lmcache_link import LMCacheLink, node_ip
from lmcached.worker.storage import Storage

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


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
        shard: Shard = WHOLE,
    ) -> None:
        self.config = config
        #: Which tensor-parallel rank's parts of chunks this worker holds (the controller learns it from the hello).
        self.shard = shard
        self.instance_id = instance_id or config.lmcache_instance_id
        self.worker_id = worker_id or new_worker_id()
        self.storage = Storage(config, self.instance_id, executor)
        if self.storage.kv_events_settings is not None:  # each tensor-parallel rank publishes on endpoints of its own
            self.storage.kv_events_settings = self.storage.kv_events_settings.for_rank(shard.rank)
        identity = {"instance_id": self.instance_id, "worker_id": self.worker_id}
        port = config.lmcache_worker_port if data_port is None else data_port
        self.data_plane = DataPlaneServer(self.storage, config, data_host or config.host, port, identity)
        self.link: ControllerLink | None = None
        #: The registration with an LMCache-protocol controller (controller_pull_url), when configured.
        self.lmcache_link: LMCacheLink | None = None
        self.connected = asyncio.Event()  # set by the link while it is registered

    # The roles' state, as callers of the combined worker know it.
    @property
    def backends(self) -> dict[str, Backend]:
        return self.storage.backends

    @property
    def data_host(self) -> str:
        return self.data_plane.host

    @property
    def data_port(self) -> int:
        return self.data_plane.port

    async def start(self, connect: bool = True) -> None:
        """Open the storage, start the data plane and (if a controller is configured) dial it."""
        await self.storage.open()
        lmcache = self._lmcache_link()
        await self.data_plane.start()
        if lmcache is not None:
            lmcache.start()
        log.info("worker %s/%s data plane on %s", self.instance_id, self.worker_id, self.data_plane.address)
        if connect and self.config.enable_controller:
            self.link = ControllerLink(self.storage, self.config, self.instance_id, self.worker_id, self.data_plane.address, self.shard)
            self.link.connected = self.connected
            self.link.start()

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        await self.data_plane.stop()
        if self.lmcache_link is not None:
            await self.storage.run(self.lmcache_link.close)
        await self.storage.close()

    def _lmcache_link(self) -> LMCacheLink | None:
        """The link to an LMCache-protocol controller, told of chunks from the start; None when none is configured."""
        config = self.config
        if config.controller_pull_url is None or config.controller_reply_url is None:
            return None
        ip = node_ip(config.host)
        self.lmcache_link = LMCacheLink(config.controller_pull_url, config.controller_reply_url, self.instance_id, self.shard.rank, ip)
        self.storage.add_sink(self.lmcache_link)
        return self.lmcache_link

    async def store(self, chunks: list[Chunk], location: str | None = None) -> int:
        return await self.storage.store(chunks, location)

    async def execute(self, op: str, args: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        return await self.storage.execute(op, args, progress)

    async def flush_disk(self) -> None:
        await self.storage.flush_disk()

    async def flush_reports(self) -> None:
        if self.link is not None:
            await self.link.flush_reports()
