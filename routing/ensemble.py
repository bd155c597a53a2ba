"""cBTM ensembling: the mixture of the selected experts' next-token probabilities, weighted
by the router's weights for the context seen so far."""
from __future__ import annotations

import codecs

import numpy as np
import torch

from routing.embedding import PrefixEmbedding
from routing.router import ClusterRouter


def mixture_log_probs(expert_logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """log sum_e w_e softmax(logits_e): expert_logits E x (B, T, V), weights (B, T, E) -> (B, T, V).
    Experts with weight 0 contribute nothing (and need not have been run)."""
    log_p = torch.stack([torch.log_softmax(lg.float(), dim=-1) for lg in expert_logits], dim=-2)  # (B, T, E, V)
    log_w = torch.log(weights.float()).unsqueeze(-1)  # (B, T, E, 1); log 0 = -inf drops an expert
    return torch.logsumexp(log_p + log_w, dim=-2)


def byte_prefix_weights(router: ClusterRouter, data: bytes, top_k: int | None = None) -> np.ndarray:
    """(len(data), k) routing weights; row t routes the context data[:t+1] (the bytes the
    model has seen when it predicts byte t+1), using whole characters only."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, ends, chars = [], [], 0
    for t in range(len(data)):  # a character counts once all its bytes have been seen
        piece = decoder.decode(data[t:t + 1])
        pieces.append(piece)
        chars += len(piece)
        ends.append(chars)
    text = "".join(pieces) + decoder.decode(b"", final=True)
    return router.route_prefixes(text, ends, top_k)


def document_weights(router: ClusterRouter, doc: bytes, clusters: list[int], top_k: int) -> np.ndarray:
    """(len(doc), E) weights over the experts of `clusters` (their order): row j routes the
    context doc[:j] — the text before byte j, none for the first — kept to the top_k experts
    among those clusters and renormalised."""
    full = byte_prefix_weights(router, doc, top_k=router.k)  # (n, K): row t routes doc[:t+1]
    empty = router.route_prefix("", top_k=router.k)[None]  # (1, K)
    return restrict(np.concatenate([empty, full[:-1]]), clusters, top_k)


def window_weights(router: ClusterRouter, ids: np.ndarray, clusters: list[int], top_k: int) -> np.ndarray:
    """(T, E) weights for a window of token ids (generation): row j routes the bytes of the
    document up to and including ids[j]; a special token (a document separator) starts anew."""
    full = np.repeat(router.route_prefix("", top_k=router.k)[None], len(ids), axis=0)  # (T, K)
    start = 0
    for j in range(len(ids) + 1):
        if j == len(ids) or ids[j] >= 256:
            if j > start:
                full[start:j] = byte_prefix_weights(router, bytes(np.asarray(ids[start:j], dtype=np.uint8)),
                                                    top_k=router.k)
            start = j + 1
    return restrict(full, clusters, top_k)


def restrict(weights: np.ndarray, clusters: list[int], top_k: int) -> np.ndarray:
    """(n, K) router weights -> (n, E) over the experts of `clusters`, top_k kept, renormalised."""
    return keep_top_k(weights[:, clusters].astype(np.float64), top_k).astype(np.float32)


def keep_top_k(weights: np.ndarray, k: int) -> np.ndarray:
    """Zero all but each row's k largest weights and renormalise: (n, E) -> (n, E)."""
    k = min(k, weights.shape[1])
    drop = np.argsort(-weights, axis=1, kind="stable")[:, k:]
    kept = weights.copy()
    np.put_along_axis(kept, drop, 0.0, axis=1)
    return kept / np.maximum(kept.sum(axis=1, keepdims=True), 1e-30)


def prefix_router(router: ClusterRouter, clusters: list[int]) -> "PrefixRouter":
    """A callable idx (B, T) -> (B, T, E) top-1 weights over the experts of `clusters`, each row
    routed by the text of its window up to that position (a composition's router routing)."""
    return PrefixRouter(router, clusters)


class PrefixRouter:
    """window_weights for each row of a batch of windows, top 1; stream() routes a window as it
    grows, the same weights at O(1) a byte (incremental decoding)."""

    def __init__(self, router: ClusterRouter, clusters: list[int]):
        self.router, self.clusters = router, clusters

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        rows = [window_weights(self.router, row, self.clusters, 1) for row in idx.cpu().numpy()]
        return torch.from_numpy(np.stack(rows)).to(idx.device)  # (B, T, E)

    def stream(self, batch: int) -> "RouteStream":
        return RouteStream(self, batch)


class RouteStream:
    """The window weights of `batch` growing windows, a token at a time."""

    def __init__(self, prefix: PrefixRouter, batch: int):
        self.prefix = prefix
        self.empty = prefix.router.route_prefix("", top_k=prefix.router.k)  # (K,): no complete term yet
        self.rows = [self._document() for _ in range(batch)]

    def _document(self):
        return codecs.getincrementaldecoder("utf-8")(errors="replace"), PrefixEmbedding(self.prefix.router.embedder)

    def extend(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, n, E) weights of the next tokens idx (B, n) of each window."""
        router = self.prefix.router
        out = np.empty((idx.shape[0], idx.shape[1], router.k), dtype=np.float32)
        for b, row in enumerate(idx.cpu().numpy()):
            for j, token in enumerate(row):
                if token >= 256:  # a special token (a document separator): the next byte starts anew
                    self.rows[b] = self._document()
                    out[b, j] = self.empty
                    continue
                decoder, embedding = self.rows[b]
                h = embedding.push(decoder.decode(bytes([int(token)])))
                out[b, j] = router.weights(h[None], top_k=router.k)[0]
        weights = [restrict(w, self.prefix.clusters, 1) for w in out]
        return torch.from_numpy(np.stack(weights))  # (B, n, E)
