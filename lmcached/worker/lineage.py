"""Which tokens each chunk holds, for those outside lmcached that name chunks by their tokens: routers following
KV events (kv_events.py) and an LMCache-protocol controller (lmcache_link.py).

A chunk's key is a hash: who wants to place it needs its tokens and the chunk before it (its lineage). Clients
send them with the chunks they store when the worker asks (its welcome says "lineage"); the storage passes them
to `learn`, and every change it reports to `note`. The book tells its sinks when a chunk it knows the lineage
of lands in a tier (`stored`) or leaves one (`removed`), once each, and keeps a lineage as long as the chunk is
somewhere. A chunk held without a known lineage (read back from disk after a restart, another worker's chunk
met in Redis) is not passed on: nobody could place it. `unknown` counts them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from lmcached.wire.kv_events import Lineage

#: Lineages of chunks on their way in (learnt at the store, used when the chunk lands); one that never lands
#: (the worker had the chunk already) falls out after this many newer ones.
PENDING_LINEAGES = 65_536


class ChunkSink(Protocol):
    """Told, in order, when a chunk lands in a tier and when it leaves it (called with the book's lock held:
    queue the news, do not block)."""

    def stored(self, location: str, key: int, lineage: Lineage) -> None: ...

    def removed(self, location: str, key: int) -> None: ...


class LineageBook:
    def __init__(self, sinks: list[ChunkSink]) -> None:
        self.sinks = sinks
        self._pending: OrderedDict[int, Lineage] = OrderedDict()
        #: key -> (its lineage, the locations the sinks have been told it is at)
        self._held: dict[int, tuple[Lineage, set[str]]] = {}
        self._lock = threading.Lock()  # learn comes from the engine's thread too (a vLLM-hosted instance)
        self.unknown = 0

    def learn(self, key: int, lineage: Lineage) -> None:
        """A chunk's tokens and parent, from the store that brings it (before it lands)."""
        with self._lock:
            self._pending[key] = lineage
            self._pending.move_to_end(key)
            while len(self._pending) > PENDING_LINEAGES:
                self._pending.popitem(last=False)

    def note(self, location: str, key: int, present: bool) -> None:
        """The chunk is now at `location` (present) or left it: tell the sinks if that is news to them."""
        with self._lock:
            entry = self._held.get(key)
            if present:
                if entry is not None and location in entry[1]:
                    return  # known there already (a pin, a compress: still the same chunk)
                lineage = entry[0] if entry is not None else self._pending.pop(key, None)
                if lineage is None:
                    self.unknown += 1
                    return
                if entry is None:
                    entry = self._held[key] = (lineage, set())
                entry[1].add(location)
                for sink in self.sinks:
                    sink.stored(location, key, lineage)
                return
            if entry is None or location not in entry[1]:
                return
            entry[1].discard(location)
            if not entry[1]:
                del self._held[key]
            for sink in self.sinks:
                sink.removed(location, key)

    def held(self) -> dict[str, set[int]]:
        """location -> keys the sinks have been told are there."""
        with self._lock:
            out: dict[str, set[int]] = {}
            for key, (_, locations) in self._held.items():
                for location in locations:
                    out.setdefault(location, set()).add(key)
            return out
