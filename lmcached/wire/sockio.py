"""Zero-copy socket I/O for the data plane: reads land in the caller's buffer, writes leave from it.

asyncio's streams copy every payload several times (into the reader's buffer, out of it, and in 3.11
`writelines` joins all buffers into one bytes object). KV chunks are megabytes, so the data plane uses the
loop's socket methods directly: `sock_recv_into` and `sock_sendall` on a non-blocking socket. Over TLS
(`TlsSocketStream`) bytes pass through the SSL object's memory buffers instead: encryption copies anyway.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Small reads (frame prefixes and headers) come through a buffer of this size to save syscalls.
READ_AHEAD = 64 * 1024
#: A single read into the read-ahead buffer; larger reads go straight into the caller's memory.
DIRECT_READ_MIN = 16 * 1024


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result, or asyncio.TimeoutError after `seconds`. asyncio.timeout where there is one (3.11+):
    before 3.12, asyncio.wait_for could swallow a cancellation that arrived as the awaitable completed (a worker
    told to stop then kept reading its controller link forever)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class SocketStream:
    """One connected non-blocking socket with exact-size reads and gather writes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._ahead = bytearray(READ_AHEAD)
        self._start = 0
        self._end = 0
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None = None) -> SocketStream:
        """A stream to host:port; over TLS (verifying the server) with `ssl_context`."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await within(loop.sock_connect(sock, address), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                last = exc if isinstance(exc, OSError) else OSError(f"connect to {host}:{port} timed out")
                continue
            if ssl_context is None:
                return cls(sock)
            try:
                return await within(TlsSocketStream.wrap(sock, ssl_context, server_side=False, server_hostname=host), timeout)
            except BaseException:
                sock.close()
                raise
        raise last or OSError(f"cannot resolve {host}")

    async def _recv_into(self, view: memoryview) -> int:
        return await self._loop.sock_recv_into(self.sock, view)

    async def _send(self, data: Any) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def peername(self) -> Any:
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    async def readinto(self, view: memoryview) -> None:
        """Fill `view` exactly; raises asyncio.IncompleteReadError on EOF."""
        total = view.nbytes
        got = min(self._end - self._start, total)
        if got:
            view[:got] = self._ahead[self._start : self._start + got]
            self._start += got
        while got < total:
            if total - got < DIRECT_READ_MIN:
                await self._fill()
                take = min(self._end - self._start, total - got)
                view[got : got + take] = self._ahead[self._start : self._start + take]
                self._start += take
                got += take
                continue
            n = await self._recv_into(view[got:])
            if n == 0:
                raise asyncio.IncompleteReadError(bytes(view[:got]), total)
            got += n

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._ahead) - self._end < DIRECT_READ_MIN:  # make room: move the unread bytes to the front
            unread = self._end - self._start
            self._ahead[:unread] = self._ahead[self._start : self._end]
            self._start, self._end = 0, unread
        n = await self._recv_into(memoryview(self._ahead)[self._end :])
        if n == 0:
            raise asyncio.IncompleteReadError(bytes(self._ahead[self._start : self._end]), None)
        self._end += n

    async def readexactly(self, n: int) -> bytearray:
        """The StreamReader-compatible read that `frames.read_frame_head` uses; returns a fresh buffer."""
        buf = bytearray(n)
        try:
            await self.readinto(memoryview(buf))
        except asyncio.IncompleteReadError as exc:
            raise asyncio.IncompleteReadError(exc.partial, n) from None
        return buf

    async def sendall(self, parts: list[Any]) -> None:
        """Send buffers in order: small ones joined into one segment, large ones straight from their memory."""
        small: list[Any] = []
        for part in parts:
            view = memoryview(part).cast("B")
            if view.nbytes < DIRECT_READ_MIN:
                small.append(view)
                continue
            if small:
                await self._send(b"".join(small))
                small = []
            await self._send(view)
        if small:
            await self._send(b"".join(small))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class TlsSocketStream(SocketStream):
    """A SocketStream over TLS: the socket carries records, an SSLObject turns them into the stream's bytes."""

    #: Ciphertext read from the socket at a time.
    RECORDS_READ = 256 * 1024

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        super().__init__(sock)
        self.tls, self._incoming, self._outgoing = tls, incoming, outgoing

    @classmethod
    async def wrap(
        cls, sock: socket.socket, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None
    ) -> TlsSocketStream:
        """Run the handshake on a connected socket; ssl.SSLError when the peer does not speak TLS or is not trusted."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        stream = cls(sock, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await stream._flush()
                if not await stream._pull():
                    raise ssl.SSLError("the peer closed the connection during the TLS handshake") from None
        await stream._flush()
        return stream

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _pull(self) -> bool:
        """More ciphertext from the socket; False at its end."""
        data = await self._loop.sock_recv(self.sock, self.RECORDS_READ)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self.tls.read(view.nbytes, view)
            except ssl.SSLWantReadError:
                await self._flush()  # (TLS 1.3 may have something to say first)
                if not await self._pull():
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def _send(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = self.tls.write(view)
            view = view[written:]
            await self._flush()


#: How long a client gets to finish its TLS handshake before the connection is dropped.
HANDSHAKE_TIMEOUT_S = 10.0


async def serve_sockets(
    host: str, port: int, handler: Callable[[SocketStream], Awaitable[None]], ssl_context: ssl.SSLContext | None = None
) -> tuple[socket.socket, asyncio.Task[None]]:
    """Listen and run `handler` for each connection (over TLS with `ssl_context`: a client whose handshake fails,
    a plain one among them, is dropped); returns the listening socket and the accept task."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((host, port), backlog=512)
    listener.setblocking(False)

    async def secure(conn: socket.socket) -> None:
        assert ssl_context is not None
        conn.setblocking(False)
        try:
            stream = await within(TlsSocketStream.wrap(conn, ssl_context, server_side=True), HANDSHAKE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):  # ssl.SSLError is an OSError
            conn.close()
            return
        await handler(stream)

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            loop.create_task(handler(SocketStream(conn)) if ssl_context is None else secure(conn))

    return listener, loop.create_task(accept_loop(), name=f"accept-{host}:{port}")
