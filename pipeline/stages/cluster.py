"""The cluster stage: read the corpus as shards in parallel Ray tasks, fit the cBTM router
on (a sample of) the training split in one task, assign every shard's documents to their
nearest centroids in parallel tasks, and log router, assignments and the domain x cluster
report to the stage's child run (where the catalog finds them).

No process holds the corpus whole. Three passes over the shards, each a task per shard:

1. *scan*: chunk the shard's rows and return each chunk's dedup key and split (21 bytes a
   chunk). The driver keeps the first copy of every chunk in corpus order, the first
   `corpus.max_documents`, and draws the fit sample from the training chunks, as
   `fit_clusters` (the whole corpus in one process) does.
2. *sample*: the sampled chunks' texts, passed straight to the fitting task.
3. *assign*: each kept chunk's cluster, written to the storage as one parquet part per
   shard with its sha256 beside it. A part is named by everything it depends on (the shard's
   files, the corpus settings, its keep mask, the router), so a stage re-run after a killed
   assignment assigns only the shards whose parts are missing.

The driver merges the parts (per-document metadata, no text) into assignments.parquet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from artifacts import save_state, sha256_file, write_json
from pipeline.config import Config, ConfigError, CorpusConfig, to_dict
from pipeline.errors import StageError
from pipeline.ray_runtime import check_resources, connect_cluster, every_result
from pipeline.results.report import plot_domain_cluster_table
from pipeline.store import storage
from pipeline.store.catalog import ASSIGNMENTS, CLUSTER_REPORT, ROUTER_NAME, storage_location
from pipeline.store.names import sha_tag
from pipeline.store.tracking import Tracker
from pipeline.stages.shards import (SPLIT_CODES, ShardScan, assign_shard, assignment_rows, fit_router, fit_task,
                                    part_json, sample_texts, scan_shard)
from pipeline.text.corpus import CorpusError, Shard, check_labels, check_not_empty, corpus_shards, load_corpus
from pipeline.text.embedded import EmbeddedCorpusError
from routing.metrics import clustering_scores, contingency, dominant_domains

log = logging.getLogger(__name__)

@dataclass
class Clustering:
    """The cluster stage's result: the router's state and every document's row of assignments.parquet."""

    router: tuple[dict[str, np.ndarray], dict]  # (tensors, meta) of ClusterRouter.to_state()
    table: pa.Table  # shards.schema(): one row per document, in corpus order
    timing: dict[str, float]  # seconds (keys ending in _s) and counts of the stage's work


# --- the whole corpus in one process ---------------------------------------------------------------


def fit_clusters(cfg: Config) -> Clustering:
    """Load the whole corpus, fit the router on (a sample of) the training split, assign every
    document: in one process, for a corpus that fits in memory (and the reference the sharded
    stage is tested against)."""
    t0 = time.perf_counter()
    docs = load_corpus(cfg.corpus)
    train = [d for d in docs if d.split == "train"]
    sample = _sample_positions(len(train), len(docs), cfg)
    t1 = time.perf_counter()
    router = fit_router([train[i].text for i in sample], cfg)
    t2 = time.perf_counter()
    clusters = router.assign([d.text for d in docs])
    table = assignment_rows(docs, clusters)
    return Clustering(router.to_state(), table, {"load_s": t1 - t0, "fit_s": t2 - t1,
                                                  "assign_s": time.perf_counter() - t2,
                                                  "fit_documents": int(len(sample))})


def _sample_positions(n_train: int, n_documents: int, cfg: Config) -> np.ndarray:
    """Sorted positions, among the training documents in corpus order, of the fit sample."""
    if n_train < cfg.cluster.k:
        raise StageError(f"the corpus has {n_train} training documents ({n_documents} in all), fewer than "
                         f"cluster.k={cfg.cluster.k}; lower cluster.k or add documents")
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(n_train, size=min(cfg.cluster.fit_sample, n_train), replace=False))


