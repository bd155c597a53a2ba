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
from pipeline.library import (COMPOSITION_MODEL, MANIFEST_FORMAT, check_tokenizers, composition_parts, exact_uri,
                              model_dir, resolve_version, router_state)
from pipeline.ray_runtime import check_resources, connect_ray
from pipeline.stages import StageError
from pipeline.tracking import Tracker


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
        composed.load_state_dict({k: torch.as_tensor(v) for k, v in spec["centers"].items()}, strict=False)
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
    """Validation bits per byte of the composed model and of the central model alone, on whole
    validation documents (the central's validation stream cut at its separators), routed as
    the composition routes (`router`: cBTM's weights for each document's prefix)."""
    from composition.evaluation import bits_per_byte, score_documents
    from pipeline.tokenizer import ByteTokenizer

    composed = _composed(spec, spec["expert_dirs"])
    loaded = composed.load_state_dict(state, strict=False)
    if loaded.unexpected_keys:
        raise StageError(f"composition parameters do not fit its models: {loaded.unexpected_keys[:3]}")
    eos = ByteTokenizer().eos_id
    docs = validation_documents(np.load(spec["val"], mmap_mode="r"), eos, spec["eval_tokens"])
    seq = composed.config.block_size
    routes = router_weights(spec, docs) if spec["routing"] == "router" else None
    composed.record_routing = True
    scored = score_documents(composed, docs, eos, seq, batch_size=8, route_weights=routes)
    central = score_documents(composed.central, docs, eos, seq, batch_size=8)
    return {"val_bpb": bits_per_byte(scored.log_probs), "central_val_bpb": bits_per_byte(central.log_probs),
            "experts_per_token": scored.experts_per_row}


def validation_documents(tokens: np.ndarray, eos: int, max_tokens: int) -> list[np.ndarray]:
    """Whole documents of a token stream (documents end at `eos`), up to about max_tokens."""
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    docs, start, total = [], 0, 0
    for end in ends:
        if end > start:
            docs.append(np.asarray(tokens[start:end]))
            total += end - start
        start = end + 1
        if total >= max_tokens:
            break
    if not docs:
        raise StageError(f"no validation documents to score ({len(tokens)} validation tokens); "
                         "raise corpus.val_fraction")
    return docs


def router_weights(spec: dict, docs: list[np.ndarray]) -> list[np.ndarray]:
    """cBTM weights of the composition's experts for each document's prefixes, top-1."""
    from routing.ensemble import document_weights
    from routing.router import ClusterRouter

    router = ClusterRouter.from_state(spec["router"]["tensors"], spec["router"]["meta"])
    return [document_weights(router, bytes(np.asarray(d, dtype=np.uint8)), spec["clusters"], 1) for d in docs]


# --- the stage --------------------------------------------------------------------------------


def run_compose(cfg: Config, pipeline_id: str, central_uri: str | None = None,
                expert_uris: list[str] | None = None) -> dict[str, str]:
    """Compose, train each configured mode, register each; return {mode: registry URI}."""
    tracker = Tracker(cfg)
    tracker.pipeline_run(pipeline_id)
    if central_uri is None or not expert_uris:
        default_central, default_experts = pipeline_models(tracker, pipeline_id)
        central_uri, expert_uris = central_uri or default_central, expert_uris or default_experts
    central, experts = resolve_version(tracker, central_uri), [resolve_version(tracker, u) for u in expert_uris]
    with tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        spec = _spec(cfg, tracker, central, experts, Path(tmp))
        import ray

        spec["centers"] = ray.get(ray.remote(centers_task).options(num_cpus=cfg.compose.num_cpus).remote(spec))
        return {mode: _compose_mode(tracker, cfg, pipeline_id, mode, spec) for mode in cfg.compose.modes}


