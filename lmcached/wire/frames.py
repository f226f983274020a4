"""Wire frames: a fixed binary header, an orjson header object, then raw payload bytes.

    magic  version  kind  header_len  payload_len
    4s     u8       u8    u32         u64          (little-endian, 18 bytes)

Sizes are checked against the reader's limits before anything past the fixed header is read, so a peer
cannot make us allocate what it merely declares.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson

from lmcached.errors import FrameTooLarge, ProtocolError
from lmcached.wire.sockio import within

MAGIC: Final = b"LMKV"
VERSION: Final = 1
PREFIX: Final = struct.Struct("<4sBBIQ")
PREFIX_BYTES: Final = PREFIX.size
MAX_HEADER_BYTES: Final = 16 * 1024 * 1024
#: Control connections (port 9001) carry reports and commands, never KV.
MAX_CONTROL_PAYLOAD_BYTES: Final = 64 * 1024 * 1024
#: Data-plane frames carry KV; one store of a long prompt can be large.
MAX_DATA_PAYLOAD_BYTES: Final = 8 * 1024**3
#: Once a frame has begun, each further part of it must arrive within this many seconds.
FRAME_TIMEOUT_S: Final = 5.0
#: A new connection must say hello within this many seconds.
HELLO_TIMEOUT_S: Final = 10.0


class ByteReader(Protocol):
    """What frame reading needs: asyncio.StreamReader and the data plane's SocketStream both fit."""

    async def readexactly(self, n: int) -> bytes | bytearray: ...


class Kind(enum.IntEnum):
    """What a frame is; the header object carries its fields."""

    HELLO = 1  # first frame of any connection: role, ids, token
    WELCOME = 2  # the answer to a hello
    ERROR = 3  # a refusal or failure, with "detail"; after a protocol error the sender closes
    HEARTBEAT = 4
    REPORT = 5  # a worker's batch of admitted/evicted chunks (or a full resync)
    COMMAND = 6  # controller -> worker, with "req_id", "op", "timeout"
    REPLY = 7  # the answer to a COMMAND or a data-plane request, same "req_id"
    STORE = 8  # data plane: chunks in the payload
    RETRIEVE = 9  # data plane: ask for a prefix's chunks
    LOOKUP = 10  # data plane: ask for a prefix's length
    SNAPSHOT = 11  # controller -> monitor: the whole state
    EVENT = 12  # controller -> monitor: one thing that happened
    GOODBYE = 13  # worker -> controller: leaving on purpose (a clean shutdown, not a loss)
    # Same-host shared memory on the data plane (lmcached.worker.dataplane_shm): KV moves through the worker's arena.
    SHM_STORE = 14  # client -> worker: chunk metadata; the reply gives arena offsets to write them at
    SHM_COMMIT = 15  # client -> worker: those chunks are written, store them (until then nothing is visible)
    SHM_RETRIEVE = 16  # client -> worker: keys; the reply gives the cached prefix's arena offsets, leased
    SHM_RELEASE = 17  # client -> worker: done reading a lease (no reply)
    # kvtc codebooks on the data plane (lmcached.worker.codebooks): sent ahead of the blobs that need them.
    CODEBOOK = 18  # client -> worker: "digest" alone asks whether it has it; with the codebook as payload, keep it
    # worker -> controller while a COMMAND runs, every "progress_every" seconds the command asked for: "req_id",
    # chunks "done" of "total". The controller's deadline for the command restarts at each one.
    PROGRESS = 19


@dataclass(slots=True)
class Frame:
    """One decoded frame."""

    kind: Kind
    header: dict[str, Any]
    payload: bytes | bytearray | memoryview = field(default=b"")


def encode_prefix(kind: Kind, header_len: int, payload_len: int) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, int(kind), header_len, payload_len)


