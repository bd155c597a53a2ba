"""The cBTM router: embed a text, find its cluster, weight the experts for a prefix.

Fit: tf-idf -> SVD -> L2 on a sample, balanced k-means on it. Training assignment is the
nearest centroid. Routing a context: w = softmax(-||h - c_j||^2 / T) over clusters, keep
the top k, renormalise; h embeds only the complete terms of the text seen so far.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routing.embedding import TfidfSvd, complete_terms
from routing.kmeans import balanced_kmeans, nearest_centroid, pairwise_sq_dists

STATE_VERSION = 1


@dataclass
class ClusterRouter:
    embedder: TfidfSvd
    centroids: np.ndarray  # (k, d) float32
    temperature: float = 0.1
    top_k: int = 1

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def fit(cls, texts: list[str], k: int, *, max_features: int = 20_000, min_df: int = 2, svd_dim: int = 100,
            iterations: int = 20, temperature: float = 0.1, top_k: int = 1, seed: int = 0) -> "ClusterRouter":
        """Fit embedding and balanced k-means centroids on `texts` (a sample of the corpus)."""
        if k < 2:
            raise ValueError(f"k must be at least 2, got {k}")
        if len(texts) < k:
            raise ValueError(f"cannot form {k} clusters from {len(texts)} documents; use k <= {len(texts)}")
        if not 1 <= top_k <= k:
            raise ValueError(f"top_k must be between 1 and k={k}, got {top_k}")
        embedder = TfidfSvd.fit(texts, max_features=max_features, min_df=min_df, dim=svd_dim, seed=seed)
        centroids, _ = balanced_kmeans(embedder.embed(texts), k, iterations=iterations, seed=seed)
        return cls(embedder, centroids, temperature, top_k)

    def assign(self, texts: list[str]) -> np.ndarray:
        """Cluster of each whole document: its nearest centroid (N,)."""
        return nearest_centroid(self.embedder.embed(texts), self.centroids)

    def with_cluster(self, texts: list[str]) -> "ClusterRouter":
        """This router with one more cluster, k, whose centroid is the mean embedding of `texts`
        (a new domain's training documents), as k-means' mean step would place it (texts with no
        term of the router's vocabulary embed to zero and say nothing of the direction: left
        out); the embedding and the k existing centroids are kept bit for bit, so old routes keep
        their indices."""
        h = self.embedder.embed(texts)  # (N, d)
        h = h[np.linalg.norm(h, axis=1) > 0]
        if not len(h):
            raise ValueError(f"none of the {len(texts)} documents of the new cluster has a term of the router's "
                             f"vocabulary ({len(self.embedder.vocabulary)} terms fitted on the pipeline's corpus): "
                             "there is nothing to place its centroid by")
        centroid = h.astype(np.float64).mean(axis=0)  # (d,)
        centroids = np.concatenate([self.centroids, centroid[None].astype(np.float32)])  # (k + 1, d)
        return ClusterRouter(self.embedder, centroids, self.temperature, self.top_k)

    def weights(self, h: np.ndarray, top_k: int | None = None) -> np.ndarray:
        """(N, k) routing weights for embeddings h (N, d): softmax(-d^2/T), top-k, renormalised."""
        top_k = top_k or self.top_k
        logits = -pairwise_sq_dists(h, self.centroids) / self.temperature  # (N, k)
        keep = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        masked = np.full_like(logits, -np.inf)
        np.put_along_axis(masked, keep, np.take_along_axis(logits, keep, axis=1), axis=1)
        w = np.exp(masked - masked.max(axis=1, keepdims=True))
        return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)

    def route_prefix(self, prefix: str, top_k: int | None = None) -> np.ndarray:
        """(k,) weights for the context `prefix`, from its complete terms only."""
        return self.weights(self.embedder.embed_terms(complete_terms(prefix))[None], top_k)[0]

    def route_prefixes(self, text: str, ends: list[int], top_k: int | None = None) -> np.ndarray:
        """(len(ends), k) weights; row j routes the context text[:ends[j]], in one pass."""
        return self.weights(self.embedder.embed_prefixes(text, ends), top_k)

    # --- state: safetensors tensors + JSON metadata, no pickle -------------------------

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors = {"idf": self.embedder.idf, "svd_basis": self.embedder.basis, "centroids": self.centroids}
        meta = {"kind": "cbtm-router", "version": STATE_VERSION, "vocabulary": self.embedder.vocabulary,
                "temperature": self.temperature, "top_k": self.top_k, "k": self.k, "svd_dim": self.embedder.dim}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], meta: dict) -> "ClusterRouter":
        if meta.get("kind") != "cbtm-router" or meta.get("version") != STATE_VERSION:
            raise ValueError(f"not a cbtm-router state of version {STATE_VERSION}: kind={meta.get('kind')!r}, "
                             f"version={meta.get('version')!r}")
        embedder = TfidfSvd(list(meta["vocabulary"]), tensors["idf"], tensors["svd_basis"])
        return cls(embedder, tensors["centroids"], float(meta["temperature"]), int(meta["top_k"]))
