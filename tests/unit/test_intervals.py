"""Paired bootstrap intervals over documents for a difference in bits per byte."""
import math

import numpy as np
import pytest

from composition.evaluation import bits_per_byte
from composition.intervals import paired_bootstrap


def documents(n_docs, seed=0, low=50, high=400):
    rng = np.random.default_rng(seed)
    return [-rng.uniform(0.5, 4.0, size=int(rng.integers(low, high))) for _ in range(n_docs)]  # log-probs, nats


def test_the_mean_is_the_difference_of_the_two_systems_bits_per_byte():
    a, b = documents(30, seed=1), documents(30, seed=2)
    b = [lp[:len(x)] if len(lp) >= len(x) else np.resize(lp, len(x)) for lp, x in zip(b, a)]
    interval = paired_bootstrap(a, b, resamples=200)
    assert interval.mean == pytest.approx(bits_per_byte(a) - bits_per_byte(b))
    assert interval.ci_low <= interval.mean <= interval.ci_high


def test_a_system_better_on_every_byte_by_a_constant_has_an_interval_at_that_constant():
    b = documents(40)
    better = 0.1  # bits per byte
    a = [lp + better * math.log(2) for lp in b]
    interval = paired_bootstrap(a, b, resamples=500)
    assert interval.mean == pytest.approx(-better)
    assert interval.ci_low == pytest.approx(-better) and interval.ci_high == pytest.approx(-better)
    assert interval.excludes_zero()


def test_differences_that_change_sign_from_document_to_document_give_an_interval_around_zero():
    b = documents(60, seed=3)
    signs = np.random.default_rng(4).choice([-1.0, 1.0], size=len(b))
    a = [lp + s * 0.3 for lp, s in zip(b, signs)]
    interval = paired_bootstrap(a, b, resamples=2000)
    assert interval.ci_low < 0 < interval.ci_high and not interval.excludes_zero()


def test_documents_are_the_resampled_unit_so_differences_that_vary_by_document_widen_the_interval():
    """Bytes of one document share its shift: resampling documents must see that spread,
    resampling bytes (each byte its own 'document') would not."""
    b = documents(40, seed=5)
    shifts = np.random.default_rng(6).normal(0.1, 0.3, size=len(b))
    a = [lp - s for lp, s in zip(b, shifts)]
    by_document = paired_bootstrap(a, b, resamples=1000)
    by_byte = paired_bootstrap([np.array([x]) for lp in a for x in lp], [np.array([x]) for lp in b for x in lp],
                               resamples=1000)
    assert by_document.mean == pytest.approx(by_byte.mean)
    assert by_document.ci_high - by_document.ci_low > 3 * (by_byte.ci_high - by_byte.ci_low)


def test_the_same_seed_gives_the_same_interval():
    a, b = documents(20, seed=6), documents(20, seed=6)
    a = [lp * 0.9 for lp in a]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)


def test_systems_scored_on_different_documents_are_refused():
    a = documents(5)
    with pytest.raises(ValueError, match="same documents"):
        paired_bootstrap(a, a[:4])
    with pytest.raises(ValueError, match="every byte"):
        paired_bootstrap(a, [lp[:-1] for lp in a])
