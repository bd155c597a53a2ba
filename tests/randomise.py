"""Seeded random weights for causality and alignment tests.

A freshly built model hides paths: the hourglass upsamplers' output projections, the
composition blocks' output projections, null keys, gate vectors and centres all start at
zero, so a leak through them cannot change any logit. `randomise_` gives every parameter
(and the non-trainable `centers`) a seeded random value so that every path carries signal,
with scales that keep activations and logits moderate and finite.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from experts.blocks import RMSNorm


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0, std: float = 1.0) -> nn.Module:
    """Set every parameter of `model` (frozen ones and buffers-as-parameters included) in place:
    norm weights ~ 1 + 0.2 N(0, 1); matrices ~ N(0, std^2 / fan_in) (each output unit gets
    signal of order std); every other tensor (gates, centres, null keys, position tables,
    DenseFormer weights) ~ N(0, (0.5 std)^2). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm) and m.weight is not None}
    for _, p in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if id(p) in norms:
            value = 1 + 0.2 * noise
        elif p.dim() >= 2:
            value = noise * (std / math.sqrt(p.shape[-1]))
        else:
            value = noise * 0.5 * std
        p.copy_(value.to(p.dtype))
    return model


def assert_causal(model, idx: torch.Tensor, base: torch.Tensor, kwargs: dict, vocab: int = 64) -> None:
    """A change of input j changes the output at j and nothing before it (idx (1, >= 45))."""
    for j in (0, 3, 7, 8, 16, 30, 44):
        changed = idx.clone()
        changed[0, j] = (changed[0, j] + 5) % vocab
        logits, _ = model(changed, **kwargs)
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j], base[:, j])
