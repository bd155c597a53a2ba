"""What is served is what was registered: planted code, pickles and self-consistent rewrites of
a registered version's artifacts are refused by every moie loading path before any of it runs.

The attacker here can write a run's artifacts (any client of an unauthenticated MLflow server,
anyone who can write the bucket) but not the registry's tags. Each test plants through MLflow's
own API (`MlflowClient().log_artifact` into the FINISHED run behind the version), as such an
attacker would; a real sqlite store and a real model registered by moie's own registration code.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import free_port

from randomise import randomise_

from artifacts import ChecksumError
from experts.checkpoint import build_model
from experts.checkpoint import load_model as load_exported
from experts.checkpoint import save_model
from experts.tokenizer import TOKENIZER
from pipeline.config import load_config
from pipeline.serve.sampling import sample
from pipeline.serve.serving import load_model, log_pyfunc, save_pyfunc
from pipeline.store.catalog import Catalog
from pipeline.store.names import EXPERT_MODEL, model_tags

REPO = Path(__file__).resolve().parents[2]
TINY = {"arch": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}


def exported(directory: Path, config: dict, seed: int) -> Path:
    return save_model(directory, randomise_(build_model(config), seed, std=0.2)).parent


@pytest.fixture
def registered(moie_home, tmp_path, monkeypatch):
    """One expert registered by moie's registration code, its run FINISHED; the test's MLflow
    tracking and registry URIs pointed at the store."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # restored after: load_model sets it
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["tracking.experiment=trust"])
    catalog = Catalog(cfg)
    pipeline_id = catalog.tracker.start_pipeline(cfg)
    run_id = catalog.tracker.create_stage_run(pipeline_id, "experts", "expert-0")
    files = log_pyfunc(catalog.tracker, run_id, exported(tmp_path / "exported", TINY, seed=0), "model", {})
    run = catalog.client.get_run(run_id)
    uri = catalog.register(EXPERT_MODEL, f"{run.info.artifact_uri}/model", run_id,
                           model_tags(pipeline_id, "expert-0", TOKENIZER.fingerprint, TINY, files))
    catalog.tracker.end_run(run_id, "FINISHED")
    catalog.tracker.finish_pipeline(pipeline_id)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(catalog.tracker.uri)
    mlflow.set_registry_uri(catalog.tracker.uri)
    try:
        yield SimpleNamespace(catalog=catalog, uri=uri, run_id=run_id, marker=tmp_path / "planted-code-ran")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def plant(run_id: str, files: dict[str, bytes]) -> None:
    """Write files into the run's model/ folder through MLflow's client ({path in model/: content})."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            local = Path(tmp) / name
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(content)
            folder = "/".join(["model", *name.split("/")[:-1]])
            client.log_artifact(run_id, str(local), folder)


def mlmodel_with(registered, **pyfunc) -> bytes:
    """The version's MLmodel with its python_function flavor changed (None removes a key)."""
    folder = Path(mlflow.MlflowClient().download_artifacts(registered.run_id, "model", tempfile.mkdtemp()))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    for key, value in pyfunc.items():
        if value is None:
            flavor.pop(key, None)
        else:
            flavor[key] = value
    return yaml.safe_dump(mlmodel).encode()


def attack(registered, kind: str) -> tuple[dict[str, bytes], str]:
    """The files a planted attack writes, and the planted file a refusal must name."""
    code = f"open({str(registered.marker)!r}, 'w').write('ran')\n".encode()
    if kind == "models-from-code":  # MLflow execs the model_code_path file
        return {"pyfunc_entry.py": code, "MLmodel": mlmodel_with(
            registered, loader_module="mlflow.pyfunc.loaders.code_model", model_code_path="pyfunc_entry.py",
            data=None, config=None)}, "pyfunc_entry.py"
    if kind == "loader-module":  # MLflow puts code/ on sys.path and imports the loader module
        return {"code/planted_loader.py": code, "MLmodel": mlmodel_with(
            registered, loader_module="planted_loader", code="code")}, "code/planted_loader.py"
    # a pickle whose loading calls exec (protocol 0 opcodes, written out: no pickle module here)
    payload = b"cbuiltins\nexec\n(V" + code.rstrip(b"\n").replace(b"\\", b"\\u005c") + b"\ntR."
    return {"python_model.pkl": payload, "MLmodel": mlmodel_with(
        registered, loader_module="mlflow.pyfunc.model", python_model="python_model.pkl", data=None,
        config=None)}, "python_model.pkl"


def moie(*args: str, cwd: Path = REPO, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, **env))


def plain_mlflow_load(uri: str) -> subprocess.CompletedProcess:
    """mlflow.pyfunc.load_model(uri) in a fresh process, as any user of MLflow would call it."""
    return subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model({uri!r})"],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
                                   MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true"))  # MLflow's default


@pytest.mark.parametrize("kind", ["models-from-code", "loader-module", "pickle"])
def test_code_planted_in_a_registered_version_is_refused_by_moie_serve_and_load_model_before_it_runs(
        registered, kind):
    files, planted = attack(registered, kind)
    plant(registered.run_id, files)
    with pytest.raises(ChecksumError, match=f"holds {planted}, which registration did not pin"):
        load_model(registered.uri)
    assert not registered.marker.exists()
    done = moie("serve", registered.uri, "--port", str(free_port()), "--set", "tracking.experiment=trust")
    assert done.returncode == 2 and f"holds {planted}, which registration did not pin" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not registered.marker.exists()
    # the threat is real: MLflow's own loader, pickles allowed (its default), runs the planted code
    plain_mlflow_load(registered.uri)
    assert registered.marker.read_text() == "ran"


