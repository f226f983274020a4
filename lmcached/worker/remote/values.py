"""The remote tier's value format: one Redis string per chunk, a small header and the payload.

    b"LMCR" | version u8 | meta length u32 | meta (JSON: key, num_tokens, shape, dtype, method, nbytes)
           | CRC-32 of meta + payload (u32) | payload

and the SET that writes one as pieces (the payload from the chunk's own buffer, never joined)."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import orjson

from lmcached.wire.chunk import Chunk, MetaEntry
from lmcached.worker.remote.errors import CorruptRemoteValue

_MAGIC = b"LMCR"
_VERSION = 1
_HEAD = struct.Struct("<4sBI")
_CHECKSUM = struct.Struct("<I")
#: Enough of a value to read its header (meta is ~150 bytes) without fetching the payload.
HEADER_PEEK = 1024


def _checksum(meta: bytes | memoryview, payload: bytes | bytearray | memoryview) -> bytes:
    return _CHECKSUM.pack(zlib.crc32(payload, zlib.crc32(meta)))


def pack_value(chunk: Chunk) -> bytes:
    meta = orjson.dumps(chunk.meta())
    return b"".join((_HEAD.pack(_MAGIC, _VERSION, len(meta)), meta, _checksum(meta, chunk.data), chunk.data))


def value_parts(chunk: Chunk) -> tuple[bytes, bytes | bytearray | memoryview]:
    """pack_value as (header, payload) without joining them: the payload is sent from the chunk's own buffer."""
    meta = orjson.dumps(chunk.meta())
    return _HEAD.pack(_MAGIC, _VERSION, len(meta)) + meta + _checksum(meta, chunk.data), chunk.data


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def set_command(rkey: str, header: bytes, payload: bytes | bytearray | memoryview, ttl: int | None) -> list[Any]:
    """SET rkey <header + payload> [EX ttl] framed in RESP as pieces to write one after another (no join)."""
    extra = [b"EX", str(ttl).encode()] if ttl else []
    return [
        b"*%d\r\n$3\r\nSET\r\n%s$%d\r\n" % (3 + len(extra), _bulk(rkey.encode()), len(header) + len(payload)),
        header,
        payload,
        b"\r\n" + b"".join(map(_bulk, extra)),
    ]


def _header_len(value: bytes) -> tuple[int, int]:
    """(end of meta, end of header) of a packed value; CorruptRemoteValue if it is not one."""
    if len(value) < _HEAD.size:
        raise CorruptRemoteValue("truncated header")
    magic, version, meta_len = _HEAD.unpack_from(value)
    if magic != _MAGIC:
        raise CorruptRemoteValue("not an lmcached value")
    if version != _VERSION:
        raise CorruptRemoteValue(f"value format version {version}, this lmcached reads {_VERSION}")
    meta_end = _HEAD.size + meta_len
    return meta_end, meta_end + _CHECKSUM.size


def unpack_or_error(value: bytes | None, key: int) -> Chunk | CorruptRemoteValue | None:
    if value is None:
        return None
    try:
        return unpack_value(value, key)
    except CorruptRemoteValue as exc:
        return exc


def entry_from_head(head: bytes) -> MetaEntry | None:
    """A chunk's index entry (Chunk.entry) from the first bytes of its value (no payload, no checksum check: a
    reader checks that); None for something that is not a whole lmcached header."""
    try:
        meta_end, header_end = _header_len(head)
        if len(head) < header_end:
            return None
        return Chunk.entry_from_meta(orjson.loads(head[_HEAD.size : meta_end]))
    except (CorruptRemoteValue, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def unpack_value(value: bytes, expected_key: int) -> Chunk:
    meta_end, header_end = _header_len(value)
    if header_end > len(value):
        raise CorruptRemoteValue("truncated")
    view = memoryview(value)
    if _checksum(view[_HEAD.size : meta_end], view[header_end:]) != value[meta_end:header_end]:
        raise CorruptRemoteValue("checksum mismatch")
    try:
        meta = orjson.loads(view[_HEAD.size : meta_end])
        chunk = Chunk.from_meta(meta, view[header_end:])  # a view of the reply: no second copy of the payload
        if chunk.nbytes != int(meta["nbytes"]):
            raise CorruptRemoteValue(f"payload of {chunk.nbytes} bytes, the header says {meta['nbytes']}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptRemoteValue(f"bad metadata ({exc})") from None
    if chunk.key != expected_key:
        raise CorruptRemoteValue(f"value holds chunk {chunk.key:016x}")
    return chunk
