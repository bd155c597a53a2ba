"""The hourglass expert: a causal byte-level LM that compresses the sequence level by level.

Example (T = 256, G = 32, latents = [16, 4], widths = [64, 128, 256]):

    embed     (B, 256, 64)                                        skip 0
    encoder 1 (B, 8, 32, 64)  -> (B, 8, 16, 128)  local + global  skip 1
    encoder 2 (B, 8, 16, 128) -> (B, 8, 4, 256)   local + global
    latent    (B, 32, 256)                        global layers (most parameters and FLOPs)
    decoder 2 (B, 8, 4, 256)  -> (B, 8, 16, 128)  upsample, project, + skip 1, local + global
    decoder 1 (B, 8, 16, 128) -> (B, 8, 32, 64)   upsample, project, + skip 0, local + global
    head      (B, 256, V)

Causality rests on one invariant: row r of a group g at level l (R_l rows a group) may
depend only on inputs up to its `visible` position g*G + (G - R_l) + r. Compressors,
upsamplers and attention masks all respect it; `features()` returns it with each state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts.blocks import MLP, Attention, Block, RMSNorm
from experts.cache import DecodeCache
from experts.generation import generate
from experts.tokenizer import VOCAB_SIZE


@dataclass
class HourglassConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 512
    group_len: int = 32  # G: tokens per group, anchored at position 0
    latents: list[int] = field(default_factory=lambda: [16, 4])  # K_l: latents per group at each level
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # one more than levels
    n_head: int = 4
    n_local: int = 1  # layers within a group, per encoder and decoder level
    n_global: int = 1  # layers over the whole sequence, per encoder and decoder level
    n_latent_layers: int = 4
    compressor: str = "perceiver"  # perceiver | transformer
    upsample: str = "repeat"  # repeat | attn
    interleave: bool = False  # local/global layers alternate (True) or all local first (False)
    denseformer: bool = False  # depth-weighted averaging in the latent stage
    latent_loss: float = 0.0  # weight of the next-latent cosine prediction loss
    dropout: float = 0.0
    mlp: str = "gelu"  # gelu | swiglu

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(keys: str, why: str):
            raise ValueError(f"invalid hourglass config ({keys}): {why}")

        if len(self.widths) != len(self.latents) + 1:
            bad("widths, latents", f"widths needs one entry more than latents, got {self.widths} and {self.latents}")
        if not self.latents:
            bad("latents", "at least one compression level is needed, e.g. [16, 4]")
        rows = self.group_len
        for level, k in enumerate(self.latents, 1):
            if not 1 <= k <= rows:
                bad("latents, group_len", f"level {level} has {k} latents per group but its groups have {rows} rows; "
                                          "each level needs 1 <= latents <= rows of the level below")
            rows = k
        if self.block_size % self.group_len:
            bad("block_size, group_len", f"block_size {self.block_size} must be a multiple of group_len {self.group_len}")
        for w in self.widths:
            if w % self.n_head:
                bad("widths, n_head", f"every width must be divisible by n_head={self.n_head}, got {self.widths}")
        choices = {"compressor": ("perceiver", "transformer"), "upsample": ("repeat", "attn"), "mlp": ("gelu", "swiglu")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                bad(key, f"expected one of {valid}, got {getattr(self, key)!r}")
        if self.denseformer and self.n_latent_layers < 1:
            bad("denseformer, n_latent_layers", "DenseFormer averages latent layers; set n_latent_layers >= 1")
        if self.latent_loss < 0:
            bad("latent_loss", f"must be >= 0, got {self.latent_loss}")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if min(self.n_local, self.n_global, self.n_latent_layers, self.n_head, self.vocab_size) < 0:
            bad("n_local, n_global, n_latent_layers", "layer counts must be >= 0")


def level_visible(n_groups: int, rows: int, group_len: int, device=None) -> torch.Tensor:
    """(n_groups * rows,) last input position each row of a level may depend on."""
    g = torch.arange(n_groups, device=device)[:, None]
    r = torch.arange(rows, device=device)[None, :]
    return (g * group_len + (group_len - rows) + r).reshape(-1)


def layer_order(n_local: int, n_global: int, interleave: bool) -> list[str]:
    """['local', ..., 'global', ...] or, interleaved, ['local', 'global', 'local', ...]."""
    if not interleave:
        return ["local"] * n_local + ["global"] * n_global
    order = []
    for i in range(max(n_local, n_global)):
        order += ["local"] * (i < n_local) + ["global"] * (i < n_global)
    return order


class LevelStack(nn.Module):
    """Local layers (causal within a group) and global layers (causal over all rows)."""

    def __init__(self, dim: int, cfg: HourglassConfig):
        super().__init__()
        self.kinds = kinds = layer_order(cfg.n_local, cfg.n_global, cfg.interleave)
        self.blocks = nn.ModuleList(Block(dim, cfg.n_head, mlp=cfg.mlp, dropout=cfg.dropout) for _ in kinds)

    def forward(self, h: torch.Tensor, cache=None, name: str = "") -> torch.Tensor:
        """cache: incremental decoding of one group (n = 1): global layers attend to the final
        rows of the groups before it too (cache.layer(f"{name}.{i}"))."""
        B, n, R, C = h.shape
        for i, (kind, block) in enumerate(zip(self.kinds, self.blocks)):
            if kind == "local":
                h = block(h.reshape(B * n, R, C)).view(B, n, R, C)
            else:
                past = None if cache is None else cache.layer(f"{name}.{i}")
                h = block(h.reshape(B, n * R, C), cache=past).view(B, n, R, C)
        return h


class PerceiverCompressor(nn.Module):
    """K latents per group: queries from the group's last K rows, keys/values all G rows,
    latent r sees group rows 0 .. G-K+r (a bottom-right aligned mask)."""

    def __init__(self, d_in: int, d_out: int, rows: int, k: int, cfg: HourglassConfig):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(d_in, d_out, bias=False)
        self.ln_q, self.ln_kv, self.ln_2 = RMSNorm(d_out), RMSNorm(d_in), RMSNorm(d_out)
        self.attn = Attention(d_out, cfg.n_head, d_kv=d_in, dropout=cfg.dropout)
        self.mlp = MLP(d_out, 4 * d_out, cfg.mlp, cfg.dropout)
        r, i = torch.arange(k)[:, None], torch.arange(rows)[None, :]
        self.register_buffer("mask", i <= rows - k + r, persistent=False)  # (K, G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, G, _ = x.shape
        xf = x.reshape(B * n, G, -1)
        z = self.proj(xf[:, G - self.k:])  # (B*n, K, d_out)
        z = z + self.attn(self.ln_q(z), self.ln_kv(xf), mask=self.mask)
        z = z + self.mlp(self.ln_2(z))
        return z.view(B, n, self.k, -1)


class TransformerCompressor(nn.Module):
    """Causal layer over the group's rows, keep the last K, project to the next width."""

    def __init__(self, d_in: int, d_out: int, rows: int, k: int, cfg: HourglassConfig):
        super().__init__()
        self.k = k
        self.block = Block(d_in, cfg.n_head, mlp=cfg.mlp, dropout=cfg.dropout)
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, G, C = x.shape
        h = self.block(x.reshape(B * n, G, C))[:, G - self.k:]  # (B*n, K, C)
        return self.proj(h).view(B, n, self.k, -1)


