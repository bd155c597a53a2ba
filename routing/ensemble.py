"""cBTM ensembling: the mixture of the selected experts' next-token probabilities, weighted
by the router's weights for the context seen so far."""
from __future__ import annotations

import codecs

import numpy as np
import torch

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
