"""The evaluate stage: does composing independently trained experts beat one dense model?

On held-out documents (the pipeline's test split: whole works never trained on; or any
source the corpus loader reads, `--eval-data`), every system is scored byte by byte
(composition.evaluation): dense, central, each expert, the oracle expert, cBTM top-1 /
top-2 / all, and the pipeline's compositions (independent and joint with top-k routing,
independent with adaptive routing). Scoring runs as Ray tasks, one per model or
composition. Results: `bpb/<system>/<domain|all>`, `routing_accuracy/<system>`,
`experts_per_token/<system>`, `load/<system>/<expert>`, cost per system; results.md/.csv
and plots on the evaluate run; the headline metrics on the pipeline's parent run too.

The expert of a domain is the expert of the cluster holding most of that domain's training
documents; the oracle uses it (for a domain the clustering never saw, the expert that
scores best on it). Routing accuracy counts routed rows (cBTM: bytes) whose top-1 expert
is the expert of the document's domain.
"""
from __future__ import annotations

import csv
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.compose_stage import pipeline_models
from pipeline.config import Config
from pipeline.corpus import load_corpus
from pipeline.expert_stage import CENTRAL_MODEL, cluster_assignments
from pipeline.library import COMPOSITION_MODEL, composition_parts, load_router, model_dir, resolve_version
from pipeline.ray_runtime import check_resources, connect_ray
from pipeline.stages import StageError
from pipeline.tokenizer import ByteTokenizer
from pipeline.tracking import Tracker
from routing.ensemble import document_weights

CBTM = {"cbtm_top1": 1, "cbtm_top2": 2, "cbtm_all": None}  # experts mixed per byte (None: all)
COMPOSED = {"independent": "composed_independent", "joint": "composed_joint"}
COMPOSED_SYSTEMS = ("composed_independent", "composed_independent_topk", "composed_joint", "composed_adaptive")
HEADLINE = ("bpb/", "routing_accuracy/", "experts_per_token/")


# --- held-out documents ----------------------------------------------------------------------


def eval_corpus(cfg: Config, eval_data: str | None):
    """The corpus config to score: the pipeline's own (test split), or `eval_data` —
    'embedded', existing files or globs, or a hub data set name (all of its documents)."""
    if not eval_data:
        return cfg.corpus, "test"
    if eval_data == "embedded":
        return replace(cfg.corpus, source="embedded"), "test"
    import glob

    if glob.glob(str(Path(eval_data).expanduser()), recursive=True):
        return replace(cfg.corpus, source="files", files=[eval_data]), None
    return replace(cfg.corpus, source="hub", name=eval_data), None  # offline: read from the local cache


def held_out(cfg: Config, eval_data: str | None) -> tuple[list[str], list[np.ndarray], str]:
    """(domain of each document, its byte tokens, a description), at most
    evaluate.max_bytes_per_domain bytes of whole documents per domain, in a fixed order."""
    corpus, split = eval_corpus(cfg, eval_data)
    docs = [d for d in load_corpus(corpus) if split is None or d.split == split]
    if not docs:
        raise StageError(f"no held-out documents to score in {eval_data or 'the pipeline corpus'}"
                         f"{f' (split {split})' if split else ''}; raise corpus.test_fraction or give --eval-data")
    budget: dict[str, int] = {}
    domains, tokens = [], []
    for doc in sorted(docs, key=lambda d: d.doc_id):
        domain = doc.source or "unlabelled"
        data = np.frombuffer(doc.text.encode("utf-8"), dtype=np.uint8)
        if not len(data) or budget.get(domain, 0) >= cfg.evaluate.max_bytes_per_domain:
            continue
        budget[domain] = budget.get(domain, 0) + len(data)
        domains.append(domain)
        tokens.append(data)
    return domains, tokens, f"{eval_data or 'pipeline corpus'}{f' ({split} split)' if split else ''}"


def domain_experts(table: dict, expert_clusters: list[int]) -> dict[str, int]:
    """domain -> index of the expert whose cluster holds most of the domain's training documents."""
    counts: dict[str, np.ndarray] = {}
    for source, cluster, split in zip(table["source"], table["cluster"], table["split"]):
        if split == "train" and source is not None and cluster in expert_clusters:
            counts.setdefault(source, np.zeros(len(expert_clusters), dtype=np.int64))[expert_clusters.index(cluster)] += 1
    return {domain: int(c.argmax()) for domain, c in counts.items()}


# --- Ray task bodies -----------------------------------------------------------------------


