"""Quantisation kernels on the CPU (Numba): statistics, quantise to byte symbols, dequantise.

Scales are separable: step[g, r, c] = col_step[g, c] * row_step[g, r] and offset = col_off[g, c] + row_off[g, r].
Keys use per-channel parameters (rows all 1/0), values per-token ones (columns all 1/0): KIVI's split, one kernel.
The encoder's kernels read x as float32 or as float16/bfloat16 bits (uint16, `bfloat` telling which): the chunk
as it arrives, with no float32 copy of it (see codecs/half.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .half import narrow, widen
from .rans_cpu import count_into, sum_parts

#: Symbols are q + ZERO with q clipped to [-QMAX, QMAX].
ZERO = 128
QMAX = 127


@njit(nogil=True, cache=True, parallel=True)
def column_stats(x, mean, std, bfloat=False):  # pragma: no cover - compiled
    """Mean and standard deviation over rows, per (group, column): x [G, R, C]."""
    G, R, C = x.shape
    for g in prange(G):
        acc = np.zeros(C, dtype=np.float64)
        acc2 = np.zeros(C, dtype=np.float64)
        for r in range(R):
            for c in range(C):
                v = np.float64(widen(x[g, r, c], bfloat))
                acc[c] += v
                acc2[c] += v * v
        for c in range(C):
            m = acc[c] / R
            mean[g, c] = m
            std[g, c] = np.sqrt(max(acc2[c] / R - m * m, 0.0))


@njit(nogil=True, cache=True, parallel=True)
def row_stats(x, mean, std, bfloat=False):  # pragma: no cover - compiled
    """Mean and standard deviation over columns, per (group, row): x [G, R, C]."""
    G, R, C = x.shape
    for gr in prange(G * R):
        g = gr // R
        r = gr - g * R
        s = 0.0
        s2 = 0.0
        for c in range(C):
            v = np.float64(widen(x[g, r, c], bfloat))
            s += v
            s2 += v * v
        m = s / C
        mean[g, r] = m
        std[g, r] = np.sqrt(max(s2 / C - m * m, 0.0))


@njit(nogil=True, cache=True, parallel=True)
def quantize(x, col_step, col_off, row_step, row_off, out, counts, bfloat=False):  # pragma: no cover - compiled
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
                q = np.rint((widen(x[g, r, c], bfloat) - col_off[g, c] - ro) / (col_step[g, c] * rs))
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


@njit(inline="always")
def half_row(sym, sym_g, g, r, col_step, col_off, rs, ro, bfloat, out):  # pragma: no cover - compiled
    """Row r of group g of `dequantize` (its symbols at sym[sym_g, r], its step and offset rs and ro), written
    to out[g, r] as float16 (or bfloat16) bits. (Whole arrays and indices, not row views: given views, Numba
    did not vectorise the loop.)"""
    for c in range(out.shape[2]):
        v = np.float32(np.int32(sym[sym_g, r, c]) - ZERO) * (col_step[g, c] * rs) + (col_off[g, c] + ro)
        out[g, r, c] = narrow(v, bfloat)
