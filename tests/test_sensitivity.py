"""Layer costs and the kvtc steps they set (lmcached.engine.sensitivity), on the real model: what one layer's coding
error costs, that the costs add up, and that the weighted steps spend the budget they were given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lmcached.codecs.kvtc import Codebook, KvtcCodec

from lmcached.engine import sensitivity


def test_steps_give_every_layer_an_equal_share_of_the_budget() -> None:
    costs = np.array([[1e-4, 4e-4, 1e-5], [2e-3, 5e-4, 1e-4]])
    scale = sensitivity.step_scale(costs, budget=0.006)
    shares = costs * (scale / sensitivity.PROBE) ** 2  # cost ∝ step², measured at the probe's steps
    assert np.allclose(shares, 0.001, rtol=1e-5) and np.isclose(shares.sum(), 0.006, rtol=1e-5)
    assert scale[1, 0] < scale[0, 1] < scale[0, 0]  # costlier layers get finer steps
    # A layer whose cost was too small to resolve is taken to cost FLOOR × the largest, not zero.
    floored = sensitivity.step_scale(np.array([[0.0, 1e-3], [1e-3, 1e-3]]), budget=0.004)
    assert np.isclose(floored[0, 0], floored[0, 1] / np.sqrt(sensitivity.FLOOR), rtol=1e-5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="budget"):
            sensitivity.step_scale(costs, budget=bad)
    with pytest.raises(ValueError, match="finite"):
        sensitivity.step_scale(np.zeros((2, 3)))


@pytest.fixture(scope="module")
def probed() -> tuple[object, Codebook, sensitivity.Probe]:
    """SmolLM2, a codebook from two texts of the language reference and a probe on a third."""
    from pydoc_data.topics import topics

    from lmcached.engine.model import forward, kv_from_cache, load_model

    loaded = load_model()

    def run(name: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = loaded.tokenizer(topics[name], return_tensors="pt").input_ids[:, :tokens]
        with torch.no_grad():
            return ids, kv_from_cache(forward(loaded.model, ids).cache, torch.float16)

    book = Codebook.fit(run(name, 512)[1] for name in ("execmodel", "types"))
    ids, kv = run("import", 320)
    return loaded, book, sensitivity.probe(loaded, ids, 256, kv)


def test_layer_costs_are_real_and_add_up(probed: tuple[object, Codebook, sensitivity.Probe]) -> None:
    loaded, book, probe = probed
    calls: list[int] = []
    costs = sensitivity.layer_costs(loaded, book, [probe], on_probe=lambda: calls.append(1))
    assert calls == [1] and costs.shape == (2, book.layers) and (costs > -1e-6).all()
    assert costs[1].sum() > costs[0].sum()  # values cost SmolLM2 more than keys at these steps
    assert costs.max() > 8 * np.median(costs)  # a few layers cost far more than the rest: why weigh them
    # Coding every layer at once costs about the sum of coding each alone (what the allocation relies on).
    codec = KvtcCodec(book, key_step=0.17 * sensitivity.PROBE, value_step=0.7 * sensitivity.PROBE)
    coded = codec.decode(codec.encode(probe.kv))
    together = sensitivity.kl_divergence(sensitivity.logits_after(loaded, coded, probe.ids[:, probe.context :]), probe.ref_logits)
    assert 0.6 < together / costs.sum() < 1.5


def test_weighted_steps_spend_about_the_budget(probed: tuple[object, Codebook, sensitivity.Probe]) -> None:
    loaded, book, probe = probed
    weighted = sensitivity.weigh(loaded, book, [probe], budget=0.006)
    assert weighted.step_scale is not None and weighted.uniform().digest == book.digest
    scored = probe.ids[:, probe.context :]

    def cost(codec: KvtcCodec) -> tuple[float, int]:
        blob = codec.encode(probe.kv)
        return sensitivity.kl_divergence(sensitivity.logits_after(loaded, codec.decode(blob), scored), probe.ref_logits), len(blob)

    kl, size = cost(KvtcCodec(weighted))
    assert 0.003 < kl < 0.012  # the budget, within what a single 64-token probe resolves
    # One step for every layer, at the probe's steps (about the same cost): more bytes for more error.
    uniform = KvtcCodec(book, key_step=0.17 * sensitivity.PROBE, value_step=0.7 * sensitivity.PROBE)
    uniform_kl, uniform_size = cost(uniform)
    assert uniform_size > 1.05 * size and uniform_kl > 1.1 * kl
