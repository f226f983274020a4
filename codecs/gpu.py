"""The codecs on a CUDA device. cachegen: statistics, quantisation, histograms, rANS and dequantisation run
as Numba-CUDA kernels; only the tiny tables and the packed blob pass through the host. kvtc: the basis products
in torch on the device, its element-wise passes as Numba-CUDA kernels (`kvtc_cuda`), the same rANS kernels.
Same blob formats as the CPU paths, so either side decodes what the other wrote (cachegen to the same values,
kvtc to within the matrix products' rounding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import cuda

from . import entropy, quant_cuda, rans_cpu, rans_cuda, rans_wide

THREADS = 256
#: GPU lanes are shorter than the CPU's, to give the GPU more threads: each lane is a block of 32 (one per
#: state), and each costs 128 bytes for its final states.
GPU_LANE_SIZE = 16384


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def _device_array(x: torch.Tensor) -> Any:
    """A tensor as a Numba device array: a view of a CUDA tensor; a CPU tensor is copied in (under the
    simulator, `base.simulate_gpu()`)."""
    return cuda.as_cuda_array(x) if x.is_cuda else cuda.to_device(x.numpy())


def _tensor(array: Any, target: torch.device) -> torch.Tensor:
    """A Numba device array as a tensor on `target`: a view on a CUDA device, else copied out to the host."""
    return torch.as_tensor(array, device=target) if target.type == "cuda" else torch.from_numpy(array.copy_to_host())


def stats(dk: Any, dv: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Key statistics per (layer, channel), value statistics per (layer, token), computed on the device."""
    L, T, C = dk.shape
    k_mean, k_std = cuda.device_array((L, C), np.float64), cuda.device_array((L, C), np.float64)
    v_mean, v_std = cuda.device_array((L, T), np.float64), cuda.device_array((L, T), np.float64)
    quant_cuda.column_stats_kernel[_blocks(L * C), THREADS](dk, k_mean, k_std)
    quant_cuda.row_stats_kernel[_blocks(L * T), THREADS](dv, v_mean, v_std)
    return k_mean.copy_to_host(), k_std.copy_to_host(), v_mean.copy_to_host(), v_std.copy_to_host()


