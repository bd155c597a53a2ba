"""Several Ray nodes that share nothing but the network: a head for the driver and two worker
nodes (`ray.cluster_utils.Cluster`, 1 CPU each and one `expert_slot`, so the two experts
must train on different nodes), an MLflow tracking server whose artifacts live in an
S3-compatible object store (moto's server), and moie's storage in that object store too. No
stage may lean on a local path: the test's MOIE_HOME must stay empty. One worker node is
removed while its expert trains; the expert must resume from its newest checkpoint in the
object store on the other node, and each expert must be registered exactly once."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_for_http

import textgen

REPO = Path(__file__).resolve().parents[2]
BUCKET = "moie"
STEPS = 240  # each expert's steps (8 windows of 64 tokens a step); a checkpoint every 20


@pytest.fixture(scope="module")
def cluster(s3_server):
    """(Cluster, its two worker nodes, the environment every moie process of the test uses)."""
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="moie-rm-", dir="/tmp"))  # short: Unix socket paths <= 107 bytes
    saved = dict(os.environ)
    os.environ.update(s3_server)  # the nodes' processes inherit it (on a real cluster: each node's own)
    os.environ["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "temp_dir": str(root / "ray"),
            "dashboard_agent_listen_port": free_port(), "object_store_memory": 80 << 20})
        workers = [nodes.add_node(num_cpus=1, resources={"expert_slot": 1}, object_store_memory=80 << 20)
                   for _ in range(2)]
        nodes.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": nodes.address}
        env.pop("MLFLOW_TRACKING_URI", None)
        yield nodes, workers, env, root
    finally:
        if nodes is not None:
            nodes.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def mlflow_server(cluster):
    """`mlflow server` on 127.0.0.1 with artifact serving into the object store; its URI."""
    from pipeline.cli import stop_process_group

    _, _, env, root = cluster
    port = free_port()
    log_path = root / "mlflow.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, log_path, "mlflow server", timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def corpus(root: Path) -> Path:
    path = root / "docs.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(25, ["cooking", "sailing"], seed=0)))
    return path


def overrides(root: Path) -> list[str]:
    return ["corpus.source=files", f"corpus.files=[{corpus(root)}]", "cluster.k=2", "cluster.svd_dim=8",
            "cluster.min_df=1", "tracking.experiment=multinode", "experts.dense=false", "experts.seed_fraction=0",
            "experts.resources={expert_slot: 1}", f"experts.train.max_tokens={STEPS * 8 * 64}",
            # a small central model of its own (trained last, beside or after the experts) for the compose stage
            "central.arch=gpt", "central.model={block_size: 64, n_layer: 2, n_head: 2, n_embd: 32}",
            "central.train={max_tokens: 4096, batch_size: 8}",
            "experts.train.ckpt_every=20", "experts.train.log_every=10", "experts.progress_every=1"]


def moie(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """A moie command as a user runs it on the head node (its own process group)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def s3_keys(env: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_single_machine_store_on_a_multi_node_cluster_is_refused_before_any_work(cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, _, env, root = cluster
    home = tmp_path / "home"
    args = ["cluster", "--config", "configs/tiny.yaml", "--set", *overrides(root)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**env, "MOIE_HOME": str(home)}, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.startswith("moie: error:")]
    assert proc.returncode == 2 and len(err) == 1 and proc.stderr.strip().endswith(err[0]), proc.stderr[-3000:]
    assert re.search(r"this Ray cluster has 3 alive nodes, but the MLflow tracking store sqlite:///\S+; its artifact "
                     r"store \S+; the storage of token files and checkpoints \S+ lie on one machine's disk", err[0])
    assert "MLFLOW_TRACKING_URI" in err[0] and "MOIE_STORAGE" in err[0] and "shared_filesystem: true" in err[0]
    assert MlflowClient(f"sqlite:///{home / 'mlflow.db'}").search_runs(["0", "1"]) == []  # no run was started

    # a tracking server is not enough while the storage is a local directory
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**env, "MOIE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server}, timeout=300)
    assert proc.returncode == 2 and "the storage of token files and checkpoints" in proc.stderr, proc.stderr[-3000:]
    assert "MLflow tracking store" not in proc.stderr


def test_experts_spread_over_two_nodes_and_one_whose_node_is_lost_resumes_on_the_other_from_the_object_store(
        cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    nodes, workers, env, root = cluster
    home = tmp_path / "home"  # nothing may land here
    env = {**env, "MOIE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server, "MOIE_STORAGE": f"s3://{BUCKET}/store"}
    args = ["--config", "configs/tiny.yaml", "--set", *overrides(root)]
    out = finish(moie(["cluster", *args], env, tmp_path / "cluster.log"), tmp_path / "cluster.log", 300)
    ids = re.findall(r"^([0-9a-f]{32})$", out, flags=re.MULTILINE)
    assert ids, out[-2000:]
    pipeline_id = ids[-1]

    client = MlflowClient(mlflow_server)
    proc = moie(["experts", "--pipeline", pipeline_id, *args], env, tmp_path / "experts.log")
    victim = None
    deadline = time.time() + 300
    while victim is None and proc.poll() is None and time.time() < deadline:
        # an expert whose first checkpoint is in the object store, and the node it trains on
        steps = {}
        for key in s3_keys(env, f"store/{pipeline_id}/"):
            if m := re.search(r"/(expert-\d)/step-(\d+)\.json$", key):
                steps[m.group(1)] = max(steps.get(m.group(1), 0), int(m.group(2)))
        runs = {r.data.tags.get("moie.expert"): r for r in client.search_runs(
            [client.get_experiment_by_name("multinode").experiment_id], f"tags.`moie.pipeline` = '{pipeline_id}'")}
        for name, step in steps.items():
            node_id = runs[name].data.tags.get("moie.node_id")
            if 0 < step < STEPS and any(w.node_id == node_id for w in workers):
                victim = (name, step, next(w for w in workers if w.node_id == node_id))
                break
        time.sleep(0.2)
    assert victim is not None, (tmp_path / "experts.log").read_text()[-4000:]
    name, seen_step, node = victim
    nodes.remove_node(node)  # the node and every process on it are gone
    survivor = next(w for w in workers if w is not node)
    out = finish(proc, tmp_path / "experts.log", 600)

    experiment = client.get_experiment_by_name("multinode").experiment_id
    versions = client.search_model_versions("name = 'moie-expert'")
    assert sorted(v.tags["moie.expert"] for v in versions if v.tags["moie.pipeline"] == pipeline_id) == \
        ["expert-0", "expert-1"], out[-3000:]  # each registered exactly once
    assert len(client.search_model_versions("name = 'moie-central'")) == 1
    runs = {r.data.tags["moie.expert"]: r for r in client.search_runs(
        [experiment], f"tags.`moie.pipeline` = '{pipeline_id}' and tags.`moie.stage` = 'experts'")
        if r.data.tags["moie.expert"] != "central"}
    lost = runs[name]
    # its first attempt ran on the lost node, its retry on the other, from its newest checkpoint
    assert lost.data.tags["moie.nodes"].split(",") == [node.node_id, survivor.node_id], out[-3000:]
    resumed = int(lost.data.tags["moie.resumed_from"])
    assert seen_step <= resumed < STEPS and resumed % 20 == 0
    assert lost.data.metrics["resumed_from_step"] == resumed and lost.data.metrics["steps"] == STEPS
    assert {r.data.tags["moie.node_id"] for r in runs.values()} == {survivor.node_id} and \
        {n for r in runs.values() for n in r.data.tags["moie.nodes"].split(",")} == \
        {w.node_id for w in workers}  # experts trained on both worker nodes
    assert [r.info.run_name for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")] == []

    # the compose stage on the same cluster: its tasks fetch the experts from the registry and
    # their token files from the object store, on whichever node they run
    compose = ["compose", "--pipeline", pipeline_id, *args, "compose.modes=[independent]",
               "compose.blocks_train={max_tokens: 4000, batch_size: 8}",
               "compose.gates_train={max_tokens: 2000, batch_size: 8}", "compose.eval_tokens=2048",
               "compose.center_tokens=2048"]
    out = finish(moie(compose, env, tmp_path / "compose.log"), tmp_path / "compose.log", 300)
    (composition,) = client.search_model_versions("name = 'moie-composition'")
    by_cluster = sorted((v for v in versions if v.tags["moie.pipeline"] == pipeline_id),
                        key=lambda v: int(v.tags["moie.cluster"]))
    assert json.loads(composition.tags["moie.experts"]) == [f"models:/moie-expert/{v.version}" for v in by_cluster]
    assert [r.info.run_name for r in client.search_runs([experiment], "attributes.status = 'RUNNING'")] == []
    # nothing went through a local path: storage and artifacts are in the object store only
    assert not home.exists() or sorted(home.rglob("*")) == [], sorted(home.rglob("*"))[:5]
    stored = s3_keys(env, "")
    assert any(k.startswith(f"store/{pipeline_id}/") and k.endswith("/data/expert-0.train.npy") for k in stored)
    assert any(k.startswith("mlflow/") and k.endswith("model/data/model/model.safetensors") for k in stored)
    assert any(k.startswith("mlflow/") and k.endswith("composition/composition.safetensors") for k in stored)
