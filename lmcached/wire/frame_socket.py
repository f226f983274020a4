"""Blocking frame I/O on one connected socket (TCP, or TLS): frames go out from the callers' own buffers (a big KV
payload is never joined into one), replies come in head first, and a payload is read straight into the places it
belongs (scatter reads into a tensor's rows). The asyncio side of the same wire is `sockio.SocketStream`."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from lmcached.errors import ProtocolError
from lmcached.wire.frames import PREFIX_BYTES, Kind, decode_header, decode_prefix

#: Buffers per sendmsg/recvmsg_into call (Linux's IOV_MAX is 1024).
IOV_MAX = 1024
#: Below this many bytes a frame is joined and sent as one segment (TCP_NODELAY is on).
SMALL_FRAME = 65536


class FrameSocket:
    """Frames over a connected blocking socket; the caller decides what a reply means."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def send(self, parts: list[Any]) -> None:
        """One frame's parts, in order: joined when small, else each from its own memory."""
        if sum(memoryview(p).nbytes for p in parts) < SMALL_FRAME:
            self.sock.sendall(b"".join(parts))
            return
        for part in parts:
            self.sock.sendall(part)

    def send_buffers(self, buffers: list[Any]) -> None:
        """Send `buffers` in order from their own memory (gather writes, IOV_MAX buffers at a time)."""
        if isinstance(self.sock, ssl.SSLSocket):  # no gather writes over TLS: one buffer at a time
            for buffer in buffers:
                self.sock.sendall(buffer)
            return
        views = [memoryview(b).cast("B") for b in buffers]
        first = 0
        while first < len(views):
            first = _advance(views, first, self.sock.sendmsg(views[first : first + IOV_MAX]))

    def recv_buffers(self, buffers: list[Any]) -> None:
        """Fill `buffers` in order from the socket (scatter reads, IOV_MAX buffers at a time)."""
        views = [memoryview(b).cast("B") for b in buffers]
        if isinstance(self.sock, ssl.SSLSocket):  # no scatter reads over TLS: one buffer at a time
            for view in views:
                self.recv_into(view)
            return
        first = 0
        while first < len(views):
            n = self.sock.recvmsg_into(views[first : first + IOV_MAX])[0]
            if n == 0:
                raise ProtocolError("worker closed the connection")
            first = _advance(views, first, n)

    def recv_into(self, view: memoryview) -> None:
        got, total = 0, view.nbytes
        while got < total:
            n = self.sock.recv_into(view[got:], total - got)
            if n == 0:
                raise ProtocolError("worker closed the connection")
            got += n

    def recv(self, size: int) -> bytearray:
        buf = bytearray(size)
        self.recv_into(memoryview(buf))
        return buf

    def read_head(self, max_payload: int) -> tuple[Kind, dict[str, Any], int]:
        """A frame's kind and header; its payload (of the length returned) is left for the caller to read."""
        kind, header_len, payload_len = decode_prefix(bytes(self.recv(PREFIX_BYTES)), max_payload)
        return kind, decode_header(bytes(self.recv(header_len))) if header_len else {}, payload_len


def _advance(views: list[memoryview], first: int, n: int) -> int:
    """Account for `n` bytes moved from views[first:]: drop the whole ones, trim a partial one; the new first."""
    while n:
        size = views[first].nbytes
        if n >= size:
            n -= size
            first += 1
        else:
            views[first] = views[first][n:]
            n = 0
    return first
