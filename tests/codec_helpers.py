"""Helpers every codec test reuses: the contract checks, whatever the codec."""

from __future__ import annotations

import torch
from lmcached.codecs import Codec

from lmcached.bench.synthetic import kv_like_real

__all__ = ["assert_round_trip", "kv_like_real", "relative_error"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def assert_round_trip(codec: Codec, kv: torch.Tensor, max_relative_error: float = 0.0) -> bytes:
    """encode -> bytes; decode -> same shape and dtype; within the error bound (exact for lossless)."""
    blob = codec.encode(kv)
    assert isinstance(blob, bytes)
    out = codec.decode(blob)
    assert out.shape == kv.shape and out.dtype == kv.dtype and out.device.type == "cpu"
    if max_relative_error == 0.0:
        assert torch.equal(out.contiguous().view(torch.uint8), kv.contiguous().view(torch.uint8))  # bit for bit
    else:
        assert relative_error(out, kv) <= max_relative_error
    return blob
