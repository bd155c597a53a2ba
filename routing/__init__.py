"""Routing: cBTM clustering (tf-idf -> SVD -> balanced k-means) and cBTM ensembling.

The ensembling functions (torch) are imported when first used, so that a process that only
clusters text (the cluster stage's shard tasks) does not load torch."""
from routing.kmeans import balanced_kmeans
from routing.router import ClusterRouter

__all__ = ["ClusterRouter", "balanced_kmeans", "document_weights", "keep_top_k", "mixture_log_probs",
           "prefix_router", "window_weights"]
_ENSEMBLE = {"document_weights", "keep_top_k", "mixture_log_probs", "prefix_router", "window_weights"}


def __getattr__(name: str):
    if name in _ENSEMBLE:
        from routing import ensemble

        return getattr(ensemble, name)
    raise AttributeError(f"module 'routing' has no attribute {name!r}")
