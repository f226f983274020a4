"""LMCache's controller protocol (LMCache 0.5.6, `lmcache/v1/cache_controller/message.py`), as a worker speaks it:
what vLLM production-stack's `kvaware` router listens to (it embeds LMCache's controller).

Messages are msgspec structs tagged by class name, msgpack-encoded as maps with a "type" field. A worker
- sends `RegisterMsg` on a DEALER socket to the controller's reply URL (`[b"", payload]`) and gets `RegisterRetMsg`
  (its `extra_config` may name a dedicated `heartbeat_url`);
- pushes `BatchedKVOperationMsg` (admits and evictions of one location, each with a sequence number that grows
  by one per location) and `DeRegisterMsg` on a PUSH socket to the controller's pull URL;
- sends `HeartbeatMsg` (DEALER) to the heartbeat URL, or the reply URL when there is none.

LMCache names a chunk by its own hash, not lmcached's: the controller's lookup cuts tokens into 256-token chunks
and chains `hash((previous hash or NONE_HASH, tuple(chunk tokens), ()))` with Python's builtin hash — which for a
tuple of ints is the same in every process (PYTHONHASHSEED salts str and bytes only). NONE_HASH is 0 when vLLM
is not installed beside the controller (a router's image); `lmcache_chunk_hash` computes the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmcached.wire.chunks import ChunkSpan

#: LMCache's NONE_HASH without vLLM in its environment: the hash chain's start.
NONE_HASH = 0
#: The chunk size LMCache's controller cuts tokens at for its lookup (its ChunkedTokenDatabase's default).
LMCACHE_CHUNK_SIZE = 256


def lmcache_chunk_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """LMCache's key for a chunk of `tokens` after the chunk keyed `parent` (None: the prompt's first)."""
    return hash((NONE_HASH if parent is None else parent, tuple(tokens), ()))


def lmcache_spans(tokens: Sequence[int]) -> list[ChunkSpan]:
    """A prompt's chunks as LMCache's controller keys them (256 tokens, the last one partial)."""
    spans: list[ChunkSpan] = []
    parent: int | None = None
    tokens = list(tokens)
    for start in range(0, len(tokens), LMCACHE_CHUNK_SIZE):
        end = min(start + LMCACHE_CHUNK_SIZE, len(tokens))
        parent = lmcache_chunk_hash(parent, tokens[start:end])
        spans.append(ChunkSpan(parent, start, end))
    return spans


def register_msg(instance_id: str, worker_id: int, ip: str, port: int) -> dict[str, Any]:
    return {"type": "RegisterMsg", "instance_id": instance_id, "worker_id": worker_id, "ip": ip, "port": port, "peer_init_url": None}


def heartbeat_msg(instance_id: str, worker_id: int, ip: str, port: int) -> dict[str, Any]:
    return {"type": "HeartbeatMsg", "instance_id": instance_id, "worker_id": worker_id, "ip": ip, "port": port, "peer_init_url": None}


def deregister_msg(instance_id: str, worker_id: int, ip: str, port: int) -> dict[str, Any]:
    return {"type": "DeRegisterMsg", "instance_id": instance_id, "worker_id": worker_id, "ip": ip, "port": port}


def batched_kv_operations(instance_id: str, worker_id: int, location: str, operations: list[tuple[str, int, int]]) -> dict[str, Any]:
    """(op, key, seq) with op "admit" or "evict": one location's changes, in order."""
    return {
        "type": "BatchedKVOperationMsg",
        "instance_id": instance_id,
        "worker_id": worker_id,
        "location": location,
        "operations": [{"op_type": op, "key": key, "seq_num": seq} for op, key, seq in operations],
    }


def control_reply(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to a controller's control message (it dials the port a worker registered): healthy to a
    health check; to anything else an ErrorMsg saying that lmcached's own controller does that."""
    if request.get("type") == "HealthWorkerMsg":
        return {"type": "HealthWorkerRetMsg", "error_code": 0}
    what = str(request.get("type", "message")).removesuffix("WorkerMsg").lower() or "message"
    return {"type": "ErrorMsg", "error": f"an lmcached worker takes {what} from lmcached's controller (HTTP API, port 9000), not this one"}


def zmq_address(url: str) -> str:
    """LMCache writes its controller URLs as HOST:PORT; ZMQ wants tcp://HOST:PORT."""
    return url if "://" in url else f"tcp://{url}"
