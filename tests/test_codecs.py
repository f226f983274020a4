"""The codec contract: round trips, the versioned format, golden blobs, corrupt blobs, kernels vs references."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmcached.codecs import available_codecs, decode, entropy, get_codec, quant_cpu, rans_cpu
from lmcached.codecs.format import FORMAT_VERSION, MAGIC, TRAILERS, unpack

from lmcached.errors import CodecError

from .codec_helpers import assert_round_trip, kv_like_real, relative_error

GOLDEN = Path(__file__).parent.parent / "codecs" / "golden"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_registry() -> None:
    assert available_codecs() == ["cachegen", "kvtc", "lossless"]
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        get_codec("zip")
    with pytest.raises(CodecError, match="unknown cachegen parameter"):
        get_codec("cachegen", bins=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DTYPES), st.integers(1, 4), st.integers(1, 40), st.integers(1, 48), st.integers(0, 2**31))
def test_lossless_round_trip_is_bit_exact(dtype: torch.dtype, layers: int, tokens: int, channels: int, seed: int) -> None:
    assert_round_trip(get_codec("lossless"), kv_like_real(layers, tokens, channels, dtype, seed))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DTYPES), st.integers(1, 4), st.integers(2, 40), st.integers(1, 48), st.integers(0, 2**31))
def test_cachegen_round_trip_within_error(dtype: torch.dtype, layers: int, tokens: int, channels: int, seed: int) -> None:
    kv = kv_like_real(layers, tokens, channels, dtype, seed)
    codec = get_codec("cachegen")
    blob = assert_round_trip(codec, kv, max_relative_error=0.3)
    assert torch.equal(codec.decode(blob)[:, :, :1], kv[:, :, :1])  # the sink row is exact


def test_lossless_keeps_special_values() -> None:
    kv = kv_like_real(2, 16, 8, torch.float16)
    kv[0, 0, 0, 0], kv[1, 1, 2, 3], kv[0, 1, 5, 7] = float("nan"), float("inf"), -0.0
    assert_round_trip(get_codec("lossless"), kv)


def test_cachegen_refuses_non_finite_values() -> None:
    kv = kv_like_real(2, 16, 8, torch.float16)
    kv[1, 0, 3, 2] = float("inf")
    with pytest.raises(CodecError, match="NaN or infinite"):
        get_codec("cachegen").encode(kv)


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 2, 4, 4), torch.zeros(2, 2, 4), torch.zeros(2, 2, 0, 4), torch.zeros(2, 1, 4, 4, dtype=torch.int32), "kv"]
)
def test_bad_inputs_raise_codec_error(bad: object) -> None:
    for name in available_codecs():
        with pytest.raises(CodecError):
            get_codec(name).encode(bad)  # type: ignore[arg-type]


def test_cachegen_compresses_real_shaped_kv_about_five_times() -> None:
    kv = kv_like_real(4, 256, 192, torch.float16)
    blob = get_codec("cachegen").encode(kv)
    assert kv.numel() * 2 / len(blob) > 4.0


def test_keys_get_one_step_per_layer_and_a_loud_channel_never_clips() -> None:
    """Key steps are equal across a layer's channels (a fraction of its typical spread), except where that
    step would clip a loud channel's values: there the step grows just enough, and the error stays within
    half a step everywhere."""
    from lmcached.codecs.cachegen import key_steps

    kv = kv_like_real(2, 64, 32, torch.float32)
    kv[0, 1, :, 7] *= 400.0  # one channel hundreds of times louder than the rest of its layer
    kv[0, 1, 5, 7] += 5_000.0  # with one far outlier token in it
    codec = get_codec("cachegen", exact_tokens=0)
    k = kv[0].double().numpy()
    steps = key_steps(k.std(axis=1), 64, codec.params["key_step"])
    assert np.allclose(steps[0], steps[0, 0])  # layer 0: one step for every channel
    loud = steps[1, 7]
    assert loud > steps[1, 0] and np.allclose(np.delete(steps[1], 7), steps[1, 0])
    out = codec.decode(codec.encode(kv))
    error = (out[0] - kv[0]).abs()
    # fp16 steps, fp32 arithmetic: within half a (stored, rounded) step plus rounding
    assert float(error[1, :, 7].max()) <= loud * 0.5 * 1.002 + 1e-3
    assert float(error[0].max()) <= steps[0, 0] * 0.5 * 1.002 + 1e-4


def test_step_parameters_trade_size_for_error() -> None:
    kv = kv_like_real(2, 128, 64, torch.float16)
    fine, coarse = get_codec("cachegen", key_step=0.1, value_step=0.1), get_codec("cachegen", key_step=1.0, value_step=1.0)
    fine_blob, coarse_blob = fine.encode(kv), coarse.encode(kv)
    assert len(fine_blob) > len(coarse_blob)
    assert relative_error(fine.decode(fine_blob), kv) < relative_error(coarse.decode(coarse_blob), kv)


def test_blob_is_self_describing() -> None:
    kv = kv_like_real(2, 16, 8, torch.bfloat16)
    blob = get_codec("cachegen", key_step=0.3).encode(kv)
    parsed = unpack(blob)
    assert (parsed.codec, parsed.dtype, parsed.shape) == ("cachegen", "bfloat16", (2, 2, 16, 8))
    assert parsed.params["key_step"] == 0.3
    assert blob[:4] == MAGIC
    assert torch.equal(decode(blob), get_codec("cachegen").decode(blob))  # any codec instance decodes any blob


# ---------------------------------------------------------------------------------------------- golden blobs
def golden_input(dtype: torch.dtype) -> torch.Tensor:
    return kv_like_real(3, 20, 24, dtype, seed=1234)


#: (codec, dtype, file stem). Files of older formats are history: they must decode as they did when committed.
#: cachegen's v2 files hold four-state rANS lanes, its v2-rans32 files the vector coder's 32-state lanes.
GOLDEN_CASES = [
    (name, dtype, f"{name}-{str(dtype).removeprefix('torch.')}-v{version}{layout}")
    for name, dtype, version, layout in [
        *[(name, dtype, version, "") for version in (1, 2) for name, dtype in [("cachegen", torch.float16), ("cachegen", torch.bfloat16)]],
        *[(name, dtype, version, "") for version in (1, 2) for name, dtype in [("lossless", torch.float16), ("lossless", torch.float32)]],
        ("cachegen", torch.float16, 2, "-rans32"),
        ("cachegen", torch.bfloat16, 2, "-rans32"),
    ]
]
#: What this build writes; LMCACHED_WRITE_GOLDEN=1 rewrites these files only.
CURRENT_GOLDEN = {f"cachegen-{d}-v{FORMAT_VERSION}-rans32" for d in ("float16", "bfloat16")} | {
    f"lossless-{d}-v{FORMAT_VERSION}" for d in ("float16", "float32")
}


@pytest.mark.parametrize(("name", "dtype", "stem"), GOLDEN_CASES, ids=[stem for _, _, stem in GOLDEN_CASES])
def test_golden_blobs_still_decode(name: str, dtype: torch.dtype, stem: str) -> None:
    """Blobs written by every format version and lane layout decode to exactly what they decoded to when
    committed, and this build still writes the current ones byte for byte."""
    blob_path, expected_path = GOLDEN / f"{stem}.bin", GOLDEN / f"{stem}.expected.bin"
    if os.environ.get("LMCACHED_WRITE_GOLDEN") and stem in CURRENT_GOLDEN:
        codec = get_codec(name)
        blob = codec.encode(golden_input(dtype))
        blob_path.write_bytes(blob)
        expected_path.write_bytes(codec.decode(blob).contiguous().view(torch.uint8).numpy().tobytes())
    blob = blob_path.read_bytes()
    assert struct.unpack_from("<H", blob, 4)[0] == int(stem.split("-v")[1][0])
    out = decode(blob)
    assert out.dtype == dtype and out.shape == (2, 3, 20, 24)
    assert out.contiguous().view(torch.uint8).numpy().tobytes() == expected_path.read_bytes()
    if name == "lossless":
        assert torch.equal(out, golden_input(dtype))
    if stem in CURRENT_GOLDEN:
        assert get_codec(name).encode(golden_input(dtype)) == blob
    if name == "cachegen":
        assert unpack(blob).params.get("rans_states", entropy.NARROW) == (entropy.WIDE if stem.endswith("rans32") else entropy.NARROW)


# ---------------------------------------------------------------------------------------------- corrupt blobs
@pytest.fixture(scope="module")
def blob() -> bytes:
    return get_codec("cachegen").encode(kv_like_real(2, 64, 32, torch.float16))


def test_truncated_blobs_raise(blob: bytes) -> None:
    for cut in (0, 3, 10, 30, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            decode(blob[:cut])


def test_flipped_bytes_are_caught_by_the_checksum(blob: bytes) -> None:
    for position in (0, 5, 20, len(blob) // 3, len(blob) - 10):
        bad = bytearray(blob)
        bad[position] ^= 0x40
        with pytest.raises(CodecError):
            decode(bytes(bad))


def test_a_format_1_blob_is_still_verified_by_its_crc() -> None:
    bad = bytearray((GOLDEN / "cachegen-float16-v1.bin").read_bytes())
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(bad))


def test_an_unknown_format_version_is_named(blob: bytes) -> None:
    future = bytearray(blob)
    struct.pack_into("<H", future, 4, 99)
    with pytest.raises(CodecError, match="format version 99 is not supported"):
        decode(bytes(future))


def test_checksum64_sees_every_flipped_bit_and_moved_block() -> None:
    from lmcached.codecs.checksum import BLOCK, checksum64

    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 3 * BLOCK + 13, dtype=np.uint8).tobytes()
    base = checksum64(data)
    for position in (0, 7, 8, BLOCK - 1, BLOCK, 2 * BLOCK + 5, len(data) - 13, len(data) - 1):
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[position] ^= 1 << bit
            assert checksum64(bad) != base, (position, bit)
    swapped = data[BLOCK : 2 * BLOCK] + data[:BLOCK] + data[2 * BLOCK :]
    assert checksum64(swapped) != base
    assert checksum64(data[:-1]) != base and checksum64(data + b"\0") != base
    # The same bytes hash the same wherever they start in memory (numpy reads unaligned words).
    assert checksum64(memoryview(b"x" + data)[1:]) == base
    assert checksum64(b"") != checksum64(b"\0")


def test_foreign_and_empty_blobs_raise() -> None:
    for junk in (b"", b"hello world" * 10, bytes(1000), b"\x89PNG\r\n\x1a\n" + bytes(100)):
        with pytest.raises(CodecError, match="blob"):
            decode(junk)


def test_wrong_codec_is_named(blob: bytes) -> None:
    with pytest.raises(CodecError, match="written by codec 'cachegen'"):
        get_codec("lossless").decode(blob)


def refresh_crc(data: bytearray) -> bytes:
    """The blob with its checksum recomputed for its (possibly corrupted) content."""
    trailer, checksum = TRAILERS[FORMAT_VERSION]
    data[-trailer.size :] = trailer.pack(checksum(bytes(data[: -trailer.size])))
    return bytes(data)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corruption_behind_a_valid_checksum_never_crashes(blob: bytes, data: st.DataObject) -> None:
    """Even with a recomputed checksum, corrupt content gives a CodecError or a tensor of the right shape."""
    bad = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        bad[data.draw(st.integers(0, len(bad) - 1 - TRAILERS[FORMAT_VERSION][0].size))] = data.draw(st.integers(0, 255))
    try:
        out = decode(refresh_crc(bad))
    except CodecError:
        return
    assert out.shape == (2, 2, 64, 32)


@pytest.mark.parametrize("name", ["cachegen", "lossless"])
def test_an_inflated_shape_behind_a_valid_checksum_allocates_nothing(name: str) -> None:
    blob = bytearray(get_codec(name).encode(kv_like_real(2, 16, 8, torch.float16)))
    struct.pack_into("<4I", blob, 9, 2, 2, 2**30, 2**20)  # shape [2, 2, 2^30, 2^20]: petabytes if believed
    with pytest.raises(CodecError):
        decode(refresh_crc(blob))


def test_corrupt_coded_words_fail_the_lane_check(blob: bytes) -> None:
    parsed = unpack(blob)
    words_start = len(blob) - 4 - parsed.sections[7].nbytes - parsed.sections[6].nbytes
    bad = bytearray(blob)
    for i in range(words_start + 20, words_start + 60):
        bad[i] ^= 0xA5
    with pytest.raises(CodecError, match="lane"):
        decode(refresh_crc(bad))


# ---------------------------------------------------------------------------------------------- kernels vs references
def reference_rans_decode(words: np.ndarray, freq: np.ndarray, n: int, states: int = 4) -> list[int]:
    """The slow, obvious rANS decoder of one lane: `states` interleaved states (symbol i is state i % states's),
    their final values first, then the words in the order the states took them."""
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    x = [(int(words[2 * k]) << 16) | int(words[2 * k + 1]) for k in range(states)]
    pos, out = 2 * states, []
    for i in range(n):
        k = i % states
        slot = x[k] % 4096
        s = int(np.searchsorted(cum, slot, side="right") - 1)
        x[k] = int(freq[s]) * (x[k] >> 12) + slot - int(cum[s])
        if x[k] < 1 << 16:
            x[k] = (x[k] << 16) | int(words[pos])
            pos += 1
        out.append(s)
    assert pos == len(words) and x == [1 << 16] * states
    return out


@pytest.mark.parametrize("states", [entropy.NARROW, entropy.WIDE])
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=300), st.integers(1, 200))
def test_rans_kernels_match_the_reference(states: int, symbols: list[int], lane_size: int) -> None:
    """Both lane layouts against the obvious decoder, with lanes of any length: whole vector steps, ragged last
    steps and lanes shorter than a step."""
    lane_size = max(lane_size, 16)
    arr = np.array(symbols, dtype=np.uint8)
    coded = entropy.encode(arr, 1, len(arr), lane_size, states=states)
    assert coded.states == states
    freq = entropy.unpack_tables(memoryview(coded.tables), 1)
    assert freq.sum() == 4096
    decoded = []
    for lane in range(len(coded.offsets) - 1):
        words = coded.words[coded.offsets[lane] : coded.offsets[lane + 1]]
        decoded += reference_rans_decode(words, freq[0], min(lane_size, len(arr) - lane * lane_size), states)
    assert decoded == symbols
    assert entropy.decode(memoryview(coded.tables), coded.offsets, coded.words, 1, len(arr), lane_size, states).tolist() == symbols


def test_wide_lanes_of_real_sizes_round_trip_and_refuse_corruption() -> None:
    """The vector coder over many whole steps (cachegen-sized groups), every symbol in play, a group of one
    symbol, and corrupt words or truncated lanes: a CodecError, never a crash or a read past the words."""
    rng = np.random.default_rng(5)
    groups, group_len = 3, 49152
    sym = np.clip(np.rint(rng.normal(128, 5, groups * group_len)), 0, 255).astype(np.uint8)
    sym[group_len : group_len + 256] = np.arange(256)  # every symbol in the second group
    sym[2 * group_len :] = 77  # the third group has a single symbol (its frequency is the whole scale)
    coded = entropy.encode(sym, groups, group_len, 65536, states=entropy.WIDE)
    assert np.array_equal(entropy.decode(coded.tables, coded.offsets, coded.words, groups, group_len, 65536, entropy.WIDE), sym)
    for at in (70, len(coded.words) // 2, len(coded.words) - 3):
        words = coded.words.copy()
        words[at] ^= 0x3C3C
        with pytest.raises(CodecError, match="lane"):
            entropy.decode(coded.tables, coded.offsets, words, groups, group_len, 65536, entropy.WIDE)
    short = coded.offsets.astype(np.int64)
    short[1] -= 5  # the first lane loses its last words to the second
    with pytest.raises(CodecError, match="lane"):
        entropy.decode(coded.tables, short.astype("<u4"), coded.words, groups, group_len, 65536, entropy.WIDE)
    with pytest.raises(CodecError, match="unknown rANS lane layout"):
        entropy.decode(coded.tables, coded.offsets, coded.words, groups, group_len, 65536, 8)


@pytest.mark.parametrize(
    ("group_len", "lane_size", "segments"), [(6120 * 8, 65536, 8), (1000, 300, 4), (60, 16, 5), (512, 512, 8), (8, 16, 8)]
)
def test_wide_lanes_with_a_table_per_segment_round_trip(group_len: int, lane_size: int, segments: int) -> None:
    """kvtc's layout: a group's symbols split evenly among several tables (its bands), lanes that cross from
    one to the next mid-step and lanes that start mid-segment. A wrong table would show: each segment has
    its own distribution."""
    rng = np.random.default_rng(group_len)
    sym = np.clip(np.rint(rng.normal(100, 3, (2, segments, group_len // segments))), 0, 200).astype(np.uint8)
    sym += (np.arange(segments, dtype=np.uint8) * 6)[None, :, None]
    layout = (2, group_len, lane_size)
    coded = entropy.encode(sym.reshape(-1), *layout, states=entropy.WIDE, segments=segments)
    assert len(entropy.unpack_tables(memoryview(coded.tables), 2 * segments)) == 2 * segments
    assert np.array_equal(entropy.decode(coded.tables, coded.offsets, coded.words, *layout, entropy.WIDE, segments), sym.reshape(-1))
    with pytest.raises(CodecError, match="cannot split"):
        entropy.encode(sym.reshape(-1), *layout, states=entropy.NARROW, segments=segments)


@pytest.mark.parametrize(
    ("rows", "columns", "segment_len", "lane_size"),
    [(255, 192, 32, 65536), (40, 64, 32, 1000), (9, 64, 64, 96), (20, 24, 12, 50), (5, 96, 16, 16), (3, 64, 32, 48)],
)
def test_tables_taking_turns_round_trip_and_decode_straight_to_values(rows: int, columns: int, segment_len: int, lane_size: int) -> None:
    """kvtc's token-order layout: a group is rows of `columns` symbols whose tables take turns every
    segment_len symbols (its bands). Whole steps inside one band and one row go by vector, the rest one state at
    a time (bands narrower than a step, lanes that start mid-row or mid-band, ragged ends); a wrong table
    would show, as each band has its own distribution. `decode_scaled` writes (s - zero) * scale[c] * row[r],
    float32 or bfloat16 rounded to nearest even (torch's rounding), exactly what decoding then scaling gives."""
    rng = np.random.default_rng(rows * columns + segment_len)
    groups, segments = 3, columns // segment_len
    band = np.arange(columns) // segment_len
    sym = np.clip(np.rint(rng.normal(100, 3, (groups, rows, columns))) + band * 6, 0, 255).astype(np.uint8)
    layout = (groups, rows * columns, lane_size)
    coded = entropy.encode(sym.reshape(-1), *layout, states=entropy.WIDE, segments=segments, segment_len=segment_len)
    one_run = entropy.encode(sym.reshape(-1), *layout, states=entropy.WIDE, segments=segments)  # the older layout's tables
    if segments > 1:
        assert coded.tables != one_run.tables
    decoded = entropy.decode(coded.tables, coded.offsets, coded.words, *layout, entropy.WIDE, segments, segment_len)
    assert np.array_equal(decoded, sym.reshape(-1))
    scale = rng.uniform(0.01, 2, (groups, columns)).astype(np.float32)
    row_scale = rng.uniform(0.5, 3, (groups, rows)).astype(np.float32)
    want = (sym.astype(np.int32) - 128).astype(np.float32) * (scale[:, None, :] * row_scale[:, :, None])
    args = (coded.tables, coded.offsets, coded.words, lane_size, segments, segment_len, 128, scale, row_scale)
    values = np.empty((groups, rows, columns), np.float32)
    entropy.decode_scaled(*args, values)
    assert np.array_equal(values, want)
    bits = np.empty((groups, rows, columns), np.uint16)
    entropy.decode_scaled(*args, bits)
    assert np.array_equal(bits, torch.from_numpy(want).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    words = coded.words.copy()
    words[len(words) // 2] ^= 0x3C3C
    with pytest.raises(CodecError, match="lane"):
        entropy.decode_scaled(coded.tables, coded.offsets, words, *args[3:], values)
    with pytest.raises(ValueError, match="do not agree"):
        entropy.decode_scaled(*args, values[:, 1:])
    with pytest.raises(CodecError, match="cannot split"):  # turns that do not fit a group a whole number of times
        entropy.encode(sym.reshape(-1), *layout, states=entropy.WIDE, segments=segments, segment_len=segment_len + 1)


def test_histogram_matches_bincount() -> None:
    sym = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)
    counts = rans_cpu.histogram(sym, 3, 1000)
    for g in range(3):
        assert counts[g].tolist() == np.bincount(sym[g * 1000 : (g + 1) * 1000], minlength=256).tolist()


def test_normalize_keeps_every_symbol_and_sums_to_scale() -> None:
    counts = np.zeros((2, 256), dtype=np.int64)
    counts[0, :200] = 1
    counts[0, 5] = 10**9
    counts[1, 7] = 3
    freq = entropy.normalize(counts)
    assert (freq.sum(axis=1) == 4096).all()
    assert ((counts > 0) == (freq > 0)).all()


def test_quant_kernels_match_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 17, 11)).astype(np.float32) * 3
    mean, std = np.empty((3, 11)), np.empty((3, 11))
    quant_cpu.column_stats(x, mean, std)
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=1), rtol=1e-5, atol=1e-6)
    rmean, rstd = np.empty((3, 17)), np.empty((3, 17))
    quant_cpu.row_stats(x, rmean, rstd)
    np.testing.assert_allclose(rstd, x.std(axis=2), rtol=1e-5, atol=1e-6)
    col_step, col_off = (std * 0.3).astype(np.float32), mean.astype(np.float32)
    row_step, row_off = np.ones((3, 17), np.float32), np.zeros((3, 17), np.float32)
    sym, counts = np.empty(x.shape, np.uint8), np.empty((3, 256), np.int64)
    quant_cpu.quantize(x, col_step, col_off, row_step, row_off, sym, counts)
    q = np.clip(np.rint((x - col_off[:, None, :]) / col_step[:, None, :]), -127, 127)
    assert (sym.astype(int) - 128 == q).all()
    assert (counts == rans_cpu.histogram(sym.reshape(-1), 3, sym[0].size)).all()  # counted as it quantised
    out = np.empty(x.shape, np.float32)
    quant_cpu.dequantize(sym, col_step, col_off, row_step, row_off, out)
    np.testing.assert_array_equal(out, q.astype(np.float32) * col_step[:, None, :] + col_off[:, None, :])
    half = decode_half(sym, col_step, col_off, row_step, row_off, False)
    assert (half == half_bits(out, torch.float16)).all()  # torch's rounding
    half = decode_half(sym, col_step, col_off, row_step, row_off, True)
    assert (half == half_bits(out, torch.bfloat16)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_encoder_kernels_read_half_precision_bits_as_their_values(dtype: torch.dtype) -> None:
    """cachegen's encoder reads a float16/bfloat16 chunk as its bits (codecs/half.py widens them in the
    kernels): the same statistics and symbols as from the chunk widened to float32 first."""
    from lmcached.codecs.base import kernel_input

    kv = (torch.randn(2, 3, 17, 11, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    kv[0, 0, 0, :4] = torch.tensor([0.0, 1e-7, -6e-5, 6e4]).to(dtype)  # zero, subnormals, a large value
    bits, wide, bfloat = kernel_input(kv), kv.float().numpy(), dtype == torch.bfloat16
    assert bits.dtype == np.uint16 and kernel_input(kv.float()).dtype == np.float32
    for stats in (quant_cpu.column_stats, quant_cpu.row_stats):
        shape = (3, 11) if stats is quant_cpu.column_stats else (3, 17)
        got, want = (np.empty(shape), np.empty(shape)), (np.empty(shape), np.empty(shape))
        stats(bits[0], *got, bfloat)
        stats(wide[0], *want)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    step, off = np.full((3, 11), 0.25, np.float32), np.zeros((3, 11), np.float32)
    ones, zeros = np.ones((3, 17), np.float32), np.zeros((3, 17), np.float32)
    got_sym, want_sym = np.empty((3, 17, 11), np.uint8), np.empty((3, 17, 11), np.uint8)
    quant_cpu.quantize(bits[1], step, off, ones, zeros, got_sym, np.empty((3, 256), np.int64), bfloat)
    quant_cpu.quantize(wide[1], step, off, ones, zeros, want_sym, np.empty((3, 256), np.int64))
    assert np.array_equal(got_sym, want_sym)


def half_bits(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values rounded to `dtype` by torch, as uint16 bits."""
    return torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(np.uint16)


def decode_half(sym: np.ndarray, col_step, col_off, row_step, row_off, bfloat: bool, lane: int = 256) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Symbols [G, R, C] rANS-coded, then dequantised to half-precision bits by cachegen's CPU decode."""
    from lmcached.codecs import cachegen_cpu

    G, R, C = sym.shape
    coded = entropy.encode(np.ascontiguousarray(sym).reshape(-1), G, R * C, lane, states=entropy.WIDE)
    d = entropy.decoder(memoryview(coded.tables), coded.offsets, coded.words, G, R * C, lane)
    out = np.empty((G, R, C), np.uint16)
    bad = cachegen_cpu.decode_half(
        coded.words, d.offsets, lane, entropy.WIDE, d.freq, d.cum, col_step, col_off, row_step, row_off, bfloat, out
    )
    assert bad == 0
    return out


@pytest.mark.parametrize("states", [entropy.NARROW, entropy.WIDE])
@pytest.mark.parametrize("bfloat", [False, True])
def test_fused_half_decode_matches_lanes_then_dequantize(bfloat: bool, states: int) -> None:
    """cachegen_cpu.decode_half (lanes and dequantisation a group at a time) is bit-identical to decoding every
    lane, dequantising to float32 and rounding with torch, also where a group's last lane is short, and counts
    a corrupt lane."""
    from lmcached.codecs import cachegen_cpu

    rng = np.random.default_rng(11)
    G, R, C, lane = 4, 37, 24, 256  # 888 symbols a group: three whole lanes and a short one
    sym = np.clip(np.rint(rng.normal(128, 6, (G, R, C))), 0, 255).astype(np.uint8)
    col_step = rng.uniform(0.01, 0.5, (G, C)).astype(np.float32)
    col_off = rng.normal(0, 1, (G, C)).astype(np.float32)
    row_step = rng.uniform(0.5, 2, (G, R)).astype(np.float32)
    row_off = rng.normal(0, 0.1, (G, R)).astype(np.float32)
    coded = entropy.encode(sym.reshape(-1), G, R * C, lane, states=states)
    decoded = entropy.decode(memoryview(coded.tables), coded.offsets, coded.words, G, R * C, lane, states).reshape(G, R, C)
    widened = np.empty((G, R, C), np.float32)
    quant_cpu.dequantize(decoded, col_step, col_off, row_step, row_off, widened)
    expected = half_bits(widened, torch.bfloat16 if bfloat else torch.float16)
    d = entropy.decoder(memoryview(coded.tables), coded.offsets, coded.words, G, R * C, lane)
    out = np.empty((G, R, C), np.uint16)
    params = (col_step, col_off, row_step, row_off, bfloat, out)
    assert cachegen_cpu.decode_half(coded.words, d.offsets, lane, states, d.freq, d.cum, *params) == 0
    assert np.array_equal(out, expected)
    words = coded.words.copy()
    words[d.offsets[5] + 70] ^= 0x5A5A  # inside the second group's second lane
    assert cachegen_cpu.decode_half(words, d.offsets, lane, states, d.freq, d.cum, *params) >= 1


def test_half_conversion_rounds_like_torch_at_the_edges() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(0, 1, 5000),
            rng.normal(0, 1e-6, 5000),
            rng.normal(0, 4e4, 2000),
            [0.0, 65504, 65519, 65520, 2.98e-8, 2.9802322e-08, 5.96e-8, 8.940697e-08, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    sym = np.full((1, 1, values.size), 129, np.uint8)  # q = 1: the output is the step itself
    half = decode_half(
        sym,
        values.reshape(1, -1),
        np.zeros((1, values.size), np.float32),
        np.ones((1, 1), np.float32),
        np.zeros((1, 1), np.float32),
        False,
    )
    assert (half[0, 0] == half_bits(values, torch.float16)).all()


def test_scratch_buffers_are_reused_per_thread_and_never_shared() -> None:
    import threading

    import numpy as np
    from lmcached.codecs.scratch import scratch

    a = scratch("t", (4, 8), np.float32)
    b = scratch("t", (2, 8), np.float32)
    assert a.base is b.base or np.shares_memory(a, b)  # the same memory, reused
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(scratch("t", (4, 8), np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(a, other[0])  # another thread gets its own


def test_encoding_with_reused_buffers_is_deterministic_and_leaves_no_trace() -> None:
    codec = get_codec("cachegen")
    first = kv_like_real(4, 64, 32, torch.float16, seed=1)
    second = kv_like_real(4, 64, 32, torch.float16, seed=2)
    blob = codec.encode(first)
    codec.encode(second)  # reuses the scratch buffers with other data
    assert codec.encode(first) == blob
    out_first = codec.decode(blob)
    out_second = codec.decode(codec.encode(second))
    assert not torch.equal(out_first, out_second) and torch.equal(codec.decode(blob), out_first)  # outputs are never shared


def test_the_codec_threads_wait_passively_and_follow_the_cpus_available() -> None:
    import os

    from lmcached.codecs import available_cpus, threads

    assert os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    assert 1 <= threads() <= available_cpus()


def test_quality_trades_size_for_error_monotonically() -> None:
    kv = kv_like_real(4, 256, 64, torch.float16, seed=4)
    sizes, errors = [], []
    for quality in (1, 3, 5, 7, 9):
        codec = get_codec("cachegen", quality=quality)
        blob = codec.encode(kv)
        sizes.append(len(blob))
        errors.append(relative_error(get_codec("cachegen").decode(blob), kv))  # any cachegen decodes any quality
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)
    assert get_codec("cachegen", quality=5).encode(kv) == get_codec("cachegen").encode(kv)  # 5 is the default
    for bad in (0, 10, 2.5, "high", True):
        with pytest.raises(CodecError, match="quality"):
            get_codec("cachegen", quality=bad)
    with pytest.raises(CodecError, match="either quality"):
        get_codec("cachegen", quality=3, key_step=0.1)


@pytest.mark.parametrize("states", [entropy.NARROW, entropy.WIDE])
@pytest.mark.parametrize("p", [0.6, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_rans_round_trips_skewed_distributions(p: float, states: int) -> None:
    """A dominant symbol pushes rANS states above 2**31, where a 31-bit reciprocal alone is one off now and
    then: such blobs did not decode before the quotient was corrected (coarse cachegen steps make them)."""
    import numpy as np
    from lmcached.codecs import entropy

    rng = np.random.default_rng(int(p * 1000))
    n = 16384 * 4
    symbols = np.where(rng.random(n) < p, 128, rng.integers(0, 256, n)).astype(np.uint8)
    coded = entropy.encode(symbols, 2, n // 2, 16384, states=states)
    assert np.array_equal(entropy.decode(coded.tables, coded.offsets, coded.words, 2, n // 2, 16384, states), symbols)


def test_the_lossy_set_names_exactly_the_lossy_codecs() -> None:
    from lmcached.codecs import LOSSY, available_codecs
    from lmcached.codecs.cachegen import CacheGenCodec
    from lmcached.codecs.kvtc import KvtcCodec
    from lmcached.codecs.lossless import LosslessCodec

    classes = {"cachegen": CacheGenCodec, "kvtc": KvtcCodec, "lossless": LosslessCodec}
    assert set(classes) == set(available_codecs())
    assert LOSSY == {name for name, cls in classes.items() if cls.lossy}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_is_coded_bit_exact_by_lossless_and_refused_by_the_quantisers(dtype: torch.dtype) -> None:
    """vLLM's fp8 KV caches: lossless codes their bytes exactly (and says the dtype in the blob); cachegen and
    kvtc quantise 16- and 32-bit values and refuse 8-bit input with a message that says what to use."""
    from lmcached.errors import CodecError

    kv = (torch.randn(2, 3, 64, 32) * 2).to(dtype)
    out = decode(get_codec("lossless").encode(kv))
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
    with pytest.raises(CodecError, match=r"8-bit already\): use lossless"):
        get_codec("cachegen").encode(kv)


def test_every_layer_agrees_on_the_kv_dtypes_and_their_sizes() -> None:
    """The chunk format (torch-free), the tensors' names and the codecs' blob codes name the same dtypes."""
    from lmcached.codecs.base import TORCH_ITEMSIZE
    from lmcached.codecs.format import DTYPE_CODES

    from lmcached.wire.chunk import ITEMSIZE
    from lmcached.wire.tensors import DTYPES

    assert ITEMSIZE == {name: dtype.itemsize for name, dtype in DTYPES.items()} == TORCH_ITEMSIZE
    assert set(DTYPE_CODES) == set(ITEMSIZE)
