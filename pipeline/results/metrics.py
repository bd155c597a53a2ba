"""The evaluation's arithmetic: from every system's per-byte log-probabilities on the held-out
documents to the figures a person reads. Bits per byte per system and domain, the oracle and cBTM
mixtures, routing accuracy and load, training compute, each difference from the dense baselines with
its paired bootstrap interval, equal-compute comparisons. Pure functions of the scores: no model, no
store; `moie evaluate` (pipeline/stages/evaluate.py) scores and logs, this computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from composition.evaluation import bits_per_byte, mixture
from composition.intervals import paired_bootstrap
from pipeline.results.compressors import compressor_bpb
from pipeline.store.names import DENSE_MATCHED
from routing.ensemble import keep_top_k

CBTM = {"cbtm_top1": 1, "cbtm_top2": 2, "cbtm_all": None}  # experts mixed per byte (None: all)
# composition in output space: lambda p_routed expert + (1 - lambda) p_hub, the routed expert cBTM's
# top-1 for each byte's prefix, lambda chosen on validation (every cluster in an equal share)
MIXTURES = {"mixture_central": "central", "mixture_seed": "seed"}
LAMBDAS = [i / 20 for i in range(21)]
# the pipeline's compositions by mode (`<mode>_seed`: composed on the seed, not the full dense run)
COMPOSED = {"independent": "composed_independent", "joint": "composed_joint",
            "independent_seed": "composed_seed_independent", "joint_seed": "composed_seed_joint"}
# an independent composition's gates routing on their own: PHATGOOSE's top-k, adaptive, the k-way gate
GATE_ONLY = {"composed_independent_topk": "topk", "composed_adaptive": "adaptive", "composed_independent_kway": "kway"}
COMPOSED_SYSTEMS = ("composed_independent", *GATE_ONLY, "composed_joint", "composed_seed_independent",
                    "composed_seed_joint")
MODE_OF = {**{system: mode for mode, system in COMPOSED.items()}, **{system: "independent" for system in GATE_ONLY}}
HEADLINE = ("bpb/", "routing_accuracy/", "experts_per_token/")
BASELINES = ("dense", DENSE_MATCHED)


@dataclass
class Scored:
    """Everything evaluate scored and looked up, what the arithmetic reads."""

    results: dict[str, dict]  # system -> its scoring task's result (log_probs, flops, params, ms_per_token, ...)
    experts: list[str]  # the pipeline's experts (exact URIs), in cluster order
    composition_experts: dict[str, list[str]] = field(default_factory=dict)  # composed system -> its experts
    validation: dict[str, list] = field(default_factory=dict)  # hub / expert -> validation log-probs
    central_uri: str = ""
    dense_uri: str = ""
    matched_uri: str | None = None
    seed_uri: str | None = None
    mixture_lambda: dict[str, float] = field(default_factory=dict)  # output mixture -> lambda (validation)
    compose_pflops: dict[str, float] = field(default_factory=dict)  # composition mode -> its training
    kway_pflops: dict[str, float] = field(default_factory=dict)  # mode -> its k-way gate's training
    seed_tokens: float = 0.0  # tokens of the seed every expert branched from
    train_tokens: dict[str, float] = field(default_factory=dict)  # model URI -> tokens it trained on


def output_mixture(expert: list[np.ndarray], hub: list[np.ndarray], lam: float) -> list[np.ndarray]:
    """Per document log(lam p_expert + (1 - lam) p_hub) of per-byte log-probabilities."""
    with np.errstate(divide="ignore"):
        a, b = np.log(lam), np.log1p(-lam)
    return [np.logaddexp(a + x, b + y) for x, y in zip(expert, hub)]


def summarise(domains: list[str], docs: list[np.ndarray], scored: Scored, weights: list[np.ndarray],
              domain_expert: dict[str, int], resamples: int = 2000, seed: int = 0) -> dict:
    """bpb per system and domain, routing accuracy and load, cost, and each system's difference
    from the baselines with its paired bootstrap interval; the results table's rows.
    weights: per document (n_bytes, n_experts) cBTM weights of each byte's prefix."""
    results, n_experts = scored.results, len(scored.experts)
    log_probs, cbtm_routes = system_log_probs(domains, docs, results, weights, domain_expert, n_experts)
    lambdas = scored.mixture_lambda
    for system, lam in lambdas.items():
        log_probs[system] = output_mixture(log_probs["cbtm_top1"], log_probs[MIXTURES[system]], lam)
    names = sorted(set(domains))
    order = ["dense", DENSE_MATCHED, "central", "seed", "oracle", "cbtm_top1", "cbtm_top2", "cbtm_all", *MIXTURES,
             *COMPOSED_SYSTEMS] + [f"expert{e}" for e in range(n_experts)]
    order = [s for s in order if s in log_probs]
    bpb = {s: {dom: bits_per_byte([lp for lp, dd in zip(log_probs[s], domains) if dd == dom]) for dom in names}
           | {"all": bits_per_byte(log_probs[s])} for s in order}
    for s in order:  # each domain weighing the same, whatever its held-out bytes
        bpb[s]["macro"] = float(np.mean([bpb[s][dom] for dom in names]))
    metrics: dict[str, float] = {f"bpb/{s}/{dom}": v for s in order for dom, v in bpb[s].items()}
    metrics |= capture(bpb, names)
    routing, heat = routing_metrics(domains, scored, cbtm_routes["cbtm_top1"], domain_expert)
    metrics |= routing
    cost = training_cost(scored, order, n_experts)
    metrics |= {f"train_pflops/{s}": c["train_pflops"] for s, c in cost.items() if "train_pflops" in c}
    metrics |= {f"mixture_lambda/{s}": lam for s, lam in lambdas.items()}
    metrics |= equal_compute(log_probs, {s: c["train_pflops"] for s, c in cost.items() if "train_pflops" in c},
                             [s for s in order if s.startswith(("composed", "cbtm", "mixture"))], resamples, seed)
    deltas = differences(log_probs, [s for s in order if not s.startswith("expert")], resamples, seed)
    metrics |= {f"delta/{d['system']}_vs_{d['baseline']}/{k}": d[k] for d in deltas for k in ("mean", "ci_low", "ci_high")}
    for dom in names:  # the same differences within each domain (its documents only)
        mine = [i for i, dd in enumerate(domains) if dd == dom]
        sliced: dict[int, list] = {}  # one slice per list: a system that is another (central = dense) stays so
        within = differences({s: sliced.setdefault(id(lp), [lp[i] for i in mine]) for s, lp in log_probs.items()},
                             [s for s in order if not s.startswith("expert")], resamples, seed)
        metrics |= {f"delta/{d['system']}_vs_{d['baseline']}/{dom}/{k}": d[k] for d in within
                    for k in ("mean", "ci_low", "ci_high")}
    rows = [{"system": s, **{dom: bpb[s][dom] for dom in names}, "all": bpb[s]["all"], "macro": bpb[s]["macro"],
             "routing_accuracy": metrics.get(f"routing_accuracy/{s}"),
             "experts_per_token": metrics.get(f"experts_per_token/{s}"), **cost.get(s, {})} for s in order]
    # the floor a language model must clear: gzip, bz2, xz on the same documents
    for system, values in compressor_bpb(domains, [bytes(d) for d in docs]).items():
        metrics |= {f"bpb/{system}/{part}": v for part, v in values.items()}
        rows.append({"system": system, **values})
    return {"metrics": metrics, "rows": rows, "domains": names, "heat": heat, "deltas": deltas, "markdown": ""}



