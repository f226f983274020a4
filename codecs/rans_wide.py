"""rANS with 32 states per lane on the CPU, coded 16 states at a time in vector registers.

`rans_cpu`'s lanes interleave four states in one stream. Its scalar loops ran at about 20 instructions a
symbol and were at their limit in Numba: eight states instead of four measured no faster. This coder uses the
same tables, probability scale and state bounds, but a lane has 32 states and a layout a vector unit can
follow (F. Giesen's interleaved rANS):

    symbol i of a lane belongs to state i % 32, and the lane is one stream of 16-bit words:
    its 32 final states first (x0 high, x0 low, x1 high, ...), then, step by step (32 symbols), the words of
    the states that renormalised after decoding their symbol, in state order.

A decoder gives each renormalising state the next unread word (an expand-load) and an encoder writes them
below the previous step's (a compress-store); each takes 16 states per vector operation
(`codecs/vector_ir.py`). Measured on SmolLM2 chunks: decode 2.5 -> 1.1 ms, encode 3.6 -> 0.9 ms a chunk. A blob
says which layout it holds (`rans_states` in cachegen's and kvtc's parameters), so blobs in the four-state
layout still decode. The GPU twin is `rans_cuda.encode_wide_kernel` / `decode_wide_kernel`.

A group (lanes never cross one) may have several tables, each for an equal segment of its symbols: kvtc's
bands. A step inside one segment is coded with vectors; one that crosses into the next, or a ragged last
step, one state at a time in the same layout.

Kernels are plain loops with no validation; `codecs/entropy.py` validates and calls them.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, get_thread_id, njit, prange, types
from numba.extending import intrinsic

from .rans_cpu import PROB_SCALE, RANS_L, fill_decoder_table
from .scratch import scratch
from .vector_ir import (
    I8,
    I16,
    I32,
    I64,
    WIDTH,
    array_data,
    compress_store,
    constant,
    element_pointer,
    expand_load,
    gather,
    popcount,
    vec,
    vector_pointer,
)

#: States per lane: two vectors of 16, so two independent chains of gathers overlap (16 states: 2.0 ms a
#: chunk's decode, 32: 1.1 ms, 64: 0.7 ms; each state also costs 4 bytes a lane for its final value).
STATES = 32
#: Words a lane's final states take.
STATE_WORDS = 2 * STATES
#: Encoder table fields packed in one 32-bit word per symbol, beside its reciprocal: freq (13 bits; up to
#: PROB_SCALE), bias (13 bits; up to 2 * PROB_SCALE - 2) and shift (4 bits; up to 11).
FREQ_BITS = 13
SHIFT_AT = 26


def table_scratch(segments: int) -> np.ndarray:
    """decode_lanes' per-thread table scratch for groups of `segments` tables (this thread's, reused)."""
    return scratch("rans_wide.tables", (get_num_threads(), segments, PROB_SCALE), np.uint32)


def encoder_tables(tab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rans_cpu.encoder_tables`' two words per symbol as two uint32 arrays [groups, 256]: the reciprocal, and
    freq | bias << 13 | shift << 26. A vector gathers one 32-bit word per state from each."""
    lo, hi = tab[..., 0], tab[..., 1]
    low32 = np.uint64(0xFFFFFFFF)
    rcp = (lo & low32).astype(np.uint32)
    packed = ((hi & low32) | ((lo >> np.uint64(32)) << np.uint64(FREQ_BITS)) | ((hi >> np.uint64(32)) << np.uint64(SHIFT_AT))).astype(
        np.uint32
    )
    return rcp, packed


def _int64(context, builder, value, value_type):  # type: ignore[no-untyped-def]
    return context.cast(builder, value, value_type, types.int64)


