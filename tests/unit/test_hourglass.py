"""The hourglass must be causal before anything is built from it.

Causality is checked with every weight randomised (tests/randomise.py): at initialisation the
upsamplers' output projections are zero, so logits do not depend on the compressed path at all
and a leak there could not show.
"""
import pytest
import torch

from randomise import randomise_

from experts.generation import window_start
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM, PerceiverCompressor

G = 8
BASE = dict(vocab_size=64, block_size=64, group_len=G, latents=[4, 2], widths=[16, 32, 32], n_head=2,
            n_local=1, n_global=1, n_latent_layers=2)
OPTIONS = {
    "perceiver-repeat": {},
    "transformer-attn": dict(compressor="transformer", upsample="attn"),
    "perceiver-attn-interleave-swiglu": dict(upsample="attn", interleave=True, n_local=2, mlp="swiglu"),
    "denseformer-latentloss": dict(denseformer=True, latent_loss=0.1),
    "three-levels": dict(latents=[4, 2, 1], widths=[16, 16, 32, 32]),
    "one-level-no-compression": dict(latents=[8], widths=[16, 32], compressor="transformer"),
    "global-only": dict(n_local=0, n_global=2),
}


def model_for(name: str, seed: int = 0, random_weights: bool = True, **change) -> HourglassLM:
    """The model of OPTIONS[name] (+ change); random_weights: every path carries signal."""
    torch.manual_seed(seed)
    model = HourglassLM(HourglassConfig(**{**BASE, **OPTIONS[name], **change}))
    return (randomise_(model, seed) if random_weights else model).eval()


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomise_(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)), seed).eval()


def perturbed(idx: torch.Tensor, j: int) -> torch.Tensor:
    out = idx.clone()
    out[:, j] = (out[:, j] + 1 + torch.arange(out.shape[0])) % 64
    return out


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("T", [64, 37])
def test_perturbing_token_j_leaves_every_earlier_logit_bit_identical(name, T):
    model = model_for(name)
    idx = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(T))
    base, _ = model(idx)
    for j in sorted({0, 1, G - 1, G, G + 1, 2 * G - 1, 2 * G, 13, T // 2, T - 2, T - 1}):
        logits, _ = model(perturbed(idx, j))
        assert torch.equal(logits[:, :j], base[:, :j]), f"logits before {j} changed"
        assert not torch.equal(logits[:, j], base[:, j]), f"logit {j} ignores its own token"


@pytest.mark.parametrize("name", ["perceiver-repeat", "transformer-attn", "three-levels"])
def test_perturbing_token_p_minus_1_changes_logit_p_for_every_p(name):
    model = model_for(name)
    idx = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    base, _ = model(idx)
    for p in range(1, 40):
        logits, _ = model(perturbed(idx, p - 1))
        assert not torch.allclose(logits[:, p], base[:, p]), f"logit {p} does not see token {p - 1}"


@pytest.mark.parametrize("name", OPTIONS)
def test_logits_of_a_prefix_equal_the_first_logits_of_the_full_sequence(name):
    model = model_for(name)
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)
    for p in (1, 5, G, 19, 40, 63):
        prefix, _ = model(idx[:, :p])
        torch.testing.assert_close(prefix, full[:, :p], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: model_for("perceiver-repeat"), lambda: model_for("transformer-attn"),
                                  small_gpt])
def test_greedy_generation_equals_teacher_forced_argmax(make):
    model = make()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=40, temperature=0)  # runs past block_size for the GPT
    assert out.shape == (2, 45)
    for t in range(5, 45):
        context = out[:, window_start(t, model.config.block_size):t]
        logits, _ = model(context)
        assert torch.equal(logits[:, -1].argmax(-1), out[:, t])


