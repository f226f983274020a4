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
        part = np.zeros((4, 256), dtype=np.int32)
        count_into(symbols[g * group_len : (g + 1) * group_len], part)
        sum_parts(part, counts[g])
    return counts


@njit(inline="always")
def count_into(symbols, part):  # pragma: no cover - compiled
    """Add `symbols` (1-D uint8) to part [4, 256]: four partial histograms, one per position mod 4. Quantised
    KV is mostly a few symbols, and one counter incremented back to back waits on its own previous store each
    time (1.0 -> 0.65 ms a chunk)."""
    n = symbols.shape[0]
    n4 = n & ~3
    for i in range(0, n4, 4):
        part[0, symbols[i]] += 1
        part[1, symbols[i + 1]] += 1
        part[2, symbols[i + 2]] += 1
        part[3, symbols[i + 3]] += 1
    for i in range(n4, n):
        part[0, symbols[i]] += 1


@njit(inline="always")
def sum_parts(part, counts):  # pragma: no cover - compiled
    """counts [256] = the four partial histograms of `count_into` added up."""
    for s in range(256):
        counts[s] = part[0, s] + part[1, s] + part[2, s] + part[3, s]


@njit(inline="always")
def _enc(x, lo, hi, buf, pos):  # pragma: no cover - compiled
    """One symbol: `lo` packs reciprocal | bias << 32, `hi` packs freq | shift << 32 (two loads, not five)."""
    f = hi & np.uint64(0xFFFFFFFF)
    # Branchless renormalisation: the word is always written, but only kept (pos advances) when the
    # state is over its bound; a data-dependent branch here mispredicts about a third of the time.
    out = np.uint64(x >= (f << np.uint64(20)))  # ((RANS_L >> PROB_BITS) << 16) * freq
    buf[pos] = np.uint16(x & np.uint64(0xFFFF))
    pos += out
    x >>= out << np.uint64(4)
    # x // freq by a multiply with a precomputed reciprocal (ryg_rans), then x' = x + bias + q * (M - freq).
    # ryg's 31-bit reciprocal is exact for states below 2**31; ours reach 2**32 (16-bit renormalisation), where
    # it can be one too high for a frequent symbol (blobs of skewed data did not decode). Rounded up, it is
    # never low and never two off (checked for every frequency), so one branch-free correction makes it exact.
    # (A frequency of 1 is ryg's special case, q = x - 1 on purpose: the correction leaves it alone.)
    q = ((x * (lo & np.uint64(0xFFFFFFFF))) >> np.uint64(32)) >> (hi >> np.uint64(32))
    q -= np.uint64(q * f > x)
    return x + (lo >> np.uint64(32)) + q * (np.uint64(PROB_SCALE) - f), pos


@njit(nogil=True, cache=True, parallel=True)
def encoder_tables(freq, cum):  # pragma: no cover - compiled
    """Per group and symbol, two words: reciprocal | bias << 32 and freq | shift << 32 (ryg_rans's method)."""
    groups = freq.shape[0]
    tab = np.zeros((groups, 256, 2), dtype=np.uint64)
    for g in prange(groups):
        for s in range(256):
            f = np.uint64(freq[g, s])
            if f == 0:
                continue
            if f < 2:
                rcp = np.uint64(0xFFFFFFFF)
                shift = np.uint64(0)
                bias = np.uint64(cum[g, s]) + np.uint64(PROB_SCALE) - np.uint64(1)
            else:
                shift = np.uint64(0)
                while (np.uint64(1) << shift) < f:
                    shift += np.uint64(1)
                rcp = ((np.uint64(1) << (shift + np.uint64(31))) + f - np.uint64(1)) // f
                shift -= np.uint64(1)
                bias = np.uint64(cum[g, s])
            tab[g, s, 0] = rcp | (bias << np.uint64(32))
            tab[g, s, 1] = f | (shift << np.uint64(32))
    return tab