@intrinsic
def encode_step16(typingctx, rcp, packed, symbols, at, x, first, row, pos):  # type: ignore[no-untyped-def]
    """Encode symbols[at:at + 16] into states x[first:first + 16] (rcp, packed: one group's encoder tables).
    States that must renormalise first write their low words, in state order, just below row[pos]; returns the
    new pos."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        t = signature.args
        rcp_data, packed_data = array_data(context, builder, t[0], args[0]), array_data(context, builder, t[1], args[1])
        symbols_at = vector_pointer(builder, array_data(context, builder, t[2], args[2]), _int64(context, builder, args[3], t[3]), I8)
        states = vector_pointer(builder, array_data(context, builder, t[4], args[4]), _int64(context, builder, args[5], t[5]), I32)
        row_data, pos = array_data(context, builder, t[6], args[6]), _int64(context, builder, args[7], t[7])
        symbol = builder.zext(builder.load(symbols_at, align=1), vec(I32))
        reciprocal, fields = gather(builder, rcp_data, symbol, I32), gather(builder, packed_data, symbol, I32)
        freq = builder.and_(fields, constant(I32, (1 << FREQ_BITS) - 1))
        bias = builder.and_(builder.lshr(fields, constant(I32, FREQ_BITS)), constant(I32, (1 << FREQ_BITS) - 1))
        shift = builder.lshr(fields, constant(I32, SHIFT_AT))
        x_v = builder.load(states, align=4)
        # Renormalise: a state at or over freq << 20 (compared as x >> 20 >= freq: freq << 20 overflows 32
        # bits for a symbol that is the group's only one) writes its low word and drops it.
        emit = builder.icmp_unsigned(">=", builder.lshr(x_v, constant(I32, 20)), freq)
        pos = builder.sub(pos, popcount(builder, emit))
        compress_store(builder, builder.trunc(x_v, vec(I16)), element_pointer(builder, row_data, pos, I16), emit)
        x_v = builder.select(emit, builder.lshr(x_v, constant(I32, 16)), x_v)
        # x // freq by the reciprocal, exact after one correction (see rans_cpu._enc), then
        # x' = x + bias + q * (M - freq).
        wide = builder.mul(builder.zext(x_v, vec(I64)), builder.zext(reciprocal, vec(I64)))
        q = builder.lshr(builder.trunc(builder.lshr(wide, constant(I64, 32)), vec(I32)), shift)
        q = builder.sub(q, builder.zext(builder.icmp_unsigned(">", builder.mul(q, freq), x_v), vec(I32)))
        x_v = builder.add(builder.add(x_v, bias), builder.mul(q, builder.sub(constant(I32, PROB_SCALE), freq)))
        builder.store(x_v, states, align=4)
        return pos

    return types.int64(rcp, packed, symbols, at, x, first, row, pos), codegen


@intrinsic
def decode_step16(typingctx, tab, words, pos, x, first, out, at):  # type: ignore[no-untyped-def]
    """Decode states x[first:first + 16] (tab: the group's decoding table) into out[at:at + 16]; the states that
    fall below the bound take the next words from words[pos:], in state order. Returns the new pos (the
    caller makes sure 16 words are there to read)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        t = signature.args
        tab_data, words_data = array_data(context, builder, t[0], args[0]), array_data(context, builder, t[1], args[1])
        pos = _int64(context, builder, args[2], t[2])
        states = vector_pointer(builder, array_data(context, builder, t[3], args[3]), _int64(context, builder, args[4], t[4]), I32)
        out_at = vector_pointer(builder, array_data(context, builder, t[5], args[5]), _int64(context, builder, args[6], t[6]), I8)
        x_v = builder.load(states, align=4)
        entry = gather(builder, tab_data, builder.and_(x_v, constant(I32, PROB_SCALE - 1)), I32)
        builder.store(builder.trunc(entry, vec(I8)), out_at, align=1)
        # entry = symbol | (freq - 1) << 8 | (slot - cum) << 20: x' = freq * (x >> 12) + slot - cum.
        freq_less_one = builder.and_(builder.lshr(entry, constant(I32, 8)), constant(I32, 0xFFF))
        high = builder.lshr(x_v, constant(I32, 12))
        x_v = builder.add(builder.add(builder.mul(freq_less_one, high), high), builder.lshr(entry, constant(I32, 20)))
        take = builder.icmp_unsigned("<", x_v, constant(I32, RANS_L))
        word = expand_load(builder, element_pointer(builder, words_data, pos, I16), take, I16)
        x_v = builder.select(take, builder.or_(builder.shl(x_v, constant(I32, 16)), builder.zext(word, vec(I32))), x_v)
        builder.store(x_v, states, align=4)
        return builder.add(pos, popcount(builder, take))

    return types.int64(tab, words, pos, x, first, out, at), codegen


assert STATES == 2 * WIDTH  # the kernels below take a step as two vector operations


@njit(inline="always")
def _encode_symbol(x, reciprocal, fields):  # pragma: no cover - compiled
    """One renormalised state x (uint64) with one symbol's reciprocal and packed fields: encode_step16 on one
    state."""
    freq = fields & np.uint64((1 << FREQ_BITS) - 1)
    bias = (fields >> np.uint64(FREQ_BITS)) & np.uint64((1 << FREQ_BITS) - 1)
    q = ((x * reciprocal) >> np.uint64(32)) >> (fields >> np.uint64(SHIFT_AT))
    q -= np.uint64(q * freq > x)
    return x + bias + q * (np.uint64(PROB_SCALE) - freq)


@njit(inline="always")
def _encode_one_by_one(symbols, start, i, count, offset, segment_len, rcp, packed, row, pos, x):  # pragma: no cover
    """States 0 .. count - 1 of the step at lane position i, one at a time but in the vector steps' layout:
    first every renormalising state's word, in state order, then the symbols. For a ragged last step and for
    a step across two segments' tables."""
    emitting = 0
    for k in range(count):
        fields = np.uint64(packed[(offset + i + k) // segment_len, symbols[start + i + k]])
        emitting += np.int64((np.uint64(x[k]) >> np.uint64(20)) >= (fields & np.uint64((1 << FREQ_BITS) - 1)))
    pos -= emitting
    slot = pos
    for k in range(count):
        segment = (offset + i + k) // segment_len
        s = symbols[start + i + k]
        fields = np.uint64(packed[segment, s])
        xk = np.uint64(x[k])
        if (xk >> np.uint64(20)) >= (fields & np.uint64((1 << FREQ_BITS) - 1)):
            row[slot] = np.uint16(xk & np.uint64(0xFFFF))
            slot += 1
            xk >>= np.uint64(16)
        x[k] = np.uint32(_encode_symbol(xk, np.uint64(rcp[segment, s]), fields))
    return pos


@njit(inline="always")
def encode_lane(symbols, start, n, offset, segment_len, rcp, packed, row, x):  # pragma: no cover - compiled
    """Encode symbols[start:start + n] into the end of `row` (in reading order); returns how many words it
    took. The lane starts `offset` symbols into its group, whose tables rcp, packed [segments, 256] each cover
    `segment_len` symbols. x is scratch for the 32 states."""
    for k in range(STATES):
        x[k] = RANS_L
    pos = row.shape[0]
    full = n // STATES * STATES
    if full < n:  # rANS encodes backwards: the ragged last step first
        pos = _encode_one_by_one(symbols, start, full, n - full, offset, segment_len, rcp, packed, row, pos, x)
    # The segment holding the current step's last symbol, and where it starts (a division only where a step
    # leaves it: one per step would cost as much as coding a symbol).
    segment = (offset + max(full - 1, 0)) // segment_len
    segment_start = segment * segment_len
    for i in range(full - STATES, -1, -STATES):
        if offset + i + STATES - 1 < segment_start:
            segment = (offset + i + STATES - 1) // segment_len
            segment_start = segment * segment_len
        if offset + i >= segment_start:  # the whole step in one segment: its table, 16 states at a time
            pos = encode_step16(rcp[segment], packed[segment], symbols, start + i + WIDTH, x, WIDTH, row, pos)
            pos = encode_step16(rcp[segment], packed[segment], symbols, start + i, x, 0, row, pos)
        else:
            pos = _encode_one_by_one(symbols, start, i, STATES, offset, segment_len, rcp, packed, row, pos, x)
    for k in range(STATES - 1, -1, -1):  # written last, read first: x0 high, x0 low, x1 high, ...
        row[pos - 1] = np.uint16(x[k] & np.uint32(0xFFFF))
        row[pos - 2] = np.uint16(x[k] >> np.uint32(16))
        pos -= 2
    return row.shape[0] - pos


@njit(nogil=True, cache=True, parallel=True)
def encode_lanes(symbols, groups, group_len, lane_size, rcp, packed, scratch, lane_words):  # pragma: no cover
    """Encode every lane into its row of `scratch` (in reading order, right-aligned; a row holds lane_size +
    STATE_WORDS words); count its words. rcp, packed [groups, segments, 256]: each group's tables, each table
    for group_len / segments consecutive symbols."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    segment_len = group_len // rcp.shape[1]
    for lane in prange(groups * lanes_per_group):
        g = lane // lanes_per_group
        j = lane - g * lanes_per_group
        n = min(lane_size, group_len - j * lane_size)
        x = np.empty(STATES, dtype=np.uint32)
        start = g * group_len + j * lane_size
        lane_words[lane] = encode_lane(symbols, start, n, j * lane_size, segment_len, rcp[g], packed[g], scratch[lane], x)


@njit(inline="always")
def _decode_one_by_one(words, pos, end, i, count, offset, segment_len, tabs, out, start, x):  # pragma: no cover
    """States 0 .. count - 1 of the step at lane position i, one at a time, every read checked; the new pos,
    or -1 where the lane ran out of words (it is corrupt)."""
    for k in range(count):
        tab = tabs[(offset + i + k) // segment_len]
        xk = np.uint64(x[k])
        e = np.uint64(tab[xk & np.uint64(PROB_SCALE - 1)])
        high = xk >> np.uint64(12)
        xk = ((e >> np.uint64(8)) & np.uint64(0xFFF)) * high + high + (e >> np.uint64(20))
        if xk < np.uint64(RANS_L):
            if pos >= end:
                return -1
            xk = (xk << np.uint64(16)) | np.uint64(words[pos])
            pos += 1
        x[k] = np.uint32(xk)
        out[start + i + k] = np.uint8(e & np.uint64(0xFF))
    return pos


@njit(inline="always")
def decode_lane(words, pos, end, n, offset, segment_len, tabs, out, start, x):  # pragma: no cover - compiled
    """Decode the lane in words[pos:end] (n symbols, `offset` symbols into its group, whose decoding tables
    tabs [segments, PROB_SCALE] each cover `segment_len` symbols) into out[start:start + n]; False when it is
    corrupt: a whole lane ends with every word consumed and every state back at its start value. x is scratch
    for the 32 states."""
    if end - pos < STATE_WORDS:
        return False
    for k in range(STATES):
        x[k] = (np.uint32(words[pos + 2 * k]) << np.uint32(16)) | np.uint32(words[pos + 2 * k + 1])
    pos += STATE_WORDS
    full = n // STATES * STATES
    segment = offset // segment_len
    segment_end = (segment + 1) * segment_len
    i = 0
    # A step reads at most one word per state, so while 32 words remain it cannot read past the lane.
    while i < full and pos <= end - STATES:
        if offset + i >= segment_end:  # (a division only where a step enters another segment)
            segment = (offset + i) // segment_len
            segment_end = (segment + 1) * segment_len
        if offset + i + STATES <= segment_end:  # the whole step in one segment: its table, 16 states at a time
            pos = decode_step16(tabs[segment], words, pos, x, 0, out, start + i)
            pos = decode_step16(tabs[segment], words, pos, x, WIDTH, out, start + i + WIDTH)
        else:
            pos = _decode_one_by_one(words, pos, end, i, STATES, offset, segment_len, tabs, out, start, x)
            if pos < 0:
                return False
        i += STATES
    while i < n and pos >= 0:  # the last steps, whole or ragged, near the end of the words
        pos = _decode_one_by_one(words, pos, end, i, min(STATES, n - i), offset, segment_len, tabs, out, start, x)
        i += STATES
    if pos != end:
        return False
    for k in range(STATES):
        if x[k] != RANS_L:
            return False
    return True


@njit(inline="always")
def fill_group_tables(freq, cum, tabs):  # pragma: no cover - compiled
    """tabs [segments, PROB_SCALE]: the decoding tables of one group's segments (freq, cum [segments, 256])."""
    for segment in range(tabs.shape[0]):
        fill_decoder_table(freq[segment], cum[segment], tabs[segment])


@njit(nogil=True, cache=True, parallel=True)
def decode_lanes(words, offsets, groups, group_len, lane_size, freq, cum, tables, out):  # pragma: no cover
    """Decode every lane into `out` (uint8, groups * group_len), a group at a time with its tables built where
    its lanes are decoded (as rans_cpu.decode_lanes). freq, cum [groups, segments, 256]; tables [threads,
    segments, PROB_SCALE] is scratch for each thread's current group (kvtc's 8 tables a group are 128 KB,
    which a fresh array per group faulted in). Returns the number of corrupt lanes."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    segments = freq.shape[1]
    segment_len = group_len // segments
    bad = np.zeros(groups, dtype=np.int64)
    for g in prange(groups):
        tabs = tables[get_thread_id()]
        fill_group_tables(freq[g], cum[g], tabs)
        x = np.empty(STATES, dtype=np.uint32)
        for j in range(lanes_per_group):
            lane = g * lanes_per_group + j
            n = min(lane_size, group_len - j * lane_size)
            start = g * group_len + j * lane_size
            if not decode_lane(words, offsets[lane], offsets[lane + 1], n, j * lane_size, segment_len, tabs, out, start, x):
                bad[g] += 1
    return bad.sum()
