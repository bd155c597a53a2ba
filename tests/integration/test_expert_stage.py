"""The experts stage for real: local Ray (2 CPUs), a private sqlite MLflow store and registry."""
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import textgen

from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.ray_runtime import ResourceError
from pipeline.stages.cluster import run_cluster
from pipeline.stages.experts import run_experts
from pipeline.store.catalog import Catalog
from pipeline.store.names import CENTRAL_MODEL, EXPERT_MODEL
from pipeline.store.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path, extra=(), domains=("cooking", "sailing"), n=25):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(n, list(domains), seed=0)))
    overrides = ["corpus.source=files", f"corpus.files=[{path}]", "cluster.k=2", "cluster.svd_dim=8",
                 "cluster.min_df=1", "tracking.experiment=test", "experts.train.max_tokens=6000",
                 "experts.train.ckpt_every=5", "experts.progress_every=0.5", *extra]
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


def versions(tracker, name):
    return tracker.client.search_model_versions(f"name = '{name}'")


def test_stage_trains_k_experts_and_dense_and_registers_k_plus_1_tagged_versions(ray_local, moie_home, tmp_path,
                                                                                 capsys):
    cfg = tiny_config(tmp_path)
    pipeline_id = run_cluster(cfg)
    registered = run_experts(cfg, pipeline_id)
    assert sorted(registered) == ["dense", "expert-0", "expert-1"]
    tracker = Tracker(cfg)
    experts, central = versions(tracker, EXPERT_MODEL), versions(tracker, CENTRAL_MODEL)
    roles = sorted(v.tags["moie.role"] for v in central)
    assert len(experts) == 2 and roles == ["dense+central", "seed"]  # the dense baseline is the central model,
    # and the seed the experts branched from (seed_fraction 0.5) is registered: a hub to compose on
    seed = next(v for v in central if v.tags["moie.role"] == "seed")
    assert seed.tags["moie.seed_tokens"] == experts[0].tags["moie.seed_tokens"]
    for v in experts:
        assert v.tags["moie.pipeline"] == pipeline_id
        assert v.tags["moie.cluster"] in ("0", "1")
        assert v.tags["moie.domain"] in ("cooking", "sailing") and float(v.tags["moie.purity"]) == 1.0
        assert json.loads(v.tags["moie.arch"])["arch"] == "hourglass"
        assert v.tags["moie.tokenizer"]
    runs = tracker.stage_runs(pipeline_id, "experts")
    assert sorted(r.data.tags["moie.expert"] for r in runs) == ["dense", "expert-0", "expert-1", "seed"]
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == pipeline_id
        if run.data.tags["moie.expert"] != "seed":  # the seed's steps are logged on the dense run: its first ones
            assert "train_loss" in run.data.metrics and "tokens_per_s" in run.data.metrics
        names = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "model")}
        assert {"model/MLmodel", "model/data", "model/manifest.json"} <= names  # an MLflow pyfunc model
        weights = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "model/data/model")}
        assert weights == {"model/data/model/model.safetensors", "model/data/model/model.json"}
    dense = next(r for r in runs if r.data.tags["moie.expert"] == "dense")
    assert dense.data.params["max_tokens"] == str(2 * 6000)  # equal compute: k x one expert's budget
    # the seed trains alone on experts.seed_num_cpus (2) threads; the dense model goes on beside the experts on 1
    assert cfg.experts.seed_num_cpus == 2 and dense.data.tags["moie.threads"] == "2,1"
    assert {r.data.tags["moie.threads"] for r in runs if r.data.tags["moie.expert"].startswith("expert-")} == {"1"}
    # device auto on a Ray without GPUs: every model trained on the CPU, and its run says so
    assert {r.data.tags["moie.device"] for r in runs if r.data.tags["moie.expert"] != "seed"} == {"cpu"}
    # a stop between exporting the seed and registering it: the next run of the stage registers it
    tracker.client.delete_model_version(CENTRAL_MODEL, seed.version)
    assert sorted(run_experts(cfg, pipeline_id)) == ["dense", "expert-0", "expert-1"]  # nothing trains again
    again = [v for v in versions(tracker, CENTRAL_MODEL) if v.tags["moie.role"] == "seed"]
    assert len(again) == 1 and again[0].tags["moie.sha256"] == seed.tags["moie.sha256"]
    # the storage lost the seed while an expert must branch from it again (its version and checkpoints gone):
    # the seed is restored from its registered version, and the expert trains to the same weights as before
    expert = next(v for v in experts if v.tags["moie.expert"] == "expert-1")
    root = expert.tags["moie.storage_root"]
    shutil.rmtree(Path(Catalog.seed_dir(root)).parent)
    shutil.rmtree(Catalog.checkpoint_dir(root, "expert-1"))
    tracker.client.delete_model_version(EXPERT_MODEL, expert.version)
    capsys.readouterr()
    assert "expert-1" in run_experts(cfg, pipeline_id)
    assert "restored from its registered version" in capsys.readouterr().out
    (retrained,) = [v for v in versions(tracker, EXPERT_MODEL) if v.tags["moie.expert"] == "expert-1"]
    assert retrained.tags["moie.sha256"] == expert.tags["moie.sha256"]


