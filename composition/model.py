"""Composing frozen experts into a frozen central model (CALM cross-attention, PHATGOOSE gates).

At each composition point i the central state h (B, T_c, d_c) attends to expert e's state
at the same relative depth, z (B, T_e, d_e), through a CrossAttentionBlock whose output
projection starts at zero, so the composed model starts equal to the central model:

    a_e  = OutProj(CrossAttention(RMSNorm(h), Linear(d_e -> d_c)(z), visible_e <= visible_c))
    gate = sigmoid(v_{e,i} . h)                       # training, v zero-initialised: 0.5
    h    = h + sum_e w_e a_e                          # w: gate, or routed top-k weights

Optionally a composition point in output space (output "mix"): each position mixes the
composed model's next-byte distribution with its routed experts' own, through a learned
per-position gate (OutputGate), trained last, with everything else frozen:

    p_t = (1 - sum_e w_e,t g_e,t) p_composed,t + sum_e w_e,t g_e,t p_e,t

Routing at inference (per token): score_e = LN(h) . LN(v_e) / sqrt(d_c), keep the top k,
softmax over their scores; or adaptively every expert whose sigmoid gate exceeds a
threshold (0 .. k_max experts, a number that varies with the input); or by an outside
router's weights for each position's context (routing "router", e.g. cBTM's), where only
the experts some position is routed to run; or by a k-way gate (routing "kway": a softmax
over the experts of a linear map of the running mean of the central model's own states so
far at the last composition point, read in a routing pass of the central model alone, the
states it was trained on; trained after every expert with every cluster's text as the
others' negatives), top k, each kept expert's PHATGOOSE gate scaling its block. Every routing
decides each row from what that row may see, so the composed model stays causal and the rows
of a batch independent.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from composition.blocks import GLUES, OutputGate, make_block
from experts.cache import DecodeCache, KVCache, RunningSum, StageRows

ROUTINGS = ("gate", "topk", "adaptive", "router", "kway")
POOLS = ("token", "prefix")
OUTPUTS = ("none", "mix")  # mix: a composition point in output space (OutputGate)
SWITCHES = ("routing", "active", "output", "balance_weight", "record_routing")  # what configured() may change


def composition_points(stages: list[str], n_points: int) -> list[str]:
    """n stage names spread evenly over a model's depth (the embedding excluded)."""
    body = stages[1:]
    if not 1 <= n_points <= len(body):
        raise ValueError(f"n_points must be between 1 and {len(body)} (the central model's stages), got {n_points}")
    return [body[math.ceil((i + 1) * len(body) / n_points) - 1] for i in range(n_points)]


def paired_stage(point: str, central_stages: list[str], expert_stages: list[str]) -> str:
    """The expert stage at the same relative depth as the central stage `point`."""
    depth = central_stages.index(point) / (len(central_stages) - 1)
    return expert_stages[round(depth * (len(expert_stages) - 1))]


