"""TLS for every port: the HTTP API (9000), the worker/monitor port (9001) and workers' data planes (8001).

A process with `tls_cert` and `tls_key` serves its ports with that certificate; a process with `tls_ca` dials
lmcached's ports (workers their controller, the TUI, standby controllers their peers, engines' connectors and
workers moving chunks a data plane) over TLS and verifies the certificate against that CA. The CLI speaks
https:// when the controller's address says so, with LMCACHED_TLS_CA as its CA. Over TLS the data plane gives
up its zero-copy socket paths (encryption copies anyway); same-host clients still move KV through shared memory.

A plain client that reaches a TLS port (or the reverse) gets a line that says so, not a protocol error: the
other side is probed with a handshake that verifies nothing, only to tell the two cases apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcached.config import Config

#: The CA file the CLI verifies an https:// controller against (unset: the system's CAs).
CLI_CA_ENV = "LMCACHED_TLS_CA"
PROBE_TIMEOUT_S = 2.0


def server_context(config: Config) -> ssl.SSLContext | None:
    """What the controller's ports serve TLS with, or None when they serve plain TCP."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """A client context that verifies the server against `ca` (None: the system's CAs)."""
    return ssl.create_default_context(cafile=ca)


def dial_context(config: Config) -> ssl.SSLContext | None:
    """How this process dials lmcached's ports: over TLS verified against `tls_ca`, or plain without it."""
    return client_context(config.tls_ca) if config.tls_ca else None


def cli_context() -> ssl.SSLContext:
    return client_context(os.environ.get(CLI_CA_ENV) or None)


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to learn whether the port speaks TLS at all
    return context


def speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake with host:port succeeds (nothing verified: a probe after a failed plain hello)."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            with _unverified().wrap_socket(sock, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


async def speaks_tls_async(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=_unverified()), PROBE_TIMEOUT_S)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


def plain_to_tls(where: str) -> str:
    return f"{where} speaks TLS and this client dialed it in plain TCP: give tls_ca (--tls-ca; for the CLI, an https:// address and {CLI_CA_ENV})"


def plain_server(exc: object) -> bool:
    """Whether a failed handshake means the server answered in plain TCP (OpenSSL's "wrong version number")."""
    return "WRONG_VERSION_NUMBER" in str(exc)


def tls_to_plain(where: str) -> str:
    return f"{where} does not speak TLS, but this client dialed it over TLS: drop tls_ca (for the CLI, use http://)"
