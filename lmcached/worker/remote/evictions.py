"""Following what Redis does on its own: the evicted, expired and deleted keys it announces on keyevent channels
(one subscription per primary, renewed after failovers and outages), passed on as they come. What this misses
(Redis without notifications, a gap while it was down) the backend's periodic scan finds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lmcached.wire.redis_url import RemoteURL
from lmcached.worker.remote.connection import SOCKET_TIMEOUT_S

log = logging.getLogger(__name__)

#: Keyspace events the tier listens to: E = keyevent channels, x = expired, e = evicted, g = DEL and friends.
NOTIFY_FLAGS = "Exeg"
NOTIFY_RETRY_S = 2.0


class EvictionListener:
    """Calls `on_gone(redis key)` for each key Redis says left the tier, from a thread of its own."""

    def __init__(self, url: RemoteURL, primaries: Callable[[], list[Any]], on_gone: Callable[[bytes], None]) -> None:
        self.url = url
        self._primaries = primaries
        self._on_gone = on_gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notify_problem: str | None = None  # why notifications were last unavailable (logged once per cause)

    def enable_notifications(self) -> bool:
        """Ask each primary to publish evicted/expired/deleted keyevents (keeping flags already set)."""
        ok = True
        for node in self._primaries():
            try:
                current = node.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
                wanted = "".join(sorted(set(current) | set(NOTIFY_FLAGS)))
                if set(wanted) != set(current):
                    node.config_set("notify-keyspace-events", wanted)
            except Exception as exc:
                # Once per cause: the listener retries every few seconds while Redis is down.
                if str(exc) != self._notify_problem:
                    log.info("remote tier %s: keyspace notifications unavailable (%s); relying on scans", self.url.display, exc)
                    self._notify_problem = str(exc)
                ok = False
        if ok:
            self._notify_problem = None
        return ok

    def start(self) -> None:
        """Follow evicted/expired/del keyevents in a thread (one subscription per primary; renewed after
        failovers and outages). The periodic reconcile() covers whatever this misses."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._listen, name="lmcached-remote-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=NOTIFY_RETRY_S + SOCKET_TIMEOUT_S)

    def _listen(self) -> None:
        channels = [f"__keyevent@{self.url.db}__:{event}" for event in ("expired", "evicted", "del")]
        while not self._stop.is_set():
            subs: list[Any] = []
            try:
                self.enable_notifications()
                for node in self._primaries():
                    sub = node.pubsub(ignore_subscribe_messages=True)
                    sub.subscribe(*channels)
                    subs.append(sub)
                deadline = time.monotonic() + 30  # re-learn the primaries now and then (failover)
                while not self._stop.is_set() and time.monotonic() < deadline:
                    for sub in subs:
                        message = sub.get_message(timeout=0.05)
                        if message and message.get("type") == "message":
                            self._on_gone(message["data"])
            except Exception as exc:
                log.debug("remote tier event listener: %s", exc)
                self._stop.wait(NOTIFY_RETRY_S)
            finally:
                for sub in subs:
                    try:
                        sub.close()
                    except Exception:
                        pass
