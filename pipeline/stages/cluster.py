"""The cluster stage: load the corpus, fit the cBTM router on (a sample of) the training
split in a Ray task with the configured CPUs, assign every document to its nearest
centroid, and log router, assignments and the domain x cluster report to the stage's
child run (where the catalog finds them).
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from artifacts import save_state, write_json
from pipeline.config import Config, ConfigError, from_dict, to_dict, validate
from pipeline.errors import StageError
from pipeline.ray_runtime import TaskFailedError, check_resources, connect_cluster, describe_failure, task_cause
from pipeline.results.report import plot_domain_cluster_table
from pipeline.store.catalog import ASSIGNMENTS, CLUSTER_REPORT, ROUTER_NAME
from pipeline.store.names import sha_tag
from pipeline.store.tracking import Tracker
from pipeline.text.corpus import CorpusError, load_corpus, text_sha256
from pipeline.text.embedded import EmbeddedCorpusError
from routing.metrics import clustering_scores, contingency, dominant_domains
from routing.router import ClusterRouter

log = logging.getLogger(__name__)


@dataclass
class Clustering:
    """What the clustering task returns: the router's state and every document's cluster."""

    router: tuple[dict[str, np.ndarray], dict]  # (tensors, meta) of ClusterRouter.to_state()
    clusters: np.ndarray  # (n_documents,) cluster of each document
    doc_id: list[str]
    work: list[str | None]
    source: list[str | None]  # domain labels, when the corpus has them
    split: list[str]
    n_bytes: list[int]
    text_sha256: list[str]  # each document's content hash: later stages check the corpus still holds it
    timing: dict[str, float]


def fit_clusters(cfg: Config) -> Clustering:
    """Load the corpus, fit the router on (a sample of) the training split, assign every document."""
    t0 = time.perf_counter()
    docs = load_corpus(cfg.corpus)
    train = [d for d in docs if d.split == "train"]
    k = cfg.cluster.k
    if len(train) < k:
        raise StageError(f"the corpus has {len(train)} training documents ({len(docs)} in all), fewer than "
                         f"cluster.k={k}; lower cluster.k or add documents")
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(train), size=min(cfg.cluster.fit_sample, len(train)), replace=False))
    t1 = time.perf_counter()
    c = cfg.cluster
    try:
        router = ClusterRouter.fit([train[i].text for i in sample], k, max_features=c.max_features,
                                   min_df=c.min_df, svd_dim=c.svd_dim, iterations=c.iterations,
                                   temperature=c.temperature, top_k=c.top_k, seed=cfg.seed)
    except ValueError as err:  # the corpus and the cluster.* settings do not fit together
        raise StageError(f"cannot fit the cBTM router on {len(sample)} training documents with these cluster.* "
                         f"settings: {err}") from None
    t2 = time.perf_counter()
    clusters = router.assign([d.text for d in docs])
    t3 = time.perf_counter()
    return Clustering(router=router.to_state(), clusters=clusters, doc_id=[d.doc_id for d in docs],
                      work=[d.work for d in docs], source=[d.source for d in docs], split=[d.split for d in docs],
                      n_bytes=[len(d.text.encode("utf-8")) for d in docs],
                      text_sha256=[text_sha256(d.text) for d in docs],
                      timing={"load_s": t1 - t0, "fit_s": t2 - t1, "assign_s": t3 - t2,
                              "fit_documents": int(len(sample))})


def _fit_clusters_task(cfg_dict: dict) -> Clustering:
    """Ray task body: the config as plain data in, the clustering out."""
    cfg = from_dict(Config, cfg_dict)
    validate(cfg)
    return fit_clusters(cfg)


def run_cluster(cfg: Config, pipeline_id: str | None = None) -> str:
    """Run the cluster stage of a (new or given) pipeline; return the pipeline's run id."""
    tracker = Tracker(cfg)
    connect_cluster(cfg, tracker)  # a multi-node cluster with a single-machine store is refused here
    pipeline_id = tracker.start_pipeline(cfg, pipeline_id)
    with tracker.pipeline_active(pipeline_id), tracker.stage_run(pipeline_id, "cluster") as run_id:
        tracker.log_params(run_id, {f"cluster.{k}": v for k, v in to_dict(cfg)["cluster"].items()}
                           | {f"corpus.{k}": v for k, v in to_dict(cfg)["corpus"].items()} | {"seed": cfg.seed})
        result = _run_on_ray(cfg)
        summary = _log_cluster_run(tracker, run_id, cfg, result)
        log.info("cluster stage: %s", summary)
    return pipeline_id


def _run_on_ray(cfg: Config) -> Clustering:
    check_resources(cfg.cluster.num_cpus, what="clustering task (cluster.num_cpus)")
    task = ray.remote(_fit_clusters_task).options(num_cpus=cfg.cluster.num_cpus, max_retries=1)
    try:
        return ray.get(task.remote(to_dict(cfg)))
    except ray.exceptions.RayError as err:
        # the task's own error about its input (a bad corpus, too few documents) as itself, not Ray's wrapper
        if isinstance(task_cause(err), (StageError, CorpusError, ConfigError, EmbeddedCorpusError)):
            raise task_cause(err) from None
        raise TaskFailedError(describe_failure("clustering task", err)) from None


def _log_cluster_run(tracker: Tracker, run_id: str, cfg: Config, result: Clustering) -> dict:
    k = cfg.cluster.k
    clusters = result.clusters
    sizes = np.bincount(clusters, minlength=k)
    metrics = {"n_documents": len(clusters), "max_cluster_ratio": float(sizes.max() / sizes.mean()),
               **{f"cluster_size_{j}": int(s) for j, s in enumerate(sizes)},
               **{f"time_{name}": v for name, v in result.timing.items()}}
    labels = result.source
    has_labels = all(s is not None for s in labels)
    if has_labels:
        metrics |= clustering_scores(labels, clusters, k)
    tracker.log_metrics(run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors, meta = result.router
        save_state(tmp, ROUTER_NAME, tensors, meta)
        _write_assignments(tmp / ASSIGNMENTS, result)
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


def _write_assignments(path: Path, result: Clustering) -> None:
    table = pa.table({"doc_id": result.doc_id, "work": result.work, "source": result.source,
                      "split": result.split, "n_bytes": result.n_bytes, "text_sha256": result.text_sha256,
                      "cluster": np.asarray(result.clusters, dtype=np.int32)})
    pq.write_table(table, path)
