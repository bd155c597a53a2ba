"""Incremental decoding (`model.extend` with a cache) gives what a forward over the whole
sequence gives: the same logits at every step and, greedy, the same tokens, for every model
kind and every composition mode. Every weight is random (randomise_), so a row read from a
stale, missing or wrong cache entry changes the logits."""
from __future__ import annotations

import random

import pytest
import torch

import textgen
from randomise import randomise_

from composition.model import ComposedLM
from experts.generation import generate, window_start
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from experts.tokenizer import TOKENIZER
from routing.ensemble import prefix_router
from routing.router import ClusterRouter

BLOCK = 48


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=BLOCK, n_layer=3, n_head=2, n_embd=32))


def hourglass(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(block_size=BLOCK, group_len=8, latents=[4, 2], widths=[16, 24, 32], n_head=2, n_latent_layers=2)
    return HourglassLM(HourglassConfig(**{**base, **kw}))


MODELS = {
    "gpt": gpt,
    "hourglass": hourglass,
    "hourglass-transformer-attn-denseformer": lambda: hourglass(compressor="transformer", upsample="attn",
                                                                denseformer=True, interleave=True, n_local=2, n_global=2),
    "hourglass-three-levels": lambda: hourglass(latents=[4, 2, 1], widths=[16, 16, 24, 32]),
    "hourglass-one-level": lambda: hourglass(latents=[8], widths=[16, 32]),
}


def stepwise(model, idx: torch.Tensor, first: int) -> torch.Tensor:
    """Logits (B, T, V) from extend(): the first `first` tokens at once, then one at a time."""
    cache = model.new_cache()
    return torch.cat([model.extend(idx[:, :first], cache)]
                     + [model.extend(idx[:, t:t + 1], cache) for t in range(first, idx.shape[1])], dim=1)


def tokens(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_a_forward_over_the_whole_sequence(name):
    model = randomise_(MODELS[name](), seed=1).eval()
    idx = tokens(2, BLOCK, seed=2)
    full, _ = model(idx)
    for first in (1, 5, 8, 19):  # within the first group, a whole group, groups and a part
        torch.testing.assert_close(stepwise(model, idx, first), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_decoding_equals_uncached_token_for_token(name):
    model = randomise_(MODELS[name](), seed=3).eval()
    prompt = tokens(2, 6, seed=4)
    n = 2 * BLOCK  # past the block: the window jumps twice, and the cache is refilled each time
    uncached = generate(model, prompt, n, temperature=0, cached=False)
    cached = generate(model, prompt, n, temperature=0, cached=True)
    assert torch.equal(cached, uncached)


def test_the_window_jumps_a_quarter_block_and_always_fits():
    starts = [window_start(n, 64) for n in range(1, 300)]
    assert starts[:64] == [0] * 64  # the whole sequence while it fits
    for n, start in enumerate(starts, 1):
        assert 0 <= n - start <= 64 and start % 16 == 0
        assert n <= 64 or n - start > 48  # 3/4 to 1 block of context


class ParityRouter:
    """Routing "router" by a function of the window's tokens so far (no stream: the whole window
    each step), top 1: experts start running at different positions."""

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        choice = (idx.cumsum(dim=1) // 7) % 3  # (B, T)
        return torch.nn.functional.one_hot(choice, 3).float()


COMPOSITIONS = [  # every routing, glue, output and pool, with either kind of central model
    ("gpt", "topk", "attention", "none", "token"),
    ("gpt", "gate", "aligned", "mix", "prefix"),
    ("gpt", "adaptive", "both", "mix", "token"),
    ("gpt", "router", "both", "mix", "token"),
    ("gpt", "kway", "attention", "mix", "prefix"),
    ("hourglass", "topk", "both", "mix", "prefix"),
    ("hourglass", "gate", "attention", "none", "token"),
    ("hourglass", "adaptive", "aligned", "none", "prefix"),
    ("hourglass", "router", "attention", "none", "prefix"),
    ("hourglass", "router", "aligned", "mix", "token"),
    ("hourglass", "kway", "both", "none", "token"),
]


def composition(central: str, routing: str, glue: str, output: str, pool: str, router=None) -> ComposedLM:
    experts = [hourglass(1), hourglass(2, latents=[4, 2, 1], widths=[16, 16, 24, 32]), gpt(3)]
    model = ComposedLM(gpt(0) if central == "gpt" else hourglass(0), experts, n_points=2, routing=routing, k=2,
                       glue=glue, output=output, pool=pool, kway=routing == "kway",
                       prefix_router=router or ParityRouter())
    return randomise_(model, seed=5).eval()


@pytest.mark.parametrize("central, routing, glue, output, pool", COMPOSITIONS)
def test_cached_composition_equals_uncached(central, routing, glue, output, pool):
    model = composition(central, routing, glue, output, pool)
    idx = tokens(2, 40, seed=6)
    full, _ = model(idx)
    torch.testing.assert_close(stepwise(model, idx, 5), full, rtol=1e-4, atol=1e-4)
    prompt = idx[:, :5]
    assert torch.equal(generate(model, prompt, BLOCK + 12, temperature=0, cached=True),
                       generate(model, prompt, BLOCK + 12, temperature=0, cached=False))


def test_an_expert_first_routed_late_catches_up_on_the_tokens_before():
    model = composition("hourglass", "router", "both", "mix", "token")
    idx = tokens(1, 40, seed=8)
    cache = model.new_cache()
    model.extend(idx[:, :3], cache)
    early = set(cache.experts)
    logits = torch.cat([model.extend(idx[:, t:t + 1], cache) for t in range(3, 40)], dim=1)
    assert early < set(cache.experts)  # an expert joined after the first step
    torch.testing.assert_close(logits, model(idx)[0][:, 3:], rtol=1e-4, atol=1e-4)


def cbtm_router() -> ClusterRouter:
    rows = textgen.corpus(20, seed=0)
    return ClusterRouter.fit([r["text"] for r in rows], 3, svd_dim=8, min_df=1, seed=0)


def test_the_router_stream_gives_the_window_weights_byte_by_byte():
    routes = prefix_router(cbtm_router(), [2, 0, 1])
    text = textgen.document(random.Random(1), "cooking") + " café 1234 naïve " + textgen.document(random.Random(2), "finance")
    ids = TOKENIZER.encode(text)[:150]
    ids[60] = TOKENIZER.bos_id  # a special token: the next byte starts a new document
    idx = torch.tensor([ids, ids[::-1]])  # the reversed row cuts multi-byte characters apart
    stream = routes.stream(2)
    streamed = torch.cat([stream.extend(idx[:, :4])] + [stream.extend(idx[:, t:t + 1]) for t in range(4, 150)], 1)
    whole = routes(idx)
    assert torch.equal(streamed, whole)
    assert len({int(w.argmax()) for w in whole[0]}) > 1  # the routing changes along the text


def test_cached_router_composition_with_a_cbtm_router_equals_uncached():
    model = composition("hourglass", "router", "both", "mix", "token", router=prefix_router(cbtm_router(), [0, 1, 2]))
    prompt = torch.tensor([TOKENIZER.encode(textgen.document(random.Random(3), "cooking"))[:30]])
    assert torch.equal(generate(model, prompt, 40, temperature=0, cached=True),
                       generate(model, prompt, 40, temperature=0, cached=False))


@pytest.mark.parametrize("central", ["gpt", "hourglass"])
def test_cached_decoding_records_the_routing_a_forward_over_the_window_records(central):
    model = composition(central, "router", "both", "mix", "token")
    idx = tokens(1, 30, seed=9)
    cache = model.new_cache()
    with model.configured(record_routing=True):
        for t in range(1, 31):  # from the first byte: points the first rows do not reach yet
            model.extend(idx[:, t - 1:t], cache)
            cached = model.routed_experts()
            model(idx[:, :t])
            assert torch.equal(cached, model.routed_experts())
