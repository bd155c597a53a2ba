"""The vanilla GPT baseline, built from the same blocks as the hourglass (no compression)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts.blocks import Block, RMSNorm
from experts.cache import DecodeCache
from experts.generation import generate
from experts.tokenizer import VOCAB_SIZE


@dataclass
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 512
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 192
    dropout: float = 0.0
    mlp: str = "gelu"  # gelu | swiglu

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"invalid GPT config (n_embd, n_head): n_embd {self.n_embd} must be divisible "
                             f"by n_head {self.n_head}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"invalid GPT config (mlp): expected 'gelu' or 'swiglu', got {self.mlp!r}")
        if min(self.n_layer, self.block_size, self.vocab_size) < 1:
            raise ValueError("invalid GPT config (n_layer, block_size, vocab_size): all must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"invalid GPT config (dropout): must be in [0, 1), got {self.dropout}")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, mlp=cfg.mlp, dropout=cfg.dropout)
                                    for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def stage_names(self) -> list[str]:
        """Names of the states features() returns and inject() sees, in depth order."""
        return ["embed"] + [f"layer{i + 1}" for i in range(self.config.n_layer)]

    def _run(self, idx: torch.Tensor, collect: bool = False, inject=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; crop the input "
                             f"(generate() keeps the last block_size tokens)")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        feats = [("embed", x)] if collect else None
        visible = torch.arange(T, device=idx.device)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if inject is not None:
                x = inject(f"layer{i + 1}", x, visible)
            if collect:
                feats.append((f"layer{i + 1}", x))
        return x, feats

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, inject=None):
        """inject(name, h (B, R, C), visible (R,)) -> h may rewrite a stage's output (composition)."""
        x, _ = self._run(idx, inject=inject)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def features(self, idx: torch.Tensor) -> list[dict]:
        """[{name, h (B, T, C), visible (T,)}] after the embedding and each block."""
        _, feats = self._run(idx, collect=True)
        visible = torch.arange(idx.shape[1], device=idx.device)
        return [{"name": name, "h": h, "visible": visible} for name, h in feats]

    @torch.no_grad()
    def extend(self, idx: torch.Tensor, cache: DecodeCache, inject=None) -> torch.Tensor:
        """Incremental decoding: feed the next tokens idx (B, n) after the cache's and return their
        logits (B, n, V), as forward() over the whole sequence would; every row is final at once."""
        B, T = idx.shape
        start = cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}; start a new "
                             "cache on the last block_size tokens")
        cache.final = True
        visible = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(visible)  # (B, T, C)
        cache.record("embed", x, visible)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache.layer(f"blocks.{i}"))
            if inject is not None:
                x = inject(f"layer{i + 1}", x, visible)
            cache.record(f"layer{i + 1}", x, visible)
        cache.commit()
        cache.length += T
        return self.lm_head(self.ln_f(x))

    def new_cache(self, keep_states: bool = False) -> DecodeCache:
        return DecodeCache(keep_states)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        return generate(self, idx, max_new_tokens, temperature, top_k)

    def config_dict(self) -> dict:
        return {"arch": "gpt", **asdict(self.config)}
