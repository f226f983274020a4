"""How much each layer's KV error costs the model's output, and kvtc steps that spend an error budget where it
is cheapest.

A codebook fitted on calibration chunks alone (`Codebook.fit`) gives every layer the same step, a fraction of
the layer's spread. Layers differ far more than that in what their error costs: on SmolLM2, coding a single
layer's values at the probe's steps moved the output by 1e-5 to 1.6e-3 nats per token (KL divergence from the
uncoded output), most keys by less, and the costs add up (the sum of the 60 single-layer costs was within 1 % of
coding all layers at once). With cost_i(s) ≈ a_i s² for a step s times the probe's, and the rate falling by
log2 s per symbol (every layer codes the same number of symbols), the least rate for a total cost is the one
that gives every (side, layer) an equal share of it: s_i = sqrt(budget / (N a_i)).

Measured on the held-out half of `lmcached.bench.heldout` (`lmcached bench codec`): kvtc went from 5.0× with
one step for every layer to 6.7× at the default budget, +0.59 % mean perplexity, top-1 0.959 (docs/codec.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: The probe codes with the codebook's uniform steps times this: coarse enough that one layer's cost stands
#: out of the noise of a few hundred scored tokens, fine enough that cost still grows as the step squared.
PROBE = 1.4
#: The default total cost, KL divergence from the uncoded output in nats per scored token. On the tuning half
#: (SmolLM2), costs from six probes as calibrate takes them: 0.006 gave 6.74× at +0.41 % perplexity, top-1
#: 0.965; 0.010 7.79×, +0.58 %, 0.959 (one step for all layers: 5.0×, +0.11 %, 0.966, a cost of ~0.005).
KL_BUDGET = 0.006
#: A (side, layer) whose cost measured below this share of the largest is taken to cost that much: below it
#: the probe does not resolve the cost, and a cost of ~0 would ask for an unbounded step.
FLOOR = 1e-3
#: Context tokens coded per chunk while probing, as a worker stores them.
CHUNK = 256


@dataclass
class Probe:
    """A context's KV and the logits of its continuation computed from that KV uncoded."""

    ids: torch.Tensor  # [1, context + continuation]
    kv: torch.Tensor  # [2, L, context, C], as the engine offloads it (fp16)
    ref_logits: torch.Tensor  # [continuation, vocab]

    @property
    def context(self) -> int:
        return int(self.kv.shape[2])


def logits_after(loaded: Any, kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of the tokens `ids` [1, T] run after a context whose KV is `kv`."""
    from lmcached.engine.model import cache_from_kv, forward

    with torch.no_grad():
        return forward(loaded.model, ids, cache_from_kv(kv, loaded.kv_heads)).logits[0].float()


def probe(loaded: Any, ids: torch.Tensor, context: int, kv: torch.Tensor) -> Probe:
    """A probe from a text's ids and its KV (`kv` [2, L, ≥ context, C], the first `context` tokens used)."""
    kv = kv[:, :, :context].contiguous()
    return Probe(ids, kv, logits_after(loaded, kv, ids[:, context:]))


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean KL(reference ‖ logits) per token, in nats."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    return float((ref.exp() * (ref - torch.log_softmax(logits.float(), dim=-1))).sum(-1).mean())


def layer_costs(loaded: Any, book: Any, probes: Iterable[Probe], on_probe: Callable[[], None] | None = None) -> np.ndarray:
    """[2, L]: the mean KL divergence per scored token when only that side and layer of the context is
    kvtc-coded at the probe's steps (blocking: one forward pass per side and layer and probe; `on_probe` is
    called after each probe, for progress)."""
    from lmcached.codecs.kvtc import DEFAULTS, KvtcCodec

    codec = KvtcCodec(book.uniform(), key_step=DEFAULTS["key_step"] * PROBE, value_step=DEFAULTS["value_step"] * PROBE)
    costs, count = np.zeros((2, book.layers)), 0
    for p in probes:
        chunks = [p.kv[:, :, start : start + CHUNK].contiguous() for start in range(0, p.context, CHUNK)]
        coded = torch.cat([codec.decode(codec.encode(chunk)) for chunk in chunks], dim=2)
        continuation = p.ids[:, p.context :]
        for side in range(2):
            for layer in range(book.layers):
                kv = p.kv.clone()
                kv[side, layer] = coded[side, layer]
                costs[side, layer] += kl_divergence(logits_after(loaded, kv, continuation), p.ref_logits)
        count += 1
        if on_probe is not None:
            on_probe()
    if not count:
        raise ValueError("measuring layer costs needs at least one probe")
    return costs / count


def step_scale(costs: np.ndarray, budget: float = KL_BUDGET) -> np.ndarray:
    """[2, L] multipliers of the codebook's uniform steps that give each side and layer an equal share of
    `budget` (KL nats per token), from `costs` measured at the probe's steps."""
    if budget <= 0:
        raise ValueError("the KL budget must be positive")
    if not np.isfinite(costs).all() or costs.max() <= 0:
        raise ValueError("layer costs must be finite with at least one above zero")
    floored = np.maximum(costs, costs.max() * FLOOR)
    return (PROBE * np.sqrt(budget / (costs.size * floored))).astype(np.float32)


def weigh(loaded: Any, book: Any, probes: list[Probe], budget: float = KL_BUDGET, on_probe: Callable[[], None] | None = None) -> Any:
    """The codebook with per-layer steps from costs measured on `probes` (see the module's doc)."""
    return book.uniform().weighted(step_scale(layer_costs(loaded, book, probes, on_probe), budget))
