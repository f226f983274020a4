"""The error hierarchy: inner code raises these; only the edges (CLI, HTTP, protocol, TUI) present them."""

from __future__ import annotations


class LmcachedError(Exception):
    """Base of every error lmcached raises on purpose."""

    #: HTTP status the controller answers with when this error reaches it.
    http_status = 400


class ConfigError(LmcachedError):
    """A configuration key is unknown, ill-typed or out of range."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ProtocolError(LmcachedError):
    """A peer sent a frame that breaks the wire protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    """A frame declared a header or payload larger than the limit."""


class CodecError(LmcachedError):
    """A blob cannot be encoded or decoded (truncated, corrupted, foreign, unsupported)."""


class MissingCodebook(CodecError):
    """A kvtc blob names a codebook that is nowhere to be found (not here, not in the remote tier)."""


class NotFound(LmcachedError):
    """An instance, worker, location or event does not exist."""

    http_status = 404


class InvalidRequest(LmcachedError):
    """A request is malformed: a missing or ill-typed field, an unknown method."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.http_status = status


class WorkerUnavailable(LmcachedError):
    """A worker is gone or did not answer a command within its timeout."""

    http_status = 503


class Unauthorized(LmcachedError):
    """A request or hello lacked the right auth token."""

    http_status = 401


class Standby(LmcachedError):
    """A controller that stands by for its group's active one (it names it in the message)."""

    http_status = 503
