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
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import ray

from composition.evaluation import Scoring, bits_per_byte, mixture, stream_documents
from composition.loader import CompositionSettings
from composition.training import top1_flops_per_token
from experts.checkpoint import load_model
from experts.flops import forward_flops_per_token
from experts.tokenizer import EOS_ID, encode_bytes
from pipeline.config import Config, EvaluateConfig
from pipeline.errors import StageError
from pipeline.ray_runtime import Grant, connect_cluster, get_or_fail, results_as_done
from pipeline.results.metrics import (COMPOSED, COMPOSED_SYSTEMS, GATE_ONLY, LAMBDAS, MIXTURES, Scored, headline,
                                      output_mixture, summarise)
from pipeline.results.report import plot_curves, write_results
from pipeline.results.routing_page import render as render_routing
from pipeline.serve.library import set_alias
from pipeline.store.catalog import PARTS_SHA, Catalog, assemble_registered, exact_uri, fetch_models
from pipeline.store.leftovers import scratch_dir
from pipeline.store.names import CHAMPION, COMPOSITION_MODEL, DENSE_MATCHED, Tag
from pipeline.store.tokens import load_tokens
from pipeline.text.corpus import FILE_BUILDERS, CorpusError, clustered_documents, corpus_shards, load_corpus
from pipeline.text.overlap import ShingleFilter, ShingleIndex
from routing.ensemble import document_weights, keep_top_k

log = logging.getLogger(__name__)

FALSE_POSITIVES_WARNED = 1e-4  # of the near-duplicate filter: above it held-out overlap is overstated by ~1e-3
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
    false_positive_rate: float = 0.0  # of the shingle filter: a shingle absent from training taken as present


def held_out(cfg: Config, eval_data: str | None, table=None) -> HeldOut:
    """At most evaluate.max_bytes_per_domain bytes of whole documents per domain, in a fixed
    order, dropping every document whose bytes sit in training shingles above evaluate.max_overlap.
    `table`: the pipeline's assignments, which the pipeline's corpus must still match. The
    pipeline's own corpus with a shingle filter is read shard by shard in Ray tasks
    (held_out_by_shard); other text, or the exact shingle set, in this process."""
    corpus, split = eval_corpus(cfg, eval_data)
    described = f"{eval_data or 'pipeline corpus'}{f' ({split} split)' if split else ''}"
    if eval_data is None and table is not None and cfg.evaluate.shingle_filter_mb:
        return held_out_by_shard(cfg, table, described)
    return held_out_in_process(cfg, corpus, split, table, described)


def held_out_in_process(cfg: Config, corpus, split: str | None, table, described: str) -> HeldOut:
    """held_out with the corpus (and the training split) loaded in this process."""
    everything = load_corpus(corpus)
    docs = [d for d in everything if split is None or d.split == split]
    if not docs:
        raise StageError(f"no held-out documents to score in {described}; raise corpus.test_fraction or give "
                         "--eval-data")
    training = everything if corpus == cfg.corpus else load_corpus(cfg.corpus)
    if table is not None:
        clustered_documents(table if isinstance(table, dict) else table.to_pydict(), training)
    index = training_shingles((d.text.encode("utf-8") for d in training if d.split == "train"), cfg.evaluate)
    texts = {d.doc_id: d.text.encode("utf-8") for d in docs}
    records = [(d.doc_id, d.source or "unlabelled", len(texts[d.doc_id]), int(index.covered(texts[d.doc_id]).sum()))
               for d in docs]
    return chosen_held_out(records, lambda ids: texts, cfg.evaluate, described,
                           getattr(index, "false_positive_rate", 0.0))


