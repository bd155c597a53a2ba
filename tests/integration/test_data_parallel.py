"""Data-parallel training on Ray Train (TorchTrainer, gloo): 2 workers take the steps 1 worker
takes with the same global batch, go on from their checkpoint after a worker is killed, and
the experts stage trains its dense model so (experts.dense_workers).

The first two run in a process of their own with its own local Ray, to check what Ray Train
leaves in its driver: a SIGINT handler that aborted its (finished) run on a later Ctrl-C, so
that an interrupted stage waited on as if hung; run_data_parallel puts the process's own back."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import textgen

from experts.checkpoint import build_model, load_model
from experts.tokenizer import VOCAB_SIZE
from experts.trainer import TrainConfig, train
from pipeline.config import load_config
from pipeline.ray_runtime import Grant
from pipeline.stages.cluster import run_cluster
from pipeline.stages.experts import run_experts
from pipeline.stages.matched import MatchedTask, launch_matched
from pipeline.store import storage
from pipeline.store.catalog import Catalog, exact_uri
from pipeline.store.names import DENSE_MATCHED
from pipeline.store.tokens import put_token_file
from pipeline.store.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
MODEL = {"arch": "gpt", "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB_SIZE}
STEPS = 8
TRAIN = {"max_tokens": 4 * 32 * STEPS, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 2,
         "eval_every": 0, "ckpt_every": 3, "log_every": 1, "compile": False, "precision": "fp32", "seed": 0}


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16))
    return path


def one_worker(tokens_path):
    """The reference: one process, no Ray, the same seed and global batch."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    result = train(model, np.load(tokens_path, mmap_mode="r"), None, TrainConfig(**TRAIN))
    return model, result


RUN = """
import json, signal, sys
import pipeline, ray
from pipeline.stages.parallel import train_model_parallel
config, temp_dir = json.loads(sys.argv[1]), sys.argv[2]
ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir,
         log_to_driver=False)
result = train_model_parallel(config, workers=2, cpus_per_worker=1, name="test-dp", max_failures=1)
try:  # after the run, Ctrl-C interrupts this process again
    signal.raise_signal(signal.SIGINT)
    result["interrupted"] = False
except KeyboardInterrupt:
    result["interrupted"] = True
print(json.dumps(result))
"""


