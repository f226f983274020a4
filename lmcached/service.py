"""Running under a service manager: systemd's readiness protocol (`Type=notify`). The daemons tell systemd when
they are ready (after their ports are open and the ready line is printed) and when they begin to stop, so
`systemctl start` returns once lmcached answers, and dependent units start after it. Without NOTIFY_SOCKET (not
under systemd) nothing happens."""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send sd_notify states ("READY=1", "STOPPING=1", "STATUS=…"); True when systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(states).encode(), address)
        return True
    except OSError:
        return False  # a readiness message that cannot be sent must not stop the daemon
