"""The real SmolLM2 model: loading offline, and lmcached's KV layout round trip."""

from __future__ import annotations

import torch

from lmcached.model import cache_from_kv, kv_from_cache, load_model


def test_kv_layout_round_trip_gives_the_same_next_token_logits() -> None:
    loaded = load_model()
    assert (loaded.name, loaded.num_layers, loaded.channels) == ("SmolLM2-135M-Instruct", 30, 192)
    ids = torch.tensor([loaded.tokenizer("Explain the significance of KV cache in language models.").input_ids])
    with torch.no_grad():
        full = loaded.model(ids, use_cache=True)
    kv = kv_from_cache(full.cache)
    assert kv.shape == (2, 30, ids.shape[1], 192)
    assert torch.equal(kv[1, 3, 5].view(3, 64), full.cache.layers[3].values[0, :, 5, :])  # [2, L, T, H*D], heads in order
    with torch.no_grad():
        resumed = loaded.model(ids[:, -1:], cache=cache_from_kv(kv[:, :, :-1], loaded.kv_heads), use_cache=True)
    assert torch.allclose(resumed.logits[0, -1], full.logits[0, -1], atol=1e-4)
    assert kv_from_cache(full.cache, torch.float16).dtype == torch.float16