# --- the driver -------------------------------------------------------------------------------------


def run_cluster(cfg: Config, pipeline_id: str | None = None) -> str:
    """Run the cluster stage of a (new or given) pipeline; return the pipeline's run id."""
    tracker = Tracker(cfg)
    connect_cluster(cfg, tracker)  # a multi-node cluster with a single-machine store is refused here
    pipeline_id = tracker.start_pipeline(cfg, pipeline_id)
    with tracker.pipeline_active(pipeline_id), tracker.stage_run(pipeline_id, "cluster") as run_id:
        tracker.log_params(run_id, {f"cluster.{k}": v for k, v in to_dict(cfg)["cluster"].items()}
                           | {f"corpus.{k}": v for k, v in to_dict(cfg)["corpus"].items()} | {"seed": cfg.seed})
        result = cluster_shards(cfg, storage.join(storage_location(cfg), pipeline_id, "assignments"))
        summary = _log_cluster_run(tracker, run_id, cfg, result)
        log.info("cluster stage: %s", summary)
    return pipeline_id


def cluster_shards(cfg: Config, parts: str) -> Clustering:
    """The three passes over the corpus's shards on Ray (module docstring); assignment parts
    under `parts` (a location in the storage) are reused when whole."""
    check_resources(cfg.cluster.num_cpus, what="clustering task (cluster.num_cpus)")
    t0 = time.perf_counter()
    shards = corpus_shards(cfg.corpus)
    corpus = ray.put(cfg.corpus)
    scans = _all(ray.remote(scan_shard).options(num_cpus=1, max_retries=1), [(s, corpus) for s in shards], "scan")
    keep, train = _keep_masks(cfg.corpus, scans)
    offsets = np.cumsum([0] + [len(m) for m in keep])
    sample = _sample_positions(int(sum(m.sum() for m in train)), int(sum(m.sum() for m in keep)), cfg)
    t1 = time.perf_counter()  # then the sample's texts and the fit
    # the fit sample's texts go from the shards' tasks to the fitting task, not through the driver
    train_index = np.concatenate([np.flatnonzero(m) + offsets[i] for i, m in enumerate(train)])[sample]
    positions = [train_index[(train_index >= offsets[i]) & (train_index < offsets[i + 1])] - offsets[i]
                 for i in range(len(shards))]
    sampler = ray.remote(sample_texts).options(num_cpus=1, max_retries=1)
    samples = [sampler.remote(s, corpus, p) for s, p in zip(shards, positions) if len(p)]
    fit = ray.remote(fit_task).options(num_cpus=cfg.cluster.num_cpus, max_retries=1)
    router = _all(fit, [(to_dict(cfg), *samples)], "fit")[0]
    t2 = time.perf_counter()
    locations = [storage.join(parts, f"{_fingerprint(i, s, cfg.corpus, m, router)}.parquet")
                 for i, (s, m) in enumerate(zip(shards, keep))]
    todo = [i for i, loc in enumerate(locations) if not storage.exists(part_json(loc))]
    log.info("cluster stage: %d shards, %d to assign (%d assigned by an earlier run)", len(shards), len(todo),
             len(shards) - len(todo))
    router_ref = ray.put(router)
    assign = ray.remote(assign_shard).options(num_cpus=1, max_retries=1)
    _all(assign, [(shards[i], i, corpus, keep[i], router_ref, locations[i], i == cfg.cluster.crash_shard)
                  for i in todo], "assign")
    table = _merge_parts(locations)
    return Clustering(router, table, {"scan_s": t1 - t0, "fit_s": t2 - t1, "assign_s": time.perf_counter() - t2,
                                      "fit_documents": int(len(sample)), "shards": len(shards),
                                      "shards_assigned": len(todo)})


