"""What a composition adds between frozen models: the glue blocks through which the central
model reads an expert's states (CALM's cross-attention, the aligned read, both) and the
output gate of a composition point in output space. Each starts as the identity (zero
output projection) or at a neutral value (gate 0.5)."""
from __future__ import annotations

import torch
import torch.nn as nn

from experts.blocks import Attention, RMSNorm
from experts.cache import KVCache, StageRows

GLUES = ("attention", "aligned", "both")  # what a block reads of its expert: see make_block


class CrossAttentionBlock(nn.Module):
    """Central rows attend to projected expert rows they may see (visible_e <= visible_c);
    a learned null key lets rows that see no expert row yet attend to nothing."""

    def __init__(self, d_c: int, d_e: int, n_head: int):
        super().__init__()
        self.kv_proj = nn.Linear(d_e, d_c, bias=False)
        self.ln_q, self.ln_kv = RMSNorm(d_c), RMSNorm(d_c)
        self.null = nn.Parameter(torch.zeros(1, 1, d_c))
        self.attn = Attention(d_c, n_head, d_kv=d_c)
        nn.init.normal_(self.kv_proj.weight, std=0.02)
        nn.init.zeros_(self.attn.proj.weight)  # OutProj = 0: the block starts as the identity

    def forward(self, h: torch.Tensor, visible_c: torch.Tensor, z: torch.Tensor,
                visible_e: torch.Tensor) -> torch.Tensor:
        B = h.shape[0]
        kv = torch.cat([self.null.expand(B, 1, -1).to(z.dtype), self.kv_proj(z.to(h.dtype))], dim=1)  # (B, 1+T_e, d_c)
        mask = visible_e[None, :] <= visible_c[:, None]  # (T_c, T_e)
        null = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)  # always visible
        mask = torch.cat([null, mask], dim=1)  # (T_c, 1 + T_e); T_e may be 0 (input shorter than a group)
        return self.attn(self.ln_q(h), self.ln_kv(kv), mask=mask)

    def extend(self, h: torch.Tensor, visible_c: torch.Tensor, rows: StageRows, cache: KVCache) -> torch.Tensor:
        """forward() for the newest central rows h (incremental decoding), reading all of the
        expert's rows so far (rows: final, then provisional); cache keeps the keys and values of
        the null row and the final expert rows, so each expert row is projected once when final."""
        B = h.shape[0]
        if cache.n == 0:
            cache.extend(*self.attn.project_kv(self.ln_kv(self.null.expand(B, 1, -1).to(h.dtype))))
            cache.commit()
        z, visible_e = rows.rows()
        new = z[:, cache.n - 1:]  # (B, m, d_e): rows final since the last call, then provisional ones
        mask = visible_e[None, :] <= visible_c[:, None]  # (T_c, T_e)
        mask = torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        out = self.attn(self.ln_q(h), self.ln_kv(self.kv_proj(new.to(h.dtype))), mask=mask, cache=cache)
        cache.commit(rows.n + 1 - cache.n)  # keep the final rows' keys and values only
        return out


class AlignedBlock(nn.Module):
    """The expert's state at the aligned position, projected into the central's width:

        a_t = W RMSNorm(z_{r(t)}),   r(t) = the newest expert row that central row t may see

    (visible_e[r] <= visible_c[t]; zero where the expert has no such row yet). Paired with the
    expert's decoder1, r(t) is the expert's own prediction state for the byte after t: the
    source of its advantage, which content-only cross-attention blurs into a prefix average.
    One matmul a row (2 d_e d_c FLOPs), no attention. W starts at zero: the identity."""

    def __init__(self, d_c: int, d_e: int):
        super().__init__()
        self.ln = RMSNorm(d_e)
        self.proj = nn.Linear(d_e, d_c, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, h: torch.Tensor, visible_c: torch.Tensor, z: torch.Tensor,
                visible_e: torch.Tensor) -> torch.Tensor:
        row = torch.searchsorted(visible_e.contiguous(), visible_c.contiguous(), right=True) - 1  # (T_c,); -1: none
        if z.shape[1] == 0:  # input shorter than the expert's group: nothing to read yet
            return h.new_zeros(h.shape)
        picked = z[:, row.clamp(min=0)].to(h.dtype)  # (B, T_c, d_e)
        return self.proj(self.ln(picked)) * (row >= 0).to(h.dtype).view(1, -1, 1)

    def extend(self, h: torch.Tensor, visible_c: torch.Tensor, rows: StageRows, cache: KVCache) -> torch.Tensor:
        """forward() for the newest central rows (incremental decoding): one row read, nothing kept."""
        return self(h, visible_c, *rows.rows())


class GlueBlock(nn.Module):
    """Cross-attention and the aligned read side by side, summed (glue "both")."""

    def __init__(self, d_c: int, d_e: int, n_head: int):
        super().__init__()
        self.attention = CrossAttentionBlock(d_c, d_e, n_head)
        self.aligned = AlignedBlock(d_c, d_e)

    def forward(self, h, visible_c, z, visible_e):
        return self.attention(h, visible_c, z, visible_e) + self.aligned(h, visible_c, z, visible_e)

    def extend(self, h, visible_c, rows: StageRows, cache: KVCache):
        return self.attention.extend(h, visible_c, rows, cache) + self.aligned.extend(h, visible_c, rows, cache)


class OutputGate(nn.Module):
    """How much of an expert's own next-byte distribution position t takes, from the composed
    central model's final state h_t and the expert's z_t (both causal: they see inputs <= t):

        g_t = sigmoid(w . [RMSNorm(h_t); RMSNorm(z_t)] + b)

    d_c + d_e + 1 parameters, zero-initialised: every gate starts at 0.5."""

    def __init__(self, d_c: int, d_e: int):
        super().__init__()
        self.ln_c, self.ln_e = RMSNorm(d_c, affine=False), RMSNorm(d_e, affine=False)
        self.proj = nn.Linear(d_c + d_e, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.ln_c(h), self.ln_e(z.to(h.dtype))], dim=-1)  # (B, T, d_c + d_e)
        return torch.sigmoid(self.proj(x).float()).squeeze(-1)  # (B, T)


def make_block(glue: str, d_c: int, d_e: int, n_head: int) -> nn.Module:
    """attention: CALM's cross-attention into every expert row the central row may see;
    aligned: only the expert's state at the aligned position (AlignedBlock); both: their sum."""
    if glue == "attention":
        return CrossAttentionBlock(d_c, d_e, n_head)
    if glue == "aligned":
        return AlignedBlock(d_c, d_e)
    if glue == "both":
        return GlueBlock(d_c, d_e, n_head)
    raise ValueError(f"glue must be one of {GLUES}, got {glue!r}")