def test_weights_model_json_and_mlmodel_rewritten_together_are_refused_by_every_loading_path(registered, tmp_path):
    other = save_pyfunc(exported(tmp_path / "other", {**TINY, "n_embd": 32}, seed=1), tmp_path / "model", "model", {})
    # a self-consistent MLflow model: MLmodel records the sha256 of the new weights and model.json
    plant(registered.run_id, {p.relative_to(other).as_posix(): p.read_bytes() for p in other.rglob("*")
                              if p.is_file()})
    refusal = "MLmodel has sha256"  # the registry's pin, not the folder's own record
    with pytest.raises(ChecksumError, match=refusal):
        load_model(registered.uri)
    with pytest.raises(ChecksumError, match=refusal):  # plain MLflow loading: moie's loader checks the pin too
        mlflow.pyfunc.load_model(registered.uri)
    for command in (["generate", "--model", registered.uri, "--prompt", "a", "--max-new-tokens", "2"],
                    ["serve", registered.uri, "--port", str(free_port())]):
        done = moie(*command, "--set", "tracking.experiment=trust")
        assert done.returncode == 2 and refusal in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_mlmodel_that_keeps_moies_loader_but_points_at_planted_data_is_refused_by_plain_mlflow_too(registered,
                                                                                                    tmp_path):
    other = save_pyfunc(exported(tmp_path / "other", {**TINY, "n_embd": 32}, seed=1), tmp_path / "model", "model", {})
    mlmodel = yaml.safe_load((other / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["data"] = "data/planted/model"  # beside the pinned data/model
    plant(registered.run_id, {"MLmodel": yaml.safe_dump(mlmodel).encode(),
                              **{f"data/planted/model/{p.name}": p.read_bytes() for p in (other / "data" / "model").iterdir()}})
    with pytest.raises(ChecksumError, match="not data/model of an MLflow model folder moie wrote"):
        mlflow.pyfunc.load_model(registered.uri)
    with pytest.raises(ChecksumError, match="which registration did not pin"):
        load_model(registered.uri)


def test_an_untouched_version_loads_through_moie_load_model_with_pickles_disabled(registered, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    model = load_model(registered.uri)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    out = model.predict(pd.DataFrame({"prompt": ["ab", "c"], "max_new_tokens": [6, 4], "seed": [1, 2]}))
    local, _ = load_exported(exported(tmp_path / "same", TINY, seed=0))  # what was registered
    assert list(out["text"]) == [sample(local, "ab", 6, 0.8, 50, 1).text, sample(local, "c", 4, 0.8, 50, 2).text]
    scored = model.predict(pd.DataFrame({"prompt": ["abc"] * 8}), params={"score": True})  # generates nothing:
    assert list(scored["bytes"]) == [3] * 8  # the new-bytes limit does not count the default max_new_tokens


def test_an_unreachable_registry_is_named_as_such_not_after_minutes_of_retries_and_not_as_does_not_exist(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "library", "show", f"models:/{EXPERT_MODEL}/1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,  # MLflow alone retries ~250 s
                          env=dict(os.environ, MLFLOW_TRACKING_URI=url))
    print(f"answered in {time.monotonic() - started:.1f} s")
    assert done.returncode == 2 and f"cannot reach the MLflow tracking server at {url}" in done.stderr, done.stderr
    assert "does not exist" not in done.stderr and "Traceback" not in done.stderr


def test_loading_and_serving_paths_write_nothing_into_the_registered_store(registered):
    """A read-only store can be served: moie reads a scratch copy (MLflow's own models:/ download of a
    local store writes registered_model_meta into the registered folder itself)."""
    store = Path(mlflow.MlflowClient().get_run(registered.run_id).info.artifact_uri.removeprefix("file://"))

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")}

    before = snapshot()
    load_model(registered.uri)
    registered.catalog.load_registered(registered.uri, Path(tempfile.mkdtemp()))
    assert snapshot() == before



def test_moie_gc_lists_only_what_gone_processes_left_and_deletes_it_only_with_delete(moie_home, tmp_path):
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a process that has exited
    temp, store = tmp_path / "tmp", tmp_path / "storage" / "pipeline"
    left, in_use = temp / f"moie-task-{gone}-x1", temp / f"moie-serve-{os.getpid()}-x2"
    old_part, fresh_part = store / "model.safetensors.part-0a1b2c3d", store / "step-4.json.part-4e5f6a7b"
    for folder in (left, in_use, store):
        folder.mkdir(parents=True)
    for file in (left / "tokens.npy", old_part, fresh_part):
        file.write_bytes(b"x")
    os.utime(old_part, (time.time() - 2 * 3600,) * 2)  # an upload killed two hours ago; the other one is running
    env = {"TMPDIR": str(temp), "MOIE_STORAGE": str(tmp_path / "storage")}
    listed = moie("gc", **env)
    assert listed.returncode == 0, listed.stderr
    assert f"would delete {left} " in listed.stdout and f"would delete {old_part} " in listed.stdout
    assert str(in_use) not in listed.stdout and str(fresh_part) not in listed.stdout
    assert left.exists() and old_part.exists()  # a dry run by default
    deleted = moie("gc", "--delete", **env)
    assert deleted.returncode == 0 and not left.exists() and not old_part.exists()
    assert in_use.exists() and fresh_part.exists()