def _keep_masks(corpus: CorpusConfig, scans: list[ShardScan]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per shard, (n_chunks,) bool: the chunks kept (the first copy of each in corpus order, within
    corpus.max_documents), and those of them in the training split."""
    check_labels(corpus, set().union(*(s.labels for s in scans)))
    keys = np.concatenate([s.keys for s in scans])
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(keys, return_index=True)[1]] = True  # the first occurrence of every key
    if corpus.max_documents is not None:
        keep[np.flatnonzero(keep)[corpus.max_documents:]] = False
    check_not_empty(corpus, int(keep.sum()))
    train = keep & (np.concatenate([s.splits for s in scans]) == SPLIT_CODES["train"])
    bounds = np.cumsum([len(s.keys) for s in scans])[:-1]
    return np.split(keep, bounds), np.split(train, bounds)


def _fingerprint(index: int, shard: Shard, corpus: CorpusConfig, keep: np.ndarray, router) -> str:
    """sha256 of everything an assignment part depends on: the shard's place and files (path,
    size, modification time), the corpus settings, the keep mask and the router's state."""
    h = hashlib.sha256()
    h.update(json.dumps({"shard": [index, shard.builder, shard.files, shard.origin],
                         "stamps": [storage.stamp(f) for f in shard.files],
                         "corpus": to_dict(corpus)}, sort_keys=True).encode())
    h.update(np.packbits(keep).tobytes())
    tensors, meta = router
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _merge_parts(locations: list[str]) -> pa.Table:
    """The parts' rows in shard order, each part checked once against the sha256 its JSON records."""
    tables = []
    with tempfile.TemporaryDirectory(prefix="moie-parts-") as scratch:
        for location in locations:
            recorded = json.loads(storage.read_text(part_json(location)))["sha256"]
            local = storage.local_copy(location, scratch)
            if sha256_file(local) != recorded:
                raise StageError(f"assignment part {location} does not match the sha256 its JSON records (damaged "
                                 "or replaced); delete it and its .json, and run the cluster stage again")
            tables.append(pq.read_table(local))
    return pa.concat_tables(tables)  # a corpus has at least one shard


def _all(task, args: list[tuple], what: str) -> list:
    """`task` on every argument tuple in parallel: the results in order (see every_result)."""
    return every_result([task.remote(*a) for a in args], f"clustering {what} tasks",
                        (StageError, CorpusError, ConfigError, EmbeddedCorpusError))


def _log_cluster_run(tracker: Tracker, run_id: str, cfg: Config, result: Clustering) -> dict:
    k = cfg.cluster.k
    clusters = result.table["cluster"].to_numpy()
    sizes = np.bincount(clusters, minlength=k)
    metrics = {"n_documents": len(clusters), "max_cluster_ratio": float(sizes.max() / sizes.mean()),
               **{f"cluster_size_{j}": int(s) for j, s in enumerate(sizes)},
               **{f"time_{name}" if name.endswith("_s") else name: v for name, v in result.timing.items()}}
    labels = result.table["source"].to_pylist()
    has_labels = all(s is not None for s in labels)
    if has_labels:
        metrics |= clustering_scores(labels, clusters, k)
    tracker.log_metrics(run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors, meta = result.router
        save_state(tmp, ROUTER_NAME, tensors, meta)
        pq.write_table(result.table, tmp / ASSIGNMENTS)
        report = {"k": k, "sizes": sizes.tolist(), "metrics": metrics}
        if has_labels:
            domains, table = contingency(labels, clusters, k)
            report |= {"domains": domains, "table": table.tolist(),
                       "dominant": [{"domain": d, "share": s} for d, s in dominant_domains(labels, clusters, k)]}
            plot_domain_cluster_table(domains, table, tmp / "domain_cluster_table.png")
        write_json(tmp / CLUSTER_REPORT, report)
        manifest = tracker.log_artifact_dir(run_id, tmp)
    tracker.set_tags(run_id, {sha_tag(name): sha for name, sha in manifest.items()})
    return {key: metrics[key] for key in ("purity", "nmi", "ari", "max_cluster_ratio") if key in metrics}
