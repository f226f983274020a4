"""LMCache workers in lmcached's index: the controller listens on LMCache's two controller ports (a PULL socket for
pushed reports, a ROUTER for requests; lmcached.wire.lmcache_protocol) when `lmcache_pull_port` and
`lmcache_reply_port` are set, so an LMCache engine pointed at it (`controller_pull_url`, `controller_reply_url`)
registers, reports its admits and evictions, heartbeats and deregisters, and a mixed fleet shows in one index.

An LMCache worker names chunks by LMCache's hash of their tokens, not lmcached's: its chunks stay under those
keys, and a lookup by tokens also hashes them LMCache's way for LMCache workers (`with_lmcache_instances`). Its
records say `protocol: "lmcache"`; the controller finds its chunks, but operates (compress, move, clear, pin) only
on lmcached workers — an LMCache worker has no lmcached command channel, and operating on it says so. It leaves
the index when it deregisters (an LMCache worker sends heartbeats only to a dedicated heartbeat URL, which this
port does not offer: as with LMCache's own controller, silence does not drop it).

Runs on the controller's event loop (pyzmq's asyncio sockets). pyzmq and msgspec: the kv-events extra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from lmcached.config import Config
from lmcached.control.index import ChunkIndex, WorkerRecord
from lmcached.errors import ConfigError
from lmcached.wire.chunks import ChunkSpan
from lmcached.wire.lmcache_protocol import LMCACHE_CHUNK_SIZE, lmcache_spans

log = logging.getLogger(__name__)

#: The protocol a WorkerRecord of an LMCache worker says it speaks.
LMCACHE_PROTOCOL = "lmcache"
#: LMCache's chunks carry no token count in their reports: each is a whole chunk of its chunk size.
LMCACHE_LOCATIONS = ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend")


def lmcache_worker_id(worker_id: int) -> str:
    """lmcached's name for LMCache worker (TP rank) `worker_id` of an instance."""
    return f"lmcache-{worker_id}"


