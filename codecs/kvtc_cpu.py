"""kvtc's element-wise passes on the CPU (Numba): each one pass over the chunk in the component basis, where
torch needed four or five (abs, divide, round, clamp, convert: measured 3× the codec's matrix products).

y is [S, L, n, C] (S = 2: keys, values), by component: float32, or the bfloat16 bits (uint16) of a bfloat16
matrix product, which the kernels widen as they read (`half.widen`). `token` [S, L, n] is the per-token
scale (1 for keys). The encoder's symbols are [S, L, n, C]; the decoder dequantises inside the rANS decoder
(`rans_wide.decode_lanes` with scaling), so `dequantize*` here serve older blobs, whose symbols are band by
band ([S, L, band, n, C / bands]).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .half import f32_to_bf16_bits, narrow, widen
from .rans_cpu import count_into, sum_parts

ZERO = 128
QMAX = 127


@njit(nogil=True, cache=True, parallel=True)
def token_rms(y, out):  # pragma: no cover - compiled
    """out[l, t] = root mean square of y[l, t, :] (y [L, n, C])."""
    L, n, C = y.shape
    for lt in prange(L * n):
        layer = lt // n
        t = lt - layer * n
        acc = 0.0
        for c in range(C):
            v = np.float64(widen(y[layer, t, c], True))
            acc += v * v
        out[layer, t] = np.sqrt(acc / C)


@njit(nogil=True, cache=True, parallel=True)
def reach(y, token, out):  # pragma: no cover - compiled
    """out[s, l, c] = max over tokens of |y| / token: the largest step count a component needs (NaN and
    infinity come through, so the caller's finiteness check covers the input)."""
    S, L, n, C = y.shape
    for sl in prange(S * L):
        s = sl // L
        layer = sl - s * L
        for c in range(C):
            out[s, layer, c] = 0.0
        for t in range(n):
            inv = np.float32(1.0) / token[s, layer, t]
            for c in range(C):
                v = abs(widen(y[s, layer, t, c], True)) * inv
                if not v <= out[s, layer, c]:  # (a NaN is kept too)
                    out[s, layer, c] = v


@njit(nogil=True, cache=True, parallel=True)
def quantize(y, steps, token, bands, out, counts):  # pragma: no cover - compiled
    """Symbols round(y / (step[c] * token[t])) + ZERO, clipped, into out [S, L, n, C], and the histogram of each
    band of C / bands components into counts [S * L * bands, 256] (the entropy coder's tables), counted while
    the symbols are in L1 rather than in a pass of their own."""
    S, L, n, C = y.shape
    width = C // bands
    for sl in prange(S * L):
        s = sl // L
        layer = sl - s * L
        inv = np.empty(C, dtype=np.float32)
        for c in range(C):
            inv[c] = np.float32(1.0) / steps[s, layer, c]
        part = np.zeros((bands, 4, 256), dtype=np.int32)
        for t in range(n):
            k = np.float32(1.0) / token[s, layer, t]
            row = out[s, layer, t]
            for c in range(C):
                q = np.rint(widen(y[s, layer, t, c], True) * (inv[c] * k))
                q = min(max(q, -QMAX), QMAX)
                row[c] = np.uint8(q + ZERO)
            for b in range(bands):
                count_into(row[b * width : (b + 1) * width], part[b])
        for b in range(bands):
            sum_parts(part[b], counts[sl * bands + b])


@njit(nogil=True, cache=True, parallel=True)
def dequantize(sym, steps, token, out):  # pragma: no cover - compiled
    """The inverse of `quantize`'s layout: y [S, L, n, C] = (symbol - ZERO) * step[c] * token[t]."""
    S, L, bands, n, width = sym.shape
    for sl in prange(S * L):
        s = sl // L
        layer = sl - s * L
        for t in range(n):
            k = token[s, layer, t]
            for b in range(bands):
                for w in range(width):
                    c = b * width + w
                    out[s, layer, t, c] = np.float32(np.int32(sym[s, layer, b, t, w]) - ZERO) * (steps[s, layer, c] * k)


@njit(nogil=True, cache=True, parallel=True)
def dequantize_bf16(sym, steps, token, out):  # pragma: no cover - compiled
    """`dequantize`, written as bfloat16 bits (uint16 [S, L, n, C]) for a bfloat16 matrix product: the same
    float32 value, rounded to nearest even, without a float32 array and a conversion pass in between."""
    S, L, bands, n, width = sym.shape
    for sl in prange(S * L):
        s = sl // L
        layer = sl - s * L
        for t in range(n):
            k = token[s, layer, t]
            for b in range(bands):
                for w in range(width):
                    c = b * width + w
                    out[s, layer, t, c] = f32_to_bf16_bits(np.float32(np.int32(sym[s, layer, b, t, w]) - ZERO) * (steps[s, layer, c] * k))


@njit(nogil=True, cache=True, parallel=True)
def add_offset_half(x, x_bfloat, offset, first, bfloat, out):  # pragma: no cover - compiled
    """out[s, l, first + t] (float16, or bfloat16, bits) = x[s, l, t] + offset[s, l] in float32, the sum rounded
    once: one pass where torch widened, added and narrowed in three. x is float32, or float16 (bfloat16 when
    x_bfloat) bits. The encoder centres the chunk with it (offset = -mean: x + (-m) is exactly x - m) and the
    decoder adds the mean back to the bfloat16 product."""
    S, L, n, C = x.shape
    for sl in prange(S * L):
        s = sl // L
        layer = sl - s * L
        for t in range(n):
            for c in range(C):
                out[s, layer, first + t, c] = narrow(widen(x[s, layer, t, c], x_bfloat) + offset[s, layer, c], bfloat)
