"""deploy/: the image, the KubeRay RayJob and the runtime env of `ray job submit` name what
exists in this repository and what moie needs. (No Docker engine or Kubernetes runs here:
the image is not built by the tests; the runtime env is submitted for real in test_ray_job.py.)"""
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from pipeline.config import load_config
from pipeline.ray_runtime import single_machine_stores

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_the_nodes_requirements_are_pyproject_s_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert requirements(DEPLOY / "requirements.txt") == project["dependencies"]


def test_the_runtime_env_ships_the_repository_and_installs_the_requirements():
    env = json.loads((DEPLOY / "runtime-env.json").read_text())
    assert env["working_dir"] == "." and (REPO / env["pip"]).is_file()  # relative to the repository's root
    assert not {"pipeline/", "jobs/", "configs/"} & set(env.get("excludes", []))


def test_the_image_copies_every_package_pyproject_installs_and_the_configs_the_jobs_read():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    sources = {name for line in text.splitlines() if line.startswith("COPY ") for name in line.split()[1:-1]}
    assert all((REPO / source).exists() for source in sources), sources
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} | {"configs", "pyproject.toml"} <= set(copied)
    assert re.search(r'pip install "torch==\$\{TORCH\}" --index-url "\$\{TORCH_INDEX\}"', text)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text  # CPU unless asked for CUDA


def test_the_rayjob_runs_a_moie_job_on_stores_every_node_can_reach():
    (job,) = yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    python, flag, module, *args = shlex.split(job["spec"]["entrypoint"])
    assert (python, flag) == ("python", "-m") and importlib.util.find_spec(module) is not None
    assert args[0] == "--config" and args[2] == "--set"
    load_config(REPO / args[1], args[3:])  # the config and its overrides are valid
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    # a multi-node cluster: moie's own check must find no store on one machine's disk
    assert single_machine_stores(env["MLFLOW_TRACKING_URI"], None, env["MOIE_STORAGE"]) == []
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    assert images == {"<registry>/moie:cpu"}
