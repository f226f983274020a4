"""The monitor's state, apart from any widget: what the daemon last said, turned into rows to show."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

LOCATIONS = ("LocalCPUBackend", "LocalDiskBackend", "RemoteBackend")
REMOTE = "RemoteBackend"
#: How many events and chart points the monitor keeps.
MAX_EVENTS = 500
MAX_POINTS = 120
#: A worker that left shows as "lost" this long, as one row per instance (the newest): restarts would pile them up.
LOST_KEEP_S = 300.0
#: Eighths of a character cell, for the memory chart.
BARS = " ▁▂▃▄▅▆▇█"


def memory_chart(points: list[float], capacity: float, width: int) -> str:
    """The newest `width` points as one row of bars scaled to `capacity` (not to the points' own range, which
    drew full blocks for a tier 0.7 % full); a point above 0 shows at least the lowest bar."""
    if capacity <= 0 or width <= 0:
        return ""
    cells = []
    for value in points[-width:]:
        eighths = round(min(value / capacity, 1.0) * 8)
        cells.append(BARS[max(eighths, 1 if value > 0 else 0)])
    return "".join(cells).rjust(width)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def remote_state(stats: dict[str, Any]) -> str:
    """How a worker reaches the shared remote tier: down, or up with its hit rate and any writes waiting."""
    if stats.get("up") is False:
        return "Redis DOWN" + (f", {human_bytes(stats['write_queue_bytes'])} queued" if stats.get("write_queue_bytes") else "")
    hits, misses = stats.get("hits") or 0, stats.get("misses") or 0
    state = f"up, hits {100 * hits / (hits + misses):.0f}%" if hits + misses else "up"
    return state + (f", {human_bytes(stats['write_queue_bytes'])} queued" if stats.get("write_queue_bytes") else "")


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


@dataclass
class ChunkRow:
    instance_id: str
    worker_id: str
    location: str
    key: int
    num_tokens: int
    nbytes: int
    method: str | None
    pinned: bool
    raw_nbytes: int
    lossy: str | None = None  # the lossy codecs its values have been through

    @property
    def form(self) -> str:
        """How the chunk is held, and what its values lost: "cachegen", "raw", "raw (from cachegen)"."""
        if self.method is not None:
            return self.method
        return f"raw (from {self.lossy})" if self.lossy else "raw"


@dataclass
class EventRow:
    time: float
    kind: str
    instance_id: str
    tokens: int | None
    outcome: str

    def matches(self, text: str) -> bool:
        text = text.lower()
        return not text or any(text in str(v).lower() for v in (self.kind, self.instance_id, self.outcome, self.tokens))


@dataclass
class MonitorState:
    instances: dict[str, Any] = field(default_factory=dict)
    events: deque[EventRow] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    memory: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    snapshot_time: float | None = None
    #: Workers that left, kept to show as "lost": (instance_id, worker_id) -> (last description, when)
    lost: dict[tuple[str, str], tuple[dict[str, Any], float]] = field(default_factory=dict)
    #: False while the monitor has lost the daemon: what it shows is then the last known state, not live.
    connected: bool = True

    # -- updates
    def apply_snapshot(self, snapshot: dict[str, Any]) -> None:
        before = self._workers()
        self.instances = dict(snapshot.get("instances") or {})
        self.snapshot_time = snapshot.get("time") or time.time()
        now = self._workers()
        for key, worker in before.items():
            if key not in now and key not in self.lost:
                self.lost[key] = (worker, self.snapshot_time)
        for key in now:
            self.lost.pop(key, None)  # it came back
        self._prune_lost()
        if not self.events:  # the first snapshot brings the recent history
            for event in snapshot.get("events") or []:
                self.events.appendleft(self._operation_row(event))
        self.memory.append(float(self.total_bytes()))

    def _workers(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(inst_id, w.get("worker_id", "")): w for inst_id, inst in self.instances.items() for w in inst.get("workers", [])}

    def apply_event(self, event: dict[str, Any]) -> EventRow:
        kind = event.get("type")
        ts = float(event.get("time") or time.time())
        if kind == "worker_registered":
            row = EventRow(ts, "register", event.get("instance_id", ""), None, f"{event.get('worker_id')} at {event.get('data_address')}")
        elif kind == "worker_lost":
            key = (event.get("instance_id", ""), event.get("worker_id", ""))
            if key in self._workers() and key not in self.lost:
                self.lost[key] = (self._workers()[key], ts)
                self._prune_lost()
            row = EventRow(ts, "lost", event.get("instance_id", ""), None, f"{event.get('worker_id')}: {event.get('reason')}")
        elif kind == "chunks_reported":
            row = EventRow(ts, *self._report_outcome(event))
        elif kind == "operation":
            row = self._operation_row(event)
        else:
            row = EventRow(ts, str(kind), event.get("instance_id", "") or "", None, "")
        self.events.appendleft(row)
        return row

    @staticmethod
    def _report_outcome(event: dict[str, Any]) -> tuple[str, str, None, str]:
        """A worker's report in words: chunks that arrived (admit), changed in place (update: compressed,
        pinned...) or left (evict)."""
        counts = {name: int(event.get(name, 0)) for name in ("admitted", "updated", "evicted")}
        names = {"admitted": "admit", "updated": "update", "evicted": "evict"}
        present = [names[n] for n, c in counts.items() if c]
        kind = "resync" if event.get("full") else "/".join(present) or "report"
        signs = {"admitted": "+", "updated": "~", "evicted": "-"}
        outcome = ", ".join(f"{signs[n]}{c} {names[n]}" for n, c in counts.items() if c) + " chunks"
        return kind, event.get("instance_id", ""), None, outcome

    @staticmethod
    def _operation_row(event: dict[str, Any]) -> EventRow:
        status = event.get("status", "")
        outcome = status if status != "failed" else f"failed: {event.get('error', '')}"
        result = event.get("result") or {}
        if status == "finished" and "bytes_before" in result and result.get("bytes_after"):
            outcome += f" ({human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])})"
        if status == "finished" and result.get("message"):  # what was skipped, or that nothing matched: never a bare "finished"
            outcome += f"; {result['message']}"
        ts = event.get("finished_at") or event.get("created_at") or time.time()
        return EventRow(float(ts), str(event.get("op", "?")), event.get("instance_id") or "-", event.get("num_tokens"), outcome)

    def _prune_lost(self) -> None:
        """Keep lost workers for LOST_KEEP_S (by the daemon's clock, as the events are), and only the newest of
        each instance."""
        now = self.snapshot_time or time.time()
        newest: dict[str, tuple[tuple[str, str], tuple[dict[str, Any], float]]] = {}
        for key, (worker, since) in self.lost.items():
            if now - since <= LOST_KEEP_S and (key[0] not in newest or since > newest[key[0]][1][1]):
                newest[key[0]] = (key, (worker, since))
        self.lost = dict(newest.values())

    # -- derived rows
    def capacity_bytes(self) -> int:
        """The capacity of the tiers the workers hold themselves (RAM and disk), as total_bytes counts them."""
        return sum(
            stats.get("capacity_bytes") or 0
            for worker in self._workers().values()
            for location, stats in worker.get("locations", {}).items()
            if location != REMOTE
        )

    def total_bytes(self) -> int:
        """Bytes this fleet's workers hold themselves (the shared remote tier is Redis's memory, not theirs)."""
        return sum(
            stats.get("bytes", 0)
            for worker in self._workers().values()
            for location, stats in worker.get("locations", {}).items()
            if location != REMOTE
        )

    def instance_rows(self) -> list[tuple[str, ...]]:
        """One row per (instance, worker, location)."""
        rows = []
        for instance_id, inst in sorted(self.instances.items()):
            for worker in inst.get("workers", []):
                state = "alive" if worker.get("alive", True) else "lost"
                beat = worker.get("seconds_since_heartbeat")
                if not self.connected:  # nobody can say whether it is alive until the monitor reconnects
                    state, beat = "unknown", None
                for location, stats in sorted(worker.get("locations", {}).items()):
                    ratio = stats.get("raw_bytes", 0) / stats["bytes"] if stats.get("bytes") else 0.0
                    capacity = stats.get("capacity_bytes") or None
                    shown_state = f"{state} ({beat:.1f}s)" if beat is not None else state
                    if location == REMOTE and self.connected:
                        shown_state = remote_state(stats)
                    rows.append(
                        (
                            instance_id,
                            worker.get("worker_id", ""),
                            worker.get("data_address", ""),
                            shown_state,
                            location,
                            str(stats.get("chunks", 0)),
                            str(stats.get("tokens", 0)),
                            f"{human_bytes(stats.get('bytes', 0))} / {human_bytes(capacity)}",
                            str(stats.get("compressed_chunks", 0)),
                            f"{ratio:.2f}x" if ratio else "-",
                        )
                    )
        for (instance_id, worker_id), (worker, since) in sorted(self.lost.items()):
            rows.append((instance_id, worker_id, worker.get("data_address", ""), f"lost at {clock(since)}", "-", "-", "-", "-", "-", "-"))
        return rows

    def chunk_rows(self, instance_id: str | None, location: str | None) -> list[ChunkRow]:
        rows = []
        for inst_id, inst in sorted(self.instances.items()):
            if instance_id is not None and inst_id != instance_id:
                continue
            for worker in inst.get("workers", []):
                for loc, chunks in sorted((worker.get("chunks") or {}).items()):
                    if location is not None and loc != location:
                        continue
                    for key, num_tokens, nbytes, method, pinned, raw_nbytes, *lineage in chunks:
                        worker_id = worker.get("worker_id", "")
                        lossy = lineage[0] if lineage else None
                        rows.append(ChunkRow(inst_id, worker_id, loc, key, num_tokens, nbytes, method, bool(pinned), raw_nbytes, lossy))
        return rows

    def event_rows(self, text: str = "") -> list[EventRow]:
        return [e for e in self.events if e.matches(text)]
