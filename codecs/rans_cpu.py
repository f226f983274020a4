"""rANS entropy coding on the CPU (Numba): many independent lanes, four interleaved states per lane.

Kernels are plain loops with no validation; `codecs/entropy.py` validates and calls them. The GPU twin is
`rans_cuda.py` and writes the identical format. Symbols are bytes; each group of symbols (one layer of K or
V, one byte plane, ...) has its own frequency table, normalised to 2**PROB_BITS. A lane of `lane_size`
symbols of one group is coded on its own, so lanes run in parallel (prange here, one thread each on a GPU).
The state lives in [2**16, 2**32) and renormalises 16 bits at a time, so each symbol emits at most one word.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 16
#: Words a lane's final states take: four 32-bit states as two 16-bit words each.
STATE_WORDS = 8


@njit(nogil=True, cache=True, parallel=True)
def histogram(symbols, groups, group_len):  # pragma: no cover - compiled
    counts = np.zeros((groups, 256), dtype=np.int64)
    for g in prange(groups):
        base = g * group_len
        for i in range(group_len):
            counts[g, symbols[base + i]] += 1
    return counts


@njit(inline="always")
def _enc(x, f, c, buf, pos):  # pragma: no cover - compiled
    if x >= (f << np.uint64(20)):  # (RANS_L >> PROB_BITS) << 16 == 1 << 20
        buf[pos] = np.uint16(x & np.uint64(0xFFFF))
        pos += 1
        x >>= np.uint64(16)
    return ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c, pos


@njit(nogil=True, cache=True, parallel=True)
def encode_lanes(symbols, groups, group_len, lane_size, freq, cum, scratch, lane_words):  # pragma: no cover
    """Encode every lane into its row of `scratch` (in reading order, right-aligned); count its words."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    for lane in prange(groups * lanes_per_group):
        g = lane // lanes_per_group
        j = lane - g * lanes_per_group
        start = g * group_len + j * lane_size
        n = min(lane_size, group_len - j * lane_size)
        row = scratch[lane]
        pos = 0
        x0 = np.uint64(RANS_L)
        x1 = np.uint64(RANS_L)
        x2 = np.uint64(RANS_L)
        x3 = np.uint64(RANS_L)
        # rANS encodes backwards: the last symbol first, each with the state the decoder will use for it.
        for i in range(n - 1, -1, -1):
            s = symbols[start + i]
            f = np.uint64(freq[g, s])
            c = np.uint64(cum[g, s])
            k = i & 3
            if k == 0:
                x0, pos = _enc(x0, f, c, row, pos)
            elif k == 1:
                x1, pos = _enc(x1, f, c, row, pos)
            elif k == 2:
                x2, pos = _enc(x2, f, c, row, pos)
            else:
                x3, pos = _enc(x3, f, c, row, pos)
        for x in (x3, x2, x1, x0):  # emitted last = read first: x0 high, x0 low, x1 high, ...
            row[pos] = np.uint16(x & np.uint64(0xFFFF))
            row[pos + 1] = np.uint16(x >> np.uint64(16))
            pos += 2
        # Reverse in place so the lane reads forwards; its words occupy row[:pos].
        for a in range(pos // 2):
            tmp = row[a]
            row[a] = row[pos - 1 - a]
            row[pos - 1 - a] = tmp
        lane_words[lane] = pos


@njit(nogil=True, cache=True, parallel=True)
def gather_lanes(scratch, lane_words, offsets, out):  # pragma: no cover - compiled
    for lane in prange(lane_words.shape[0]):
        o = offsets[lane]
        for k in range(lane_words[lane]):
            out[o + k] = scratch[lane, k]


@njit(inline="always")
def _dec(x, slot2sym, freq, cum, words, pos):  # pragma: no cover - compiled
    slot = x & np.uint64(PROB_SCALE - 1)
    s = slot2sym[slot]
    x = np.uint64(freq[s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(cum[s])
    if x < np.uint64(RANS_L):
        x = (x << np.uint64(16)) | np.uint64(words[pos])
        pos += 1
    return x, s, pos


@njit(nogil=True, cache=True)
def _read_state(words, pos):  # pragma: no cover - compiled
    return (np.uint64(words[pos]) << np.uint64(16)) | np.uint64(words[pos + 1])


@njit(nogil=True, cache=True, parallel=True)
def decode_lanes(words, offsets, groups, group_len, lane_size, freq, cum, slot2sym, out):  # pragma: no cover
    """Decode every lane into `out` (uint8, groups * group_len). Returns the number of corrupt lanes."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    bad = np.zeros(groups * lanes_per_group, dtype=np.uint8)
    for lane in prange(groups * lanes_per_group):
        g = lane // lanes_per_group
        j = lane - g * lanes_per_group
        start = g * group_len + j * lane_size
        n = min(lane_size, group_len - j * lane_size)
        pos = offsets[lane]
        end = offsets[lane + 1]
        if end - pos < STATE_WORDS:
            bad[lane] = 1
            continue
        x0 = _read_state(words, pos)
        x1 = _read_state(words, pos + 2)
        x2 = _read_state(words, pos + 4)
        x3 = _read_state(words, pos + 6)
        pos += STATE_WORDS
        f_tab = freq[g]
        c_tab = cum[g]
        s_tab = slot2sym[g]
        n4 = n & ~3
        # A corrupt lane could read past its words; the bound costs one compare per four symbols.
        limit = end - 4
        i = 0
        while i < n4 and pos <= limit:
            x0, s, pos = _dec(x0, s_tab, f_tab, c_tab, words, pos)
            out[start + i] = s
            x1, s, pos = _dec(x1, s_tab, f_tab, c_tab, words, pos)
            out[start + i + 1] = s
            x2, s, pos = _dec(x2, s_tab, f_tab, c_tab, words, pos)
            out[start + i + 2] = s
            x3, s, pos = _dec(x3, s_tab, f_tab, c_tab, words, pos)
            out[start + i + 3] = s
            i += 4
        overflow = False
        while i < n:  # the tail, and any lane that ran near its end: check every read
            k = i & 3
            x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
            slot = x & np.uint64(PROB_SCALE - 1)
            s = s_tab[slot]
            x = np.uint64(f_tab[s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(c_tab[s])
            if x < np.uint64(RANS_L):
                if pos >= end:
                    overflow = True
                    break
                x = (x << np.uint64(16)) | np.uint64(words[pos])
                pos += 1
            out[start + i] = s
            if k == 0:
                x0 = x
            elif k == 1:
                x1 = x
            elif k == 2:
                x2 = x
            else:
                x3 = x
            i += 1
        # A whole lane ends with every word consumed and every state back at its start value.
        if overflow or pos != end or x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
            bad[lane] = 1
    return bad.sum()
