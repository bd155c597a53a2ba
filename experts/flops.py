"""FLOPs per token, counted analytically from the shapes one forward pass actually uses,
and model FLOP utilisation against a measured peak (nanoGPT's estimate_mfu, generalised
to the hourglass, whose rows per token differ level by level)."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from experts.blocks import Attention


@torch.no_grad()
def forward_flops_per_token(model: nn.Module, seq_len: int | None = None) -> float:
    """Matmul FLOPs of one forward pass divided by tokens: 2 * in * out per Linear row, and
    4 * d per (query, key) pair that attention computes (masked pairs excluded)."""
    seq_len = seq_len or model.config.block_size
    total = 0.0

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        rows = inputs[0].numel() // module.in_features
        total += 2.0 * rows * module.in_features * module.out_features

    def attention_hook(module: Attention, args, kwargs, output):
        nonlocal total
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
        total += 4.0 * C * pairs * B  # q.k^T and attn.v

    handles = [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True)
                for m in model.modules() if isinstance(m, Attention)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total / seq_len


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
