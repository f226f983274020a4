"""The data-plane wire format shared by the worker and its clients: store / retrieve / lookup messages."""

from __future__ import annotations

from typing import Any, Final

from lmcached.errors import ProtocolError

#: Data-plane connections start with a hello of this role.
CLIENT_ROLE: Final = "client"


def chunk_headers(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-chunk metadata of a STORE or a retrieve REPLY, checked enough to slice the payload safely."""
    chunks = header.get("chunks")
    if not isinstance(chunks, list):
        raise ProtocolError("frame needs a 'chunks' list")
    for meta in chunks:
        if not isinstance(meta, dict):
            raise ProtocolError("each chunk must be an object")
        for field in ("key", "num_tokens", "nbytes"):
            if not isinstance(meta.get(field), int) or meta[field] < 0:
                raise ProtocolError(f"chunk field {field!r} must be a non-negative integer")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError("chunk field 'shape' must be four non-negative integers")
        if not isinstance(meta.get("dtype"), str):
            raise ProtocolError("chunk field 'dtype' must be a string")
        if meta.get("method") is not None and not isinstance(meta["method"], str):
            raise ProtocolError("chunk field 'method' must be a string or null")
    return chunks


def check_keys(header: dict[str, Any], field: str = "keys") -> list[int]:
    keys = header.get(field)
    if not isinstance(keys, list) or not all(isinstance(k, int) and 0 <= k < 2**64 for k in keys):
        raise ProtocolError(f"frame needs {field!r}, a list of 64-bit chunk keys")
    return keys
