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

A group (lanes never cross one) may have several tables that take turns, segment_len symbols each
(`segment_at`): kvtc's bands of components along each token's row (older kvtc blobs: one run of consecutive
symbols per table). A step inside one segment is coded with vectors; one that crosses into the next, or a
ragged last step, one state at a time in the same layout. The decoder can also write each symbol straight
as a value, (s - zero) * column scale * row scale (kvtc's dequantisation), so the symbols never go to memory.

Kernels are plain loops with no validation; `codecs/entropy.py` validates and calls them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, get_thread_id, njit, prange, types
from numba.extending import intrinsic

from .half import as_stored
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
    splat,
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
FREQ_MASK = (1 << FREQ_BITS) - 1
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
        freq = builder.and_(fields, constant(I32, FREQ_MASK))
        bias = builder.and_(builder.lshr(fields, constant(I32, FREQ_BITS)), constant(I32, FREQ_MASK))
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


def _decode_vector(context, builder, t, args):  # type: ignore[no-untyped-def]
    """The body both decoding steps share (args: tab, words, pos, x, first): decode the 16 states, take their
    words. Returns (the 16 table entries, symbol | (freq - 1) << 8 | (slot - cum) << 20, and the new pos)."""
    tab_data, words_data = array_data(context, builder, t[0], args[0]), array_data(context, builder, t[1], args[1])
    pos = _int64(context, builder, args[2], t[2])
    states = vector_pointer(builder, array_data(context, builder, t[3], args[3]), _int64(context, builder, args[4], t[4]), I32)
    x_v = builder.load(states, align=4)
    entry = gather(builder, tab_data, builder.and_(x_v, constant(I32, PROB_SCALE - 1)), I32)
    # entry = symbol | (freq - 1) << 8 | (slot - cum) << 20: x' = freq * (x >> 12) + slot - cum.
    freq_less_one = builder.and_(builder.lshr(entry, constant(I32, 8)), constant(I32, 0xFFF))
    high = builder.lshr(x_v, constant(I32, 12))
    x_v = builder.add(builder.add(builder.mul(freq_less_one, high), high), builder.lshr(entry, constant(I32, 20)))
    take = builder.icmp_unsigned("<", x_v, constant(I32, RANS_L))
    word = expand_load(builder, element_pointer(builder, words_data, pos, I16), take, I16)
    x_v = builder.select(take, builder.or_(builder.shl(x_v, constant(I32, 16)), builder.zext(word, vec(I32))), x_v)
    builder.store(x_v, states, align=4)
    return entry, builder.add(pos, popcount(builder, take))


@intrinsic
def decode_step16(typingctx, tab, words, pos, x, first, out, at):  # type: ignore[no-untyped-def]
    """Decode states x[first:first + 16] (tab: the group's decoding table) into out[at:at + 16]; the states that
    fall below the bound take the next words from words[pos:], in state order. Returns the new pos (the
    caller makes sure 16 words are there to read)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        t = signature.args
        entry, pos = _decode_vector(context, builder, t, args)
        out_at = vector_pointer(builder, array_data(context, builder, t[5], args[5]), _int64(context, builder, args[6], t[6]), I8)
        builder.store(builder.trunc(entry, vec(I8)), out_at, align=1)
        return pos

    return types.int64(tab, words, pos, x, first, out, at), codegen


@intrinsic
def decode_step16_scaled(typingctx, tab, words, pos, x, first, out, at, zero, scale, scale_at, row_scale):  # type: ignore[no-untyped-def]
    """decode_step16, writing each symbol s as (s - zero) * (scale[scale_at + i] * row_scale) into out[at + i]:
    float32, or (out uint16) its bfloat16 bits rounded to nearest even, as `half.f32_to_bf16_bits` rounds a
    finite value. scale is float32."""
    bfloat = out.dtype == types.uint16
    if not bfloat and out.dtype != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        t = signature.args
        entry, pos = _decode_vector(context, builder, t, args)
        floats = ir.VectorType(ir.FloatType(), WIDTH)
        symbol = builder.and_(entry, constant(I32, 0xFF))
        zero = splat(builder, context.cast(builder, args[7], t[7], types.int32))
        level = builder.sitofp(builder.sub(symbol, zero), floats)
        scale_data = array_data(context, builder, t[8], args[8])
        scale_at = vector_pointer(builder, scale_data, _int64(context, builder, args[9], t[9]), I32)
        column_scale = builder.bitcast(builder.load(scale_at, align=4), floats)
        row = context.cast(builder, args[10], t[10], types.float32)
        value = builder.fmul(level, builder.fmul(column_scale, splat(builder, row)))
        out_data, at = array_data(context, builder, t[5], args[5]), _int64(context, builder, args[6], t[6])
        bits = builder.bitcast(value, vec(I32))
        if bfloat:
            odd = builder.and_(builder.lshr(bits, constant(I32, 16)), constant(I32, 1))
            rounded = builder.lshr(builder.add(builder.add(bits, constant(I32, 0x7FFF)), odd), constant(I32, 16))
            builder.store(builder.trunc(rounded, vec(I16)), vector_pointer(builder, out_data, at, I16), align=2)
        else:
            builder.store(bits, vector_pointer(builder, out_data, at, I32), align=4)
        return pos

    return types.int64(tab, words, pos, x, first, out, at, zero, scale, scale_at, row_scale), codegen


assert STATES == 2 * WIDTH  # the kernels below take a step as two vector operations


@njit(inline="always")
def _encode_symbol(x, reciprocal, fields):  # pragma: no cover - compiled
    """One renormalised state x (uint64) with one symbol's reciprocal and packed fields: encode_step16 on one
    state."""
    freq = fields & np.uint64(FREQ_MASK)
    bias = (fields >> np.uint64(FREQ_BITS)) & np.uint64(FREQ_MASK)
    q = ((x * reciprocal) >> np.uint64(32)) >> (fields >> np.uint64(SHIFT_AT))
    q -= np.uint64(q * freq > x)
    return x + bias + q * (np.uint64(PROB_SCALE) - freq)


@njit(inline="always")
def segment_at(position, segment_len, segments):  # pragma: no cover - compiled
    """(table, how far into its segment) of the symbol `position` symbols into its group. A group's tables take
    turns, segment_len symbols each: with segments * segment_len = group_len each table has one run of
    consecutive symbols; kvtc's bands of components take turns along each token's row."""
    run = position // segment_len
    return run % segments, position - run * segment_len


@njit(inline="always")
def _encode_one_by_one(symbols, start, i, count, offset, segment_len, rcp, packed, row, pos, x):  # pragma: no cover
    """States 0 .. count - 1 of the step at lane position i, one at a time but in the vector steps' layout:
    first every renormalising state's word, in state order, then the symbols. For a ragged last step and for
    a step across two segments."""
    segments = packed.shape[0]
    emitting = 0
    for k in range(count):
        fields = np.uint64(packed[segment_at(offset + i + k, segment_len, segments)[0], symbols[start + i + k]])
        emitting += np.int64((np.uint64(x[k]) >> np.uint64(20)) >= (fields & np.uint64(FREQ_MASK)))
    pos -= emitting
    slot = pos
    for k in range(count):
        table = segment_at(offset + i + k, segment_len, segments)[0]
        s = symbols[start + i + k]
        fields = np.uint64(packed[table, s])
        xk = np.uint64(x[k])
        if (xk >> np.uint64(20)) >= (fields & np.uint64(FREQ_MASK)):
            row[slot] = np.uint16(xk & np.uint64(0xFFFF))
            slot += 1
            xk >>= np.uint64(16)
        x[k] = np.uint32(_encode_symbol(xk, np.uint64(rcp[table, s]), fields))
    return pos


@njit(inline="always")
def encode_lane(symbols, start, n, offset, segment_len, rcp, packed, row, x):  # pragma: no cover - compiled
    """Encode symbols[start:start + n] into the end of `row` (in reading order); returns how many words it
    took. The lane starts `offset` symbols into its group, whose tables rcp, packed [segments, 256] take turns,
    segment_len symbols each (`segment_at`). x is scratch for the 32 states."""
    segments = packed.shape[0]
    for k in range(STATES):
        x[k] = RANS_L
    pos = row.shape[0]
    full = n // STATES * STATES
    if full < n:  # rANS encodes backwards: the ragged last step first
        pos = _encode_one_by_one(symbols, start, full, n - full, offset, segment_len, rcp, packed, row, pos, x)
    # The table of the current step's first symbol and how far into its segment that is, kept step by step (a
    # division per step would cost as much as coding a symbol).
    table, into = segment_at(offset + max(full - STATES, 0), segment_len, segments)
    for i in range(full - STATES, -1, -STATES):
        if into + STATES <= segment_len:  # the whole step in one segment: its table, 16 states at a time
            pos = encode_step16(rcp[table], packed[table], symbols, start + i + WIDTH, x, WIDTH, row, pos)
            pos = encode_step16(rcp[table], packed[table], symbols, start + i, x, 0, row, pos)
        else:
            pos = _encode_one_by_one(symbols, start, i, STATES, offset, segment_len, rcp, packed, row, pos, x)
        into -= STATES
        while into < 0:
            into += segment_len
            table = table - 1 if table > 0 else segments - 1
    for k in range(STATES - 1, -1, -1):  # written last, read first: x0 high, x0 low, x1 high, ...
        row[pos - 1] = np.uint16(x[k] & np.uint32(0xFFFF))
        row[pos - 2] = np.uint16(x[k] >> np.uint32(16))
        pos -= 2
    return row.shape[0] - pos


@njit(nogil=True, cache=True, parallel=True)
def encode_lanes(symbols, groups, group_len, lane_size, segment_len, rcp, packed, scratch, lane_words):  # pragma: no cover
    """Encode every lane into its row of `scratch` (in reading order, right-aligned; a row holds lane_size +
    STATE_WORDS words); count its words. rcp, packed [groups, segments, 256]: each group's tables, taking
    turns segment_len symbols each."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    for lane in prange(groups * lanes_per_group):
        g = lane // lanes_per_group
        j = lane - g * lanes_per_group
        n = min(lane_size, group_len - j * lane_size)
        x = np.empty(STATES, dtype=np.uint32)
        start = g * group_len + j * lane_size
        lane_words[lane] = encode_lane(symbols, start, n, j * lane_size, segment_len, rcp[g], packed[g], scratch[lane], x)


@njit(inline="always")
def _decode_one_by_one(words, pos, end, i, count, offset, segment_len, row_len, tabs, out, start, x, scaling):  # pragma: no cover
    """States 0 .. count - 1 of the step at lane position i, one at a time, every read checked; the new pos,
    or -1 where the lane ran out of words (it is corrupt)."""
    for k in range(count):
        position = offset + i + k
        tab = tabs[segment_at(position, segment_len, tabs.shape[0])[0]]
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
        symbol = np.uint8(e & np.uint64(0xFF))
        if scaling is None:
            out[start + i + k] = symbol
        else:
            zero, scale, row_scale = scaling
            row, column = position // row_len, position % row_len
            out[start + i + k] = as_stored(np.float32(np.int32(symbol) - zero) * (scale[column] * row_scale[row]), out)
    return pos


@njit(inline="always")
def decode_lane(words, pos, end, n, offset, segment_len, row_len, tabs, out, start, x, scaling):  # pragma: no cover - compiled
    """Decode the lane in words[pos:end] (n symbols, `offset` symbols into its group, whose decoding tables
    tabs [segments, PROB_SCALE] take turns, segment_len symbols each: `segment_at`) into out[start:start + n];
    False when it is corrupt: a whole lane ends with every word consumed and every state back at its start
    value. x is scratch for the 32 states.

    scaling None: out (uint8) gets the symbols. Or (zero, scale, row_scale) of this group, whose symbols are
    rows of row_len: out gets each symbol s of row r, column c as (s - zero) * (scale[c] * row_scale[r]), float32
    or bfloat16 bits (out uint16), written as it is decoded (kvtc's dequantisation, without a pass of its own).
    Steps inside one row and one segment go 16 states at a time."""
    if end - pos < STATE_WORDS:
        return False
    for k in range(STATES):
        x[k] = (np.uint32(words[pos + 2 * k]) << np.uint32(16)) | np.uint32(words[pos + 2 * k + 1])
    pos += STATE_WORDS
    segments = tabs.shape[0]
    full = n // STATES * STATES
    # Where the current step starts: its table and how far into that table's segment, its row and column; kept
    # step by step (a division per step would cost as much as decoding a symbol).
    table, into = segment_at(offset, segment_len, segments)
    row, column = offset // row_len, offset % row_len
    i = 0
    # A step reads at most one word per state, so while 32 words remain it cannot read past the lane.
    while i < full and pos <= end - STATES:
        if into + STATES <= segment_len and column + STATES <= row_len:
            tab = tabs[table]
            if scaling is None:
                pos = decode_step16(tab, words, pos, x, 0, out, start + i)
                pos = decode_step16(tab, words, pos, x, WIDTH, out, start + i + WIDTH)
            else:
                zero, scale, row_scale = scaling
                k = row_scale[row]
                pos = decode_step16_scaled(tab, words, pos, x, 0, out, start + i, zero, scale, column, k)
                pos = decode_step16_scaled(tab, words, pos, x, WIDTH, out, start + i + WIDTH, zero, scale, column + WIDTH, k)
        else:
            pos = _decode_one_by_one(words, pos, end, i, STATES, offset, segment_len, row_len, tabs, out, start, x, scaling)
            if pos < 0:
                return False
        i += STATES
        into += STATES
        while into >= segment_len:
            into -= segment_len
            table = table + 1 if table + 1 < segments else 0
        column += STATES
        while column >= row_len:
            column -= row_len
            row += 1
    while i < n and pos >= 0:  # the last steps, whole or ragged, near the end of the words
        pos = _decode_one_by_one(words, pos, end, i, min(STATES, n - i), offset, segment_len, row_len, tabs, out, start, x, scaling)
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
def decode_lanes(words, offsets, groups, group_len, lane_size, segment_len, row_len, freq, cum, tables, out, scaling):  # pragma: no cover
    """Decode every lane into `out` (groups * group_len), a group at a time with its tables built where its
    lanes are decoded (as rans_cpu.decode_lanes). freq, cum [groups, segments, 256]; tables [threads, segments,
    PROB_SCALE] is scratch for each thread's current group (kvtc's tables for a group are 96 KB, which a
    fresh array per group faulted in). scaling: None (out uint8: the symbols), or (zero, scale [groups,
    row_len], row_scale [groups, group_len / row_len]) for `decode_lane` to dequantise with. Returns the
    number of corrupt lanes."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    bad = np.zeros(groups, dtype=np.int64)
    for g in prange(groups):
        tabs = tables[get_thread_id()]
        fill_group_tables(freq[g], cum[g], tabs)
        x = np.empty(STATES, dtype=np.uint32)
        for j in range(lanes_per_group):
            lane = g * lanes_per_group + j
            n = min(lane_size, group_len - j * lane_size)
            start = g * group_len + j * lane_size
            begin, end, offset = offsets[lane], offsets[lane + 1], j * lane_size
            if scaling is None:
                ok = decode_lane(words, begin, end, n, offset, segment_len, row_len, tabs, out, start, x, None)
            else:
                group_scaling = (scaling[0], scaling[1][g], scaling[2][g])
                ok = decode_lane(words, begin, end, n, offset, segment_len, row_len, tabs, out, start, x, group_scaling)
            if not ok:
                bad[g] += 1
    return bad.sum()
