"""aiohttp's server logs a malformed request (a bad header line, say) as an ERROR with a full traceback, though
the client already got a clean 400 naming the fault. That is the client's mistake, not the daemon's: one
WARNING line says who sent it and what was wrong."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError


class MalformedRequests(logging.Filter):
    """Turns aiohttp.server's record of a request it could not parse into one WARNING line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            fault = " ".join(str(exc.message).split())
            record.msg, record.args = "%s: refused with %d (%s)", (record.getMessage().replace("Error handling request", "malformed HTTP request"), exc.code, fault)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_FILTER = MalformedRequests()


def quiet_malformed_requests() -> None:
    """Install the filter on aiohttp's server logger (once, however many apps are built)."""
    logger = logging.getLogger("aiohttp.server")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
