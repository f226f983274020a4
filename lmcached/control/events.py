"""Operation events: every controller operation gets an event_id whose status /check_finish reports."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from lmcached.errors import NotFound

Status = Literal["pending", "running", "finished", "failed"]
#: Finished events are kept this many at most (oldest dropped first), so a long-lived daemon stays bounded.
MAX_EVENTS = 100_000


@dataclass
class Event:
    """One operation and what became of it."""

    event_id: str
    op: str
    instance_id: str | None
    num_tokens: int
    status: Status = "pending"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    #: While it runs: chunks {"done", "total"} over its workers, as they last reported (a long compress).
    progress: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "op": self.op,
            "status": self.status,
            "instance_id": self.instance_id,
            "num_tokens": self.num_tokens,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }
        if self.progress is not None and self.status == "running":
            out["progress"] = self.progress
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class EventLog:
    """Events by id, bounded, oldest first."""

    def __init__(self, limit: int = MAX_EVENTS) -> None:
        self._events: OrderedDict[str, Event] = OrderedDict()
        self._limit = limit
        self._seq = itertools.count(1)

    def create(self, op: str, instance_id: str | None, num_tokens: int) -> Event:
        # A readable, sortable id: the op, a sequence number, and randomness so ids never repeat across restarts.
        event = Event(f"{op}-{next(self._seq)}-{uuid.uuid4().hex[:8]}", op, instance_id, num_tokens)
        self._events[event.event_id] = event
        while len(self._events) > self._limit:
            self._events.popitem(last=False)
        return event

    def get(self, event_id: str) -> Event:
        try:
            return self._events[event_id]
        except KeyError:
            raise NotFound(f"unknown event_id {event_id!r}") from None

    def recent(self, n: int = 100) -> list[Event]:
        return list(self._events.values())[-n:]

    @staticmethod
    def start(event: Event) -> None:
        event.status = "running"

    @staticmethod
    def finish(event: Event, result: dict[str, Any]) -> None:
        event.status, event.result, event.finished_at = "finished", result, time.time()

    @staticmethod
    def fail(event: Event, error: str) -> None:
        event.status, event.error, event.finished_at = "failed", error, time.time()
