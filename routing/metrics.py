"""How well unsupervised clusters recover known domains: purity, NMI, ARI, and the table."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(labels: list[str], clusters: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Sorted domain names and the (domains, k) count table of documents."""
    domains = sorted(set(labels))
    row = {d: i for i, d in enumerate(domains)}
    table = np.zeros((len(domains), k), dtype=np.int64)
    np.add.at(table, ([row[label] for label in labels], np.asarray(clusters)), 1)
    return domains, table


def purity(table: np.ndarray) -> float:
    """Share of documents that belong to their cluster's majority domain."""
    return float(table.max(axis=0).sum() / max(table.sum(), 1))


def clustering_scores(labels: list[str], clusters: np.ndarray, k: int) -> dict[str, float]:
    """purity, nmi and ari of cluster ids against domain labels."""
    _, table = contingency(labels, clusters, k)
    return {"purity": purity(table),
            "nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters))}


def dominant_domains(labels: list[str], clusters: np.ndarray, k: int) -> list[tuple[str | None, float]]:
    """(majority domain, its share) of each cluster; (None, 0.0) for an empty cluster."""
    domains, table = contingency(labels, clusters, k)
    out = []
    for j in range(k):
        total = table[:, j].sum()
        out.append((domains[table[:, j].argmax()], float(table[:, j].max() / total)) if total else (None, 0.0))
    return out
