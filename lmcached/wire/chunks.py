"""Tokens to chunks: the one function that computes chunk keys, used by client, worker and controller alike."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmcached.errors import InvalidRequest

KEY_BYTES = 8
#: The chain starts from this value, so chunk 0's key depends on nothing but its own tokens.
ROOT_KEY = bytes(KEY_BYTES)
MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence: its key and the token range [start, end) it covers."""

    key: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def tokens_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate token ids and pack them as little-endian uint32, the form the hash reads."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.dtype("<u4"):
        return tokens  # already checked and packed
    if isinstance(tokens, list):
        # A C-speed type check (bool is an int subclass; type() excludes it), then fromiter, ~2x faster than
        # asarray on Python ints: a 4k-token /lookup spends most of its time here.
        if not set(map(type, tokens)) <= {int}:
            raise InvalidRequest("tokens must be a list of integers", "tokens", 422)
    try:
        arr = np.fromiter(tokens, dtype=np.int64, count=len(tokens)) if isinstance(tokens, list) else np.asarray(tokens)
    except (ValueError, TypeError, OverflowError):
        raise InvalidRequest("tokens must be a list of integers", "tokens", 422) from None
    if arr.ndim != 1:
        raise InvalidRequest("tokens must be a flat list of integers", "tokens", 422)
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise InvalidRequest("tokens must be a list of integers", "tokens", 422)
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        raise InvalidRequest(f"token ids must lie in 0..{MAX_TOKEN_ID}", "tokens", 422)
    return arr.astype("<u4", copy=False)


def root_key(salt: str | None) -> bytes:
    """Where a key chain starts: ROOT_KEY, or a tenant's own start when a request carries a cache salt
    (vLLM's `cache_salt`), so prompts with different salts never share a chunk (LMCache issue 4825)."""
    if not salt:
        return ROOT_KEY
    return hashlib.blake2b(b"lmcached-cache-salt\0" + salt.encode(), digest_size=KEY_BYTES).digest()


def chunk_spans(
    tokens: Sequence[int] | np.ndarray, chunk_size: int, save_unfull_chunk: bool = True, salt: str | None = None
) -> list[ChunkSpan]:
    """Cut tokens into chunks and key each one by a chained hash: h_i = blake2b(h_{i-1} || tokens of chunk i).

    The hash is blake2b with an 8-byte digest, stable across processes and machines (Python's hash() is
    salted per process, which broke LMCache's lookups across workers). The last, partial chunk is kept
    unless `save_unfull_chunk` is off. A `salt` starts the chain elsewhere (see root_key).
    """
    arr = tokens_array(tokens)
    spans: list[ChunkSpan] = []
    previous = root_key(salt)
    n = len(arr)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if end - start < chunk_size and not save_unfull_chunk:
            break
        digest = hashlib.blake2b(previous, digest_size=KEY_BYTES)
        digest.update(arr[start:end].tobytes())
        previous = digest.digest()
        spans.append(ChunkSpan(int.from_bytes(previous, "little"), start, end))
    return spans


def continuation_spans(
    tokens: Sequence[int] | np.ndarray, held: list[ChunkSpan], chunk_size: int, salt: str | None = None
) -> list[ChunkSpan]:
    """The keys under which a shorter prompt's last, partial chunk would be stored if `tokens` continues it past
    the whole chunks `held` (the first spans of chunk_spans(tokens)): one span per length from the longest to
    the shortest, each short of a whole chunk and of `tokens`' end (those keys the prompt's own spans have).

    A chat's next round is its previous prompt plus an answer and a question: the previous prompt's whole
    chunks match as usual, and its partial last chunk (stored with save_unfull_chunk) under one of these keys.
    The chain's hash is extended a token at a time, so all of them cost about one chunk's hashing."""
    arr = tokens_array(tokens)
    start = held[-1].end if held else 0
    longest = min(chunk_size - 1, len(arr) - start - 1)
    if longest < 1:
        return []
    digest = hashlib.blake2b(held[-1].key.to_bytes(KEY_BYTES, "little") if held else root_key(salt), digest_size=KEY_BYTES)
    spans = []
    for end in range(start + 1, start + longest + 1):
        digest.update(arr[end - 1 : end].tobytes())
        spans.append(ChunkSpan(int.from_bytes(digest.digest(), "little"), start, end))
    return spans[::-1]


@dataclass(frozen=True, slots=True)
class Shard:
    """One tensor-parallel rank's part of every chunk (its own KV heads), stored under keys of its own.

    Each rank of a TP engine saves and loads only its heads, so a chunk is `world` pieces with `world` keys:
    a shared store (one worker, the Redis tier) can hold them side by side, and a prefix counts as cached only
    where every rank's piece is there. The keys come from the chunk's key, so anyone with the tokens and the
    world size (the controller, a router) derives every rank's keys. A world of 1 keeps the chunk's own key."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise InvalidRequest(f"tensor-parallel rank {self.rank} of {self.world} is not a rank of that world")

    def key(self, key: int) -> int:
        if self.world == 1:
            return key
        digest = hashlib.blake2b(key.to_bytes(KEY_BYTES, "little"), digest_size=KEY_BYTES, person=b"lmcached-shard")
        digest.update(self.rank.to_bytes(4, "little") + self.world.to_bytes(4, "little"))
        return int.from_bytes(digest.digest(), "little")

    def spans(self, spans: list[ChunkSpan]) -> list[ChunkSpan]:
        """The same token ranges under this rank's keys."""
        if self.world == 1:
            return spans
        return [ChunkSpan(self.key(s.key), s.start, s.end) for s in spans]


#: A lone model runner: the whole chunk, under the chunk's own key.
WHOLE = Shard()


def shards(world: int) -> list[Shard]:
    """Every rank of a tensor-parallel world."""
    return [Shard(rank, world) for rank in range(world)]


def key_hex(key: int) -> str:
    """A chunk key as 16 hex digits, the way logs and the TUI show it."""
    return f"{key:016x}"
