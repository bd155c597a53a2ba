"""Paired bootstrap intervals for a difference in bits per byte between two systems.

Both systems score the same held-out documents, so the difference is resampled over
documents (the unit that was sampled: bytes of one document are not independent): draw
documents with replacement, recompute each system's bits per byte on the draw (total bits
over total bytes, as the headline figure is computed), take the difference. The interval
is the percentile interval of those differences; negative means the first system is better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float  # the difference on the documents as scored (not a bootstrap average)
    ci_low: float
    ci_high: float

    def excludes_zero(self) -> bool:
        return self.ci_high < 0 or self.ci_low > 0


def document_bits(log_probs: list[np.ndarray]) -> np.ndarray:
    """(n_docs,) bits each document costs: its natural-log probabilities summed, in bits."""
    return np.array([-float(lp.sum()) / math.log(2) for lp in log_probs])


def paired_bootstrap(log_probs_a: list[np.ndarray], log_probs_b: list[np.ndarray], resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """bpb(a) - bpb(b) with its paired bootstrap interval over documents."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean, deltas = _paired_draws(log_probs_a, log_probs_b, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Interval(mean, float(low), float(high))


def _paired_draws(log_probs_a: list[np.ndarray], log_probs_b: list[np.ndarray], resamples: int,
                  seed: int) -> tuple[float, np.ndarray]:
    """bpb(a) - bpb(b) on the documents as scored, and on each of `resamples` draws of them (R,)."""
    if len(log_probs_a) != len(log_probs_b) or not log_probs_a:
        raise ValueError(f"both systems must score the same documents (got {len(log_probs_a)} and "
                         f"{len(log_probs_b)})")
    sizes = np.array([len(lp) for lp in log_probs_a], dtype=np.float64)
    if any(len(a) != len(b) for a, b in zip(log_probs_a, log_probs_b)):
        raise ValueError("both systems must score every byte of each document")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = document_bits(log_probs_a) - document_bits(log_probs_b)  # (n_docs,)
    rng = np.random.default_rng(seed)
    n = len(diff)
    draws = rng.integers(0, n, size=(resamples, n))  # (R, n) document indices
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)  # (R, n) times each document is drawn
    return float(diff.sum() / sizes.sum()), counts @ diff / (counts @ sizes)  # (R,)


def stratified_bootstrap(strata: list[tuple[float, list[np.ndarray], list[np.ndarray]]], resamples: int = 2000,
                         level: float = 0.95, seed: int = 0) -> Interval:
    """sum_s w_s (bpb_s(a) - bpb_s(b)) with its paired bootstrap interval, documents drawn with
    replacement within each stratum (w_s, log-probs of a, of b): e.g. the equal-weight mean of a
    new domain and the macro average of the old ones, each stratum keeping its own documents."""
    if not strata:
        raise ValueError("no strata to compare")
    mean, draws = 0.0, np.zeros(resamples)
    for s, (weight, a, b) in enumerate(strata):
        interval, deltas = _paired_draws(a, b, resamples, seed + s)
        mean += weight * interval
        draws += weight * deltas
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(mean), float(low), float(high))
