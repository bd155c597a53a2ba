"""The evaluate stage: does composing independently trained experts beat one dense model?

On held-out documents (the pipeline's test split: whole works never trained on; or any
source the corpus loader reads, `--eval-data`), every system is scored byte by byte
(composition.evaluation): dense, central, each expert, the oracle expert, cBTM top-1 /
top-2 / all, and the pipeline's compositions (independent and joint with top-k routing,
independent with adaptive routing); beside them the floor every model must clear, gzip,
bz2 and xz at their strongest settings, each document alone and each domain together. Scoring runs as Ray tasks, one per model or
composition. Results: `bpb/<system>/<domain|all>`, `routing_accuracy/<system>`,
`experts_per_token/<system>`, `load/<system>/<expert>`, cost per system; results.md/.csv
and plots on the evaluate run; the headline metrics on the pipeline's parent run too.

The expert of a domain is the expert of the cluster holding most of that domain's training
documents; the oracle uses it (for a domain the clustering never saw, the expert that
scores best on it). Routing accuracy counts routed rows (cBTM: bytes) whose top-1 expert
is the expert of the document's domain.
"""
from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from composition.evaluation import bits_per_byte, mixture, score_documents, stream_documents
from composition.intervals import paired_bootstrap
from composition.loader import CompositionSettings, load_composed
from experts.checkpoint import load_model
from experts.flops import forward_flops_per_token
from pipeline.store.catalog import CHAMPION, COMPOSITION_MODEL, DENSE_MATCHED, Catalog, exact_uri, fetch_models
from pipeline.results.compressors import compressor_bpb
from pipeline.config import Config
from pipeline.text.corpus import FILE_BUILDERS, clustered_documents, load_corpus
from pipeline.errors import StageError
from pipeline.serve.library import set_alias
from pipeline.text.overlap import ShingleIndex
from pipeline.ray_runtime import check_resources, connect_cluster, get_or_fail, use_granted_cpus
from pipeline.results.report import plot_curves, write_results
from pipeline.results.routing_page import render as render_routing
from experts.tokenizer import EOS_ID, encode_bytes
from routing.ensemble import document_weights, keep_top_k

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
ROUTING_PAGE = "routing.html"  # an artifact of the evaluate run (results/), shown by the MLflow UI
PAGE_BYTES = 2000  # of each document on the routing page


# --- held-out documents ----------------------------------------------------------------------


def eval_corpus(cfg: Config, eval_data: str | None):
    """The corpus config to score: the pipeline's own (test split), or `eval_data` —
    'embedded', existing files or globs, or a hub data set name (all of its documents)."""
    if not eval_data:
        return cfg.corpus, "test"
    other = replace(cfg.corpus, exclude_sources=[])  # other text is scored whole: a domain left out of training too
    if eval_data == "embedded":
        return replace(other, source="embedded"), "test"
    if glob.glob(str(Path(eval_data).expanduser()), recursive=True):
        return replace(other, source="files", files=[eval_data]), None
    if looks_like_path(eval_data):
        raise StageError(f"--eval-data {eval_data!r} matches no file; give existing files or a glob (.txt, .jsonl, "
                         ".parquet, ...), 'embedded', or a hub data set name")
    return replace(other, source="hub", name=eval_data), None  # offline: read from the local cache


def looks_like_path(value: str) -> bool:
    """A path or glob rather than a hub data set name ('owner/name'): a file suffix moie reads, a
    leading / . or ~, glob characters, or a first folder that exists."""
    first = value.split("/", 1)[0]
    return (Path(value).suffix.lower() in FILE_BUILDERS or value.startswith(("/", ".", "~"))
            or any(c in value for c in "*?[") or ("/" in value and Path(first).is_dir()))


@dataclass
class HeldOut:
    """The documents to score and how much of them the training split already holds."""

    domains: list[str]  # each document's domain
    tokens: list[np.ndarray]  # its bytes
    described: str
    overlap: dict[str, float]  # domain -> share of kept bytes covered by training shingles
    overlap_before: dict[str, float]  # ... of every held-out document of the domain, before dropping
    dropped: dict[str, int]  # domain -> documents dropped as near-duplicates of training text