def capture(bpb: dict[str, dict[str, float]], domains: list[str]) -> dict[str, float]:
    """capture/<system>/<domain>: the share of the oracle's gain over the central model that a
    system captures there, (central - system) / (central - oracle), for every domain where the
    oracle gains (the oracle is the ceiling of any composition of the same experts)."""
    out = {}
    for dom in domains:
        gain = bpb["central"][dom] - bpb["oracle"][dom] if "oracle" in bpb else 0.0
        if gain <= 0:
            continue
        for s in bpb:
            if s not in ("central", "oracle") and not s.startswith("expert"):
                out[f"capture/{s}/{dom}"] = (bpb["central"][dom] - bpb[s][dom]) / gain
    return out


def differences(log_probs: dict[str, list[np.ndarray]], systems: list[str], resamples: int,
                seed: int) -> list[dict]:
    """bpb(system) - bpb(baseline) for every system against each baseline scored, with its paired
    bootstrap interval over documents (the same resamples for every pair)."""
    out = []
    for baseline in (b for b in BASELINES if b in log_probs):
        for system in (s for s in systems if s != baseline and s in log_probs):
            if system in ("dense", "central") and baseline == DENSE_MATCHED or (
                    system == "central" and log_probs["central"] is log_probs["dense"]):
                continue  # a baseline against the other one is reported once (dense_matched vs dense)
            interval = paired_bootstrap(log_probs[system], log_probs[baseline], resamples, seed=seed)
            out.append({"system": system, "baseline": baseline, "mean": interval.mean, "ci_low": interval.ci_low,
                        "ci_high": interval.ci_high, "holds": interval.excludes_zero() and interval.mean < 0})
    return out