@njit(nogil=True, cache=True, parallel=True)
def encode_lanes(symbols, groups, group_len, lane_size, tab, scratch, lane_words):  # pragma: no cover
    """Encode every lane into its row of `scratch` (in reading order, right-aligned); count its words."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    for lane in prange(groups * lanes_per_group):
        g = lane // lanes_per_group
        j = lane - g * lanes_per_group
        start = g * group_len + j * lane_size
        n = min(lane_size, group_len - j * lane_size)
        # Words are emitted last-read-first, so they are written from the row's end backwards (through a
        # reversed view): the lane then sits in reading order at the end of its row, with no reversal pass.
        row = scratch[lane, ::-1]
        pos = 0
        x0 = np.uint64(RANS_L)
        x1 = np.uint64(RANS_L)
        x2 = np.uint64(RANS_L)
        x3 = np.uint64(RANS_L)
        # rANS encodes backwards: the last symbol first, each with the state the decoder will use for it.
        n4 = n & ~3
        # rANS encodes backwards, each symbol with the state its decoder will use (i % 4): first the
        # ragged tail one by one, then whole groups of four, unrolled.
        for i in range(n - 1, n4 - 1, -1):
            sym = symbols[start + i]
            k = i & 3
            x = x0 if k == 0 else (x1 if k == 1 else x2)
            x, pos = _enc(x, tab[g, sym, 0], tab[g, sym, 1], row, pos)
            if k == 0:
                x0 = x
            elif k == 1:
                x1 = x
            else:
                x2 = x
        for i in range(n4 - 4, -1, -4):
            base = start + i
            sym = symbols[base + 3]
            x3, pos = _enc(x3, tab[g, sym, 0], tab[g, sym, 1], row, pos)
            sym = symbols[base + 2]
            x2, pos = _enc(x2, tab[g, sym, 0], tab[g, sym, 1], row, pos)
            sym = symbols[base + 1]
            x1, pos = _enc(x1, tab[g, sym, 0], tab[g, sym, 1], row, pos)
            sym = symbols[base]
            x0, pos = _enc(x0, tab[g, sym, 0], tab[g, sym, 1], row, pos)
        for x in (x3, x2, x1, x0):  # emitted last = read first: x0 high, x0 low, x1 high, ...
            row[pos] = np.uint16(x & np.uint64(0xFFFF))
            row[pos + 1] = np.uint16(x >> np.uint64(16))
            pos += 2
        lane_words[lane] = pos  # in reading order at scratch[lane, -pos:]


@njit(nogil=True, cache=True, parallel=True)
def gather_lanes(scratch, lane_words, offsets, out):  # pragma: no cover - compiled
    """Each lane's words (the last lane_words[lane] of its scratch row) to out[offsets[lane]:]."""
    for lane in prange(lane_words.shape[0]):
        o = offsets[lane]
        n = lane_words[lane]
        end = scratch.shape[1] - n
        for k in range(n):
            out[o + k] = scratch[lane, end + k]


@njit(inline="always")
def fill_decoder_table(freq, cum, tab):  # pragma: no cover - compiled
    """One group's table: per slot, one 32-bit entry symbol | (freq - 1) << 8 | (slot - cum) << 20, so a
    symbol costs one load."""
    for s in range(256):
        f = freq[s]
        c = cum[s]
        entry = np.uint32(s) | (np.uint32(f - 1) << np.uint32(8))
        for j in range(f):
            tab[c + j] = entry | (np.uint32(j) << np.uint32(20))


@njit(nogil=True, cache=True, parallel=True)
def decoder_tables(freq, cum):  # pragma: no cover - compiled
    """Every group's table at once (for the GPU, which decodes from device memory)."""
    groups = freq.shape[0]
    tab = np.zeros((groups, PROB_SCALE), dtype=np.uint32)
    for g in prange(groups):
        fill_decoder_table(freq[g], cum[g], tab[g])
    return tab