def encode_frame(kind: Kind, header: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
    """A whole frame as one bytes object (for small frames; big payloads go through `frame_parts`)."""
    head = orjson.dumps(header or {})
    return encode_prefix(kind, len(head), len(payload)) + head + payload


def encode_head(kind: Kind, header: dict[str, Any], payload_len: int) -> bytes:
    """A frame's fixed header and header object, for a payload of `payload_len` bytes sent after it."""
    head = orjson.dumps(header)
    return encode_prefix(kind, len(head), payload_len) + head


def frame_parts(kind: Kind, header: dict[str, Any], payloads: list[Any]) -> list[Any]:
    """A frame as a list of buffers for `writer.writelines`, so KV payloads are never joined in memory."""
    return [encode_head(kind, header, sum(memoryview(p).nbytes for p in payloads)), *payloads]


def decode_prefix(prefix: bytes, max_payload: int) -> tuple[Kind, int, int]:
    """Check a fixed header and return (kind, header length, payload length)."""
    magic, version, kind, header_len, payload_len = PREFIX.unpack(prefix)
    if magic == b"HTTP":  # a worker or client pointed at an HTTP port (the controller's API, an engine)
        raise ProtocolError("the peer answered in HTTP: that is an HTTP port (the controller's API is 9000 by default), not lmcached's worker (9001) or data port (8001)")
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not an lmcached peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    try:
        frame_kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {kind}") from None
    if header_len > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"frame header of {header_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise FrameTooLarge(f"frame payload of {payload_len} bytes exceeds the limit of {max_payload}")
    return frame_kind, header_len, payload_len


async def read_frame_head(reader: ByteReader, max_payload: int = MAX_CONTROL_PAYLOAD_BYTES) -> tuple[Kind, dict[str, Any], int] | None:
    """Read a frame's fixed header and header object, leaving the payload in the stream.

    A connection may idle between frames for as long as it likes, but once a frame has started, the rest
    of its head must follow within FRAME_TIMEOUT_S: a peer that sends half a frame and goes silent would
    otherwise hold its connection (and its buffers) forever.

    Returns (kind, header, payload length), or None on a clean end of stream before a frame starts.
    Raises ProtocolError for bad magic, version or kind, an oversize length, a header that is not a JSON
    object, a stream that ends inside a frame, or a frame that stalls.
    """
    try:
        first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None
    try:
        prefix = first + await _within(reader.readexactly(PREFIX_BYTES - 1), FRAME_TIMEOUT_S)
        kind, header_len, payload_len = decode_prefix(bytes(prefix), max_payload)
        head = await _within(reader.readexactly(header_len), FRAME_TIMEOUT_S) if header_len else b"{}"
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame header") from None
    return kind, decode_header(head), payload_len


async def _within(read: Any, seconds: float) -> Any:
    try:
        return await within(read, seconds)
    except asyncio.TimeoutError:
        raise ProtocolError(f"frame stalled: nothing more arrived for {seconds:.0f}s") from None


def payload_timeout(size: int) -> float:
    """Time allowed for a payload: FRAME_TIMEOUT_S plus the size at a slow link's 50 MB/s."""
    return FRAME_TIMEOUT_S + size / 50e6


def decode_header(head: bytes) -> dict[str, Any]:
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    return header


async def read_payload(reader: ByteReader, size: int) -> bytes | bytearray:
    try:
        return await _within(reader.readexactly(size), payload_timeout(size)) if size else b""
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame payload") from None


async def read_payload_into(reader: ByteReader, view: memoryview) -> None:
    """read_payload into a buffer the caller owns (an arena block), within the same time limit."""
    try:
        if view.nbytes:
            await _within(reader.readinto(view), payload_timeout(view.nbytes))  # type: ignore[attr-defined]
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame payload") from None


async def read_frame(reader: ByteReader, max_payload: int = MAX_CONTROL_PAYLOAD_BYTES) -> Frame | None:
    """Read one whole frame; None on a clean end of stream before a frame starts (see read_frame_head)."""
    head = await read_frame_head(reader, max_payload)
    if head is None:
        return None
    kind, header, payload_len = head
    return Frame(kind, header, await read_payload(reader, payload_len))


async def write_frame(
    writer: asyncio.StreamWriter, kind: Kind, header: dict[str, Any] | None = None, payloads: list[Any] | None = None
) -> None:
    """Write one frame and wait for the transport to drain."""
    writer.writelines(frame_parts(kind, header or {}, payloads or []))
    await writer.drain()
