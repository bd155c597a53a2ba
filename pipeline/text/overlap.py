"""Near-duplicate control: how much of a held-out document also occurs in the training text.

Splits by work keep a work out of training, but not its near-copies (licence variants,
codec tables, reprinted passages). A word is a maximal run of non-space bytes; a shingle
is n consecutive words. A held-out byte is *covered* when a shingle containing it occurs
anywhere in the training split. Hashes are stable across processes and machines (blake2b
of each word, combined polynomially modulo 2^64), so the same corpus gives the same figures.

Two sets of training shingles: `ShingleIndex`, exact (8 bytes per distinct shingle: about
1.3x the training text), and `ShingleFilter`, a Bloom filter of a fixed size that never
misses a training shingle and takes an absent one for present with a small probability it
reports (`false_positive_rate`); filters of parts of a corpus merge with `|`.
"""
from __future__ import annotations

import copy
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


class _Shingles:
    """A set of n-word shingles of a training text (`contains`), and the coverage of other texts by it."""

    n: int

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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


class ShingleIndex(_Shingles):
    """The exact set of a training text's shingles: a sorted array of their hashes."""

    def __init__(self, texts: Iterable[bytes], n: int = 8):
        self.n = _checked(n)
        parts = [shingle_hashes(words(t)[0], n) for t in texts]
        self.hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: which shingle hashes occur in the index (a binary search in its sorted set)."""
        if not len(self.hashes):
            return np.zeros(len(hashes), dtype=bool)
        at = np.searchsorted(self.hashes, hashes).clip(max=len(self.hashes) - 1)
        return self.hashes[at] == hashes


# odd multipliers of multiply-shift hashing: each takes other top bits of a shingle's hash as a bit position
_PROBES = np.array([0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3],
                   dtype=np.uint64)


class ShingleFilter(_Shingles):
    """A Bloom filter of a training text's shingles in `bits` bits (a power of two), whatever the
    text's size: a training shingle is always found; a shingle absent from training is found with
    probability `false_positive_rate` (the share of bits set, to the power of the probes, 4)."""

    def __init__(self, texts: Iterable[bytes] = (), n: int = 8, bits: int = 1 << 29):
        if bits < 64 or bits & (bits - 1):
            raise ValueError(f"a shingle filter's size must be a power of two of at least 64 bits, got {bits}")
        self.n, self.bits = _checked(n), bits
        self.words = np.zeros(bits // 64, dtype=np.uint64)
        for text in texts:
            self.add(shingle_hashes(words(text)[0], n))

    def _positions(self, hashes: np.ndarray) -> np.ndarray:
        """(probes, n) bit positions of each hash: the top log2(bits) bits of hash * multiplier."""
        shift = np.uint64(64 - (self.bits.bit_length() - 1))
        with np.errstate(over="ignore"):
            return (hashes[None, :] * _PROBES[:, None]) >> shift

    def add(self, hashes: np.ndarray) -> None:
        positions = self._positions(np.asarray(hashes, dtype=np.uint64)).ravel()
        np.bitwise_or.at(self.words, positions >> np.uint64(6), np.uint64(1) << (positions & np.uint64(63)))

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: hashes whose every probed bit is set."""
        positions = self._positions(np.asarray(hashes, dtype=np.uint64))  # (probes, n)
        bits = (self.words[positions >> np.uint64(6)] >> (positions & np.uint64(63))) & np.uint64(1)
        return bits.all(axis=0)

    def __or__(self, other: "ShingleFilter") -> "ShingleFilter":
        """The filter of both texts (filters of the same size and shingle length)."""
        if (self.n, self.bits) != (other.n, other.bits):
            raise ValueError(f"cannot merge a filter of {self.n}-word shingles in {self.bits} bits with one of "
                             f"{other.n}-word shingles in {other.bits} bits")
        merged = copy.copy(self)
        merged.words = self.words | other.words
        return merged

    @property
    def false_positive_rate(self) -> float:
        """The probability that a shingle absent from training is found: (bits set / bits) ** probes."""
        return float((np.bitwise_count(self.words).sum() / self.bits) ** len(_PROBES))


def _checked(n: int) -> int:
    if n < 1:
        raise ValueError(f"a shingle needs at least one word, got n={n}")
    return n