def equal_compute(log_probs: dict[str, list[np.ndarray]], pflops: dict[str, float], systems: list[str],
                  resamples: int, seed: int) -> dict[str, float]:
    """equal_compute/<system>/{mean,ci_low,ci_high}: bpb(system) - bpb(dense model), paired bootstrap
    over documents, against the dense model of the least training compute that is still at least
    the system's (`dense`, or `dense_matched`: the dense model trained on); that model's PFLOPs
    as equal_compute/<system>/dense_pflops. A dense model given more compute than the system errs
    in the dense model's favour; a system more costly than every dense model gets no figure."""
    dense = sorted((pflops[b], b) for b in BASELINES if b in log_probs and b in pflops)
    out = {}
    for system in systems:
        if system not in log_probs or system not in pflops:
            continue
        baseline = next((b for c, b in dense if c >= pflops[system] * (1 - 1e-9)), None)
        if baseline is None:
            continue
        interval = paired_bootstrap(log_probs[system], log_probs[baseline], resamples, seed=seed)
        out |= {f"equal_compute/{system}/mean": interval.mean, f"equal_compute/{system}/ci_low": interval.ci_low,
                f"equal_compute/{system}/ci_high": interval.ci_high,
                f"equal_compute/{system}/dense_pflops": pflops[baseline]}
    return out


def system_log_probs(domains: list[str], docs: list[np.ndarray], results: dict, weights: list[np.ndarray],
                      domain_expert: dict[str, int], n_experts: int) -> tuple[dict, dict]:
    """Per-byte log-probabilities of every system, the oracle and cBTM mixtures included;
    and cBTM's kept weights per system."""
    log_probs: dict[str, list[np.ndarray]] = {name: r["log_probs"] for name, r in results.items()}
    stacked = [np.stack([results[f"expert{e}"]["log_probs"][d] for e in range(n_experts)]) for d in range(len(docs))]
    names = sorted(set(domains))
    # oracle: the domain's expert; a domain the clustering never saw takes its best expert
    per_domain = {e: {dom: bits_per_byte([lp for lp, dd in zip(log_probs[f"expert{e}"], domains) if dd == dom])
                      for dom in names} for e in range(n_experts)}
    oracle_of = {dom: domain_expert.get(dom, min(range(n_experts), key=lambda e: per_domain[e][dom])) for dom in names}
    log_probs["oracle"] = [stacked[d][oracle_of[dom]] for d, dom in enumerate(domains)]
    # cBTM: the router's weights for each byte's prefix, restricted to clusters that have experts
    cbtm_routes = {}
    for name, kk in CBTM.items():
        kept = [keep_top_k(w, kk or n_experts) for w in weights]
        log_probs[name] = [mixture(stacked[d], kept[d]) for d in range(len(docs))]
        cbtm_routes[name] = kept
    return log_probs, cbtm_routes