def held_out(cfg: Config, eval_data: str | None, table: dict | None = None) -> HeldOut:
    """At most evaluate.max_bytes_per_domain bytes of whole documents per domain, in a fixed
    order, dropping every document whose bytes sit in training shingles above evaluate.max_overlap.
    `table`: the pipeline's assignments, which the pipeline's corpus must still match."""
    corpus, split = eval_corpus(cfg, eval_data)
    everything = load_corpus(corpus)
    docs = [d for d in everything if split is None or d.split == split]
    if not docs:
        raise StageError(f"no held-out documents to score in {eval_data or 'the pipeline corpus'}"
                         f"{f' (split {split})' if split else ''}; raise corpus.test_fraction or give --eval-data")
    training = everything if corpus == cfg.corpus else load_corpus(cfg.corpus)
    if table is not None:
        clustered_documents(table, training)
    ev = cfg.evaluate
    index = ShingleIndex((d.text.encode("utf-8") for d in training if d.split == "train"), ev.shingle_words)
    budget: dict[str, int] = {}
    covered: dict[str, list[int]] = {}  # domain -> [covered bytes kept, bytes kept, covered all, bytes all]
    out = HeldOut([], [], f"{eval_data or 'pipeline corpus'}{f' ({split} split)' if split else ''}", {}, {}, {})
    for doc in sorted(docs, key=lambda d: d.doc_id):
        domain = doc.source or "unlabelled"
        data = doc.text.encode("utf-8")
        if not data:
            continue
        hits = int(index.covered(data).sum())
        tally = covered.setdefault(domain, [0, 0, 0, 0])
        tally[2:] = [tally[2] + hits, tally[3] + len(data)]
        if hits > ev.max_overlap * len(data):
            out.dropped[domain] = out.dropped.get(domain, 0) + 1
            continue
        if budget.get(domain, 0) >= ev.max_bytes_per_domain:
            continue
        budget[domain] = budget.get(domain, 0) + len(data)
        tally[:2] = [tally[0] + hits, tally[1] + len(data)]
        out.domains.append(domain)
        out.tokens.append(encode_bytes(data))
    if not out.tokens:
        raise StageError(f"every held-out document of {out.described} overlaps the training split by more than "
                         f"evaluate.max_overlap={ev.max_overlap}; raise it (1 keeps every document)")
    for domain, (hits, n, hits_all, n_all) in covered.items():
        out.overlap_before[domain] = hits_all / n_all
        if n:
            out.overlap[domain] = hits / n
    return out


def domain_experts(table: dict, expert_clusters: list[int]) -> dict[str, int]:
    """domain -> index of the expert whose cluster holds most of the domain's training documents."""
    counts: dict[str, np.ndarray] = {}
    for source, cluster, split in zip(table["source"], table["cluster"], table["split"]):
        if split == "train" and source is not None and cluster in expert_clusters:
            counts.setdefault(source, np.zeros(len(expert_clusters), dtype=np.int64))[expert_clusters.index(cluster)] += 1
    return {domain: int(c.argmax()) for domain, c in counts.items()}


# --- Ray task bodies -----------------------------------------------------------------------


@dataclass
class Scoring:
    """How held-out documents are scored: windows of the model's block size moving by `stride`."""

    eos_id: int
    stride: int | None
    batch_size: int
    num_cpus: float


@dataclass
class ComposedSystem:
    """A registered composition as a scoring task loads it (its parts fetched from the registry)."""

    tracking_uri: str
    central: str  # exact URIs
    experts: list[str]  # in the composition's order
    settings: CompositionSettings
    seed: int