def test_a_configured_central_model_is_trained_and_registered_beside_the_dense_baseline(ray_local, moie_home,
                                                                                       tmp_path):
    cfg = tiny_config(tmp_path, extra=["central.arch=gpt", "central.model={block_size: 64, n_layer: 1, n_embd: 32}",
                                       "central.train={max_tokens: 3000, batch_size: 4}"])
    pipeline_id = run_cluster(cfg)
    registered = run_experts(cfg, pipeline_id)
    assert sorted(registered) == ["central", "dense", "expert-0", "expert-1"]
    tracker = Tracker(cfg)
    roles = {v.tags["moie.role"]: v for v in versions(tracker, CENTRAL_MODEL)}
    assert sorted(roles) == ["central", "dense", "seed"]
    assert json.loads(roles["central"].tags["moie.arch"])["arch"] == "gpt"
    run = next(r for r in tracker.stage_runs(pipeline_id, "experts") if r.data.tags["moie.expert"] == "central")
    assert run.data.params["max_tokens"] == "3000"


def test_running_the_stage_again_is_a_no_op(ray_local, moie_home, tmp_path):
    cfg = tiny_config(tmp_path, extra=["experts.dense=false", "experts.seed_fraction=0"])
    pipeline_id = run_cluster(cfg)
    first = run_experts(cfg, pipeline_id)
    tracker = Tracker(cfg)
    before = (len(versions(tracker, EXPERT_MODEL)), len(tracker.stage_runs(pipeline_id, "experts", None)))
    assert run_experts(cfg, pipeline_id) == first
    assert (len(versions(tracker, EXPERT_MODEL)), len(tracker.stage_runs(pipeline_id, "experts", None))) == before


def test_a_killed_expert_worker_is_retried_and_resumes_from_its_checkpoint(ray_local, moie_home, tmp_path):
    cfg = tiny_config(tmp_path, extra=["experts.dense=false", "experts.seed_fraction=0", "experts.train.max_tokens=400000",
                                       "experts.train.ckpt_every=20", "experts.train.log_every=10"])
    pipeline_id = run_cluster(cfg)
    outcome = {}
    stage = threading.Thread(target=lambda: outcome.update(result=_catch(run_experts, cfg, pipeline_id)))
    stage.start()
    killed = _kill_expert_worker(ray_local, pipeline_id, "expert-0", after_step=50)
    stage.join(timeout=600)
    assert not isinstance(outcome["result"], BaseException), outcome["result"]
    assert sorted(outcome["result"]) == ["expert-0", "expert-1"]
    run = next(r for r in Tracker(cfg).stage_runs(pipeline_id, "experts") if r.data.tags["moie.expert"] == "expert-0")
    resumed = run.data.metrics["resumed_from_step"]
    assert resumed >= 40 and resumed <= killed["step"]  # lost at most one checkpoint interval
    assert resumed > killed["step"] - 2 * 20


