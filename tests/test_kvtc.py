"""kvtc: transform coding with a per-model codebook — round trips, the codebook's identity and durability, and
clear errors (never garbage) for a missing, different or corrupted codebook."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lmcached.codecs import entropy, get_codec
from lmcached.codecs.format import FORMAT_VERSION, unpack
from lmcached.codecs.kvtc import Codebook, CodebookStore, KvtcCodec

from lmcached.errors import CodecError

from .codec_helpers import assert_round_trip, kv_like_real, relative_error

GOLDEN = Path(__file__).parent.parent / "codecs" / "golden"


def correlated_kv(layers: int, tokens: int, channels: int, seed: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """KV whose channels are correlated (as real KV is): a few latent directions mixed into all channels."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, layers, 8, channels, generator=torch.Generator().manual_seed(99))  # the same model
    latent = torch.randn(2, layers, tokens, 8, generator=gen) * torch.linspace(3.0, 0.3, 8)
    noise = 0.05 * torch.randn(2, layers, tokens, channels, generator=gen)
    return (latent @ mix + noise).to(dtype)


@pytest.fixture(scope="module")
def book() -> Codebook:
    return Codebook.fit([correlated_kv(3, 64, 32, seed) for seed in range(4)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_within_error_with_an_exact_sink_row(book: Codebook, dtype: torch.dtype) -> None:
    kv = correlated_kv(3, 64, 32, seed=10, dtype=dtype)  # not one of the calibration chunks
    codec = KvtcCodec(book)
    blob = assert_round_trip(codec, kv, max_relative_error=0.1)
    assert torch.equal(codec.decode(blob)[:, :, :1], kv[:, :, :1])
    assert len(blob) < kv.numel() * kv.element_size() / 3  # correlated channels: most components cost ~nothing


def test_finer_steps_cost_bytes_and_buy_accuracy(book: Codebook) -> None:
    kv = correlated_kv(3, 64, 32, seed=11)
    fine, coarse = KvtcCodec(book, key_step=0.05, value_step=0.1), KvtcCodec(book, key_step=0.5, value_step=1.0)
    fine_blob, coarse_blob = fine.encode(kv), coarse.encode(kv)
    assert len(fine_blob) > len(coarse_blob)
    assert relative_error(fine.decode(fine_blob), kv) < relative_error(coarse.decode(coarse_blob), kv)


def test_a_chunk_louder_than_calibration_never_clips(book: Codebook) -> None:
    """Steps rise per component where the chunk's own values would clip: the error stays proportionate."""
    kv = correlated_kv(3, 64, 32, seed=12, dtype=torch.float32)
    kv[:, 1, 20:30] *= 200.0  # far outside anything the codebook saw
    codec = KvtcCodec(book)
    out = codec.decode(codec.encode(kv))
    assert relative_error(out, kv) < 0.1
    assert float((out - kv)[:, 1].abs().max()) < 0.05 * float(kv[:, 1].abs().max())


def test_only_the_exact_rows_when_a_chunk_is_that_short(book: Codebook) -> None:
    kv = correlated_kv(3, 1, 32, seed=13)
    codec = KvtcCodec(book)
    assert torch.equal(codec.decode(codec.encode(kv)), kv)


def test_the_codebook_is_named_by_its_content_and_survives_bytes(book: Codebook) -> None:
    again = Codebook.from_bytes(book.to_bytes())
    assert again.digest == book.digest and np.array_equal(again.basis, book.basis)
    other = Codebook.fit([correlated_kv(3, 64, 32, seed) for seed in range(4, 8)])
    assert other.digest != book.digest
    assert Codebook.fit([correlated_kv(3, 64, 32, seed) for seed in range(4)]).digest == book.digest  # deterministic


def test_layer_step_multipliers_set_each_layers_step_and_name_a_new_codebook(book: Codebook, tmp_path: Path) -> None:
    """What `lmcached calibrate` adds (lmcached.engine.sensitivity): a multiplier per side and layer. A codebook
    without them is still written as version 1, so its digest, and every blob naming it, stay as they were."""
    assert book.to_bytes()[8] == 1 and book.uniform() is book
    scale = np.array([[0.5, 1.0, 4.0], [1.0, 1.0, 1.0]], np.float32)
    weighted = book.weighted(scale)
    data = weighted.to_bytes()
    assert data[8] == 2 and weighted.digest != book.digest and weighted.uniform().digest == book.digest
    again = Codebook.from_bytes(data)
    assert again.digest == weighted.digest and np.array_equal(again.step_scale, scale)
    assert np.allclose(KvtcCodec(weighted).layer_steps(weighted), KvtcCodec(book).layer_steps(book) * scale)
    kv = correlated_kv(3, 64, 32, seed=15)
    out = KvtcCodec(weighted, store=CodebookStore(tmp_path)).decode(KvtcCodec(weighted).encode(kv))
    errors = [relative_error(out[0, layer], kv[0, layer]) for layer in range(3)]
    assert errors[0] < errors[1] < errors[2]  # the keys of layer 2 were coded with 8× the step of layer 0's
    for bad in (np.ones((2, 2)), -scale, scale * np.nan):
        with pytest.raises(CodecError, match="multipliers"):
            book.weighted(bad)


def test_golden_weighted_codebook_still_reads() -> None:
    """A version 2 codebook (layer steps) as committed: the same digest, its multipliers, its steps."""
    path = GOLDEN / "kvtc-codebook-v2.bin"
    if os.environ.get("LMCACHED_WRITE_GOLDEN"):
        base = Codebook.from_bytes((GOLDEN / "kvtc-codebook-v1.bin").read_bytes())
        path.write_bytes(base.weighted(np.linspace(0.5, 2.0, 2 * base.layers, dtype=np.float32).reshape(2, -1)).to_bytes())
    data = path.read_bytes()
    book = Codebook.from_bytes(data)
    assert book.to_bytes() == data and book.uniform().digest == Codebook.from_bytes((GOLDEN / "kvtc-codebook-v1.bin").read_bytes()).digest
    assert book.step_scale is not None and np.allclose(book.step_scale.ravel(), np.linspace(0.5, 2.0, 2 * book.layers))


def test_a_corrupted_or_foreign_codebook_is_refused(book: Codebook) -> None:
    data = bytearray(book.to_bytes())
    data[100] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        Codebook.from_bytes(bytes(data))
    with pytest.raises(CodecError, match="truncated|wrong size"):
        Codebook.from_bytes(book.to_bytes()[:-40])
    future = bytearray(book.to_bytes())
    future[8] = 9  # the version field
    with pytest.raises(CodecError, match="version 9"):
        Codebook.from_bytes(bytes(future))
    with pytest.raises(CodecError, match="not a kvtc codebook"):
        Codebook.from_bytes(b"x" * 200)


def test_codebooks_are_kept_durably_and_found_by_digest(book: Codebook, tmp_path: Path) -> None:
    kv = correlated_kv(3, 64, 32, seed=14)
    blob = KvtcCodec(book, store=CodebookStore(tmp_path)).encode(kv)
    assert (tmp_path / f"{book.digest}.kvtcbook").is_file()
    # Another process (a fresh store on the same directory) decodes the blob: the codebook is on disk.
    decoded = KvtcCodec(store=CodebookStore(tmp_path)).decode(blob)
    assert relative_error(decoded, kv) < 0.1


def test_a_blob_without_its_codebook_is_an_error_never_garbage(book: Codebook, tmp_path: Path) -> None:
    blob = KvtcCodec(book).encode(correlated_kv(3, 64, 32, seed=15))
    with pytest.raises(CodecError, match=f"needs codebook {book.digest}"):
        KvtcCodec(store=CodebookStore(tmp_path)).decode(blob)
    # A codebook file whose name lies about its content is refused too.
    other = Codebook.fit([correlated_kv(3, 64, 32, seed) for seed in range(20, 23)])
    (tmp_path / f"{book.digest}.kvtcbook").write_bytes(other.to_bytes())
    with pytest.raises(CodecError, match="holds codebook"):
        KvtcCodec(store=CodebookStore(tmp_path)).decode(blob)


def test_shape_mismatches_and_bad_input_are_codec_errors(book: Codebook) -> None:
    codec = KvtcCodec(book)
    with pytest.raises(CodecError, match="3 layers × 32 channels"):
        codec.encode(kv_like_real(4, 16, 32, torch.float16))
    bad = correlated_kv(3, 16, 32, seed=16, dtype=torch.float32)
    bad[1, 2, 5, 7] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(bad)
    with pytest.raises(CodecError, match="needs a codebook"):
        KvtcCodec().encode(correlated_kv(3, 16, 32, seed=17))
    with pytest.raises(CodecError, match="unknown kvtc parameter"):
        KvtcCodec(book, bits=4)
    with pytest.raises(CodecError, match="positive"):
        KvtcCodec(book, key_step=0)
    with pytest.raises(CodecError):
        Codebook.fit([correlated_kv(3, 16, 32, 0), correlated_kv(2, 16, 32, 1)])  # two shapes


def test_corrupted_blobs_are_caught(book: Codebook) -> None:
    blob = KvtcCodec(book).encode(correlated_kv(3, 64, 32, seed=18))
    for position in (10, len(blob) // 2, len(blob) - 8):
        bad = bytearray(blob)
        bad[position] ^= 0x20
        with pytest.raises(CodecError):
            KvtcCodec(book).decode(bytes(bad))
    with pytest.raises(CodecError, match="not 'kvtc'"):
        KvtcCodec(book).decode(get_codec("cachegen").encode(correlated_kv(3, 8, 32, seed=19)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_corrupt_coded_words_behind_a_valid_checksum_fail_the_lane_check(book: Codebook, dtype: torch.dtype) -> None:
    """Both decode paths (float16: bfloat16 products; float32: float32 ones) name the corrupt lane instead of
    returning garbage."""
    from lmcached.codecs.format import TRAILERS

    blob = KvtcCodec(book).encode(correlated_kv(3, 64, 32, seed=18).to(dtype))
    parsed = unpack(blob)
    words_start = len(blob) - 8 - parsed.sections[5].nbytes - parsed.sections[4].nbytes
    bad = bytearray(blob)
    for i in range(words_start + 200, words_start + 240):
        bad[i] ^= 0xA5
    trailer, checksum = TRAILERS[FORMAT_VERSION]
    bad[-trailer.size :] = trailer.pack(checksum(bytes(bad[: -trailer.size])))
    with pytest.raises(CodecError, match="lane"):
        KvtcCodec(book).decode(bytes(bad))


def test_the_encoders_one_pass_kernels_match_torch_and_the_histogram(book: Codebook) -> None:
    """Centring into bfloat16 in one pass rounds as torch does, and the quantiser's counts are the histograms of
    its bands' symbols (what the rANS tables are built from)."""
    from lmcached.codecs import kvtc_cpu, rans_cpu
    from lmcached.codecs.base import kernel_input

    L, n, C, bands = 3, 63, 32, 8
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kv = correlated_kv(L, n + 1, C, seed=21).to(dtype)
        centred = np.empty((2, L, n, C), np.uint16)
        kvtc_cpu.add_offset_half(kernel_input(kv)[:, :, 1:], dtype == torch.bfloat16, -book.mean, 0, True, centred)
        torch_centred = (kv[:, :, 1:].float() - torch.from_numpy(book.mean)[:, :, None, :]).to(torch.bfloat16)
        assert np.array_equal(centred, torch_centred.view(torch.int16).numpy().view(np.uint16))
    y = KvtcCodec.project(book, kv, 1)
    steps, token = np.full((2, L, C), 0.05, np.float32), np.ones((2, L, n), np.float32)
    sym, counts = np.empty((2, L, n, C), np.uint8), np.empty((2 * L * bands, 256), np.int64)
    kvtc_cpu.quantize(y, steps, token, bands, sym, counts)
    by_band = np.ascontiguousarray(sym.reshape(2 * L, n, bands, C // bands).transpose(0, 2, 1, 3))  # each band's symbols
    assert np.array_equal(counts, rans_cpu.histogram(by_band.reshape(-1), 2 * L * bands, n * C // bands))


def test_kvtc_is_in_the_registry_and_names_what_it_lacks() -> None:
    from lmcached.codecs import available_codecs, decode

    assert "kvtc" in available_codecs()
    book = Codebook.fit([correlated_kv(3, 40, 24, seed) for seed in range(2)])
    blob = get_codec("kvtc", codebook=book).encode(correlated_kv(3, 20, 24, seed=5))
    with pytest.raises(CodecError, match="needs a codebook to encode"):
        get_codec("kvtc").encode(correlated_kv(3, 20, 24, seed=5))
    with pytest.raises(CodecError, match=f"needs codebook {book.digest}"):
        decode(blob)  # no store that holds it


def test_a_store_asks_its_fetch_for_a_missing_codebook_and_keeps_it(tmp_path: Path) -> None:
    from lmcached.codecs.kvtc import codebook_of

    book = Codebook.fit([correlated_kv(3, 40, 24, seed) for seed in range(2)])
    blob = KvtcCodec(book).encode(correlated_kv(3, 20, 24, seed=6))
    assert codebook_of(blob) == book.digest
    asked: list[str] = []
    store = CodebookStore(tmp_path, fetch=lambda d: asked.append(d) or (book.to_bytes() if d == book.digest else None))
    out = KvtcCodec(store=store).decode(blob)
    assert out.shape == (2, 3, 20, 24) and asked == [book.digest]
    assert (tmp_path / f"{book.digest}.kvtcbook").is_file()  # kept durably: not asked again
    KvtcCodec(store=store).decode(blob)
    assert asked == [book.digest]
    assert store.find("0" * 32) is None and asked[-1] == "0" * 32
    liar = CodebookStore(fetch=lambda d: Codebook.fit([correlated_kv(3, 40, 24, 9)]).to_bytes())
    with pytest.raises(CodecError, match="got"):
        KvtcCodec(store=liar).decode(blob)


#: (file stem, codebook file, layers, tokens, channels). v1 and v2: a four-state lane per band; v2-rans32: a
#: 32-state lane per layer of keys or values, each band's symbols consecutive; v2-bands32 (what this build
#: writes): the same lanes token by token, two bands of 32 components taking turns at their tables.
KVTC_GOLDEN = [
    ("kvtc-float16-v1", "kvtc-codebook-v1", 3, 20, 24),
    ("kvtc-float16-v2", "kvtc-codebook-v1", 3, 20, 24),
    ("kvtc-float16-v2-rans32", "kvtc-codebook-v1", 3, 20, 24),
    ("kvtc-float16-v2-bands32", "kvtc-codebook-v1-c64", 2, 20, 64),
]


@pytest.mark.parametrize(("stem", "book_stem", "layers", "tokens", "channels"), KVTC_GOLDEN, ids=[case[0] for case in KVTC_GOLDEN])
def test_golden_kvtc_blob_still_decodes(stem: str, book_stem: str, layers: int, tokens: int, channels: int) -> None:
    """Blobs of every container format version and lane layout, with format 1 codebooks, still decode to what
    they decoded to when committed. (LMCACHED_WRITE_GOLDEN=1 rewrites only what this build writes. Unlike
    cachegen's, kvtc's encoder is not checked byte for byte: its projection is a matrix product whose last
    bits depend on the CPU, see below.)"""
    book_path = GOLDEN / f"{book_stem}.bin"
    blob_path, expected_path = (GOLDEN / f"{stem}{suffix}.bin" for suffix in ("", ".expected"))
    current = stem == f"kvtc-float16-v{FORMAT_VERSION}-bands32"
    kv = correlated_kv(layers, tokens, channels, seed=1234)
    if os.environ.get("LMCACHED_WRITE_GOLDEN") and current:
        if not book_path.exists():
            book_path.write_bytes(Codebook.fit([correlated_kv(layers, 80, channels, seed) for seed in range(2)]).to_bytes())
        book = Codebook.from_bytes(book_path.read_bytes())
        blob = KvtcCodec(book).encode(kv)
        blob_path.write_bytes(blob)
        expected_path.write_bytes(KvtcCodec(book).decode(blob).contiguous().view(torch.uint8).numpy().tobytes())
    params = unpack(blob_path.read_bytes()).params
    assert params.get("rans_states", entropy.NARROW) == (entropy.WIDE if stem.endswith(("rans32", "bands32")) else entropy.NARROW)
    assert ("band_width" in params) == current
    book = Codebook.from_bytes(book_path.read_bytes())
    out = KvtcCodec(book).decode(blob_path.read_bytes())
    assert out.dtype == torch.float16 and out.shape == (2, layers, tokens, channels)
    expected = torch.frombuffer(bytearray(expected_path.read_bytes()), dtype=torch.float16).reshape(out.shape)
    # Not bit for bit, unlike cachegen's: the inverse transform is a matrix product — bfloat16 where the CPU
    # multiplies it in hardware, else float32 — whose last bits depend on the CPU. The two differ by ~0.3 %
    # (relative); the quantiser's own error is ~10 %, and a misread format would be ~100 %.
    assert torch.equal(out[:, :, :1], expected[:, :, :1])  # the exact sink row is exact everywhere
    assert relative_error(out, expected) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_basis_products_in_either_precision_agree(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs made with bfloat16 products decode with float32 ones and the other way round, to within what the
    bfloat16 mantissa costs (far below the quantiser's error), for every output dtype."""
    from lmcached.codecs import kvtc

    book = Codebook.fit([correlated_kv(3, 40, 24, seed) for seed in range(3)])
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        kv = correlated_kv(3, 30, 24, seed=77).to(out_dtype)
        monkeypatch.setattr(kvtc, "MATMUL_DTYPE", dtype)
        blob = KvtcCodec(book).encode(kv)
        mine = KvtcCodec(book).decode(blob)
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        monkeypatch.setattr(kvtc, "MATMUL_DTYPE", other)
        theirs = KvtcCodec(book).decode(blob)
        assert mine.dtype == theirs.dtype == out_dtype
        assert relative_error(mine, theirs) < 0.01
        assert relative_error(mine, kv) < 0.2
