"""rANS entropy coding on the GPU (Numba-CUDA): the twin of `rans_cpu`, one thread per lane, same format.

Kernels are plain loops with no validation; `codecs/gpu.py` validates, builds the tables on the host (they
are tiny) and launches them. Their logic runs without a GPU under NUMBA_ENABLE_CUDASIM=1 (see the tests).
"""

from __future__ import annotations

from numba import cuda, uint8, uint16, uint32, uint64

from .rans_cpu import PROB_BITS, PROB_SCALE, RANS_L, STATE_WORDS
from .rans_wide import FREQ_BITS, FREQ_MASK, SHIFT_AT, STATES

HIST_THREADS = 256


@cuda.jit
def histogram_kernel(symbols, group_len, segments, segment_len, counts):  # pragma: no cover - device code
    """Block (x: part, y: table) counts its table's symbols in shared memory, then adds them to the table's
    counts [groups * segments, 256]. A group's tables take turns, segment_len symbols each
    (`rans_wide.segment_at`)."""
    hist = cuda.shared.array(256, dtype=uint32)
    tid = cuda.threadIdx.x
    for i in range(tid, 256, cuda.blockDim.x):
        hist[i] = 0
    cuda.syncthreads()
    table = cuda.blockIdx.y
    g = table // segments
    first = g * group_len + (table - g * segments) * segment_len  # the table's first turn
    round_len = segments * segment_len
    stride = cuda.blockDim.x * cuda.gridDim.x
    i = cuda.blockIdx.x * cuda.blockDim.x + tid  # the i-th symbol of the table's
    while i < group_len // segments:
        turn = i // segment_len
        cuda.atomic.add(hist, symbols[first + turn * round_len + i - turn * segment_len], 1)
        i += stride
    cuda.syncthreads()
    for s in range(tid, 256, cuda.blockDim.x):
        if hist[s]:
            cuda.atomic.add(counts, (table, s), hist[s])


@cuda.jit(device=True, inline=True)
def _enc(x, lo, hi, row, pos):  # pragma: no cover - device code
    f = hi & uint64(0xFFFFFFFF)
    if x >= (f << uint64(20)):
        row[pos] = uint16(x & uint64(0xFFFF))
        pos += 1
        x >>= uint64(16)
    q = ((x * (lo & uint64(0xFFFFFFFF))) >> uint64(32)) >> (hi >> uint64(32))
    if q * f > x:  # the reciprocal can be one too high for states above 2**31: exact, as on the CPU
        q -= uint64(1)
    return x + (lo >> uint64(32)) + q * (uint64(PROB_SCALE) - f), pos


