"""Scoring held-out documents: per-byte log-probabilities, mixtures, routing statistics.

Every byte of every document is scored. A document is fed as [eos] + its bytes (the model
predicts the first byte from the separator it saw during training) in windows of the
block size that overlap: window w starts at w * stride, and each target is scored by the
first window whose part after its first (block - stride) positions contains it, so every
byte after the first window has at least block - stride bytes of context.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from experts.trainer import autocast_context


@dataclass
class Window:
    doc: int
    start: int  # first input position in the document's [eos] + bytes sequence
    first_scored: int  # index (into the window's targets) of the first target this window scores


def windows(lengths: list[int], seq_len: int, stride: int) -> list[Window]:
    """The windows that score each document of `lengths` bytes exactly once per byte."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be between 1 and the block size {seq_len}, got {stride}")
    out = []
    for d, n in enumerate(lengths):  # inputs: n + 1 positions ([eos] + bytes), targets: n bytes
        start = 0
        out.append(Window(d, 0, 0))
        while start + seq_len < n:
            start += stride
            out.append(Window(d, start, seq_len - stride))
    return out


@dataclass
class Scores:
    log_probs: list[np.ndarray]  # per document: (n_bytes,) natural-log probability of each byte
    top1_counts: np.ndarray | None  # (n_docs, n_experts): routed rows whose top-1 is each expert
    experts_per_row: float | None  # mean number of experts with nonzero weight per routed row
    choices: list[np.ndarray] | None  # per document: (n_bytes,) expert weighted most for each byte, -1: none
    seconds: float
    tokens: int  # targets scored


@dataclass(frozen=True)
class Scoring:
    """How documents are scored, the same wherever a model is scored (evaluate, compose's
    validation, extend, serving): windows of the model's block size moving by `stride` (None:
    half the block), `batch_size` windows at once, each document after an `eos_id`."""

    eos_id: int
    stride: int | None = None
    batch_size: int = 8

    def score(self, model: torch.nn.Module, docs: list[np.ndarray], n_experts: int | None = None,
              route_weights: list[np.ndarray] | None = None) -> "Scores":
        return score_documents(model, docs, self.eos_id, model.config.block_size, self.stride, self.batch_size,
                               n_experts=n_experts, route_weights=route_weights)


@torch.no_grad()
def score_documents(model: torch.nn.Module, docs: list[np.ndarray], eos_id: int, seq_len: int,
                    stride: int | None = None, batch_size: int = 8, n_experts: int | None = None,
                    precision: str = "auto", route_weights: list[np.ndarray] | None = None) -> Scores:
    """Per-byte log-probabilities of each document (uint8/int token arrays without separators).
    A model that records routing (`record_routing`) also yields which experts its rows chose.
    route_weights: per document (n_bytes, E) weights of an outside router, row j for the input
    that predicts byte j, passed to the model as `route=`."""
    stride = stride or seq_len // 2
    lengths = [len(d) for d in docs]
    if not docs or min(lengths) < 1:
        raise ValueError("every document to score needs at least one byte")
    inputs = [np.concatenate([[eos_id], np.asarray(d, dtype=np.int64)]) for d in docs]  # (n + 1,) each
    out = [np.zeros(n, dtype=np.float64) for n in lengths]
    counts = np.zeros((len(docs), n_experts), dtype=np.int64) if n_experts else None
    choices = [np.full(n, -1, dtype=np.int16) for n in lengths] if n_experts else None
    used, rows = 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    todo = windows(lengths, seq_len, stride)
    began, scored = time.perf_counter(), 0
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        x = np.zeros((len(chunk), seq_len), dtype=np.int64)
        y = np.full((len(chunk), seq_len), -1, dtype=np.int64)
        route = np.zeros((len(chunk), seq_len, route_weights[0].shape[1]), np.float32) if route_weights else None
        for i, w in enumerate(chunk):
            seq = inputs[w.doc][w.start:w.start + seq_len + 1]
            x[i, :len(seq) - 1], y[i, :len(seq) - 1] = seq[:-1], seq[1:]
            if route is not None:
                route[i, :len(seq) - 1] = route_weights[w.doc][w.start:w.start + len(seq) - 1]
        kwargs = {"route": torch.from_numpy(route).to(device)} if route is not None else {}
        with autocast_context(device, precision):  # bf16 where the CPU/GPU has it (as in training)
            logits, _ = model(torch.from_numpy(x).to(device), **kwargs)
        logp = -F.cross_entropy(logits.float().transpose(1, 2), torch.from_numpy(y).clamp(min=0).to(device),
                                reduction="none").cpu().numpy()  # (B, T)
        recorded = getattr(model, "last_routing", None) if getattr(model, "record_routing", False) else None
        track = choices is not None and bool(recorded)
        chosen = model.routed_experts().numpy() if track else None  # (B, T)
        for i, w in enumerate(chunk):
            t = np.arange(w.first_scored, seq_len)
            t = t[y[i, t] >= 0]
            out[w.doc][w.start + t] = logp[i, t]
            if track:
                choices[w.doc][w.start + t] = chosen[i, t]
            scored += len(t)
        visible = getattr(model, "last_visible", {})
        for point, weights in (recorded or {}).items():  # (B, R, E) per point, of this batch's forward
            # only rows at positions this window scores: not padding, not the overlap scored before
            pos = visible[point].cpu().numpy()  # (R,)
            top = weights.float().argmax(-1).cpu().numpy()  # (B, R)
            nonzero = (weights > 0).cpu().numpy()  # (B, R, E)
            for i, w in enumerate(chunk):
                keep = (pos >= w.first_scored) & (pos < (y[i] >= 0).sum())
                used += float(nonzero[i, keep].sum())
                rows += int(keep.sum())
                if counts is not None:  # a row routed nowhere (weight 0 everywhere) has no top-1
                    routed = keep & nonzero[i].any(-1)
                    counts[w.doc] += np.bincount(top[i][routed], minlength=n_experts)
    model.train(was_training)
    return Scores(out, counts, used / rows if rows else None, choices, time.perf_counter() - began, scored)


def stream_documents(tokens: np.ndarray, eos: int, max_tokens: int, chunk: int = 1 << 20) -> list[np.ndarray]:
    """Whole documents of a token stream (each ends at `eos`), in order, up to about max_tokens;
    the stream is scanned `chunk` tokens at a time, and no further than those documents."""
    docs, start, total = [], 0, 0
    for offset in range(0, len(tokens), chunk):
        for end in np.flatnonzero(np.asarray(tokens[offset:offset + chunk]) == eos) + offset:
            if end > start:
                docs.append(np.asarray(tokens[start:end]))
                total += end - start
            start = end + 1
            if total >= max_tokens:
                return docs
    return docs


def bits_per_byte(log_probs: list[np.ndarray]) -> float:
    """Total negative log-likelihood in bits over the number of bytes."""
    n = sum(len(lp) for lp in log_probs)
    return -sum(float(lp.sum()) for lp in log_probs) / math.log(2) / max(n, 1)


def mixture(expert_log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log sum_e w_e p_e(byte): expert_log_probs (E, n), weights (n, E) -> (n,). Weight 0 drops an expert."""
    with np.errstate(divide="ignore"):
        log_w = np.log(weights.T.astype(np.float64))  # (E, n)
    joint = expert_log_probs + log_w
    top = joint.max(axis=0)
    return top + np.log(np.exp(joint - top).sum(axis=0))