class LMCacheFleetPort:
    def __init__(self, config: Config, index: ChunkIndex, publish: Callable[..., None], announce: Callable[..., None]) -> None:
        try:
            import msgspec
            import zmq
            import zmq.asyncio
        except ImportError as exc:
            raise ConfigError(
                f"lmcache_pull_port needs pyzmq and msgspec ({exc.name} is not installed): pip install 'lmcached[kv-events]'",
                "lmcache_pull_port",
            ) from None
        self.zmq = zmq
        self.config = config
        self.index = index
        self.publish = publish  # the hub's: monitors hear of workers joining and leaving
        self.announce = announce  # the hub's announce_report: and of what their reports changed
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.decode
        self._context = zmq.asyncio.Context()
        self._sockets: list[Any] = []
        self._tasks: list[Any] = []
        self.pull_port = self.reply_port = 0

    async def start(self, host: str, pull_port: int, reply_port: int) -> None:
        import asyncio

        zmq = self.zmq
        bind = "*" if host in ("0.0.0.0", "::", "") else host
        pull, reply = self._context.socket(zmq.PULL), self._context.socket(zmq.ROUTER)
        self._sockets = [pull, reply]
        try:
            self.pull_port = _bind(pull, bind, pull_port)
            self.reply_port = _bind(reply, bind, reply_port)
        except zmq.ZMQError as exc:
            self.close_sockets()
            raise ConfigError(
                f"cannot open LMCache's controller ports ({pull_port}, {reply_port}) on {host}: {exc}", "lmcache_pull_port"
            ) from None
        self._tasks = [
            asyncio.create_task(self._pull(pull), name="lmcache-pull"),
            asyncio.create_task(self._reply(reply), name="lmcache-reply"),
        ]
        log.info("LMCache workers: pull port %d, reply port %d", self.pull_port, self.reply_port)

    async def stop(self) -> None:
        import asyncio

        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.close_sockets()
        self._context.term()

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)

    # ---------------------------------------------------------------- the two sockets
    async def _pull(self, sock: Any) -> None:
        while True:
            for frame in await sock.recv_multipart():
                self._handle(self._message(frame))

    async def _reply(self, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart()  # [identity, b"", payload] from a DEALER
            answer = self._handle(self._message(frames[-1]))
            await sock.send_multipart([*frames[:-1], self._encode(answer)])

    def _message(self, frame: bytes) -> dict[str, Any]:
        try:
            message = self._decode(frame)
        except Exception:  # msgspec's DecodeError, and whatever a garbled frame makes of it
            return {}
        return message if isinstance(message, dict) else {}

    # ---------------------------------------------------------------- what LMCache workers say
    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        kind = message.get("type")
        try:
            if kind in ("RegisterMsg", "HeartbeatMsg"):
                self._register(message, heartbeat=kind == "HeartbeatMsg")
                return (
                    {"type": "RegisterRetMsg", "extra_config": {}} if kind == "RegisterMsg" else {"type": "HeartbeatRetMsg", "commands": []}
                )
            if kind == "DeRegisterMsg":
                self._deregister(message)
            elif kind == "BatchedKVOperationMsg":
                ops = message["operations"]
                self._apply(message, message["location"], [(op["op_type"], op["key"]) for op in ops])
            elif kind in ("KVAdmitMsg", "KVEvictMsg"):  # LMCache before batched reports
                self._apply(message, message["location"], [("admit" if kind == "KVAdmitMsg" else "evict", message["key"])])
            else:
                log.info("LMCache worker message %s: not handled by lmcached", kind or "(unreadable)")
                return {"type": "ErrorMsg", "error": f"lmcached's controller does not handle {kind or 'this message'}"}
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed %s from an LMCache worker: %s", kind, exc)
            return {"type": "ErrorMsg", "error": f"malformed {kind}: {exc}"}
        return {}

    def _register(self, message: dict[str, Any], heartbeat: bool) -> None:
        instance_id, worker_id = str(message["instance_id"]), lmcache_worker_id(int(message["worker_id"]))
        record = self.index.workers.get((instance_id, worker_id))
        if record is not None:
            if not heartbeat:  # registering again: LMCache's controller starts it afresh too
                self.index.remove_worker(record.key)
            else:
                record.touch()
                return
        record = WorkerRecord(
            instance_id,
            worker_id,
            f"{message['ip']}:{int(message['port'])}",
            backends=LMCACHE_LOCATIONS,
            rank=int(message["worker_id"]),
            protocol=LMCACHE_PROTOCOL,
        )
        self.index.add_worker(record, record.rank)
        self.publish("worker_registered", instance_id=instance_id, worker_id=worker_id, data_address=record.data_address)

    def _deregister(self, message: dict[str, Any]) -> None:
        key = (str(message["instance_id"]), lmcache_worker_id(int(message["worker_id"])))
        if self.index.remove_worker(key) is not None:
            self.publish("worker_lost", instance_id=key[0], worker_id=key[1], reason="deregistered (LMCache)")

    def _apply(self, message: dict[str, Any], location: str, operations: list[tuple[str, int]]) -> None:
        record = self.index.workers.get((str(message["instance_id"]), lmcache_worker_id(int(message["worker_id"]))))
        if record is None:
            log.info("reports from unregistered LMCache worker %s/%s: dropped", message["instance_id"], message["worker_id"])
            return
        record.touch()
        chunk_size = LMCACHE_CHUNK_SIZE
        admitted = [[location, _unsigned(key), chunk_size, 0, None, False, 0] for op, key in operations if op == "admit"]
        evicted = [[location, _unsigned(key)] for op, key in operations if op == "evict"]
        self.announce(record, *self.index.apply_report(record, admitted, evicted, False))


def with_lmcache_instances(index: ChunkIndex, tokens: Sequence[int], found: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """`found` (a lookup by lmcached's keys) plus what LMCache workers hold of `tokens`, looked up by LMCache's."""
    if not any(r.protocol == LMCACHE_PROTOCOL for r in index.workers.values()):
        return found
    spans = [ChunkSpan(_unsigned(s.key), s.start, s.end) for s in lmcache_spans(tokens)]
    theirs = index.lookup(spans)
    return found | {inst: where for inst, where in theirs.items() if index.workers_protocol(inst) == LMCACHE_PROTOCOL}


def _unsigned(key: int) -> int:
    """LMCache's keys are Python hashes (signed); the index keeps 64-bit unsigned keys."""
    return key & 0xFFFF_FFFF_FFFF_FFFF


def _bind(sock: Any, host: str, port: int) -> int:
    if port == 0:
        return int(sock.bind_to_random_port(f"tcp://{host}"))
    sock.bind(f"tcp://{host}:{port}")
    return port
