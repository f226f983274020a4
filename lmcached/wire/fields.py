"""Request bodies: JSON parsing and field checks that name the field at fault (400/422, never 500)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from lmcached.errors import InvalidRequest
from lmcached.wire.chunk import check_location
from lmcached.wire.chunks import tokens_array

#: A token list longer than this is refused outright (1M tokens is far beyond any model's context).
MAX_TOKENS = 1_000_000


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def required(body: dict[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"missing field {name!r}", name, 422)
    return body[name]


def string(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default) if default is not None else required(body, name)
    if value is None:
        value = default
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"field {name!r} must be a non-empty string", name, 422)
    if len(value) > 1024:
        raise InvalidRequest(f"field {name!r} is too long", name, 422)
    return value


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"field {name!r} must be true or false", name, 422)
    return value


def tokens(body: dict[str, Any], name: str = "tokens") -> np.ndarray:
    """A token list as the packed array chunk keys are hashed from (validated once, here)."""
    value = required(body, name)
    if not isinstance(value, list):
        raise InvalidRequest(f"field {name!r} must be a list of token ids", name, 422)
    if not value:
        raise InvalidRequest(f"field {name!r} is empty: give at least one token id", name, 422)
    if len(value) > MAX_TOKENS:
        raise InvalidRequest(f"field {name!r} has {len(value)} tokens; the limit is {MAX_TOKENS}", name, 413)
    return tokens_array(value)


def location(body: dict[str, Any], name: str = "location", default: str | None = None) -> str:
    value = body.get(name, default)
    if value is None:
        raise InvalidRequest(f"missing field {name!r}", name, 422)
    return check_location(value)


def position(body: dict[str, Any], name: str) -> tuple[str, str]:
    value = required(body, name)
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"field {name!r} must be [instance_id, location]", name, 422)
    return value[0], check_location(value[1])


def method(body: dict[str, Any], known: list[str]) -> str:
    value = string(body, "method")
    if value not in known:
        raise InvalidRequest(f"unknown method {value!r}; available: {', '.join(known)}", "method")
    return value


def quality(body: dict[str, Any], method_name: str) -> int | None:
    """The optional `quality` of a compress: an integer 1 (smallest) … 9 (closest), for cachegen only."""
    value = body.get("quality")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9:
        raise InvalidRequest(
            f"field 'quality' must be an integer from 1 (smallest) to 9 (closest to the original), got {value!r}", "quality", 422
        )
    if method_name != "cachegen":
        raise InvalidRequest(f"field 'quality' applies to cachegen, not {method_name!r}", "quality")
    return value


def worker_ids(body: dict[str, Any], name: str = "worker_ids") -> list[int | str] | None:
    """Workers named by LMCache's integer rank or by lmcached's string id (both may be mixed)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) or type(v) is int for v in value):
        raise InvalidRequest(f"field {name!r} must be a list of worker ranks (integers) or worker ids (strings)", name, 422)
    return value
