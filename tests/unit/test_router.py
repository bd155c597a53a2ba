import random

import numpy as np
import pytest

import textgen

from artifacts import ChecksumError, load_state, save_state
from routing.embedding import complete_terms
from routing.metrics import clustering_scores
from routing.router import ClusterRouter


@pytest.fixture(scope="module")
def fitted():
    rows = textgen.corpus(30, seed=0)
    texts, labels = [r["text"] for r in rows], [r["source"] for r in rows]
    router = ClusterRouter.fit(texts, 4, svd_dim=16, min_df=1, top_k=2, seed=0)
    return router, texts, labels


def test_router_recovers_generated_domains(fitted):
    router, texts, labels = fitted
    scores = clustering_scores(labels, router.assign(texts), 4)
    assert scores["purity"] == 1.0 and scores["ari"] == pytest.approx(1.0)


def test_router_round_trip_gives_identical_routing_weights(fitted, tmp_path):
    router, texts, _ = fitted
    save_state(tmp_path, "router", *router.to_state())
    loaded = ClusterRouter.from_state(*load_state(tmp_path, "router"))
    probe = textgen.corpus(3, seed=9)
    h = [r["text"] for r in probe] + texts[:5]
    np.testing.assert_array_equal(loaded.weights(loaded.embedder.embed(h)), router.weights(router.embedder.embed(h)))
    np.testing.assert_array_equal(loaded.assign(h), router.assign(h))
    np.testing.assert_array_equal(loaded.route_prefixes(h[0], [5, 50, 200]), router.route_prefixes(h[0], [5, 50, 200]))


def test_router_file_with_wrong_checksum_is_refused(fitted, tmp_path):
    router, _, _ = fitted
    save_state(tmp_path, "router", *router.to_state())
    path = tmp_path / "router.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last centroid value
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="router.safetensors has sha256"):
        load_state(tmp_path, "router")


def test_router_file_checked_against_an_externally_recorded_checksum(fitted, tmp_path):
    router, _, _ = fitted
    save_state(tmp_path, "router", *router.to_state())
    with pytest.raises(ChecksumError):
        load_state(tmp_path, "router", expected_sha256="0" * 64)


def test_routing_weights_keep_exactly_top_k_experts_and_sum_to_one(fitted):
    router, texts, _ = fitted
    h = router.embedder.embed(texts[:20])
    for top_k in (1, 2, 4):
        w = router.weights(h, top_k)
        assert ((w > 0).sum(axis=1) == top_k).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


def test_top_weight_goes_to_the_nearest_centroid(fitted):
    router, texts, _ = fitted
    w = router.weights(router.embedder.embed(texts), 4)
    np.testing.assert_array_equal(w.argmax(axis=1), router.assign(texts))


def test_prefix_routing_never_reads_past_the_prefix(fitted):
    router, _, _ = fitted
    base = textgen.document(random.Random(1), "cooking")
    ends = list(range(0, len(base) + 1, 7))
    weights = router.route_prefixes(base, ends, top_k=4)
    # Replace everything after each cut with text of another domain: the weights at the cut stay the same.
    other = textgen.document(random.Random(2), "astronomy")
    for j, end in enumerate(ends):
        changed = router.route_prefixes(base[:end] + other, [end], top_k=4)[0]
        np.testing.assert_array_equal(changed, weights[j])


def test_incremental_prefix_routing_equals_routing_each_prefix_alone(fitted):
    router, texts, _ = fitted
    text = texts[0] + " " + texts[45]  # a cooking document followed by an astronomy one
    ends = [0, 1, 9, 10, 11, 120, len(texts[0]), len(text) - 1, len(text)]
    weights = router.route_prefixes(text, ends, top_k=4)
    for j, end in enumerate(ends):
        np.testing.assert_allclose(weights[j], router.route_prefix(text[:end], top_k=4), atol=1e-5)


def test_prefix_routing_follows_the_text_as_the_domain_changes(fitted):
    router, texts, _ = fitted
    first, second = texts[0], texts[95]  # cooking, then finance
    w = router.route_prefixes(first + "\n\n" + second * 3, [len(first), len(first) + 3 * len(second)])
    assert w[0].argmax() == router.assign([first])[0]
    assert w[1].argmax() == router.assign([second])[0]


def test_a_word_touching_the_end_of_the_prefix_is_not_counted_yet():
    assert complete_terms("garlic and onio") == ["garlic"]
    assert complete_terms("garlic and onion ") == ["garlic", "onion"]
    assert complete_terms("price 42 dollars") == ["price", "<num>"]


def test_fit_refuses_fewer_documents_than_clusters():
    with pytest.raises(ValueError, match="cannot form 6 clusters from 3 documents"):
        ClusterRouter.fit(["a b c", "d e f", "g h i"], 6)


def test_fit_refuses_k_below_two():
    with pytest.raises(ValueError, match="k must be at least 2"):
        ClusterRouter.fit(["alpha beta", "gamma delta"], 1)


def test_the_ascii_path_of_analyze_gives_the_terms_of_the_word_by_word_path():
    import random

    from routing.embedding import analyze, analyze_spans

    rng = random.Random(0)
    pieces = ["The", "a", "I", "x1", "_", "__init__", "snake_case", "CamelCase", "42", "3rd", "v2", "A1b2",
              "and", "THE", "Hello", "world", "e.g.", "don't", "x", "é", "Kelvin", "\u212a", "İstanbul", "ñu",
              "\t", "\n\n", " ", "-", "(", ")", "==", "0x1F", "1_000"]
    ascii_pieces = [p for p in pieces if p.isascii()]
    texts = ["".join(rng.choice(pieces if i % 2 else ascii_pieces) + rng.choice(["", " ", "."]) for _ in range(60))
             for i in range(300)]
    assert sum(t.isascii() for t in texts) > 10 and sum(not t.isascii() for t in texts) > 10  # both paths
    assert all(analyze(t) == [term for term, _ in analyze_spans(t)] for t in texts)