class Upsampler(nn.Module):
    """K latents a group -> R rows a group. Row j takes its own group's latent j-(R-K) when
    j >= R-K (the latent aligned to it), else a latent of the previous group; group 0 uses
    learned start latents. 'attn' adds attention of every row to all latents it may see."""

    def __init__(self, d_in: int, d_out: int, k: int, rows: int, cfg: HourglassConfig):
        super().__init__()
        self.k, self.rows, self.group_len = k, rows, cfg.group_len
        self.start = nn.Parameter(torch.randn(k, d_in) * 0.02)  # latents of "group -1"
        self.ln, self.ln_skip = RMSNorm(d_in), RMSNorm(d_out)
        self.proj = nn.Linear(d_in, d_out, bias=False)  # zero-initialised by HourglassLM
        j = torch.arange(rows)
        early = rows - k
        own = j >= early
        prev_idx = (j * k) // max(early, 1)  # spread the previous group's latents over the early rows
        self.register_buffer("group_offset", own.long(), persistent=False)  # 1: own group, 0: previous
        self.register_buffer("latent_index", torch.where(own, j - early, prev_idx.clamp(max=k - 1)), persistent=False)
        self.attn = None
        if cfg.upsample == "attn":
            self.ln_q, self.ln_kv = RMSNorm(d_out), RMSNorm(d_out)
            self.attn = Attention(d_out, cfg.n_head, d_kv=d_out, dropout=cfg.dropout)

    def forward(self, h: torch.Tensor, skip: torch.Tensor, pos: torch.Tensor, prev: torch.Tensor | None = None,
                group: int = 0, cache=None) -> torch.Tensor:
        """Incremental decoding of one group (n = 1, index `group`): prev, the latents of the group
        before (None: the start latents); cache, the KVCache of the latents before (upsample attn)."""
        B, n, K, C = h.shape
        first = self.start.expand(B, 1, K, C).to(h.dtype) if prev is None else prev
        hp = torch.cat([first, h], dim=1)  # (B, n+1, K, C)
        groups = torch.arange(n, device=h.device)[:, None] + self.group_offset[None, :]  # (n, R)
        up = hp[:, groups, self.latent_index[None, :].expand(n, -1)]  # (B, n, R, C)
        # The skip comes in before the level's layers, normalised like the latents so that
        # neither drowns the other (a raw token embedding has rms 0.02, the latent stream ~1).
        x = self.proj(self.ln(up)) + pos + self.ln_skip(skip)
        if self.attn is not None:
            kv = self.proj(self.ln(hp)).view(B, (n + 1) * K, -1)
            v_out = level_visible(n, self.rows, self.group_len, h.device) + group * self.group_len
            v_in = level_visible(group + n + 1, K, self.group_len, h.device) - self.group_len  # start latents: -1
            if cache is not None and group > 0:  # the start's and earlier groups' latents are cached
                kv = kv[:, K:]
            mask = v_in[None, :] <= v_out[:, None]  # (n*R, (n+1)*K), or all latents up to this group's
            q = x.reshape(B, n * self.rows, -1)
            x = x + self.attn(self.ln_q(q), self.ln_kv(kv), mask=mask, cache=cache).view_as(x)
        return x


