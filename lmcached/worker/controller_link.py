"""A worker's link to the controller (port 9001): register, report every change to its Storage, heartbeat,
and run the controller's commands; reconnect with capped backoff and resync after every reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from lmcached import __version__
from lmcached.config import Config
from lmcached.errors import LmcachedError, ProtocolError, Standby, Unauthorized
from lmcached.wire.chunks import WHOLE, Shard
from lmcached.wire.frames import Kind, read_frame, write_frame
from lmcached.wire.handshake import WORKER_ROLE, address_list, parse_address
from lmcached.wire.tls import dial_context, plain_server, plain_to_tls, speaks_tls_async, tls_to_plain
from lmcached.worker.commands import Progress
from lmcached.worker.storage import Storage

log = logging.getLogger(__name__)

#: Reports of admitted/evicted chunks are batched for this long (or this many) before they are sent.
REPORT_INTERVAL_S = 0.05
REPORT_BATCH = 4096
#: A full resync is sent in frames of this many chunks.
RESYNC_BATCH = 20000
#: How long a leaving worker waits to say goodbye.
GOODBYE_TIMEOUT_S = 1.0
#: How soon a worker asks again after only standbys answered: a takeover is under way.
STANDBY_RETRY_S = 0.25

Execute = Callable[[str, dict[str, Any], Progress], Awaitable[dict[str, Any]]]


class ControllerLink:
    """Keeps one Storage registered with the controller at `config.controller_url`, as worker `worker_id`
    of `instance_id` serving its data plane at `data_address`."""

    def __init__(self, storage: Storage, config: Config, instance_id: str, worker_id: str, data_address: str, shard: Shard = WHOLE) -> None:
        self.storage = storage
        storage.report_changes = True  # (each connection resyncs everything held, so nothing before this is missed)
        self.shard = shard
        self.config = config
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.data_address = data_address
        #: Runs a controller command (the storage's commands unless the host adds its own).
        self.execute: Execute = storage.execute
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()  # one frame at a time on the link
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._problem: str | None = None  # the link's trouble last logged: logged again only when it changes
        storage.after_store = self.flush_reports

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="controller-link")

    async def stop(self) -> None:
        """Say goodbye (so the controller logs a shutdown, not a loss), then close the link."""
        self._stopping = True
        with contextlib.suppress(OSError, LmcachedError, asyncio.TimeoutError):
            await asyncio.wait_for(self._send(Kind.GOODBYE, {}, flush_first=True), GOODBYE_TIMEOUT_S)
        if self._task is not None:
            # Cancelled until it ends: a cancellation swallowed on its way (asyncio.wait_for before Python 3.12
            # can) must not leave the link reading, and the worker's stop waiting, forever.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        """Dial the controllers of `controller_url` in order until one takes the worker (a failover group's
        standbys turn it away); after a lost link, start again from the first."""
        addresses = [parse_address(a, 9001) for a in address_list(self.config.controller_url)]
        tls = dial_context(self.config)
        delay = 0.1
        while not self._stopping:
            problems: list[str] = []
            standby = False
            for host, port in addresses:
                if self._stopping:
                    return
                try:
                    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
                except ssl.SSLError as exc:
                    problems.append(tls_to_plain(f"controller {host}:{port}") if plain_server(exc) else f"controller {host}:{port}: {exc}")
                    continue
                except OSError as exc:
                    problems.append(f"controller {host}:{port} unreachable ({exc.strerror})")
                    continue
                try:
                    await self._session(reader, writer)
                    delay = 0.1
                    problems = [f"controller link to {host}:{port} lost"]
                except Standby as exc:
                    standby = True
                    problems.append(f"controller {host}:{port}: {exc}")
                except (ProtocolError, Unauthorized, ConnectionError) as exc:
                    if tls is None and not self.connected.is_set() and await speaks_tls_async(host, port):
                        problems.append(plain_to_tls(f"controller {host}:{port}"))
                    else:
                        problems.append(f"controller link to {host}:{port} lost: {exc}")
                finally:
                    self.connected.clear()
                    writer.close()
                    with contextlib.suppress(ConnectionError, ssl.SSLError):
                        await writer.wait_closed()
            if problems:
                self._trouble("; ".join(problems))
            await asyncio.sleep(STANDBY_RETRY_S if standby else delay)
            delay = min(delay * 2, 5.0)

    def _trouble(self, problem: str) -> None:
        """One WARNING per new problem, not one line per retry (it retries with backoff, up to every 5 s)."""
        if problem != self._problem:
            log.warning("%s; retrying until it answers", problem)
            self._problem = problem
        else:
            log.debug("%s; retrying", problem)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = {
            "role": WORKER_ROLE,
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "data_address": self.data_address,
            "token": self.config.auth_token,
            "chunk_size": self.config.chunk_size,
            "locations": list(self.storage.backends),
            # The shared tier's identity: every worker reaching the same Redis names the same one.
            "remote_tier": self.storage.remote_tier,
            "version": __version__,  # so a mixed-version fleet is visible on the controller
        }
        if self.shard.world > 1:  # one rank of a tensor-parallel engine: it holds that rank's part of each chunk
            hello |= {"rank": self.shard.rank, "world_size": self.shard.world}
        await write_frame(writer, Kind.HELLO, hello)
        welcome = await read_frame(reader)
        if welcome is None:
            raise ConnectionError("controller closed the connection during the hello")
        if welcome.kind == Kind.ERROR:
            detail = str(welcome.header.get("detail", "controller refused the hello"))
            raise Standby(detail) if welcome.header.get("standby") else Unauthorized(detail)
        if welcome.kind != Kind.WELCOME:
            raise ProtocolError(f"expected a welcome, got {welcome.kind.name}")
        self._writer = writer
        try:
            await self._resync()
            self.connected.set()
            log.info("worker %s registered with the controller%s", self.worker_id, " again" if self._problem else "")
            self._problem = None
            await self._serve(reader)
        finally:
            self._writer = None

    async def _serve(self, reader: asyncio.StreamReader) -> None:
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
        writer = self._writer
        if writer is None:
            return
        async with self._lock:
            if flush_first:
                await self._flush_locked(writer)
            await write_frame(writer, kind, header)

    async def _resync(self) -> None:
        """Send every key we hold, so a restarted controller heals its index (LMCache issue 2167)."""
        self.storage.changes.clear()
        entries = [[loc, *info.as_wire()] for loc, backend in self.storage.backends.items() for info in backend.infos()]
        for start in range(0, max(len(entries), 1), RESYNC_BATCH):
            await self._send(Kind.REPORT, {"full": start == 0, "admitted": entries[start : start + RESYNC_BATCH], "evicted": []})

    async def _heartbeats(self) -> None:
        while True:
            await self._send(Kind.HEARTBEAT, {"locations": self.storage.stats(), "usage": self.storage.usage.snapshot()})
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _reports(self) -> None:
        while True:
            await self.storage.changed.wait()
            await asyncio.sleep(REPORT_INTERVAL_S)
            self.storage.changed.clear()
            await self.flush_reports()

    async def flush_reports(self) -> None:
        """Send queued admits/evicts now (a store does, so the controller sees chunks right after they land)."""
        writer = self._writer
        if writer is None or not self.storage.changes:
            return
        async with self._lock:
            await self._flush_locked(writer)

    async def _flush_locked(self, writer: asyncio.StreamWriter) -> None:
        changes = self.storage.changes
        while changes:
            batch = dict(itertools.islice(changes.items(), REPORT_BATCH))
            for key in batch:
                del changes[key]
            admitted = [[loc, *info.as_wire()] for (loc, _), info in batch.items() if info is not None]
            evicted = [[loc, key] for (loc, key), info in batch.items() if info is None]
            await write_frame(writer, Kind.REPORT, {"full": False, "admitted": admitted, "evicted": evicted})

    async def _run_command(self, header: dict[str, Any]) -> None:
        req_id = header.get("req_id")
        try:
            result = await self._execute_reporting(header)
            reply: dict[str, Any] = {"req_id": req_id, "ok": True, "result": result}
        except LmcachedError as exc:
            reply = {"req_id": req_id, "ok": False, "error": str(exc), "status": exc.http_status}
        except Exception as exc:  # a command's bug must not take the link down; the controller sees a failure
            log.exception("command %s failed", header.get("op"))
            reply = {"req_id": req_id, "ok": False, "error": f"{type(exc).__name__}: {exc}", "status": 500}
        # Reports go first, so the controller's index reflects the command by the time it sees the reply.
        await self._send(Kind.REPLY, reply, flush_first=True)

    async def _execute_reporting(self, header: dict[str, Any]) -> dict[str, Any]:
        """Run a command; while it runs, send a PROGRESS frame every `progress_every` seconds when the
        controller asked for them (an older controller does not, and would not know the frame)."""
        progress = Progress()
        work = asyncio.ensure_future(self.execute(str(header.get("op")), header.get("args") or {}, progress))
        every = header.get("progress_every")
        try:
            if isinstance(every, (int, float)) and every > 0:
                while not (await asyncio.wait({work}, timeout=float(every)))[0]:
                    await self._send(Kind.PROGRESS, {"req_id": header.get("req_id"), "done": progress.done, "total": progress.total})
            return await work
        finally:
            work.cancel()  # only when the link itself is going away mid-command
