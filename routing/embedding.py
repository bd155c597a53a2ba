"""Document embedding for cBTM: tf-idf -> truncated SVD -> L2 normalisation.

Kept as plain arrays (vocabulary, idf, SVD basis) so the router is safetensors + JSON and
so a growing prefix can be embedded incrementally: the tf-idf row's own L2 norm is a
scalar that the final normalisation cancels, so embed(text) = normalise(sum_w tf_w idf_w V_w).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

# Identifiers / words, or digit runs. Both are maximal runs of one character class, so
# the tokens of a prefix that end before its last character equal those of the full text.
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
NUMBER = "<num>"
# the same terms in lower-cased ASCII text, one-letter words left out by the pattern itself
ASCII_TERM = re.compile(r"[a-z_][a-z0-9_]+|[0-9]+")
STOP_WORDS = frozenset(ENGLISH_STOP_WORDS)


def analyze_spans(text: str) -> list[tuple[str, int]]:
    """(term, end offset) for every term of `text`: lower-cased, numbers folded to <num>,
    English stop words and one-letter words dropped."""
    return [(term, m.end()) for m in TOKEN.finditer(text) if (term := fold(m.group())) is not None]


def fold(word: str) -> str | None:
    """The term a TOKEN match counts as: lower-cased, numbers folded to <num>; None for an
    English stop word or a one-letter word."""
    word = word.lower()
    if word[0].isdigit():
        return NUMBER
    return None if len(word) < 2 or word in ENGLISH_STOP_WORDS else word


def analyze(text: str) -> list[str]:
    """The terms of `text`, as analyze_spans gives them. ASCII text takes a path without a call per
    word (1.7x faster; `str.lower` of other text can make ASCII letters, e.g. of the Kelvin sign)."""
    if not text.isascii():
        return [term for term, _ in analyze_spans(text)]
    return [NUMBER if t[0].isdigit() else t for t in ASCII_TERM.findall(text.lower()) if t not in STOP_WORDS]


def complete_terms(prefix: str) -> list[str]:
    """Terms of a text prefix that are certainly complete: the last one is dropped if it
    touches the end of the prefix (the next character might extend it)."""
    return [term for term, end in analyze_spans(prefix) if end < len(prefix)]


@dataclass
class TfidfSvd:
    vocabulary: list[str]  # term of each tf-idf column
    idf: np.ndarray  # (V,) float32
    basis: np.ndarray  # (V, d) float32: SVD components, transposed

    def __post_init__(self):
        self.index = {term: i for i, term in enumerate(self.vocabulary)}

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    @classmethod
    def fit(cls, texts: list[str], max_features: int, min_df: int, dim: int, seed: int) -> "TfidfSvd":
        """Fit the vocabulary, idf and SVD basis on a sample of documents."""
        if min_df > len(texts):
            raise ValueError(f"min_df={min_df} is more than the {len(texts)} documents the router is fitted on: "
                             "no term can occur in that many; lower min_df")
        asked, min_df = min_df, min(min_df, max(1, len(texts) // 2))  # tiny corpora: terms seen in a few docs
        counter = CountVectorizer(analyzer=analyze, max_features=max_features, min_df=min_df, dtype=np.float32)
        too_rare = (f"terms must occur in at least min_df={asked} documents (used: {min_df}, at most half of the "
                    f"{len(texts)} documents)")
        try:
            counts = counter.fit_transform(texts)
        except ValueError as e:  # sklearn: "empty vocabulary" (after pruning, or only stop words)
            if min_df > 1:
                raise ValueError(f"no term is left to cluster on: {too_rare}; lower min_df") from None
            raise ValueError(f"no usable terms in the {len(texts)} documents to cluster ({e}); "
                             "the corpus needs words other than stop words") from e
        vocabulary = counter.get_feature_names_out().tolist()
        df = np.asarray((counts > 0).sum(axis=0)).ravel()
        idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)  # smooth idf, as sklearn
        tfidf = _normalise_rows(_sublinear(counts).multiply(idf).tocsr())
        dim = min(dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
        if dim < 1:
            hint = f": {too_rare}; lower min_df" if min_df > 1 else "; give more documents"
            raise ValueError(f"too few documents ({len(texts)}) or terms ({tfidf.shape[1]}) for an SVD embedding"
                             + hint)
        svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed).fit(tfidf)
        return cls(vocabulary, idf, svd.components_.T.astype(np.float32).copy())

    def tfidf(self, texts: list[str]) -> sp.csr_matrix:
        counter = CountVectorizer(analyzer=analyze, vocabulary=self.index, dtype=np.float32)
        return _sublinear(counter.transform(texts)).multiply(self.idf).tocsr()

    def embed(self, texts: list[str], batch: int = 4096) -> np.ndarray:
        """(N, d) unit vectors; a text with no known term maps to the zero vector."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch):
            out[start:start + batch] = self.tfidf(texts[start:start + batch]) @ self.basis
        return normalise(out)

    def embed_terms(self, terms: list[str]) -> np.ndarray:
        """Embedding of a bag of already-analysed terms (d,)."""
        counts: dict[int, int] = {}
        for term in terms:
            if term in self.index:
                counts[self.index[term]] = counts.get(self.index[term], 0) + 1
        raw = np.zeros(self.dim, dtype=np.float32)
        for col, c in counts.items():
            raw += (1 + np.log(c)) * self.idf[col] * self.basis[col]
        return normalise(raw[None])[0]

    def embed_prefixes(self, text: str, ends: list[int]) -> np.ndarray:
        """Embeddings of text[:e] for each e in ends, from the complete terms of each prefix
        only; one pass over the text, O(len(text) + len(ends) * d)."""
        spans = analyze_spans(text)
        order = np.argsort(ends, kind="stable")
        out = np.zeros((len(ends), self.dim), dtype=np.float32)
        raw = np.zeros(self.dim, dtype=np.float64)
        counts: dict[int, int] = {}
        i = 0
        for j in order:
            end = ends[j]
            while i < len(spans) and spans[i][1] < end:  # term complete inside text[:end]
                self.add_term(raw, counts, spans[i][0])
                i += 1
            out[j] = raw
        return normalise(out)

    def add_term(self, raw: np.ndarray, counts: dict[int, int], term: str) -> None:
        """One more occurrence of `term` in the bag whose unnormalised embedding is raw (d,)
        (float64, updated in place) and whose term counts are `counts`."""
        col = self.index.get(term)
        if col is not None:
            c = counts.get(col, 0)
            # sublinear tf: 1 + ln(c) for c >= 1; add the increment of this occurrence
            delta = (1 + np.log(c + 1)) - (1 + np.log(c) if c else 0.0)
            raw += delta * self.idf[col] * self.basis[col]
            counts[col] = c + 1


