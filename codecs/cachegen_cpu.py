"""cachegen's CPU decode to half precision in one pass per group (a layer of K or of V): its rANS lanes into a
small buffer that stays in the core's cache (with the group's decoding table), then straight to float16/bfloat16
bits.

Decoding every lane into one chunk-sized symbol array and then dequantising it wrote and re-read 2.9 MB of
symbols per SmolLM2 chunk; dequantisation is bound by memory bandwidth on this VM, and the fused pass took
0.25 ms (6 %) off a 4.4 ms decode (measured on the bench's chunks). Bit-identical to `rans_cpu.decode_lanes`
followed by `quant_cpu.dequantize` (the float32 path) and torch's rounding to half precision (tested).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import rans_wide
from .quant_cpu import half_row
from .rans_cpu import PROB_SCALE, decode_lane, fill_decoder_table


@njit(nogil=True, cache=True, parallel=True)
def decode_half(words, offsets, lane_size, states, freq, cum, col_step, col_off, row_step, row_off, bfloat, out):  # pragma: no cover
    """Decode groups of R×C symbols (lanes of `lane_size`, `states` states each: 4 or rans_wide.STATES) and
    dequantise them into out [G, R, C] (uint16 bits), with column parameters [G, C] and row parameters [G, R].
    Returns the number of corrupt lanes."""
    G, R, C = out.shape
    group_len = R * C
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    bad = np.zeros(G, dtype=np.int64)
    for g in prange(G):
        tab = np.empty(PROB_SCALE, dtype=np.uint32)
        fill_decoder_table(freq[g], cum[g], tab)
        sym = np.empty((1, R, C), dtype=np.uint8)
        flat = sym.reshape(group_len)
        tabs = tab.reshape((1, PROB_SCALE))
        x = np.empty(rans_wide.STATES, dtype=np.uint32)
        for j in range(lanes_per_group):
            lane = g * lanes_per_group + j
            n = min(lane_size, group_len - j * lane_size)
            if states == rans_wide.STATES:  # (one table for the whole group: a single segment)
                ok = rans_wide.decode_lane(
                    words, offsets[lane], offsets[lane + 1], n, j * lane_size, group_len, group_len, tabs, flat, j * lane_size, x, None
                )
            else:
                ok = decode_lane(words, offsets[lane], offsets[lane + 1], n, tab, flat, j * lane_size)
            if not ok:
                bad[g] += 1
        for r in range(R):
            half_row(sym, 0, g, r, col_step, col_off, row_step[g, r], row_off[g, r], bfloat, out)
    return bad.sum()
