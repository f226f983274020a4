"""Entropy coding of byte symbols in groups: frequency tables, their compact serialisation, lanes of rANS.

This module validates and picks the target; `rans_cpu` (Numba) and `rans_cuda` (Numba-CUDA) hold the kernels.
Two lane layouts: four interleaved states per lane (`rans_cpu`, every blob before the vector coder) and 32
states coded 16 at a time in vector registers (`rans_wide`, 2-4× faster); `states` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from lmcached.errors import CodecError

from . import rans_cpu, rans_wide
from .rans_cpu import PROB_BITS, PROB_SCALE
from .scratch import scratch

#: Bytes ahead of each packed table: the first symbol it covers (u8) and how many (u16, little-endian).
TABLE_HEAD = 3


def normalize(counts: np.ndarray) -> np.ndarray:
    """Histograms [G, 256] -> frequencies summing to 2**PROB_BITS per group, every seen symbol at least 1."""
    return _normalize(np.ascontiguousarray(counts, dtype=np.int64))


@njit(nogil=True, cache=True)
def _normalize(counts):  # pragma: no cover - compiled
    # (Compiled: as a Python loop per group it cost 4.5 ms a chunk for kvtc's 480 groups.)
    groups = counts.shape[0]
    freq = np.zeros((groups, 256), dtype=np.int64)
    for g in range(groups):
        total = max(counts[g].sum(), 1)
        for s in range(256):
            f = counts[g, s] * PROB_SCALE // total
            freq[g, s] = 1 if f == 0 and counts[g, s] > 0 else f
        if freq[g].sum() == 0:  # an empty group still needs a valid table
            freq[g, 0] = PROB_SCALE
        diff = PROB_SCALE - freq[g].sum()
        while diff != 0:  # settle the rounding on the most frequent symbol (never below 1)
            top = np.argmax(freq[g])
            step = diff if diff > 0 else -min(-diff, freq[g, top] - 1)
            freq[g, top] += step
            diff -= step
    return freq.astype(np.uint32)


def pack_tables(freq: np.ndarray) -> bytes:
    """Only the span of symbols a table uses: first symbol, count, then 16-bit frequencies."""
    return _pack_tables(np.ascontiguousarray(freq, dtype=np.uint32)).tobytes()


@njit(nogil=True, cache=True)
def _pack_tables(freq):  # pragma: no cover - compiled
    # (Compiled: as a Python loop over 60 groups it took 0.12 ms a cachegen chunk, now 0.02.)
    groups = freq.shape[0]
    out = np.empty(groups * (TABLE_HEAD + 2 * 256), dtype=np.uint8)
    pos = 0
    for g in range(groups):
        first = 0
        while freq[g, first] == 0:  # normalize() leaves every table at least one symbol
            first += 1
        last = 255
        while freq[g, last] == 0:
            last -= 1
        count = last - first + 1
        out[pos] = first
        out[pos + 1] = count & 0xFF
        out[pos + 2] = count >> 8
        pos += TABLE_HEAD
        for s in range(first, last + 1):
            out[pos] = freq[g, s] & 0xFF
            out[pos + 1] = freq[g, s] >> 8
            pos += 2
    return out[:pos]


def unpack_tables(data: memoryview, groups: int) -> np.ndarray:
    freq = np.zeros((groups, 256), dtype=np.uint32)
    problem = _unpack_tables(np.frombuffer(data, dtype=np.uint8), freq)
    if problem:
        raise CodecError(_TABLE_PROBLEMS[problem])
    return freq


_TABLE_PROBLEMS = {1: "frequency tables are truncated", 2: "frequency table is malformed", 3: "frequency tables have trailing bytes"}


@njit(nogil=True, cache=True)
def _unpack_tables(raw, freq):  # pragma: no cover - compiled
    """The inverse of _pack_tables into freq [groups, 256]; 0, or what is wrong (a _TABLE_PROBLEMS key).
    (Compiled: as a Python loop it took 1.1 ms of a kvtc decode, with 480 tables a chunk.)"""
    pos = 0
    for g in range(freq.shape[0]):
        if pos + TABLE_HEAD > raw.shape[0]:
            return 1
        first = np.int64(raw[pos])
        count = np.int64(raw[pos + 1]) | (np.int64(raw[pos + 2]) << 8)
        pos += TABLE_HEAD
        if first + count > 256 or count == 0 or pos + 2 * count > raw.shape[0]:
            return 2
        for s in range(count):
            freq[g, first + s] = np.uint32(raw[pos]) | (np.uint32(raw[pos + 1]) << 8)
            pos += 2
    return 3 if pos != raw.shape[0] else 0


def cumulative(freq: np.ndarray) -> np.ndarray:
    """Each table's running sums: cum[g, s] = freq[g, :s].sum()."""
    return _cumulative(np.ascontiguousarray(freq))