@pytest.mark.parametrize("rows, k", [(8, 4), (8, 1), (8, 8), (16, 3)])
def test_perceiver_latent_r_sees_exactly_group_positions_0_to_G_minus_K_plus_r(rows, k):
    torch.manual_seed(0)
    comp = PerceiverCompressor(8, 16, rows, k, HourglassConfig(**{**BASE, "group_len": rows, "latents": [k],
                                                                   "widths": [8, 16], "block_size": rows}))
    for r in range(k):
        x = torch.randn(1, 1, rows, 8, requires_grad=True)
        comp(x)[0, 0, r].sum().backward()
        seen = (x.grad[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
        assert seen == list(range(rows - k + r + 1))


def test_denseformer_is_the_identity_at_initialisation():
    plain = model_for("perceiver-repeat")  # random weights elsewhere: the identity must not depend on them
    torch.manual_seed(0)
    dense = HourglassLM(HourglassConfig(**{**BASE, "denseformer": True})).eval()
    missing = dense.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("latent.alphas") for k in missing)
    idx = torch.randint(0, 64, (2, 40))
    assert torch.equal(dense(idx)[0], plain(idx)[0])


@pytest.mark.parametrize("name", ["perceiver-repeat", "three-levels"])
def test_features_visible_is_the_last_input_each_row_depends_on(name):
    model = model_for(name)
    T = 45
    idx = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(4))
    base = model.features(idx)
    assert base[0]["h"].shape[1] == T and base[-1]["h"].shape[1] == T
    for feat in base:
        v = feat["visible"]
        assert v.shape[0] == feat["h"].shape[1] and (v < T).all() and (v[1:] > v[:-1]).all()
    for j in (0, 7, 8, 20, 44):
        for before, after in zip(base, model.features(perturbed(idx, j))):
            earlier = before["visible"] < j
            assert torch.equal(after["h"][:, earlier], before["h"][:, earlier]), before["name"]
            at = before["visible"] == j
            if at.any():  # a row aligned to j depends on token j
                assert not torch.equal(after["h"][:, at], before["h"][:, at]), before["name"]


def test_gpt_features_visible_are_the_positions():
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16))
    feats = model.features(torch.randint(0, 64, (1, 20)))
    assert [f["name"] for f in feats] == ["embed", "layer1", "layer2"]
    assert all(torch.equal(f["visible"], torch.arange(20)) for f in feats)


def test_gpt_is_causal():
    model = small_gpt()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    base, _ = model(idx)
    for j in (0, 9, 31):
        logits, _ = model(perturbed(idx, j))
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j], base[:, j])


@pytest.mark.parametrize("name", ["perceiver-repeat", "denseformer-latentloss"])
def test_a_tiny_model_overfits_one_batch(name):
    model = model_for(name, random_weights=False).train()  # trains from the real initialisation
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.3


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = model_for("perceiver-repeat")
    with pytest.raises(ValueError, match="sequence length 65 exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    gpt = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        gpt(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("change, keys", [
    (dict(widths=[16, 32]), "widths, latents"),
    (dict(latents=[4, 8]), "latents, group_len"),
    (dict(latents=[9, 2]), "latents, group_len"),
    (dict(block_size=60), "block_size, group_len"),
    (dict(widths=[16, 33, 32]), "widths, n_head"),
    (dict(compressor="lstm"), "compressor"),
    (dict(upsample="nearest"), "upsample"),
    (dict(denseformer=True, n_latent_layers=0), "denseformer, n_latent_layers"),
    (dict(latent_loss=-1.0), "latent_loss"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_fails_at_construction_naming_the_keys(change, keys):
    with pytest.raises(ValueError, match=f"invalid hourglass config \\({keys}\\)"):
        HourglassConfig(**{**BASE, **change})


def test_bad_gpt_config_names_the_keys():
    with pytest.raises(ValueError, match=r"\(n_embd, n_head\)"):
        GPTConfig(n_embd=30, n_head=4)


PRODUCT = list(__import__("itertools").product(["perceiver", "transformer"], ["repeat", "attn"], [False, True],
                                               [False, True]))


@pytest.mark.parametrize("compressor, upsample, interleave, denseformer", PRODUCT)
def test_every_option_combination_is_causal(compressor, upsample, interleave, denseformer):
    torch.manual_seed(0)
    cfg = HourglassConfig(**{**BASE, "compressor": compressor, "upsample": upsample, "interleave": interleave,
                             "n_local": 2, "denseformer": denseformer, "latent_loss": 0.1 if denseformer else 0.0})
    model = randomise_(HourglassLM(cfg), seed=5).eval()
    idx = torch.randint(0, 64, (1, 29), generator=torch.Generator().manual_seed(5))  # not a multiple of G
    base, _ = model(idx)
    for j in (0, G - 1, G, 2 * G + 3, 28):
        logits, _ = model(perturbed(idx, j))
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j], base[:, j])


@pytest.mark.parametrize("name", ["perceiver-repeat", "transformer-attn", "three-levels"])
def test_the_last_logit_sees_the_first_token_only_through_the_upsampled_latents(name):
    """With no global layer at full resolution (n_global=0) a byte sees other groups only through
    the compressed path: token 0 must reach the last logit, and must stop reaching it once the
    last upsampler's output projection is zero again (the compressed path cut)."""
    model = model_for(name, n_global=0)
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(6))
    first = perturbed(idx, 0)
    with torch.no_grad():
        assert not torch.allclose(model(first)[0][:, -1], model(idx)[0][:, -1])
        model.up[0].proj.weight.zero_()
        assert torch.equal(model(first)[0][:, -1], model(idx)[0][:, -1])