@cuda.jit
def encode_kernel(symbols, groups, group_len, lane_size, tab, scratch, lane_words):  # pragma: no cover
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    lane = cuda.grid(1)
    if lane >= groups * lanes_per_group:
        return
    g = lane // lanes_per_group
    j = lane - g * lanes_per_group
    start = g * group_len + j * lane_size
    n = min(lane_size, group_len - j * lane_size)
    row = scratch[lane]
    pos = 0
    x0 = uint64(RANS_L)
    x1 = uint64(RANS_L)
    x2 = uint64(RANS_L)
    x3 = uint64(RANS_L)
    for i in range(n - 1, -1, -1):
        sym = symbols[start + i]
        k = i & 3
        x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
        x, pos = _enc(x, tab[g, sym, 0], tab[g, sym, 1], row, pos)
        if k == 0:
            x0 = x
        elif k == 1:
            x1 = x
        elif k == 2:
            x2 = x
        else:
            x3 = x
    for k in range(4):  # emitted last = read first: x0 high, x0 low, x1 high, ...
        x = x3 if k == 0 else (x2 if k == 1 else (x1 if k == 2 else x0))
        row[pos] = uint16(x & uint64(0xFFFF))
        row[pos + 1] = uint16(x >> uint64(16))
        pos += 2
    for a in range(pos // 2):
        tmp = row[a]
        row[a] = row[pos - 1 - a]
        row[pos - 1 - a] = tmp
    lane_words[lane] = pos


@cuda.jit
def gather_kernel(scratch, lane_words, offsets, out):  # pragma: no cover - device code
    """Block per lane: its threads copy the lane's words to their place in the packed stream."""
    lane = cuda.blockIdx.x
    o = offsets[lane]
    for k in range(cuda.threadIdx.x, lane_words[lane], cuda.blockDim.x):
        out[o + k] = scratch[lane, k]


@cuda.jit
def decode_kernel(words, offsets, groups, group_len, lane_size, dtab, out, bad):  # pragma: no cover
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    lane = cuda.grid(1)
    if lane >= groups * lanes_per_group:
        return
    g = lane // lanes_per_group
    j = lane - g * lanes_per_group
    start = g * group_len + j * lane_size
    n = min(lane_size, group_len - j * lane_size)
    pos = offsets[lane]
    end = offsets[lane + 1]
    if end - pos < STATE_WORDS:
        bad[lane] = 1
        return
    x0 = (uint64(words[pos]) << uint64(16)) | uint64(words[pos + 1])
    x1 = (uint64(words[pos + 2]) << uint64(16)) | uint64(words[pos + 3])
    x2 = (uint64(words[pos + 4]) << uint64(16)) | uint64(words[pos + 5])
    x3 = (uint64(words[pos + 6]) << uint64(16)) | uint64(words[pos + 7])
    pos += STATE_WORDS
    for i in range(n):
        k = i & 3
        x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
        e = uint64(dtab[g, x & uint64(PROB_SCALE - 1)])
        x = ((e >> uint64(8)) & uint64(0xFFF)) * (x >> uint64(PROB_BITS)) + (x >> uint64(PROB_BITS)) + (e >> uint64(20))
        if x < uint64(RANS_L):
            if pos >= end:
                bad[lane] = 1
                return
            x = (x << uint64(16)) | uint64(words[pos])
            pos += 1
        out[start + i] = uint8(e & uint64(0xFF))
        if k == 0:
            x0 = x
        elif k == 1:
            x1 = x
        elif k == 2:
            x2 = x
        else:
            x3 = x
    if pos != end or x0 != RANS_L or x1 != RANS_L or x2 != RANS_L or x3 != RANS_L:
        bad[lane] = 1


# ---------------------------------------------------------------------------------------------- 32-state lanes
# The twins of `rans_wide` (its layout: symbol i of a lane is state i % 32's; a lane's words are its final
# states, then per step the words of the renormalising states in state order). A block of WIDE_STATES threads
# codes one lane, thread k holding state k; where a CPU vector takes an expand-load or compress-store, the
# threads count the flags of the states before them in shared memory.
WIDE_STATES = STATES


@cuda.jit(device=True, inline=True)
def _count_flags(flags, k):  # pragma: no cover - device code
    """(flags set before state k, flags set in all): where state k's word goes within its step's words."""
    before = 0
    total = 0
    for m in range(WIDE_STATES):
        total += flags[m]
        if m < k:
            before += flags[m]
    return before, total


@cuda.jit(device=True, inline=True)
def _block_lane(group_len, lane_size):  # pragma: no cover - device code
    """This block's lane: (lane, its group, its index in the group, its first symbol, its symbols)."""
    lanes_per_group = (group_len + lane_size - 1) // lane_size
    lane = cuda.blockIdx.x
    g = lane // lanes_per_group
    j = lane - g * lanes_per_group
    return lane, g, j, g * group_len + j * lane_size, min(lane_size, group_len - j * lane_size)


@cuda.jit(device=True, inline=True)
def _encode_wide_symbol(x, reciprocal, fields):  # pragma: no cover - device code
    """rans_wide._encode_symbol on the device."""
    freq = fields & uint64(FREQ_MASK)
    q = ((x * reciprocal) >> uint64(32)) >> (fields >> uint64(SHIFT_AT))
    if q * freq > x:
        q -= uint64(1)
    return x + ((fields >> uint64(FREQ_BITS)) & uint64(FREQ_MASK)) + q * (uint64(PROB_SCALE) - freq)


@cuda.jit
def encode_wide_kernel(symbols, group_len, lane_size, segments, segment_len, rcp, packed, scratch, lane_words):  # pragma: no cover
    """Block per lane (WIDE_STATES threads): encode it into the end of its scratch row, in reading order.
    rcp, packed [groups * segments, 256]: a group's tables, taking turns segment_len symbols each."""
    flags = cuda.shared.array(WIDE_STATES, dtype=uint32)
    lane, g, j, start, n = _block_lane(group_len, lane_size)
    k = cuda.threadIdx.x
    row = scratch[lane]
    pos = row.shape[0]
    x = uint64(RANS_L)
    for step in range((n + WIDE_STATES - 1) // WIDE_STATES - 1, -1, -1):  # backwards, as every rANS encoder
        i = step * WIDE_STATES + k
        active = i < n
        s = symbols[start + i] if active else uint8(0)
        table = g * segments + ((j * lane_size + i) // segment_len) % segments
        fields = uint64(packed[table, s])
        emit = active and (x >> uint64(20)) >= (fields & uint64(FREQ_MASK))
        flags[k] = 1 if emit else 0
        cuda.syncthreads()
        before, total = _count_flags(flags, k)
        cuda.syncthreads()  # every thread has read the flags before any step writes new ones
        if emit:
            row[pos - total + before] = uint16(x & uint64(0xFFFF))
            x >>= uint64(16)
        pos -= total
        if active:
            x = _encode_wide_symbol(x, uint64(rcp[table, s]), fields)
    pos -= 2 * WIDE_STATES  # the final states, read first: x0 high, x0 low, x1 high, ...
    row[pos + 2 * k] = uint16(x >> uint64(16))
    row[pos + 2 * k + 1] = uint16(x & uint64(0xFFFF))
    if k == 0:
        lane_words[lane] = row.shape[0] - pos


@cuda.jit
def gather_tail_kernel(scratch, lane_words, offsets, out):  # pragma: no cover - device code
    """Block per lane: copy the lane's words (the last lane_words[lane] of its scratch row) to their place."""
    lane = cuda.blockIdx.x
    o = offsets[lane]
    n = lane_words[lane]
    end = scratch.shape[1] - n
    for k in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        out[o + k] = scratch[lane, end + k]


@cuda.jit
def decode_wide_kernel(words, offsets, group_len, lane_size, segments, segment_len, dtab, out, bad):  # pragma: no cover
    """Block per lane (WIDE_STATES threads): decode it; bad[lane] = 1 when it is corrupt. dtab [groups *
    segments, PROB_SCALE]: a group's tables, taking turns segment_len symbols each."""
    flags = cuda.shared.array(WIDE_STATES, dtype=uint32)
    lane, g, j, start, n = _block_lane(group_len, lane_size)
    k = cuda.threadIdx.x
    pos = offsets[lane]
    end = offsets[lane + 1]
    if end - pos < 2 * WIDE_STATES:  # the same for every thread of the block: they all leave
        bad[lane] = 1
        return
    x = (uint64(words[pos + 2 * k]) << uint64(16)) | uint64(words[pos + 2 * k + 1])
    pos += 2 * WIDE_STATES
    broken = False
    for step in range((n + WIDE_STATES - 1) // WIDE_STATES):
        i = step * WIDE_STATES + k
        take = False
        if i < n:
            table = g * segments + ((j * lane_size + i) // segment_len) % segments
            e = uint64(dtab[table, x & uint64(PROB_SCALE - 1)])
            x = ((e >> uint64(8)) & uint64(0xFFF)) * (x >> uint64(PROB_BITS)) + (x >> uint64(PROB_BITS)) + (e >> uint64(20))
            take = x < uint64(RANS_L)
            out[start + i] = uint8(e & uint64(0xFF))
        flags[k] = 1 if take else 0
        cuda.syncthreads()
        before, total = _count_flags(flags, k)
        cuda.syncthreads()
        if take:
            if pos + before < end:
                x = (x << uint64(16)) | uint64(words[pos + before])
            else:
                broken = True
        pos += total
    if broken or pos != end or x != RANS_L:
        bad[lane] = 1
