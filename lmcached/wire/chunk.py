"""A chunk as every part of lmcached sees it: the KV of one run of tokens (raw or compressed) with the metadata
that travels with it, what the controller's index knows of a chunk at a location, and the locations' names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmcached.errors import InvalidRequest

#: Bytes per element of each KV dtype a chunk may hold (torch-free: the controller side reads chunks' sizes too;
#: lmcached.wire.tensors maps the same names to torch dtypes).
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
CPU: str = "LocalCPUBackend"
DISK: str = "LocalDiskBackend"
REMOTE: str = "RemoteBackend"  # the shared Redis tier (lmcached.worker.remote)
LOCATIONS = (CPU, DISK, REMOTE)


#: What a backend keeps of a chunk in its index: (num_tokens, nbytes, method, raw_nbytes, lossy).
MetaEntry = tuple[int, int, "str | None", int, "str | None"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk's KV, raw or compressed. Immutable: a compress swaps in a new Chunk, readers keep theirs."""

    key: int
    num_tokens: int
    shape: tuple[int, ...]  # [2, L, T, C] of the raw tensor
    dtype: str  # a key of ITEMSIZE: "float16", "bfloat16", "float32", or vLLM's fp8 "float8_e4m3fn", "float8_e5m2"
    # Raw tensor bytes (C order) or a codec blob; in RAM, a numpy uint8 view of the arena. Never mutated once stored.
    data: bytes | bytearray | memoryview | np.ndarray
    method: str | None = None  # None: raw; else the codec name that made `data`
    # The lossy codecs these values have been through, oldest first ("cachegen", "cachegen+kvtc"); None for the
    # engine's own values. Kept when a chunk is decompressed: decompressing gives raw KV of the compressed values,
    # not the original, so a decompressed lossy chunk still says what it lost.
    lossy: str | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def entry(self) -> MetaEntry:
        """What a backend keeps of the chunk in its index (no data)."""
        return (self.num_tokens, self.nbytes, self.method, self.raw_nbytes, self.lossy)

    @property
    def raw_nbytes(self) -> int:
        """The size of the raw tensor, whatever form the chunk is stored in."""
        return math.prod(self.shape) * ITEMSIZE.get(self.dtype, 2)

    def meta(self) -> dict[str, Any]:
        meta = {
            "key": self.key,
            "num_tokens": self.num_tokens,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "method": self.method,
            "nbytes": self.nbytes,
        }
        if self.lossy is not None:  # only then: a chunk of original values reads as before on any version
            meta["lossy"] = self.lossy
        return meta

    @staticmethod
    def entry_from_meta(meta: dict[str, Any]) -> MetaEntry:
        """The index entry of a chunk known by its metadata alone (a file's or a Redis value's header)."""
        chunk = Chunk.from_meta(meta, b"")
        return (chunk.num_tokens, int(meta["nbytes"]), chunk.method, chunk.raw_nbytes, chunk.lossy)

    @staticmethod
    def from_meta(meta: dict[str, Any], data: bytes) -> Chunk:
        return Chunk(
            key=int(meta["key"]),
            num_tokens=int(meta["num_tokens"]),
            shape=tuple(int(d) for d in meta["shape"]),
            dtype=str(meta["dtype"]),
            data=data,
            method=meta.get("method"),
            lossy=meta.get("lossy"),
        )


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """What the controller's index knows of a chunk at one location (no data)."""

    key: int
    num_tokens: int
    nbytes: int
    method: str | None
    pinned: bool
    raw_nbytes: int
    lossy: str | None = None  # the lossy codecs its values have been through (Chunk.lossy)

    def as_wire(self) -> list[Any]:
        return [self.key, self.num_tokens, self.nbytes, self.method, self.pinned, self.raw_nbytes, self.lossy]


def check_location(location: Any) -> str:
    """Validate a location name from a request."""
    if not isinstance(location, str):
        raise InvalidRequest("location must be a string", "location", 422)
    if location not in LOCATIONS:
        raise InvalidRequest(f"unknown location {location!r}; known: {', '.join(LOCATIONS)}", "location")
    return location