def chosen_held_out(records: list[tuple[str, str, int, int]], fetch, ev: EvaluateConfig, described: str,
                    false_positive_rate: float) -> HeldOut:
    """The held-out documents of `records` — (doc_id, domain, bytes, bytes covered by training
    shingles) of every candidate — in doc_id order: a document covered above max_overlap is
    dropped, then each domain takes documents until it has max_bytes_per_domain bytes.
    fetch(doc_ids): {doc_id: its UTF-8 text} of (at least) the documents kept."""
    budget: dict[str, int] = {}
    covered: dict[str, list[int]] = {}  # domain -> [covered bytes kept, bytes kept, covered all, bytes all]
    out = HeldOut([], [], described, {}, {}, {}, false_positive_rate=false_positive_rate)
    kept = []
    for doc_id, domain, n, hits in sorted(records):
        if not n:
            continue
        tally = covered.setdefault(domain, [0, 0, 0, 0])
        tally[2:] = [tally[2] + hits, tally[3] + n]
        if hits > ev.max_overlap * n:
            out.dropped[domain] = out.dropped.get(domain, 0) + 1
            continue
        if budget.get(domain, 0) >= ev.max_bytes_per_domain:
            continue
        budget[domain] = budget.get(domain, 0) + n
        tally[:2] = [tally[0] + hits, tally[1] + n]
        kept.append((doc_id, domain))
    if not kept:
        raise StageError(f"every held-out document of {described} overlaps the training split by more than "
                         f"evaluate.max_overlap={ev.max_overlap}; raise it (1 keeps every document)")
    texts = fetch([doc_id for doc_id, _ in kept])
    out.domains = [domain for _, domain in kept]
    out.tokens = [encode_bytes(texts[doc_id]) for doc_id, _ in kept]
    for domain, (hits, n, hits_all, n_all) in covered.items():
        out.overlap_before[domain] = hits_all / n_all
        if n:
            out.overlap[domain] = hits / n
    return out


def held_out_by_shard(cfg: Config, table, described: str) -> HeldOut:
    """held_out of the pipeline's own test split, shard by shard in Ray tasks, so that no
    process holds the corpus: each shard's training shingles in a filter (or-ed together in
    this process as they come, never more than two at once), each held-out document's bytes
    covered by them, then the texts of the documents kept. Every clustered document is checked
    against the content hash its clustering recorded, as the experts stage checks it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.stages.shards import check_found, documents_by_shard, shard_coverage, shard_shingles, shard_texts

    ev = cfg.evaluate
    shards = corpus_shards(cfg.corpus)
    table = table if isinstance(table, pa.Table) else pa.table(table)
    docs = documents_by_shard(table, len(shards), ("doc_id", "split", "source", "text_sha256"))
    test = [t.filter(pc.equal(t["split"], "test")) for t in docs]
    if not sum(len(t) for t in test):
        raise StageError(f"no held-out documents to score in {described}; raise corpus.test_fraction or give "
                         "--eval-data")
    task = ray.remote(shard_shingles).options(num_cpus=1, max_retries=1)
    bits = ev.shingle_filter_mb * 8 << 20
    refs = [task.remote(s, i, cfg.corpus, docs[i], ev.shingle_words, bits) for i, s in enumerate(shards)]
    shingles, results = None, []
    for result in results_as_done(refs, "held-out near-duplicate task", (CorpusError,)):
        shingles = result.pop("shingles") if shingles is None else shingles | result.pop("shingles")
        results.append(result)
    check_found(sum(len(d) for d in docs), results)
    warn_if_overstated(shingles, ev)
    shingles_ref = ray.put(shingles)
    coverage = ray.remote(shard_coverage).options(num_cpus=1, max_retries=1)
    parts = get_or_fail([coverage.remote(shards[i], i, cfg.corpus, t["doc_id"].to_pylist(), shingles_ref)
                         for i, t in enumerate(test) if len(t)], "held-out coverage task", (CorpusError,))
    domain = {d: s or "unlabelled" for t in test for d, s in zip(t["doc_id"].to_pylist(), t["source"].to_pylist())}
    shard_of = {d: i for i, t in enumerate(test) for d in t["doc_id"].to_pylist()}

    def fetch(doc_ids: list[str]) -> dict[str, bytes]:
        wanted: dict[int, list[str]] = {}
        for doc_id in doc_ids:
            wanted.setdefault(shard_of[doc_id], []).append(doc_id)
        texts = ray.remote(shard_texts).options(num_cpus=1, max_retries=1)
        found = get_or_fail([texts.remote(shards[i], i, cfg.corpus, ids) for i, ids in wanted.items()],
                            "held-out text task", (CorpusError,))
        return {doc_id: text for part in found for doc_id, text in part.items()}

    records = [(doc_id, domain[doc_id], n, hits) for part in parts for doc_id, n, hits in part]
    return chosen_held_out(records, fetch, ev, described, shingles.false_positive_rate)


def training_shingles(texts: Iterable[bytes], ev: EvaluateConfig) -> ShingleIndex | ShingleFilter:
    """The training split's shingles: a filter of evaluate.shingle_filter_mb, or (0) the exact index."""
    if not ev.shingle_filter_mb:
        return ShingleIndex(texts, ev.shingle_words)
    shingles = ShingleFilter(texts, ev.shingle_words, bits=ev.shingle_filter_mb * 8 << 20)
    warn_if_overstated(shingles, ev)
    return shingles