def entropy_encode(
    dsym: Any, groups: int, group_len: int, lane_size: int, states: int = entropy.NARROW, segments: int = 1, segment_len: int | None = None
) -> entropy.Coded:
    """entropy.encode on the device (the same bytes): symbols a uint8 device array [groups * group_len]."""
    states = entropy.check_states(states)
    segments, segment_len = entropy.check_segments(group_len, states, segments, segment_len)
    tables = groups * segments
    counts = cuda.to_device(np.zeros((tables, 256), dtype=np.uint32))
    blocks_per_table = min(64, _blocks(group_len // segments))
    rans_cuda.histogram_kernel[(blocks_per_table, tables), rans_cuda.HIST_THREADS](dsym, group_len, segments, segment_len, counts)
    freq = entropy.normalize(counts.copy_to_host())
    tab = rans_cpu.encoder_tables(freq, entropy.cumulative(freq))
    lanes = groups * entropy.lanes_for(group_len, lane_size)
    scratch = cuda.device_array((lanes, lane_size + entropy.STATE_WORDS[states]), dtype=np.uint16)
    lane_words = cuda.to_device(np.zeros(lanes, dtype=np.int64))
    if states == entropy.WIDE:
        rcp, packed = rans_wide.encoder_tables(tab)
        kernel_args = (dsym, group_len, lane_size, segments, segment_len, cuda.to_device(rcp), cuda.to_device(packed), scratch, lane_words)
        rans_cuda.encode_wide_kernel[lanes, rans_cuda.WIDE_STATES](*kernel_args)
    else:
        rans_cuda.encode_kernel[_blocks(lanes), THREADS](dsym, groups, group_len, lane_size, cuda.to_device(tab), scratch, lane_words)
    counts_host = lane_words.copy_to_host()
    offsets = np.zeros(lanes + 1, dtype=np.int64)
    np.cumsum(counts_host, out=offsets[1:])
    words = cuda.device_array(max(int(offsets[-1]), 1), dtype=np.uint16)
    gather = rans_cuda.gather_tail_kernel if states == entropy.WIDE else rans_cuda.gather_kernel
    gather[lanes, 128](scratch, lane_words, cuda.to_device(offsets), words)
    return entropy.Coded(entropy.pack_tables(freq), offsets.astype("<u4"), words.copy_to_host()[: int(offsets[-1])], states)


def encode_arrays(codec: Any, dx: Any, dtype: str, shape: tuple[int, ...], kv: torch.Tensor) -> bytes:
    """Encode a float32 device array [2, L, T, C]; `kv` supplies the exact rows in its own dtype."""
    from .layouts import unit_params

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
    coded = entropy_encode(dsym.reshape(2 * L * T * C), 2 * L, T * C, lane, entropy.WIDE)
    gpu_codec = type(codec)(**{**codec.params, "lane_size": lane})
    return gpu_codec.blob(dtype, shape, steps, coded, kv)


def cachegen_encode(codec: Any, kv: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> bytes:
    x = kv.detach().to(torch.float32).contiguous()
    return encode_arrays(codec, _device_array(x), dtype, shape, kv)


def entropy_decode(
    tables: Any,
    offsets: np.ndarray,
    words: np.ndarray,
    groups: int,
    group_len: int,
    lane: int,
    states: int = entropy.NARROW,
    segments: int = 1,
    segment_len: int | None = None,
) -> Any:
    """rANS-decode a blob's symbols on the device: a uint8 device array [groups * group_len]."""
    states = entropy.check_states(states)
    segments, segment_len = entropy.check_segments(group_len, states, segments, segment_len)
    d = entropy.decoder(tables, offsets, words, groups, group_len, lane, segments)
    lanes = d.offsets.shape[0] - 1
    dtab = cuda.to_device(rans_cpu.decoder_tables(d.freq, d.cum))
    dsym = cuda.device_array(groups * group_len, dtype=np.uint8)
    bad = cuda.to_device(np.zeros(lanes, dtype=np.uint8))
    dwords = cuda.to_device(words if words.size else np.zeros(1, np.uint16))
    doffsets = cuda.to_device(d.offsets)
    if states == entropy.WIDE:
        layout = (group_len, lane, segments, segment_len)
        rans_cuda.decode_wide_kernel[lanes, rans_cuda.WIDE_STATES](dwords, doffsets, *layout, dtab, dsym, bad)
    else:
        rans_cuda.decode_kernel[_blocks(lanes), THREADS](dwords, doffsets, groups, group_len, lane, dtab, dsym, bad)
    failed = int(bad.copy_to_host().sum())
    if failed:
        raise entropy.corrupt_lanes(failed)
    return dsym


def decode_arrays(b: Any, steps: Any, offsets: np.ndarray, words: np.ndarray) -> Any:
    """Decode a blob's symbols and dequantise them on the device: a float32 device array [2, L, T, C]."""
    from .layouts import unit_params

    _, L, T, C = b.shape
    states = b.params.get("rans_states", entropy.NARROW)
    dsym = entropy_decode(b.sections[4], offsets, words, 2 * L, T * C, int(b.params["lane_size"]), states)
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

    out = _tensor(decode_arrays(b, steps, offsets, words), target)
    return with_exact_rows(out.to(TORCH_DTYPES[b.dtype]), exact_rows, b.dtype, int(b.params["exact_tokens"]))


# ---------------------------------------------------------------------------------------------- kvtc
def kvtc_encode(codec: Any, book: Any, kv: torch.Tensor, dtype: str, shape: tuple[int, ...], exact: int) -> bytes:
    """kvtc on the device: y = (x - mean) · basis in float32 by torch, then `kvtc_encode_arrays`."""
    _, L, T, C = shape
    n = T - exact
    x = kv.detach()[:, :, exact:].to(torch.float32).reshape(2 * L, n, C)
    mean = torch.as_tensor(book.mean, device=kv.device).reshape(2 * L, 1, C)
    basis = torch.as_tensor(book.basis, device=kv.device).reshape(2 * L, C, C)
    y = torch.bmm(x - mean, basis).reshape(2, L, n, C).contiguous()
    return kvtc_encode_arrays(codec, book, _device_array(y), kv, dtype, shape, exact)


def kvtc_encode_arrays(codec: Any, book: Any, dy: Any, kv: torch.Tensor, dtype: str, shape: tuple[int, ...], exact: int) -> bytes:
    """Encode the projected chunk (a float32 device array y [2, L, n, C]): the twin of the CPU encode after its
    projection; `kv` supplies the exact rows."""
    from . import kvtc_cuda
    from .layouts import band_width

    _, L, T, C = shape
    n = T - exact
    width = band_width(C)
    rms = cuda.device_array((L, max(n, 1)), np.float64)
    if n:
        kvtc_cuda.token_rms_kernel[_blocks(L * n), THREADS](dy[1], rms)
    token = codec.token_scale(rms.copy_to_host()[:, :n])
    dtoken = cuda.to_device(token)
    need = cuda.device_array((2, L, C), np.float32)
    kvtc_cuda.reach_kernel[_blocks(2 * L * C), THREADS](dy, dtoken, need)
    steps = codec.component_steps(book, need.copy_to_host())
    symbols = cuda.device_array((2, L, n, C), np.uint8)
    if n:
        kvtc_cuda.quantize_kernel[_blocks(2 * L * n * C), THREADS](dy, cuda.to_device(steps.astype(np.float32)), dtoken, symbols)
    lane = int(codec.params.get("gpu_lane_size", GPU_LANE_SIZE))
    coded = entropy_encode(symbols.reshape(symbols.size), 2 * L, n * C, lane, entropy.WIDE, C // width, width)
    return codec.blob(dtype, shape, book, exact, width, lane, steps, token, coded, kv)


def kvtc_decode_arrays(b: Any, steps: np.ndarray, token: np.ndarray, offsets: np.ndarray, words: np.ndarray) -> Any:
    """A kvtc blob's symbols decoded and dequantised on the device: y, a float32 device array [2, L, n, C]."""
    from . import kvtc_cuda
    from .layouts import coded_layout

    _, L, T, C = b.shape
    bands, exact = int(b.params["bands"]), int(b.params["exact_tokens"])
    n = T - exact
    states = entropy.check_states(b.params.get("rans_states", entropy.NARROW))
    groups, group_len, segments, segment_len = coded_layout(b, states)
    dsym = entropy_decode(b.sections[2], offsets, words, groups, group_len, int(b.params["lane_size"]), states, segments, segment_len)
    dy = cuda.device_array((2, L, n, C), np.float32)
    if n:
        # Token by token, the symbols are one band of all C components as the dequantiser reads them.
        layout_bands = 1 if "band_width" in b.params else bands
        sym = dsym.reshape(2, L, layout_bands, n, C // layout_bands)
        kvtc_cuda.dequantize_kernel[_blocks(2 * L * n * C), THREADS](sym, cuda.to_device(steps), cuda.to_device(token), dy)
    return dy


def kvtc_decode(
    b: Any,
    book: Any,
    steps: np.ndarray,
    token: np.ndarray,
    offsets: np.ndarray,
    words: np.ndarray,
    exact_rows: np.ndarray,
    target: torch.device,
) -> torch.Tensor:
    """x = y · basisᵀ + mean on the device, in the blob's dtype, with its exact rows."""
    from .base import TORCH_DTYPES, with_exact_rows

    _, L, T, C = b.shape
    exact = int(b.params["exact_tokens"])
    n = T - exact
    y = _tensor(kvtc_decode_arrays(b, steps, token, offsets, words), target).reshape(2 * L, n, C)
    mean = torch.as_tensor(book.mean, device=target).reshape(2 * L, 1, C)
    basis_t = torch.as_tensor(book.basis, device=target).reshape(2 * L, C, C).transpose(1, 2)
    out = torch.empty((2, L, T, C), dtype=TORCH_DTYPES[b.dtype], device=target)
    out[:, :, exact:] = torch.baddbmm(mean, y, basis_t).reshape(2, L, n, C)
    return with_exact_rows(out, exact_rows, b.dtype, exact)
