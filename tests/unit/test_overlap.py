"""Near-duplicate control of held-out text: shingle coverage and the documents it drops."""
import json
import subprocess
import sys
from pathlib import Path

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
