"""KV events in vLLM's wire format: what a worker publishes so routers know where KV lives, tier by tier.

The form is the one vLLM 0.32's `vllm/distributed/kv_events.py` publishes and its consumers (llm-d's KV-cache
indexer, Dynamo's KV router, vLLM's own `kv_events_subscriber` example) decode: each ZMQ message is
`[topic, 8-byte big-endian sequence number, msgpack EventBatch]`, an EventBatch is the array
`[ts, [event, ...], data_parallel_rank]`, and each event is a map tagged by `"type"` (`BlockStored`,
`BlockRemoved`, `AllBlocksCleared`; vLLM before 0.9 sent positional arrays instead, which this does not).
A replay ROUTER socket answers a subscriber's 8-byte start sequence with the batches it still buffers, then
`[b"", -1, b""]`.

Mediums: `CPU` for the RAM tier, `DISK` for the disk tier and vLLM's `STORAGE` for the shared Redis tier, whose
events also say `locality: "REMOTE"` (every instance of the tier reaches it) and name the tier in `ownership`.
A chunk is one block: `block_size` is the chunk size and `token_ids` the chunk's tokens (fewer for a prompt's
last, partial chunk), with `parent_block_hash` chaining it to the chunk before it, so a consumer can rebuild
keys at its own block size.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcached.errors import ConfigError
from lmcached.wire.chunk import CPU, DISK, REMOTE
from lmcached.wire.chunks import ChunkSpan, tokens_array

#: Which medium each tier's events carry.
MEDIUMS = {CPU: "CPU", DISK: "DISK", REMOTE: "STORAGE"}

#: vLLM's KVEventsConfig defaults (LMCache's `enable_kv_events: true` means these).
DEFAULT_ENDPOINT = "tcp://*:5557"
DEFAULT_BUFFER_STEPS = 10_000
DEFAULT_HWM = 100_000
PUBLISHERS = ("zmq", "null")

#: The replay socket's end-of-replay marker: sequence number -1.
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class KVEventsSettings:
    """vLLM's KVEventsConfig fields, as the `kv_events:` config key holds them."""

    enable_kv_cache_events: bool = True
    publisher: str = "zmq"
    endpoint: str = DEFAULT_ENDPOINT
    replay_endpoint: str | None = None
    buffer_steps: int = DEFAULT_BUFFER_STEPS
    hwm: int = DEFAULT_HWM
    topic: str = ""

    @property
    def publishing(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def for_rank(self, rank: int) -> KVEventsSettings:
        """A tensor-parallel rank's own endpoints: TCP ports offset by the rank (as vLLM offsets them per data-parallel
        rank; port 0 stays 0), ipc paths suffixed, so every rank's worker publishes its parts of the chunks."""
        if rank == 0:
            return self
        return dataclasses.replace(self, endpoint=_offset(self.endpoint, rank), replay_endpoint=_offset(self.replay_endpoint, rank))


def _offset(endpoint: str | None, rank: int) -> str | None:
    if endpoint is None or not endpoint.startswith("tcp://"):
        return None if endpoint is None else f"{endpoint}_rank{rank}"
    base, _, port = endpoint.rpartition(":")
    return endpoint if int(port) == 0 else f"{base}:{int(port) + rank}"


def parse_kv_events(value: dict[str, Any] | None, enable_kv_events: bool = False) -> KVEventsSettings | None:
    """The settings in a `kv_events:` mapping (vLLM's KVEventsConfig field names), or vLLM's defaults for
    LMCache's `enable_kv_events: true`; None when events are off. ConfigError names a bad field."""
    if value is None:
        return KVEventsSettings() if enable_kv_events else None
    known = {name: KVEventsSettings.__dataclass_fields__[name].type for name in KVEventsSettings.__dataclass_fields__}
    settings: dict[str, Any] = {}
    for name, field_value in value.items():
        if name == "max_queue_size":
            continue  # vLLM's in-process queue bound; the worker's queue is bounded by buffer_steps
        if name not in known:
            raise ConfigError(f"kv_events: unknown field {name!r}; known: {', '.join(sorted(known))}", "kv_events")
        settings[name] = field_value
    for name in ("enable_kv_cache_events",):
        if name in settings and not isinstance(settings[name], bool):
            raise ConfigError(f"kv_events.{name} must be true or false", "kv_events")
    for name in ("endpoint", "topic"):
        if name in settings and not isinstance(settings[name], str):
            raise ConfigError(f"kv_events.{name} must be a string", "kv_events")
    if settings.get("replay_endpoint") is not None and not isinstance(settings["replay_endpoint"], str):
        raise ConfigError("kv_events.replay_endpoint must be a string or null", "kv_events")
    for name in ("buffer_steps", "hwm"):
        if name in settings and (isinstance(settings[name], bool) or not isinstance(settings[name], int) or settings[name] <= 0):
            raise ConfigError(f"kv_events.{name} must be a positive integer", "kv_events")
    publisher = settings.get("publisher", "zmq")
    if publisher not in PUBLISHERS:
        raise ConfigError(f"kv_events.publisher must be one of {', '.join(PUBLISHERS)}, got {publisher!r}", "kv_events")
    for name in ("endpoint", "replay_endpoint"):
        endpoint = settings.get(name)
        if endpoint is not None and not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"kv_events.{name} must be a ZMQ address (tcp://, ipc://), got {endpoint!r}", "kv_events")
    parsed = KVEventsSettings(**settings)
    return parsed if parsed.publishing else None


