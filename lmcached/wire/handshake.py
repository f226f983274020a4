"""How peers find and greet each other on every TCP port: addresses, the hello frame and its auth token."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Final

from lmcached.errors import InvalidRequest, ProtocolError, Unauthorized
from lmcached.wire.frames import HELLO_TIMEOUT_S, ByteReader, Kind, read_frame

#: A worker's link to the controller starts with a hello of this role.
WORKER_ROLE: Final = "worker"
#: A router on the control port: binary LOOKUP frames in (chunk keys or token ids), each instance's matched prefix out.
ROUTER_ROLE: Final = "router"


def parse_address(address: str, default_port: int) -> tuple[str, int]:
    """'host:port' (or 'host', or ':port') to a pair; LMCache writes controller_url without a scheme."""
    text = address.removeprefix("tcp://").removeprefix("http://")
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise InvalidRequest(f"bad address {address!r}: expected HOST:PORT") from None


def http_base(address: str, tls: bool = False) -> str:
    """A controller's base URL from what a user typed: http(s)://HOST:PORT, or HOST:PORT (https with `tls`)."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"{'https' if tls else 'http'}://{address}"


def address_list(value: str) -> list[str]:
    """The addresses in a comma-separated list (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def dialable_host(host: str) -> str:
    """The address a client on this host dials for a server bound to `host` (a wildcard bind means loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def token_matches(expected: str | None, given: Any) -> bool:
    """Constant-time token check (no token configured: everything passes)."""
    if expected is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


async def receive_hello(reader: ByteReader, token: str | None) -> dict[str, Any] | None:
    """A connection's first frame: a hello, within HELLO_TIMEOUT_S, carrying the token when one is set.
    None when the peer left without a word; asyncio.TimeoutError, ProtocolError or Unauthorized otherwise."""
    hello = await asyncio.wait_for(read_frame(reader), HELLO_TIMEOUT_S)
    if hello is None:
        return None
    if hello.kind != Kind.HELLO:
        raise ProtocolError("the first frame must be a hello")
    if not token_matches(token, hello.header.get("token")):
        raise Unauthorized("bad or missing auth token")
    return hello.header
