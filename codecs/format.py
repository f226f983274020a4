"""The blob container every lmcached codec writes: self-describing, versioned, checksummed, no pickle.

    magic "LMCB" | format version u16 | codec id u8 | dtype u8 | ndim u8 | shape u32 * ndim
    | params length u32 | params (JSON object) | section count u32 | section lengths u64 * count
    | sections ... | checksum of everything before it

The checksum is what changed between the versions: format 1 ends with zlib's CRC-32 (u32), format 2 with
`checksum.checksum64` (u64), which writes and verifies 4-10× faster (see codecs/checksum.py). Blobs are
written as format 2; format 1 blobs still decode. All little-endian. A decoder reads only what the header
declares and checks every length against the blob's size before slicing, so a truncated, corrupted or foreign
blob becomes a CodecError, never a crash.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from lmcached.errors import CodecError

from .checksum import checksum64
from .scratch import scratch

MAGIC: Final = b"LMCB"
#: The version this build writes; it reads every version in TRAILERS.
FORMAT_VERSION: Final = 2
#: Per format version, the trailing checksum: its layout, and how it is computed over everything before it.
TRAILERS: Final[dict[int, tuple[struct.Struct, Callable[[Any], int]]]] = {
    1: (struct.Struct("<I"), zlib.crc32),
    2: (struct.Struct("<Q"), checksum64),
}
CODEC_IDS: Final = {"cachegen": 1, "lossless": 2, "kvtc": 3}
CODEC_NAMES: Final = {v: k for k, v in CODEC_IDS.items()}
DTYPE_CODES: Final = {"float16": 1, "bfloat16": 2, "float32": 3, "float8_e4m3fn": 4, "float8_e5m2": 5}
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
    # Assembled in this thread's scratch buffer, hashed there, then copied out once: joining the body and then
    # appending the trailer made two fresh blob-sized objects, each faulting its pages in (1.0 ms a SmolLM2
    # chunk, against ~0.5 ms this way).
    trailer, checksum = TRAILERS[FORMAT_VERSION]
    size = len(head) + sum(v.nbytes for v in views)
    buf = scratch("format.blob", (size + trailer.size,), np.uint8)
    buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    pos = len(head)
    for view in views:
        buf[pos : pos + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
        pos += view.nbytes
    trailer.pack_into(buf, size, checksum(buf[:size]))
    return buf.tobytes()


def codec_of(blob: bytes | bytearray | memoryview) -> str:
    """The codec a blob names, from its header alone (no checksum): to pick the decoder, which verifies it."""
    data = memoryview(blob).cast("B")
    if data.nbytes < _HEAD.size:
        raise CodecError(f"blob of {data.nbytes} bytes is too short to be an lmcached codec blob")
    magic, _version, codec_id, _dtype, _ndim = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not an lmcached codec blob (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if codec_id not in CODEC_NAMES:
        raise CodecError(f"blob names unknown codec id {codec_id}")
    return CODEC_NAMES[codec_id]


def unpack(blob: bytes | bytearray | memoryview, expect_codec: str | None = None) -> Blob:
    """Parse and verify a blob. Raises CodecError saying what is wrong."""
    data = memoryview(blob).cast("B")
    size = data.nbytes
    if size < _HEAD.size + 4:
        raise CodecError(f"blob of {size} bytes is too short to be an lmcached codec blob")
    magic, version, codec_id, dtype_code, ndim = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not an lmcached codec blob (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version not in TRAILERS:
        readable = ", ".join(map(str, TRAILERS))
        raise CodecError(f"blob format version {version} is not supported (this build reads versions {readable})")
    if codec_id not in CODEC_NAMES:
        raise CodecError(f"blob names unknown codec id {codec_id}")
    codec = CODEC_NAMES[codec_id]
    if expect_codec is not None and codec != expect_codec:
        raise CodecError(f"blob was written by codec {codec!r}, not {expect_codec!r}")
    if dtype_code not in DTYPE_NAMES:
        raise CodecError(f"blob names unknown dtype code {dtype_code}")
    trailer, checksum = TRAILERS[version]
    end = size - trailer.size  # where the sections must end
    if end < _HEAD.size or checksum(data[:end]) != trailer.unpack_from(data, end)[0]:
        raise CodecError("blob checksum mismatch: the blob is truncated or corrupted")
    pos = _HEAD.size

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        need = struct.calcsize(fmt)
        if pos + need > end:
            raise CodecError("blob header is truncated")
        values = struct.unpack_from(fmt, data, pos)
        pos += need
        return values

    if ndim > 8:
        raise CodecError(f"blob declares {ndim} dimensions")
    shape = take(f"<{ndim}I")
    (params_len,) = take("<I")
    if params_len > _MAX_PARAMS or pos + params_len > end:
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
        if pos + length > end:
            raise CodecError("blob section runs past the end of the blob")
        sections.append(data[pos : pos + length])
        pos += length
    if pos != end:
        raise CodecError("blob has trailing bytes after its sections")
    return Blob(codec, DTYPE_NAMES[dtype_code], tuple(shape), params, sections)