@njit(inline="always")
def _dec(x, tab, words, pos):  # pragma: no cover - compiled
    """One symbol, branchless: the next word is always read (the caller guarantees it exists) and kept only
    when the state fell below its bound."""
    e = np.uint64(tab[x & np.uint64(PROB_SCALE - 1)])
    x = ((e >> np.uint64(8)) & np.uint64(0xFFF)) * (x >> np.uint64(PROB_BITS)) + (x >> np.uint64(PROB_BITS)) + (e >> np.uint64(20))
    take = np.uint64(x < np.uint64(RANS_L))
    shift = take << np.uint64(4)
    x = (x << shift) | (np.uint64(words[pos]) & (np.uint64(0) - take))
    return x, np.uint8(e & np.uint64(0xFF)), pos + np.int64(take)


@njit(nogil=True, cache=True)
def _read_state(words, pos):  # pragma: no cover - compiled
    return (np.uint64(words[pos]) << np.uint64(16)) | np.uint64(words[pos + 1])


@njit(inline="always")
def decode_lane(words, pos, end, n, d_tab, out, start):  # pragma: no cover - compiled
    """Decode the lane in words[pos:end] (n symbols, table d_tab) into out[start:start + n]; False when it is
    corrupt: a whole lane ends with every word consumed and every state back at its start value."""
    if end - pos < STATE_WORDS:
        return False
    x0 = _read_state(words, pos)
    x1 = _read_state(words, pos + 2)
    x2 = _read_state(words, pos + 4)
    x3 = _read_state(words, pos + 6)
    pos += STATE_WORDS
    n4 = n & ~3
    # A corrupt lane could read past its words; the bound costs one compare per four symbols.
    limit = end - 4
    i = 0
    while i < n4 and pos <= limit:
        x0, s, pos = _dec(x0, d_tab, words, pos)
        out[start + i] = s
        x1, s, pos = _dec(x1, d_tab, words, pos)
        out[start + i + 1] = s
        x2, s, pos = _dec(x2, d_tab, words, pos)
        out[start + i + 2] = s
        x3, s, pos = _dec(x3, d_tab, words, pos)
        out[start + i + 3] = s
        i += 4
    while i < n:  # the tail, and any lane that ran near its end: check every read
        k = i & 3
        x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
        e = np.uint64(d_tab[x & np.uint64(PROB_SCALE - 1)])
        s = np.uint8(e & np.uint64(0xFF))
        x = ((e >> np.uint64(8)) & np.uint64(0xFFF)) * (x >> np.uint64(PROB_BITS)) + (x >> np.uint64(PROB_BITS)) + (e >> np.uint64(20))
        if x < np.uint64(RANS_L):
            if pos >= end:
                return False
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
    return pos == end and x0 == RANS_L and x1 == RANS_L and x2 == RANS_L and x3 == RANS_L


@njit(nogil=True, cache=True, parallel=True)
def decode_lanes(words, offsets, groups, group_len, lane_size, freq, cum, out):  # pragma: no cover
    """Decode every lane into `out` (uint8, groups * group_len), a group at a time: its table is built where
    its lanes are decoded, in the core's cache (a table is 16 KB; kvtc's 480 groups of ~6,000 symbols built
    them all up front as 7.8 MB, 1.7 ms of a 10 ms decode). Returns the number of corrupt lanes."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    bad = np.zeros(groups, dtype=np.int64)
    for g in prange(groups):
        tab = np.empty(PROB_SCALE, dtype=np.uint32)
        fill_decoder_table(freq[g], cum[g], tab)
        for j in range(lanes_per_group):
            lane = g * lanes_per_group + j
            n = min(lane_size, group_len - j * lane_size)
            if not decode_lane(words, offsets[lane], offsets[lane + 1], n, tab, out, g * group_len + j * lane_size):
                bad[g] += 1
    return bad.sum()
