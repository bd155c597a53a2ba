"""Sampling from any model with the `logits, loss = model(idx)` interface."""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
    generator: the random stream sampling draws from (a seeded one makes the output
    repeatable whatever else uses torch's global stream); forward: the logits (B, T, vocab) of
    a context (B, T), model(context)'s by default (a caller may lock, time or record each step)."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits = forward(context) if forward is not None else model(context)[0]
        logits = logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
    return idx
