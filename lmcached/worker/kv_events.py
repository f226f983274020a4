"""Publishing a worker's tiers as KV events (vLLM's ZMQ form, lmcached.wire.kv_events): a chunk that lands in a
tier is a BlockStored of that tier's medium, one that leaves it (eviction, clear, move away, Redis expiry) a
BlockRemoved — removals included, which LMCache does not publish.

The storage's LineageBook (lineage.py) says when a chunk it knows the tokens of is stored somewhere or removed;
a thread of its own owns the ZMQ sockets (they are not thread-safe), batches what is queued, publishes it and
answers replay requests from its buffer.

pyzmq and msgspec come with vLLM; a worker without them says so when kv_events is configured.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from typing import Any

from lmcached.errors import ConfigError
from lmcached.wire.kv_events import END_SEQ, KVEventsSettings, Lineage, all_blocks_cleared, block_removed, block_stored, event_batch

log = logging.getLogger(__name__)

#: How long the thread waits for events before it looks at the replay socket again.
POLL_S = 0.05
START_TIMEOUT_S = 10.0


def _import_zmq() -> tuple[Any, Any]:
    try:
        import msgspec
        import zmq
    except ImportError as exc:
        raise ConfigError(
            f"kv_events needs pyzmq and msgspec ({exc.name} is not installed): pip install 'lmcached[kv-events]'", "kv_events"
        ) from None
    return zmq, msgspec


class KVEventPublisher:
    """One worker's event stream: a PUB socket, an optional replay ROUTER, the last `buffer_steps` batches."""

    def __init__(self, settings: KVEventsSettings, block_size: int, tier: str | None = None) -> None:
        self.zmq, msgspec = _import_zmq()
        self._encode = msgspec.msgpack.Encoder().encode
        self.settings = settings
        self.block_size = block_size
        self.tier = tier  # the shared Redis tier's id (named in its events' ownership)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=settings.buffer_steps)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        #: Bound addresses (an endpoint with port 0 gets one from the system).
        self.endpoint = settings.endpoint
        self.replay_endpoint = settings.replay_endpoint
        self.published_batches = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind (or connect) the sockets and start publishing; ConfigError when an endpoint cannot be bound.
        The first batch says AllBlocksCleared: whatever a consumer knew of this publisher before is gone."""
        self._thread = threading.Thread(target=self._run, name="lmcached-kv-events", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise ConfigError("kv_events: the publisher did not start", "kv_events")
        if self._failure is not None:
            raise ConfigError(f"kv_events: cannot open {self.settings.endpoint}: {self._failure}", "kv_events") from None
        self._queue.put(all_blocks_cleared())
        log.info("publishing KV events on %s (replay: %s)", self.endpoint, self.replay_endpoint or "off")

    def close(self) -> None:
        """Publish what is queued, then close the sockets."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------- what the lineage book tells us
    def stored(self, location: str, key: int, lineage: Lineage) -> None:
        self._queue.put(block_stored(key, lineage, self.block_size, location, self.tier))

    def removed(self, location: str, key: int) -> None:
        self._queue.put(block_removed([key], location, self.tier))

    # ---------------------------------------------------------------- the publishing thread
    def _run(self) -> None:
        zmq = self.zmq
        context = zmq.Context()
        pub = replay = None
        try:
            pub = context.socket(zmq.PUB)
            pub.set_hwm(self.settings.hwm)
            self.endpoint = _open(pub, self.settings.endpoint)
            if self.settings.replay_endpoint is not None:
                replay = context.socket(zmq.ROUTER)
                self.replay_endpoint = _open(replay, self.settings.replay_endpoint, bind=True)
        except Exception as exc:
            self._failure = exc
            for sock in (pub, replay):
                if sock is not None:
                    sock.close(linger=0)
            context.term()
            self._ready.set()
            return
        self._ready.set()
        topic = self.settings.topic.encode()
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._answer_replay(replay, topic)
                try:
                    first = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                events, stop = self._drain(first)
                if events:
                    seq = next(self._seq)
                    payload = self._encode(event_batch(events))
                    pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
                    self._buffer.append((seq, payload))
                    self.published_batches += 1
                if stop:
                    return
        except Exception:
            log.exception("KV event publisher failed; no more events are published")
        finally:
            pub.close(linger=1000)  # a subscriber gets the last batch before we go
            if replay is not None:
                replay.close(linger=0)
            context.term()

    def _drain(self, first: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
        """Everything queued now, as one batch's events; and whether close() asked us to stop."""
        events: list[dict[str, Any]] = []
        item: dict[str, Any] | None = first
        while True:
            if item is None:
                return events, True
            events.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return events, False

    def _answer_replay(self, replay: Any, topic: bytes) -> None:
        """A subscriber asks for the batches from a sequence number on: send those still buffered, then the end."""
        frames = replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("KV events: malformed replay request (%d frames); ignored", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):
            if seq >= first:
                replay.send_multipart((client, b"", topic, seq.to_bytes(8, "big"), payload))
        replay.send_multipart((client, b"", b"", END_SEQ, b""))


def _open(sock: Any, endpoint: str, bind: bool | None = None) -> str:
    """Bind a wildcard or ipc address (vLLM's rule), connect to any other; the address actually used."""
    import zmq

    if bind is None:
        bind = "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
    if not bind:
        sock.connect(endpoint)
        return endpoint
    sock.bind(endpoint)
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
