"""How each codec lays its coded symbols out, in one module that the codecs and the GPU launcher both import
(so gpu.py imports no codec, and the codecs import gpu.py only to launch kernels): CacheGen's neutral
separable parameters, kvtc's bands and rANS groups."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import entropy, rans_wide

#: kvtc: a layer's components are coded in at most this many bands, a rANS table each.
BANDS = 8


@dataclass(frozen=True)
class Unit:
    """Neutral separable parameters: the side (rows or columns) a tensor is not scaled along."""

    ones_c: np.ndarray
    zeros_c: np.ndarray
    ones_r: np.ndarray
    zeros_r: np.ndarray


@functools.lru_cache(maxsize=64)
def unit_params(L: int, T: int, C: int) -> Unit:
    """Read-only and cached per shape: every chunk of a model has the same one."""
    arrays = [np.ones((L, C), np.float32), np.zeros((L, C), np.float32), np.ones((L, T), np.float32), np.zeros((L, T), np.float32)]
    for array in arrays:
        array.flags.writeable = False
    return Unit(*arrays)


def band_width(C: int) -> int:
    """Components per band for C components: the smallest multiple of rans_wide.STATES (32) that splits them
    into at most BANDS bands (SmolLM2's 192: six bands of 32), so each step of a lane is one band of one token;
    all C (one band) where none does."""
    for width in range(rans_wide.STATES, C + 1, rans_wide.STATES):
        if C % width == 0 and C // width <= BANDS:
            return width
    return C


def coded_layout(b: Any, states: int) -> tuple[int, int, int, int]:
    """(groups, symbols a group, tables a group, symbols a table's turn) of a blob's rANS coding. In 32-state
    lanes a layer of keys or values is a group with a table per band: token by token, the bands taking turns
    (`band_width` in the blob), or in older blobs each band's symbols consecutive. In the oldest, four-state
    lanes each band is a group."""
    _, L, T, C = b.shape
    bands, n = int(b.params["bands"]), T - int(b.params["exact_tokens"])
    if states != entropy.WIDE:
        return 2 * L * bands, n * (C // bands), 1, n * (C // bands)
    width = b.params.get("band_width")
    return 2 * L, n * C, bands, width if width is not None else n * (C // bands)
