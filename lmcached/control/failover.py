"""Controllers in a group (`controller_peers`): one is active, the others stand by and take over when it dies.

Every controller asks its peers `GET /role` every PROBE_INTERVAL_S. A standby becomes active once no peer has
said "active" for `failover_after_s` — and only the most senior standby among those that answer (the earliest
started, then the lowest id), so two standbys never both take over. An active controller that meets another
active one (a partition healed) steps down when the other has been active longer. A controller that starts
with peers starts as a standby: a restarted former active joins as the standby of the one that took over, and
a group started together has its most senior member active after `failover_after_s`.

A standby answers 503 (naming the active controller) on the HTTP API and refuses workers' and monitors' hellos,
so clients and workers given every controller's address (a comma-separated list) move on to the active one.
The index is not copied between controllers: workers re-register with the new active controller and resend
what they hold (every reconnect resyncs), so the index is whole again a reconnect after the takeover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcached.wire.handshake import http_base

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

ACTIVE, STANDBY = "active", "standby"
#: How often a controller asks its peers for their role.
PROBE_INTERVAL_S = 0.5
#: How long one peer gets to answer.
PROBE_TIMEOUT_S = 1.0


class Role:
    """This controller's place in its group, decided from what its peers say."""

    def __init__(
        self,
        peers: list[str],
        failover_after_s: float,
        auth_token: str | None = None,
        on_step_down: Callable[[], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context  # peers serve TLS (a group is all TLS or all plain)
        self.peers = [http_base(p, tls=ssl_context is not None) for p in peers]
        self.failover_after_s = failover_after_s
        self.auth_token = auth_token
        #: Called when this controller stops being the active one (its workers and monitors must go).
        self.on_step_down = on_step_down or (lambda: None)
        self.ident = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.state = STANDBY if self.peers else ACTIVE
        self.active_since: float | None = None if self.peers else self.started_at
        #: The peer that is active, as last seen (None when this one is, or none is).
        self.active_peer: str | None = None
        self._last_active_seen = time.monotonic()  # a new member first gives an active peer time to show
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.state,
            "id": self.ident,
            "started_at": self.started_at,
            "active_since": self.active_since,
            "active_peer": self.active_peer,
            "peers": self.peers,
        }

    def standby_detail(self) -> str:
        where = f"the active one is {self.active_peer}" if self.active_peer else "no active controller yet (a takeover is under way)"
        return f"this controller is a standby: {where}"

    async def start(self) -> None:
        if self.peers:
            log.info("controller %s starts as a standby of %s", self.ident, ", ".join(self.peers))
            self._task = asyncio.create_task(self._watch(), name="controller-role")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        import aiohttp  # here: the CLI imports this module for its address helpers, and starts faster without it

        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else False)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
            while True:
                views = await asyncio.gather(*(self._ask(session, peer) for peer in self.peers))
                self.decide({peer: view for peer, view in zip(self.peers, views, strict=True) if view is not None})
                await asyncio.sleep(PROBE_INTERVAL_S)

    @staticmethod
    async def _ask(session: aiohttp.ClientSession, peer: str) -> dict[str, Any] | None:
        import aiohttp

        try:
            async with session.get(peer + "/role") as response:
                if response.status != 200:
                    return None
                view = await response.json()
                return view if isinstance(view, dict) and view.get("role") in (ACTIVE, STANDBY) else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None  # down, or not a controller: it is not active

    def decide(self, views: dict[str, dict[str, Any]]) -> None:
        """One round: what the peers that answered said, by address."""
        actives = {peer: v for peer, v in views.items() if v["role"] == ACTIVE and v.get("id") != self.ident}
        now = time.monotonic()
        if self.state == STANDBY:
            if actives:
                self._last_active_seen = now
                self.active_peer = min(actives, key=lambda p: _seniority(actives[p], "active_since"))
                return
            self.active_peer = None
            if now - self._last_active_seen < self.failover_after_s:
                return
            mine = (self.started_at, self.ident)
            if any(_seniority(v, "started_at") < mine for v in views.values() if v["role"] == STANDBY):
                return  # a more senior standby takes over
            self.state, self.active_since = ACTIVE, time.time()
            log.warning("controller %s takes over: no active controller answered for %.1f s", self.ident, self.failover_after_s)
            return
        mine = (self.active_since or 0.0, self.ident)
        seniors = [p for p, v in actives.items() if _seniority(v, "active_since") < mine]
        if seniors:
            self.state, self.active_since, self.active_peer = STANDBY, None, seniors[0]
            self._last_active_seen = now
            log.warning("controller %s steps down: %s has been active longer", self.ident, seniors[0])
            self.on_step_down()


def _seniority(view: dict[str, Any], since: str) -> tuple[float, str]:
    value = view.get(since)
    return (float(value) if isinstance(value, (int, float)) else float("inf"), str(view.get("id", "")))
