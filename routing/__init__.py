"""Routing: cBTM clustering (tf-idf -> SVD -> balanced k-means) and cBTM ensembling."""
from routing.ensemble import document_weights, keep_top_k, mixture_log_probs, prefix_router, window_weights
from routing.kmeans import balanced_kmeans
from routing.router import ClusterRouter

__all__ = ["ClusterRouter", "balanced_kmeans", "document_weights", "keep_top_k", "mixture_log_probs",
           "prefix_router", "window_weights"]
