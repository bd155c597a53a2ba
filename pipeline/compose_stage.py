"""The compose stage: registered central + experts -> trained blocks and gates -> moie-composition.

By default it composes the pipeline's central model with all its experts; any registered
versions (`models:/moie-expert/3`, from any pipeline) can be named instead, provided they
share one tokenizer. Each mode (independent, joint) is a child run and a registered
version; only the new parameters are saved, with a manifest naming the exact versions.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.artifacts import write_json
from pipeline.config import Config
from pipeline.expert_stage import CENTRAL_MODEL, DENSE, EXPERT_MODEL, checkpoint_root, register_model
from pipeline.ray_runtime import check_resources, connect_ray
from pipeline.stages import StageError
from pipeline.tracking import Tracker

COMPOSITION_MODEL = "moie-composition"


def parse_model_uri(uri: str) -> tuple[str, str]:
    """'models:/name/version' -> (name, version)."""
    parts = uri.removeprefix("models:/").split("/")
    if not uri.startswith("models:/") or len(parts) != 2 or not parts[1].isdigit():
        raise StageError(f"model URI {uri!r} must look like models:/<registered model>/<version>, "
                         "e.g. models:/moie-expert/3")
    return parts[0], parts[1]


def resolve_version(tracker: Tracker, uri: str):
    from mlflow.exceptions import MlflowException

    name, version = parse_model_uri(uri)
    try:
        return tracker.client.get_model_version(name, version)
    except MlflowException:
        raise StageError(f"model version {uri} does not exist in the registry at {tracker.uri}; "
                         f"list versions with `mlflow ui` (Models tab)") from None


def pipeline_models(tracker: Tracker, pipeline_id: str) -> tuple[str, list[str]]:
    """The pipeline's central model URI and its experts' URIs, ordered by cluster."""
    def versions(name):
        return tracker.client.search_model_versions(f"name = '{name}' and tags.`moie.pipeline` = '{pipeline_id}'")

    central = sorted(versions(CENTRAL_MODEL), key=lambda v: v.tags.get("moie.role") != "central")
    central = [v for v in central if v.tags.get("moie.role") in ("central", "dense+central")]
    experts = sorted(versions(EXPERT_MODEL), key=lambda v: int(v.tags.get("moie.cluster", 0)))
    if not central or not experts:
        raise StageError(f"pipeline {pipeline_id} has no registered central model and experts; run "
                         f"`moie experts --pipeline {pipeline_id}` first, or name models with --central/--experts")
    return (f"models:/{CENTRAL_MODEL}/{central[0].version}",
            [f"models:/{EXPERT_MODEL}/{v.version}" for v in experts])


def model_dir(tracker: Tracker, version, dst: Path) -> str:
    """Download a registered version's safetensors + JSON into dst; return the directory."""
    return tracker.client.download_artifacts(version.run_id, "model", str(dst))


def check_tokenizers(versions: dict[str, object]) -> str:
    fingerprints = {uri: v.tags.get("moie.tokenizer") for uri, v in versions.items()}
    if len(set(fingerprints.values())) != 1 or None in fingerprints.values():
        raise StageError("the central model and experts must share one tokenizer, got "
                         + ", ".join(f"{uri}: {fp}" for uri, fp in fingerprints.items()))
    return next(iter(fingerprints.values()))


def data_path(cfg: Config, version, split: str, name: str | None = None) -> str:
    """A token file of the clustering a model was trained on (its shared data directory):
    the model's own data by default, or another part (`name`, e.g. 'dense') of the same."""
    tags = version.tags
    if "moie.cluster_run" not in tags:
        raise StageError(f"{version.name}/{version.version} has no moie.cluster_run tag (registered by an older "
                         "moie); retrain it with `moie experts`")
    root = checkpoint_root(cfg, tags["moie.pipeline"], tags["moie.cluster_run"])
    path = root / "data" / f"{name or tags['moie.expert']}.{split}.npy"
    if not path.is_file():
        raise StageError(f"training data of {version.name}/{version.version} not found at {path}; "
                         "compose on a machine that sees the experts stage's checkpoint directory")
    return str(path)


# --- Ray task bodies -------------------------------------------------------------------------


