"""Scoring held-out documents: every byte once, with context; mixtures; routing statistics."""
import math

import numpy as np
import pytest
import torch

from randomise import randomise_

from composition.evaluation import bits_per_byte, mixture, score_documents, windows
from composition.model import ComposedLM
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from pipeline.results.metrics import Scored, headline
from pipeline.results.report import markdown_table
from pipeline.stages.evaluate import domain_experts
from routing.ensemble import keep_top_k

EOS = 257


def gpt(seed=0, block=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=259, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).astype(np.uint8) for n in lengths]


@pytest.mark.parametrize("seq,stride", [(32, 16), (32, 32), (32, 24), (16, 5)])
def test_windows_score_every_byte_exactly_once_with_at_least_block_minus_stride_context(seq, stride):
    lengths = [1, 15, 16, 31, 32, 33, 100, 257]
    seen = [np.zeros(n, dtype=int) for n in lengths]
    for w in windows(lengths, seq, stride):
        targets = np.arange(w.first_scored, seq) + w.start  # byte indices this window scores
        targets = targets[targets < lengths[w.doc]]
        seen[w.doc][targets] += 1
        if w.start > 0:  # every byte after the first window sees >= seq - stride bytes before it
            assert w.first_scored == seq - stride
    assert all((s == 1).all() for s in seen)


def test_windows_refuse_a_stride_outside_one_to_the_block_size():
    with pytest.raises(ValueError, match="stride must be between 1 and the block size 32"):
        windows([10], 32, 33)