def score_model_task(directory: str, docs: list[np.ndarray], settings: dict) -> dict:
    """Per-byte log-probabilities of one exported model on every document."""
    import torch

    from composition.evaluation import score_documents
    from experts.checkpoint import load_model
    from experts.flops import forward_flops_per_token

    torch.set_num_threads(max(1, int(settings["num_cpus"])))
    model, _ = load_model(directory)
    seq = model.config.block_size
    scores = score_documents(model, docs, settings["eos_id"], seq, settings["stride"] or None, settings["batch_size"])
    return {"log_probs": scores.log_probs, "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in model.parameters()), "flops": forward_flops_per_token(model, seq)}


def score_composition_task(spec: dict, state: dict, docs: list[np.ndarray], settings: dict,
                           routes: list[np.ndarray] | None = None) -> dict:
    """Per-byte log-probabilities of a composition, and which experts its rows were routed to."""
    import torch

    from composition.evaluation import score_documents
    from experts.flops import forward_flops_per_token
    from pipeline.compose_stage import _composed

    composed = _composed(spec, spec["expert_dirs"])
    loaded = composed.load_state_dict(state, strict=False)
    if loaded.unexpected_keys:
        raise StageError(f"composition parameters do not fit its manifest: {loaded.unexpected_keys[:3]}")
    seq = composed.config.block_size
    composed.record_routing = True
    n = len(spec["expert_dirs"])
    scores = score_documents(composed, docs, settings["eos_id"], seq, settings["stride"] or None,
                             settings["batch_size"], n_experts=n, route_weights=routes)
    composed.record_routing = False
    if spec["routing"] == "router":  # FLOPs of a position routed to one expert (top-1)
        composed.prefix_router = lambda idx: torch.nn.functional.one_hot(torch.zeros_like(idx), n).float()
    return {"log_probs": scores.log_probs, "top1_counts": scores.top1_counts, "experts_per_token": scores.experts_per_row,
            "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in composed.parameters()), "flops": forward_flops_per_token(composed, seq)}


# --- the stage ---------------------------------------------------------------------------------


def pipeline_compositions(tracker: Tracker, pipeline_id: str) -> dict[str, object]:
    """The newest registered composition of the pipeline for each mode."""
    found = {}
    for v in sorted(tracker.client.search_model_versions(
            f"name = '{COMPOSITION_MODEL}' and tags.`moie.pipeline` = '{pipeline_id}'"), key=lambda v: int(v.version)):
        if "moie.added_to" not in v.tags:  # an expert added later makes a different system
            found[v.tags.get("moie.mode")] = v
    return found


def run_evaluate(cfg: Config, pipeline_id: str, eval_data: str | None = None) -> dict:
    """Score every system on held-out text; log and return {"metrics", "table"}."""
    tracker = Tracker(cfg)
    tracker.pipeline_run(pipeline_id)
    cluster_run, table, _ = cluster_assignments(tracker, pipeline_id)
    central_uri, expert_uris = pipeline_models(tracker, pipeline_id)
    domains, docs, described = held_out(cfg, eval_data)
    print(f"evaluate: {len(docs)} documents, {sum(len(d) for d in docs)} bytes from {described}", flush=True)
    with tracker.pipeline_active(pipeline_id), tracker.stage_run(pipeline_id, "evaluate") as run_id, \
            tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tracker.log_params(run_id, {"eval_data": described, "documents": len(docs),
                                    "bytes": sum(len(d) for d in docs), **{f"evaluate.{k}": v for k, v in
                                                                           vars(cfg.evaluate).items()}})
        versions = {uri: resolve_version(tracker, uri) for uri in [central_uri, *expert_uris]}
        dense = [v for v in tracker.client.search_model_versions(
            f"name = '{CENTRAL_MODEL}' and tags.`moie.pipeline` = '{pipeline_id}'")
            if v.tags.get("moie.role") in ("dense", "dense+central")]
        dense_uri = f"models:/{CENTRAL_MODEL}/{dense[0].version}" if dense else None
        if dense_uri:
            versions[dense_uri] = dense[0]
        dirs = {uri: model_dir(tracker, v, tmp / f"m{i}") for i, (uri, v) in enumerate(versions.items())}
        expert_clusters = [int(versions[u].tags["moie.cluster"]) for u in expert_uris]
        # cBTM's weights over the pipeline's experts for every byte's prefix, computed once:
        # the cBTM systems mix with them, router-routed compositions take their top-1
        router = load_router(tracker, cluster_run.info.run_id, tmp / "router")
        weights = [document_weights(router, bytes(doc), expert_clusters, len(expert_clusters)) for doc in docs]
        compositions = pipeline_compositions(tracker, pipeline_id)
        routes = {"run": cluster_run.info.run_id, "clusters": expert_clusters, "weights": weights}
        scored = _score_all(cfg, tracker, docs, dirs, central_uri, dense_uri, expert_uris, compositions, routes, tmp)
        scored |= {"central_uri": central_uri, "dense_uri": dense_uri or central_uri,
                   "seed_tokens": float(versions[expert_uris[0]].tags.get("moie.seed_tokens", 0)),
                   "train_tokens": {uri: tracker.client.get_run(v.run_id).data.metrics.get("tokens", 0.0)
                                    for uri, v in versions.items()}}
        outcome = summarise(domains, docs, scored, weights, domain_experts(table, expert_clusters))
        metrics = outcome["metrics"]
        tracker.log_metrics(run_id, metrics)
        tracker.log_metrics(pipeline_id, headline(metrics))
        out = tmp / "results"
        out.mkdir()
        write_results(out, outcome)
        plot_curves(tracker, pipeline_id, out / "curves")
        tracker.log_artifact_dir(run_id, out)
        print(outcome["markdown"], flush=True)
    return outcome


def _score_all(cfg: Config, tracker: Tracker, docs: list[np.ndarray], dirs: dict, central_uri: str,
               dense_uri: str | None, expert_uris: list[str], compositions: dict, pipeline_routes: dict,
               tmp: Path) -> dict:
    """Ray tasks: one per model, one per composition (and routing); {system: result}."""
    import ray

    connect_ray(cfg.ray)
    ev = cfg.evaluate
    check_resources(ev.num_cpus, what="evaluation task (evaluate.num_cpus)")
    settings = {"eos_id": ByteTokenizer().eos_id, "stride": ev.stride, "batch_size": ev.batch_size,
                "num_cpus": ev.num_cpus}
    docs_ref = ray.put(docs)
    model_task = ray.remote(score_model_task).options(num_cpus=ev.num_cpus)
    comp_task = ray.remote(score_composition_task).options(num_cpus=ev.num_cpus)
    refs = {"central": model_task.remote(dirs[central_uri], docs_ref, settings)}
    used: dict[str, list[str]] = {}  # composed system -> its experts, in its own order
    if dense_uri and dense_uri != central_uri:
        refs["dense"] = model_task.remote(dirs[dense_uri], docs_ref, settings)
    for e, uri in enumerate(expert_uris):
        refs[f"expert{e}"] = model_task.remote(dirs[uri], docs_ref, settings)
    for mode, version in compositions.items():
        if mode not in COMPOSED:
            continue
        state, manifest = composition_parts(tracker, version, tmp / f"composition-{mode}")
        uris = manifest["experts"]
        for uri in [manifest["central"], *uris]:
            if uri not in dirs:
                dirs[uri] = model_dir(tracker, resolve_version(tracker, uri), tmp / f"m{len(dirs)}")
        spec = {"central_dir": dirs[manifest["central"]], "expert_dirs": [dirs[u] for u in uris],
                "n_points": manifest["n_points"], "routing": manifest["routing"], "k": manifest["k"],
                "threshold": manifest["threshold"], "pool": manifest.get("pool", "token"), "num_cpus": ev.num_cpus,
                "seed": cfg.seed, "experts": uris}
        routes = None
        if manifest["routing"] == "router":  # cBTM weights of each document's prefixes, top-1
            routes = ray.put(_document_routes(tracker, manifest, docs, pipeline_routes, tmp))
        name = COMPOSED[mode]
        refs[name] = comp_task.remote(spec, state, docs_ref, settings, routes)
        used[name] = uris
        if mode == "independent":  # the same gates routing on their own: top-k affinity, and adaptive
            for variant, routing in (("composed_independent_topk", "topk"), ("composed_adaptive", "adaptive")):
                refs[variant] = comp_task.remote({**spec, "routing": routing}, state, docs_ref, settings)
                used[variant] = uris
    results = dict(zip(refs, ray.get(list(refs.values()))))
    results["dense"] = results.get("dense", results["central"])
    return {"results": results, "experts": expert_uris, "composition_experts": used}


def _document_routes(tracker: Tracker, manifest: dict, docs: list[np.ndarray], pipeline_routes: dict,
                     tmp: Path) -> list[np.ndarray]:
    """Top-1 cBTM weights of a router-routed composition's experts for each document's prefixes:
    from the pipeline's own weights when the composition uses its router, else from its router."""
    from routing.ensemble import keep_top_k

    clusters = manifest["clusters"]
    if manifest["router_run"] == pipeline_routes["run"] and set(clusters) <= set(pipeline_routes["clusters"]):
        columns = [pipeline_routes["clusters"].index(c) for c in clusters]
        return [keep_top_k(w[:, columns], 1).astype(np.float32) for w in pipeline_routes["weights"]]
    router = load_router(tracker, manifest["router_run"], tmp / f"router-{manifest['router_run']}")
    return [document_weights(router, bytes(d), clusters, 1) for d in docs]


def summarise(domains: list[str], docs: list[np.ndarray], scored: dict, weights: list[np.ndarray],
              domain_expert: dict[str, int]) -> dict:
    """weights: per document (n_bytes, n_experts) cBTM weights of each byte's prefix."""
    """bpb per system and domain, routing accuracy and load, cost; the results table."""
    from composition.evaluation import bits_per_byte, mixture
    from routing.ensemble import keep_top_k

    results, expert_uris = scored["results"], scored["experts"]
    n_experts = len(expert_uris)
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
    metrics: dict[str, float] = {}
    order = ["dense", "central", "oracle", "cbtm_top1", "cbtm_top2", "cbtm_all", *COMPOSED_SYSTEMS] + [
        f"expert{e}" for e in range(n_experts)]
    order = [s for s in order if s in log_probs]
    bpb = {s: {dom: bits_per_byte([lp for lp, dd in zip(log_probs[s], domains) if dd == dom]) for dom in names}
           | {"all": bits_per_byte(log_probs[s])} for s in order}
    for s in order:
        metrics |= {f"bpb/{s}/{dom}": v for dom, v in bpb[s].items()}
    # routing: which expert each system's top-1 picks, per domain
    known = [d for d, dom in enumerate(domains) if dom in domain_expert]
    routing = {}
    top1 = np.stack([np.bincount(w.argmax(axis=1), minlength=n_experts + 1) for w in cbtm_routes["cbtm_top1"]])
    routing["cbtm_top1"] = (top1, 1.0)
    for s in COMPOSED_SYSTEMS:
        if s in results:
            counts = results[s]["top1_counts"]  # over the composition's own expert list
            comp_experts = scored["composition_experts"][s]
            remap = np.zeros((counts.shape[0], n_experts + 1), dtype=np.int64)  # last column: other experts
            for j, uri in enumerate(comp_experts):
                remap[:, expert_uris.index(uri) if uri in expert_uris else n_experts] += counts[:, j]
            routing[s] = (remap, results[s]["experts_per_token"])
    heat = {}
    for s, (counts, per_token) in routing.items():
        hits = sum(counts[d, domain_expert[domains[d]]] for d in known)
        total = sum(counts[d].sum() for d in known)
        if total:
            metrics[f"routing_accuracy/{s}"] = float(hits / total)
        metrics[f"experts_per_token/{s}"] = float(per_token)
        load = counts.sum(axis=0) / max(counts.sum(), 1)
        metrics |= {f"load/{s}/expert{e}": float(x) for e, x in enumerate(load[:n_experts])}
        if load[n_experts]:  # experts from outside the pipeline (added to a composition)
            metrics[f"load/{s}/other"] = float(load[n_experts])
        heat[s] = np.stack([counts[[d for d, dd in enumerate(domains) if dd == dom], :n_experts].sum(axis=0)
                            for dom in names])
    cost = _cost(scored, order, n_experts)
    rows = [{"system": s, **{dom: bpb[s][dom] for dom in names}, "all": bpb[s]["all"],
             "routing_accuracy": metrics.get(f"routing_accuracy/{s}"),
             "experts_per_token": metrics.get(f"experts_per_token/{s}"), **cost.get(s, {})} for s in order]
    return {"metrics": metrics, "rows": rows, "domains": names, "heat": heat, "markdown": ""}


def _cost(scored: dict, order: list[str], n_experts: int) -> dict[str, dict]:
    """Parameters, training PFLOPs (3 x forward FLOPs x tokens of every model a system uses;
    composition training not included), inference MFLOPs and ms per token."""
    results, uris, tokens = scored["results"], scored["experts"], scored["train_tokens"]
    experts = [results[f"expert{e}"] for e in range(n_experts)]

    def trained(r: dict, uri: str) -> float:
        return 3 * r["flops"] * tokens.get(uri, 0.0) / 1e15

    # + the shared seed the experts branched from (the dense model's first steps), counted once
    seed_pflops = 3 * results["dense"]["flops"] * scored.get("seed_tokens", 0.0) / 1e15
    own_pflops = sum(trained(r, u) for r, u in zip(experts, uris))
    experts_pflops = own_pflops + seed_pflops
    central_pflops = trained(results["central"], scored["central_uri"])
    mean_flops = float(np.mean([r["flops"] for r in experts]))
    mean_ms = float(np.mean([r["ms_per_token"] for r in experts]))
    all_params = int(sum(r["params"] for r in experts))
    cost = {"dense": {"train_pflops": trained(results["dense"], scored["dense_uri"])},
            "central": {"train_pflops": central_pflops}}
    for e, (r, u) in enumerate(zip(experts, uris)):
        cost[f"expert{e}"] = {"train_pflops": trained(r, u)}
    for s in order:
        if s in results:
            r = results[s]
            cost.setdefault(s, {}).update(params=int(r["params"]), infer_mflops_per_token=r["flops"] / 1e6,
                                          ms_per_token=r["ms_per_token"])
            if s.startswith("composed"):  # a dense central model already contains the seed
                same = scored["central_uri"] == scored["dense_uri"]
                cost[s]["train_pflops"] = central_pflops + (own_pflops if same else experts_pflops)
    for s, kk in {"oracle": 1, **CBTM}.items():
        kk = min(kk or n_experts, n_experts)  # k expert forwards (the router's tf-idf not counted)
        cost[s] = {"params": all_params, "train_pflops": experts_pflops, "infer_mflops_per_token": kk * mean_flops / 1e6,
                   "ms_per_token": kk * mean_ms}
    return cost


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """What the parent run shows: overall bpb of every system, routing accuracy, experts per token."""
    return {k: v for k, v in metrics.items()
            if (k.startswith("bpb/") and k.endswith("/all")) or k.startswith(HEADLINE[1:])}


def write_results(out: Path, outcome: dict) -> None:
    """results.md, results.csv, bpb_by_domain.png, routing_heatmap.png."""
    rows, names = outcome["rows"], outcome["domains"]
    columns = ["system", *names, "all", "routing_accuracy", "experts_per_token", "params", "train_pflops",
               "infer_mflops_per_token", "ms_per_token"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    outcome["markdown"] = markdown_table(rows, columns)
    (out / "results.md").write_text("bits per byte on held-out text (lower is better)\n\n" + outcome["markdown"] + "\n")
    plot_bpb(rows, names, out / "bpb_by_domain.png")
    plot_heatmap(outcome["heat"], names, out / "routing_heatmap.png")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    head = ["system", *[c.replace("_", " ") for c in columns[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bpb(rows: list[dict], names: list[str], path: Path) -> None:
    plt = _plt()
    shown = [r for r in rows if not r["system"].startswith("expert")]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * (len(names) + 1), 4))
    width = 0.8 / max(len(shown), 1)
    for i, r in enumerate(shown):
        ax.bar(np.arange(len(names) + 1) + i * width, [r[n] for n in [*names, "all"]], width, label=r["system"])
    ax.set_xticks(np.arange(len(names) + 1) + 0.4 - width / 2, [*names, "all"], rotation=20)
    ax.set_ylabel("bits per byte")
    low = min(r[n] for r in shown for n in [*names, "all"])
    ax.set_ylim(bottom=max(0.0, low - 0.5))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmap(heat: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(heat), 1), figsize=(1 + 3.2 * max(len(heat), 1), 1 + 0.45 * len(names)),
                             squeeze=False)
    for ax, (system, counts) in zip(axes[0], heat.items()):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
        ax.set_xticks(range(share.shape[1]), [f"e{j}" for j in range(share.shape[1])])
        ax.set_yticks(range(len(names)), names)
        ax.set_title(system, fontsize=9)
        ax.set_xlabel("top-1 expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(tracker: Tracker, pipeline_id: str, out: Path) -> None:
    """One PNG per trained model of the pipeline: its training loss and validation bpb."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    for run in tracker.stage_runs(pipeline_id, "experts"):
        name = run.data.tags.get("moie.expert", run.info.run_id)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in ("train_loss", "val_bpb"):
            history = tracker.client.get_metric_history(run.info.run_id, key)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