def run_two_workers(tmp_path, tokens_path, **extra) -> subprocess.CompletedProcess:
    """Two gloo workers on a Ray of their own (2 CPUs), in a process of its own."""
    config = {"model": MODEL, "train_config": TRAIN, "train": str(tokens_path), "val": None, "seed": 0,
              "ckpt_dir": str(tmp_path / "ckpt"), "out": str(tmp_path / "out"), "num_cpus": 1, **extra}
    temp_dir = tempfile.mkdtemp(prefix="moie-rt-", dir="/tmp")  # short: Unix socket paths <= 107 bytes
    try:
        return subprocess.run([sys.executable, "-c", RUN, json.dumps(config), temp_dir], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def two_workers(tmp_path, tokens_path, **extra):
    done = run_two_workers(tmp_path, tokens_path, **extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_model(tmp_path / "out" / "model")[0], json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_training(model, result, reference, reference_result):
    assert result["steps"] == reference_result.steps == STEPS
    assert abs(result["train_loss"] - reference_result.train_loss) < 1e-3
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-4), name


def test_two_gloo_workers_train_as_one_worker_with_the_same_global_batch(tmp_path, tokens):
    model, result = two_workers(tmp_path, tokens)
    assert result["workers"] == 2 and result["resumed_from"] is None
    assert result["interrupted"]  # Ray Train's SIGINT handler did not outlive its run
    reference, reference_result = one_worker(tokens)
    assert_same_training(model, result, reference, reference_result)


def test_two_workers_go_on_from_their_checkpoint_after_one_is_killed(tmp_path, tokens):
    model, result = two_workers(tmp_path, tokens, kill_after_checkpoint=str(tmp_path / "kill"))
    assert (tmp_path / "kill" / "killed").read_text() == "step-00000003.json"
    assert result["workers"] == 2 and result["resumed_from"] == 3  # restarted from the step-3 checkpoint
    reference, reference_result = one_worker(tokens)
    assert_same_training(model, result, reference, reference_result)


def test_a_moie_error_on_a_worker_ends_the_run_with_it_and_is_not_retried(tmp_path, tokens):
    """Ray Train retries a run whose worker failed (max_failures): for a lost worker. A moie error
    (here: the token file's block does not match its index) would be met again by every retry;
    the run ends with it after the failed attempt, and no worker trains again."""
    location = tmp_path / "store" / "tokens.npy"
    put_token_file(tokens, str(location))  # one block
    with open(location, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)[0]
        f.seek(1000)
        f.write(bytes([byte ^ 1]))
    done = run_two_workers(tmp_path, location, attempts=str(tmp_path / "attempts"))
    assert done.returncode != 0
    assert "test-dp: data-parallel training failed on worker" in done.stderr, done.stderr[-3000:]
    assert "does not match the sha256 its block index records" in done.stderr
    starts = sorted(p.name.split("-")[0] for p in (tmp_path / "attempts").iterdir())
    # one attempt: the run's retry (max_failures=1) found the error and trained nothing (the worker that
    # did not fail first may have been stopped before it started: each rank started at most once)
    assert starts and len(set(starts)) == len(starts), starts
    assert re.search(r"failed on worker (\d)", done.stderr).group(1) in starts  # the one that met the error


def stage_overrides(tmp_path, workers: int) -> list[str]:
    """configs/tiny.yaml on a generated two-domain corpus: two experts, the dense model on `workers`."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(25, ["cooking", "sailing"], seed=0)))
    return ["corpus.source=files", f"corpus.files=[{path}]", "cluster.k=2", "cluster.svd_dim=8", "cluster.min_df=1",
            "tracking.experiment=test", "experts.train.max_tokens=6000", "experts.train.ckpt_every=5",
            "experts.train.precision=fp32", "experts.train.compile=false", f"experts.dense_workers={workers}"]


def stage_config(tmp_path, workers: int):
    return load_config(REPO / "configs" / "tiny.yaml", stage_overrides(tmp_path, workers))


def test_the_dense_model_and_its_matched_continuation_train_on_two_workers_as_on_one(ray_local, moie_home,
                                                                                      tmp_path):
    """experts.dense_workers: 2 — the seed phase, the dense model's continuation past it, and
    dense_matched (the dense model trained on), each on two Ray Train workers — gives the
    models that one process gives with the same global batch."""
    tracker, dense, matched = None, {}, {}
    for workers in (1, 2):
        cfg = stage_config(tmp_path, workers)
        pipeline_id = run_cluster(cfg)
        registered = run_experts(cfg, pipeline_id)
        assert sorted(registered) == ["dense", "expert-0", "expert-1"]
        tracker = Tracker(cfg)
        runs = {r.data.tags["moie.expert"]: r for r in tracker.stage_runs(pipeline_id, "experts")}
        dense[workers] = runs["dense"], runs["expert-0"]
        matched[workers] = train_matched(cfg, pipeline_id, registered["dense"], runs["dense"], workers)
    (one, expert_one), (two, expert_two) = dense[1], dense[2]
    assert (one.data.tags["moie.workers"], two.data.tags["moie.workers"]) == ("1", "2")
    assert two.data.tags["moie.resumed_from"] == one.data.tags["moie.resumed_from"]  # the continuation of the seed
    steps = [m.step for m in tracker.client.get_metric_history(two.info.run_id, "train_loss")]
    assert steps == [m.step for m in tracker.client.get_metric_history(one.info.run_id, "train_loss")] and steps
    assert abs(two.data.metrics["train_loss"] - one.data.metrics["train_loss"]) < 1e-3
    assert abs(two.data.metrics["val_bpb"] - one.data.metrics["val_bpb"]) < 1e-3
    # an expert branched from the seed the two workers trained: the same expert
    assert abs(expert_two.data.metrics["val_bpb"] - expert_one.data.metrics["val_bpb"]) < 1e-3
    # dense_matched: 2 workers continue their dense model as one process continues its own
    assert (matched[1]["workers"], matched[2]["workers"]) == (1, 2)
    assert matched[1]["steps"] == matched[2]["steps"] == 4
    assert abs(matched[2]["train_loss"] - matched[1]["train_loss"]) < 1e-3


def train_matched(cfg, pipeline_id: str, dense_uri: str, dense_run, workers: int) -> dict:
    """dense_matched's task on `workers` workers, for 4 steps past the registered dense model."""
    catalog = Catalog(cfg)
    version = catalog.resolve(dense_uri)
    root = catalog.checkpoint_root(pipeline_id, dense_run.data.tags["moie.cluster_run"])
    train_cfg = {**cfg.experts.train, "max_tokens": 4 * 8 * 64, "seed": 0}
    run_id = catalog.tracker.create_stage_run(pipeline_id, "compose", name=f"matched-{workers}")
    task = MatchedTask(name=DENSE_MATCHED, run_id=run_id, tracking_uri=catalog.tracker.uri, dense=exact_uri(version),
                       train=Catalog.token_file(root, "dense", "train"), val=Catalog.token_file(root, "dense", "val"),
                       ckpt_dir=storage.join(root, f"matched-{workers}"), train_config=train_cfg,
                       tokenizer=version.tags["moie.tokenizer"], grant=Grant(1.0), seed=0, pipeline=pipeline_id,
                       workers=workers)
    return ray.get(launch_matched(task))


def test_ctrl_c_stops_a_stage_whose_dense_model_trains_on_two_workers_and_a_rerun_completes_it(ray_local,
                                                                                              moie_home, tmp_path):
    """`moie experts` with experts.dense_workers: 2, stopped by Ctrl-C while the dense model's
    seed phase trains on its two workers (held after their first checkpoint, experts.hold):
    exit 130, no run left RUNNING, worker 0 gone; run again, the stage completes — and its
    experts, which wait for CPUs the dense model's workers hold or the other way round, too."""
    overrides = [*stage_overrides(tmp_path, 2), "experts.train.max_tokens=12000"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    pipeline_id = run_cluster(cfg)
    hold = tmp_path / "hold"
    hold.mkdir()
    log = tmp_path / "experts.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "experts", "--config",
                             str(REPO / "configs" / "tiny.yaml"), "--pipeline", pipeline_id, "--set", *overrides,
                             f"experts.hold={hold}"], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not (hold / "dense.held").exists():  # the seed phase's worker 0, after its first checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        held = json.loads((hold / "dense.held").read_text())
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
        deadline = time.monotonic() + 120
        while Path(f"/proc/{held['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{held['pid']}").exists()  # worker 0 did not outlive the stage
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own Ray outlived it
        except ProcessLookupError:
            pass
    tracker = Tracker(cfg)
    statuses = {r.data.tags["moie.expert"]: r.info.status for r in tracker.stage_runs(pipeline_id, "experts", None)}
    assert statuses["dense"] == "KILLED" and "RUNNING" not in statuses.values(), statuses
    assert sorted(run_experts(cfg, pipeline_id)) == ["dense", "expert-0", "expert-1"]
    dense = next(r for r in tracker.stage_runs(pipeline_id, "experts") if r.data.tags["moie.expert"] == "dense")
    assert dense.data.tags["moie.workers"] == "2" and dense.info.status == "FINISHED"
