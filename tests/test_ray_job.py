"""As a user would: a real `ray start --head`, then `ray job submit --working-dir .`."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cluster_then_experts_run_as_submitted_ray_jobs_and_land_in_mlflow(ray_head, tmp_path):
    home = tmp_path / "home"
    runtime_env = {"env_vars": {"MOIE_HOME": str(home)}}
    cmd = ["ray", "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.cluster", "--config", "configs/tiny.yaml"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
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
    cmd = ["ray", "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.experts", "--pipeline", ids[-1], "--config", "configs/tiny.yaml",
           "--set", "experts.train.max_tokens=4000", "experts.train.ckpt_every=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    experts = client.search_model_versions("name = 'moie-expert'")
    central = client.search_model_versions("name = 'moie-central'")
    k = int(run.data.params["cluster.k"])
    assert len(experts) + len(client.search_runs([parent.info.experiment_id], "tags.`moie.skipped` != ''")) == k
    assert len(central) == 1 and central[0].tags["moie.pipeline"] == ids[-1]
