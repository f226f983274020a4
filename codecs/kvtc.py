"""The "kvtc" codec: transform coding of KV with a codebook learned once per model (after KVTC, arXiv 2511.01815).

Per model shape (layers, channels) a **codebook** holds, for keys and for values of every layer, the mean
vector and the principal components (PCA basis, by variance) of calibration KV. A chunk is coded in that basis:

1. The first `exact_tokens` tokens stay exact (the attention sink, as in cachegen).
2. y = (x - mean) · basis: the channels decorrelated, most of the energy in the first components.
3. One quantiser step per (keys or values, layer): a fraction of the layer's typical component spread (keys
   finer: they decide attention), raised for a component only where the chunk's values would clip (steps are
   stored per component, fp16). Values also get a per-token scale (their token norms vary a lot), stored
   as fp16 like cachegen's. Components whose spread is below the step fall to the zero symbol and cost almost
   nothing: a uniform step over decorrelated components is the reverse water-filling bit allocation.
4. The symbols are rANS-coded (`codecs/entropy.py`, the coder cachegen uses) in bands of components of similar
   variance, each band of each layer with its own table. A lane is a whole layer of keys or values (32 states,
   `rans_states`), token by token, its bands of 32 components taking turns at their tables (`band_width`), so
   each 32-state step is one band of one token and the decoder dequantises the symbols as it decodes them.
   Older blobs: without `band_width` a band's symbols are consecutive (one table segment each); without
   `rans_states` each band has its own four-state lane.

The blob names its codebook by content hash (`Codebook.digest`); decoding needs that codebook, found in the
codec's own codebook or in a `CodebookStore`. A missing or different codebook is a CodecError, never garbage.
A worker keeps its codebooks with its chunks and ships them wherever its kvtc blobs go (`lmcached.worker.codebooks`).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcached.errors import CodecError, MissingCodebook

from . import entropy, kvtc_cpu
from .base import TORCH_DTYPES, TORCH_ITEMSIZE, Codec, kernel_input, runs_on_gpu, step_params, with_exact_rows
from .format import pack, unpack
from .layouts import band_width, coded_layout
from .scratch import output, scratch

DEFAULTS: dict[str, Any] = {
    # Steps as fractions of the layer's typical component spread (root of the mean component variance),
    # chosen on the tuning half of lmcached.bench.heldout (SmolLM2): 0.15/0.6 gave 4.73×, +0.04 %, top-1 0.974;
    # 0.17/0.7 5.02×, +0.11 %, 0.966; 0.2/0.8 5.37×, +0.20 %, 0.961 (tables 0.941).
    "key_step": 0.17,
    "value_step": 0.7,
    "exact_tokens": 1,
    # Symbols per rANS lane: a whole layer of keys or values (its 32 states' final values cost 128 bytes a
    # lane; a lane per band, as the four-state lanes had, would add 7 % to a SmolLM2 blob).
    "lane_size": 65536,
}


def _matmul_dtype() -> torch.dtype:
    """bfloat16 for the basis products where the CPU multiplies bfloat16 in hardware (AMX or AVX-512 BF16):
    measured 1.5 ms against 7-9 ms in float32 for SmolLM2's 60 products of 255×192 by 192×192, half of a
    decode. Its 8-bit mantissa adds ~0.3 % relative error, against ~6-10 % from the quantiser itself.
    Elsewhere float32 (emulated bfloat16 is slower). LMCACHED_KVTC_MATMUL=float32 forces float32."""
    import os

    if os.environ.get("LMCACHED_KVTC_MATMUL") == "float32":
        return torch.float32
    cpu = getattr(torch, "cpu", None)
    fast = any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return torch.bfloat16 if fast else torch.float32


MATMUL_DTYPE = _matmul_dtype()
#: Components per layer are coded in at most this many bands of similar variance, a rANS table each.
SECTIONS = 6
ZERO, QMAX = 128, 127

CODEBOOK_MAGIC = b"LMCKVTCB"
#: Version 1: mean, basis, variance. Version 2 adds per-layer step multipliers (`Codebook.step_scale`); a
#: codebook without them is still written as version 1, so its digest, and the blobs that name it, never change.
CODEBOOK_VERSION = 2
_CODEBOOK_HEAD = struct.Struct("<8sHII")


@dataclass(frozen=True, eq=False)
class Codebook:
    """Per side (keys 0, values 1) and layer: mean [C], basis [C, C] (columns are components, by variance,
    largest first) and the components' variances [C]; optionally a multiplier of each layer's step, from what
    its error was measured to cost the model (`lmcached.engine.sensitivity`; None: the same step for every layer).
    Identified by the hash of its bytes."""

    mean: np.ndarray  # float32 [2, L, C]
    basis: np.ndarray  # float32 [2, L, C, C]
    variance: np.ndarray  # float32 [2, L, C]
    step_scale: np.ndarray | None = None  # float32 [2, L]
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.blake2b(self._body(), digest_size=16).hexdigest())

    @property
    def layers(self) -> int:
        return int(self.mean.shape[1])

    @property
    def channels(self) -> int:
        return int(self.mean.shape[2])

    @classmethod
    def fit(cls, chunks: Iterable[torch.Tensor], exact_tokens: int = DEFAULTS["exact_tokens"]) -> Codebook:
        """Learn a codebook from calibration chunks [2, L, T, C] of one model (the exact tokens left out: they
        are never transform-coded)."""
        rows = [c.detach().to("cpu", torch.float64)[:, :, exact_tokens:] for c in chunks]
        rows = [r for r in rows if r.shape[2]]
        if not rows:
            raise CodecError("a kvtc codebook needs calibration chunks with tokens to learn from")
        shapes = {(r.shape[0], r.shape[1], r.shape[3]) for r in rows}
        if len(shapes) != 1 or rows[0].shape[0] != 2:
            raise CodecError(f"calibration chunks must share one [2, L, T, C] shape, got {sorted(shapes)}")
        x = torch.cat(rows, dim=2)
        if not torch.isfinite(x).all():
            raise CodecError("calibration chunks hold NaN or infinite values")
        mean = x.mean(dim=2)
        centred = x - mean[:, :, None, :]
        cov = centred.transpose(-1, -2) @ centred / x.shape[2]
        variance, basis = torch.linalg.eigh(cov)  # ascending
        variance, basis = variance.flip(-1).clamp(min=0), basis.flip(-1)
        return cls(mean.float().numpy(), basis.float().contiguous().numpy(), variance.float().numpy())

    def uniform(self) -> Codebook:
        """This codebook with the same step for every layer."""
        return self if self.step_scale is None else Codebook(self.mean, self.basis, self.variance)

    def weighted(self, step_scale: np.ndarray) -> Codebook:
        """This codebook with per-layer step multipliers [2, L] (finite, positive)."""
        scale = np.asarray(step_scale, dtype=np.float32)
        if scale.shape != (2, self.layers) or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise CodecError(f"kvtc step multipliers must be [2, {self.layers}], finite and positive")
        return Codebook(self.mean, self.basis, self.variance, scale)

    def projected_mean(self) -> np.ndarray:
        """mean · basis [2, L, C] (cached): what the encoder subtracts after projecting."""
        cached = self.__dict__.get("_projected")
        if cached is None:
            cached = np.einsum("slc,slcd->sld", self.mean, self.basis).astype(np.float32)
            object.__setattr__(self, "_projected", cached)
        return cached

    def basis_as(self, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
        """The basis [2L, C, C] (or each layer's transpose) in `dtype`, contiguous; cached."""
        cache = self.__dict__.setdefault("_basis_as", {})
        if (dtype, transposed) not in cache:
            basis = torch.from_numpy(self.basis).reshape(2 * self.layers, self.channels, self.channels)
            cache[dtype, transposed] = (basis.transpose(1, 2) if transposed else basis).to(dtype).contiguous()
        return cache[dtype, transposed]

    def _body(self) -> bytes:
        _, L, C = self.mean.shape
        arrays = [self.mean, self.basis, self.variance]
        if self.step_scale is not None:
            arrays.append(self.step_scale)
        head = _CODEBOOK_HEAD.pack(CODEBOOK_MAGIC, 1 if self.step_scale is None else 2, L, C)
        return head + b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays)

    def to_bytes(self) -> bytes:
        """Versioned bytes; the last 16 bytes are the digest of the rest (a checksum that is also its name)."""
        return self._body() + bytes.fromhex(self.digest)

    @classmethod
    def from_bytes(cls, data: bytes) -> Codebook:
        if len(data) < _CODEBOOK_HEAD.size + 16:
            raise CodecError("kvtc codebook is truncated")
        magic, version, L, C = _CODEBOOK_HEAD.unpack_from(data)
        if magic != CODEBOOK_MAGIC:
            raise CodecError("not a kvtc codebook")
        if version not in (1, 2):
            raise CodecError(f"kvtc codebook version {version} is not supported (this build reads 1 to {CODEBOOK_VERSION})")
        sizes = (2 * L * C, 2 * L * C * C, 2 * L * C) + ((2 * L,) if version == 2 else ())
        if len(data) != _CODEBOOK_HEAD.size + 4 * sum(sizes) + 16:
            raise CodecError("kvtc codebook has the wrong size for its shape")
        body, digest = data[:-16], data[-16:].hex()
        if hashlib.blake2b(body, digest_size=16).hexdigest() != digest:
            raise CodecError("kvtc codebook checksum mismatch: it is corrupted")
        flat, pos = [], _CODEBOOK_HEAD.size
        for n in sizes:
            flat.append(np.frombuffer(body, dtype="<f4", count=n, offset=pos).astype(np.float32))
            pos += 4 * n
        book = cls(flat[0].reshape(2, L, C), flat[1].reshape(2, L, C, C), flat[2].reshape(2, L, C))
        return book.weighted(flat[3].reshape(2, L)) if version == 2 else book