def _composed(spec: dict, expert_dirs: list[str]):
    import torch

    from composition.model import ComposedLM
    from experts.checkpoint import load_model

    torch.set_num_threads(max(1, int(spec["num_cpus"])))
    torch.manual_seed(spec["seed"])
    central, _ = load_model(spec["central_dir"])
    experts = [load_model(d)[0] for d in expert_dirs]
    composed = ComposedLM(central, experts, n_points=spec["n_points"], routing=spec["routing"], k=spec["k"],
                          threshold=spec["threshold"], pool=spec.get("pool", "token"))
    if spec.get("centers"):
        composed.load_state_dict(spec["centers"], strict=False)
    return composed


def new_parameters(composed) -> dict:
    """Blocks and gates only: what a composition adds to the registered models."""
    return {k: v.detach().cpu().contiguous() for k, v in composed.state_dict().items()
            if k.startswith(("blocks.", "gates.", "centers."))}


def centers_task(spec: dict) -> dict:
    """The central model's mean state at each composition point, on its own training data:
    computed once and shared by every expert's training, so independent gates agree on it."""
    from composition.training import fit_centers

    composed = _composed({**spec, "centers": None}, spec["expert_dirs"][:1])
    if spec["center_tokens"]:
        fit_centers(composed, np.load(spec["train"], mmap_mode="r"), spec["center_tokens"])
    return {k: v for k, v in new_parameters(composed).items() if k.startswith("centers.")}


def train_independent_task(spec: dict, e: int) -> dict:
    """Blocks then gates of expert e alone, on its own data; returns its new parameters."""
    from composition.training import train_independent
    from experts.trainer import TrainConfig

    composed = _composed(spec, [spec["expert_dirs"][e]])
    tokens = np.load(spec["expert_data"][e], mmap_mode="r")
    blocks, gates = train_independent(composed, 0, tokens, TrainConfig(**spec["blocks_train"]),
                                      TrainConfig(**spec["gates_train"]))
    state = {k.replace("blocks.0.", f"blocks.{e}.", 1).replace("gates.0.", f"gates.{e}.", 1): v
             for k, v in new_parameters(composed).items()}
    return {"state": state, "blocks_loss": blocks.train_loss, "gates_loss": gates.train_loss}


def train_joint_task(spec: dict) -> dict:
    from composition.training import train_joint
    from experts.trainer import TrainConfig

    composed = _composed(spec, spec["expert_dirs"])
    result = train_joint(composed, np.load(spec["train"], mmap_mode="r"), TrainConfig(**spec["joint_train"]),
                         spec["balance_weight"])
    return {"state": new_parameters(composed), "joint_loss": result.train_loss}


def evaluate_task(spec: dict, state: dict) -> dict:
    """Validation bits per byte of the composed model and of the central model alone."""
    from experts.trainer import bits_per_byte

    composed = _composed(spec, spec["expert_dirs"])
    loaded = composed.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    val = np.load(spec["val"], mmap_mode="r")
    seq = composed.config.block_size
    central = bits_per_byte(composed.central, val, seq, spec["eval_tokens"])
    bpb = bits_per_byte(composed, val, seq, spec["eval_tokens"])
    return {"val_bpb": bpb, "central_val_bpb": central, "experts_per_token": composed.last_experts_per_token}


# --- the stage --------------------------------------------------------------------------------


