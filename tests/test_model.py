"""The real SmolLM2 model: loading offline, and lmcached's KV layout round trip."""

from __future__ import annotations

from pathlib import Path

import torch

from lmcached.engine.model import cache_from_kv, forward, kv_from_cache, load_model


def test_kv_layout_round_trip_gives_the_same_next_token_logits() -> None:
    loaded = load_model()
    assert (loaded.name, loaded.num_layers, loaded.channels) == ("SmolLM2-135M-Instruct", 30, 192)
    ids = torch.tensor([loaded.tokenizer("Explain the significance of KV cache in language models.").input_ids])
    with torch.no_grad():
        full = forward(loaded.model, ids)
    kv = kv_from_cache(full.cache)
    assert kv.shape == (2, 30, ids.shape[1], 192)
    assert torch.equal(kv[1, 3, 5].view(3, 64), full.cache.layers[3].values[0, :, 5, :])  # [2, L, T, H*D], heads in order
    with torch.no_grad():
        resumed = forward(loaded.model, ids[:, -1:], cache_from_kv(kv[:, :, :-1], loaded.kv_heads))
    assert torch.allclose(resumed.logits[0, -1], full.logits[0, -1], atol=1e-4)
    assert kv_from_cache(full.cache, torch.float16).dtype == torch.float16


def test_the_converted_directory_names_tied_embeddings_twice() -> None:
    """vLLM reads `model.embed_tokens.weight` (it skips lm_head when embeddings are tied): both must be there."""
    from safetensors import safe_open

    from lmcached.engine.model import converted_dir, default_gguf

    directory = converted_dir(default_gguf())
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= names
        assert torch.equal(weights.get_tensor("model.embed_tokens.weight"), weights.get_tensor("lm_head.weight"))


def test_the_conversion_is_keyed_by_content_and_replaces_older_ones(tmp_path: Path) -> None:
    """Another checkout or a reinstall (another path, a new mtime) reuses the conversion; a conversion of an
    older file of the same name is removed once the new one is written (each is ~640 MB)."""
    import os
    import shutil

    from lmcached.engine.model import _remove_replaced, conversion_tag, converted_dir, default_gguf

    gguf = default_gguf()
    directory = converted_dir(gguf)
    copy = tmp_path / "elsewhere" / gguf.name
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    assert conversion_tag(copy) == conversion_tag(gguf) and converted_dir(copy) == directory  # no second conversion

    edited = tmp_path / gguf.name
    edited.write_bytes(gguf.read_bytes()[:-1] + b"x")
    assert conversion_tag(edited) != conversion_tag(gguf)

    models = tmp_path / "models"
    older, other, converting = models / f"{gguf.stem}-0123456789ab", models / "another-model-0123456789ab", models / f"{gguf.stem}-1.tmp42"
    current = models / f"{gguf.stem}-{conversion_tag(gguf)}"
    for folder in (older, other, converting, current):
        folder.mkdir(parents=True)
    _remove_replaced(current, gguf.stem)
    assert sorted(p.name for p in models.iterdir()) == sorted([other.name, converting.name, current.name])
