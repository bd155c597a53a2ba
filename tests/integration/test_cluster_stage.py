"""The cluster stage for real: local Ray, a private sqlite MLflow store, generated text."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

import textgen

from artifacts import load_state, sha256_file
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.stages.cluster import run_cluster
from pipeline.store.tracking import PipelineNotFoundError, Tracker, tracking_uri
from routing.router import ClusterRouter

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = {"router.safetensors", "router.json", "assignments.parquet", "cluster_report.json",
             "domain_cluster_table.png", "manifest.json"}


def generated_config(tmp_path, n_per_domain=25, k=4, extra=()):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(n_per_domain, seed=0)))
    overrides = ["corpus.source=files", f"corpus.files=[{path}]", f"cluster.k={k}", "cluster.svd_dim=16",
                 "cluster.min_df=1", "tracking.experiment=test", *extra]
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


def client_for(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(cfg))


def cluster_runs(cfg, pipeline_id):
    return Tracker(cfg).stage_runs(pipeline_id, "cluster", status=None)


def test_cluster_stage_logs_tagged_nested_runs_with_checksummed_artifacts(ray_local, moie_home, tmp_path):
    cfg = generated_config(tmp_path)
    pipeline_id = run_cluster(cfg)
    client = client_for(cfg)
    parent = client.get_run(pipeline_id)
    assert parent.data.tags["moie.stage"] == "pipeline"
    assert parent.data.tags["moie.pipeline"] == pipeline_id
    assert parent.info.status == "FINISHED"
    (run,) = cluster_runs(cfg, pipeline_id)
    tags = run.data.tags
    assert (tags["moie.stage"], tags["moie.pipeline"], tags["mlflow.parentRunId"]) == ("cluster", pipeline_id, pipeline_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["purity"] == 1.0 and run.data.metrics["ari"] == pytest.approx(1.0)
    assert run.data.metrics["max_cluster_ratio"] <= 1.5
    assert run.data.params["cluster.k"] == "4"
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert ARTIFACTS <= {p.name for p in local.iterdir()}
    manifest = json.loads((local / "manifest.json").read_text())
    for name, sha in manifest.items():
        assert sha256_file(local / name) == sha == tags[f"moie.sha256.{name}"]


def test_router_from_mlflow_reproduces_the_logged_assignments(ray_local, moie_home, tmp_path):
    cfg = generated_config(tmp_path)
    pipeline_id = run_cluster(cfg)
    (run,) = cluster_runs(cfg, pipeline_id)
    local = Path(client_for(cfg).download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    router = ClusterRouter.from_state(*load_state(local, "router", run.data.tags["moie.sha256.router.safetensors"]))
    table = pq.read_table(local / "assignments.parquet").to_pylist()
    texts = {r["work"]: r["text"] for r in textgen.corpus(25, seed=0)}
    assert len(table) == 100
    assert router.assign([texts[row["work"]] for row in table]).tolist() == [row["cluster"] for row in table]
    assert {row["split"] for row in table} <= {"train", "validation", "test"}


def test_joining_a_pipeline_adds_a_child_run_and_same_config_gives_same_result(ray_local, moie_home, tmp_path):
    cfg = generated_config(tmp_path, k=3, extra=["cluster.temperature=0.5"])
    pipeline_id = run_cluster(cfg)
    assert run_cluster(cfg, pipeline_id) == pipeline_id
    runs = cluster_runs(cfg, pipeline_id)
    assert len(runs) == 2
    client = client_for(cfg)
    tables = [pq.read_table(client.download_artifacts(r.info.run_id, "assignments.parquet", str(tmp_path / str(i))))
              for i, r in enumerate(runs)]
    assert tables[0].equals(tables[1])
    assert runs[0].data.metrics["nmi"] == runs[1].data.metrics["nmi"]


def test_unknown_pipeline_id_is_a_clear_error_and_creates_no_run(ray_local, moie_home, tmp_path):
    cfg = generated_config(tmp_path)
    with pytest.raises(PipelineNotFoundError, match="no pipeline run with id 'deadbeef'"):
        run_cluster(cfg, "deadbeef")
    tracker = Tracker(cfg)
    assert tracker.client.search_runs([tracker.experiment_id]) == []


def test_fewer_documents_than_clusters_fails_the_run_without_artifacts(ray_local, moie_home, tmp_path):
    cfg = generated_config(tmp_path, n_per_domain=1, k=6, extra=["corpus.val_fraction=0", "corpus.test_fraction=0"])
    with pytest.raises(StageError, match="4 training documents .* fewer than cluster.k=6"):
        run_cluster(cfg)
    tracker = Tracker(cfg)
    (run,) = tracker.client.search_runs([tracker.experiment_id], "tags.`moie.stage` = 'cluster'")
    assert run.info.status == "FAILED"
    assert tracker.client.list_artifacts(run.info.run_id) == []


def test_cli_reports_an_unknown_pipeline_in_one_line_with_exit_code_2(moie_home, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.cluster", "--config", "configs/tiny.yaml",
                           "--pipeline", "0123abcd"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "moie: error: no pipeline run with id '0123abcd'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_a_config_error_naming_the_key(moie_home):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "cluster", "--config", "configs/tiny.yaml",
                           "--set", "cluster.k=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cluster.k must be at least 2" in proc.stderr


def sharded_config(tmp_path, extra=()):
    """A corpus of five shards: four jsonl files (domains mixed, rows without a work id, a copy of
    a row of the first file in the last) and a group of eight text files, fitted on a sample smaller than the
    training split (so the sample's texts come from several shards)."""
    folder = tmp_path / "corpus"
    if not folder.exists():
        textgen.write_sharded(folder)
    overrides = ["corpus.source=files", f"corpus.files=[{folder}/*.jsonl,{folder}/*.txt]", "cluster.k=4",
                 "cluster.svd_dim=16", "cluster.min_df=1", "cluster.fit_sample=60", "tracking.experiment=test",
                 *extra]
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


def logged_assignments(cfg, pipeline_id, tmp_path):
    (run, *_) = cluster_runs(cfg, pipeline_id)  # the newest first
    return run, pq.read_table(client_for(cfg).download_artifacts(run.info.run_id, "assignments.parquet",
                                                                 str(tmp_path / run.info.run_id)))


def test_sharded_stage_assigns_every_document_as_the_whole_corpus_in_one_process_does(ray_local, moie_home, tmp_path):
    from pipeline.stages.cluster import fit_clusters
    from pipeline.text.corpus import corpus_shards

    cfg = sharded_config(tmp_path)
    assert len(corpus_shards(cfg.corpus)) == 5  # four table files, the text files in one group
    pipeline_id = run_cluster(cfg)
    run, table = logged_assignments(cfg, pipeline_id, tmp_path)
    reference = fit_clusters(cfg)
    assert run.data.metrics["shards"] == 5 and run.data.metrics["fit_documents"] == 60
    assert len(table) == 120  # 121 rows, the copy dropped
    assert table.equals(reference.table)
    tensors, _ = reference.router
    local = Path(client_for(cfg).download_artifacts(run.info.run_id, "", str(tmp_path / "router")))
    logged, _ = load_state(local, "router", run.data.tags["moie.sha256.router.safetensors"])
    assert all(np.array_equal(logged[name], tensors[name]) for name in tensors)


def test_rerun_after_a_killed_assignment_assigns_only_the_unfinished_shards(ray_local, moie_home, tmp_path):
    from pipeline.ray_runtime import TaskFailedError
    from pipeline.store.catalog import storage_location

    cfg = sharded_config(tmp_path, ["cluster.crash_shard=2"])
    with pytest.raises(TaskFailedError, match="1 of 5 clustering assign tasks"):
        pipeline_id = run_cluster(cfg)
    (failed,) = Tracker(cfg).client.search_runs([Tracker(cfg).experiment_id], "tags.`moie.stage` = 'pipeline'")
    pipeline_id = failed.info.run_id
    parts = Path(storage_location(cfg)) / pipeline_id / "assignments"
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert len(written) == 4 and len(list(parts.glob("*.json"))) == 4  # every other shard's part, whole

    cfg = sharded_config(tmp_path)
    run_cluster(cfg, pipeline_id)
    run, table = logged_assignments(cfg, pipeline_id, tmp_path)
    assert run.data.metrics["shards_assigned"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet") if p.name in written} == written
    assert len(list(parts.glob("*.parquet"))) == 5
    assert table.equals(fit_clusters_table(cfg))


def fit_clusters_table(cfg):
    from pipeline.stages.cluster import fit_clusters

    return fit_clusters(cfg).table


def test_held_out_documents_read_shard_by_shard_are_those_one_process_reads(ray_local, moie_home, tmp_path,
                                                                           monkeypatch):
    """The evaluate stage's held-out documents of a sharded corpus, read by Ray tasks shard by
    shard (filters of each shard's training shingles or-ed together), are the documents, the
    near-duplicate drops and the overlap figures of the whole corpus read in one process."""
    import json

    from pipeline.stages.evaluate import held_out, held_out_in_process
    from pipeline.store.catalog import Catalog

    folder = tmp_path / "corpus"
    textgen.write_sharded(folder)
    rows = [json.loads(line) for line in (folder / "part-0.jsonl").read_text().splitlines()]
    (folder / "reprints.jsonl").write_text("".join(  # near-copies as works of their own, some across the split
        json.dumps({**r, "text": "Second printing.\n" + r["text"], "work": f"reprint-{i}"}) + "\n"
        for i, r in enumerate(rows)))
    cfg = sharded_config(tmp_path, ["corpus.test_fraction=0.3", "evaluate.max_bytes_per_domain=1500"])
    pipeline_id = run_cluster(cfg)
    _, table, _ = Catalog(cfg).assignments(pipeline_id)
    with monkeypatch.context() as m:  # read by the shard tasks: this process never loads the corpus
        m.setattr("pipeline.stages.evaluate.load_corpus", lambda *a: pytest.fail("the corpus was loaded whole"))
        sharded = held_out(cfg, None, table)
    whole = held_out_in_process(cfg, cfg.corpus, "test", table, sharded.described)
    assert sum(sharded.dropped.values()) > 0  # near-duplicates of training text were dropped ...
    test = sum(s == "test" for s in table["split"])
    assert len(sharded.tokens) < test - sum(sharded.dropped.values())  # ... and the byte budget left some out
    assert sharded.domains == whole.domains
    assert all(np.array_equal(a, b) for a, b in zip(sharded.tokens, whole.tokens, strict=True))
    assert (sharded.dropped, sharded.overlap, sharded.overlap_before) == (whole.dropped, whole.overlap,
                                                                          whole.overlap_before)
    assert sharded.false_positive_rate == whole.false_positive_rate > 0
