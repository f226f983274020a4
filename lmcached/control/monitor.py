"""MonitorClient: a subscriber on the control port (9001) — a snapshot, live events, and operations on
chunks. The TUI's only way to the daemon; it never imports Textual."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import AsyncIterator
from typing import Any

from lmcached.control.hub import MONITOR_ROLE
from lmcached.errors import LmcachedError, ProtocolError, Standby, Unauthorized
from lmcached.wire.frames import Frame, Kind, read_frame, write_frame
from lmcached.wire.handshake import address_list, parse_address
from lmcached.wire.tls import plain_server, plain_to_tls, speaks_tls_async, tls_to_plain


class MonitorClient:
    """One monitor connection. Iterate `frames()` for SNAPSHOT and EVENT frames; `command()` meanwhile."""

    def __init__(self, address: str, auth_token: str | None = None, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self._ssl = ssl_context  # a TLS controller's port: verified against this context's CA
        #: A failover group's control ports (comma-separated): the first that is up and active is used.
        self._addresses = [parse_address(a, 9001) for a in address_list(address) or [address]]
        #: The control port this client is connected to, once it is.
        self.connected_to: str | None = None
        self._token = auth_token
        self._timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._req_ids = itertools.count(1)
        self._send_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Connect to the first controller of the list that answers and is active (a standby says who is)."""
        problems: list[str] = []
        for host, port in self._addresses:
            try:
                await self._connect(host, port)
                self.connected_to = f"{host}:{port}"
                return
            except (OSError, asyncio.TimeoutError, Standby, ProtocolError) as exc:
                await self.close()
                if isinstance(exc, ssl.SSLError) and plain_server(exc):
                    exc = ConnectionError(tls_to_plain(f"{host}:{port}"))
                elif self._ssl is None and isinstance(exc, (ProtocolError, ConnectionError)) and await speaks_tls_async(host, port):
                    exc = ConnectionError(plain_to_tls(f"{host}:{port}"))
                if len(self._addresses) == 1:
                    raise exc
                problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
        raise ConnectionError("no active controller: " + "; ".join(problems))

    async def _connect(self, host: str, port: int) -> None:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=self._ssl), self._timeout)
        await write_frame(self._writer, Kind.HELLO, {"role": MONITOR_ROLE, "token": self._token})
        welcome = await asyncio.wait_for(read_frame(self._reader), self._timeout)
        if welcome is None:
            raise ProtocolError("the daemon closed the connection during the hello")
        if welcome.kind == Kind.ERROR:
            detail = str(welcome.header.get("detail", "refused"))
            if welcome.header.get("standby"):
                raise Standby(detail)
            raise Unauthorized(detail) if welcome.header.get("status") == 401 else ProtocolError(detail)
        if welcome.kind != Kind.WELCOME:
            raise ProtocolError(f"expected a welcome, got {welcome.kind.name}")

    async def frames(self) -> AsyncIterator[Frame]:
        """SNAPSHOT and EVENT frames until the connection ends (then ConnectionError)."""
        assert self._reader is not None, "connect() first"
        try:
            while True:
                frame = await read_frame(self._reader)
                if frame is None:
                    raise ConnectionError("the daemon closed the connection")
                if frame.kind == Kind.REPLY:
                    future = self._pending.pop(frame.header.get("req_id"), None)  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result(frame.header)
                elif frame.kind in (Kind.SNAPSHOT, Kind.EVENT):
                    yield frame
                elif frame.kind == Kind.ERROR:
                    raise ProtocolError(str(frame.header.get("detail")))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the connection to the daemon was lost"))
            self._pending.clear()

    async def _send(self, header: dict[str, Any]) -> None:
        if self._writer is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await write_frame(self._writer, Kind.COMMAND, header)

    async def request_snapshot(self) -> None:
        await self._send({"op": "snapshot"})

    async def command(self, op: str, **args: Any) -> dict[str, Any]:
        """Ask for an operation on chunks: {"event_id", "num_tokens"}; raises LmcachedError on a refusal.
        Needs `frames()` running in another task to receive the reply."""
        req_id = next(self._req_ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        await self._send({"req_id": req_id, "op": op, **args})
        reply = await asyncio.wait_for(future, self._timeout)
        if not reply.get("ok"):
            raise LmcachedError(str(reply.get("error", "refused")))
        return dict(reply["result"])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None