class CodebookStore:
    """Codebooks by digest, in memory and (with a directory) durably as `<digest>.kvtcbook` files; with `fetch`
    (digest -> the codebook's bytes, or None), a codebook found nowhere here is asked for there (and kept)."""

    def __init__(self, directory: str | Path | None = None, fetch: Callable[[str], bytes | None] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fetch = fetch
        self._books: dict[str, Codebook] = {}

    def add(self, book: Codebook) -> str:
        self._books[book.digest] = book
        if self.directory is not None:
            path = self.directory / f"{book.digest}.kvtcbook"
            if not path.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    f.write(book.to_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic: a half-written codebook is never found
        return book.digest

    def get(self, digest: str) -> Codebook:
        book = self.find(digest)
        if book is None:
            raise MissingCodebook(f"this kvtc blob needs codebook {digest}, which is not here (calibrate, or copy it over)")
        return book

    def find(self, digest: str) -> Codebook | None:
        """The codebook, from memory, the directory or `fetch` (checked against its name), else None."""
        book = self._books.get(digest)
        if book is None and self.directory is not None:
            path = self.directory / f"{digest}.kvtcbook"
            if path.is_file():
                book = Codebook.from_bytes(path.read_bytes())
                if book.digest != digest:
                    raise CodecError(f"kvtc codebook file {path.name} holds codebook {book.digest}")
                self._books[digest] = book
        if book is None and self.fetch is not None:
            data = self.fetch(digest)
            if data is not None:
                book = Codebook.from_bytes(data)
                if book.digest != digest:
                    raise CodecError(f"asked for kvtc codebook {digest}, got {book.digest}")
                self.add(book)
        return book


def codebook_of(blob: bytes | bytearray | memoryview) -> str:
    """The digest of the codebook a kvtc blob needs (the blob is verified on the way)."""
    digest = unpack(blob, "kvtc").params.get("codebook")
    if not isinstance(digest, str):
        raise CodecError("kvtc blob does not name its codebook")
    return digest


class KvtcCodec(Codec):
    name = "kvtc"
    lossy = True

    def __init__(self, codebook: Codebook | None = None, store: CodebookStore | None = None, **params: Any) -> None:
        self.params = step_params(self.name, params, DEFAULTS)
        self.codebook = codebook
        self.store = store if store is not None else CodebookStore()
        if codebook is not None:
            self.store.add(codebook)

    # ------------------------------------------------------------------ encode
    def encode(self, kv: torch.Tensor) -> bytes:
        dtype, shape = self.check(kv)
        book = self.codebook
        if book is None:
            raise CodecError("kvtc needs a codebook to encode (Codebook.fit on calibration chunks of this model)")
        _, L, T, C = shape
        if (L, C) != (book.layers, book.channels):
            raise CodecError(f"kvtc codebook {book.digest} is for {book.layers} layers × {book.channels} channels, not {L} × {C}")
        exact = min(int(self.params["exact_tokens"]), T)
        if runs_on_gpu(kv.device):
            from . import gpu

            return gpu.kvtc_encode(self, book, kv, dtype, shape, exact)
        y_np = self.project(book, kv, exact)
        n = T - exact
        rms = np.empty((L, n), np.float64)
        if n:
            kvtc_cpu.token_rms(y_np[1], rms)
        token = self.token_scale(rms)
        need = np.empty((2, L, C), np.float32)
        kvtc_cpu.reach(y_np, token, need)
        steps = self.component_steps(book, need)
        width = band_width(C)
        symbols = scratch("kvtc.symbols", (2, L, n, C), np.uint8)
        counts = np.empty((2 * L * (C // width), 256), np.int64)
        kvtc_cpu.quantize(y_np, steps.astype(np.float32), token, C // width, symbols, counts)
        lane = int(self.params["lane_size"])
        coded = entropy.encode(symbols.reshape(-1), 2 * L, n * C, lane, counts, entropy.WIDE, C // width, width)
        return self.blob(dtype, shape, book, exact, width, lane, steps, token, coded, kv)

    @staticmethod
    def project(book: Codebook, kv: torch.Tensor, exact: int) -> np.ndarray:
        """y [2, L, n, C]: the tokens after the exact ones, centred and in the codebook's basis. float32, or with
        bfloat16 products (MATMUL_DTYPE) their bfloat16 bits (uint16), which kvtc_cpu's kernels read as they are:
        widening them to float32 was a 12 MB pass of its own. This thread's scratch buffer: valid until it projects
        again."""
        _, L, T, C = kv.shape
        n = T - exact
        if MATMUL_DTYPE == torch.float32:
            # y = (x - mean) · basis, as x · basis - mean · basis: one fused matrix product per (side, layer).
            x = kv.detach().to("cpu", torch.float32)[:, :, exact:].reshape(2 * L, n, C)
            basis = torch.from_numpy(book.basis).reshape(2 * L, C, C)
            y = torch.baddbmm(torch.from_numpy(book.projected_mean()).reshape(2 * L, 1, C), x, basis, beta=-1.0)
            return y.numpy().reshape(2, L, n, C)
        # Centred first (in float32: the mean may be far larger than the spread), then the product.
        centred = scratch("kvtc.centred", (2, L, n, C), np.uint16)
        kvtc_cpu.add_offset_half(kernel_input(kv)[:, :, exact:], kv.dtype == torch.bfloat16, -book.mean, 0, True, centred)
        y = scratch("kvtc.product", (2, L, n, C), np.uint16)
        torch.bmm(bf16_tensor(centred, (2 * L, n, C)), book.basis_as(MATMUL_DTYPE), out=bf16_tensor(y, (2 * L, n, C)))
        return y

    @staticmethod
    def token_scale(rms: np.ndarray) -> np.ndarray:
        """token [2, L, n] (float32, as stored in fp16): 1 for keys; for values each token's RMS over the layer's
        mean RMS (value token norms vary a lot). `rms` [L, n] is the values' RMS per token."""
        L, n = rms.shape
        token = np.ones((2, L, n), np.float32)
        if n:
            token[1] = _f16(rms / np.maximum(rms.mean(axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return token

    def component_steps(self, book: Codebook, need: np.ndarray) -> np.ndarray:
        """Steps [2, L, C] (fp16, as stored): the layer's step, raised where this chunk's values would clip (a
        component far louder than the calibration said, or the leading ones on an unusual chunk). `need` is
        the largest |y| / token per component."""
        if not np.isfinite(need).all():
            raise CodecError("kv holds NaN or infinite values")
        return _f16(np.maximum(self.layer_steps(book)[:, :, None], need * (1.001 / QMAX)))

    def blob(
        self,
        dtype: str,
        shape: tuple[int, ...],
        book: Codebook,
        exact: int,
        width: int,
        lane: int,
        steps: np.ndarray,
        token: np.ndarray,
        coded: entropy.Coded,
        kv: torch.Tensor,
    ) -> bytes:
        """The blob (CPU and GPU share it): steps, value token scales, the coded symbols (token by token, bands of
        `width` components taking turns at their tables), the exact rows."""
        exact_rows = kv[:, :, :exact, :].detach().to("cpu").contiguous().view(torch.uint8).numpy()
        params = {
            "codebook": book.digest,
            "key_step": self.params["key_step"],
            "value_step": self.params["value_step"],
            "exact_tokens": exact,
            "bands": shape[3] // width,
            "band_width": width,
            "lane_size": lane,
            "rans_states": coded.states,
        }
        sections = [steps, token[1].astype(np.float16), coded.tables, coded.offsets, coded.words, exact_rows]
        return pack(self.name, dtype, shape, params, sections)

    def layer_steps(self, book: Codebook) -> np.ndarray:
        """[2, L]: a fraction of each layer's typical component spread (keys and values apart), times the
        codebook's multiplier for the layer where it has them."""
        spread = np.sqrt(np.maximum(book.variance.mean(axis=2), 1e-12))
        steps = spread * np.array([self.params["key_step"], self.params["value_step"]])[:, None]
        return steps if book.step_scale is None else steps * book.step_scale

    # ------------------------------------------------------------------ decode
    def decode(self, blob: bytes, device: str | torch.device | None = None) -> torch.Tensor:
        b = unpack(blob, self.name)
        if len(b.shape) != 4 or b.shape[0] != 2 or len(b.sections) != SECTIONS:
            raise CodecError("kvtc blob has the wrong layout")
        _, L, T, C = b.shape
        p = b.params
        digest, exact, bands, lane = p.get("codebook"), p.get("exact_tokens"), p.get("bands"), p.get("lane_size")
        if not isinstance(digest, str) or not isinstance(exact, int) or not 0 <= exact <= T:
            raise CodecError("kvtc blob has bad parameters")
        if not isinstance(bands, int) or bands < 1 or C % bands or not isinstance(lane, int) or lane < 16:
            raise CodecError("kvtc blob has bad parameters")
        states = entropy.check_states(p.get("rans_states", entropy.NARROW))
        width = p.get("band_width")
        if width is not None and (not isinstance(width, int) or width != C // bands or states != entropy.WIDE):
            raise CodecError("kvtc blob has bad parameters")
        book = self.store.get(digest)
        if (L, C) != (book.layers, book.channels):
            raise CodecError(f"kvtc codebook {digest} does not match the blob's shape")
        n = T - exact
        steps = self._array(b.sections[0], 2 * L * C, np.float16).reshape(2, L, C).astype(np.float32)
        scale = self._array(b.sections[1], L * n, np.float16).reshape(L, n).astype(np.float32)
        offsets = self._array(b.sections[3], None, np.dtype("<u4"))
        words = self._array(b.sections[4], None, np.dtype("<u2"))
        exact_rows = self._array(b.sections[5], 2 * L * exact * C * TORCH_ITEMSIZE[b.dtype], np.uint8)
        token = np.ones((2, L, n), np.float32)
        token[1] = scale
        target = torch.device(device) if device is not None else torch.device("cpu")
        if runs_on_gpu(target):
            from . import gpu

            return gpu.kvtc_decode(b, book, steps, token, offsets, words, exact_rows, target)
        # (Recycled from this thread's earlier outputs once their holders let go, as cachegen's: a fresh 5.9 MB
        # output faulted its pages in inside the last pass.)
        raw = output("kvtc.out", (2, L, T, C * TORCH_ITEMSIZE[b.dtype]), np.uint8)
        out = torch.from_numpy(raw).view(TORCH_DTYPES[b.dtype])
        if MATMUL_DTYPE == torch.float32 or b.dtype == "float32":
            # x = y · basisᵀ + mean, the mean added inside the matrix product
            y = scratch("kvtc.y", (2 * L, n, C), np.float32)
            dequantized(b, states, offsets, words, steps, token, y)
            basis_t = torch.from_numpy(book.basis).reshape(2 * L, C, C).transpose(1, 2)
            mean = torch.from_numpy(book.mean).reshape(2 * L, 1, C)
            out[:, :, exact:] = torch.baddbmm(mean, torch.from_numpy(y), basis_t).reshape(2, L, n, C)
        else:  # the product in bfloat16, the mean added in float32 on the way to the half-precision output
            y16 = scratch("kvtc.y16", (2 * L, n, C), np.uint16)
            dequantized(b, states, offsets, words, steps, token, y16)
            product = scratch("kvtc.product", (2, L, n, C), np.uint16)
            torch.bmm(
                bf16_tensor(y16, (2 * L, n, C)), book.basis_as(MATMUL_DTYPE, transposed=True), out=bf16_tensor(product, (2 * L, n, C))
            )
            bits = out.view(torch.int16).numpy().view(np.uint16)
            kvtc_cpu.add_offset_half(product, True, book.mean, exact, b.dtype == "bfloat16", bits)
        return with_exact_rows(out, exact_rows, b.dtype, exact).to(target)


def dequantized(b: Any, states: int, offsets: np.ndarray, words: np.ndarray, steps: np.ndarray, token: np.ndarray, y: np.ndarray) -> None:
    """Decode a kvtc blob's symbols (lanes of `states` states, as checked) into y [2 * L, n, C] as values
    (float32, or bfloat16 bits: uint16). Blobs in token order are dequantised inside the rANS decoder; older
    layouts decode to symbols, then dequantise."""
    _, L, T, C = b.shape
    groups, group_len, segments, segment_len = coded_layout(b, states)
    lane = int(b.params["lane_size"])
    n = T - int(b.params["exact_tokens"])
    if "band_width" in b.params:
        scales = (steps.reshape(2 * L, C), token.reshape(2 * L, n))
        entropy.decode_scaled(b.sections[2], offsets, words, lane, segments, segment_len, ZERO, *scales, y)
        return
    bands = int(b.params["bands"])
    sym = entropy.decode(b.sections[2], offsets, words, groups, group_len, lane, states, segments, segment_len)
    banded = sym.reshape(2, L, bands, n, C // bands)
    if y.dtype == np.uint16:
        kvtc_cpu.dequantize_bf16(banded, steps, token, y.reshape(2, L, n, C))
    else:
        kvtc_cpu.dequantize(banded, steps, token, y.reshape(2, L, n, C))


def bf16_tensor(bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """A bfloat16 tensor on the memory of `bits` (uint16), for torch's products to read or write in place:
    into a fresh 5.9 MB result, numpy's and torch's allocators fault pages in (or wait for huge pages) on
    every chunk (see codecs/scratch.py)."""
    return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)


def _f16(a: np.ndarray) -> np.ndarray:
    """As stored: the encoder quantises with exactly the fp16 values the decoder reads (never 0 or inf)."""
    return np.clip(a, 1e-4, 6e4).astype(np.float16)


__all__ = ["Codebook", "CodebookStore", "KvtcCodec", "codebook_of"]
