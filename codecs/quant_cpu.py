"""Quantisation kernels on the CPU (Numba): statistics, quantise to byte symbols, dequantise.

Scales are separable: step[g, r, c] = col_step[g, c] * row_step[g, r] and offset = col_off[g, c] + row_off[g, r].
Keys use per-channel parameters (rows all 1/0), values per-token ones (columns all 1/0): KIVI's split, one kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

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
                v = x[g, r, c]
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
            v = x[g, r, c]
            s += v
            s2 += v * v
        m = s / C
        mean[g, r] = m
        std[g, r] = np.sqrt(max(s2 / C - m * m, 0.0))


@njit(nogil=True, cache=True, parallel=True)
def quantize(x, col_step, col_off, row_step, row_off, out):  # pragma: no cover - compiled
    G, R, C = x.shape
    for gr in prange(G * R):
        g = gr // R
        r = gr - g * R
        rs = row_step[g, r]
        ro = row_off[g, r]
        for c in range(C):
            q = np.rint((x[g, r, c] - col_off[g, c] - ro) / (col_step[g, c] * rs))
            q = min(max(q, -QMAX), QMAX)
            out[g, r, c] = np.uint8(q + ZERO)


@njit(nogil=True, cache=True, parallel=True)
def dequantize(sym, col_step, col_off, row_step, row_off, out):  # pragma: no cover - compiled
    G, R, C = sym.shape
    for gr in prange(G * R):
        g = gr // R
        r = gr - g * R
        rs = row_step[g, r]
        ro = row_off[g, r]
        for c in range(C):
            out[g, r, c] = np.float32(np.int32(sym[g, r, c]) - ZERO) * (col_step[g, c] * rs) + (col_off[g, c] + ro)