def run_compose(cfg: Config, pipeline_id: str, central_uri: str | None = None,
                expert_uris: list[str] | None = None) -> dict[str, str]:
    """Compose, train each configured mode, register each; return {mode: registry URI}."""
    tracker = Tracker(cfg)
    tracker.pipeline_run(pipeline_id)
    if central_uri is None or not expert_uris:
        default_central, default_experts = pipeline_models(tracker, pipeline_id)
        central_uri, expert_uris = central_uri or default_central, expert_uris or default_experts
    versions = {uri: resolve_version(tracker, uri) for uri in [central_uri, *expert_uris]}
    tokenizer = check_tokenizers(versions)
    with tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        dirs = {uri: model_dir(tracker, v, Path(tmp) / f"m{i}") for i, (uri, v) in enumerate(versions.items())}
        c = cfg.compose
        spec = {"central_dir": dirs[central_uri], "expert_dirs": [dirs[u] for u in expert_uris],
                "expert_data": [data_path(cfg, versions[u], "train") for u in expert_uris],
                # joint training and evaluation read the whole corpus the central model was trained on
                "train": data_path(cfg, versions[central_uri], "train", DENSE),
                "val": data_path(cfg, versions[central_uri], "val", DENSE),
                "n_points": c.n_points, "routing": c.routing, "k": c.k, "threshold": c.threshold,
                "pool": c.pool, "center_tokens": c.center_tokens,
                "blocks_train": {**c.blocks_train, "seed": cfg.seed},
                "gates_train": {**c.gates_train, "seed": cfg.seed},
                "joint_train": {**c.joint_train, "seed": cfg.seed}, "balance_weight": c.balance_weight,
                "num_cpus": c.num_cpus, "eval_tokens": c.eval_tokens, "seed": cfg.seed}
        connect_ray(cfg.ray)
        check_resources(c.num_cpus, what="composition task (compose.num_cpus)")
        import ray

        spec["centers"] = ray.get(ray.remote(centers_task).options(num_cpus=c.num_cpus).remote(spec))
        return {mode: _compose_mode(tracker, cfg, pipeline_id, mode, spec, central_uri, expert_uris, tokenizer)
                for mode in c.modes}


def _compose_mode(tracker: Tracker, cfg: Config, pipeline_id: str, mode: str, spec: dict, central_uri: str,
                  expert_uris: list[str], tokenizer: str) -> str:
    import ray

    opts = {"num_cpus": cfg.compose.num_cpus, "max_retries": 1}
    with tracker.stage_run(pipeline_id, "compose", name=f"compose-{mode}", tags={"moie.mode": mode}) as run_id:
        tracker.log_params(run_id, {"mode": mode, "central": central_uri, "experts": ",".join(expert_uris),
                                    "n_points": spec["n_points"], "routing": spec["routing"], "k": spec["k"],
                                    "pool": spec["pool"], "center_tokens": spec["center_tokens"]})
        if mode == "independent":
            # one task per expert; each could start as soon as its expert exists
            refs = [ray.remote(train_independent_task).options(**opts).remote(spec, e) for e in range(len(expert_uris))]
            results = ray.get(refs)
            state = {k: v for r in results for k, v in r["state"].items()}
            for e, r in enumerate(results):
                tracker.log_metrics(run_id, {f"expert{e}_blocks_loss": r["blocks_loss"],
                                             f"expert{e}_gates_loss": r["gates_loss"]})
        else:
            result = ray.get(ray.remote(train_joint_task).options(**opts).remote(spec))
            state = result["state"]
            tracker.log_metrics(run_id, {"joint_loss": result["joint_loss"]})
        scores = ray.get(ray.remote(evaluate_task).options(**opts).remote(spec, state))
        tracker.log_metrics(run_id, scores)
        gate_norms = {f"gate_norm_{k.replace('.', '_')}": float(v.norm()) for k, v in state.items()
                      if k.startswith("gates.")}
        tracker.log_metrics(run_id, gate_norms)
        with tempfile.TemporaryDirectory() as tmp:
            from experts.checkpoint import save_tensors_json

            manifest = {"central": central_uri, "experts": expert_uris, "mode": mode, "tokenizer": tokenizer,
                        "n_points": spec["n_points"], "routing": spec["routing"], "k": spec["k"],
                        "threshold": spec["threshold"], "pool": spec["pool"], **scores}
            save_tensors_json(Path(tmp), "composition", state, manifest)
            write_json(Path(tmp) / "composition_manifest.json", manifest)
            files = tracker.log_artifact_dir(run_id, tmp, "composition")
        run = tracker.client.get_run(run_id)
        version = register_model(tracker, COMPOSITION_MODEL, f"{run.info.artifact_uri}/composition", run_id,
                                 {"moie.pipeline": pipeline_id, "moie.mode": mode, "moie.tokenizer": tokenizer,
                                  "moie.central": central_uri, "moie.experts": json.dumps(expert_uris),
                                  "moie.sha256": files["composition.safetensors"]})
        uri = f"models:/{COMPOSITION_MODEL}/{version}"
        tracker.set_tags(run_id, {"moie.model_version": uri})
        print(f"compose {mode}: val_bpb {scores['val_bpb']:.4f} vs central {scores['central_val_bpb']:.4f}; "
              f"registered as {uri}", flush=True)
    return uri
