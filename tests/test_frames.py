from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcached.errors import FrameTooLarge, ProtocolError
from lmcached.wire.frames import MAGIC, PREFIX, VERSION, Kind, encode_frame, read_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@given(st.sampled_from(list(Kind)), st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.binary(max_size=2000))
def test_frame_round_trip(kind: Kind, header: dict[str, object], payload: bytes) -> None:
    async def go() -> None:
        frame = await read_frame(reader_of(encode_frame(kind, header, payload)))
        assert frame is not None
        assert (frame.kind, frame.header, bytes(frame.payload)) == (kind, header, payload)

    asyncio.run(go())


async def test_clean_eof_is_none() -> None:
    assert await read_frame(reader_of(b"")) is None


async def test_read_frame_rejects_bad_magic() -> None:
    with pytest.raises(ProtocolError, match="bad magic"):
        await read_frame(reader_of(b"GET / HTTP/1.1\r\n\r\n"))


async def test_an_http_answer_names_the_port_mix_up() -> None:
    # A worker pointed at the controller's HTTP port gets aiohttp's 400 back: say which port is which.
    with pytest.raises(ProtocolError, match=r"answered in HTTP: that is an HTTP port .* not lmcached's worker \(9001\)"):
        await read_frame(reader_of(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))


async def test_read_frame_rejects_other_version() -> None:
    with pytest.raises(ProtocolError, match="version 9"):
        await read_frame(reader_of(PREFIX.pack(MAGIC, 9, 1, 2, 0) + b"{}"))


async def test_read_frame_rejects_oversize_length_before_reading_it() -> None:
    data = PREFIX.pack(MAGIC, VERSION, int(Kind.STORE), 2, 2**40) + b"{}"
    with pytest.raises(FrameTooLarge, match=str(2**40)):
        await read_frame(reader_of(data), max_payload=1024)


async def test_read_frame_rejects_truncated_frame() -> None:
    with pytest.raises(ProtocolError, match="closed inside"):
        await read_frame(reader_of(encode_frame(Kind.HELLO, {"a": 1}, b"xyz")[:-1]))


async def test_read_frame_rejects_non_object_header() -> None:
    head = b"[1,2]"
    with pytest.raises(ProtocolError, match="JSON object"):
        await read_frame(reader_of(PREFIX.pack(MAGIC, VERSION, 1, len(head), 0) + head))


async def test_read_frame_rejects_unknown_kind() -> None:
    with pytest.raises(ProtocolError, match="unknown frame kind"):
        await read_frame(reader_of(PREFIX.pack(MAGIC, VERSION, 200, 2, 0) + b"{}"))


def test_prefix_layout_is_fixed() -> None:
    assert PREFIX.size == 18
    assert encode_frame(Kind.HELLO, {})[:6] == MAGIC + struct.pack("<BB", VERSION, Kind.HELLO)


async def test_a_read_with_a_deadline_never_swallows_a_cancellation() -> None:
    """A cancellation that arrives as the read completes must still cancel: asyncio.wait_for (before Python
    3.12) returned the read's result instead, and a worker stopped right as it registered kept reading its
    controller link forever (SIGTERM from systemd just after start hung the unit)."""
    from lmcached.wire.frames import _within

    read: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_within(read, 5.0))
    await asyncio.sleep(0)  # the task now waits on the read
    read.set_result(b"frame")  # the read completes…
    task.cancel()  # …and the cancellation arrives in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await task