class PrefixEmbedding:
    """The embedding of a growing text's complete terms, a character at a time (embed_prefixes,
    incrementally: O(1) a character beside the current word's length)."""

    def __init__(self, embedder: TfidfSvd):
        self.embedder = embedder
        self.text = ""
        self.scan = 0  # where the next term may start: the end of the last complete one
        self.raw = np.zeros(embedder.dim, dtype=np.float64)
        self.counts: dict[int, int] = {}

    def push(self, piece: str) -> np.ndarray:
        """Append `piece` (the characters one byte completed, maybe none); the embedding (d,) of
        the complete terms so far."""
        self.text += piece
        for m in TOKEN.finditer(self.text, self.scan):
            if m.end() >= len(self.text):  # touches the end: the next character may extend it
                break
            self.scan = m.end()
            term = fold(m.group())
            if term is not None:
                self.embedder.add_term(self.raw, self.counts, term)
        return normalise(self.raw.astype(np.float32)[None])[0]


def _sublinear(counts: sp.spmatrix) -> sp.csr_matrix:
    counts = counts.tocsr(copy=True)
    counts.data = 1 + np.log(counts.data)
    return counts


def _normalise_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1
    return sp.diags(1 / norms) @ m


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms == 0, 1, norms)).astype(np.float32)