def warn_if_overstated(shingles: ShingleFilter, ev: EvaluateConfig) -> None:
    if shingles.false_positive_rate > FALSE_POSITIVES_WARNED:
        log.warning("the near-duplicate filter (evaluate.shingle_filter_mb=%d) takes %.2g of the shingles absent "
                    "from training for present: the training text is too large for it, and held-out overlap is "
                    "overstated; raise evaluate.shingle_filter_mb", ev.shingle_filter_mb,
                    shingles.false_positive_rate)


def domain_experts(table, expert_clusters: list[int]) -> dict[str, int]:
    """domain -> index of the expert whose cluster holds most of the domain's training documents.
    `table`: the assignments (a pyarrow Table, or its columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table if isinstance(table, pa.Table) else pa.table(table)
    training = table.filter(pc.and_(pc.equal(table["split"], "train"), pc.invert(pc.is_null(table["source"]))))
    tally = training.group_by(["source", "cluster"]).aggregate([([], "count_all")])  # one row per (domain, cluster)
    counts: dict[str, np.ndarray] = {}
    for source, cluster, n in zip(*(tally[c].to_pylist() for c in ("source", "cluster", "count_all"))):
        if cluster in expert_clusters:
            counts.setdefault(source, np.zeros(len(expert_clusters), dtype=np.int64))[expert_clusters.index(cluster)] = n
    return {domain: int(c.argmax()) for domain, c in counts.items()}


# --- Ray task bodies -----------------------------------------------------------------------


@dataclass
class ComposedSystem:
    """A registered composition as a scoring task loads it (its parts fetched from the registry)."""

    tracking_uri: str
    central: str  # exact URIs
    experts: list[str]  # in the composition's order
    settings: CompositionSettings
    seed: int
    parts_sha256: dict[str, str]  # the manifest's record of its parts' weights

    @classmethod
    def of(cls, manifest: dict, tracking_uri: str, seed: int) -> "ComposedSystem":
        return cls(tracking_uri=tracking_uri, central=manifest["central"], experts=manifest["experts"],
                   settings=CompositionSettings.from_manifest(manifest), seed=seed,
                   parts_sha256=manifest[PARTS_SHA])


def score_model_task(tracking_uri: str, uri: str, docs: list[np.ndarray], scoring: Scoring, grant: Grant) -> dict:
    """Per-byte log-probabilities of one registered model on every document."""
    device = grant.take()
    with scratch_dir("task") as scratch:
        model, _ = load_model(fetch_models(tracking_uri, [uri], Path(scratch))[0])
    model.to(device)
    seq = model.config.block_size
    scores = scoring.score(model, docs)
    return {"log_probs": scores.log_probs, "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in model.parameters()), "flops": forward_flops_per_token(model, seq)}


def score_composition_task(system: ComposedSystem, state: dict, docs: list[np.ndarray], scoring: Scoring,
                           grant: Grant, routes: list[np.ndarray] | None = None) -> dict:
    """Per-byte log-probabilities of a composition, and which experts its rows were routed to."""
    device = grant.take(system.seed)
    with scratch_dir("task") as scratch:
        composed = assemble_registered(system.tracking_uri, system.central, system.experts, system.settings, state,
                                       Path(scratch), parts_sha256=system.parts_sha256)
    composed.to(device)
    seq = composed.config.block_size
    n = len(system.experts)
    with composed.configured(record_routing=True):
        scores = scoring.score(composed, docs, n_experts=n, route_weights=routes)
    flops = (top1_flops_per_token(composed, seq) if system.settings.routing == "router"  # a position's, top-1
             else forward_flops_per_token(composed, seq))
    return {"log_probs": scores.log_probs, "top1_counts": scores.top1_counts, "experts_per_token": scores.experts_per_row,
            "choices": scores.choices,
            "ms_per_token": 1e3 * scores.seconds / scores.tokens,
            "params": sum(p.numel() for p in composed.parameters()), "flops": flops}


# --- the stage ---------------------------------------------------------------------------------


def run_evaluate(cfg: Config, pipeline_id: str, eval_data: str | None = None) -> dict:
    """Score every system on held-out text; log and return {"metrics", "rows", "markdown", ...}."""
    catalog = Catalog(cfg)
    tracker = catalog.tracker
    connect_cluster(cfg, tracker)  # before any work: a multi-node cluster needs shared stores
    tracker.pipeline_run(pipeline_id)
    cluster_run, table, _ = catalog.assignments(pipeline_id, arrow=True)  # a few bytes a document, not objects
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
        expert_clusters = [int(versions[u].tags[Tag.CLUSTER]) for u in expert_uris]
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
        scored = replace(
            scored, central_uri=central_uri, dense_uri=dense_uri or central_uri, matched_uri=matched_uri,
            seed_uri=seed_uri, mixture_lambda=mixture_lambdas(scored.validation, validation["weights"]),
            compose_pflops={mode: tracker.client.get_run(v.run_id).data.metrics.get("train_pflops", 0.0)
                            for mode, v in compositions.items()},
            # the k-way gate's training: only the systems that route by it pay for it
            kway_pflops={mode: tracker.client.get_run(v.run_id).data.metrics.get("kway_pflops", 0.0)
                         for mode, v in compositions.items()},
            seed_tokens=float(versions[expert_uris[0]].tags.get(Tag.SEED_TOKENS, 0)),
            train_tokens={uri: tracker.client.get_run(v.run_id).data.metrics.get("tokens", 0.0)
                          for uri, v in versions.items()})
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
            tracker.set_tags(run_id, {Tag.CHAMPION: champion})
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


def routing_page(catalog: Catalog, champion: str, compositions: dict, scored: Scored, domains: list[str],
                 docs: list[np.ndarray]) -> str | None:
    """The routing page of the champion composition on the first held-out document of each domain
    (at most PAGE_BYTES of each): its router's expert per byte, bits saved over the central model."""
    mode = next(m for m, v in compositions.items() if exact_uri(v) == champion)
    system = COMPOSED.get(mode)
    result, central = scored.results.get(system), scored.results["central"]
    if result is None or result.get("choices") is None:
        return None
    experts = []
    for uri in scored.composition_experts[system]:
        tags = catalog.resolve(uri).tags
        experts.append({"name": tags.get(Tag.EXPERT, uri), "cluster": tags.get(Tag.CLUSTER, "?"),
                        "domain": tags.get(Tag.DOMAIN, "?"), "uri": uri,
                        "purity": float(tags[Tag.PURITY]) if Tag.PURITY in tags else None})
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
               pipeline_routes: dict, tmp: Path, seed_uri: str | None = None, validation: dict | None = None) -> Scored:
    """Ray tasks: one per model, one per composition (and routing), each fetching its models
    from the registry; {system: result}; and the central model's, the seed's and every expert's
    log-probabilities on the validation documents (to choose the output mixtures' lambda)."""
    connect_cluster(cfg, catalog.tracker)
    ev = cfg.evaluate
    grant = Grant.of(cfg, "evaluate")  # each scoring task's CPUs and GPUs
    grant.check("evaluation task (evaluate.num_cpus / evaluate.num_gpus)")
    scoring = ev.scoring()
    docs_ref = ray.put(docs)
    model_task = ray.remote(score_model_task).options(**grant.options())
    comp_task = ray.remote(score_composition_task).options(**grant.options())
    store = catalog.tracker.uri
    refs = {"central": model_task.remote(store, central_uri, docs_ref, scoring, grant)}
    used: dict[str, list[str]] = {}  # composed system -> its experts, in its own order
    if dense_uri and dense_uri != central_uri:
        refs["dense"] = model_task.remote(store, dense_uri, docs_ref, scoring, grant)
    if matched_uri:
        refs[DENSE_MATCHED] = model_task.remote(store, matched_uri, docs_ref, scoring, grant)
    for e, uri in enumerate(expert_uris):
        refs[f"expert{e}"] = model_task.remote(store, uri, docs_ref, scoring, grant)
    if seed_uri:
        refs["seed"] = model_task.remote(store, seed_uri, docs_ref, scoring, grant)
    hubs = {"central": central_uri, **({"seed": seed_uri} if seed_uri else {})}
    val_refs = {}
    if validation and validation["docs"]:
        val_docs = ray.put(validation["docs"])
        val_refs = {f"val/{name}": model_task.remote(store, uri, val_docs, scoring, grant)
                    for name, uri in [*hubs.items(), *((f"expert{e}", u) for e, u in enumerate(expert_uris))]}
    for mode, version in compositions.items():
        if mode not in COMPOSED:
            continue
        state, manifest = catalog.composition_parts(version, tmp / f"composition-{mode}")
        uris = manifest["experts"]
        system = ComposedSystem.of(manifest, store, cfg.seed)
        routes = None
        if system.settings.routing == "router":  # cBTM weights of each document's prefixes, top-1
            routes = ray.put(_document_routes(catalog, manifest, docs, pipeline_routes, tmp))
        name = COMPOSED[mode]
        refs[name] = comp_task.remote(system, state, docs_ref, scoring, grant, routes)
        used[name] = uris
        if mode == "independent":  # the same gates routing on their own (the k-way gate where there is one)
            for variant, routing in GATE_ONLY.items():
                if routing == "kway" and not system.settings.kway:
                    continue
                gated = replace(system, settings=replace(system.settings, routing=routing))
                refs[variant] = comp_task.remote(gated, state, docs_ref, scoring, grant)
                used[variant] = uris
    everything = {**refs, **val_refs}
    results = dict(zip(everything, get_or_fail(list(everything.values()), "evaluation's scoring task")))
    val = {name.removeprefix("val/"): results.pop(name)["log_probs"] for name in val_refs}
    results["dense"] = results.get("dense", results["central"])
    return Scored(results=results, experts=expert_uris, composition_experts=used, validation=val)


