"""kvtc's element-wise passes on the GPU (Numba-CUDA): the twins of `kvtc_cpu`, one thread per statistic or
element, same layouts (y [S, L, n, C] float32 by component, `token` [S, L, n], symbols [S, L, n, C]).

The basis products run in torch on the device (`codecs/gpu.py`); these kernels do what torch would need four
or five passes for. Quantisation matches the CPU's arithmetic (the same float32 reciprocals and products), so
for the same y and steps both write the same symbols (tested in the simulator).
"""

from __future__ import annotations

import math

from numba import cuda, float32, float64, int32, uint8

from .kvtc_cpu import QMAX, ZERO


@cuda.jit(device=True)
def _element(i, L, n, C):  # pragma: no cover - device code
    """(side, layer, token, component) of thread i, one thread per element of y [S, L, n, C]."""
    c = i % C
    rest = i // C
    t = rest % n
    sl = rest // n
    s = sl // L
    return s, sl - s * L, t, c


@cuda.jit
def token_rms_kernel(y, out):  # pragma: no cover - device code
    """out[l, t] = root mean square of y[l, t, :] (y [L, n, C], out float64)."""
    L, n, C = y.shape
    lt = cuda.grid(1)
    if lt >= L * n:
        return
    layer = lt // n
    t = lt - layer * n
    acc = float64(0.0)
    for c in range(C):
        v = float64(y[layer, t, c])
        acc += v * v
    out[layer, t] = math.sqrt(acc / C)


@cuda.jit
def reach_kernel(y, token, out):  # pragma: no cover - device code
    """out[s, l, c] = max over tokens of |y| / token (a NaN comes through, as on the CPU)."""
    S, L, n, C = y.shape
    slc = cuda.grid(1)
    if slc >= S * L * C:
        return
    sl = slc // C
    c = slc - sl * C
    s = sl // L
    layer = sl - s * L
    best = float32(0.0)
    for t in range(n):
        v = abs(y[s, layer, t, c]) * (float32(1.0) / token[s, layer, t])
        if not v <= best:
            best = v
    out[s, layer, c] = best


@cuda.jit
def quantize_kernel(y, steps, token, out):  # pragma: no cover - device code
    """Symbols round(y / (step[c] * token[t])) + ZERO, clipped, into out [S, L, n, C]."""
    S, L, n, C = y.shape
    i = cuda.grid(1)
    if i >= S * L * n * C:
        return
    s, layer, t, c = _element(i, L, n, C)
    q = round(y[s, layer, t, c] * ((float32(1.0) / steps[s, layer, c]) * (float32(1.0) / token[s, layer, t])))
    q = min(max(q, -QMAX), QMAX)
    out[s, layer, t, c] = uint8(q + ZERO)


@cuda.jit
def dequantize_kernel(sym, steps, token, out):  # pragma: no cover - device code
    """y [S, L, n, C] = (symbol - ZERO) * step[c] * token[t], the symbols band by band (sym [S, L, bands, n,
    C / bands]; with one band, `quantize_kernel`'s layout)."""
    S, L, bands, n, width = sym.shape
    C = bands * width
    i = cuda.grid(1)
    if i >= S * L * n * C:
        return
    s, layer, t, c = _element(i, L, n, C)
    q = float32(int32(sym[s, layer, c // width, t, c % width]) - ZERO)
    out[s, layer, t, c] = q * (steps[s, layer, c] * token[s, layer, t])