class ComposedLM(nn.Module):
    """Central + frozen experts + trainable cross-attention blocks and gates."""

    def __init__(self, central: nn.Module, experts: list[nn.Module], n_points: int = 2, n_head: int | None = None,
                 routing: str = "topk", k: int = 2, threshold: float = 0.5, k_max: int | None = None,
                 pool: str = "token", glue: str = "attention", output: str = "none", kway: bool = False,
                 prefix_router: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 document_router: Callable[[bytes], np.ndarray] | None = None, record_routing: bool = False):
        """prefix_router: routing "router" without route=, a callable idx (B, T) -> (B, T, E) weights
        (generation: each window's text); document_router: routing "router" scoring whole texts, bytes
        (n,) -> (n, E) weights of each byte's whole prefix (score_documents' route_weights);
        record_routing: keep each point's weights of every forward (routed_experts, evaluation)."""
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if not experts:
            raise ValueError("a composition needs at least one expert")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if glue not in GLUES:
            raise ValueError(f"glue must be one of {GLUES}, got {glue!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if routing == "kway" and not kway:
            raise ValueError("routing='kway' needs a composition with a k-way gate (kway=True)")
        self.central, self.experts = central, nn.ModuleList(experts)
        for model in (central, *experts):
            model.requires_grad_(False)
            model.eval()
        self.config = central.config  # block_size etc., for generate()
        stages = central.stage_names()
        self.points = composition_points(stages, n_points)
        widths = {name: feat["h"].shape[-1] for name, feat in _stage_widths(central).items()}
        self.pairs = [{p: paired_stage(p, stages, e.stage_names()) for p in self.points} for e in experts]
        self.blocks, final_widths = nn.ModuleList(), []
        for e, expert in enumerate(experts):
            e_widths = {name: feat["h"].shape[-1] for name, feat in _stage_widths(expert).items()}
            final_widths.append(e_widths[expert.stage_names()[-1]])
            self.blocks.append(nn.ModuleDict({
                p: make_block(glue, widths[p], e_widths[self.pairs[e][p]], n_head or _heads(central, widths[p]))
                for p in self.points}))
        # PHATGOOSE gate vectors v_{e,i}, zero-initialised: every gate starts at sigmoid(0) = 0.5.
        # One ParameterDict per expert, so an expert's gates train (and are added) on their own.
        self.gates = nn.ModuleList(nn.ParameterDict({p: nn.Parameter(torch.zeros(widths[p])) for p in self.points})
                                   for _ in experts)
        # the k-way gate (kway): a linear map of the centred, normalised prefix-mean of the central
        # model's own states at the last point (where they carry the domain: bench/gate_routing.py) to
        # one score per expert, zero-initialised (uniform), trained with every cluster's text (train_kway)
        self.kway = nn.ModuleDict({p: nn.Linear(widths[p], len(experts)) for p in self.points[-1:]}) if kway \
            else nn.ModuleDict()
        for layer in self.kway.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # output "mix": one OutputGate per expert, reading the last stages (what the output heads read)
        self.last_stage = stages[-1]
        self.mixers = nn.ModuleList(OutputGate(widths[self.last_stage], d_final)
                                    for d_final in final_widths) if output == "mix" else nn.ModuleList()
        # The central model's mean state at each point (fit_centers): gates and scores look at the
        # deviation from it, so a gate trained on one domain only learns that domain's direction
        # instead of the direction every domain shares. Zero = uncentred. Not trained.
        self.centers = nn.ParameterDict({p: nn.Parameter(torch.zeros(widths[p]), requires_grad=False)
                                         for p in self.points})
        self.routing, self.k, self.threshold = routing, min(k, len(experts)), threshold
        self.k_max = k_max or len(experts)
        self.pool, self.glue = pool, glue
        self.output = output  # what the forward runs: "none" while blocks and gates train (training sets it)
        self.active: list[int] = list(range(len(experts)))  # experts whose forward runs
        self.balance_weight = 0.0  # joint training: weight of the load-balancing loss
        self.last_experts_per_token: float | None = None
        self.prefix_router, self.document_router = prefix_router, document_router
        self.record_routing = record_routing  # keep each point's weights of the last forward
        self.last_routing: dict[str, torch.Tensor] = {}
        self.last_visible: dict[str, torch.Tensor] = {}  # (R,) input position of each routed row
        self.last_positions = 0  # T of the last recorded forward

    @contextlib.contextmanager
    def configured(self, **switches):
        """The model with some run-time switches changed, restored on exit: `routing` (ROUTINGS),
        `active` (experts whose forward runs), `output` (OUTPUTS), `balance_weight` (joint
        training's load-balancing loss), `record_routing`. Training phases and evaluation variants
        switch through here; nothing sets these attributes from outside."""
        unknown = set(switches) - set(SWITCHES)
        if unknown:
            raise ValueError(f"ComposedLM has no switch {sorted(unknown)}; switches are {SWITCHES}")
        if switches.get("routing", self.routing) not in ROUTINGS or switches.get("output", self.output) not in OUTPUTS:
            raise ValueError(f"routing must be one of {ROUTINGS} and output one of {OUTPUTS}, got {switches}")
        saved = {k: getattr(self, k) for k in switches}
        try:
            for k, v in switches.items():
                setattr(self, k, list(v) if k == "active" else v)
            yield self
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def train(self, mode: bool = True):
        super().train(mode)
        self.central.eval()  # frozen models stay in eval mode (no dropout)
        for expert in self.experts:
            expert.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return (list(self.blocks.parameters()) + list(self.gates.parameters()) + list(self.mixers.parameters())
                + list(self.kway.parameters()))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, route: torch.Tensor | None = None):
        """route: (B, T, n_experts) weights of an outside router for each input position (routing
        "router", e.g. cBTM's weights for the text up to that position); without it, prefix_router(idx)."""
        if self.routing == "router":
            if route is None and self.prefix_router is not None:
                route = self.prefix_router(idx)
            if route is None:
                raise ValueError("routing='router' needs route=(B, T, n_experts) weights or a prefix_router")
            return self._forward_routed(idx, targets, route)
        return self._forward(idx, targets)

    def _forward_routed(self, idx: torch.Tensor, targets: torch.Tensor | None, route: torch.Tensor):
        """An outside router picks the experts per input position, each expert's gate scales its
        block (as in its independent training); only experts some position is routed to run."""
        saved = self.active
        self.active = [e for e in saved if bool((route[..., e] > 0).any())] or saved[:1]
        dtype = next(self.blocks.parameters()).dtype
        self._route = route[..., self.active].to(idx.device, dtype)  # (B, T, E_active)
        try:
            return self._forward(idx, targets)
        finally:
            self.active, self._route = saved, None

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor | None):
        states = {e: {f["name"]: f for f in self.experts[e].features(idx)} for e in self.active}
        counts, balance, final = [], [], {}
        mixing = self.output == "mix"

        def inject(name: str, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
            if name in self.points:
                h = self._compose_point(name, h, visible, states, counts, balance, final)
            if mixing and name == self.last_stage:
                final["h"] = h
            return h

        if self.record_routing:  # this forward's routing only
            self.last_positions, self.last_routing, self.last_visible = idx.shape[1], {}, {}
        if self.routing == "kway":  # a routing pass of the central model alone: the k-way gate's decisions
            scores, visible = self.kway_logits(idx)
            self._kway = (torch.softmax(scores.float(), dim=-1), visible)  # (B, R, n_experts), (R,)
        try:
            logits, loss = self.central(idx, None if mixing else targets, inject=inject)
        finally:
            self._kway = None  # this forward's k-way decisions only
        self.last_experts_per_token = float(torch.stack(counts).mean()) if counts else 0.0
        if mixing:
            logits = self.mix_output(logits, final["h"][:, :idx.shape[1]], states, final["weights"])
            if targets is not None:
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if loss is not None and balance:
            loss = loss + self.balance_weight * torch.stack(balance).mean()
        return logits, loss

    def _compose_point(self, name: str, h: torch.Tensor, visible: torch.Tensor, states: dict, counts: list,
                       balance: list, final: dict) -> torch.Tensor:
        """h + the routed sum of the active experts' blocks at composition point `name` (its
        weights and rows kept in `final`: the last point's are what output mixing reads)."""
        outs = torch.stack([self.blocks[e][name](h, visible, states[e][self.pairs[e][name]]["h"],
                                                 states[e][self.pairs[e][name]]["visible"])
                            for e in self.active], dim=-2)  # (B, R, E_active, d_c)
        weights = self.route(name, h, visible)  # (B, R, E_active)
        final["weights"] = (weights, visible)
        if self.record_routing:  # (B, R, n_experts): experts that did not run weigh 0
            full = weights.new_zeros(*weights.shape[:-1], len(self.experts))
            full[..., self.active] = weights.detach()
            self.last_routing[name], self.last_visible[name] = full, visible
        counts.append((weights > 0).float().sum(-1).mean())
        if self.balance_weight and self.training:
            balance.append(self.load_balance(name, h, weights))
        return h + (weights.unsqueeze(-1).to(outs.dtype) * outs).sum(dim=-2)

    def new_cache(self) -> "CompositionCache":
        return CompositionCache()

    @torch.no_grad()
    def extend(self, idx: torch.Tensor, cache: "CompositionCache") -> torch.Tensor:
        """Incremental decoding: feed the next tokens idx (B, n) after the cache's and return their
        logits (B, n, V) (log-probabilities with output "mix"), as forward() over the whole sequence
        would. The central model and every running expert decode incrementally; each expert row is
        projected into its glue once; running means, the router's weights and the routing pass
        carry over from step to step. With routing "router" only the experts routed to a position
        of the rows being computed run; one that runs again first catches up on the tokens since."""
        B, n = idx.shape
        start = cache.length
        cache.ids = idx if cache.ids is None else torch.cat([cache.ids, idx], dim=1)  # (B, T)
        active = self.active
        if self.routing == "router":
            cache.route = _grown(cache.route, self._route_stream(idx, cache))  # (B, T, n_experts)
            # Only the rows of the central model's open group are computed now (those of a GPT: the new
            # ones): an expert none of their positions is routed to weighs 0 in all of them, as in a
            # forward over the whole window, and need not run. Its cache catches up when it is next routed.
            first = start - start % getattr(self.central.config, "group_len", 1)
            active = [e for e in self.active if bool((cache.route[:, first:, e] > 0).any())] or self.active[:1]
        experts_logits = {}
        for e in active:
            if e not in cache.experts:
                cache.experts[e] = self.experts[e].new_cache(keep_states=True)
            behind = cache.ids[:, cache.experts[e].length:]  # (B, >= n): from the window's first token if new
            experts_logits[e] = self.experts[e].extend(behind, cache.experts[e])[:, -n:]
        mixing = self.output == "mix"
        last_rows = []

        def inject(name: str, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
            if name in self.points:
                h = self._extend_point(name, h, visible, cache)
            if mixing and name == self.last_stage:
                last_rows.append((h, visible))
            return h

        saved = self.active
        self.active = active
        try:
            if self.routing == "router":
                self._route = cache.route[..., active].to(next(self.blocks.parameters()).dtype)  # (B, T, E_active)
            if self.routing == "kway":  # the routing pass: the central model alone, its own cache
                self.central.extend(idx, cache.routing_pass, inject=self._kway_recorder(cache.routing_pass))
                self._kway = cache.routing_pass.states["kway"].rows()
            logits = self.central.extend(idx, cache.central, inject=inject)
            if mixing:
                positions = torch.arange(start, start + n, device=idx.device)
                h = torch.cat([rows[:, (v >= start) & (v < start + n)] for rows, v in last_rows], dim=1)
                weights = cache.central.states[f"weights.{self.points[-1]}"].rows()
                w = self.output_weights(positions, weights[0][..., active], weights[1])
                stage = [self.experts[e].stage_names()[-1] for e in active]
                zs = [_rows_at(cache.experts[e].states[name], positions) for e, name in zip(active, stage)]
                logits = self._mixture(logits, h, w, zs, [experts_logits[e] for e in active])
        finally:
            self.active, self._route, self._kway, self._pool = saved, None, None, None
        cache.length += n
        if self.record_routing:  # every row so far, as a forward over the whole sequence records them
            self.last_positions = cache.length
            rows = {p: cache.central.states[f"weights.{p}"].rows() for p in self.points  # a point no row has
                    if f"weights.{p}" in cache.central.states}  # reached yet routes no position
            self.last_routing = {p: w for p, (w, _) in rows.items()}
            self.last_visible = {p: v for p, (_, v) in rows.items()}
        return logits

    def _extend_point(self, name: str, h: torch.Tensor, visible: torch.Tensor, cache: "CompositionCache"):
        """_compose_point for the newest central rows (incremental decoding)."""
        if self.pool == "prefix":
            self._pool = {name: cache.central.part(f"pool.{name}", RunningSum)}
        outs = torch.stack([self.blocks[e][name].extend(h, visible, cache.expert_rows(e, self.pairs[e][name]),
                                                        cache.glue(e, name))
                            for e in self.active], dim=-2)  # (B, R, E_active, d_c)
        weights = self.route(name, h, visible)  # (B, R, E_active)
        full = weights.new_zeros(*weights.shape[:-1], len(self.experts))  # experts that did not run weigh 0
        full[..., self.active] = weights
        cache.central.part(f"weights.{name}").extend(full, visible)
        return h + (weights.unsqueeze(-1).to(outs.dtype) * outs).sum(dim=-2)

    def _kway_recorder(self, routing_pass: DecodeCache):
        """An inject for the routing pass: the k-way gate's softmax for the rows of its point."""
        (point,) = self.kway

        def record(name, h, visible):
            if name == point:
                scores = self.kway_scores(point, h, routing_pass.part("pool", RunningSum))
                routing_pass.part("kway").extend(torch.softmax(scores.float(), dim=-1), visible)
            return h

        return record

    def _route_stream(self, idx: torch.Tensor, cache: "CompositionCache") -> torch.Tensor:
        """(B, n, n_experts) the prefix router's weights for the newest n positions: from its
        stream (O(1) a byte) where it has one, else from the whole window again."""
        if self.prefix_router is None:
            raise ValueError("routing='router' decodes with a prefix_router (the composition's cBTM router)")
        if hasattr(self.prefix_router, "stream"):
            if cache.router is None:
                cache.router = self.prefix_router.stream(idx.shape[0])
            return cache.router.extend(idx).to(idx.device)
        return self.prefix_router(cache.ids)[:, -idx.shape[1]:]

    def mix_output(self, logits: torch.Tensor, h: torch.Tensor, states: dict, point_weights: tuple) -> torch.Tensor:
        """Log-probabilities (B, T, V) of the output mixture: the composed model's distribution
        (logits, from final state h (B, T, d_c)) and each active expert's own, weighted w_e,t g_e,t
        (w: output_weights, g: the expert's OutputGate); the composed model takes the rest."""
        T = logits.shape[1]
        w = self.output_weights(torch.arange(T, device=logits.device), *point_weights)  # (B, T, E_active)
        zs, experts_logits = [], []
        for e in self.active:
            expert = self.experts[e]
            z = states[e][expert.stage_names()[-1]]["h"][:, :T]  # (B, T, d_e): what its output head reads
            zs.append(z)
            experts_logits.append(expert.lm_head(expert.ln_f(z)))
        return self._mixture(logits, h, w, zs, experts_logits)

    def _mixture(self, logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor, zs: list, experts_logits: list):
        """The output mixture of the composed model's logits (B, T, V) and each active expert's
        (experts_logits), the expert's share w_e,t g_e,t from OutputGate(h, z_e)."""
        parts, shares = [F.log_softmax(logits.float(), dim=-1)], []
        for j, (e, z, expert_logits) in enumerate(zip(self.active, zs, experts_logits)):
            parts.append(F.log_softmax(expert_logits.float(), dim=-1))
            shares.append(w[..., j] * self.mixers[e](h, z))
        share = torch.stack(shares, dim=-1)  # (B, T, E_active)
        rest = (1 - share.sum(-1, keepdim=True)).clamp(min=1e-6)  # the composed model's weight
        log_w = torch.cat([rest, share], dim=-1).clamp(min=1e-30).log()  # (B, T, 1 + E_active)
        return torch.logsumexp(torch.stack(parts, dim=-2) + log_w.unsqueeze(-1), dim=-2)  # (B, T, V)

    def output_weights(self, positions: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """(B, P, E_active) how much each active expert may weigh at each input position (P,): the
        outside router's weights for it (routing "router"), else the last composition point's
        `weights` (B, R, E_active) of the newest row (`visible`: (R,)) the position sees,
        normalised; each row sums to <= 1."""
        if self.routing == "router":  # positions past the route's end only serve padding, as in route()
            w = self._route[:, positions.clamp(max=self._route.shape[1] - 1)].float()
        else:
            w = _newest_rows(weights, visible, positions).float()  # (B, P, E_active)
        return w / w.sum(-1, keepdim=True).clamp(min=1.0 if self.routing == "router" else 1e-9)

    def kway_logits(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-way gate's scores (B, R, n_experts) for the central model's own states at its
        point, and each row's last input position (R,), rows that see padding dropped. Only the
        central model runs, up to that point."""
        (point,) = self.kway

        def record(name, h, visible):
            if name == point:
                keep = visible < idx.shape[1]
                raise _Reached(self.kway_scores(name, h)[:, keep], visible[keep])
            return h

        try:
            self.central(idx, inject=record)
        except _Reached as reached:
            return reached.scores, reached.visible
        raise ValueError(f"the central model never reached the composition point {point!r}")

    @torch.no_grad()
    def fit_centers(self, batches) -> None:
        """Set each point's center to the central model's mean state over `batches` of inputs (B, T)."""
        sums = {p: torch.zeros_like(c, dtype=torch.float64) for p, c in self.centers.items()}
        rows = {p: 0 for p in self.points}

        def record(name, h, visible):
            if name in sums:
                sums[name] += h.double().sum(dim=(0, 1))
                rows[name] += h.shape[0] * h.shape[1]
            return h

        for idx in batches:
            self.central(idx, inject=record)
        for p in self.points:
            self.centers[p].copy_(sums[p] / max(rows[p], 1))

    def gate_vectors(self, point: str) -> torch.Tensor:
        """(E_active, d_c) gate vectors of the active experts at a composition point."""
        return torch.stack([self.gates[e][point] for e in self.active])

    def routing_state(self, point: str, h: torch.Tensor) -> torch.Tensor:
        """What gates and scores look at: each row's state (pool="token") or the running mean of
        the rows so far (pool="prefix", causal), minus the central model's mean state there."""
        if self.pool == "prefix":
            pool = (getattr(self, "_pool", None) or {}).get(point)  # incremental decoding: the rows before h's
            h = _running_mean(h) if pool is None else pool.means(h)
        return h - self.centers[point].to(h.dtype)

    def scores(self, point: str, h: torch.Tensor) -> torch.Tensor:
        """Normalised affinity LN(h) . LN(v_e) / sqrt(d): (B, R, E_active)."""
        h = self.routing_state(point, h)
        d = h.shape[-1]
        v = self.gate_vectors(point).to(h.dtype)
        return F.layer_norm(h, (d,)) @ F.layer_norm(v, (d,)).t() / math.sqrt(d)

    def kway_scores(self, point: str, h: torch.Tensor, pool: RunningSum | None = None) -> torch.Tensor:
        """(B, R, n_experts) the k-way gate's scores: a linear map of the running mean of the rows
        so far (causal), centred and layer-normalised (pool: the rows before h's, decoding)."""
        pooled = (_running_mean(h) if pool is None else pool.means(h)) - self.centers[point].to(h.dtype)  # (B, R, d)
        return self.kway[point](F.layer_norm(pooled, (pooled.shape[-1],)))

    def kway_probs(self, point: str, h: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        """(B, R, n_experts) the k-way gate's softmax for the rows of `point`: for each row, that of
        the newest row of this forward's routing pass it sees (zero where it sees none yet: no
        expert); without `visible` (a direct call), of the rows `h` itself."""
        if visible is None:
            return torch.softmax(self.kway_scores(point, h).float(), dim=-1)
        if getattr(self, "_kway", None) is None:
            raise ValueError(f"k-way routing at {point!r} needs this forward's routing pass (call the model)")
        probs, pass_visible = self._kway
        return _newest_rows(probs, pass_visible, visible)

    def gate_values(self, point: str, h: torch.Tensor) -> torch.Tensor:
        """(B, R, E_active) each active expert's PHATGOOSE gate sigmoid(v_e . (h - mu)) at `point`."""
        return torch.sigmoid(self.routing_state(point, h) @ self.gate_vectors(point).t().to(h.dtype))

    def load_balance(self, point: str, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Switch-style auxiliary loss E * sum_e f_e P_e (1 when the load is uniform)."""
        probs = torch.softmax(self.scores(point, h).float(), dim=-1).reshape(-1, weights.shape[-1])
        load = (weights > 0).float().reshape(-1, weights.shape[-1]).mean(0)
        return weights.shape[-1] * (load / load.sum().clamp(min=1e-9) * probs.mean(0)).sum()

    def route(self, point: str, h: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, E_active) weights of the active experts for each central row (visible: (R,) the
        last input position each row depends on)."""
        if self.routing == "router":  # the router's weight for the row's position x the expert's gate
            rows = visible.clamp(max=self._route.shape[1] - 1)  # rows past the end only serve padding
            return self._route[:, rows].to(h.dtype) * self.gate_values(point, h)
        if self.routing == "kway":  # the k-way gate's top k, each scaled by the expert's PHATGOOSE gate
            probs = self.kway_probs(point, h, visible)[..., self.active]  # (B, R, E_active)
            top = probs.topk(min(self.k, len(self.active)), dim=-1)
            kept = torch.zeros_like(probs).scatter(-1, top.indices,
                                                   top.values / top.values.sum(-1, keepdim=True).clamp(min=1e-9))
            return kept.to(h.dtype) * self.gate_values(point, h)
        if self.routing == "gate":
            return self.gate_values(point, h)
        if self.routing == "adaptive":
            g = self.gate_values(point, h)
            keep = g > self.threshold
            if self.k_max < len(self.active):  # at most k_max experts: the largest gates
                top = g.topk(self.k_max, dim=-1).indices
                keep &= torch.zeros_like(keep).scatter(-1, top, True)
            return torch.where(keep, g, torch.zeros_like(g))
        # top-k on normalised affinity, softmax over the k kept
        scores = self.scores(point, h)
        k = min(self.k, len(self.active))
        top = scores.topk(k, dim=-1)
        return torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values.float(), -1).to(scores.dtype))

    @torch.no_grad()
    def routing_report(self, idx: torch.Tensor, names: list | None = None) -> str:
        """Which experts the router picks for `idx` (B, T): each expert's share of top-1 rows."""
        with self.configured(record_routing=True):
            self(idx)
            rows = torch.cat([w.reshape(-1, w.shape[-1]) for w in self.last_routing.values()])  # every point's rows
        top = rows[(rows > 0).any(-1)].argmax(-1)  # rows routed somewhere
        share = torch.bincount(top, minlength=len(self.experts)).float() / max(top.numel(), 1)
        names = names or [f"expert{e}" for e in range(len(self.experts))]
        label = [n if isinstance(n, str) else f"{n['uri']}" + (f" [{n['domain']}]" if n.get("domain") else "")
                 for n in names]
        return "router (top-1 share of routed rows): " + ", ".join(
            f"{label[e]} {100 * share[e]:.0f}%" for e in share.argsort(descending=True).tolist() if share[e] > 0)

    @torch.no_grad()
    def routed_experts(self) -> torch.Tensor:
        """(B, T) the expert the last forward (record_routing on) weighted most for the prediction
        at each of its T input positions t: at every point the newest row that t sees (visible
        <= t), its weights summed over the points; -1 where no expert had any weight."""
        total = None
        t = torch.arange(self.last_positions)
        for name, weights in self.last_routing.items():  # (B, R, E) per point
            picked = _newest_rows(weights.float().cpu(), self.last_visible[name].cpu(), t)  # (B, T, E)
            total = picked if total is None else total + picked
        if total is None:
            raise ValueError("routed_experts() reads the routing of the last forward: set record_routing first")
        choice = total.argmax(-1)
        return torch.where(total.amax(-1) > 0, choice, torch.full_like(choice, -1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        from experts.generation import generate

        return generate(self, idx, max_new_tokens, temperature, top_k)


class CompositionCache:
    """ComposedLM's decoding state: its central model's cache, each running expert's (which keep
    their stages' rows), the glue's keys and values of expert rows, the routing pass's (routing
    "kway") and the outside router's weights so far (routing "router")."""

    def __init__(self):
        self.length = 0
        self.ids: torch.Tensor | None = None  # (B, T) tokens fed
        self.central = DecodeCache()
        self.routing_pass = DecodeCache()
        self.experts: dict[int, DecodeCache] = {}
        self.route: torch.Tensor | None = None  # (B, T, n_experts)
        self.router = None  # the prefix router's stream
        self._glue: dict[tuple[int, str], KVCache] = {}

    def glue(self, expert: int, point: str) -> KVCache:
        return self._glue.setdefault((expert, point), KVCache())

    def expert_rows(self, expert: int, stage: str) -> StageRows:
        return self.experts[expert].states[stage]


def _grown(rows: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if rows is None else torch.cat([rows, new], dim=1)


def _rows_at(stage: StageRows, positions: torch.Tensor) -> torch.Tensor:
    """(B, P, d) the rows of a stage with a row at every position (visible = position): at `positions`."""
    h, visible = stage.rows()
    return h[:, torch.searchsorted(visible.contiguous(), positions.contiguous())]


class _Reached(Exception):
    """kway_logits' early exit: the scores at the k-way gate's point and their rows' positions."""

    def __init__(self, scores: torch.Tensor, visible: torch.Tensor):
        super().__init__("reached the k-way gate's point")
        self.scores, self.visible = scores, visible


def _running_mean(h: torch.Tensor) -> torch.Tensor:
    """(B, R, d) the mean of rows 0..r for each row r (causal)."""
    n = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).view(1, -1, 1)
    return (h.float().cumsum(dim=1) / n).to(h.dtype)


def _newest_rows(weights: torch.Tensor, visible: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """weights (B, R, E) of rows that see inputs <= visible (R,), ascending: for each of `positions`
    (P,), the row of the newest one that position sees, zero where it sees none -> (B, P, E)."""
    row = torch.searchsorted(visible.contiguous(), positions.contiguous(), right=True) - 1  # (P,); -1: none yet
    return weights[:, row.clamp(min=0)] * (row >= 0).view(1, -1, 1).to(weights.dtype)


@torch.no_grad()
def _stage_widths(model: nn.Module) -> dict[str, dict]:
    """Each stage's state on a dummy input of one group (to read widths)."""
    T = getattr(model.config, "group_len", 1)
    device = next(model.parameters()).device
    return {f["name"]: f for f in model.features(torch.zeros(1, T, dtype=torch.long, device=device))}


def _heads(central: nn.Module, width: int) -> int:
    n_head = central.config.n_head
    return n_head if width % n_head == 0 else 1