@njit(nogil=True, cache=True)
def _cumulative(freq):  # pragma: no cover - compiled
    # (Compiled: numpy's cumsum along rows took 0.28 ms for kvtc's 480 tables, 15 % of its rANS decode.)
    cum = np.empty_like(freq)
    for g in range(freq.shape[0]):
        total = freq.dtype.type(0)
        for s in range(freq.shape[1]):
            cum[g, s] = total
            total += freq[g, s]
    return cum


#: States per lane of each layout, and the words their final values take at the start of a lane.
STATE_WORDS = {4: rans_cpu.STATE_WORDS, rans_wide.STATES: rans_wide.STATE_WORDS}
#: The layout of every blob written before `rans_wide`, and of blobs that do not say.
NARROW = 4
WIDE = rans_wide.STATES


@dataclass
class Coded:
    tables: bytes
    offsets: np.ndarray  # uint32 [lanes + 1], in words
    words: np.ndarray  # uint16
    states: int = NARROW  # states per lane: the layout


def lanes_for(group_len: int, lane_size: int) -> int:
    return -(-group_len // lane_size)


def check_states(states: object) -> int:
    """A lane layout (states per lane) as a blob gives it; CodecError for one this build does not know."""
    if isinstance(states, bool) or states not in STATE_WORDS:
        raise CodecError(f"blob names an unknown rANS lane layout ({states!r} states per lane)")
    return int(states)  # type: ignore[call-overload]


def encode(
    symbols: np.ndarray,
    groups: int,
    group_len: int,
    lane_size: int,
    counts: np.ndarray | None = None,
    states: int = NARROW,
    segments: int = 1,
    segment_len: int | None = None,
) -> Coded:
    """rANS-code `symbols` (uint8, groups * group_len) in lanes of `states` states, lane_size symbols each
    within a group. Each group has `segments` tables (WIDE only) that take turns, segment_len symbols each
    (default group_len / segments: one run of consecutive symbols per table; see `check_segments`);
    `counts` [groups * segments, 256], when the caller counted the symbols as it wrote them."""
    states = check_states(states)
    segments, segment_len = check_segments(group_len, states, segments, segment_len)
    tables = groups * segments
    if counts is None:
        cycles = group_len // (segments * segment_len)
        by_table = symbols.reshape(groups, cycles, segments, segment_len).transpose(0, 2, 1, 3)
        counts = rans_cpu.histogram(np.ascontiguousarray(by_table).reshape(-1), tables, group_len // segments)
    freq = normalize(counts)
    cum = cumulative(freq)
    tab = rans_cpu.encoder_tables(freq, cum)
    lanes = groups * lanes_for(group_len, lane_size)
    lane_buf = scratch("entropy.lanes", (lanes, lane_size + STATE_WORDS[states]), np.uint16)
    lane_words = np.zeros(lanes, dtype=np.int64)
    if states == WIDE:
        rcp, packed = rans_wide.encoder_tables(tab)
        by_group = (groups, segments, 256)
        rans_wide.encode_lanes(
            symbols, groups, group_len, lane_size, segment_len, rcp.reshape(by_group), packed.reshape(by_group), lane_buf, lane_words
        )
    else:
        rans_cpu.encode_lanes(symbols, groups, group_len, lane_size, tab, lane_buf, lane_words)
    offsets = np.zeros(lanes + 1, dtype=np.int64)
    np.cumsum(lane_words, out=offsets[1:])
    words = np.empty(int(offsets[-1]), dtype=np.uint16)
    rans_cpu.gather_lanes(lane_buf, lane_words, offsets, words)
    return Coded(pack_tables(freq), offsets.astype("<u4"), words, states)


def check_segments(group_len: int, states: int, segments: int, segment_len: int | None = None) -> tuple[int, int]:
    """(tables per group, symbols per turn): one table, or (WIDE lanes only) several that take turns,
    segment_len symbols each, a whole number of rounds per group. By default each table takes one turn."""
    if segment_len is None:
        segment_len = group_len // segments if segments >= 1 else 0
    if segments != 1 and (states != WIDE or segments < 1) or segment_len < 1 or group_len % (segments * segment_len):
        turns = f"{segments} tables of {segment_len} symbols a turn"
        raise CodecError(f"{turns} cannot split groups of {group_len} symbols in {states}-state lanes")
    return segments, segment_len


def decoder(
    tables: memoryview, offsets: np.ndarray, words: np.ndarray, groups: int, group_len: int, lane_size: int, segments: int = 1
) -> Decoder:
    """Check what `decode` needs: the frequency tables ([groups * segments, 256]) and the lane offsets (int64).
    Raises CodecError for tables or offsets that cannot be right. For kernels that decode lanes themselves."""
    freq = unpack_tables(tables, groups * segments)
    if not np.all(freq.sum(axis=1) == PROB_SCALE):
        raise CodecError("frequency table does not sum to the coder's scale")
    lanes = groups * lanes_for(group_len, lane_size)
    offsets = offsets.astype(np.int64)
    if offsets.shape[0] != lanes + 1 or offsets[0] != 0 or offsets[-1] != words.shape[0] or np.any(np.diff(offsets) < 0):
        raise CodecError("lane offsets do not match the coded words")
    return Decoder(freq, cumulative(freq), offsets)


@dataclass
class Decoder:
    freq: np.ndarray  # uint32 [groups, 256], each row summing to PROB_SCALE
    cum: np.ndarray  # its running sums
    offsets: np.ndarray  # int64 [lanes + 1], in words


def corrupt_lanes(bad: int) -> CodecError:
    return CodecError(f"{bad} rANS lane(s) failed to decode: the blob is corrupted")


def decode(
    tables: memoryview,
    offsets: np.ndarray,
    words: np.ndarray,
    groups: int,
    group_len: int,
    lane_size: int,
    states: int = NARROW,
    segments: int = 1,
    segment_len: int | None = None,
) -> np.ndarray:
    """Inverse of `encode`; raises CodecError when the coded data does not decode cleanly. The symbols are in
    this thread's scratch buffer: valid until its next decode."""
    states = check_states(states)
    segments, segment_len = check_segments(group_len, states, segments, segment_len)
    out = scratch("entropy.symbols", (groups * group_len,), np.uint8)  # the callers consume it at once
    if states == WIDE:
        _decode_wide(tables, offsets, words, groups, group_len, lane_size, segments, segment_len, group_len, out, None)
        return out
    d = decoder(tables, offsets, words, groups, group_len, lane_size, segments)
    bad = rans_cpu.decode_lanes(words, d.offsets, groups, group_len, lane_size, d.freq, d.cum, out)
    if bad:
        raise corrupt_lanes(bad)
    return out


def decode_scaled(
    tables: memoryview,
    offsets: np.ndarray,
    words: np.ndarray,
    lane_size: int,
    segments: int,
    segment_len: int,
    zero: int,
    scale: np.ndarray,
    row_scale: np.ndarray,
    out: np.ndarray,
) -> None:
    """`decode` of WIDE lanes straight to values: group g's symbols are rows (row_scale [groups, rows], float32)
    of columns (scale [groups, columns], float32), and the symbol s at row r, column c becomes
    (s - zero) * (scale[g, c] * row_scale[g, r]) in out (float32, or bfloat16 bits as uint16;
    [groups, rows, columns]). Raises CodecError as `decode` does."""
    groups, columns = scale.shape
    group_len = row_scale.shape[1] * columns
    if out.shape != (groups, row_scale.shape[1], columns) or row_scale.shape[0] != groups or not out.flags.c_contiguous:
        raise ValueError("decode_scaled: out, scale and row_scale do not agree")
    segments, segment_len = check_segments(group_len, WIDE, segments, segment_len)
    scaling = (np.int32(zero), np.ascontiguousarray(scale, np.float32), np.ascontiguousarray(row_scale, np.float32))
    _decode_wide(tables, offsets, words, groups, group_len, lane_size, segments, segment_len, columns, out.reshape(-1), scaling)


def _decode_wide(
    tables: memoryview,
    offsets: np.ndarray,
    words: np.ndarray,
    groups: int,
    group_len: int,
    lane_size: int,
    segments: int,
    segment_len: int,
    row_len: int,
    out: np.ndarray,
    scaling: tuple[np.int32, np.ndarray, np.ndarray] | None,
) -> None:
    """`decode` and `decode_scaled`'s 32-state lanes: `decoder`'s checks, then `rans_wide.decode_lanes` (see it
    for row_len and scaling); CodecError for corrupt lanes."""
    d = decoder(tables, offsets, words, groups, group_len, lane_size, segments)
    by_group = (groups, segments, 256)
    freq, cum = d.freq.reshape(by_group), d.cum.reshape(by_group)
    layout = (groups, group_len, lane_size, segment_len, row_len)
    bad = rans_wide.decode_lanes(words, d.offsets, *layout, freq, cum, rans_wide.table_scratch(segments), out, scaling)
    if bad:
        raise corrupt_lanes(bad)


__all__ = ["PROB_BITS", "Coded", "encode", "decode", "decode_scaled", "normalize"]
