"""Sampling from any model with the `logits, loss = model(idx)` interface, incrementally
(`model.extend(tokens, cache)`) where the model has it.

The context of each step is the window idx[:, start:], start = window_start(len, block_size):
the whole sequence while it fits, then a window that jumps by a quarter block at a time
(3/4 to 1 block of context). A sliding window would move every position at every step and
leave nothing to cache; the jumping one is refilled once per quarter block, and decoding
with and without the cache sees the same windows, so both give the same tokens.
"""
from __future__ import annotations

from typing import Callable

import torch


def window_start(length: int, block_size: int) -> int:
    """First position of the context a model sees when the sequence has `length` tokens."""
    if length <= block_size:
        return 0
    hop = max(block_size // 4, 1)
    return -(-(length - block_size) // hop) * hop  # the least multiple of hop that fits the window


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             forward: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
             cached: bool | None = None) -> torch.Tensor:
    """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
    generator: the random stream sampling draws from (a seeded one makes the output
    repeatable whatever else uses torch's global stream); forward: called with each step's
    computation (a function returning the logits (B, n, vocab) of the tokens it fed) and
    returning what it returns (a caller may lock, time or record each step); cached: decode
    incrementally (model.extend; the default where the model has it) or run the whole window
    at every step."""
    block_size = model.config.block_size
    cached = hasattr(model, "extend") if cached is None else cached
    state = {"cache": None, "start": -1, "fed": 0}

    def step() -> torch.Tensor:
        start = window_start(idx.shape[1], block_size)
        if not cached:
            return model(idx[:, start:])[0]
        if start != state["start"]:  # a new window: refill the cache
            state.update(cache=model.new_cache(), start=start, fed=start)
        logits = model.extend(idx[:, state["fed"]:], state["cache"])
        state["fed"] = idx.shape[1]
        return logits

    for _ in range(max_new_tokens):
        logits = forward(step) if forward is not None else step()
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
