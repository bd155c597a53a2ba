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
    if len(log_probs_a) != len(log_probs_b) or not log_probs_a:
        raise ValueError(f"both systems must score the same documents (got {len(log_probs_a)} and "
                         f"{len(log_probs_b)})")
    sizes = np.array([len(lp) for lp in log_probs_a], dtype=np.float64)
    if any(len(a) != len(b) for a, b in zip(log_probs_a, log_probs_b)):
        raise ValueError("both systems must score every byte of each document")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level} and {resamples}")
    diff = document_bits(log_probs_a) - document_bits(log_probs_b)  # (n_docs,)
    rng = np.random.default_rng(seed)
    n = len(diff)
    draws = rng.integers(0, n, size=(resamples, n))  # (R, n) document indices
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)  # (R, n) times each document is drawn
    deltas = counts @ diff / (counts @ sizes)  # (R,)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return Interval(float(diff.sum() / sizes.sum()), float(low), float(high))
