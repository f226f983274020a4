"""The "cachegen" codec: KIVI-style quantisation (keys per channel, values per token) + rANS entropy coding.

Compared with LMCache's CacheGen it ships no per-channel probability tables: symbols are normalised by each
channel's (or token's) spread, so one small table per layer of K and of V describes them all (~100 bytes
each instead of 33 int16 per channel), and the step size is a fraction of the spread, not a fixed bin count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmcached.errors import CodecError

from . import entropy, quant_cpu
from .base import Codec, as_float32_numpy, from_float32, gpu_available
from .format import pack, unpack

DEFAULTS: dict[str, Any] = {
    # Step size as a fraction of the standard deviation (keys per channel, values per token).
    # Measured on SmolLM2 KV with `lmcached bench codec`; see docs/codec.md.
    "key_step": 0.5,
    "value_step": 0.5,
    "lane_size": 16384,
}
#: A channel or token with (almost) no spread still needs a positive step.
MIN_STEP = 1e-6


def _f16(a: np.ndarray) -> np.ndarray:
    """Round parameters to float16 as stored, so the encoder quantises with exactly what the decoder reads."""
    return a.astype(np.float16)


class CacheGenCodec(Codec):
    name = "cachegen"
    lossy = True

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise CodecError(f"unknown cachegen parameter(s): {', '.join(sorted(unknown))}")
        self.params = {**DEFAULTS, **params}
        for key in ("key_step", "value_step"):
            if not float(self.params[key]) > 0:
                raise CodecError(f"cachegen {key} must be positive")
        if int(self.params["lane_size"]) < 16:
            raise CodecError("cachegen lane_size must be at least 16")

    def encode(self, kv: torch.Tensor) -> bytes:
        dtype, shape = self.check(kv)
        self.check_finite(kv)
        if kv.is_cuda and gpu_available():
            from . import gpu

            return gpu.cachegen_encode(kv, self.params, dtype, shape)
        x = as_float32_numpy(kv)
        _, L, T, C = shape
        k, v = x[0], x[1]
        k_mean, k_std = np.empty((L, C)), np.empty((L, C))
        quant_cpu.column_stats(k, k_mean, k_std)
        v_mean, v_std = np.empty((L, T)), np.empty((L, T))
        quant_cpu.row_stats(v, v_mean, v_std)
        k_step = _f16(np.maximum(k_std * self.params["key_step"], MIN_STEP))
        k_off = _f16(k_mean)
        v_step = _f16(np.maximum(v_std * self.params["value_step"], MIN_STEP))
        v_off = _f16(v_mean)
        sym = np.empty((2, L, T, C), dtype=np.uint8)
        ones_c, zeros_c = np.ones((L, C), np.float32), np.zeros((L, C), np.float32)
        ones_r, zeros_r = np.ones((L, T), np.float32), np.zeros((L, T), np.float32)
        quant_cpu.quantize(k, k_step.astype(np.float32), k_off.astype(np.float32), ones_r, zeros_r, sym[0])
        quant_cpu.quantize(v, ones_c, zeros_c, v_step.astype(np.float32), v_off.astype(np.float32), sym[1])
        lane = int(self.params["lane_size"])
        coded = entropy.encode(sym.reshape(-1), 2 * L, T * C, lane)
        return pack(
            self.name,
            dtype,
            shape,
            {"key_step": self.params["key_step"], "value_step": self.params["value_step"], "lane_size": lane},
            [k_step, k_off, v_step, v_off, coded.tables, coded.offsets, coded.words],
        )

    def decode(self, blob: bytes, device: str | torch.device | None = None) -> torch.Tensor:
        b = unpack(blob, self.name)
        if len(b.shape) != 4 or b.shape[0] != 2 or len(b.sections) != 7:
            raise CodecError("cachegen blob has the wrong layout")
        _, L, T, C = b.shape
        lane = b.params.get("lane_size")
        if not isinstance(lane, int) or lane < 16:
            raise CodecError("cachegen blob has a bad lane_size")
        k_step, k_off, v_step, v_off = (
            self._array(s, n, np.float16) for s, n in zip(b.sections[:4], (L * C, L * C, L * T, L * T), strict=False)
        )
        offsets = self._array(b.sections[5], None, np.dtype("<u4"))
        words = self._array(b.sections[6], None, np.dtype("<u2"))
        target = torch.device(device) if device is not None else torch.device("cpu")
        if target.type == "cuda" and gpu_available():
            from . import gpu

            return gpu.cachegen_decode(b, (k_step, k_off, v_step, v_off), offsets, words, target)
        sym = entropy.decode(b.sections[4], offsets, words, 2 * L, T * C, lane).reshape(2, L, T, C)
        out = np.empty((2, L, T, C), dtype=np.float32)
        ones_c, zeros_c = np.ones((L, C), np.float32), np.zeros((L, C), np.float32)
        ones_r, zeros_r = np.ones((L, T), np.float32), np.zeros((L, T), np.float32)
        quant_cpu.dequantize(
            sym[0], k_step.reshape(L, C).astype(np.float32), k_off.reshape(L, C).astype(np.float32), ones_r, zeros_r, out[0]
        )
        quant_cpu.dequantize(
            sym[1], ones_c, zeros_c, v_step.reshape(L, T).astype(np.float32), v_off.reshape(L, T).astype(np.float32), out[1]
        )
        return from_float32(out, b.dtype, target)