def score_model_task(tracking_uri: str, uri: str, docs: list[np.ndarray], scoring: Scoring) -> dict:
    """Per-byte log-probabilities of one registered model on every document."""
    use_granted_cpus(scoring.num_cpus)
    with tempfile.TemporaryDirectory(prefix="moie-task-") as scratch:
        model, _ = load_model(fetch_models(tracking_uri, [uri], Path(scratch))[0])
    seq = model.config.block_size
    scores = score_documents(model, docs, scoring.eos_id, seq, scoring.stride, scoring.batch_size)
    return {"log_probs": scores.log_probs, "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in model.parameters()), "flops": forward_flops_per_token(model, seq)}


def score_composition_task(system: ComposedSystem, state: dict, docs: list[np.ndarray], scoring: Scoring,
                           routes: list[np.ndarray] | None = None) -> dict:
    """Per-byte log-probabilities of a composition, and which experts its rows were routed to."""
    import torch

    use_granted_cpus(scoring.num_cpus, system.seed)
    with tempfile.TemporaryDirectory(prefix="moie-task-") as scratch:
        central, *experts = fetch_models(system.tracking_uri, [system.central, *system.experts], Path(scratch))
        composed = load_composed(central, experts, system.settings, state)
    seq = composed.config.block_size
    composed.record_routing = True
    n = len(system.experts)
    scores = score_documents(composed, docs, scoring.eos_id, seq, scoring.stride, scoring.batch_size,
                             n_experts=n, route_weights=routes)
    composed.record_routing = False
    if system.settings.routing == "router":  # FLOPs of a position routed to one expert (top-1)
        composed.prefix_router = lambda idx: torch.nn.functional.one_hot(torch.zeros_like(idx), n).float()
    return {"log_probs": scores.log_probs, "top1_counts": scores.top1_counts, "experts_per_token": scores.experts_per_row,
            "choices": scores.choices,
            "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in composed.parameters()), "flops": forward_flops_per_token(composed, seq)}


# --- the stage ---------------------------------------------------------------------------------


def run_evaluate(cfg: Config, pipeline_id: str, eval_data: str | None = None) -> dict:
    """Score every system on held-out text; log and return {"metrics", "rows", "markdown", ...}."""
    catalog = Catalog(cfg)
    tracker = catalog.tracker
    connect_cluster(cfg, tracker)  # before any work: a multi-node cluster needs shared stores
    tracker.pipeline_run(pipeline_id)
    cluster_run, table, _ = catalog.assignments(pipeline_id)
    central_uri, expert_uris = catalog.pipeline_models(pipeline_id)
    held = held_out(cfg, eval_data, table)
    domains, docs, described = held.domains, held.tokens, held.described
    print(f"evaluate: {len(docs)} documents, {sum(len(d) for d in docs)} bytes from {described}; dropped as "
          f"near-duplicates of training text: {held.dropped or 'none'}", flush=True)
    with tracker.pipeline_active(pipeline_id), tracker.stage_run(pipeline_id, "evaluate") as run_id, \
            tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tracker.log_params(run_id, {"eval_data": described, "documents": len(docs),
                                    "bytes": sum(len(d) for d in docs), **{f"evaluate.{k}": v for k, v in
                                                                           vars(cfg.evaluate).items()}})
        versions = {uri: catalog.resolve(uri) for uri in [central_uri, *expert_uris]}
        dense = catalog.dense_model(pipeline_id)
        dense_uri = exact_uri(dense) if dense else None
        if dense:
            versions[dense_uri] = dense
        matched = catalog.matched_model(pipeline_id)
        matched_uri = exact_uri(matched) if matched else None
        if matched:
            versions[matched_uri] = matched
        expert_clusters = [int(versions[u].tags["moie.cluster"]) for u in expert_uris]
        # cBTM's weights over the pipeline's experts for every byte's prefix, computed once:
        # the cBTM systems mix with them, router-routed compositions take their top-1
        router = catalog.router(cluster_run.info.run_id, tmp / "router")
        weights = [document_weights(router, bytes(doc), expert_clusters, len(expert_clusters)) for doc in docs]
        routes = {"run": cluster_run.info.run_id, "clusters": expert_clusters, "weights": weights}
        compositions = catalog.pipeline_compositions(pipeline_id)
        seed = catalog.seed_model(pipeline_id)
        seed_uri = exact_uri(seed) if seed else None
        if seed:
            versions[seed_uri] = seed
        try:
            validation = validation_set(cfg, catalog, [versions[u] for u in expert_uris], router, expert_clusters, tmp)
        except StageError as err:  # e.g. the experts' token files are not in this storage: no output mixtures
            print(f"evaluate: warning: no output mixtures ({err})", flush=True)
            validation = {"docs": [], "weights": []}
        scored = _score_all(cfg, catalog, docs, central_uri, dense_uri, matched_uri, expert_uris,
                            compositions, routes, tmp, seed_uri, validation)
        scored |= {"central_uri": central_uri, "dense_uri": dense_uri or central_uri, "matched_uri": matched_uri,
                   "seed_uri": seed_uri, "mixture_lambda": mixture_lambdas(scored["validation"], validation["weights"]),
                   "compose_pflops": {mode: tracker.client.get_run(v.run_id).data.metrics.get("train_pflops", 0.0)
                                      for mode, v in compositions.items()},
                   # the k-way gate's training: only the systems that route by it pay for it
                   "kway_pflops": {mode: tracker.client.get_run(v.run_id).data.metrics.get("kway_pflops", 0.0)
                                   for mode, v in compositions.items()},
                   "seed_tokens": float(versions[expert_uris[0]].tags.get("moie.seed_tokens", 0)),
                   "train_tokens": {uri: tracker.client.get_run(v.run_id).data.metrics.get("tokens", 0.0)
                                    for uri, v in versions.items()}}
        outcome = summarise(domains, docs, scored, weights, domain_experts(table, expert_clusters),
                            cfg.evaluate.bootstrap, cfg.seed)
        metrics = outcome["metrics"] | overlap_metrics(held)
        matched_pflops = metrics.get(f"train_pflops/{DENSE_MATCHED}", float("inf"))
        costlier = [s for s in COMPOSED_SYSTEMS if metrics.get(f"train_pflops/{s}", 0.0) > matched_pflops * (1 + 1e-9)]
        if costlier:  # e.g. a mode composed after dense_matched was matched to the others
            print(f"evaluate: warning: {', '.join(costlier)} cost more training compute than {DENSE_MATCHED} "
                  f"({matched_pflops:.4f} PFLOPs): their comparison with it is not at equal compute", flush=True)
        tracker.log_metrics(run_id, metrics)
        tracker.log_metrics(pipeline_id, headline(metrics))
        champion = crown_champion(catalog, compositions)
        out = tmp / "results"
        out.mkdir()
        if champion:
            tracker.set_tags(run_id, {"moie.champion": champion})
            page = routing_page(catalog, champion, compositions, scored, domains, docs)
            if page:
                (out / ROUTING_PAGE).write_text(page, encoding="utf-8")
        outcome["markdown"] = write_results(out, outcome["rows"], outcome["domains"], outcome["heat"],
                                            outcome["deltas"])
        plot_curves(training_curves(catalog, pipeline_id), out / "curves")
        tracker.log_artifact_dir(run_id, out)
        print(outcome["markdown"], flush=True)
    return outcome


def crown_champion(catalog: Catalog, compositions: dict) -> str | None:
    """Point the alias `champion` of moie-composition at the pipeline's composition with the lowest
    validation bits per byte (logged by the compose stage: chosen on validation, never on the
    test split); say which it chose. Returns its exact URI (None: no composition)."""
    scored = {exact_uri(v): catalog.client.get_run(v.run_id).data.metrics.get("val_bpb")
              for v in compositions.values()}
    scored = {uri: bpb for uri, bpb in scored.items() if bpb is not None}
    if not scored:
        return None
    best = min(scored, key=scored.get)
    set_alias(catalog, best, CHAMPION)
    others = ", ".join(f"{uri} {bpb:.4f}" for uri, bpb in sorted(scored.items()) if uri != best) or "none"
    print(f"evaluate: models:/{COMPOSITION_MODEL}@{CHAMPION} -> {best} (validation bits per byte "
          f"{scored[best]:.4f}; the others: {others})", flush=True)
    return best


def routing_page(catalog: Catalog, champion: str, compositions: dict, scored: dict, domains: list[str],
                 docs: list[np.ndarray]) -> str | None:
    """The routing page of the champion composition on the first held-out document of each domain
    (at most PAGE_BYTES of each): its router's expert per byte, bits saved over the central model."""
    mode = next(m for m, v in compositions.items() if exact_uri(v) == champion)
    system = COMPOSED.get(mode)
    result, central = scored["results"].get(system), scored["results"]["central"]
    if result is None or result.get("choices") is None:
        return None
    experts = []
    for uri in scored["composition_experts"][system]:
        tags = catalog.resolve(uri).tags
        experts.append({"name": tags.get("moie.expert", uri), "cluster": tags.get("moie.cluster", "?"),
                        "domain": tags.get("moie.domain", "?"), "uri": uri,
                        "purity": float(tags["moie.purity"]) if "moie.purity" in tags else None})
    documents = []
    for domain in dict.fromkeys(domains):  # first appearance order
        i = domains.index(domain)
        saved = (result["log_probs"][i] - central["log_probs"][i]) / np.log(2)  # bits per byte
        shown = f" (the first {PAGE_BYTES:,} shown)" if len(docs[i]) > PAGE_BYTES else ""
        documents.append({"label": f"{domain}: held-out document {i}, {len(docs[i])} bytes{shown}; composition "
                                   f"{bits_per_byte([result['log_probs'][i]]):.3f} vs central "
                                   f"{bits_per_byte([central['log_probs'][i]]):.3f} bits per byte",
                          "bytes": bytes(docs[i][:PAGE_BYTES].astype(np.uint8)),
                          "choices": result["choices"][i][:PAGE_BYTES], "saved_bits": saved[:PAGE_BYTES]})
    return render_routing(documents, experts, f"Routing of {champion} ({mode}) on held-out text")


def _score_all(cfg: Config, catalog: Catalog, docs: list[np.ndarray], central_uri: str,
               dense_uri: str | None, matched_uri: str | None, expert_uris: list[str], compositions: dict,
               pipeline_routes: dict, tmp: Path, seed_uri: str | None = None, validation: dict | None = None) -> dict:
    """Ray tasks: one per model, one per composition (and routing), each fetching its models
    from the registry; {system: result}; and the central model's, the seed's and every expert's
    log-probabilities on the validation documents (to choose the output mixtures' lambda)."""
    connect_cluster(cfg, catalog.tracker)
    ev = cfg.evaluate
    check_resources(ev.num_cpus, what="evaluation task (evaluate.num_cpus)")
    scoring = Scoring(eos_id=EOS_ID, stride=ev.stride or None, batch_size=ev.batch_size,
                      num_cpus=ev.num_cpus)
    docs_ref = ray.put(docs)
    model_task = ray.remote(score_model_task).options(num_cpus=ev.num_cpus)
    comp_task = ray.remote(score_composition_task).options(num_cpus=ev.num_cpus)
    store = catalog.tracker.uri
    refs = {"central": model_task.remote(store, central_uri, docs_ref, scoring)}
    used: dict[str, list[str]] = {}  # composed system -> its experts, in its own order
    if dense_uri and dense_uri != central_uri:
        refs["dense"] = model_task.remote(store, dense_uri, docs_ref, scoring)
    if matched_uri:
        refs[DENSE_MATCHED] = model_task.remote(store, matched_uri, docs_ref, scoring)
    for e, uri in enumerate(expert_uris):
        refs[f"expert{e}"] = model_task.remote(store, uri, docs_ref, scoring)
    if seed_uri:
        refs["seed"] = model_task.remote(store, seed_uri, docs_ref, scoring)
    hubs = {"central": central_uri, **({"seed": seed_uri} if seed_uri else {})}
    val_refs = {}
    if validation and validation["docs"]:
        val_docs = ray.put(validation["docs"])
        val_refs = {f"val/{name}": model_task.remote(store, uri, val_docs, scoring)
                    for name, uri in [*hubs.items(), *((f"expert{e}", u) for e, u in enumerate(expert_uris))]}
    for mode, version in compositions.items():
        if mode not in COMPOSED:
            continue
        state, manifest = catalog.composition_parts(version, tmp / f"composition-{mode}")
        uris = manifest["experts"]
        system = ComposedSystem(tracking_uri=store, central=manifest["central"], experts=uris,
                                settings=CompositionSettings.from_manifest(manifest), seed=cfg.seed)
        routes = None
        if system.settings.routing == "router":  # cBTM weights of each document's prefixes, top-1
            routes = ray.put(_document_routes(catalog, manifest, docs, pipeline_routes, tmp))
        name = COMPOSED[mode]
        refs[name] = comp_task.remote(system, state, docs_ref, scoring, routes)
        used[name] = uris
        if mode == "independent":  # the same gates routing on their own (the k-way gate where there is one)
            for variant, routing in GATE_ONLY.items():
                if routing == "kway" and not system.settings.kway:
                    continue
                gated = replace(system, settings=replace(system.settings, routing=routing))
                refs[variant] = comp_task.remote(gated, state, docs_ref, scoring)
                used[variant] = uris
    everything = {**refs, **val_refs}
    results = dict(zip(everything, get_or_fail(list(everything.values()), "evaluation's scoring task")))
    val = {name.removeprefix("val/"): results.pop(name)["log_probs"] for name in val_refs}
    results["dense"] = results.get("dense", results["central"])
    return {"results": results, "experts": expert_uris, "composition_experts": used, "validation": val}


def validation_set(cfg: Config, catalog: Catalog, experts: list, router, clusters: list[int], tmp: Path) -> dict:
    """Whole validation documents, an equal share (compose.eval_tokens / experts) of each expert's
    own cluster, and cBTM's top-1 weights over the experts for each byte's prefix: {"docs", "weights"}."""
    from pipeline.store import storage

    eos, share = EOS_ID, max(1, cfg.compose.eval_tokens // max(len(experts), 1))
    docs = []
    for version in experts:
        tokens = np.load(storage.local_copy(catalog.data_path(version, "val"), tmp / "val"), mmap_mode="r")
        docs += [np.asarray(d, dtype=np.uint8) for d in stream_documents(tokens, eos, share)]
    return {"docs": docs, "weights": [document_weights(router, bytes(d), clusters, 1) for d in docs]}


def mixture_lambdas(validation: dict[str, list[np.ndarray]], weights: list[np.ndarray]) -> dict[str, float]:
    """For each output mixture whose hub was scored on validation: the lambda of LAMBDAS whose
    mixture lambda p_routed + (1 - lambda) p_hub has the lowest validation bits per byte."""
    if not validation:
        return {}
    n = sum(1 for k in validation if k.startswith("expert"))
    routed = [mixture(np.stack([validation[f"expert{e}"][d] for e in range(n)]), w) for d, w in enumerate(weights)]
    return {system: min(LAMBDAS, key=lambda lam: bits_per_byte(output_mixture(routed, validation[hub], lam)))
            for system, hub in MIXTURES.items() if hub in validation}


def output_mixture(expert: list[np.ndarray], hub: list[np.ndarray], lam: float) -> list[np.ndarray]:
    """Per document log(lam p_expert + (1 - lam) p_hub) of per-byte log-probabilities."""
    with np.errstate(divide="ignore"):
        a, b = np.log(lam), np.log1p(-lam)
    return [np.logaddexp(a + x, b + y) for x, y in zip(expert, hub)]


def _document_routes(catalog: Catalog, manifest: dict, docs: list[np.ndarray], pipeline_routes: dict,
                     tmp: Path) -> list[np.ndarray]:
    """Top-1 cBTM weights of a router-routed composition's experts for each document's prefixes:
    from the pipeline's own weights when the composition uses its router, else from its router."""
    clusters = manifest["clusters"]
    if manifest["router_run"] == pipeline_routes["run"] and set(clusters) <= set(pipeline_routes["clusters"]):
        columns = [pipeline_routes["clusters"].index(c) for c in clusters]
        return [keep_top_k(w[:, columns], 1).astype(np.float32) for w in pipeline_routes["weights"]]
    router = catalog.router(manifest["router_run"], tmp / f"router-{manifest['router_run']}")
    return [document_weights(router, bytes(d), clusters, 1) for d in docs]


def training_curves(catalog: Catalog, pipeline_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{model: {train_loss | val_bpb: [(step, value)]}} of every model the experts stage trained."""
    curves = {}
    for run in catalog.tracker.stage_runs(pipeline_id, "experts"):
        name = run.data.tags.get("moie.expert", run.info.run_id)
        curves[name] = {key: [(m.step, m.value) for m in catalog.client.get_metric_history(run.info.run_id, key)]
                        for key in ("train_loss", "val_bpb")}
    return curves


# --- the results ---------------------------------------------------------------------------------


def summarise(domains: list[str], docs: list[np.ndarray], scored: dict, weights: list[np.ndarray],
              domain_expert: dict[str, int], resamples: int = 2000, seed: int = 0) -> dict:
    """bpb per system and domain, routing accuracy and load, cost, and each system's difference
    from the baselines with its paired bootstrap interval; the results table's rows.
    weights: per document (n_bytes, n_experts) cBTM weights of each byte's prefix."""
    results, n_experts = scored["results"], len(scored["experts"])
    log_probs, cbtm_routes = _system_log_probs(domains, docs, results, weights, domain_expert, n_experts)
    lambdas = scored.get("mixture_lambda", {})
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
    routing_metrics, heat = _routing(domains, scored, cbtm_routes["cbtm_top1"], domain_expert)
    metrics |= routing_metrics
    cost = _cost(scored, order, n_experts)
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


BASELINES = ("dense", DENSE_MATCHED)


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


def overlap_metrics(held: HeldOut) -> dict[str, float]:
    """heldout_overlap/<domain>: share of the scored bytes in training shingles (after dropping);
    heldout_overlap_before/<domain>, heldout_dropped/<domain>: before, and documents dropped."""
    return ({f"heldout_overlap/{d}": v for d, v in held.overlap.items()}
            | {f"heldout_overlap_before/{d}": v for d, v in held.overlap_before.items()}
            | {f"heldout_dropped/{d}": float(held.dropped.get(d, 0)) for d in held.overlap_before})


def _system_log_probs(domains: list[str], docs: list[np.ndarray], results: dict, weights: list[np.ndarray],
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


def _routing(domains: list[str], scored: dict, cbtm_top1: list[np.ndarray],
             domain_expert: dict[str, int]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Routing accuracy per byte (the share of bytes whose top-1 expert is their domain's), experts
    per token and load of cBTM top-1 and every composed system (top-1 counts per document over
    the pipeline's experts, the last column for others); and each system's domain x expert heat map."""
    results, expert_uris = scored["results"], scored["experts"]
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
                      for uri in scored["composition_experts"][s]]  # n_experts: an expert from outside
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


def _cost(scored: dict, order: list[str], n_experts: int) -> dict[str, dict]:
    """Parameters, training PFLOPs (3 x forward FLOPs x tokens of every model a system uses, plus
    for compositions what the compose stage spent training them), inference MFLOPs and ms per token."""
    results, uris, tokens = scored["results"], scored["experts"], scored["train_tokens"]
    experts = [results[f"expert{e}"] for e in range(n_experts)]

    def trained(r: dict, uri: str) -> float:
        return 3 * r["flops"] * tokens.get(uri, 0.0) / 1e15

    # + the shared seed the experts branched from (the dense model's first steps), counted once
    seed_pflops = 3 * results["dense"]["flops"] * scored.get("seed_tokens", 0.0) / 1e15
    own_pflops = sum(trained(r, u) for r, u in zip(experts, uris))
    experts_pflops = own_pflops + seed_pflops
    central_pflops = trained(results["central"], scored["central_uri"])
    dense_pflops = trained(results["dense"], scored["dense_uri"])
    mean_flops = float(np.mean([r["flops"] for r in experts]))
    mean_ms = float(np.mean([r["ms_per_token"] for r in experts]))
    all_params = int(sum(r["params"] for r in experts))
    cost = {"dense": {"train_pflops": dense_pflops}, "central": {"train_pflops": central_pflops}}
    if DENSE_MATCHED in results:  # the dense model's training, then its continuation
        cost[DENSE_MATCHED] = {"train_pflops": dense_pflops + trained(results[DENSE_MATCHED], scored["matched_uri"])}
    for e, (r, u) in enumerate(zip(experts, uris)):
        cost[f"expert{e}"] = {"train_pflops": trained(r, u)}
    compose = scored.get("compose_pflops", {})
    for s in order:
        if s in results:
            r = results[s]
            cost.setdefault(s, {}).update(params=int(r["params"]), infer_mflops_per_token=r["flops"] / 1e6,
                                          ms_per_token=r["ms_per_token"])
            if s.startswith("composed"):  # a dense central model already contains the seed
                same = scored["central_uri"] == scored["dense_uri"]
                mode = MODE_OF[s]
                hub = 0.0 if mode.endswith("_seed") else central_pflops  # the seed is in experts_pflops
                cost[s]["train_pflops"] = (hub + (own_pflops if same and hub else experts_pflops)
                                           + compose.get(mode, 0.0)
                                           + (scored.get("kway_pflops", {}).get(mode, 0.0)
                                              if GATE_ONLY.get(s) == "kway" else 0.0))
    if "seed" in results:
        cost.setdefault("seed", {})["train_pflops"] = seed_pflops
    for s, hub in MIXTURES.items():  # the hub and one routed expert per byte
        if hub in results and s in scored.get("mixture_lambda", {}):
            cost[s] = {"params": all_params + int(results[hub]["params"]),
                       "train_pflops": experts_pflops if hub == "seed" else central_pflops + (
                           own_pflops if scored["central_uri"] == scored["dense_uri"] else experts_pflops),
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