class LatentStack(nn.Module):
    """Global layers over the latents, optionally DenseFormer-averaged."""

    def __init__(self, dim: int, cfg: HourglassConfig):
        super().__init__()
        layers = [Block(dim, cfg.n_head, mlp=cfg.mlp, dropout=cfg.dropout) for _ in range(cfg.n_latent_layers)]
        self.layers = nn.ModuleList(layers)
        # DenseFormer: after layer i, x = sum_j alpha_ij X_j over the input and all layer outputs so
        # far; alpha starts one-hot on the newest output, so at init the stack is a plain one.
        self.alphas = nn.ParameterList(
            nn.Parameter(F.one_hot(torch.tensor(i + 1), i + 2).float()) for i in range(len(layers))
        ) if cfg.denseformer else None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """cache: incremental decoding (each layer's keys and values in cache.layer(f"latent.{i}"))."""
        history = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if cache is None else cache.layer(f"latent.{i}"))
            if self.alphas is not None:
                history.append(x)
                x = torch.einsum("j,j...->...", self.alphas[i].to(x.dtype), torch.stack(history))
        return x


class HourglassLM(nn.Module):
    def __init__(self, config: HourglassConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        d = cfg.widths
        self.rows = [cfg.group_len, *cfg.latents]  # R_l: rows per group at level l
        self.wte = nn.Embedding(cfg.vocab_size, d[0])
        self.wpe = nn.Embedding(cfg.block_size, d[0])
        # within-group position table of each level, shared by its encoder and decoder
        self.pos = nn.ParameterList(nn.Parameter(torch.randn(r, w) * 0.02) for r, w in zip(self.rows, d))
        Compressor = PerceiverCompressor if cfg.compressor == "perceiver" else TransformerCompressor
        levels = range(1, len(d))
        self.compress = nn.ModuleList(Compressor(d[l - 1], d[l], self.rows[l - 1], self.rows[l], cfg) for l in levels)
        self.enc = nn.ModuleList(LevelStack(d[l], cfg) for l in levels)
        self.latent = LatentStack(d[-1], cfg)
        self.up = nn.ModuleList(Upsampler(d[l], d[l - 1], self.rows[l], self.rows[l - 1], cfg) for l in levels)
        self.dec = nn.ModuleList(LevelStack(d[l - 1], cfg) for l in levels)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_f = RMSNorm(d[0])
        self.lm_head = nn.Linear(d[0], cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.predict_latent = nn.Linear(d[-1], d[-1], bias=False) if cfg.latent_loss > 0 else None
        self.latent_loss_scale = 1.0  # the trainer warms the latent loss up through this
        self.apply(_init_weights)
        for up in self.up:
            # The decoder starts from the skip alone; the latents' share grows as they become useful.
            # (Measured: with a raw skip and no zero-init, training sat near the unigram loss.)
            nn.init.zeros_(up.proj.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def stage_names(self) -> list[str]:
        """Names of the states features() returns and inject() sees, in depth order."""
        levels = range(1, len(self.rows))
        return (["embed"] + [f"encoder{l}" for l in levels] + ["latent"]
                + [f"decoder{l}" for l in reversed(levels)])

    def _inject(self, inject, name: str, h: torch.Tensor) -> torch.Tensor:
        """Let a composition rewrite the stage output h (B, n, R, C), seen flattened with `visible`."""
        if inject is None:
            return h
        B, n, R, C = h.shape
        visible = level_visible(n, R, self.config.group_len, h.device)
        return inject(name, h.reshape(B, n * R, C), visible).view(B, n, R, C)

    def _run(self, idx: torch.Tensor, collect: bool = False, inject=None):
        B, T = idx.shape
        cfg, G = self.config, self.config.group_len
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}; crop the input "
                             f"(generate() keeps the last block_size tokens)")
        n = math.ceil(T / G)
        pad = n * G - T  # right-pad to whole groups; causality keeps padding out of real outputs
        idx = F.pad(idx, (0, pad))
        x = self.wte(idx) + self.wpe(torch.arange(n * G, device=idx.device))
        h = self.drop(x.view(B, n, G, -1) + self.pos[0])  # (B, n, G, d0)
        feats = [("embed", h)] if collect else None
        skips = [h]
        for l, (compress, enc) in enumerate(zip(self.compress, self.enc), 1):
            h = self._inject(inject, f"encoder{l}", enc(compress(h) + self.pos[l]))  # (B, n, K_l, d_l)
            skips.append(h)
            if collect:
                feats.append((f"encoder{l}", h))
        K = h.shape[2]
        h = self._inject(inject, "latent", self.latent(h.reshape(B, n * K, -1)).view(B, n, K, -1))
        z = h.reshape(B, n * K, -1)  # (B, n*K_L, d_L)
        if collect:
            feats.append(("latent", h))
        for l in reversed(range(1, len(self.rows))):
            h = self.dec[l - 1](self.up[l - 1](h, skips[l - 1], self.pos[l - 1]))  # (B, n, R_{l-1}, d_{l-1})
            h = self._inject(inject, f"decoder{l}", h)
            if collect:
                feats.append((f"decoder{l}", h))
        out = h.reshape(B, n * G, -1)[:, :T]
        return out, z, T, feats

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, inject=None):
        """inject(name, h (B, R, C), visible (R,)) -> h may rewrite a stage's output (composition)."""
        h, z, T, _ = self._run(idx, inject=inject)
        logits = self.lm_head(self.ln_f(h))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if self.predict_latent is not None:
            loss = loss + self.config.latent_loss * self.latent_loss_scale * self._latent_loss(z, T)
        return logits, loss

    def _latent_loss(self, z: torch.Tensor, T: int) -> torch.Tensor:
        """Predict latent t+1 from latent t (cosine), over latents that see no padding."""
        K = self.rows[-1]
        valid = int((level_visible(z.shape[1] // K, K, self.config.group_len) < T).sum())
        if valid < 2:
            return z.new_zeros(())
        pred = self.predict_latent(z[:, : valid - 1])
        return (1 - F.cosine_similarity(pred.float(), z[:, 1:valid].detach().float(), dim=-1)).mean()

    @torch.no_grad()
    def features(self, idx: torch.Tensor) -> list[dict]:
        """Hidden states at every stage: [{name, h (B, R, d), visible (R,)}], depth order,
        rows that depend on padding removed. Row i may depend on inputs <= visible[i]."""
        _, _, T, feats = self._run(idx, collect=True)
        out = []
        for name, h in feats:
            B, n, R, C = h.shape
            vis = level_visible(n, R, self.config.group_len, h.device)
            keep = vis < T  # visible increases along the flattened rows: a prefix
            out.append({"name": name, "h": h.reshape(B, n * R, C)[:, keep], "visible": vis[keep]})
        return out

    def new_cache(self, keep_states: bool = False) -> DecodeCache:
        return DecodeCache(keep_states)

    @torch.no_grad()
    def extend(self, idx: torch.Tensor, cache: DecodeCache, inject=None) -> torch.Tensor:
        """Incremental decoding: feed the next tokens idx (B, n) after the cache's and return their
        logits (B, n, V), as forward() over the whole sequence would. The open group (the one the
        newest token is in) is recomputed at each call, attending to the final rows of the groups
        before it; the levels its newest row does not depend on yet are skipped (a level-l row of
        the group is first visible at offset G - R_l), so the latent layers run on R_L bytes of G."""
        B, T = idx.shape
        G = self.config.group_len
        if cache.length + T > self.config.block_size:
            raise ValueError(f"sequence length {cache.length + T} exceeds block_size {self.config.block_size}; "
                             "start a new cache on the last block_size tokens")
        out = []
        while idx.shape[1]:
            open_group = cache.extra.get("open", idx[:, :0])  # (B, m) tokens of the open group so far
            take = G - open_group.shape[1]
            tokens = torch.cat([open_group, idx[:, :take]], dim=1)
            idx = idx[:, take:]
            h = self._group_step(tokens, cache, inject)  # (B, m, d0)
            out.append(h[:, open_group.shape[1]:])
            cache.length += tokens.shape[1] - open_group.shape[1]
            cache.extra["open"] = tokens if tokens.shape[1] < G else tokens[:, :0]
        return self.lm_head(self.ln_f(torch.cat(out, dim=1)))

    def _group_step(self, tokens: torch.Tensor, cache: DecodeCache, inject=None) -> torch.Tensor:
        """The known tokens (B, m) of group g = cache.extra["groups"] through every level they
        reach; commits the group's rows when it is complete. Returns the decoder's rows (B, m, d0)."""
        cfg, G, L = self.config, self.config.group_len, len(self.rows) - 1
        B, m = tokens.shape
        g = cache.extra.get("groups", 0)
        cache.final = m == G
        levels = max(l for l in range(L + 1) if m - 1 >= G - self.rows[l])  # levels the newest row depends on
        positions = torch.arange(g * G, (g + 1) * G, device=tokens.device)
        x = self.wte(F.pad(tokens, (0, G - m))) + self.wpe(positions)
        h = (x.view(B, 1, G, -1) + self.pos[0])  # (B, 1, G, d0)
        self._record(cache, "embed", h)
        skips = [h]
        for l in range(1, levels + 1):
            h = self.enc[l - 1](self.compress[l - 1](h) + self.pos[l], cache, f"enc.{l - 1}")  # (B, 1, K_l, d_l)
            h = self._inject_group(inject, f"encoder{l}", h, cache)
            self._record(cache, f"encoder{l}", h)
            skips.append(h)
        if levels == L:
            K = h.shape[2]
            h = self.latent(h.reshape(B, K, -1), cache).view(B, 1, K, -1)
            h = self._inject_group(inject, "latent", h, cache)
            self._record(cache, "latent", h)
        last = cache.extra.setdefault("last", {})  # level -> the final latents of the group before
        done = {}
        for l in reversed(range(1, L + 1)):
            if l - 1 > levels:
                continue
            if l <= levels:
                done[l] = h
            own = done.get(l, h.new_zeros(B, 1, self.rows[l], cfg.widths[l]))  # not reached yet: no row reads it
            h = self.up[l - 1](own, skips[l - 1], self.pos[l - 1], prev=last.get(l), group=g,
                               cache=cache.layer(f"up.{l - 1}") if self.up[l - 1].attn is not None else None)
            h = self.dec[l - 1](h, cache, f"dec.{l - 1}")  # (B, 1, R_{l-1}, d_{l-1})
            h = self._inject_group(inject, f"decoder{l}", h, cache)
            self._record(cache, f"decoder{l}", h)
        if cache.keep_states:  # a stage this group has not reached yet: no rows so far
            widths = {"latent": cfg.widths[-1], **{f"encoder{l}": cfg.widths[l] for l in range(1, L + 1)},
                      **{f"decoder{l}": cfg.widths[l - 1] for l in range(1, L + 1)}}
            for name, width in widths.items():
                if name not in cache.states:
                    self._record(cache, name, h.new_zeros(B, 1, 0, width))
        if m == G:  # the group is complete: its rows are final
            last.update({l: done[l] for l in range(1, L + 1)})
            cache.commit()
            cache.extra["groups"] = g + 1
            cache.extra.pop("visible", None)  # the next group's positions
        return h.reshape(B, G, -1)[:, :m]

    def _inject_group(self, inject, name: str, h: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """_inject for the rows (B, 1, R, C) of the cache's open group, at their positions in the sequence."""
        if inject is None:
            return h
        B, _, R, C = h.shape
        return inject(name, h.reshape(B, R, C), self._group_visible(cache, R, h.device)).view(B, 1, R, C)

    def _record(self, cache: DecodeCache, name: str, h: torch.Tensor) -> None:
        if cache.keep_states:
            B, _, R, C = h.shape
            cache.record(name, h.reshape(B, R, C), self._group_visible(cache, R, h.device))

    def _group_visible(self, cache: DecodeCache, rows: int, device) -> torch.Tensor:
        """(rows,) visible positions of a level's rows in the cache's open group (kept in the cache
        until the group is complete: a step asks for each a few times)."""
        memo = cache.extra.setdefault("visible", {})  # rows -> positions, this group's
        if rows not in memo:
            group = cache.extra.get("groups", 0)
            memo[rows] = level_visible(1, rows, self.config.group_len, device) + group * self.config.group_len
        return memo[rows]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        return generate(self, idx, max_new_tokens, temperature, top_k)

    def config_dict(self) -> dict:
        return {"arch": "hourglass", **asdict(self.config)}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
