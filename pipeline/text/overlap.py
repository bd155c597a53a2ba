"""Near-duplicate control: how much of a held-out document also occurs in the training text.

Splits by work keep a work out of training, but not its near-copies (licence variants,
codec tables, reprinted passages). A word is a maximal run of non-space bytes; a shingle
is n consecutive words. A held-out byte is *covered* when a shingle containing it occurs
anywhere in the training split. Hashes are stable across processes and machines (blake2b
of each word, combined polynomially modulo 2^64), so the same corpus gives the same figures.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

import numpy as np

WORD = re.compile(rb"\S+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it permutes uint64


def words(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, first byte, end byte) of every word of `data`: three (n_words,) arrays."""
    hashes, starts, ends = [], [], []
    for m in WORD.finditer(data):
        hashes.append(int.from_bytes(hashlib.blake2b(m.group(), digest_size=8).digest(), "little"))
        starts.append(m.start())
        ends.append(m.end())
    return (np.array(hashes, dtype=np.uint64), np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))


def shingle_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """(n_words - n + 1,) hashes of every n consecutive words (empty when fewer than n words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 on purpose
        for j in range(n):
            h = h * _MULTIPLIER + word_hashes[j:j + count]
    return h


class ShingleIndex:
    """The set of n-word shingles of a training text, and the coverage of other texts by it."""

    def __init__(self, texts: Iterable[bytes], n: int = 8):
        if n < 1:
            raise ValueError(f"a shingle needs at least one word, got n={n}")
        self.n = n
        parts = [shingle_hashes(words(t)[0], n) for t in texts]
        self.hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which shingle hashes occur in the index (a binary search in its sorted set)."""
        if not len(self.hashes):
            return np.zeros(len(hashes), dtype=bool)
        at = np.searchsorted(self.hashes, hashes).clip(max=len(self.hashes) - 1)
        return self.hashes[at] == hashes

    def covered(self, data: bytes) -> np.ndarray:
        """(len(data),) bool: bytes inside some shingle of `data` that occurs in the index."""
        hashes, starts, ends = words(data)
        found = self.contains(shingle_hashes(hashes, self.n))  # (n_words - n + 1,)
        marks = np.zeros(len(data) + 1, dtype=np.int64)  # +1 at a covered shingle's start, -1 past its end
        first = np.flatnonzero(found)
        np.add.at(marks, starts[first], 1)
        np.add.at(marks, ends[first + self.n - 1], -1)
        return np.cumsum(marks[:-1]) > 0

    def share(self, data: bytes) -> float:
        """Share of the bytes of `data` covered by training shingles (0 for empty data)."""
        return float(self.covered(data).mean()) if data else 0.0