def _catch(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed back to the test thread
        return e


def _kill_expert_worker(ray, pipeline_id, name, after_step, timeout=300):
    deadline = time.time() + timeout
    board = None
    while time.time() < deadline:
        try:
            board = board or ray.get_actor(f"moie-progress-{pipeline_id}")
            row = ray.get(board.snapshot.remote()).get(name)
        except ValueError:  # the board does not exist yet
            row = None
        if row and row["step"] >= after_step and not row.get("done"):
            os.kill(row["pid"], signal.SIGKILL)
            return row
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached step {after_step}")


def test_pipeline_without_a_cluster_run_is_a_clear_error(moie_home, tmp_path):
    cfg = tiny_config(tmp_path)
    tracker = Tracker(cfg)
    pipeline_id = tracker.start_pipeline(cfg)
    with pytest.raises(StageError, match="has no finished cluster run"):
        run_experts(cfg, pipeline_id)


def test_resources_the_cluster_cannot_provide_fail_at_once(ray_local, moie_home, tmp_path):
    cfg = tiny_config(tmp_path, extra=["experts.num_cpus=64"])
    pipeline_id = run_cluster(cfg)
    t0 = time.time()
    with pytest.raises(ResourceError, match="num_cpus=64.*largest Ray node has 2 CPUs"):
        run_experts(cfg, pipeline_id)
    assert time.time() - t0 < 60


def test_a_new_clustering_of_the_pipeline_trains_new_experts_on_its_own_data(ray_local, moie_home, tmp_path):
    cfg = tiny_config(tmp_path, extra=["experts.dense=false", "experts.seed_fraction=0"])
    pipeline_id = run_cluster(cfg)
    first = run_experts(cfg, pipeline_id)
    assert run_cluster(cfg, pipeline_id) == pipeline_id  # cluster again: a newer cluster run
    second = run_experts(cfg, pipeline_id)
    assert sorted(second) == sorted(first) and set(second.values()).isdisjoint(first.values())
    tracker = Tracker(cfg)
    clusterings = {v.tags["moie.cluster_run"] for v in versions(tracker, EXPERT_MODEL)}
    assert len(clusterings) == 2


def test_experts_branch_from_a_shared_dense_seed_at_equal_total_compute(ray_local, moie_home, tmp_path):
    from experts.checkpoint import load_model

    cfg = tiny_config(tmp_path, ["experts.seed_fraction=0.5", "experts.train.ckpt_every=0"])
    pipeline_id = run_cluster(cfg)
    run_experts(cfg, pipeline_id)
    tracker = Tracker(cfg)
    runs = {r.data.tags["moie.expert"]: r for r in tracker.stage_runs(pipeline_id, "experts")}
    dense_tokens = runs["dense"].data.metrics["tokens"]
    (seed_dir,) = list(Path(moie_home).rglob("seed/model"))
    _, meta = load_model(seed_dir)
    seed_tokens = meta["step"] * 8 * 64  # steps x batch x block
    assert 0 < seed_tokens < dense_tokens
    # the seed is shared: seed + every expert's own tokens = the dense model's tokens
    expert_tokens = sum(runs[f"expert-{j}"].data.metrics["tokens"] for j in range(2))
    assert abs(seed_tokens + expert_tokens - dense_tokens) <= 2 * 8 * 64  # rounding to whole steps
    assert runs["expert-0"].data.params["max_tokens"] == str(6000 - seed_tokens // 2)
    assert runs["dense"].info.status == "FINISHED"


def test_an_expert_branched_from_a_seed_starts_from_the_seeds_weights(tmp_path):
    import numpy as np
    import torch

    from experts.checkpoint import build_model, load_model, save_model
    from experts.tokenizer import TOKENIZER
    from pipeline.stages.experts import ExpertTask, train_expert

    arch = {"arch": "gpt", "vocab_size": 259, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    torch.manual_seed(123)
    save_model(tmp_path / "seed", build_model(arch))
    np.save(tmp_path / "train.npy", np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16))
    np.save(tmp_path / "val.npy", np.zeros(0, dtype=np.uint16))
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("seed-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    spec = {"name": "expert-0", "run_id": run_id, "tracking_uri": uri, "model": arch,
            "train_config": {"max_tokens": 64, "batch_size": 2, "lr": 0.0, "warmup_steps": 1, "weight_decay": 0.0},
            "train": str(tmp_path / "train.npy"), "val": str(tmp_path / "val.npy"), "ckpt_dir": str(tmp_path / "ck"),
            "num_cpus": 1, "tokenizer": TOKENIZER.fingerprint, "seed": 0, "init_from": str(tmp_path / "seed")}
    result = train_expert(ExpertTask(**spec))
    logged = Path(client.download_artifacts(run_id, "model/data/model", str(tmp_path)))  # the task logged it
    assert sorted(f for f in result.files if f.startswith("data/")) == sorted(f"data/model/{p.name}" for p in logged.iterdir())
    trained, _ = load_model(logged)
    seed, _ = load_model(tmp_path / "seed")
    for (name, a), b in zip(trained.state_dict().items(), seed.state_dict().values()):
        assert torch.equal(a, b), name  # lr 0: nothing moved, so it started at the seed


def test_a_task_whose_run_its_stage_ended_stops_at_its_next_checkpoint(tmp_path):
    """Ray's cancel can miss a task being handed to a worker: the task itself stops at its next
    checkpoint once its stage has ended its run (here: FAILED before the task started)."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from experts.tokenizer import TOKENIZER
    from pipeline.stages.experts import ExpertTask, train_expert
    from pipeline.store.tracking import StageStopped

    arch = {"arch": "gpt", "vocab_size": 259, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    np.save(tmp_path / "train.npy", np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint16))
    np.save(tmp_path / "val.npy", np.zeros(0, dtype=np.uint16))
    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stop-test", artifact_location=(tmp_path / "artifacts").as_uri())
    spec = {"name": "expert-0", "tracking_uri": uri, "model": arch,
            "train_config": {"max_tokens": 16 * 2 * 20, "batch_size": 2, "warmup_steps": 1, "ckpt_every": 5},
            "train": str(tmp_path / "train.npy"), "val": str(tmp_path / "val.npy"),
            "num_cpus": 1, "tokenizer": TOKENIZER.fingerprint, "seed": 0}
    running = client.create_run(experiment).info.run_id
    assert train_expert(ExpertTask(run_id=running, ckpt_dir=str(tmp_path / "a"), **spec)).result.steps == 20
    ended = client.create_run(experiment).info.run_id
    client.set_terminated(ended, "FAILED")
    with pytest.raises(StageStopped, match=f"run {ended} is FAILED"):
        train_expert(ExpertTask(run_id=ended, ckpt_dir=str(tmp_path / "b"), **spec))
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*.json")) == ["step-00000005.json"]


def test_token_files_written_shard_by_shard_equal_the_whole_corpus_tokenised_at_once(ray_local, tmp_path):
    import numpy as np

    from experts.tokenizer import EOS_ID, encode_texts
    from pipeline.stages.cluster import fit_clusters
    from pipeline.stages.experts import expert_data
    from pipeline.store.tokens import block_index, index_location
    from pipeline.text.corpus import corpus_shards, load_corpus

    textgen.write_sharded(tmp_path / "corpus")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "corpus.source=files", f"corpus.files=[{tmp_path}/corpus/*.jsonl,{tmp_path}/corpus/*.txt]", "cluster.k=3",
        "cluster.svd_dim=8", "cluster.min_df=1"])
    assert len(corpus_shards(cfg.corpus)) == 5
    table = fit_clusters(cfg).table
    files = expert_data(cfg, str(tmp_path / "root"), table, 3)
    table = table.to_pydict()
    text = {d.doc_id: d.text for d in load_corpus(cfg.corpus)}
    rows = list(zip(table["doc_id"], table["cluster"], table["split"]))
    for split, name in (("train", "train"), ("validation", "val")):
        dense = encode_texts([text[d] for d, _, s in rows if s == split], EOS_ID)
        assert np.array_equal(np.load(files["dense"][name]), dense)
        for j in range(3):
            expert = encode_texts([text[d] for d, c, s in rows if s == split and c == j], EOS_ID)
            assert np.array_equal(np.load(files[f"expert-{j}"][name]), expert)
    assert sorted(p.name for p in (tmp_path / "root" / "data").iterdir()) == sorted(  # the parts are gone
        f"{n}.{s}.npy{index}" for n in files for s in ("train", "val") for index in ("", ".blocks.json"))
    for name in files:  # each with the block index its readers check it against
        assert block_index(Path(files[name]["train"])) == json.loads(Path(index_location(files[name]["train"]))
                                                                     .read_text())
