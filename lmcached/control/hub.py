"""The control port (9001): workers register, heartbeat and report; monitors subscribe to snapshots and events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lmcached import __version__
from lmcached.config import Config
from lmcached.control.index import ChunkIndex, WorkerKey, WorkerRecord
from lmcached.control.router_port import RouterProtocol
from lmcached.errors import LmcachedError, ProtocolError, Unauthorized, WorkerUnavailable
from lmcached.wire.frames import HELLO_TIMEOUT_S, Kind, read_frame, write_frame
from lmcached.wire.handshake import ROUTER_ROLE, WORKER_ROLE, receive_hello

log = logging.getLogger(__name__)

MONITOR_ROLE = "monitor"
#: Why a worker left when it said goodbye (or this daemon stopped): logged as news, not as a fault.
SHUT_DOWN = "shut down"
#: Events a monitor may fall behind by before its queue is dropped and it gets a fresh snapshot instead.
MONITOR_QUEUE = 1000


#: A command asks its worker for a PROGRESS frame this often (or thrice per timeout, when that is shorter).
PROGRESS_EVERY_S = 1.0
#: Told how a command is going: (chunks done, chunks in all) on its worker.
OnProgress = Callable[[int, int], None]


class WorkerSession:
    """A connected worker: its record, its connection and its commands in flight."""

    def __init__(self, record: WorkerRecord, writer: asyncio.StreamWriter) -> None:
        self.record = record
        self.writer = writer
        self.send_lock = asyncio.Lock()
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: For each command in flight: when its worker last said anything about it, and who wants its progress.
        self._heard: dict[int, float] = {}
        self._on_progress: dict[int, OnProgress] = {}
        self._req_ids = itertools.count(1)
        self.closed = False

    async def command(self, op: str, args: dict[str, Any], timeout: float, on_progress: OnProgress | None = None) -> dict[str, Any]:
        """Send a command and wait for its reply; fails fast when the worker is gone (LMCache issue 1702),
        and when it has said nothing about the command for `timeout` seconds: a worker that reports progress
        may work for longer (a big compress; a codec's first call, compiling)."""
        if self.closed:
            raise WorkerUnavailable(f"worker {self.record.worker_id} is disconnected")
        req_id = next(self._req_ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pending[req_id] = future
        self._heard[req_id] = loop.time()
        if on_progress is not None:
            self._on_progress[req_id] = on_progress
        try:
            header = {"req_id": req_id, "op": op, "args": args, "timeout": timeout, "progress_every": min(PROGRESS_EVERY_S, timeout / 3)}
            async with self.send_lock:
                await write_frame(self.writer, Kind.COMMAND, header)
            while not future.done():
                silent_for = loop.time() - self._heard[req_id]
                if silent_for >= timeout:
                    raise WorkerUnavailable(f"worker {self.record.worker_id} did not answer {op!r} within {timeout:.0f}s")
                await asyncio.wait({future}, timeout=timeout - silent_for)
            reply = future.result()
        except ConnectionError as exc:
            raise WorkerUnavailable(f"worker {self.record.worker_id} connection failed: {exc}") from None
        finally:
            self.pending.pop(req_id, None)
            self._heard.pop(req_id, None)
            self._on_progress.pop(req_id, None)
        if not reply.get("ok"):
            error = LmcachedError(str(reply.get("error", "worker error")))
            error.http_status = int(reply.get("status") or 500)
            raise error
        return dict(reply.get("result") or {})

    def resolve(self, header: dict[str, Any]) -> None:
        future = self.pending.get(header.get("req_id"))  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(header)

    def progressed(self, header: dict[str, Any]) -> None:
        """A PROGRESS frame: the command's deadline starts again, and whoever follows it hears how far it got."""
        req_id = header.get("req_id")
        if req_id not in self._heard:
            return  # finished or given up meanwhile
        self._heard[req_id] = asyncio.get_running_loop().time()  # type: ignore[index]
        on_progress = self._on_progress.get(req_id)  # type: ignore[arg-type]
        done, total = header.get("done"), header.get("total")
        if on_progress is not None and isinstance(done, int) and isinstance(total, int):
            on_progress(done, total)

    def fail_all(self, reason: str) -> None:
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(WorkerUnavailable(reason))


class MonitorSession:
    """A subscribed monitor: a bounded queue of events; when it overflows, the newest snapshot wins."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.send_lock = asyncio.Lock()
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MONITOR_QUEUE)
        self.needs_snapshot = asyncio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.needs_snapshot.set()

    async def send(self, kind: Kind, header: dict[str, Any]) -> None:
        async with self.send_lock:
            await write_frame(self.writer, kind, header)


MonitorCommand = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Hub:
    """Serves the control port and owns the live worker sessions."""

    def __init__(self, config: Config, index: ChunkIndex, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.index = index
        self.sessions: dict[WorkerKey, WorkerSession] = {}
        self.monitors: set[MonitorSession] = set()
        self._snapshot = snapshot
        #: Runs an operation a monitor asked for (the controller sets it); answers {"event_id", "num_tokens"}.
        self.monitor_command: MonitorCommand | None = None
        #: Why this controller turns workers and monitors away now (a standby of its group), or None.
        self.refusal: Callable[[], str | None] = lambda: None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self.port: int | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        self._watchdog = asyncio.create_task(self._heartbeat_watchdog(), name="heartbeat-watchdog")

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def session(self, key: WorkerKey) -> WorkerSession:
        try:
            return self.sessions[key]
        except KeyError:
            raise WorkerUnavailable(f"worker {key[1]} of {key[0]} is not connected") from None

    # -- events to monitors
    def publish(self, kind: str, **fields: Any) -> None:
        event = {"type": kind, "time": time.time(), **fields}
        for monitor in self.monitors:
            monitor.offer(event)

    # -- connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            hello = await receive_hello(reader, self.config.auth_token)
            if hello is None:
                return
            if (refusal := self.refusal()) is not None:
                # Not an error of the peer's: it dials the next controller it knows (the active one).
                await write_frame(writer, Kind.ERROR, {"detail": refusal, "status": 503, "standby": True})
                return
            role = hello.get("role")
            if role == WORKER_ROLE:
                await self._serve_worker(hello, reader, writer)
            elif role == MONITOR_ROLE:
                await self._serve_monitor(reader, writer)
            elif role == ROUTER_ROLE:
                await self._serve_router(reader, writer)
            else:
                raise ProtocolError(f"unknown role {role!r} (expected 'worker', 'monitor' or 'router')")
        except (ProtocolError, Unauthorized) as exc:
            log.warning("control peer %s: %s; closing", peer, exc)
            with contextlib.suppress(ConnectionError):
                await write_frame(writer, Kind.ERROR, {"detail": str(exc), "status": exc.http_status})
        except asyncio.TimeoutError:
            log.warning("control peer %s sent no hello in %.0fs; closing", peer, HELLO_TIMEOUT_S)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            # ssl.SSLError too: a TLS peer still sending when we close (a dropped worker's heartbeat) is no fault.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_worker(self, hello: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        instance_id, worker_id, address = hello.get("instance_id"), hello.get("worker_id"), hello.get("data_address")
        if not all(isinstance(v, str) and v for v in (instance_id, worker_id, address)):
            raise ProtocolError("a worker hello needs instance_id, worker_id and data_address strings")
        if hello.get("chunk_size") != self.config.chunk_size:
            raise ProtocolError(f"worker chunk_size {hello.get('chunk_size')} differs from the controller's {self.config.chunk_size}")
        backends = hello.get("locations")
        if backends is not None and not (isinstance(backends, list) and all(isinstance(b, str) for b in backends)):
            raise ProtocolError("a worker hello's locations must be a list of strings")
        rank = hello.get("rank")
        world = hello.get("world_size", 1)
        if type(world) is not int or world < 1 or (world > 1 and not (type(rank) is int and 0 <= rank < world)):
            raise ProtocolError(f"a tensor-parallel worker's hello needs its rank in 0..world_size-1 (got rank {rank!r} of {world!r})")
        tier = hello.get("remote_tier")
        if tier is not None and not isinstance(tier, str):
            raise ProtocolError("a worker hello's remote_tier must be a string")
        version = hello.get("version") if isinstance(hello.get("version"), str) else None
        if version != __version__:  # a mixed-version fleet works, but whoever runs it should know
            log.warning(
                "worker %s of %s runs lmcached %s; this controller runs %s", worker_id, instance_id, version or "(unknown)", __version__
            )
        record = WorkerRecord(
            instance_id,
            worker_id,
            address,
            tuple(backends) if backends is not None else None,
            remote_tier=tier,
            version=version,
            world_size=world,
        )
        self.index.check_shard(record, rank)  # before anything of a worker already registered is touched
        old = self.sessions.pop(record.key, None)
        if old is not None:  # the same worker reconnected before we noticed it left
            old.fail_all("worker reconnected")
            old.writer.close()
        self.index.add_worker(record, rank if type(rank) is int else None)
        session = WorkerSession(record, writer)
        self.sessions[record.key] = session
        await write_frame(writer, Kind.WELCOME, {"heartbeat_interval": self.config.heartbeat_interval, "rank": record.rank})
        log.info("worker %s of %s registered from %s", worker_id, instance_id, address)
        self.publish("worker_registered", instance_id=instance_id, worker_id=worker_id, data_address=address)
        reason = "connection closed"
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    return
                record.last_heartbeat = time.monotonic()
                record.last_heartbeat_wall = time.time()
                if frame.kind == Kind.HEARTBEAT:
                    locations = frame.header.get("locations")
                    if isinstance(locations, dict):
                        record.heartbeat_stats = locations
                    usage = frame.header.get("usage")
                    if isinstance(usage, dict):
                        record.usage = usage
                elif frame.kind == Kind.REPORT:
                    self._apply_report(record, frame.header)
                elif frame.kind == Kind.REPLY:
                    session.resolve(frame.header)
                elif frame.kind == Kind.PROGRESS:
                    session.progressed(frame.header)
                elif frame.kind == Kind.GOODBYE:
                    reason = SHUT_DOWN
                    return
                else:
                    raise ProtocolError(f"unexpected {frame.kind.name} frame from a worker")
        finally:
            self._drop(session, SHUT_DOWN if self._stopping else reason)

    def _apply_report(self, record: WorkerRecord, header: dict[str, Any]) -> None:
        admitted, evicted = header.get("admitted", []), header.get("evicted", [])
        try:
            n_admitted, n_updated, n_evicted = self.index.apply_report(record, admitted, evicted, bool(header.get("full")))
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed report: {exc}") from None
        self.announce_report(record, n_admitted, n_updated, n_evicted, bool(header.get("full")))

    def announce_report(self, record: WorkerRecord, n_admitted: int, n_updated: int, n_evicted: int, full: bool = False) -> None:
        """Tell monitors what a worker's report changed (nothing when it changed nothing)."""
        if n_admitted or n_updated or n_evicted:
            self.publish(
                "chunks_reported",
                instance_id=record.instance_id,
                worker_id=record.worker_id,
                admitted=n_admitted,
                updated=n_updated,
                evicted=n_evicted,
                full=full,
            )

    def drop_all(self, reason: str) -> None:
        """Close every worker's and monitor's session (this controller stepped down: they go to the active one)."""
        for session in list(self.sessions.values()):
            self._drop(session, reason)
            session.writer.close()
        for monitor in list(self.monitors):
            monitor.writer.close()

    def _drop(self, session: WorkerSession, reason: str) -> None:
        key = session.record.key
        session.fail_all(f"worker {key[1]} lost: {reason}")
        if self.sessions.get(key) is session:
            del self.sessions[key]
            self.index.remove_worker(key)
            # A worker (or this daemon) shutting down on purpose is news, not a fault.
            log.log(logging.INFO if reason == SHUT_DOWN else logging.WARNING, "worker %s of %s lost: %s", key[1], key[0], reason)
            self.publish("worker_lost", instance_id=key[0], worker_id=key[1], reason=reason)

    async def _heartbeat_watchdog(self) -> None:
        """Drop workers silent for longer than heartbeat_timeout (heartbeats are on by default: LMCache issue 4808)."""
        tick = min(1.0, self.config.heartbeat_timeout / 4)
        while True:
            due = time.monotonic() + tick
            await asyncio.sleep(tick)
            now = time.monotonic()
            stalled = now - due
            if stalled > tick:
                # This process could not run for that long (a blocked loop, a suspended or starved process): nobody
                # could be heard meanwhile, the embedded instance could not even send. That silence is ours, not the
                # workers', so it does not count against them.
                log.warning("controller loop stalled for %.1fs: heartbeat clocks moved on by as much", stalled)
                for session in self.sessions.values():
                    session.record.last_heartbeat = min(now, session.record.last_heartbeat + stalled)
                continue
            for session in list(self.sessions.values()):
                if now - session.record.last_heartbeat > self.config.heartbeat_timeout:
                    self._drop(session, f"no heartbeat for {self.config.heartbeat_timeout:.0f}s")
                    session.writer.close()

    async def _serve_monitor(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        monitor = MonitorSession(writer)
        self.monitors.add(monitor)
        requests = asyncio.create_task(self._monitor_requests(monitor, reader))
        try:
            await monitor.send(Kind.WELCOME, {"role": MONITOR_ROLE})
            await monitor.send(Kind.SNAPSHOT, self._snapshot())
            while not requests.done():
                getter = asyncio.create_task(monitor.queue.get())
                snap = asyncio.create_task(monitor.needs_snapshot.wait())
                done, _ = await asyncio.wait({getter, snap, requests}, return_when=asyncio.FIRST_COMPLETED)
                getter.cancel()
                snap.cancel()
                if getter in done:
                    await monitor.send(Kind.EVENT, getter.result())
                if snap in done:
                    monitor.needs_snapshot.clear()
                    await monitor.send(Kind.SNAPSHOT, self._snapshot())
            requests.result()  # a protocol error in the monitor's requests surfaces here
        finally:
            self.monitors.discard(monitor)
            requests.cancel()

    async def _serve_router(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A router's lookups (router_port): after the welcome the connection is handed to a RouterProtocol,
        and this task waits for it to end."""
        await write_frame(writer, Kind.WELCOME, {"role": ROUTER_ROLE, "chunk_size": self.config.chunk_size})
        transport = writer.transport
        router = RouterProtocol(self.index, self.config, transport, writer.get_extra_info("peername"))  # type: ignore[arg-type]
        # A router waits for the welcome before its first LOOKUP; whatever it sent sooner is in the stream's
        # buffer (asyncio has no public way to take it back), so it is handed over with the connection.
        early = bytes(getattr(reader, "_buffer", b""))
        transport.set_protocol(router)
        if early:
            router.data_received(early)
        await router.closed

    async def _monitor_requests(self, monitor: MonitorSession, reader: asyncio.StreamReader) -> None:
        """A monitor asks for a fresh snapshot, or for an operation on chunks it selected."""
        while (frame := await read_frame(reader)) is not None:
            if frame.kind != Kind.COMMAND:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a monitor")
            header = frame.header
            if header.get("op") == "snapshot":
                monitor.needs_snapshot.set()
                continue
            reply: dict[str, Any] = {"req_id": header.get("req_id")}
            try:
                if self.monitor_command is None:
                    raise ProtocolError("this daemon takes no operations from monitors")
                reply |= {"ok": True, "result": await self.monitor_command(header)}
            except LmcachedError as exc:
                reply |= {"ok": False, "error": str(exc), "status": exc.http_status}
            await monitor.send(Kind.REPLY, reply)