@dataclass(frozen=True, slots=True)
class Lineage:
    """What a chunk's BlockStored event says besides its key: the chunk before it, its tokens, its salt."""

    parent: int | None
    tokens: tuple[int, ...]
    salt: str | None = None

    def as_meta(self) -> dict[str, Any]:
        """The fields a STORE chunk's metadata carries it in (from_meta reads them back)."""
        return {"parent": self.parent, "tokens": list(self.tokens), **({"salt": self.salt} if self.salt is not None else {})}

    @staticmethod
    def from_meta(meta: dict[str, Any]) -> Lineage | None:
        """From a STORE chunk's metadata (a client sends it when the worker publishes events); None without it
        or when it is malformed (events are advisory: a bad one must not fail the store)."""
        tokens, parent, salt = meta.get("tokens"), meta.get("parent"), meta.get("salt")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return None
        if parent is not None and (not isinstance(parent, int) or not 0 <= parent < 2**64):
            return None
        if salt is not None and not isinstance(salt, str):
            return None
        return Lineage(parent, tuple(tokens), salt)


def chain_lineages(spans: Sequence[ChunkSpan], tokens: Sequence[int] | np.ndarray, salt: str | None) -> dict[int, Lineage]:
    """Each chunk of a prompt's lineage: the chunk before it in `spans` and its own tokens."""
    arr = tokens_array(tokens)
    out: dict[int, Lineage] = {}
    parent = None
    for span in spans:
        out[span.key] = Lineage(parent, tuple(arr[span.start : span.end].tolist()), salt)
        parent = span.key
    return out


def block_stored(key: int, lineage: Lineage, block_size: int, location: str, tier: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": [key],
        "parent_block_hash": lineage.parent,
        "token_ids": list(lineage.tokens),
        "block_size": block_size,
        "lora_id": None,
        "medium": MEDIUMS[location],
        "lora_name": None,
    }
    if lineage.salt is not None:
        event["extra_keys"] = [[lineage.salt]]  # vLLM puts a request's cache_salt among a block's extra keys
    return event | _where(location, tier)


def block_removed(keys: list[int], location: str, tier: str | None = None) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": keys, "medium": MEDIUMS[location]} | _where(location, tier)


def all_blocks_cleared() -> dict[str, Any]:
    return {"type": "AllBlocksCleared"}


def _where(location: str, tier: str | None) -> dict[str, Any]:
    if location != REMOTE:
        return {}
    return {"locality": "REMOTE", "ownership": tier} if tier else {"locality": "REMOTE"}


def event_batch(events: list[dict[str, Any]], ts: float | None = None) -> list[Any]:
    """An EventBatch: [ts, events, data_parallel_rank] (an lmcached worker is data-parallel rank 0)."""
    return [time.time() if ts is None else ts, events, 0]
