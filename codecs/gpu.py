"""The CacheGen codec on a CUDA device: statistics, quantisation, histograms, rANS and dequantisation run
as Numba-CUDA kernels; only the tiny tables and the packed blob pass through the host. Same blob format as
the CPU path, so either side decodes what the other wrote, to the same values."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import cuda

from lmcached.errors import CodecError

from . import entropy, quant_cuda, rans_cpu, rans_cuda
from .rans_cpu import STATE_WORDS

THREADS = 256
#: GPU lanes are shorter than the CPU's: a 64 MB batch must give the GPU tens of thousands of threads.
GPU_LANE_SIZE = 4096


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def stats(dk: Any, dv: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Key statistics per (layer, channel), value statistics per (layer, token), computed on the device."""
    L, T, C = dk.shape
    k_mean, k_std = cuda.device_array((L, C), np.float64), cuda.device_array((L, C), np.float64)
    v_mean, v_std = cuda.device_array((L, T), np.float64), cuda.device_array((L, T), np.float64)
    quant_cuda.column_stats_kernel[_blocks(L * C), THREADS](dk, k_mean, k_std)
    quant_cuda.row_stats_kernel[_blocks(L * T), THREADS](dv, v_mean, v_std)
    return k_mean.copy_to_host(), k_std.copy_to_host(), v_mean.copy_to_host(), v_std.copy_to_host()


def entropy_encode(dsym: Any, groups: int, group_len: int, lane_size: int) -> entropy.Coded:
    counts = cuda.to_device(np.zeros((groups, 256), dtype=np.uint32))
    segments = min(64, _blocks(group_len))
    rans_cuda.histogram_kernel[(segments, groups), rans_cuda.HIST_THREADS](dsym, group_len, counts)
    freq = entropy.normalize(counts.copy_to_host())
    tab = cuda.to_device(rans_cpu.encoder_tables(freq, entropy.cumulative(freq)))
    lanes = groups * entropy.lanes_for(group_len, lane_size)
    scratch = cuda.device_array((lanes, lane_size + STATE_WORDS), dtype=np.uint16)
    lane_words = cuda.to_device(np.zeros(lanes, dtype=np.int64))
    rans_cuda.encode_kernel[_blocks(lanes), THREADS](dsym, groups, group_len, lane_size, tab, scratch, lane_words)
    counts_host = lane_words.copy_to_host()
    offsets = np.zeros(lanes + 1, dtype=np.int64)
    np.cumsum(counts_host, out=offsets[1:])
    words = cuda.device_array(max(int(offsets[-1]), 1), dtype=np.uint16)
    rans_cuda.gather_kernel[lanes, 128](scratch, lane_words, cuda.to_device(offsets), words)
    return entropy.Coded(entropy.pack_tables(freq), offsets.astype("<u4"), words.copy_to_host()[: int(offsets[-1])])


def encode_arrays(codec: Any, dx: Any, dtype: str, shape: tuple[int, ...], kv: torch.Tensor) -> bytes:
    """Encode a float32 device array [2, L, T, C]; `kv` supplies the exact rows in its own dtype."""
    from .cachegen import unit_params

    _, L, T, C = shape
    steps = codec.steps(*stats(dx[0], dx[1]))
    f32 = steps.as_float32(L, T, C)
    unit = unit_params(L, T, C)
    dsym = cuda.device_array((2, L, T, C), dtype=np.uint8)
    n = L * T * C
    quant_cuda.quantize_kernel[_blocks(n), THREADS](
        dx[0], cuda.to_device(f32.k_step), cuda.to_device(f32.k_off), cuda.to_device(unit.ones_r), cuda.to_device(unit.zeros_r), dsym[0]
    )
    quant_cuda.quantize_kernel[_blocks(n), THREADS](
        dx[1], cuda.to_device(unit.ones_c), cuda.to_device(unit.zeros_c), cuda.to_device(f32.v_step), cuda.to_device(f32.v_off), dsym[1]
    )
    lane = int(codec.params.get("gpu_lane_size", GPU_LANE_SIZE))
    coded = entropy_encode(dsym.reshape(2 * L * T * C), 2 * L, T * C, lane)
    gpu_codec = type(codec)(**{**codec.params, "lane_size": lane})
    return gpu_codec.blob(dtype, shape, steps, coded, kv)


def cachegen_encode(codec: Any, kv: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> bytes:
    x = kv.detach().to(torch.float32).contiguous()
    return encode_arrays(codec, cuda.as_cuda_array(x), dtype, shape, kv)


def decode_arrays(b: Any, steps: Any, offsets: np.ndarray, words: np.ndarray) -> Any:
    """Decode a blob's symbols and dequantise them on the device: a float32 device array [2, L, T, C]."""
    from .cachegen import unit_params

    _, L, T, C = b.shape
    groups, group_len, lane = 2 * L, T * C, int(b.params["lane_size"])
    freq = entropy.unpack_tables(b.sections[4], groups)
    if not np.all(freq.sum(axis=1) == rans_cpu.PROB_SCALE):
        raise CodecError("frequency table does not sum to the coder's scale")
    lanes = groups * entropy.lanes_for(group_len, lane)
    offs = offsets.astype(np.int64)
    if offs.shape[0] != lanes + 1 or offs[0] != 0 or offs[-1] != words.shape[0] or np.any(np.diff(offs) < 0):
        raise CodecError("lane offsets do not match the coded words")
    dtab = cuda.to_device(rans_cpu.decoder_tables(freq, entropy.cumulative(freq)))
    dsym = cuda.device_array(groups * group_len, dtype=np.uint8)
    bad = cuda.to_device(np.zeros(lanes, dtype=np.uint8))
    dwords = cuda.to_device(words if words.size else np.zeros(1, np.uint16))
    rans_cuda.decode_kernel[_blocks(lanes), THREADS](dwords, cuda.to_device(offs), groups, group_len, lane, dtab, dsym, bad)
    failed = int(bad.copy_to_host().sum())
    if failed:
        raise CodecError(f"{failed} rANS lane(s) failed to decode: the blob is corrupted")
    f32 = steps.as_float32(L, T, C)
    unit = unit_params(L, T, C)
    sym = dsym.reshape(2, L, T, C)
    out = cuda.device_array((2, L, T, C), dtype=np.float32)
    n = L * T * C
    quant_cuda.dequantize_kernel[_blocks(n), THREADS](
        sym[0], cuda.to_device(f32.k_step), cuda.to_device(f32.k_off), cuda.to_device(unit.ones_r), cuda.to_device(unit.zeros_r), out[0]
    )
    quant_cuda.dequantize_kernel[_blocks(n), THREADS](
        sym[1], cuda.to_device(unit.ones_c), cuda.to_device(unit.zeros_c), cuda.to_device(f32.v_step), cuda.to_device(f32.v_off), out[1]
    )
    return out


def cachegen_decode(
    b: Any, steps: Any, offsets: np.ndarray, words: np.ndarray, exact_rows: np.ndarray, target: torch.device
) -> torch.Tensor:
    from .base import TORCH_DTYPES, with_exact_rows

    out = torch.as_tensor(decode_arrays(b, steps, offsets, words), device=target)
    return with_exact_rows(out.to(TORCH_DTYPES[b.dtype]), exact_rows, b.dtype, int(b.params["exact_tokens"]))