def routing_metrics(domains: list[str], scored: Scored, cbtm_top1: list[np.ndarray],
             domain_expert: dict[str, int]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Routing accuracy per byte (the share of bytes whose top-1 expert is their domain's), experts
    per token and load of cBTM top-1 and every composed system (top-1 counts per document over
    the pipeline's experts, the last column for others); and each system's domain x expert heat map."""
    results, expert_uris = scored.results, scored.experts
    n_experts = len(expert_uris)
    names = sorted(set(domains))
    known = [d for d, dom in enumerate(domains) if dom in domain_expert]
    routing = {"cbtm_top1": (np.stack([np.bincount(w.argmax(axis=1), minlength=n_experts + 1)
                                       for w in cbtm_top1]), 1.0)}
    for s in COMPOSED_SYSTEMS:
        if s in results:
            # per byte, as cBTM's: the expert weighted most for the prediction of each byte
            # (-1: none, a miss); over the composition's own expert list, remapped
            column = [expert_uris.index(uri) if uri in expert_uris else n_experts
                      for uri in scored.composition_experts[s]]  # n_experts: an expert from outside
            remap = np.stack([np.bincount(np.asarray(column + [n_experts + 1])[c], minlength=n_experts + 2)
                              for c in results[s]["choices"]])  # (docs, n_experts + 2); c = -1 -> the last
            routing[s] = (remap, results[s]["experts_per_token"])
    metrics, heat = {}, {}
    for s, (counts, per_token) in routing.items():
        hits = sum(counts[d, domain_expert[domains[d]]] for d in known)
        total = sum(counts[d].sum() for d in known)  # every byte of the known domains' documents
        counts = counts[:, :n_experts + 1]  # load and heat: the bytes routed somewhere
        if total:
            metrics[f"routing_accuracy/{s}"] = float(hits / total)
        metrics[f"experts_per_token/{s}"] = float(per_token)
        load = counts.sum(axis=0) / max(counts.sum(), 1)
        metrics |= {f"load/{s}/expert{e}": float(x) for e, x in enumerate(load[:n_experts])}
        if load[n_experts]:  # experts from outside the pipeline (added to a composition)
            metrics[f"load/{s}/other"] = float(load[n_experts])
        heat[s] = np.stack([counts[[d for d, dd in enumerate(domains) if dd == dom], :n_experts].sum(axis=0)
                            for dom in names])
    return metrics, heat


def training_cost(scored: Scored, order: list[str], n_experts: int) -> dict[str, dict]:
    """Parameters, training PFLOPs (3 x forward FLOPs x tokens of every model a system uses, plus
    for compositions what the compose stage spent training them), inference MFLOPs and ms per token."""
    results, uris, tokens = scored.results, scored.experts, scored.train_tokens
    experts = [results[f"expert{e}"] for e in range(n_experts)]

    def trained(r: dict, uri: str) -> float:
        return 3 * r["flops"] * tokens.get(uri, 0.0) / 1e15

    # + the shared seed the experts branched from (the dense model's first steps), counted once
    seed_pflops = 3 * results["dense"]["flops"] * scored.seed_tokens / 1e15
    own_pflops = sum(trained(r, u) for r, u in zip(experts, uris))
    experts_pflops = own_pflops + seed_pflops
    central_pflops = trained(results["central"], scored.central_uri)
    dense_pflops = trained(results["dense"], scored.dense_uri)
    mean_flops = float(np.mean([r["flops"] for r in experts]))
    mean_ms = float(np.mean([r["ms_per_token"] for r in experts]))
    all_params = int(sum(r["params"] for r in experts))
    cost = {"dense": {"train_pflops": dense_pflops}, "central": {"train_pflops": central_pflops}}
    if DENSE_MATCHED in results:  # the dense model's training, then its continuation
        cost[DENSE_MATCHED] = {"train_pflops": dense_pflops + trained(results[DENSE_MATCHED], scored.matched_uri)}
    for e, (r, u) in enumerate(zip(experts, uris)):
        cost[f"expert{e}"] = {"train_pflops": trained(r, u)}
    compose = scored.compose_pflops
    for s in order:
        if s in results:
            r = results[s]
            cost.setdefault(s, {}).update(params=int(r["params"]), infer_mflops_per_token=r["flops"] / 1e6,
                                          ms_per_token=r["ms_per_token"])
            if s.startswith("composed"):  # a dense central model already contains the seed
                same = scored.central_uri == scored.dense_uri
                mode = MODE_OF[s]
                hub = 0.0 if mode.endswith("_seed") else central_pflops  # the seed is in experts_pflops
                cost[s]["train_pflops"] = (hub + (own_pflops if same and hub else experts_pflops)
                                           + compose.get(mode, 0.0)
                                           + (scored.kway_pflops.get(mode, 0.0)
                                              if GATE_ONLY.get(s) == "kway" else 0.0))
    if "seed" in results:
        cost.setdefault("seed", {})["train_pflops"] = seed_pflops
    for s, hub in MIXTURES.items():  # the hub and one routed expert per byte
        if hub in results and s in scored.mixture_lambda:
            cost[s] = {"params": all_params + int(results[hub]["params"]),
                       "train_pflops": experts_pflops if hub == "seed" else central_pflops + (
                           own_pflops if scored.central_uri == scored.dense_uri else experts_pflops),
                       "infer_mflops_per_token": (results[hub]["flops"] + mean_flops) / 1e6,
                       "ms_per_token": results[hub]["ms_per_token"] + mean_ms}
    for s, kk in {"oracle": 1, **CBTM}.items():
        kk = min(kk or n_experts, n_experts)  # k expert forwards (the router's tf-idf not counted)
        cost[s] = {"params": all_params, "train_pflops": experts_pflops, "infer_mflops_per_token": kk * mean_flops / 1e6,
                   "ms_per_token": kk * mean_ms}
    return cost


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """What the parent run shows: overall bpb of every system, routing accuracy, experts per token."""
    return {k: v for k, v in metrics.items()
            if (k.startswith("bpb/") and k.endswith("/all")) or k.startswith(HEADLINE[1:])}
