"""Helpers every codec test reuses: the contract checks, whatever the codec."""

from __future__ import annotations

import torch
from lmcached.codecs import Codec


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


def kv_like_real(layers: int, tokens: int, channels: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Keys with outlier channels and a per-channel bias, values per-token scaled: the shapes of real KV."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, tokens, channels, generator=gen) * torch.linspace(0.1, 4.0, channels) + torch.randn(
        1, 1, channels, generator=gen
    )
    v = torch.randn(layers, tokens, channels, generator=gen) * torch.rand(layers, tokens, 1, generator=gen).add(0.2)
    return torch.stack([k, v]).to(dtype)
