"""KV tensors as bytes and back, without pickle: the dtype names and byte views every side agrees on."""

from __future__ import annotations

from typing import Any

import torch

from lmcached.errors import InvalidRequest

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    # vLLM's fp8 KV caches (--kv-cache-dtype fp8 / fp8_e4m3, fp8_e5m2): stored and moved bit-exact.
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidRequest(f"KV dtype {dtype} is not supported; use one of {', '.join(DTYPES)}", "kv") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown KV dtype {name!r}", "dtype") from None


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (bfloat16 included, which numpy cannot name)."""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def from_bytes(data: Any, shape: tuple[int, ...] | list[int], dtype: str) -> torch.Tensor:
    """A tensor over a copy of `data` (a writable copy, so torch never shares an immutable buffer)."""
    buf = bytearray(data)
    return (
        torch.frombuffer(buf, dtype=dtype_from_name(dtype)).reshape(tuple(shape))
        if buf
        else torch.empty(tuple(shape), dtype=dtype_from_name(dtype))
    )


def check_kv(kv: Any, num_tokens: int) -> torch.Tensor:
    """Check a KV tensor's layout [2, L, T, C] against the token count it claims to cover."""
    if not isinstance(kv, torch.Tensor):
        raise InvalidRequest("kv must be a torch.Tensor [2, num_layers, num_tokens, channels]", "kv")
    if kv.dim() != 4 or kv.shape[0] != 2:
        raise InvalidRequest(f"kv must have shape [2, num_layers, num_tokens, channels], got {list(kv.shape)}", "kv")
    if kv.shape[2] != num_tokens:
        raise InvalidRequest(f"kv covers {kv.shape[2]} tokens but {num_tokens} tokens were given", "kv")
    dtype_name(kv.dtype)
    return kv.detach().cpu()
