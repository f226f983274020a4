"""The Numba-CUDA kernels against their CPU twins. Without a GPU these run in numba's CUDA simulator
(tests/conftest.py turns it on), on small inputs; the `gpu` tests need a real device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lmcached.codecs import entropy, get_codec, gpu, quant_cpu, quant_cuda, rans_cpu, rans_cuda
from lmcached.codecs.cachegen import Steps
from lmcached.codecs.format import unpack
from numba import cuda

from lmcached.errors import CodecError

from .codec_helpers import kv_like_real, relative_error


def test_histogram_kernel_matches_cpu() -> None:
    sym = np.random.default_rng(0).integers(120, 136, 2 * 300, dtype=np.uint8)
    counts = cuda.to_device(np.zeros((2, 256), np.uint32))
    rans_cuda.histogram_kernel[(2, 2), 64](cuda.to_device(sym), 300, 1, 300, counts)
    assert (counts.copy_to_host() == rans_cpu.histogram(sym, 2, 300)).all()
    # three tables a group taking turns, 20 symbols each: each table's symbols gathered, then counted
    counts = cuda.to_device(np.zeros((6, 256), np.uint32))
    rans_cuda.histogram_kernel[(2, 6), 64](cuda.to_device(sym), 300, 3, 20, counts)
    by_table = np.ascontiguousarray(sym.reshape(2, 5, 3, 20).transpose(0, 2, 1, 3)).reshape(-1)
    assert (counts.copy_to_host() == rans_cpu.histogram(by_table, 6, 100)).all()


def test_stats_and_quantize_kernels_match_cpu() -> None:
    x = np.random.default_rng(1).normal(size=(2, 6, 5)).astype(np.float32)
    dm, ds = cuda.device_array((2, 5), np.float64), cuda.device_array((2, 5), np.float64)
    quant_cuda.column_stats_kernel[1, 32](cuda.to_device(x), dm, ds)
    cm, cs = np.empty((2, 5)), np.empty((2, 5))
    quant_cpu.column_stats(x, cm, cs)
    np.testing.assert_allclose(ds.copy_to_host(), cs, rtol=1e-7)
    rm, rs = cuda.device_array((2, 6), np.float64), cuda.device_array((2, 6), np.float64)
    quant_cuda.row_stats_kernel[1, 32](cuda.to_device(x), rm, rs)
    crm, crs = np.empty((2, 6)), np.empty((2, 6))
    quant_cpu.row_stats(x, crm, crs)
    np.testing.assert_allclose(rs.copy_to_host(), crs, rtol=1e-7)
    col_step, col_off = (cs * 0.4).astype(np.float32), cm.astype(np.float32)
    ones, zeros = np.ones((2, 6), np.float32), np.zeros((2, 6), np.float32)
    dsym = cuda.device_array(x.shape, np.uint8)
    quant_cuda.quantize_kernel[1, 64](
        cuda.to_device(x), cuda.to_device(col_step), cuda.to_device(col_off), cuda.to_device(ones), cuda.to_device(zeros), dsym
    )
    sym = np.empty(x.shape, np.uint8)
    quant_cpu.quantize(x, col_step, col_off, ones, zeros, sym, np.empty((x.shape[0], 256), np.int64))
    assert (dsym.copy_to_host() == sym).all()
    dout = cuda.device_array(x.shape, np.float32)
    quant_cuda.dequantize_kernel[1, 64](
        cuda.to_device(sym), cuda.to_device(col_step), cuda.to_device(col_off), cuda.to_device(ones), cuda.to_device(zeros), dout
    )
    out = np.empty(x.shape, np.float32)
    quant_cpu.dequantize(sym, col_step, col_off, ones, zeros, out)
    assert (dout.copy_to_host() == out).all()  # bit for bit


def test_rans_kernels_round_trip_and_match_the_cpu_format() -> None:
    sym = np.clip(np.random.default_rng(2).normal(128, 4, 3 * 100).round(), 0, 255).astype(np.uint8)
    coded = gpu.entropy_encode(cuda.to_device(sym), 3, 100, 32)
    cpu = entropy.encode(sym, 3, 100, 32)
    assert coded.tables == cpu.tables
    assert (coded.offsets == cpu.offsets).all() and (coded.words == cpu.words).all()  # the same bytes
    assert (entropy.decode(memoryview(coded.tables), coded.offsets, coded.words, 3, 100, 32) == sym).all()


def test_rans_kernels_match_the_cpu_on_a_skewed_distribution() -> None:
    """Dominant symbols push states above 2**31, where the quotient needs its correction on both twins."""
    rng = np.random.default_rng(3)
    sym = np.where(rng.random(3 * 400) < 0.9, 128, rng.integers(0, 256, 3 * 400)).astype(np.uint8)
    coded = gpu.entropy_encode(cuda.to_device(sym), 3, 400, 64)
    cpu = entropy.encode(sym, 3, 400, 64)
    assert (coded.words == cpu.words).all()
    assert (entropy.decode(memoryview(cpu.tables), cpu.offsets, cpu.words, 3, 400, 64) == sym).all()


@pytest.mark.parametrize(("skewed", "segments", "segment_len"), [(False, 1, None), (True, 1, None), (False, 4, None), (False, 2, 10)])
def test_wide_rans_kernels_write_the_cpu_vector_coders_bytes(skewed: bool, segments: int, segment_len: int | None) -> None:
    """The 32-thread-per-lane twins of rans_wide: the same words as the CPU's vector steps, over lanes with
    whole and ragged steps (100 symbols a group, lanes of 40), with tables for segments of 25 symbols that
    lanes cross (older kvtc blobs' bands), or two tables taking turns every 10 symbols (kvtc's bands along a
    token), and they decode them."""
    rng = np.random.default_rng(4)
    if skewed:  # states above 2**31, where the quotient needs its correction
        sym = np.where(rng.random(3 * 100) < 0.9, 128, rng.integers(0, 256, 3 * 100)).astype(np.uint8)
    else:
        sym = np.clip(rng.normal(128, 4, 3 * 100).round(), 0, 255).astype(np.uint8)
    if segments > 1:  # each table its own distribution, so a wrong table shows
        turn = segment_len or 100 // segments
        table = np.arange(100) // turn % segments
        sym = (sym.reshape(3, 100) + (table * 7).astype(np.uint8)[None, :]).reshape(-1)
    coded = gpu.entropy_encode(cuda.to_device(sym), 3, 100, 40, entropy.WIDE, segments, segment_len)
    cpu = entropy.encode(sym, 3, 100, 40, states=entropy.WIDE, segments=segments, segment_len=segment_len)
    assert coded.states == cpu.states == entropy.WIDE and coded.tables == cpu.tables
    assert (coded.offsets == cpu.offsets).all() and (coded.words == cpu.words).all()  # the same bytes
    layout = (3, 100, 40, entropy.WIDE, segments, segment_len)
    assert (gpu.entropy_decode(memoryview(cpu.tables), cpu.offsets, cpu.words, *layout).copy_to_host() == sym).all()
    words = cpu.words.copy()
    words[cpu.offsets[4] + 66] ^= 0x0FF0  # the fifth lane's first word after its states
    with pytest.raises(CodecError, match="lane"):
        gpu.entropy_decode(memoryview(cpu.tables), cpu.offsets, words, *layout)


def test_blob_encoded_on_the_device_decodes_on_the_cpu_and_back() -> None:
    kv = kv_like_real(2, 12, 16, torch.float16)
    codec = get_codec("cachegen")
    device_blob = gpu.encode_arrays(codec, cuda.to_device(kv.float().numpy()), "float16", tuple(kv.shape), kv)
    assert relative_error(codec.decode(device_blob), kv) < 0.3
    cpu_blob = codec.encode(kv)
    parsed = unpack(cpu_blob)
    steps = Steps(*(np.frombuffer(s, np.float16) for s in parsed.sections[:4]))
    dev = gpu.decode_arrays(parsed, steps, np.frombuffer(parsed.sections[5], "<u4"), np.frombuffer(parsed.sections[6], "<u2"))
    on_device = torch.from_numpy(dev.copy_to_host()).half()
    on_device[:, :, :1] = kv[:, :, :1]
    assert torch.equal(on_device, codec.decode(cpu_blob))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_and_cpu_decode_to_the_same_tensor(dtype: torch.dtype) -> None:
    kv = kv_like_real(30, 256, 192, dtype).cuda()
    codec = get_codec("cachegen")
    gpu_blob = codec.encode(kv)
    cpu_blob = codec.encode(kv.cpu())
    for blob in (gpu_blob, cpu_blob):
        assert torch.equal(codec.decode(blob, device="cuda").cpu(), codec.decode(blob))
    assert relative_error(codec.decode(gpu_blob), kv.cpu()) < 0.3


#: (frequency, state) pairs where a 31-bit reciprocal alone gives x // f one too high (found by search).
OFF_BY_ONE = [(2964, 3107979263), (2964, 3107976299), (2994, 3139436543), (3005, 3150970879)]


def test_the_encoder_step_is_exact_where_the_reciprocal_alone_is_not() -> None:
    """rANS's x' = (x // f) * M + x % f + cum on both twins, for states just under the renormalisation bound."""
    pairs = OFF_BY_ONE + [(1, 1000), (2, (2 << 20) - 1), (4096, (1 << 32) - 1), (3, 3 * (1 << 20) - 1)]
    freq = np.zeros((len(pairs), 256), dtype=np.uint32)
    for i, (f, _) in enumerate(pairs):
        freq[i, 0] = f
        freq[i, 1] = rans_cpu.PROB_SCALE - f  # cum of symbol 0 is 0
    tab = rans_cpu.encoder_tables(freq, entropy.cumulative(freq))
    xs = np.array([x for _, x in pairs], dtype=np.uint64)
    expected = np.array([(x // f) * rans_cpu.PROB_SCALE + x % f for f, x in pairs], dtype=np.uint64)

    @cuda.jit
    def step(xs, tab, out):  # pragma: no cover - device code
        i = cuda.grid(1)
        if i < xs.shape[0]:
            row = cuda.local.array(4, dtype=np.uint16)
            x, _ = rans_cuda._enc(xs[i], tab[i, 0, 0], tab[i, 0, 1], row, 0)
            out[i] = x

    out = cuda.to_device(np.zeros_like(xs))
    step[1, 32](cuda.to_device(xs), cuda.to_device(tab), out)
    assert (out.copy_to_host() == expected).all()

    from numba import njit

    @njit
    def cpu_step(xs, tab, out):  # pragma: no cover - compiled
        row = np.zeros(4, dtype=np.uint16)
        for i in range(xs.shape[0]):
            out[i] = rans_cpu._enc(xs[i], tab[i, 0, 0], tab[i, 0, 1], row, 0)[0]

    cpu_out = np.zeros_like(xs)
    cpu_step(xs, tab, cpu_out)
    assert (cpu_out == expected).all()

    # The 32-state coder's steps: 16 states at once in vector registers, and one state on the device.
    from lmcached.codecs import rans_wide

    rcp, packed = rans_wide.encoder_tables(tab)

    @njit
    def vector_step(x, rcp, packed):  # pragma: no cover - compiled
        symbols = np.zeros(16, dtype=np.uint8)
        row = np.zeros(16, dtype=np.uint16)
        return rans_wide.encode_step16(rcp, packed, symbols, 0, x, 0, row, 16)

    for i, (_, x) in enumerate(pairs):
        states = np.full(16, x, dtype=np.uint32)
        assert vector_step(states, rcp[i], packed[i]) == 16  # no state renormalised: none was at its bound
        assert (states == expected[i]).all()

    @cuda.jit
    def wide_step(xs, rcp, packed, out):  # pragma: no cover - device code
        i = cuda.grid(1)
        if i < xs.shape[0]:
            out[i] = rans_cuda._encode_wide_symbol(xs[i], np.uint64(rcp[i, 0]), np.uint64(packed[i, 0]))

    out = cuda.to_device(np.zeros_like(xs))
    wide_step[1, 32](cuda.to_device(xs), cuda.to_device(rcp), cuda.to_device(packed), out)
    assert (out.copy_to_host() == expected).all()


# ---------------------------------------------------------------------------------------------- kvtc
def test_kvtc_kernels_match_their_cpu_twins() -> None:
    from lmcached.codecs import kvtc_cpu, kvtc_cuda

    rng = np.random.default_rng(5)
    S, L, n, C, bands = 2, 2, 7, 16, 4
    y = (rng.normal(size=(S, L, n, C)) * np.linspace(0.1, 4, C)).astype(np.float32)
    token = rng.uniform(0.5, 2, (S, L, n)).astype(np.float32)
    steps = rng.uniform(0.05, 0.4, (S, L, C)).astype(np.float32)
    dy, dtoken = cuda.to_device(y), cuda.to_device(token)
    rms, cpu_rms = cuda.device_array((L, n), np.float64), np.empty((L, n))
    kvtc_cuda.token_rms_kernel[1, 64](dy[1], rms)
    kvtc_cpu.token_rms(y[1], cpu_rms)
    np.testing.assert_allclose(rms.copy_to_host(), cpu_rms, rtol=1e-12)
    need, cpu_need = cuda.device_array((S, L, C), np.float32), np.empty((S, L, C), np.float32)
    kvtc_cuda.reach_kernel[1, 64](dy, dtoken, need)
    kvtc_cpu.reach(y, token, cpu_need)
    assert (need.copy_to_host() == cpu_need).all()
    sym, cpu_sym = cuda.device_array((S, L, n, C), np.uint8), np.empty((S, L, n, C), np.uint8)
    kvtc_cuda.quantize_kernel[4, 128](dy, cuda.to_device(steps), dtoken, sym)
    kvtc_cpu.quantize(y, steps, token, bands, cpu_sym, np.empty((2 * L * bands, 256), np.int64))
    assert (sym.copy_to_host() == cpu_sym).all()
    out, cpu_out = cuda.device_array((S, L, n, C), np.float32), np.empty((S, L, n, C), np.float32)
    kvtc_cuda.dequantize_kernel[4, 128](sym.reshape(S, L, 1, n, C), cuda.to_device(steps), dtoken, out)  # one band: token order
    kvtc_cpu.dequantize(cpu_sym.reshape(S, L, 1, n, C), steps, token, cpu_out)
    assert (out.copy_to_host() == cpu_out).all()


def test_kvtc_blobs_coded_on_the_device_decode_like_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same projected chunk the device path writes the symbols, steps and scales the CPU path writes
    (its lanes are shorter), and decodes a blob to the CPU's y. 64 components: two bands of 32 taking turns."""
    from lmcached.codecs import kvtc
    from lmcached.codecs.kvtc import Codebook, KvtcCodec

    monkeypatch.setattr(kvtc, "MATMUL_DTYPE", torch.float32)  # the device's products are float32
    book = Codebook.fit([kv_like_real(2, 40, 64, torch.float16, seed) for seed in range(2)])
    kv = kv_like_real(2, 24, 64, torch.float16, seed=9)
    codec = KvtcCodec(book)
    cpu_blob = codec.encode(kv)
    y = codec.project(book, kv, 1)
    gpu_blob = gpu.kvtc_encode_arrays(codec, book, cuda.to_device(y), kv, "float16", tuple(kv.shape), 1)
    assert unpack(gpu_blob).params["lane_size"] == gpu.GPU_LANE_SIZE != unpack(cpu_blob).params["lane_size"]
    assert torch.equal(codec.decode(gpu_blob), codec.decode(cpu_blob))
    parsed = unpack(cpu_blob)
    L, n, C = 2, 23, 64
    steps = np.frombuffer(parsed.sections[0], np.float16).reshape(2, L, C).astype(np.float32)
    token = np.ones((2, L, n), np.float32)
    token[1] = np.frombuffer(parsed.sections[1], np.float16).reshape(L, n)
    dy = gpu.kvtc_decode_arrays(parsed, steps, token, np.frombuffer(parsed.sections[3], "<u4"), np.frombuffer(parsed.sections[4], "<u2"))
    from lmcached.codecs import entropy, kvtc_cpu

    # a lane per layer of keys or values, token by token, its 2 bands of 32 taking turns at their tables
    assert (parsed.params["rans_states"], parsed.params["bands"], parsed.params["band_width"]) == (entropy.WIDE, 2, 32)
    offsets, words = np.frombuffer(parsed.sections[3], "<u4"), np.frombuffer(parsed.sections[4], "<u2")
    sym = entropy.decode(parsed.sections[2], offsets, words, 2 * L, n * C, parsed.params["lane_size"], entropy.WIDE, 2, 32)
    cpu_y = np.empty((2, L, n, C), np.float32)
    kvtc_cpu.dequantize(sym.reshape(2, L, 1, n, C), steps, token, cpu_y)
    assert (dy.copy_to_host() == cpu_y).all()


@pytest.mark.gpu
def test_kvtc_on_the_gpu_round_trips_and_matches_the_cpu() -> None:
    from lmcached.codecs.kvtc import Codebook, KvtcCodec

    book = Codebook.fit([kv_like_real(30, 256, 192, torch.float16, seed) for seed in range(3)])
    kv = kv_like_real(30, 256, 192, torch.float16, seed=7).cuda()
    codec = KvtcCodec(book)
    gpu_blob = codec.encode(kv)
    on_device = codec.decode(gpu_blob, device="cuda")
    assert on_device.is_cuda and on_device.dtype == torch.float16
    assert relative_error(on_device.cpu(), codec.decode(gpu_blob)) < 0.01  # the products' rounding only
    assert relative_error(on_device.cpu(), kv.cpu()) < 0.3