def run_add(cfg: Config, expert_uri: str, composition_uri: str, pipeline_id: str | None = None) -> str:
    """A new version of a composition with one more expert: only that expert's blocks and gates
    train (independent mode); every parameter of the composition is kept bit for bit."""
    tracker = Tracker(cfg)
    base = resolve_version(tracker, composition_uri)
    if base.name != COMPOSITION_MODEL:
        raise StageError(f"--to must name a {COMPOSITION_MODEL} version, got {composition_uri} ({base.name})")
    pipeline_id = pipeline_id or base.tags["moie.pipeline"]
    tracker.pipeline_run(pipeline_id)
    with tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        state, manifest = composition_parts(tracker, base, Path(tmp) / "base")
        if manifest["mode"] != "independent":
            raise StageError(f"{exact_uri(base)} is a {manifest['mode']} composition: its blocks and gates were "
                             "trained together, so an expert trained on its own would not fit; --add extends "
                             "independent compositions")
        new = resolve_version(tracker, expert_uri)
        if exact_uri(new) in manifest["experts"]:
            raise StageError(f"{exact_uri(new)} is already an expert of {exact_uri(base)}")
        central = resolve_version(tracker, manifest["central"])
        experts = [resolve_version(tracker, u) for u in manifest["experts"]] + [new]
        # the composition's own routing settings, not the config's: the old gates were trained with them
        compose = {"n_points": manifest["n_points"], "k": manifest["k"], "threshold": manifest["threshold"],
                   "routing": manifest["routing"], "pool": manifest.get("pool", "token")}
        spec = _spec(cfg, tracker, central, experts, Path(tmp), compose)
        spec["centers"] = {k: v for k, v in state.items() if k.startswith("centers.")}
        return _compose_mode(tracker, cfg, pipeline_id, "independent", spec, base_state=state,
                             train_only=[len(experts) - 1], added={"moie.added_to": exact_uri(base),
                                                                   "moie.added": exact_uri(new)})


def _spec(cfg: Config, tracker: Tracker, central, experts: list, tmp: Path, settings: dict | None = None) -> dict:
    """Everything a composition task needs: checked model directories, data, settings."""
    versions = {exact_uri(v): v for v in [central, *experts]}
    if len(versions) != len(experts) + 1:
        raise StageError("a composition names each model once; got " + ", ".join(exact_uri(v) for v in experts))
    tokenizer = check_tokenizers(versions)
    dirs = {uri: model_dir(tracker, v, tmp / f"m{i}") for i, (uri, v) in enumerate(versions.items())}
    c = cfg.compose
    settings = settings or {"n_points": c.n_points, "routing": c.routing, "k": c.k, "threshold": c.threshold,
                            "pool": c.pool}
    router = shared_router(tracker, experts, tmp)
    spec = {"central": exact_uri(central), "experts": [exact_uri(v) for v in experts], "tokenizer": tokenizer,
            "central_dir": dirs[exact_uri(central)], "expert_dirs": [dirs[exact_uri(v)] for v in experts],
            "expert_data": [data_path(cfg, v, "train") for v in experts],
            # joint training and evaluation read the whole corpus the central model was trained on
            "train": data_path(cfg, central, "train", DENSE), "val": data_path(cfg, central, "val", DENSE),
            **settings, "center_tokens": c.center_tokens,
            "blocks_train": {**c.blocks_train, "seed": cfg.seed}, "gates_train": {**c.gates_train, "seed": cfg.seed},
            "joint_train": {**c.joint_train, "seed": cfg.seed}, "balance_weight": c.balance_weight,
            "num_cpus": c.num_cpus, "eval_tokens": c.eval_tokens, "seed": cfg.seed, **router}
    connect_ray(cfg.ray)
    check_resources(c.num_cpus, what="composition task (compose.num_cpus)")
    return spec


def shared_router(tracker: Tracker, experts: list, tmp: Path) -> dict:
    """The cBTM router of the experts' clustering, when they all come from one:
    {"router": {tensors, meta}, "router_run", "clusters"}; {} otherwise."""
    runs = {v.tags.get("moie.cluster_run") for v in experts}
    if len(runs) != 1 or None in runs or any("moie.cluster" not in v.tags for v in experts):
        return {}
    (run_id,) = runs
    tensors, meta = router_state(tracker, run_id, tmp / "router")
    return {"router": {"tensors": tensors, "meta": meta}, "router_run": run_id,
            "clusters": [int(v.tags["moie.cluster"]) for v in experts]}


