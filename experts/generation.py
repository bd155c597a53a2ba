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


class Decoder:
    """A batch of sequences of one length (B, T) and what the model keeps of them: `logits()`
    gives the logits of the tokens fed since the last call (B, n, vocab), the last of which
    predicts the next token; `append(tokens)` adds one token to every row. cached: decode
    incrementally (model.extend; the default where the model has it) or run the whole window
    at every step."""

    def __init__(self, model, idx: torch.Tensor, cached: bool | None = None):
        self.model = model
        self.idx = idx
        self.cached = hasattr(model, "extend") if cached is None else cached
        self.cache = None
        self.start = -1  # the first position of the cache's window
        self.fed = 0  # tokens the cache holds

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        start = window_start(self.idx.shape[1], self.model.config.block_size)
        if not self.cached:
            return self.model(self.idx[:, start:])[0]
        if start != self.start:  # a new window: refill the cache
            self.cache, self.start, self.fed = self.model.new_cache(), start, start
        logits = self.model.extend(self.idx[:, self.fed:], self.cache)
        self.fed = self.idx.shape[1]
        return logits

    def append(self, tokens: torch.Tensor) -> None:
        """tokens: (B, 1)."""
        self.idx = torch.cat((self.idx, tokens), dim=1)


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1) tokens drawn from the last position's logits (B, vocab); temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             forward: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
             cached: bool | None = None) -> torch.Tensor:
    """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
    generator: the random stream sampling draws from (a seeded one makes the output
    repeatable whatever else uses torch's global stream); forward: called with each step's
    computation (a function returning the logits (B, n, vocab) of the tokens it fed) and
    returning what it returns (a caller may lock, time or record each step); cached: as
    `Decoder`'s."""
    decoder = Decoder(model, idx, cached)
    for _ in range(max_new_tokens):
        logits = forward(decoder.logits) if forward is not None else decoder.logits()
        decoder.append(next_token(logits[:, -1, :], temperature, top_k, generator))
    return decoder.idx