def test_a_document_within_one_window_scores_the_models_own_next_byte_log_probabilities():
    model = gpt()
    (doc,) = docs([20])
    scores = score_documents(model, [doc], EOS, seq_len=32, precision="fp32")
    x = torch.tensor(np.concatenate([[EOS], doc[:-1]]), dtype=torch.long)[None]
    with torch.no_grad():
        logits, _ = model(x)
    expected = torch.log_softmax(logits[0].float(), -1)[torch.arange(20), torch.tensor(doc, dtype=torch.long)]
    np.testing.assert_allclose(scores.log_probs[0], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert scores.tokens == 20


def test_long_documents_are_scored_with_overlapping_context_not_from_scratch():
    model = gpt(block=16)
    (doc,) = docs([60])
    overlapped = score_documents(model, [doc], EOS, seq_len=16, stride=8, precision="fp32").log_probs[0]
    cold = score_documents(model, [doc], EOS, seq_len=16, stride=16, precision="fp32").log_probs[0]
    np.testing.assert_allclose(overlapped[:16], cold[:16], atol=1e-5)  # the first window is the same
    assert not np.allclose(overlapped[16:], cold[16:])  # later bytes got (different) context
    # the byte at 16 scored with 8 bytes of context: same as a window starting at byte 8
    x = torch.tensor(np.concatenate([[EOS], doc])[8:24], dtype=torch.long)[None]
    with torch.no_grad():
        logits, _ = model(x)
    assert overlapped[16] == pytest.approx(float(torch.log_softmax(logits[0, 8].float(), -1)[doc[16]]), abs=1e-5)


def test_batched_scoring_matches_one_document_at_a_time():
    model = gpt()
    many = docs([5, 40, 70, 33], seed=1)
    together = score_documents(model, many, EOS, seq_len=32, batch_size=3, precision="fp32").log_probs
    for d, doc in enumerate(many):
        alone = score_documents(model, [doc], EOS, seq_len=32, batch_size=1, precision="fp32").log_probs[0]
        np.testing.assert_allclose(together[d], alone, atol=1e-5)


def test_a_composed_model_reports_its_top1_experts_and_experts_per_row():
    torch.manual_seed(0)
    experts = [HourglassLM(HourglassConfig(vocab_size=259, block_size=32, group_len=8, latents=[4], widths=[16, 24],
                                           n_head=2, n_latent_layers=1)).eval() for _ in range(3)]
    composed = ComposedLM(gpt(), experts, n_points=2, routing="topk", k=2, record_routing=True)
    many = docs([40, 10])
    scores = score_documents(composed, many, EOS, seq_len=32, n_experts=3, precision="fp32")
    assert scores.experts_per_row == pytest.approx(2.0)
    assert scores.top1_counts.shape == (2, 3)
    # a GPT central routes one row per position: each scored byte counts once per point (2 points),
    # neither the overlap a later window re-reads nor the padding after a document's end
    assert scores.top1_counts.sum(axis=1).tolist() == [40 * 2, 10 * 2]


class RouteEcho(torch.nn.Module):
    """A model whose logits at input t are 8 x route[:, t] on the first E byte values: what it
    predicts for a byte is a known function of the route row it was given for that byte."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # score_documents reads the device from it

    def forward(self, idx, route=None):
        logits = torch.zeros(*idx.shape, 259)
        logits[..., :route.shape[-1]] = 8 * route
        return logits, None


@pytest.mark.parametrize("seq,stride", [(16, 8), (16, 16), (16, 5)])
def test_route_weights_row_j_is_the_route_of_the_input_that_predicts_byte_j(seq, stride):
    rng = np.random.default_rng(0)
    many = [rng.integers(0, 4, n).astype(np.uint8) for n in (1, 15, 16, 17, 50)]
    routes = [rng.dirichlet(np.ones(3), len(d)).astype(np.float32) for d in many]
    scores = score_documents(RouteEcho(), many, EOS, seq_len=seq, stride=stride, batch_size=3,
                             precision="fp32", route_weights=routes)
    for doc, route, lp in zip(many, routes, scores.log_probs):
        logits = torch.zeros(len(doc), 259)
        logits[:, :3] = 8 * torch.from_numpy(route)
        expected = torch.log_softmax(logits, -1)[torch.arange(len(doc)), torch.from_numpy(doc).long()]
        np.testing.assert_allclose(lp, expected.numpy(), atol=1e-4)


def test_a_routed_composed_models_byte_j_depends_on_route_row_j_and_no_earlier_byte_does():
    torch.manual_seed(0)
    experts = [HourglassLM(HourglassConfig(vocab_size=259, block_size=16, group_len=8, latents=[4], widths=[16, 24],
                                           n_head=2, n_latent_layers=1)) for _ in range(2)]
    composed = randomise_(ComposedLM(gpt(block=16), experts, n_points=2, routing="router"), seed=1).eval()
    rng = np.random.default_rng(1)
    many = docs([40, 13], seed=2)
    routes = [rng.dirichlet(np.ones(2), len(d)).astype(np.float32) for d in many]
    score = lambda r: score_documents(composed, many, EOS, seq_len=16, stride=8, precision="fp32",  # noqa: E731
                                      route_weights=r).log_probs
    base = score(routes)
    for d, j in ((0, 0), (0, 7), (0, 20), (0, 39), (1, 5)):
        changed = [r.copy() for r in routes]
        changed[d][j] = changed[d][j][::-1]  # another route for byte j only
        lp = score(changed)
        np.testing.assert_array_equal(lp[d][:j], base[d][:j])
        assert lp[d][j] != base[d][j], f"byte {j} ignores route row {j}"
        np.testing.assert_array_equal(lp[1 - d], base[1 - d])  # the other document is untouched


def test_bits_per_byte_is_nats_over_ln2_over_bytes():
    lp = [np.full(10, -math.log(2)), np.full(30, -2 * math.log(2))]
    assert bits_per_byte(lp) == pytest.approx((10 * 1 + 30 * 2) / 40)


def test_mixture_is_the_log_of_the_weighted_sum_of_probabilities():
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.01, 1, (3, 50)))
    w = rng.dirichlet(np.ones(3), 50)
    np.testing.assert_allclose(mixture(logp, w), np.log((np.exp(logp) * w.T).sum(axis=0)), rtol=1e-10)
    one = np.zeros_like(w)
    one[:, 1] = 1.0  # all weight on expert 1: exactly its log-probabilities, other experts ignored
    np.testing.assert_allclose(mixture(logp, one), logp[1])


def test_keep_top_k_keeps_the_k_largest_weights_renormalised():
    w = np.array([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3]])
    np.testing.assert_allclose(keep_top_k(w, 1), [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(keep_top_k(w, 2), [[0, 5 / 9, 4 / 9], [2 / 3, 0, 1 / 3]])
    np.testing.assert_allclose(keep_top_k(w, 3), w)


def test_a_domains_expert_is_the_cluster_holding_most_of_its_training_documents():
    table = {"source": ["a", "a", "a", "b", "b", "c", "a"], "cluster": [2, 2, 0, 0, 0, 1, 1],
             "split": ["train", "train", "train", "train", "train", "train", "test"]}
    # experts exist for clusters 0 and 2 only (cluster 1 was skipped): a -> cluster 2 = expert 1
    assert domain_experts(table, [0, 2]) == {"a": 1, "b": 0}


def test_the_parent_run_gets_overall_bpb_routing_and_experts_per_token_only():
    metrics = {"bpb/dense/all": 3.0, "bpb/dense/code": 2.0, "routing_accuracy/cbtm_top1": 0.9,
               "experts_per_token/composed_joint": 2.0, "load/cbtm_top1/expert0": 0.5}
    assert headline(metrics) == {"bpb/dense/all": 3.0, "routing_accuracy/cbtm_top1": 0.9,
                                 "experts_per_token/composed_joint": 2.0}


def test_the_results_table_has_one_row_per_system_and_a_dash_for_missing_values():
    table = markdown_table([{"system": "dense", "all": 3.14159, "routing_accuracy": None, "params": 1234}],
                           ["system", "all", "routing_accuracy", "params"])
    lines = table.splitlines()
    assert lines[0] == "| system | all | routing accuracy | params |"
    assert lines[2] == "| dense | 3.142 | – | 1,234 |"


def test_compressor_bits_per_byte_is_eight_times_the_compressed_size_over_the_bytes():
    import gzip
    import lzma

    from pipeline.results.compressors import compressor_bpb

    texts = [b"the cat sat on the mat. " * 20, b"a dog barked at the moon, twice. " * 9, bytes(range(200))]
    domains = ["pets", "pets", "noise"]
    floors = compressor_bpb(domains, texts)
    pets = len(texts[0]) + len(texts[1])
    alone = 8 * (len(gzip.compress(texts[0], 9, mtime=0)) + len(gzip.compress(texts[1], 9, mtime=0)))
    assert floors["gzip"]["pets"] == pytest.approx(alone / pets)
    xz_noise = 8 * len(lzma.compress(texts[2], format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
    assert floors["xz"]["noise"] == pytest.approx(xz_noise / 200)
    # 'all' weighs each domain by its bytes: the total compressed bits over the total bytes
    assert floors["gzip"]["all"] == pytest.approx((alone + floors["gzip"]["noise"] * 200) / (pets + 200))


def test_compressing_a_domain_together_reuses_what_its_other_documents_repeat():
    from pipeline.results.compressors import compressor_bpb

    rng = np.random.default_rng(0)
    shared = bytes(rng.integers(97, 123, 3000).astype(np.uint8))  # one licence, two near-copies
    docs_ = [shared + b" version one", shared + b" version two"]
    floors = compressor_bpb(["legal", "legal"], docs_)
    for name in ("gzip", "bz2", "xz"):
        assert floors[f"{name}_domain"]["legal"] < 0.75 * floors[name]["legal"], name  # ~0.5 ideally


def test_the_routing_page_groups_bytes_into_characters_and_loses_no_text():
    import numpy as np

    from pipeline.results.routing_page import characters, render, spans

    text = "naïve café — ok\n日本 x"
    data = text.encode("utf-8") + b"\xff"  # a stray byte stays a character of its own
    assert b"".join(data[a:b] for a, b in characters(data)) == data
    assert len(characters(data)) == len(text) + 1
    choices = np.zeros(len(data), dtype=np.int16)
    choices[2], choices[3] = 1, 0  # 'ï' is bytes 2-3: it takes its first byte's expert
    saved = np.linspace(-1, 3, len(data))
    runs = spans(data, choices, saved)
    assert "".join(t for t, _, _ in runs) == data.decode("utf-8", errors="replace")
    assert [(t, e) for t, e, _ in runs[:2]] == [("na", 0), ("ï", 1)] and runs[2][0].startswith("v")
    page = render([{"label": "<doc>", "bytes": data, "choices": choices, "saved_bits": saved}],
                  [{"name": "expert-0", "cluster": 0, "domain": "a", "purity": 0.5, "uri": "models:/x/1"},
                   {"name": "expert-1", "cluster": 1, "domain": "b", "purity": None, "uri": "models:/x/2"}], "t")
    assert "&lt;doc&gt;" in page and "models:/x/2" in page and "<script" not in page


def test_capture_is_the_share_of_the_oracles_gain_over_the_central_only_where_the_oracle_gains():
    from pipeline.results.metrics import capture

    bpb = {"central": {"code": 3.0, "plays": 2.0}, "oracle": {"code": 2.0, "plays": 2.1},
           "cbtm_top1": {"code": 2.25, "plays": 2.05}, "expert0": {"code": 1.0, "plays": 9.0}}
    assert capture(bpb, ["code", "plays"]) == {"capture/cbtm_top1/code": 0.75}  # plays: the oracle loses


def test_routing_accuracy_of_a_composition_is_per_byte_and_a_byte_routed_nowhere_is_a_miss():
    from pipeline.results.metrics import routing_metrics

    # two documents of domains a (expert 0) and b (expert 1); the composition lists the experts reversed
    choices = [np.array([1, 1, 1, -1]), np.array([0, 0, 1, 1, 1, 1])]  # per byte, in the composition's order
    scored = Scored(experts=["e0", "e1"], composition_experts={"composed_independent": ["e1", "e0"]},
                    results={"composed_independent": {"choices": choices, "experts_per_token": 1.0,
                                                      "top1_counts": np.array([[99, 0], [0, 99]])}})
    cbtm = [np.array([[1.0, 0.0]] * 4), np.array([[0.0, 1.0]] * 6)]
    metrics, heat = routing_metrics(["a", "b"], scored, cbtm, {"a": 0, "b": 1})
    # document a: 3 bytes on e0 of 4 (one nowhere); document b: 2 bytes on e1 of 6
    assert metrics["routing_accuracy/composed_independent"] == pytest.approx((3 + 2) / 10)
    assert metrics["routing_accuracy/cbtm_top1"] == 1.0
    assert heat["composed_independent"].tolist() == [[3, 0], [4, 2]]  # load counts the routed bytes only


def test_macro_bits_per_byte_weighs_every_domain_the_same_whatever_its_bytes():
    from pipeline.results.metrics import summarise

    ln2 = np.log(2)
    docs = [np.zeros(1000, dtype=np.uint8), np.zeros(10, dtype=np.uint8)]
    lp = {"central": [np.full(1000, -1 * ln2), np.full(10, -3 * ln2)]}  # 1 bit per byte on a, 3 on b
    results = {name: {"log_probs": v, "flops": 1.0, "params": 1, "ms_per_token": 1.0} for name, v in lp.items()}
    results["expert0"] = results["central"]
    scored = Scored(results=results, experts=["e0"], central_uri="c", dense_uri="c")
    results["dense"] = results["central"]
    out = summarise(["a", "b"], docs, scored, [np.ones((1000, 1)), np.ones((10, 1))], {"a": 0}, resamples=10)
    assert out["metrics"]["bpb/central/macro"] == pytest.approx(2.0)
    assert out["metrics"]["bpb/central/all"] == pytest.approx((1000 + 30) / 1010)


def test_equal_compute_compares_with_the_cheapest_dense_model_that_had_at_least_the_systems_compute():
    from pipeline.results.metrics import equal_compute

    rng = np.random.default_rng(0)
    docs = lambda shift: [rng.normal(-1.0 - shift, 0.1, 50) for _ in range(20)]  # noqa: E731
    lp = {"dense": docs(0.0), "dense_matched": docs(0.2), "cbtm_top1": docs(0.3), "composed_seed_independent": docs(0.1),
          "composed_independent": docs(0.25)}
    pflops = {"dense": 1.0, "dense_matched": 1.6, "cbtm_top1": 1.0, "composed_seed_independent": 1.1,
              "composed_independent": 1.6, "composed_joint": 2.0}
    out = equal_compute(lp, pflops, ["cbtm_top1", "composed_seed_independent", "composed_independent", "composed_joint"],
                        200, 0)
    assert out["equal_compute/cbtm_top1/dense_pflops"] == 1.0  # as costly as dense: dense
    assert out["equal_compute/composed_seed_independent/dense_pflops"] == 1.6  # costlier than dense: dense_matched
    assert out["equal_compute/composed_independent/dense_pflops"] == 1.6
    assert "equal_compute/composed_joint/mean" not in out  # costlier than every dense model: no figure
    ln2 = np.log(2)
    expected = (-np.concatenate(lp["cbtm_top1"]).mean() + np.concatenate(lp["dense"]).mean()) / ln2
    assert out["equal_compute/cbtm_top1/mean"] == pytest.approx(expected)
    assert out["equal_compute/cbtm_top1/ci_low"] <= out["equal_compute/cbtm_top1/mean"] <= out["equal_compute/cbtm_top1/ci_high"]


def test_the_output_mixtures_lambda_is_the_one_that_scores_best_on_validation():
    from pipeline.results.metrics import output_mixture
    from pipeline.stages.evaluate import mixture_lambdas

    rng = np.random.default_rng(1)
    # two experts; the routed one (weight 1) is right about a byte where the hub is not, and vice versa
    expert = [np.log(rng.uniform(0.05, 0.9, 200)) for _ in range(4)]
    hub = [np.log(rng.uniform(0.05, 0.9, 200)) for _ in range(4)]
    weights = [np.tile([1.0, 0.0], (200, 1)) for _ in range(4)]
    validation = {"expert0": expert, "expert1": [x - 5 for x in expert], "central": hub}
    chosen = mixture_lambdas(validation, weights)
    assert set(chosen) == {"mixture_central"}  # no seed scored: no seed mixture
    best = min(bits_per_byte(output_mixture(expert, hub, lam)) for lam in [i / 100 for i in range(101)])
    assert bits_per_byte(output_mixture(expert, hub, chosen["mixture_central"])) <= best + 0.01
    assert 0 < chosen["mixture_central"] < 1  # two models right about different bytes: both weigh
    np.testing.assert_allclose(output_mixture(expert, hub, 1.0)[0], expert[0])
    np.testing.assert_allclose(output_mixture(expert, hub, 0.0)[0], hub[0])


class ReadRecorder:
    """A token array that remembers how far into it slices have reached."""

    def __init__(self, tokens):
        self.tokens, self.reached = tokens, 0

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, key):
        self.reached = max(self.reached, min(key.stop, len(self.tokens)))
        return self.tokens[key]


def test_documents_of_a_stream_scanned_in_chunks_are_the_whole_streams_and_the_scan_stops_after_them():
    from composition.evaluation import stream_documents

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 5000).astype(np.uint16)
    tokens[rng.choice(5000, 120, replace=False)] = 258  # document ends, some of them adjacent
    whole = stream_documents(tokens, 258, 10**9, chunk=len(tokens))
    assert len(whole) > 100
    for chunk in (1, 7, 64, 4999):
        got = stream_documents(tokens, 258, 10**9, chunk=chunk)
        assert len(got) == len(whole) and all(np.array_equal(a, b) for a, b in zip(got, whole)), chunk
    recorder = ReadRecorder(tokens)
    first = stream_documents(recorder, 258, 300, chunk=16)
    assert [len(d) for d in first] == [len(d) for d in whole[:len(first)]] and sum(map(len, first)) >= 300
    assert recorder.reached < 1000  # those documents end within ~400 tokens: the other 4,000 are never read
