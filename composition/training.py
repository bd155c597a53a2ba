"""Training a composition: central and experts frozen, only blocks and gates learn.

independent (PHATGOOSE, decentralised): for one expert, on its own cluster's data, train its
cross-attention blocks (gate fixed at 0.5), then freeze them and train only its gate vectors;
with output "mix", then only its OutputGate (the output mixture's weight of the expert).
kway: once every expert is done, a k-way gate over all of them, trained to tell every
cluster's text from the others' (each cluster's windows the others' negatives).
joint: all blocks and gates together on the whole corpus, top-k routing in the loop, plus a
load-balancing loss.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from composition.loader import CompositionSettings, assemble
from composition.model import ComposedLM
from experts.flops import features_flops_per_token, flops_up_to_stages, forward_flops_per_token
from experts.trainer import TrainConfig, TrainResult, train


def set_trainable(composed: ComposedLM, modules: list[nn.Module]) -> None:
    """Only the parameters of `modules` (blocks / gates) require gradients."""
    for p in composed.trainable_parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)


def all_trainable(composed: ComposedLM) -> None:
    """Every new parameter of the composition (blocks, gates, output gates, k-way gate) trainable again."""
    for p in composed.trainable_parameters():
        p.requires_grad_(True)


def windows_per_set(n_tokens: int, n_sets: int, seq: int) -> int:
    """Windows of `seq` tokens drawn from each of n_sets sets for an equal share of n_tokens (>= 1)."""
    return max(1, n_tokens // n_sets // seq)


def fit_centers(composed: ComposedLM, token_sets: list[np.ndarray], n_tokens: int, seed: int = 0,
                seq_len: int | None = None, batch_size: int = 8) -> int:
    """Center the routing on the mean over clusters of the central model's mean state: an equal
    share of n_tokens from each of `token_sets` (each expert's training data), as windows at
    seeded random offsets, so no one domain (or the corpus's first documents) sets the centre.
    Returns the tokens the central model read (whole windows)."""
    seq = seq_len or composed.config.block_size
    if not token_sets:
        raise ValueError("fit_centers needs at least one token set (one per expert)")
    per_set = windows_per_set(n_tokens, len(token_sets), seq)
    rng = np.random.default_rng(seed)
    device = next(composed.parameters()).device
    means = []
    for tokens in token_sets:
        if len(tokens) < seq + 1:
            raise ValueError(f"need at least {seq + 1} tokens in every set to fit routing centers, got {len(tokens)}")
        starts = np.sort(rng.integers(0, len(tokens) - seq, size=per_set))
        x = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq]) for s in starts]).astype(np.int64))  # (W, seq)
        composed.fit_centers(x.to(device).split(batch_size))
        means.append({p: c.detach().clone() for p, c in composed.centers.items()})
    for p in composed.points:
        composed.centers[p].copy_(torch.stack([m[p] for m in means]).mean(dim=0))
    return per_set * seq * len(token_sets)


def train_flops_per_token(composed: ComposedLM, experts: list[int], routing: str) -> float:
    """Training FLOPs per token of a composition phase that runs `experts` with `routing` and
    trains their blocks or gates (no output mixing). Forward: central, experts and blocks.
    Backward: 2x the blocks' forward (input and weight gradients, as for any trained layer); 1x
    the central model's forward above the first composition point (input gradients only: its
    weights are frozen), none below it, where backward stops since nothing there trains;
    nothing through the frozen experts."""
    seq = composed.config.block_size  # the experts run on the central model's windows
    total = _forward_flops(composed, experts, routing, "none")
    central = forward_flops_per_token(composed.central, seq)
    frozen = sum(features_flops_per_token(composed.experts[e], seq) for e in experts)  # no output head
    glue = total - central - frozen
    above = central - flops_up_to_stages(composed.central, seq)[composed.points[0]]
    return total + above + 2 * glue


def mix_flops_per_token(composed: ComposedLM, experts: list[int], routing: str) -> float:
    """Training FLOPs per token of the output gates' phase: the whole forward with output mixing
    (the experts' output heads included) and 2x the gates' own forward; backward stops at the
    gates, whose inputs (the frozen models' states) need no gradient."""
    total = _forward_flops(composed, experts, routing, "mix")
    gates = total - _forward_flops(composed, experts, routing, "none") - sum(
        forward_flops_per_token(composed.experts[e], composed.config.block_size)
        - features_flops_per_token(composed.experts[e], composed.config.block_size) for e in experts)
    return total + 2 * gates


def kway_flops_per_token(composed: ComposedLM) -> float:
    """Training FLOPs per token of the k-way gate's phase: the central model's forward up to the
    gate's point (the last composition point; no expert runs) and 3x the gate's own linear map;
    backward stops at the gate."""
    seq = composed.config.block_size
    total = forward_flops_per_token(_KwayForward(composed).train(composed.training), seq)
    (point,) = composed.kway
    return total + 2 * (total - flops_up_to_stages(composed.central, seq)[point])


class _KwayForward(nn.Module):
    """composed.kway_logits as a module's forward, for counting its FLOPs."""

    def __init__(self, composed: ComposedLM):
        super().__init__()
        self.composed, self.config = composed, composed.config

    def forward(self, idx: torch.Tensor):
        return self.composed.kway_logits(idx)


def _forward_flops(composed: ComposedLM, experts: list[int], routing: str, output: str) -> float:
    with composed.configured(routing=routing, active=experts, output=output):
        return forward_flops_per_token(composed, composed.config.block_size)


def top1_flops_per_token(composed: ComposedLM, seq_len: int | None = None) -> float:
    """Forward FLOPs per token of a router-routed composition whose router sends every position
    to one expert (cBTM top-1): the cost of a routed position, whatever the router's choice."""
    seq_len = seq_len or composed.config.block_size
    device = next(composed.parameters()).device
    first = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    route = F.one_hot(first, len(composed.experts)).float()  # (1, T, E)
    return forward_flops_per_token(composed, seq_len, route=route)


def train_independent(composed: ComposedLM, expert: int, tokens: np.ndarray, blocks_cfg: TrainConfig,
                      gates_cfg: TrainConfig, mix_cfg: TrainConfig | None = None,
                      on_metrics: Callable[[int, dict], None] | None = None) -> list[TrainResult]:
    """Train expert `expert`'s blocks, then its gates, then (a composition with output "mix"
    and mix_cfg given) its output gate, on that expert's own data: each phase's result."""
    emit = on_metrics or (lambda step, metrics: None)
    phases = [("blocks", composed.blocks[expert], blocks_cfg, "none"),
              ("gates", composed.gates[expert], gates_cfg, "none")]
    if len(composed.mixers) and mix_cfg is not None:
        phases.append(("mix", composed.mixers[expert], mix_cfg, "mix"))
    results: list[TrainResult] = []
    try:
        for name, module, cfg, output in phases:
            set_trainable(composed, [module])
            done = sum(r.steps for r in results)
            with composed.configured(routing="gate", active=[expert], output=output):
                results.append(train(composed, tokens, None, cfg, on_metrics=lambda s, m, name=name, done=done: emit(
                    done + s, {f"{name}_{k}": v for k, v in m.items()})))
    finally:
        all_trainable(composed)
    return results


def labelled_windows(token_sets: list[np.ndarray], n_tokens: int, seq: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """An equal share of n_tokens from each of `token_sets`, as windows (W, seq) at seeded random
    offsets, shuffled, and the set each window came from (W,)."""
    per_set = windows_per_set(n_tokens, len(token_sets), seq)
    rng = np.random.default_rng(seed)
    windows, labels = [], []
    for label, tokens in enumerate(token_sets):
        if len(tokens) < seq:
            raise ValueError(f"need at least {seq} tokens in every set to train the k-way gate, got {len(tokens)}")
        for start in rng.integers(0, len(tokens) - seq + 1, size=per_set):
            windows.append(np.asarray(tokens[start:start + seq], dtype=np.int64))
            labels.append(label)
    order = rng.permutation(len(windows))
    return torch.from_numpy(np.stack(windows)[order]), torch.tensor(labels)[order]


def train_kway(composed: ComposedLM, token_sets: list[np.ndarray], n_tokens: int, batch_size: int = 8,
               lr: float = 1e-2, seed: int = 0) -> dict:
    """Train the k-way gate alone: cross-entropy of its scores (the central model's own states at
    its point) at every row against the cluster (expert) whose training text the window came
    from. token_sets: each expert's training tokens, in the composition's order. {"loss",
    "tokens", "steps"}."""
    if len(token_sets) != len(composed.experts) or not len(composed.kway):
        raise ValueError("train_kway needs a composition with a k-way gate and one token set per expert")
    device = next(composed.kway.parameters()).device
    x, y = labelled_windows(token_sets, n_tokens, composed.config.block_size, seed)
    set_trainable(composed, [composed.kway])
    optimizer = torch.optim.AdamW(composed.kway.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    try:
        for start in range(0, len(x), batch_size):
            scores, _ = composed.kway_logits(x[start:start + batch_size].to(device))  # (B, R, E)
            labels = y[start:start + batch_size].to(device).repeat_interleave(scores.shape[1])  # every row's window
            loss = F.cross_entropy(scores.float().flatten(0, 1), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        all_trainable(composed)
    return {"loss": float(np.mean(losses[-10:])), "tokens": int(x.numel()), "steps": len(losses)}


def train_joint(composed: ComposedLM, tokens: np.ndarray, cfg: TrainConfig, balance_weight: float = 0.01,
                on_metrics: Callable[[int, dict], None] | None = None) -> TrainResult:
    """All blocks and gates together, top-k routing in the loop, load-balancing loss (no output
    mixing: a joint composition's output is the composed central model's)."""
    try:
        set_trainable(composed, [composed.blocks, composed.gates])
        with composed.configured(routing="topk", active=range(len(composed.experts)), output="none",
                                 balance_weight=balance_weight):
            return train(composed, tokens, None, cfg, on_metrics=on_metrics)
    finally:
        all_trainable(composed)


def phase_tokens(train_cfg: dict, seq: int) -> int:
    """Tokens a training phase runs: whole steps of its budget."""
    cfg = TrainConfig(**train_cfg)
    return cfg.steps(cfg.seq_len or seq) * cfg.tokens_per_step(cfg.seq_len or seq)


def added_expert_flops(composed: ComposedLM, e: int, blocks_train: dict, gates_train: dict, mix_train: dict) -> float:
    """Training FLOPs of expert e's phases in an independent composition (blocks, gates, output
    gate): what `add_expert` spends, known before the expert is trained (FLOPs depend on shapes)."""
    seq = composed.config.block_size
    glue = phase_tokens(blocks_train, seq) + phase_tokens(gates_train, seq)
    mix = phase_tokens(mix_train, seq) if composed.output == "mix" else 0
    return glue * train_flops_per_token(composed, [e], "gate") + (
        mix * mix_flops_per_token(composed, [e], "gate") if mix else 0.0)


def planned_added_expert_flops(central: nn.Module, expert: nn.Module, settings: CompositionSettings,
                               blocks_train: dict, gates_train: dict, mix_train: dict) -> float:
    """added_expert_flops of `expert` joining a composition over `central` with these settings,
    before it is trained or registered: FLOPs follow the models' shapes, not their weights."""
    composed = assemble(central, [expert], replace(settings, kway=False))
    return added_expert_flops(composed, 0, blocks_train, gates_train, mix_train)


def planned_kway_flops_per_token(central: nn.Module, experts: list[nn.Module], settings: CompositionSettings) -> float:
    """kway_flops_per_token of a composition of these (untrained) models: the k-way gate's cost."""
    return kway_flops_per_token(assemble(central, experts, settings))