def validation_set(cfg: Config, catalog: Catalog, experts: list, router, clusters: list[int], tmp: Path) -> dict:
    """Whole validation documents, an equal share (compose.eval_tokens / experts) of each expert's
    own cluster, and cBTM's top-1 weights over the experts for each byte's prefix: {"docs", "weights"}."""
    eos, share = EOS_ID, max(1, cfg.compose.eval_tokens // max(len(experts), 1))
    docs = []
    for version in experts:
        tokens = load_tokens(catalog.data_path(version, "val"), tmp / "val", catalog.pins)
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


def _document_routes(catalog: Catalog, manifest: dict, docs: list[np.ndarray], pipeline_routes: dict,
                     tmp: Path) -> list[np.ndarray]:
    """Top-1 cBTM weights of a router-routed composition's experts for each document's prefixes:
    from the pipeline's own weights when the composition uses its router, else from its router."""
    clusters = manifest["clusters"]
    if manifest["router_run"] == pipeline_routes["run"] and set(clusters) <= set(pipeline_routes["clusters"]):
        columns = [pipeline_routes["clusters"].index(c) for c in clusters]
        return [keep_top_k(w[:, columns], 1).astype(np.float32) for w in pipeline_routes["weights"]]
    router = catalog.composition_router(manifest, tmp / f"router-{manifest['router_run']}")
    return [document_weights(router, bytes(d), clusters, 1) for d in docs]


def training_curves(catalog: Catalog, pipeline_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{model: {train_loss | val_bpb: [(step, value)]}} of every model the experts stage trained."""
    curves = {}
    for run in catalog.tracker.stage_runs(pipeline_id, "experts"):
        name = run.data.tags.get(Tag.EXPERT, run.info.run_id)
        curves[name] = {key: [(m.step, m.value) for m in catalog.client.get_metric_history(run.info.run_id, key)]
                        for key in ("train_loss", "val_bpb")}
    return curves


def overlap_metrics(held: HeldOut) -> dict[str, float]:
    """heldout_overlap/<domain>: share of the scored bytes in training shingles (after dropping);
    heldout_overlap_before/<domain>, heldout_dropped/<domain>: before, and documents dropped;
    heldout_overlap_false_positive_rate: the shingle filter's (0 for the exact index)."""
    return ({f"heldout_overlap/{d}": v for d, v in held.overlap.items()}
            | {f"heldout_overlap_before/{d}": v for d, v in held.overlap_before.items()}
            | {f"heldout_dropped/{d}": float(held.dropped.get(d, 0)) for d in held.overlap_before}
            | {"heldout_overlap_false_positive_rate": held.false_positive_rate})
