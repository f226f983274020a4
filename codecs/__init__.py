"""KV codecs: a registry of named codecs that turn a KV tensor [2, L, T, C] into a self-describing blob.

    from lmcached.codecs import get_codec
    blob = get_codec("cachegen").encode(kv)
    kv2 = get_codec("cachegen").decode(blob)

This package never imports asyncio, aiohttp or Textual.
"""

from __future__ import annotations

from typing import Any

from lmcached.errors import CodecError

from .base import Codec
from .threads import available_cpus, configure, threads

_REGISTRY: dict[str, str] = {"cachegen": "CacheGenCodec", "kvtc": "KvtcCodec", "lossless": "LosslessCodec"}
#: Codecs whose decode is not bit-exact (each codec class says so too, as `lossy`; a test keeps the two in step).
LOSSY = frozenset({"cachegen", "kvtc"})


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """A codec by name; keyword params override its defaults. Raises CodecError for an unknown name."""
    if name not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    if name == "cachegen":
        from .cachegen import CacheGenCodec

        return CacheGenCodec(**params)
    if name == "kvtc":  # needs codebook= (to encode) and/or store= (a CodebookStore, to decode)
        from .kvtc import KvtcCodec

        return KvtcCodec(**params)
    from .lossless import LosslessCodec

    return LosslessCodec(**params)


def decode(blob: bytes) -> Any:
    """Decode any lmcached blob, whichever codec wrote it (the blob names it)."""
    from .format import codec_of

    # The header names the codec; the codec's own decode verifies the whole blob (once, not twice).
    return get_codec(codec_of(blob)).decode(blob)


__all__ = ["LOSSY", "Codec", "CodecError", "available_codecs", "get_codec", "decode", "configure", "threads", "available_cpus"]
