"""The blob container every lmcached codec writes: self-describing, versioned, checksummed, no pickle.

    magic "LMCB" | format version u16 | codec id u8 | dtype u8 | ndim u8 | shape u32 * ndim
    | params length u32 | params (JSON object) | section count u32 | section lengths u64 * count
    | sections ... | CRC-32 of everything before it, u32

All little-endian. A decoder reads only what the header declares and checks every length against the
blob's size before slicing, so a truncated, corrupted or foreign blob becomes a CodecError, never a crash.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from lmcached.errors import CodecError

MAGIC: Final = b"LMCB"
FORMAT_VERSION: Final = 1
CODEC_IDS: Final = {"cachegen": 1, "lossless": 2, "kvtc": 3}
CODEC_NAMES: Final = {v: k for k, v in CODEC_IDS.items()}
DTYPE_CODES: Final = {"float16": 1, "bfloat16": 2, "float32": 3}
DTYPE_NAMES: Final = {v: k for k, v in DTYPE_CODES.items()}
_HEAD = struct.Struct("<4sHBBB")
_MAX_SECTIONS = 64
_MAX_PARAMS = 1 << 16


@dataclass
class Blob:
    codec: str
    dtype: str
    shape: tuple[int, ...]
    params: dict[str, Any]
    sections: list[memoryview]


def pack(codec: str, dtype: str, shape: tuple[int, ...], params: dict[str, Any], sections: list[Any]) -> bytes:
    params_bytes = json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    # (An empty section — no exact tokens, say — has a zero in its shape, which memoryview cannot cast.)
    views = [memoryview(s).cast("B") if memoryview(s).nbytes else memoryview(b"") for s in sections]
    head = b"".join(
        [
            _HEAD.pack(MAGIC, FORMAT_VERSION, CODEC_IDS[codec], DTYPE_CODES[dtype], len(shape)),
            struct.pack(f"<{len(shape)}I", *shape),
            struct.pack("<I", len(params_bytes)),
            params_bytes,
            struct.pack("<I", len(views)),
            struct.pack(f"<{len(views)}Q", *(v.nbytes for v in views)),
        ]
    )
    body = bytearray(head)
    crc = zlib.crc32(head)
    for view in views:
        body += view
        crc = zlib.crc32(view, crc)
    body += struct.pack("<I", crc)
    return bytes(body)


def unpack(blob: bytes | bytearray | memoryview, expect_codec: str | None = None) -> Blob:
    """Parse and verify a blob. Raises CodecError saying what is wrong."""
    data = memoryview(blob).cast("B")
    size = data.nbytes
    if size < _HEAD.size + 4:
        raise CodecError(f"blob of {size} bytes is too short to be an lmcached codec blob")
    magic, version, codec_id, dtype_code, ndim = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not an lmcached codec blob (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(f"blob format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if codec_id not in CODEC_NAMES:
        raise CodecError(f"blob names unknown codec id {codec_id}")
    codec = CODEC_NAMES[codec_id]
    if expect_codec is not None and codec != expect_codec:
        raise CodecError(f"blob was written by codec {codec!r}, not {expect_codec!r}")
    if dtype_code not in DTYPE_NAMES:
        raise CodecError(f"blob names unknown dtype code {dtype_code}")
    crc_stored = struct.unpack_from("<I", data, size - 4)[0]
    if zlib.crc32(data[: size - 4]) != crc_stored:
        raise CodecError("blob checksum mismatch: the blob is truncated or corrupted")
    pos = _HEAD.size

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        need = struct.calcsize(fmt)
        if pos + need > size - 4:
            raise CodecError("blob header is truncated")
        values = struct.unpack_from(fmt, data, pos)
        pos += need
        return values

    if ndim > 8:
        raise CodecError(f"blob declares {ndim} dimensions")
    shape = take(f"<{ndim}I")
    (params_len,) = take("<I")
    if params_len > _MAX_PARAMS or pos + params_len > size - 4:
        raise CodecError("blob parameters are truncated")
    try:
        params = json.loads(bytes(data[pos : pos + params_len]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CodecError("blob parameters are not valid JSON") from None
    if not isinstance(params, dict):
        raise CodecError("blob parameters must be an object")
    pos += params_len
    (count,) = take("<I")
    if count > _MAX_SECTIONS:
        raise CodecError(f"blob declares {count} sections")
    lengths = take(f"<{count}Q")
    sections = []
    for length in lengths:
        if pos + length > size - 4:
            raise CodecError("blob section runs past the end of the blob")
        sections.append(data[pos : pos + length])
        pos += length
    if pos != size - 4:
        raise CodecError("blob has trailing bytes after its sections")
    return Blob(codec, DTYPE_NAMES[dtype_code], tuple(shape), params, sections)
