"""FLOPs per token, counted analytically from the shapes one forward pass actually uses,
and model FLOP utilisation against a measured peak (nanoGPT's estimate_mfu, generalised
to the hourglass, whose rows per token differ level by level)."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn

from experts.blocks import Attention


@torch.no_grad()
def forward_flops_per_token(model: nn.Module, seq_len: int | None = None, **forward_kwargs) -> float:
    """Matmul FLOPs of one forward pass divided by tokens: 2 * in * out per Linear row, and
    4 * d per (query, key) pair that attention computes (masked pairs excluded). forward_kwargs
    go to the forward (e.g. a composition's route=)."""
    seq_len = seq_len or model.config.block_size
    with _counting(model) as count:
        _forward_zeros(model, seq_len, **forward_kwargs)
    return count[0] / seq_len


@torch.no_grad()
def features_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """forward_flops_per_token of model.features(): every stage's state, no output head (what
    a composition runs of a frozen expert)."""
    seq_len = seq_len or model.config.block_size
    with _counting(model) as count:
        _forward_zeros(model.features, seq_len, model=model)
    return count[0] / seq_len


@torch.no_grad()
def flops_up_to_stages(model: nn.Module, seq_len: int | None = None) -> dict[str, float]:
    """{stage: forward FLOPs per token spent once that stage's output exists} for a model whose
    forward takes inject(name, h, visible) (the GPT and the hourglass): where a composition point
    sits, and so how much of the frozen model's backward a composition needs."""
    seq_len = seq_len or model.config.block_size
    marks: dict[str, float] = {}
    with _counting(model) as count:
        def mark(name, h, visible):
            marks[name] = count[0] / seq_len
            return h

        _forward_zeros(model, seq_len, inject=mark)
    return marks


@contextlib.contextmanager
def _counting(model: nn.Module):
    """Hooks that add each Linear's and Attention's matmul FLOPs to the yielded [total]."""
    total = [0.0]

    def linear_hook(module: nn.Linear, inputs, output):
        rows = inputs[0].numel() // module.in_features
        total[0] += 2.0 * rows * module.in_features * module.out_features

    def attention_hook(module: Attention, args, kwargs, output):
        x_q = args[0]
        x_kv = args[1] if len(args) > 1 and args[1] is not None else kwargs.get("x_kv")
        x_kv = x_q if x_kv is None else x_kv
        mask, causal = kwargs.get("mask"), kwargs.get("is_causal", False)
        B, Tq, C = x_q.shape
        Tk = x_kv.shape[1]
        if mask is not None:
            pairs = float(mask.expand(Tq, Tk).sum()) if mask.dim() == 2 else float(mask.sum()) / B
        elif causal:
            pairs = Tq * (Tq + 1) / 2
        else:
            pairs = Tq * Tk
        total[0] += 4.0 * C * pairs * B  # q.k^T and attn.v

    handles = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True)
                for m in model.modules() if isinstance(m, Attention)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def _forward_zeros(call, seq_len: int, model: nn.Module | None = None, **kwargs) -> None:
    """call(zeros (1, seq_len), **kwargs) with `model` (default: call itself) in eval mode."""
    model = model or call
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        call(torch.zeros(1, seq_len, dtype=torch.long, device=device), **kwargs)
    finally:
        model.train(was_training)


def train_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Forward + backward: three times the forward FLOPs."""
    return 3.0 * forward_flops_per_token(model, seq_len)


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 10,
                       device: str = "cpu") -> float:
    """FLOP/s of a large square matmul in `dtype`: the peak that MFU is measured against."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2.0 * n**3 * repeats / (time.perf_counter() - t0)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over peak FLOP/s."""
    return flops_per_token * tokens_per_s / peak_flops