def mode_routing(spec: dict, mode: str) -> str:
    """Inference routing of a mode: joint routes as it trained (top-k in the loop); independent
    routes as configured, by the experts' cBTM router only when they share one."""
    if mode == "joint":
        return "topk"
    if spec["routing"] == "router" and "router" not in spec:
        print("compose: the experts come from different clusterings (no shared router): routing top-k by "
              "their gates instead", flush=True)
        return "topk"
    return spec["routing"]


def _compose_mode(tracker: Tracker, cfg: Config, pipeline_id: str, mode: str, spec: dict,
                  base_state: dict | None = None, train_only: list[int] | None = None,
                  added: dict | None = None) -> str:
    """Train one mode (independent: one Ray task per expert in `train_only`, default all), score it
    against the central model, save the new parameters with a manifest, register a version."""
    import ray

    opts = {"num_cpus": cfg.compose.num_cpus, "max_retries": 1}
    central_uri, expert_uris = spec["central"], spec["experts"]
    spec = {**spec, "routing": mode_routing(spec, mode)}
    with tracker.stage_run(pipeline_id, "compose", name=f"compose-{mode}", tags={"moie.mode": mode}) as run_id:
        tracker.log_params(run_id, {"mode": mode, "central": central_uri, "experts": ",".join(expert_uris),
                                    "n_points": spec["n_points"], "routing": spec["routing"], "k": spec["k"],
                                    "pool": spec["pool"], "center_tokens": spec["center_tokens"],
                                    **({"added": added["moie.added"]} if added else {})})
        state = dict(base_state or {})
        if mode == "independent":
            # one task per expert; each could start as soon as its expert exists
            todo = range(len(expert_uris)) if train_only is None else train_only
            refs = {e: ray.remote(train_independent_task).options(**opts).remote(spec, e) for e in todo}
            for e, r in zip(refs, ray.get(list(refs.values()))):
                state |= {k: v for k, v in r["state"].items() if k.startswith((f"blocks.{e}.", f"gates.{e}."))
                          or (k.startswith("centers.") and k not in state)}
                tracker.log_metrics(run_id, {f"expert{e}_blocks_loss": r["blocks_loss"],
                                             f"expert{e}_gates_loss": r["gates_loss"]})
        else:
            result = ray.get(ray.remote(train_joint_task).options(**opts).remote(spec))
            state = result["state"]
            tracker.log_metrics(run_id, {"joint_loss": result["joint_loss"]})
        scores = ray.get(ray.remote(evaluate_task).options(**opts).remote(spec, state))
        tracker.log_metrics(run_id, scores)
        tracker.log_metrics(run_id, {f"gate_norm_{k.replace('.', '_')}": float(v.norm()) for k, v in state.items()
                                     if k.startswith("gates.")})
        with tempfile.TemporaryDirectory() as tmp:
            from experts.checkpoint import save_tensors_json

            manifest = {"format": MANIFEST_FORMAT, "central": central_uri, "experts": expert_uris, "mode": mode,
                        "tokenizer": spec["tokenizer"], "n_points": spec["n_points"], "routing": spec["routing"],
                        "k": spec["k"], "threshold": spec["threshold"], "pool": spec["pool"], **scores,
                        **({"router_run": spec["router_run"], "clusters": spec["clusters"]} if "router" in spec else {}),
                        **({"added_to": added["moie.added_to"]} if added else {})}
            save_tensors_json(Path(tmp), "composition", state, manifest)
            write_json(Path(tmp) / "composition_manifest.json", manifest)
            files = tracker.log_artifact_dir(run_id, tmp, "composition")
        run = tracker.client.get_run(run_id)
        version = register_model(tracker, COMPOSITION_MODEL, f"{run.info.artifact_uri}/composition", run_id,
                                 {"moie.pipeline": pipeline_id, "moie.mode": mode, "moie.tokenizer": spec["tokenizer"],
                                  "moie.central": central_uri, "moie.experts": json.dumps(expert_uris),
                                  "moie.sha256": files["composition.safetensors"], **(added or {})})
        uri = f"models:/{COMPOSITION_MODEL}/{version}"
        tracker.set_tags(run_id, {"moie.model_version": uri})
        print(f"compose {mode}: val_bpb {scores['val_bpb']:.4f} vs central {scores['central_val_bpb']:.4f}; "
              f"registered as {uri}", flush=True)
    return uri
