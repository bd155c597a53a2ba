"""Near-duplicate control of held-out text: shingle coverage and the documents it drops."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import textgen

from pipeline.config import load_config
from pipeline.stages.evaluate import held_out
from pipeline.text.corpus import load_corpus
from pipeline.text.overlap import ShingleIndex, shingle_hashes, words

REPO = Path(__file__).resolve().parents[2]
TRAIN = b"the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat all day"


def test_a_verbatim_copy_of_training_text_is_covered_byte_for_byte_except_spaces_at_its_ends():
    index = ShingleIndex([TRAIN], n=4)
    assert index.covered(TRAIN).all()
    assert index.share(b"  " + TRAIN) == pytest.approx(len(TRAIN) / (len(TRAIN) + 2))


def test_text_sharing_no_run_of_n_words_with_training_is_not_covered():
    index = ShingleIndex([TRAIN], n=4)
    # every word occurs in training, but never four in the training order
    assert not index.covered(b"dog lazy the over jumps fox brown quick the").any()


def test_exactly_the_bytes_of_a_shared_shingle_are_covered():
    index = ShingleIndex([TRAIN], n=3)
    text = b"alpha beta brown fox jumps gamma delta"
    covered = index.covered(text)
    start = text.index(b"brown")
    end = text.index(b"jumps") + len(b"jumps")
    assert covered[start:end].all() and not covered[:start].any() and not covered[end:].any()


def test_a_text_of_fewer_words_than_a_shingle_is_never_covered():
    index = ShingleIndex([TRAIN], n=8)
    assert index.share(b"the quick brown fox") == 0.0
    assert len(shingle_hashes(words(b"one two")[0], 3)) == 0


def test_shingle_hashes_are_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, %r); from pipeline.text.overlap import words, shingle_hashes; "
            "print(shingle_hashes(words(%r)[0], 3).tolist())" % (str(REPO), TRAIN))
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert other == shingle_hashes(words(TRAIN)[0], 3).tolist()


@pytest.fixture
def twin_corpus(tmp_path):
    """Every document twice, as two works with a different first line: near-copies a split by
    work puts on both sides of the train / test line."""
    rows = []
    for r in textgen.corpus(25, ["cooking", "sailing"], seed=0):
        rows.append(r)
        rows.append({**r, "text": "Second printing.\n" + r["text"], "work": r["work"] + "-reprint"})
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", ["corpus.source=files", f"corpus.files=[{path}]",
                                                        "corpus.test_fraction=0.3", *overrides])


def test_held_out_documents_whose_twin_was_trained_on_are_dropped_and_the_rest_kept(twin_corpus):
    cfg = _cfg(twin_corpus, "evaluate.max_bytes_per_domain=10000000")
    docs = load_corpus(cfg.corpus)
    train_texts = {d.text.removeprefix("Second printing.\n") for d in docs if d.split == "train"}
    test = [d for d in docs if d.split == "test"]
    twinned = sum(d.text.removeprefix("Second printing.\n") in train_texts for d in test)
    assert 0 < twinned < len(test)  # the corpus has both kinds
    held = held_out(cfg, None)
    assert len(held.tokens) == len(test) - twinned
    assert sum(held.dropped.values()) == twinned
    index = ShingleIndex([d.text.encode() for d in docs if d.split == "train"], cfg.evaluate.shingle_words)
    assert all(index.share(bytes(t)) <= cfg.evaluate.max_overlap for t in held.tokens)
    for domain, after in held.overlap.items():
        assert after <= held.overlap_before[domain]


def test_max_overlap_of_one_keeps_every_held_out_document(twin_corpus):
    cfg = _cfg(twin_corpus, "evaluate.max_bytes_per_domain=10000000", "evaluate.max_overlap=1")
    held = held_out(cfg, None)
    assert len(held.tokens) == sum(d.split == "test" for d in load_corpus(cfg.corpus))
    assert not held.dropped and max(held.overlap.values()) > 0.5


def test_max_overlap_outside_zero_to_one_is_a_clear_config_error(twin_corpus):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.max_overlap must be between 0 and 1"):
        _cfg(twin_corpus, "evaluate.max_overlap=1.5")


def random_texts(n: int, seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(60)).encode() for _ in range(n)]


def test_a_filter_finds_every_training_shingle_and_false_positives_at_the_rate_it_reports():
    from pipeline.text.overlap import ShingleFilter

    train = random_texts(300, seed=1)  # 17,100 shingles in 2^17 bits: ~3 % of absent shingles found
    shingles = ShingleFilter(train, n=4, bits=1 << 17)
    assert all(shingles.contains(shingle_hashes(words(t)[0], 4)).all() for t in train)  # never a miss
    absent = np.concatenate([shingle_hashes(words(t)[0], 4) for t in random_texts(400, seed=2)])
    rate = shingles.contains(absent).mean()  # 22,800 shingles no training text has
    assert 0.01 < shingles.false_positive_rate < 0.1
    assert rate == pytest.approx(shingles.false_positive_rate, rel=0.15)


def test_filters_of_two_halves_merged_are_the_filter_of_the_whole():
    from pipeline.text.overlap import ShingleFilter

    texts = random_texts(100, seed=3)
    merged = ShingleFilter(texts[:50], n=5, bits=1 << 14) | ShingleFilter(texts[50:], n=5, bits=1 << 14)
    assert np.array_equal(merged.words, ShingleFilter(texts, n=5, bits=1 << 14).words)
    with pytest.raises(ValueError, match="cannot merge"):
        merged | ShingleFilter(texts, n=5, bits=1 << 15)


def test_a_filter_of_the_default_size_drops_the_held_out_documents_the_exact_index_drops(twin_corpus):
    filtered = held_out(_cfg(twin_corpus, "evaluate.max_bytes_per_domain=10000000"), None)
    exact = held_out(_cfg(twin_corpus, "evaluate.max_bytes_per_domain=10000000", "evaluate.shingle_filter_mb=0"),
                     None)
    assert filtered.dropped == exact.dropped and filtered.overlap == exact.overlap
    assert 0 < filtered.false_positive_rate < 1e-12 and exact.false_positive_rate == 0


def test_a_filter_too_small_for_the_training_text_overstates_overlap_and_says_so(caplog):
    import logging

    from pipeline.config import EvaluateConfig
    from pipeline.stages.evaluate import training_shingles

    train = random_texts(6000, seed=4)  # 342,000 shingles: 15 % of a 1 MB filter's bits set
    held = random_texts(200, seed=5)
    exact = ShingleIndex(train, 4)
    with caplog.at_level(logging.WARNING):
        small = training_shingles(train, EvaluateConfig(shingle_words=4, shingle_filter_mb=1))
    assert small.false_positive_rate > 1e-4 and "raise evaluate.shingle_filter_mb" in caplog.text
    assert sum(small.covered(h).sum() for h in held) > sum(exact.covered(h).sum() for h in held)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        large = training_shingles(train, EvaluateConfig(shingle_words=4, shingle_filter_mb=16))
    assert large.false_positive_rate < 1e-6 and "shingle_filter_mb" not in caplog.text


def test_a_shingle_filter_size_not_a_power_of_two_is_a_clear_config_error(twin_corpus):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.shingle_filter_mb must be a power of two"):
        _cfg(twin_corpus, "evaluate.shingle_filter_mb=48")
