"""Balanced k-means (cBTM): Lloyd iterations whose assignment step respects a capacity.

faiss does the distance work. Memory is O(N * (d + k)): the (N, k) distance table, never
an (N, k, d) tensor.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
import scipy.sparse as sp


def pairwise_sq_dists(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, k) squared L2 distances of every point to every centroid (faiss, exact)."""
    k = centroids.shape[0]
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)  # sorted per row
    out = np.empty_like(dist)
    np.put_along_axis(out, idx, dist, axis=1)
    return out


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each point (N,)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


def balanced_assign(dists: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each point to a cluster, at most `capacity` points per cluster.

    Regret-ordered greedy, in rounds: every unassigned point proposes to its nearest
    cluster that still has room; a cluster accepts the proposals with the largest regret
    (distance to the second choice minus the first) up to its remaining room. Each round
    fills a cluster or assigns everyone, so there are at most k rounds.
    """
    n, k = dists.shape
    if capacity * k < n:
        raise ValueError(f"capacity {capacity} x {k} clusters cannot hold {n} points")
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        d = dists[todo].copy()
        d[:, room == 0] = np.inf
        order = np.argsort(d, axis=1)
        first = order[:, 0]
        d_first = np.take_along_axis(d, order[:, :1], axis=1)[:, 0]
        d_second = np.take_along_axis(d, order[:, 1:2], axis=1)[:, 0] if k > 1 else d_first
        regret = np.where(np.isfinite(d_second), d_second - d_first, np.inf)
        # Sort proposals by cluster, then by descending regret; accept the first `room` of each.
        ranked = np.lexsort((-regret, first))
        clusters = first[ranked]
        starts = np.searchsorted(clusters, np.arange(k))
        rank_in_cluster = np.arange(len(ranked)) - starts[clusters]
        accepted = ranked[rank_in_cluster < room[clusters]]
        assign[todo[accepted]] = first[accepted]
        room -= np.bincount(first[accepted], minlength=k)
        todo = todo[assign[todo] == -1]
    return assign


def balanced_kmeans(x: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, d) and balanced assignment (N,) of points x (N, d).

    Initialised with faiss k-means (on all points: `max_points_per_centroid` is raised so
    faiss does not silently subsample to 256 * k), then Lloyd iterations with a balanced
    assignment step (capacity ceil(N / k)) and a mean centroid step.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if n < k:
        raise ValueError(f"cannot form {k} clusters from {n} documents; use k <= {n} or a larger corpus")
    init = faiss.Kmeans(d, k, niter=20, seed=seed, max_points_per_centroid=max(256, math.ceil(n / k)),
                        min_points_per_centroid=1, verbose=False)
    init.train(x)
    centroids = init.centroids.copy()
    capacity = math.ceil(n / k)
    assign = balanced_assign(pairwise_sq_dists(x, centroids), capacity)
    for _ in range(iterations):
        centroids = cluster_means(x, assign, k, previous=centroids)
        new = balanced_assign(pairwise_sq_dists(x, centroids), capacity)
        if np.array_equal(new, assign):
            break
        assign = new
    return centroids, assign


def cluster_means(x: np.ndarray, assign: np.ndarray, k: int, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster's points; a cluster left empty keeps its previous centroid."""
    n = len(assign)
    onehot = sp.csr_matrix((np.ones(n), (assign, np.arange(n))), shape=(k, n))  # (k, N)
    sums = onehot @ x.astype(np.float64)  # (k, d)
    counts = np.bincount(assign, minlength=k)
    means = previous.astype(np.float64).copy()
    filled = counts > 0
    means[filled] = sums[filled] / counts[filled, None]
    return means.astype(np.float32)
