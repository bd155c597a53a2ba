"""The composed model: equal to the central at init, causal, routed as asked."""
import math
import random

import numpy as np
import pytest
import torch

import textgen
from randomise import assert_causal, randomise_

from composition.model import ComposedLM, composition_points, paired_stage
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from routing.ensemble import byte_prefix_weights, document_weights, mixture_log_probs, restrict
from routing.router import ClusterRouter

V = 64


def central_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=48, n_layer=4, n_head=2, n_embd=32)).eval()


def expert_hourglass(seed, latents, widths):
    torch.manual_seed(seed)
    return HourglassLM(HourglassConfig(vocab_size=V, block_size=48, group_len=8, latents=latents, widths=widths,
                                       n_head=2, n_latent_layers=1)).eval()


def experts_of_differing_depth():
    return [expert_hourglass(1, [4, 2], [16, 24, 32]), expert_hourglass(2, [2], [16, 32]),
            expert_hourglass(3, [4, 2, 1], [16, 16, 24, 32])]


def trained_like(composed):
    """Give blocks and gates non-zero weights, as training would."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in composed.trainable_parameters():
            p.normal_(0, 0.3)
    return composed


def randomised(composed, seed=7):
    """Every weight random, the central's and the experts' included: a fresh expert's upsamplers
    project to zero and a fresh block's output projection, null key, gates and centres are zero,
    so without this a leak through them could not change any logit."""
    return randomise_(composed, seed).eval()


def softmax_route(T, n, seed):
    """(1, T, n) router weights, every expert > 0 at every position (so every expert runs)."""
    return torch.softmax(torch.randn(1, T, n, generator=torch.Generator().manual_seed(seed)), -1)


@pytest.mark.parametrize("glue", ["attention", "aligned", "both"])
@pytest.mark.parametrize("routing", ["topk", "gate", "adaptive"])
def test_composed_logits_equal_the_central_models_exactly_at_initialisation(routing, glue):
    central = central_gpt()
    composed = ComposedLM(central, experts_of_differing_depth(), n_points=2, routing=routing, k=2, glue=glue)
    idx = torch.randint(0, V, (2, 37))
    assert torch.equal(composed(idx)[0], central(idx)[0])


def test_gates_start_at_one_half():
    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=3, routing="gate")
    h = torch.randn(2, 5, 32)
    for point in composed.points:
        assert torch.equal(composed.route(point, h), torch.full((2, 5, 3), 0.5))


@pytest.mark.parametrize("glue", ["attention", "aligned", "both"])
@pytest.mark.parametrize("routing", ["topk", "gate", "adaptive", "router"])
@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_composed_model_is_causal_with_experts_of_other_compression(routing, central_kind, glue):
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = randomised(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing=routing,
                                     threshold=0.5, k=2, glue=glue))
    kwargs = {"route": softmax_route(45, 3, seed=2)} if routing == "router" else {}
    idx = torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(1))
    base, _ = composed(idx, **kwargs)
    assert not torch.equal(base, central(idx)[0])  # the experts do contribute
    assert_causal(composed, idx, base, kwargs)


def test_top_k_routing_uses_exactly_k_experts_per_token():
    composed = trained_like(ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="topk"))
    h = torch.randn(2, 11, 32)
    for k in (1, 2, 3):
        composed.k = k
        w = composed.route(composed.points[0], h)
        assert ((w > 0).sum(-1) == k).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 11))
    composed.k = 2
    composed(torch.randint(0, V, (1, 20)))
    assert composed.last_experts_per_token == 2.0


def test_adaptive_routing_takes_between_zero_and_k_max_experts_and_reports_the_average():
    composed = trained_like(ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2,
                                       routing="adaptive", threshold=0.6, k_max=2))
    h = torch.randn(4, 50, 32) * 3
    counts = (composed.route(composed.points[0], h) > 0).sum(-1)
    assert counts.min() >= 0 and counts.max() <= 2
    assert len(set(counts.flatten().tolist())) > 1  # the number of experts varies with the input
    composed(torch.randint(0, V, (2, 30)))
    assert 0 <= composed.last_experts_per_token <= 2


def test_only_blocks_and_gates_receive_gradients():
    composed = trained_like(ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="gate"))
    idx = torch.randint(0, V, (2, 24))
    _, loss = composed(idx[:, :-1], idx[:, 1:])
    loss.backward()
    frozen = list(composed.central.parameters()) + list(composed.experts.parameters())
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in composed.trainable_parameters())


def test_composition_points_spread_over_depth_and_pair_by_relative_depth():
    stages = ["embed", "layer1", "layer2", "layer3", "layer4"]
    assert composition_points(stages, 2) == ["layer2", "layer4"]
    assert composition_points(stages, 4) == stages[1:]
    expert = ["embed", "encoder1", "latent", "decoder1"]
    assert paired_stage("layer4", stages, expert) == "decoder1"
    assert paired_stage("layer2", stages, expert) == "latent"  # depth 0.5 -> index round(1.5) = 2
    with pytest.raises(ValueError, match="n_points must be between 1 and 4"):
        composition_points(stages, 5)


def test_cbtm_mixture_of_one_expert_is_that_expert_and_weights_mix_probabilities():
    a, b = torch.randn(1, 4, V), torch.randn(1, 4, V)
    only_a = mixture_log_probs([a, b], torch.tensor([1.0, 0.0]).expand(1, 4, 2))
    torch.testing.assert_close(only_a, torch.log_softmax(a, -1))
    half = mixture_log_probs([a, b], torch.full((1, 4, 2), 0.5))
    torch.testing.assert_close(half.exp(), 0.5 * a.softmax(-1) + 0.5 * b.softmax(-1))


def test_cbtm_byte_weights_of_position_t_depend_only_on_bytes_up_to_t():
    rows = textgen.corpus(20, seed=0)
    router = ClusterRouter.fit([r["text"] for r in rows], 4, svd_dim=8, min_df=1, seed=0)
    data = textgen.document(random.Random(1), "cooking").encode()
    weights = byte_prefix_weights(router, data, top_k=2)
    assert weights.shape == (len(data), 4)
    other = textgen.document(random.Random(2), "finance").encode()
    for t in (0, 10, 57, len(data) - 1):
        np.testing.assert_array_equal(byte_prefix_weights(router, data[:t + 1] + other, 2)[t], weights[t])


def _tokens():
    from experts.tokenizer import encode_texts

    return np.minimum(encode_texts([r["text"] for r in textgen.corpus(4, seed=0)]), V - 1)


def test_independent_training_changes_only_that_experts_blocks_and_gates():
    from composition.training import train_independent
    from experts.trainer import TrainConfig

    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="topk")
    before = {n: p.clone() for n, p in composed.named_parameters()}
    cfg = TrainConfig(max_tokens=4 * 48 * 5, batch_size=4, warmup_steps=1, eval_every=0, precision="fp32")
    train_independent(composed, 1, _tokens(), cfg, TrainConfig(**{**cfg.__dict__, "lr": 5e-3}))
    changed = {n for n, p in composed.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("blocks.1.", "gates.1.")) for n in changed), changed
    assert any(n.startswith("gates.1.") for n in changed) and any(n.startswith("blocks.1.") for n in changed)
    assert composed.routing == "topk" and composed.active == [0, 1, 2]  # restored afterwards


def test_joint_training_lowers_the_loss_and_balances_with_an_auxiliary_loss():
    from composition.training import train_joint
    from experts.trainer import TrainConfig

    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="topk", k=2)
    tokens = _tokens()
    x = torch.from_numpy(tokens[:49].astype(np.int64))[None]
    before = composed(x[:, :-1], x[:, 1:])[1].item()
    losses = []
    train_joint(composed, tokens, TrainConfig(max_tokens=4 * 48 * 40, batch_size=4, warmup_steps=2, lr=1e-2,
                                              eval_every=0, log_every=1, precision="fp32"),
                balance_weight=0.01, on_metrics=lambda s, m: losses.append(m["train_loss"]))
    assert composed.balance_weight == 0.0
    assert composed(x[:, :-1], x[:, 1:])[1].item() < before
    # with a balance weight the training loss carries the auxiliary term on top of the LM loss
    composed.train()
    plain = composed(x[:, :-1], x[:, 1:])[1].item()
    terms, original = [], composed.load_balance
    composed.load_balance = lambda *a: terms.append(original(*a)) or terms[-1]
    with composed.configured(balance_weight=0.5):
        balanced = composed(x[:, :-1], x[:, 1:])[1].item()
    assert len(terms) == len(composed.points)
    assert balanced == pytest.approx(plain + 0.5 * float(torch.stack(terms).mean().detach()), rel=1e-5)


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_skew():
    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=1, routing="topk", k=1)
    point, h = composed.points[0], torch.randn(2, 9, 32)
    uniform = composed.load_balance(point, h, composed.route(point, h))  # zero gates: equal probabilities
    assert uniform.item() == pytest.approx(1.0)
    with torch.no_grad():
        composed.gates[0][point].copy_(h.mean((0, 1)) * 50)  # expert 0 wins every token, with high probability
    skewed = composed.load_balance(point, h, composed.route(point, h))
    assert skewed.item() > 1.5


def counting_forwards(experts) -> list[int]:
    """Record the index of every expert whose forward (features) runs, in a list it returns."""
    calls = []
    for e, expert in enumerate(experts):
        original = expert.features
        expert.features = lambda idx, e=e, original=original: calls.append(e) or original(idx)
    return calls


def one_hot_route(experts_per_position: list[int], n: int) -> torch.Tensor:
    """(1, T, n) router weights: all weight on one expert per position."""
    route = torch.zeros(1, len(experts_per_position), n)
    route[0, torch.arange(len(experts_per_position)), torch.tensor(experts_per_position)] = 1.0
    return route


@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_router_routing_weights_each_row_by_its_positions_router_weight_times_the_gate(central_kind):
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = trained_like(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing="router",
                                       record_routing=True))
    route = one_hot_route([1] * 20 + [2] * 20, 3)
    composed(torch.randint(0, V, (1, 40)), route=route)
    assert composed.active == [0, 1, 2]  # restored after the call
    for point, w in composed.last_routing.items():  # (1, R, 3): expert 0 did not run
        assert (w[..., 0] == 0).all()
        visible = {f["name"]: f["visible"] for f in composed.central.features(torch.zeros(1, 40, dtype=torch.long))}
        rows_of_2 = visible[point] >= 20
        assert (w[0, ~rows_of_2, 2] == 0).all() and (w[0, rows_of_2, 1] == 0).all()
        assert ((w > 0) & (w < 1)).sum(-1).eq(1).all()  # one expert per row, scaled by its sigmoid gate


def test_router_routing_runs_only_the_experts_some_position_is_routed_to():
    experts = experts_of_differing_depth()
    calls = counting_forwards(experts)
    composed = trained_like(ComposedLM(central_gpt(), experts, n_points=2, routing="router"))
    calls.clear()
    composed(torch.randint(0, V, (1, 30)), route=one_hot_route([2] * 30, 3))
    assert calls == [2] and composed.last_experts_per_token == 1.0
    with pytest.raises(ValueError, match="routing='router' needs route="):
        composed(torch.randint(0, V, (1, 30)))


def test_router_routing_is_causal_in_tokens_and_in_the_routes_of_later_positions():
    composed = randomised(ComposedLM(expert_hourglass(9, [4, 2], [32, 32, 48]), experts_of_differing_depth(),
                                     n_points=2, routing="router"))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (1, 45), generator=g)
    route = torch.softmax(torch.randn(1, 45, 3, generator=g), -1)  # every expert runs in every call
    base, _ = composed(idx, route=route)
    for j in (0, 7, 8, 16, 30, 44):
        changed_idx, changed_route = idx.clone(), route.clone()
        changed_idx[0, j] = (changed_idx[0, j] + 5) % V
        changed_route[0, j:] = torch.softmax(torch.randn(45 - j, 3, generator=g), -1)
        logits, _ = composed(changed_idx, route=changed_route)
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j:], base[:, j:])


@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_router_routing_uses_at_input_t_the_route_of_the_context_up_to_t(central_kind):
    """route[:, t] weighs the experts for the context up to input t (the one that predicts
    byte t + 1): changing the route at p alone changes the logit at p and no earlier one."""
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = randomised(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing="router"))
    idx = torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(4))
    route = softmax_route(45, 3, seed=5)
    base, _ = composed(idx, route=route)
    for p in (0, 1, 7, 8, 21, 44):
        changed = route.clone()
        changed[0, p] = softmax_route(1, 3, seed=100 + p)[0, 0]  # another route at p only
        logits, _ = composed(idx, route=changed)
        assert torch.equal(logits[:, :p], base[:, :p]), f"a logit before {p} read the route of position {p}"
        assert not torch.allclose(logits[:, p], base[:, p]), f"logit {p} ignores the route of position {p}"


def test_document_weights_row_j_routes_the_text_before_byte_j():
    docs = textgen.corpus(8, ["cooking", "sailing"], seed=0)
    router = ClusterRouter.fit([d["text"] for d in docs], k=2, svd_dim=4, min_df=1, temperature=2.0)  # soft weights
    doc = docs[0]["text"].encode()[:90]
    w = document_weights(router, doc, [1, 0], top_k=2)
    assert w.shape == (len(doc), 2)
    for j in range(len(doc)):  # explicitly: the router's weights for doc[:j], over clusters [1, 0]
        expected = restrict(router.route_prefix(doc[:j].decode(), top_k=router.k)[None], [1, 0], 2)[0]
        np.testing.assert_allclose(w[j], expected, atol=1e-5, err_msg=f"row {j}")
    # byte j never changes rows 0 .. j (they route the text before it), and it does reach later rows
    other = docs[1]["text"].encode()
    for j in (0, 9, 40, 89):
        changed = document_weights(router, doc[:j] + other[:90 - j], [1, 0], top_k=2)
        np.testing.assert_array_equal(changed[:j + 1], w[:j + 1])
        if j < 89:
            assert not np.allclose(changed[j + 1:], w[j + 1:])


def test_window_weights_route_each_position_from_its_documents_bytes_so_far():
    from routing.ensemble import document_weights, window_weights

    docs = textgen.corpus(8, ["cooking", "sailing"], seed=0)
    router = ClusterRouter.fit([d["text"] for d in docs], k=2, svd_dim=4, min_df=1)
    a, b = docs[0]["text"].encode()[:60], docs[1]["text"].encode()[:50]
    ids = np.array(list(a) + [257] + list(b))
    w = window_weights(router, ids, [0, 1], top_k=2)
    assert w.shape == (111, 2)
    # position j routes the bytes up to and including j: document_weights' row j + 1
    np.testing.assert_allclose(w[:59], document_weights(router, a, [0, 1], 2)[1:60], atol=1e-6)
    np.testing.assert_allclose(w[61:110], document_weights(router, b, [0, 1], 2)[1:50], atol=1e-6)
    empty = document_weights(router, b, [0, 1], 2)[0]
    np.testing.assert_allclose(w[60], empty, atol=1e-6)  # the separator: no text of the new document yet


def test_an_input_shorter_than_an_experts_group_attends_to_the_null_key_only():
    experts = experts_of_differing_depth()  # group_len 8: a 3-token input gives their latents no rows
    composed = trained_like(ComposedLM(expert_hourglass(9, [4, 2], [32, 32, 48]), experts, n_points=2, k=2))
    logits, _ = composed(torch.randint(0, V, (1, 3)))
    assert logits.shape == (1, 3, V) and torch.isfinite(logits).all()


def test_the_routing_centre_weighs_every_cluster_equally_whatever_its_size_or_order():
    """fit_centers: the mean over clusters of each cluster's mean central state, not the mean
    of the first tokens of one concatenated stream (which was one domain)."""
    from composition.training import fit_centers

    composed = ComposedLM(randomise_(central_gpt(), 1), experts_of_differing_depth()[:2], n_points=2)
    seq = composed.config.block_size
    small = np.full(3 * seq, 5, dtype=np.uint16)  # every window of a constant text has one mean state
    large = np.full(100 * seq, 9, dtype=np.uint16)

    def centre_of(*sets):
        fit_centers(composed, list(sets), n_tokens=8 * seq, seed=0)
        return {p: c.clone() for p, c in composed.centers.items()}

    only_small, only_large = centre_of(small), centre_of(large)
    both = centre_of(large, small)
    assert not torch.allclose(only_small[composed.points[0]], only_large[composed.points[0]])
    for p in composed.points:
        torch.testing.assert_close(both[p], (only_small[p] + only_large[p]) / 2)
        torch.testing.assert_close(centre_of(small, large)[p], both[p])


@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
@pytest.mark.parametrize("routing", ["topk", "gate"])
def test_the_expert_chosen_for_a_position_depends_only_on_inputs_up_to_it(central_kind, routing):
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = randomised(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing=routing, k=1,
                                     record_routing=True))
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    composed(idx)
    before = composed.routed_experts()  # (B, T)
    assert before.shape == (2, 40) and len(set(before.flatten().tolist())) > 1  # every path carries signal
    for t in (5, 17, 31):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, V, (2, 40 - t - 1), generator=torch.Generator().manual_seed(t))
        composed(changed)
        assert torch.equal(composed.routed_experts()[:, :t + 1], before[:, :t + 1]), t


def test_the_expert_chosen_for_a_position_is_the_one_its_rows_weigh_most():
    composed = randomised(ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="gate",
                                     record_routing=True))
    composed(torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(2)))
    total = sum(w for w in composed.last_routing.values())  # a GPT's rows are its positions: (1, 30, 3)
    assert torch.equal(composed.routed_experts(), total.argmax(-1))


# --- the aligned glue: the expert's state at the aligned position --------------------------------


def test_the_aligned_block_reads_at_each_central_row_the_newest_expert_row_it_may_see_and_no_other():
    from composition.blocks import AlignedBlock

    block = randomise_(AlignedBlock(32, 24), seed=3)
    T = 40
    visible_c = torch.arange(T)  # a GPT central: row t sees inputs <= t
    visible_e = torch.arange(7, T, 8)  # an expert level of groups of 8: row r sees inputs <= 8r + 7
    h, z = torch.randn(2, T, 32), torch.randn(2, len(visible_e), 24)
    base = block(h, visible_c, z, visible_e)
    assert torch.equal(base[:, :7], torch.zeros_like(base[:, :7]))  # no expert row visible yet: nothing read
    for r in range(len(visible_e)):
        changed = z.clone()
        changed[:, r] += 1.0
        out = block(h, visible_c, changed, visible_e)
        reads = [t for t in range(T) if not torch.equal(out[:, t], base[:, t])]
        # exactly the central rows whose newest visible expert row is r
        assert reads == [t for t in range(T) if visible_e[r] <= t < (visible_e[r + 1] if r + 1 < len(visible_e) else T)]


def test_with_aligned_glue_the_central_output_at_t_follows_the_experts_decoder_state_at_t():
    """Change the expert's full-resolution state at one position t: the composed logits change
    at t (where the glue reads it) and nowhere before t."""
    central = central_gpt()
    expert = expert_hourglass(1, [4, 2], [16, 24, 32])
    composed = randomised(ComposedLM(central, [expert], n_points=1, routing="gate", glue="aligned"))
    assert composed.pairs[0][composed.points[0]] == "decoder1"  # the last central layer reads the expert's last stage
    idx = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(4))
    features = expert.features
    base, _ = composed(idx)
    for t in (5, 17, 39):
        def perturbed(x, t=t):
            out = features(x)
            dec = next(f for f in out if f["name"] == "decoder1")
            row = int((dec["visible"] == t).nonzero())  # the expert's row of position t
            dec["h"] = dec["h"].clone()
            dec["h"][:, row] += 1.0
            return out

        expert.features = perturbed
        try:
            logits, _ = composed(idx)
        finally:
            expert.features = features
        assert torch.equal(logits[:, :t], base[:, :t])
        assert not torch.allclose(logits[:, t], base[:, t])


def test_one_aligned_glue_step_costs_forward_plus_the_blocks_twice_plus_the_central_above_the_first_point():
    """Pinned: forward through central, expert and blocks; backward 2x the blocks (2 d_e d_c
    FLOPs a central row each) and 1x the central above the first composition point (input
    gradients only), nothing below it and nothing through the frozen expert."""
    from composition.training import train_flops_per_token
    from experts.flops import features_flops_per_token, flops_up_to_stages, forward_flops_per_token

    central, expert = central_gpt(), expert_hourglass(1, [4, 2], [16, 24, 32])
    composed = ComposedLM(central, [expert], n_points=2, routing="gate", glue="aligned")
    assert composed.points == ["layer2", "layer4"] and composed.pairs[0] == {"layer2": "encoder2", "layer4": "decoder1"}
    d_c, d_encoder2, d_decoder1 = 32, 32, 16  # one central row a token (GPT) at each point
    glue = 2 * d_encoder2 * d_c + 2 * d_decoder1 * d_c
    layer = 2 * 32 * 3 * 32 + 2 * 32 * 32 + 4 * 32 * (48 + 1) / 2 + 2 * (2 * 32 * 4 * 32)  # qkv, proj, attention, MLP
    central_fwd, expert_fwd = forward_flops_per_token(central), features_flops_per_token(expert)
    assert expert_fwd == pytest.approx(forward_flops_per_token(expert) - 2 * 16 * V)  # all but its head
    assert flops_up_to_stages(central)["layer2"] == pytest.approx(2 * layer)  # two of the four layers
    above = central_fwd - 2 * layer  # layers 3 and 4 and the head
    assert train_flops_per_token(composed, [0], "gate") == pytest.approx(
        (central_fwd + expert_fwd + glue) + 2 * glue + above, rel=1e-12)


# --- the composition point in output space (output "mix") -----------------------------------------


def set_output_gates(composed, g: float):
    """Every output gate at the constant g (weights zero, bias logit(g))."""
    with torch.no_grad():
        for mixer in composed.mixers:
            mixer.proj.weight.zero_()
            mixer.proj.bias.fill_(math.log(g / (1 - g)))
    return composed


@pytest.mark.parametrize("route_kind", ["one_hot", "soft"])
@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_output_mix_is_the_composed_and_the_routed_experts_distributions_weighted_by_the_gate(central_kind,
                                                                                             route_kind):
    """p_t = (1 - g) p_composed,t + g sum_e w_e,t p_e,t with the router's weights w at t (one expert,
    or a soft mixture of all three); T = 45 leaves the hourglass central padding to whole groups."""
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    experts = experts_of_differing_depth()
    composed = set_output_gates(randomised(ComposedLM(central, experts, n_points=2, routing="router",
                                                      output="mix")), 0.3)
    T = 45
    route = one_hot_route([0] * 10 + [2] * 15 + [1] * 20, 3) if route_kind == "one_hot" else softmax_route(T, 3, 5)
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))
    mixed, _ = composed(idx, route=route)
    with composed.configured(output="none"):
        p_composed = torch.softmax(composed(idx, route=route)[0].float(), -1)  # (1, T, V)
    p_experts = torch.stack([torch.softmax(e(idx)[0].float(), -1) for e in experts], dim=-2)  # (1, T, 3, V)
    expected = 0.7 * p_composed + 0.3 * (route.unsqueeze(-1) * p_experts).sum(-2)
    torch.testing.assert_close(mixed.exp(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1, T))


@pytest.mark.parametrize("routing", ["topk", "gate", "adaptive", "router"])
@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_output_mix_is_causal(routing, central_kind):
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = randomised(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing=routing,
                                     threshold=0.5, k=2, glue="both", output="mix"))
    kwargs = {"route": softmax_route(45, 3, seed=2)} if routing == "router" else {}
    idx = torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(1))
    base, _ = composed(idx, **kwargs)
    with composed.configured(output="none"):
        assert not torch.allclose(base, composed(idx, **kwargs)[0])  # the output point does contribute
    assert_causal(composed, idx, base, kwargs)


def test_the_output_point_reads_the_experts_final_state_at_t_and_nothing_after():
    """Blocks that add nothing (output projections zero): a change of the expert's final state
    at position t changes the mixed output at t and nowhere before it; without the output point
    it changes nothing."""
    expert = expert_hourglass(1, [4, 2], [16, 24, 32])
    composed = randomised(ComposedLM(central_gpt(), [expert], n_points=1, routing="gate", glue="attention",
                                     output="mix"))
    with torch.no_grad():
        composed.blocks[0][composed.points[0]].attn.proj.weight.zero_()
    idx = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(4))
    features = expert.features
    base = {out: None for out in ("mix", "none")}
    for output in base:
        with composed.configured(output=output):
            base[output] = composed(idx)[0]
    for t in (5, 17, 39):
        def perturbed(x, t=t):
            out = features(x)
            last = out[-1]  # decoder1: the state the expert's output head reads
            last["h"] = last["h"].clone()
            last["h"][:, int((last["visible"] == t).nonzero())] += 1.0
            return out

        expert.features = perturbed
        try:
            logits = {}
            for output in base:
                with composed.configured(output=output):
                    logits[output] = composed(idx)[0]
        finally:
            expert.features = features
        assert torch.equal(logits["none"], base["none"])
        assert torch.equal(logits["mix"][:, :t], base["mix"][:, :t])
        assert not torch.allclose(logits["mix"][:, t], base["mix"][:, t])


def test_independent_training_with_an_output_point_trains_that_experts_output_gate_too():
    from composition.training import train_independent
    from experts.trainer import TrainConfig

    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="topk", output="mix")
    before = {n: p.clone() for n, p in composed.named_parameters()}
    cfg = TrainConfig(max_tokens=4 * 48 * 5, batch_size=4, warmup_steps=1, eval_every=0, precision="fp32")
    results = train_independent(composed, 1, _tokens(), cfg, cfg, TrainConfig(**{**cfg.__dict__, "lr": 5e-2}))
    changed = {n for n, p in composed.named_parameters() if not torch.equal(p, before[n])}
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in changed} == {"blocks.1", "gates.1", "mixers.1"}
    assert len(results) == 3 and composed.output == "mix" and composed.routing == "topk"  # restored


def test_one_output_gate_step_costs_the_mixed_forward_plus_the_gate_twice():
    """Pinned: forward through central, expert features, blocks, the expert's output head
    (2 d_e V) and the gate (2 (d_c + d_e)); backward only 2x the gate: nothing before it trains."""
    from composition.training import mix_flops_per_token
    from experts.flops import features_flops_per_token, forward_flops_per_token

    central, expert = central_gpt(), expert_hourglass(1, [4, 2], [16, 24, 32])
    composed = ComposedLM(central, [expert], n_points=2, routing="gate", glue="aligned", output="mix")
    d_c, d_encoder2, d_decoder1 = 32, 32, 16
    glue = 2 * d_encoder2 * d_c + 2 * d_decoder1 * d_c
    head, gate = 2 * d_decoder1 * V, 2 * (d_c + d_decoder1)
    forward = forward_flops_per_token(central) + features_flops_per_token(expert) + glue + head + gate
    assert mix_flops_per_token(composed, [0], "gate") == pytest.approx(forward + 2 * gate, rel=1e-12)


def test_a_composition_state_without_its_output_gates_does_not_load():
    from composition.loader import CompositionError, CompositionSettings, assemble, new_parameters

    settings = CompositionSettings(n_points=2, routing="topk", k=2, threshold=0.5, glue="both", output="mix")
    state = new_parameters(assemble(central_gpt(), experts_of_differing_depth(), settings))
    assert any(k.startswith("mixers.") for k in state)
    assemble(central_gpt(), experts_of_differing_depth(), settings, state)  # the whole state loads
    with pytest.raises(CompositionError, match="missing"):
        assemble(central_gpt(), experts_of_differing_depth(), settings,
                 {k: v for k, v in state.items() if not k.startswith("mixers.")})


# --- the k-way gate (routing "kway") ----------------------------------------------------------------


def disjoint_token_sets(n_sets=3, length=4000, seed=0):
    """Token streams whose vocabularies do not overlap: a set is told from the others by its bytes."""
    rng = np.random.default_rng(seed)
    width = V // n_sets
    return [rng.integers(i * width, (i + 1) * width, length) for i in range(n_sets)]


@pytest.mark.parametrize("central_kind", ["gpt", "hourglass"])
def test_kway_routing_is_causal(central_kind):
    central = central_gpt() if central_kind == "gpt" else expert_hourglass(9, [4, 2], [32, 32, 48])
    composed = randomised(ComposedLM(central, experts_of_differing_depth(), n_points=2, routing="kway", k=2,
                                     kway=True, output="mix"))
    idx = torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(1))
    base, _ = composed(idx)
    assert_causal(composed, idx, base, {})


def test_kway_routing_keeps_the_top_k_renormalised_each_scaled_by_its_gate():
    composed = randomised(ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="kway", k=2,
                                     kway=True))
    h = torch.randn(2, 11, 32)
    point = composed.points[-1]  # the k-way gate's point (a direct call reads h's own rows)
    probs = torch.softmax(composed.kway_scores(point, h), -1)
    gate = torch.sigmoid(composed.routing_state(point, h) @ composed.gate_vectors(point).t())
    w = composed.route(point, h)
    assert ((w > 0).sum(-1) == 2).all()
    top = probs.topk(2, dim=-1)
    expected = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True)) * gate
    torch.testing.assert_close(w, expected)


def test_the_kway_gate_learns_to_tell_every_cluster_from_the_others_and_trains_nothing_else():
    from composition.training import train_kway

    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="kway", k=1, kway=True)
    before = {n: p.clone() for n, p in composed.named_parameters()}
    train_sets, held_out = disjoint_token_sets(seed=0), disjoint_token_sets(seed=1)

    def accuracy():  # the expert each held-out window's last position is routed to, at every point
        hits = 0
        for label, tokens in enumerate(held_out):
            x = torch.from_numpy(np.stack([tokens[i:i + 48] for i in range(0, 480, 48)]).astype(np.int64))
            hits += int((composed.kway_logits(x)[0][:, -1].argmax(-1) == label).sum())  # (10,) windows
        return hits / (len(held_out) * 10)

    assert accuracy() < 0.5  # zero-initialised: every score equal, argmax picks expert 0
    result = train_kway(composed, train_sets, 3 * 48 * 40, batch_size=8, lr=5e-2)
    assert accuracy() > 0.95 and result["tokens"] == 3 * 48 * 40
    changed = {n for n, p in composed.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("kway.") for n in changed), changed


def test_one_kway_gate_step_costs_the_central_up_to_its_point_plus_three_times_its_map():
    """Pinned: the central model's forward up to the gate's point (the last composition point,
    layer 4 of 4, before the output head; no expert runs) and the gate's map of d_c to one score
    per expert (2 d_c E a row, one central row a token), 3x for forward and backward."""
    from composition.training import kway_flops_per_token

    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="kway", kway=True).eval()
    assert list(composed.kway) == ["layer4"]
    layer = 2 * 32 * 3 * 32 + 2 * 32 * 32 + 4 * 32 * (48 + 1) / 2 + 2 * (2 * 32 * 4 * 32)  # qkv, proj, attention, MLP
    gate = 2 * 32 * 3  # d_c = 32, 3 experts
    assert kway_flops_per_token(composed) == pytest.approx(4 * layer + 3 * gate, rel=1e-12)
    assert not composed.training  # counting left the model in eval mode, as it was


def test_configured_switches_are_restored_and_unknown_switches_are_refused():
    composed = ComposedLM(central_gpt(), experts_of_differing_depth(), n_points=2, routing="topk", k=2)
    with composed.configured(routing="gate", active=[1], output="none", record_routing=True):
        assert (composed.routing, composed.active, composed.record_routing) == ("gate", [1], True)
    assert (composed.routing, composed.active, composed.record_routing) == ("topk", [0, 1, 2], False)
    with pytest.raises(ValueError, match="no switch"):
        with composed.configured(prefix_router=None):
            pass
    with pytest.raises(ValueError, match="routing must be one of"):
        with composed.configured(routing="bogus"):
            pass
