"""Every file of a registered version, pinned in the registry and checked before anything loads it.

A registered version's folder (its run's `model/` or `composition/`) is an MLflow model. Who can
write a run's artifacts (any client of an unauthenticated MLflow server, anyone who can write
the bucket) could otherwise plant code there: MLflow imports the `loader_module` its `MLmodel`
names, runs a `code/` folder or a models-from-code file, and unpickles a `python_model.pkl`.
So registration pins the sha256 of every file of the folder, `MLmodel` included, in a tag of
the registry's version (Tag.FILES), not next to the files; and every moie path that loads a
version (its own commands, `moie serve`, `pipeline.serve.load_model`) first downloads the folder
to a scratch copy, checks it against that pin and against the one layout moie writes, and only
then lets MLflow or moie read the copy. What the registry says is trusted; the artifact store
is not.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from artifacts import ChecksumError, verify_sha256
from pipeline.store.names import Tag

LOADER = "pipeline.serve.serving"  # the installed module MLflow imports to load every moie model (_load_pyfunc)
MLFLOW_OWN = "registered_model_meta"  # MLflow writes it beside MLmodel when it downloads a models:/ URI
ENVIRONMENT = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "manifest.json"}  # beside data/
UNSAFE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill", ".cloudpickle", ".pt", ".pth", ".bin", ".py", ".pyc",
                   ".so")


def pinned_files(version, shown: str) -> dict[str, str]:
    """{path in the version's folder: sha256} that registration pinned, from the registry."""
    raw = version.tags.get(Tag.FILES)
    if raw is None:
        raise ChecksumError(f"{shown} has no {Tag.FILES} tag: it was registered by a moie that did not pin every "
                            "file in the registry, or the tag was removed; refusing to load it; train or compose it "
                            "again with this moie")
    try:
        files = json.loads(raw)
    except json.JSONDecodeError:
        files = None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ChecksumError(f"{shown}'s {Tag.FILES} tag is not a JSON object of path: sha256; refusing to load it")
    return files


def check_pinned(folder: Path, files: dict[str, str], kind: str, shown: str) -> None:
    """ChecksumError unless `folder` holds exactly the pinned files (MLflow's own registered_model_meta
    aside, which the caller removes before loading), each with its pinned sha256, in moie's layout."""
    present = set()
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ChecksumError(f"{shown} holds a symbolic link {name}: refusing to load it; delete the version "
                                "and train or compose it again")
        if path.is_file() and name != MLFLOW_OWN:
            present.add(name)
    fix = "refusing to load it; delete the version (`mlflow ui` > Models) and train or compose it again"
    extra, missing = sorted(present - files.keys()), sorted(files.keys() - present)
    if extra:
        raise ChecksumError(f"{shown} holds {', '.join(extra)}, which registration did not pin (files written to "
                            f"the run's artifacts afterwards); {fix}")
    if missing:
        raise ChecksumError(f"{shown} lacks {', '.join(missing)}, pinned at registration; {fix}")
    for name, expected in sorted(files.items()):
        verify_sha256(folder / name, expected, shown=f"{shown}: {name}", fix=fix)
    check_layout(folder, kind, shown)


def check_layout(folder: Path, kind: str, shown: str) -> None:
    """ChecksumError unless the folder is the MLflow model moie writes: MLmodel's only flavor is
    python_function, loaded by moie's installed module from data/<kind>, with no code, no
    pickled model and no file that could be code or a pickle."""
    refuse = f"{shown} is not an MLflow model moie wrote"
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    unsafe = [f for f in files if f.endswith(UNSAFE_SUFFIXES) or f.split("/")[0] == "code"]
    if unsafe:
        raise ChecksumError(f"{refuse}: it holds {', '.join(sorted(unsafe))} (code or a pickle); refusing to load it")
    outside = [f for f in files if f not in ENVIRONMENT | {MLFLOW_OWN} and not f.startswith(f"data/{kind}/")]
    if outside:
        raise ChecksumError(f"{refuse}: it holds {', '.join(sorted(outside))} outside data/{kind}/; refusing to load it")
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ChecksumError(f"{refuse}: its MLmodel cannot be read ({type(err).__name__}); refusing to load it") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    expected = {"loader_module": LOADER, "data": f"data/{kind}"}
    if (not isinstance(pyfunc, dict) or set(flavors) != {"python_function"}
            or any(pyfunc.get(k) != v for k, v in expected.items()) or pyfunc.get("code")
            or "python_model" in pyfunc or "model_code_path" in pyfunc):
        raise ChecksumError(f"{refuse}: its MLmodel must name only the python_function flavor with loader_module "
                            f"{LOADER}, data data/{kind}, no code and no python_model; got flavors "
                            f"{json.dumps(flavors, default=str)[:300]}; refusing to load it")
