"""Reporting a worker's chunks to an LMCache-protocol controller (lmcached.wire.lmcache_protocol): LMCache's own
`lmcache controller`, or vLLM production-stack's `kvaware` router, which embeds it and routes a prompt to the
instance its lookup names. With `controller_pull_url` and `controller_reply_url` set (LMCache's keys), the worker
registers there, sends its admits and evictions per tier under LMCache's chunk hashes, heartbeats, and
deregisters when it stops — besides its link to lmcached's own controller.

LMCache's hash of a chunk chains on the hash of the chunk before it, so it is computed when the chunk is stored
(the LineageBook passes its tokens and parent) and kept while the chunk is held. A chunk whose parent's hash is
unknown (its parent was never stored here) or that carries a cache salt (LMCache's lookup has none) is not
reported; `skipped` counts them. The controller dials the port a worker registers for its control messages: the
link binds one of its own, answers health checks, and answers clear/move/compress with an error saying that
lmcached's own controller does those.

A thread owns the ZMQ sockets; the lineage book only queues. pyzmq and msgspec: the kv-events extra.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from collections import defaultdict
from typing import Any

from lmcached.errors import ConfigError
from lmcached.wire.kv_events import Lineage
from lmcached.wire.lmcache_protocol import (
    batched_kv_operations,
    control_reply,
    deregister_msg,
    heartbeat_msg,
    lmcache_chunk_hash,
    register_msg,
    zmq_address,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
#: How long a request to the controller (register, heartbeat) waits for its answer.
REPLY_TIMEOUT_MS = 3000
POLL_S = 0.05


def node_ip(host: str) -> str:
    """The address an LMCache controller knows this worker by (a router maps engine IPs to instances with it):
    the bound host, or for a wildcard bind the address this machine reaches the network from (LMCache's get_ip)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        return str(probe.getsockname()[0])
    return "127.0.0.1"


def _import_zmq() -> tuple[Any, Any]:
    try:
        import msgspec
        import zmq
    except ImportError as exc:
        raise ConfigError(
            f"controller_pull_url needs pyzmq and msgspec ({exc.name} is not installed): pip install 'lmcached[kv-events]'",
            "controller_pull_url",
        ) from None
    return zmq, msgspec


class LMCacheLink:
    """One worker's registration with an LMCache-protocol controller, and its reports."""

    def __init__(self, pull_url: str, reply_url: str, instance_id: str, worker_id: int, ip: str) -> None:
        self.zmq, msgspec = _import_zmq()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.decode
        self.pull_url, self.reply_url = zmq_address(pull_url), zmq_address(reply_url)
        self.identity = (instance_id, worker_id, ip, 0)  # the control port is bound when the thread starts
        #: lmcached key -> (LMCache's key, the locations reported)
        self._keys: dict[int, tuple[int, set[str]]] = {}
        self._queue: queue.Queue[tuple[str, str, int] | None] = queue.Queue()
        self._seq: dict[str, itertools.count[int]] = defaultdict(itertools.count)
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self.skipped = 0
        self.reported = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmcached-lmcache-link", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Report what is queued, deregister, close."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------- what the lineage book tells us
    def stored(self, location: str, key: int, lineage: Lineage) -> None:
        entry = self._keys.get(key)
        if entry is None:
            parent = self._keys.get(lineage.parent) if lineage.parent is not None else None
            if lineage.salt is not None or (lineage.parent is not None and parent is None):
                self.skipped += 1
                return
            entry = self._keys[key] = (lmcache_chunk_hash(parent[0] if parent else None, lineage.tokens), set())
        entry[1].add(location)
        self._queue.put(("admit", location, entry[0]))

    def removed(self, location: str, key: int) -> None:
        entry = self._keys.get(key)
        if entry is None or location not in entry[1]:
            return
        entry[1].discard(location)
        if not entry[1]:
            del self._keys[key]
        self._queue.put(("evict", location, entry[0]))

    # ---------------------------------------------------------------- the link's thread
    def _run(self) -> None:
        zmq = self.zmq
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(self.pull_url)
        requests = self._dealer(context, self.reply_url)
        control = context.socket(zmq.REP)
        self.identity = (*self.identity[:3], control.bind_to_random_port("tcp://*"))
        heartbeats = None
        next_heartbeat = 0.0
        backlog: list[tuple[str, str, int]] = []  # changes waiting for the registration (an unknown worker's are dropped)
        try:
            while True:
                if not self.registered.is_set() and time.monotonic() >= next_heartbeat:
                    heartbeat_url = self._register(requests)
                    if heartbeat_url is not None:
                        heartbeats = self._dealer(context, zmq_address(heartbeat_url))
                    next_heartbeat = time.monotonic() + (HEARTBEAT_S if self.registered.is_set() else 1.0)
                elif self.registered.is_set() and time.monotonic() >= next_heartbeat:
                    self._request(heartbeats or requests, heartbeat_msg(*self.identity))
                    next_heartbeat = time.monotonic() + HEARTBEAT_S
                while control.poll(0):
                    control.send(self._encode(control_reply(self._decode(control.recv()))))
                try:
                    changes, stop = self._drain(self._queue.get(timeout=POLL_S))
                except queue.Empty:
                    changes, stop = [], False  # nothing new; a backlog may still be waiting
                backlog += changes
                if backlog and self.registered.is_set():
                    push.send_multipart([self._encode(m) for m in self._batches(backlog)])
                    self.reported += len(backlog)
                    backlog = []
                if stop:
                    if self.registered.is_set():
                        push.send_multipart([self._encode(deregister_msg(*self.identity))])
                    return
        except Exception:
            log.exception("LMCache controller link failed; no more reports to %s", self.pull_url)
        finally:
            for sock in (push, requests, heartbeats, control):
                if sock is not None:
                    sock.close(linger=1000)
            context.term()

    def _dealer(self, context: Any, url: str) -> Any:
        sock = context.socket(self.zmq.DEALER)
        sock.setsockopt(self.zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        sock.setsockopt(self.zmq.LINGER, 0)
        sock.connect(url)
        return sock

    def _request(self, sock: Any, message: dict[str, Any]) -> dict[str, Any] | None:
        try:
            sock.send_multipart([b"", self._encode(message)])
            reply = self._decode(sock.recv_multipart()[-1])
        except self.zmq.Again:
            log.warning("LMCache controller %s did not answer a %s in %d ms", self.reply_url, message["type"], REPLY_TIMEOUT_MS)
            return None
        return reply if isinstance(reply, dict) else None

    def _register(self, sock: Any) -> str | None:
        """Register; the heartbeat URL the controller names, if any."""
        reply = self._request(sock, register_msg(*self.identity))
        if reply is None or reply.get("type") != "RegisterRetMsg":
            return None
        self.registered.set()
        log.info("registered %s worker %s with the LMCache controller at %s", self.identity[0], self.identity[1], self.reply_url)
        extra = reply.get("extra_config") or {}
        return extra.get("heartbeat_url") if isinstance(extra, dict) else None

    def _drain(self, first: tuple[str, str, int] | None) -> tuple[list[tuple[str, str, int]], bool]:
        changes: list[tuple[str, str, int]] = []
        item = first
        while True:
            if item is None:
                return changes, True
            changes.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return changes, False

    def _batches(self, changes: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        """One BatchedKVOperationMsg per location, operations in order, sequence numbers per location."""
        by_location: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for op, location, key in changes:
            by_location[location].append((op, key, next(self._seq[location])))
        instance_id, worker_id, _, _ = self.identity
        return [batched_kv_operations(instance_id, worker_id, location, ops) for location, ops in by_location.items()]
