"""The codec contract: encode a KV tensor [2, L, T, C] to a self-describing blob and back."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmcached.errors import CodecError

DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float8_e4m3fn: "float8_e4m3fn",  # vLLM's fp8 KV caches: only codecs with `codes_fp8` take them
    torch.float8_e5m2: "float8_e5m2",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
TORCH_ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
FP8 = frozenset({"float8_e4m3fn", "float8_e5m2"})


class Codec:
    """Base of every codec; subclasses set `name` and implement encode/decode."""

    name: str = ""
    lossy: bool = False
    params: dict[str, Any]

    def encode(self, kv: torch.Tensor) -> bytes:
        raise NotImplementedError

    def decode(self, blob: bytes, device: str | torch.device | None = None) -> torch.Tensor:
        raise NotImplementedError

    #: Whether the codec takes 8-bit float KV. The quantisers (cachegen, kvtc) code 16- and 32-bit values:
    #: fp8 KV is quantised already, and they refuse it rather than code it wrongly.
    codes_fp8 = False

    def check(self, kv: Any) -> tuple[str, tuple[int, int, int, int]]:
        if not isinstance(kv, torch.Tensor):
            raise CodecError("kv must be a torch.Tensor")
        if kv.dim() != 4 or kv.shape[0] != 2:
            raise CodecError(f"kv must have shape [2, L, T, C], got {list(kv.shape)}")
        if kv.dtype not in DTYPES:
            raise CodecError(f"kv dtype {kv.dtype} is not supported ({', '.join(DTYPES.values())})")
        if DTYPES[kv.dtype] in FP8 and not self.codes_fp8:
            raise CodecError(f"{self.name} codes 16- and 32-bit KV; this KV is {DTYPES[kv.dtype]} (8-bit already): use lossless")
        if min(kv.shape) == 0:
            raise CodecError(f"kv must not be empty, got shape {list(kv.shape)}")
        return DTYPES[kv.dtype], tuple(int(d) for d in kv.shape)  # type: ignore[return-value]

    @staticmethod
    def _array(section: memoryview, count: int | None, dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        if section.nbytes % dt.itemsize or (count is not None and section.nbytes != count * dt.itemsize):
            raise CodecError("a blob section has the wrong size")
        return np.frombuffer(section, dtype=dt)


def step_params(codec: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults with `params` over them, checked: the parameters every quantise-then-rANS codec shares
    (positive key and value steps, lanes of at least 16 symbols, no negative count of exact tokens)."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise CodecError(f"unknown {codec} parameter(s): {', '.join(sorted(unknown))}")
    merged = {**defaults, **params}
    for key in ("key_step", "value_step"):
        if not float(merged[key]) > 0:
            raise CodecError(f"{codec} {key} must be positive")
    if int(merged["lane_size"]) < 16:
        raise CodecError(f"{codec} lane_size must be at least 16")
    if int(merged["exact_tokens"]) < 0:
        raise CodecError(f"{codec} exact_tokens must be >= 0")
    return merged


def with_exact_rows(result: torch.Tensor, exact_rows: np.ndarray, dtype: str, exact: int) -> torch.Tensor:
    """Put a blob's exact first tokens (the stored bytes, [2, L, exact, C] of `dtype`) into a decoded result."""
    if exact:
        _, L, _, C = result.shape
        rows = torch.from_numpy(exact_rows.copy()).view(TORCH_DTYPES[dtype]).reshape(2, L, exact, C)
        result[:, :, :exact, :] = rows.to(result.device)
    return result


def kernel_input(kv: torch.Tensor) -> np.ndarray:
    """kv on the CPU as the CPU kernels read it: float32 as it is, float16 and bfloat16 as their uint16 bits
    (`codecs/half.py` widens them). A copy only when kv is elsewhere or not contiguous."""
    kv = kv.detach().to("cpu").contiguous()
    if kv.dtype == torch.float32:
        return kv.numpy()
    return kv.view(torch.int16).numpy().view(np.uint16)


def from_float32(out: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(out).to(device=device, dtype=TORCH_DTYPES[dtype])


@functools.cache
def gpu_available() -> bool:
    """True when Numba can reach a CUDA device (or its simulator is on)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or its driver probe failed: no GPU path
        return False


#: Set by `simulate_gpu()`: CPU tensors take the CUDA kernels' path too, in Numba's simulator.
_SIMULATING = False


def simulator_on() -> bool:
    """True when Numba runs CUDA kernels in its simulator (NUMBA_ENABLE_CUDASIM=1) rather than on a device."""
    import os

    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def runs_on_gpu(device: torch.device) -> bool:
    """Whether codec work on data on (or decoding to) `device` runs the CUDA kernels: CUDA data with a device
    Numba can reach, or any data inside `simulate_gpu()`."""
    return gpu_available() and (device.type == "cuda" or _SIMULATING)


@contextlib.contextmanager
def simulate_gpu() -> Iterator[None]:
    """Run the codecs' GPU path on CPU tensors in Numba's CUDA simulator, which torch cannot see: how
    `scripts/gpu_check.sh` checks the GPU path's dispatch and kernels on a machine without a GPU. Process-wide
    (the codec runs in executor threads), and only with the simulator on: a real device needs CUDA tensors."""
    global _SIMULATING
    if not simulator_on():
        raise CodecError("simulate_gpu() needs Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    _SIMULATING = True
    try:
        yield
    finally:
        _SIMULATING = False
