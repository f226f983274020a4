"""The baseline for the data plane: a plain loopback TCP socket moving the same bytes, no framing, no Python
per chunk. Run as a process: `python -m lmcached.bench.loopback` prints its port, then serves one client:

    client sends b"S" + 8-byte size + payload  -> server reads it into a buffer, answers b"k"
    client sends b"R" + 8-byte size            -> server sends that many bytes
"""

from __future__ import annotations

import socket
import struct
import sys


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def serve() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    head = bytearray(9)
    try:
        while True:
            try:
                recv_exact_into(conn, memoryview(head))
            except ConnectionError:
                return
            op, size = head[:1], struct.unpack("<Q", head[1:])[0]
            if len(buf) < size:
                buf = bytearray(size)
            view = memoryview(buf)[:size]
            if op == b"S":
                recv_exact_into(conn, view)
                conn.sendall(b"k")
            else:
                conn.sendall(view)
    finally:
        conn.close()


class LoopbackClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, view: memoryview) -> None:
        self.sock.sendall(b"S" + struct.pack("<Q", view.nbytes))
        self.sock.sendall(view)
        recv_exact_into(self.sock, memoryview(bytearray(1)))

    def receive(self, into: memoryview) -> None:
        self.sock.sendall(b"R" + struct.pack("<Q", into.nbytes))
        recv_exact_into(self.sock, into)

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    sys.exit(serve())
