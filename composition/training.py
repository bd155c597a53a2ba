"""Training a composition: central and experts frozen, only blocks and gates learn.

independent (PHATGOOSE, decentralised): for one expert, on its own cluster's data, train its
cross-attention blocks (gate fixed at 0.5), then freeze them and train only its gate vectors.
joint: all blocks and gates together on the whole corpus, top-k routing in the loop, plus a
load-balancing loss.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from composition.model import ComposedLM
from experts.trainer import TrainConfig, TrainResult, train


def set_trainable(composed: ComposedLM, modules: list[nn.Module]) -> None:
    """Only the parameters of `modules` (blocks / gates) require gradients."""
    for p in composed.trainable_parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def fit_centers(composed: ComposedLM, tokens: np.ndarray, n_tokens: int, seq_len: int | None = None,
                batch_size: int = 8) -> None:
    """Center the routing on the central model's mean states over the first n_tokens of `tokens`
    (the central model's own training data: a property of the central, shared by every expert)."""
    seq = seq_len or composed.config.block_size
    n = min(len(tokens) - 1, n_tokens) // seq * seq
    if n < seq:
        raise ValueError(f"need at least {seq + 1} tokens to fit routing centers, got {len(tokens)}")
    x = torch.from_numpy(np.asarray(tokens[:n]).astype(np.int64)).view(-1, seq)  # (n / seq, seq)
    composed.fit_centers(x.split(batch_size))


def train_independent(composed: ComposedLM, expert: int, tokens: np.ndarray, blocks_cfg: TrainConfig,
                      gates_cfg: TrainConfig, on_metrics: Callable[[int, dict], None] | None = None
                      ) -> tuple[TrainResult, TrainResult]:
    """Train expert `expert`'s blocks, then its gates, on that expert's own data."""
    saved = composed.routing, composed.active
    emit = on_metrics or (lambda step, metrics: None)
    try:
        composed.routing, composed.active = "gate", [expert]
        set_trainable(composed, [composed.blocks[expert]])
        blocks = train(composed, tokens, None, blocks_cfg,
                       on_metrics=lambda s, m: emit(s, {f"blocks_{k}": v for k, v in m.items()}))
        set_trainable(composed, [composed.gates[expert]])
        gates = train(composed, tokens, None, gates_cfg,
                      on_metrics=lambda s, m: emit(blocks.steps + s, {f"gates_{k}": v for k, v in m.items()}))
    finally:
        composed.routing, composed.active = saved
        set_trainable(composed, [composed.blocks, composed.gates])
    return blocks, gates


def train_joint(composed: ComposedLM, tokens: np.ndarray, cfg: TrainConfig, balance_weight: float = 0.01,
                on_metrics: Callable[[int, dict], None] | None = None) -> TrainResult:
    """All blocks and gates together, top-k routing in the loop, load-balancing loss."""
    saved = composed.routing, composed.active, composed.balance_weight
    try:
        composed.routing, composed.active = "topk", list(range(len(composed.experts)))
        composed.balance_weight = balance_weight
        set_trainable(composed, [composed.blocks, composed.gates])
        return train(composed, tokens, None, cfg, on_metrics=on_metrics)
    finally:
        composed.routing, composed.active, composed.balance_weight = saved
