"""As a user would: a real `ray start --head`, then `ray job submit --working-dir .`."""
import json
import os
import random
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]


# small budgets: the point is the jobs, not the models
SMALL = ["experts.train.max_tokens=4000", "experts.train.ckpt_every=0",
         "compose.blocks_train={max_tokens: 3000, batch_size: 8}", "compose.gates_train={max_tokens: 1000, batch_size: 8}",
         "compose.joint_train={max_tokens: 3000, batch_size: 8}", "compose.mix_train={max_tokens: 1000, batch_size: 8}",
         "compose.kway_train={max_tokens: 1000, batch_size: 8}", "compose.eval_tokens=2048",
         "compose.center_tokens=2048", "evaluate.max_bytes_per_domain=2048", "evaluate.bootstrap=200",
         "extend.old_bytes_per_domain=2048"]


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


@pytest.mark.slow
def test_a_job_with_the_deploy_runtime_env_runs_moie_from_its_working_dir_in_a_virtualenv_ray_built(ray_head,
                                                                                                      tmp_path):
    """`ray job submit --runtime-env-json "$(cat deploy/runtime-env.json)"`, as the README shows
    for nodes that lack moie: the job (and its tasks) import moie from the uploaded working dir,
    inside the virtualenv Ray built from deploy/requirements.txt, and a stage runs there."""
    home = tmp_path / "home"
    runtime_env = {**json.loads((REPO / "deploy" / "runtime-env.json").read_text()),
                   "env_vars": {"MOIE_HOME": str(home)}}
    probe = ("import json, sys, pipeline, ray; ray.init(); "
             "where = lambda: __import__('pipeline').__file__; "
             "print('PROBE', json.dumps({'prefix': sys.prefix, 'driver': pipeline.__file__, "
             "'task': ray.get(ray.remote(where).remote())}))")
    entrypoint = f"python -c {shlex.quote(probe)} && python -m jobs.cluster --config configs/tiny.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(["ray", "job", "submit", "--address", ray_head, "--runtime-env-json", json.dumps(runtime_env),
                           "--", "sh", "-c", entrypoint], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output, output[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    where = json.loads(line.removeprefix("PROBE "))
    assert "/runtime_resources/pip/" in where["prefix"]  # Ray's virtualenv of the requirements
    for side in ("driver", "task"):  # moie's code: the job's working dir, not this checkout
        assert "/runtime_resources/working_dir_files/" in where[side] and str(REPO) not in where[side], where
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if r.data.tags.get("moie.stage") == "cluster"]
    assert run.info.status == "FINISHED"
