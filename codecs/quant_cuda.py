"""Quantisation on the GPU (Numba-CUDA): the twin of `quant_cpu`, one thread per statistic or element.

Dequantisation matches the CPU bit for bit: q * step is exact in float32 (8 + 11 significant bits), so the
GPU's fused multiply-add rounds the same single sum as the CPU's separate multiply and add.
"""

from __future__ import annotations

import math

from numba import cuda, float32, float64, int32, uint8

from .quant_cpu import QMAX, ZERO


@cuda.jit
def column_stats_kernel(x, mean, std):  # pragma: no cover - device code
    G, R, C = x.shape
    gc = cuda.grid(1)
    if gc >= G * C:
        return
    g = gc // C
    c = gc - g * C
    s = float64(0.0)
    s2 = float64(0.0)
    for r in range(R):
        v = float64(x[g, r, c])
        s += v
        s2 += v * v
    m = s / R
    mean[g, c] = m
    std[g, c] = math.sqrt(max(s2 / R - m * m, 0.0))


@cuda.jit
def row_stats_kernel(x, mean, std):  # pragma: no cover - device code
    G, R, C = x.shape
    gr = cuda.grid(1)
    if gr >= G * R:
        return
    g = gr // R
    r = gr - g * R
    s = float64(0.0)
    s2 = float64(0.0)
    for c in range(C):
        v = float64(x[g, r, c])
        s += v
        s2 += v * v
    m = s / C
    mean[g, r] = m
    std[g, r] = math.sqrt(max(s2 / C - m * m, 0.0))


@cuda.jit
def quantize_kernel(x, col_step, col_off, row_step, row_off, out):  # pragma: no cover - device code
    G, R, C = x.shape
    i = cuda.grid(1)
    if i >= G * R * C:
        return
    g = i // (R * C)
    rem = i - g * R * C
    r = rem // C
    c = rem - r * C
    q = round((x[g, r, c] - col_off[g, c] - row_off[g, r]) / (col_step[g, c] * row_step[g, r]))
    q = min(max(q, -QMAX), QMAX)
    out[g, r, c] = uint8(q + ZERO)


@cuda.jit
def dequantize_kernel(sym, col_step, col_off, row_step, row_off, out):  # pragma: no cover - device code
    G, R, C = sym.shape
    i = cuda.grid(1)
    if i >= G * R * C:
        return
    g = i // (R * C)
    rem = i - g * R * C
    r = rem // C
    c = rem - r * C
    out[g, r, c] = float32(int32(sym[g, r, c]) - ZERO) * (col_step[g, c] * row_step[g, r]) + (col_off[g, c] + row_off[g, r])
