"""Routers' binary lookup on the control port (IndexClient, control/router_port.py) against a real daemon: the same
answers as /lookup, by token ids and by chunk keys, partial chunks, salts, pipelined and early requests, bad
requests answered without losing the connection, and the auth token."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest

from lmcached.client import AsyncKVClient, IndexClient
from lmcached.errors import InvalidRequest, ProtocolError, Unauthorized
from lmcached.wire.chunks import chunk_spans
from lmcached.wire.frames import PREFIX_BYTES, Kind, decode_header, decode_prefix, encode_frame

from .conftest import CPU, DISK, INSTANCE, Running, make_kv, serving, test_config

PROMPT = list(range(300, 340))  # 2 whole chunks of 16 and a partial one of 8
SALTED = list(range(600, 632))


def control(run: Running) -> str:
    return f"127.0.0.1:{run.daemon.controller.hub.port}"


async def test_the_binary_lookup_answers_what_http_lookup_does(running: Running) -> None:
    await running.store(PROMPT, make_kv(len(PROMPT)))
    async with AsyncKVClient(running.data) as client:
        await client.store(SALTED, make_kv(len(SALTED), seed=1), salt="tenant")
    await running.wait_cached(PROMPT, len(PROMPT))
    _, answer = await running.post("/lookup", {"tokens": PROMPT})
    assert answer["layout_info"] == {INSTANCE: [CPU, 40]}

    def ask() -> None:
        with IndexClient(control(running)) as index:
            assert index.chunk_size == 16
            assert index.lookup(PROMPT) == {INSTANCE: (CPU, 40, 3)}
            assert index.lookup(PROMPT[:20]) == {INSTANCE: (CPU, 16, 1)}  # the second chunk's key differs for 4 tokens
            assert index.lookup(PROMPT + list(range(5))) == {INSTANCE: (CPU, 32, 2)}  # the partial chunk's key differs
            assert index.lookup(list(range(5))) == {}
            keys = [s.key for s in chunk_spans(PROMPT, 16)]
            assert index.lookup_keys(keys) == {INSTANCE: (CPU, 40, 3)}  # the partial chunk counts its 8 tokens
            assert index.lookup_keys(keys[:2]) == {INSTANCE: (CPU, 32, 2)}
            assert index.lookup_keys([12345, *keys]) == {}  # a prefix from the first key on
            assert index.lookup(SALTED) == {}
            assert index.lookup(SALTED, salt="tenant") == {INSTANCE: (CPU, 32, 2)}

    await asyncio.to_thread(ask)

    # The answer follows the index: cleared from RAM, the disk copy is what is left.
    _, answer = await running.post("/clear", {"instance_id": INSTANCE, "location": CPU, "tokens": PROMPT})
    await running.wait_event(answer["event_id"])

    def ask_again() -> dict[str, tuple[str, int, int]]:
        with IndexClient(control(running)) as index:
            return index.lookup(PROMPT)

    assert await asyncio.to_thread(ask_again) == {INSTANCE: (DISK, 40, 3)}


def raw_exchange(address: str, frames: list[bytes], replies: int) -> list[tuple[Kind, dict]]:
    """Send frames in one write (hello included, before any answer) and read `replies` frames back."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"".join(frames))
        data, out = b"", []
        while len(out) < replies:
            while len(data) >= PREFIX_BYTES:
                kind, header_len, payload_len = decode_prefix(data[:PREFIX_BYTES], 1 << 20)
                end = PREFIX_BYTES + header_len + payload_len
                if len(data) < end:
                    break
                out.append((kind, decode_header(data[PREFIX_BYTES : PREFIX_BYTES + header_len])))
                data = data[end:]
            if len(out) >= replies:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return out


def lookup_frame(req_id: int, tokens: list[int]) -> bytes:
    return encode_frame(Kind.LOOKUP, {"req_id": req_id, "by": "tokens"}, np.asarray(tokens, dtype="<u4").tobytes())


async def test_early_and_pipelined_lookups_are_all_answered_in_order(running: Running) -> None:
    await running.store(PROMPT, make_kv(len(PROMPT)))
    hello = encode_frame(Kind.HELLO, {"role": "router"})
    frames = [hello, lookup_frame(1, PROMPT), lookup_frame(2, PROMPT[:16]), lookup_frame(3, [1, 2, 3])]
    replies = await asyncio.to_thread(raw_exchange, control(running), frames, 4)
    assert [k for k, _ in replies] == [Kind.WELCOME, Kind.REPLY, Kind.REPLY, Kind.REPLY]
    assert [h["req_id"] for _, h in replies[1:]] == [1, 2, 3]
    assert [h["instances"] for _, h in replies[1:]] == [{INSTANCE: [CPU, 40, 3]}, {INSTANCE: [CPU, 16, 1]}, {}]
    assert all(h["us"] >= 0 for _, h in replies[1:])  # the controller says how long it spent on each


async def test_a_bad_lookup_gets_an_error_and_the_connection_stays_usable(running: Running) -> None:
    await running.store(PROMPT, make_kv(len(PROMPT)))

    def ask() -> None:
        with IndexClient(control(running)) as index:
            with pytest.raises(InvalidRequest, match="multiple of 8"):
                index._lookup({"by": "keys"}, b"\x01\x02\x03")
            with pytest.raises(InvalidRequest, match="'keys' or 'tokens'"):
                index._lookup({"by": "prefix"}, b"")
            with pytest.raises(InvalidRequest, match="64-bit"):
                index.lookup_keys([-1])
            assert index.lookup(PROMPT) == {INSTANCE: (CPU, 40, 3)}  # still connected, still right

    await asyncio.to_thread(ask)
    # A frame a router does not send ends its connection with a clear error; the daemon goes on.
    hello = encode_frame(Kind.HELLO, {"role": "router"})
    replies = await asyncio.to_thread(raw_exchange, control(running), [hello, encode_frame(Kind.HEARTBEAT, {})], 2)
    assert replies[1][0] == Kind.ERROR and "unexpected HEARTBEAT frame from a router" in replies[1][1]["detail"]
    assert (await running.post("/lookup", {"tokens": PROMPT}))[1]["layout_info"] == {INSTANCE: [CPU, 40]}


async def test_a_router_needs_the_auth_token(tmp_path: Path) -> None:
    async with serving(test_config(auth_token="s3cret")) as run:

        def ask() -> None:
            with pytest.raises(Unauthorized):
                IndexClient(control(run)).connect()
            with IndexClient(control(run), auth_token="s3cret") as index:
                assert index.lookup(PROMPT) == {}

        await asyncio.to_thread(ask)


async def test_a_standby_controller_sends_routers_to_the_active_one(tmp_path: Path) -> None:
    """A standby refuses every role with 503 naming the active controller; a router dials the next address."""
    async with serving(test_config()) as run:
        run.daemon.controller.hub.refusal = lambda: "standby: the active controller is elsewhere"  # type: ignore[method-assign]

        def ask() -> None:
            with pytest.raises(ProtocolError, match="standby"):
                IndexClient(control(run)).connect()

        await asyncio.to_thread(ask)
