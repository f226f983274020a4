"""Quantisation kernels on the CPU (Numba): statistics, quantise to byte symbols, dequantise.

Scales are separable: step[g, r, c] = col_step[g, c] * row_step[g, r] and offset = col_off[g, c] + row_off[g, r].
Keys use per-channel parameters (rows all 1/0), values per-token ones (columns all 1/0): KIVI's split, one kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .rans_cpu import count_into, sum_parts

#: Symbols are q + ZERO with q clipped to [-QMAX, QMAX].
ZERO = 128
QMAX = 127


@njit(nogil=True, cache=True, parallel=True)
def column_stats(x, mean, std):  # pragma: no cover - compiled
    """Mean and standard deviation over rows, per (group, column): x [G, R, C]."""
    G, R, C = x.shape
    for g in prange(G):
        acc = np.zeros(C, dtype=np.float64)
        acc2 = np.zeros(C, dtype=np.float64)
        for r in range(R):
            for c in range(C):
                v = np.float64(x[g, r, c])
                acc[c] += v
                acc2[c] += v * v
        for c in range(C):
            m = acc[c] / R
            mean[g, c] = m
            std[g, c] = np.sqrt(max(acc2[c] / R - m * m, 0.0))


@njit(nogil=True, cache=True, parallel=True)
def row_stats(x, mean, std):  # pragma: no cover - compiled
    """Mean and standard deviation over columns, per (group, row): x [G, R, C]."""
    G, R, C = x.shape
    for gr in prange(G * R):
        g = gr // R
        r = gr - g * R
        s = 0.0
        s2 = 0.0
        for c in range(C):
            v = np.float64(x[g, r, c])
            s += v
            s2 += v * v
        m = s / C
        mean[g, r] = m
        std[g, r] = np.sqrt(max(s2 / C - m * m, 0.0))


@njit(nogil=True, cache=True, parallel=True)
def quantize(x, col_step, col_off, row_step, row_off, out, counts):  # pragma: no cover - compiled
    """Symbols of x [G, R, C] into out, and each group's histogram of them into counts [G, 256] (what the
    entropy coder's tables need): counted row by row while the row is in L1, where a separate pass re-read
    2.9 MB of symbols per SmolLM2 chunk (2.5 -> 1.8 ms a chunk for both)."""
    G, R, C = x.shape
    for g in prange(G):
        part = np.zeros((4, 256), dtype=np.int32)
        for r in range(R):
            rs = row_step[g, r]
            ro = row_off[g, r]
            for c in range(C):
                q = np.rint((x[g, r, c] - col_off[g, c] - ro) / (col_step[g, c] * rs))
                q = min(max(q, -QMAX), QMAX)
                out[g, r, c] = np.uint8(q + ZERO)
            count_into(out[g, r], part)
        sum_parts(part, counts[g])


@njit(nogil=True, cache=True, parallel=True)
def dequantize(sym, col_step, col_off, row_step, row_off, out):  # pragma: no cover - compiled
    """q * step + offset in float32. Bit-identical on every device: q has 8 bits and a step 11 (fp16), so the
    product is exact, and a fused multiply-add (the GPU) rounds the same single sum as a plain one (the CPU).
    One of each separable pair is 1 (or 0), so those products (and sums) are exact too."""
    G, R, C = sym.shape
    for gr in prange(G * R):
        g = gr // R
        r = gr - g * R
        rs = row_step[g, r]
        ro = row_off[g, r]
        for c in range(C):
            out[g, r, c] = np.float32(np.int32(sym[g, r, c]) - ZERO) * (col_step[g, c] * rs) + (col_off[g, c] + ro)


#: float32 bits of 0.5, the magic addend that rounds a float16 subnormal into the low mantissa bits.
_DENORM_MAGIC_BITS = ((127 - 15) + (23 - 10) + 1) << 23


@njit(inline="always")
def f32_to_f16_bits(bits, spare, c):  # pragma: no cover - compiled
    """Float32 bits[c] to float16 bits, round to nearest even; spare[c] must hold abs(value) + 0.5 (float32,
    its bits in the uint32 view `spare`), which rounds a subnormal result into the low mantissa bits.

    F. Giesen's float_to_half_fast3_rtne with every case computed and one selected, no branch: a row then
    converts with vector instructions (measured: a tenth off the dequantisation of a SmolLM2 chunk)."""
    u = bits[c]
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    # Rebias the exponent (-(127 - 15) << 23, wrapped), add 0xfff plus the odd bit: round to nearest even.
    normal = (a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    subnormal = spare[c] - np.uint32(_DENORM_MAGIC_BITS)  # 0.5's bits are _DENORM_MAGIC_BITS
    special = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)  # NaN, or overflow/infinity
    h = special if a >= np.uint32(0x47800000) else (subnormal if a < np.uint32(0x38800000) else normal)
    return np.uint16(sign | h)


@njit(inline="always")
def half_row(sym, sym_g, g, r, col_step, col_off, rs, ro, bfloat, row, spare, out):  # pragma: no cover - compiled
    """Row r of group g of `dequantize` (its symbols at sym[sym_g, r], its step and offset rs and ro), written
    to out[g, r] as float16 (or bfloat16) bits. row and spare are float32 scratch rows of C. (Whole arrays and
    indices, not row views: given views, Numba did not vectorise the loops.)"""
    C = row.shape[0]
    bits = row.view(np.uint32)
    spare_bits = spare.view(np.uint32)
    for c in range(C):
        v = np.float32(np.int32(sym[sym_g, r, c]) - ZERO) * (col_step[g, c] * rs) + (col_off[g, c] + ro)
        row[c] = v
        spare[c] = abs(v) + np.float32(0.5)
    if bfloat:
        for c in range(C):
            out[g, r, c] = f32_bits_to_bf16_bits(bits[c])
    else:
        for c in range(C):
            out[g, r, c] = f32_to_f16_bits(bits, spare_bits, c)


@njit(inline="always")
def f32_bits_to_bf16_bits(f):  # pragma: no cover - compiled
    if (f & np.uint32(0x7F800000)) == np.uint32(0x7F800000) and (f & np.uint32(0x7FFFFF)) != 0:
        return np.uint16((f >> np.uint32(16)) | np.uint32(0x40))  # keep NaN a NaN
    return np.uint16((f + np.uint32(0x7FFF) + ((f >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
