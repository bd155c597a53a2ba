import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from routing.kmeans import balanced_assign, balanced_kmeans, nearest_centroid, pairwise_sq_dists


def blobs(n_per: int, k: int, d: int = 16, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize("n_per, k", [(8, 4), (250, 6), (2000, 8)])
def test_balanced_kmeans_recovers_equal_blobs(n_per, k):
    x, truth = blobs(n_per, k)
    centroids, assign = balanced_kmeans(x, k, seed=1)
    assert adjusted_rand_score(truth, assign) == pytest.approx(1.0)
    assert adjusted_rand_score(truth, nearest_centroid(x, centroids)) == pytest.approx(1.0)


def test_balanced_assignment_never_exceeds_capacity_even_for_skewed_data():
    # 90% of the points sit in one blob: unconstrained k-means would give it most points.
    x, _ = blobs(900, 1, seed=2)
    y, _ = blobs(100, 1, seed=3)
    pts = np.concatenate([x, y])
    centroids, assign = balanced_kmeans(pts, 4, seed=0)
    assert np.bincount(assign, minlength=4).max() <= math.ceil(len(pts) / 4)


def test_balanced_assign_prefers_points_with_most_regret():
    # Two points want cluster 0 (capacity 1); the one that would lose more goes there.
    dists = np.array([[0.0, 10.0], [0.0, 1.0]], dtype=np.float32)
    assert balanced_assign(dists, capacity=1).tolist() == [0, 1]


def test_pairwise_distances_match_numpy():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    expected = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(pairwise_sq_dists(x, c), expected, rtol=1e-4, atol=1e-4)


def test_fewer_points_than_clusters_is_a_clear_error():
    x, _ = blobs(1, 3)
    with pytest.raises(ValueError, match="cannot form 5 clusters from 3 documents"):
        balanced_kmeans(x, 5)


def test_balanced_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(100, 5, spread=1.0)
    a = balanced_kmeans(x, 5, seed=3)
    b = balanced_kmeans(x, 5, seed=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
