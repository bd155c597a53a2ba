"""As a user would: a real `ray start --head`, then `ray job submit --working-dir .`."""
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]


# small budgets: the point is the jobs, not the models
SMALL = ["experts.train.max_tokens=4000", "experts.train.ckpt_every=0",
         "compose.blocks_train={max_tokens: 3000, batch_size: 8}", "compose.gates_train={max_tokens: 1000, batch_size: 8}",
         "compose.joint_train={max_tokens: 3000, batch_size: 8}", "compose.eval_tokens=2048",
         "compose.center_tokens=2048", "evaluate.max_bytes_per_domain=2048"]


def submit(ray_head: str, home: Path, *job: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python -m jobs.<stage> ...`, as the README shows."""
    runtime_env = {"env_vars": {"MOIE_HOME": str(home)}}
    cmd = ["ray", "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", *job]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_every_stage_runs_as_a_submitted_ray_job_and_lands_in_mlflow(ray_head, tmp_path):
    home = tmp_path / "home"
    proc = submit(ray_head, home, "jobs.cluster", "--config", "configs/tiny.yaml")
    output = proc.stdout + proc.stderr
    assert "succeeded" in output
    ids = re.findall(r"^([0-9a-f]{32})$", proc.stdout, flags=re.MULTILINE)
    assert ids, output[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(ids[-1])
    assert parent.data.tags["moie.stage"] == "pipeline"
    (run,) = client.search_runs([parent.info.experiment_id], f"tags.`moie.pipeline` = '{ids[-1]}' "
                                                             "and tags.`moie.stage` = 'cluster'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["purity"] > 0.5
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"router.safetensors", "router.json", "assignments.parquet", "manifest.json"} <= names
    # Artifacts live under the (absolute) MOIE_HOME, not in the job's temporary working directory.
    assert any((home / "artifacts").rglob("router.safetensors"))

    # The experts stage of the same pipeline, as a second job: k experts + dense, registered.
    pipeline = ["--pipeline", ids[-1], "--config", "configs/tiny.yaml", "--set", *SMALL]
    job = submit(ray_head, home, "jobs.experts", *pipeline)
    experts = client.search_model_versions("name = 'moie-expert'")
    central = client.search_model_versions("name = 'moie-central'")
    k = int(run.data.params["cluster.k"])
    skipped = client.search_runs([parent.info.experiment_id], "tags.`moie.skipped` != ''")
    assert len(experts) + len(skipped) == k, (job.stdout + job.stderr)[-4000:]
    assert sorted(v.tags["moie.role"] for v in central) == ["dense+central", "seed"]
    assert {v.tags["moie.pipeline"] for v in central} == {ids[-1]}

    # compose (both modes) and evaluate, each its own job
    submit(ray_head, home, "jobs.compose", *pipeline)
    compositions = client.search_model_versions("name = 'moie-composition'")
    assert sorted(v.tags["moie.mode"] for v in compositions) == ["independent", "joint"]
    proc = submit(ray_head, home, "jobs.evaluate", *pipeline)
    assert "| cbtm_top1 |" in proc.stdout
    (evaluation,) = client.search_runs([parent.info.experiment_id], f"tags.`moie.pipeline` = '{ids[-1]}' "
                                                                    "and tags.`moie.stage` = 'evaluate'")
    assert evaluation.info.status == "FINISHED"
    headline = client.get_run(ids[-1]).data.metrics
    for system in ("dense", "central", "oracle", "cbtm_top1", "cbtm_top2", "cbtm_all", "composed_independent",
                   "composed_joint", "composed_adaptive"):
        assert f"bpb/{system}/all" in headline, system
    assert "routing_accuracy/composed_independent" in headline

    # a new domain added to the finished pipeline, as one more job: its composition's URI is the last line
    # (random sentences of common words: held-out letters must not be near-duplicates of the others)
    words = "court law people state king lord city house land church judge trial right year day time".split()
    rng = random.Random(0)
    rows = [{"text": " ".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)),
             "work": f"letter-{i}"} for i in range(48)]
    new = tmp_path / "letters.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = submit(ray_head, home, "jobs.extend", *pipeline, "extend.train={max_tokens: 4000}",
                  "--files", str(new), "--domain", "letters")
    assert "| finetune_replay |" in proc.stdout
    (extended,) = client.search_model_versions("name = 'moie-composition' and tags.`moie.domain` = 'letters'")
    assert f"models:/moie-composition/{extended.version}" in proc.stdout
    assert len(json.loads(extended.tags["moie.experts"])) == len(experts) + 1
