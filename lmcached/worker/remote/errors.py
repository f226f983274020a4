"""How the remote tier fails: unreachable or unusable, and a value that is not what was written."""

from __future__ import annotations

from lmcached.errors import LmcachedError


class RemoteError(LmcachedError):
    """The remote tier cannot be reached or is not usable (wrong password, not a Redis, down)."""

    http_status = 503


class CorruptRemoteValue(LmcachedError):
    """A value in Redis failed its checksum or could not be parsed; it is deleted, never served."""
