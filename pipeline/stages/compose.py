"""The compose stage: registered central + experts -> trained blocks and gates -> moie-composition.

By default it composes the pipeline's central model with all its experts; any registered
versions (`models:/moie-expert/3`, from any pipeline) can be named instead, provided they
share one tokenizer. Each mode (independent, joint) is a child run and a registered
version; only the new parameters are saved, with a manifest naming the exact versions.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from artifacts import save_state, write_json
from composition.evaluation import bits_per_byte, score_documents
from composition.loader import CompositionSettings, load_composed, new_parameters
from composition.model import ComposedLM
from composition.training import fit_centers, train_independent, train_joint
from experts.trainer import TrainConfig
from pipeline.catalog import COMPOSITION_MODEL, DENSE, MANIFEST_FORMAT, Catalog, check_tokenizers, exact_uri
from pipeline.config import Config
from pipeline.errors import StageError
from pipeline.ray_runtime import check_resources, connect_ray, use_granted_cpus
from pipeline.tokenizer import ByteTokenizer
from routing.ensemble import document_weights
from routing.router import ClusterRouter


@dataclass
class CompositionTask:
    """Everything a composition task needs: checked model directories, data, settings."""

    central: str  # exact registry URIs
    experts: list[str]
    tokenizer: str
    central_dir: str  # downloaded, checksum-checked model directories
    expert_dirs: list[str]
    expert_data: list[str]  # each expert's own training tokens (independent mode)
    train: str  # the central model's training and validation tokens (joint mode, centres, scoring)
    val: str
    settings: CompositionSettings
    center_tokens: int
    blocks_train: dict  # TrainConfig fields of each training phase
    gates_train: dict
    joint_train: dict
    balance_weight: float
    num_cpus: float
    eval_tokens: int
    seed: int
    router: dict | None = None  # {"tensors", "meta"} of the experts' shared cBTM router, if they share one
    router_run: str | None = None
    clusters: list[int] | None = None  # each expert's cluster in that clustering
    centers: dict | None = None  # the routing centres every expert's training shares


# --- Ray task bodies -------------------------------------------------------------------------


def _composed(task: CompositionTask, expert_dirs: list[str]) -> ComposedLM:
    """The composition of the task's central model and these experts, with the shared centres."""
    use_granted_cpus(task.num_cpus, task.seed)
    return load_composed(task.central_dir, expert_dirs, task.settings, task.centers, complete=False)


def centers_task(task: CompositionTask) -> dict:
    """The central model's mean state at each composition point, on its own training data:
    computed once and shared by every expert's training, so independent gates agree on it."""
    composed = _composed(replace(task, centers=None), task.expert_dirs[:1])
    if task.center_tokens:
        fit_centers(composed, np.load(task.train, mmap_mode="r"), task.center_tokens)
    return {k: v for k, v in new_parameters(composed).items() if k.startswith("centers.")}


def train_independent_task(task: CompositionTask, e: int) -> dict:
    """Blocks then gates of expert e alone, on its own data; returns its new parameters."""
    composed = _composed(task, [task.expert_dirs[e]])
    tokens = np.load(task.expert_data[e], mmap_mode="r")
    blocks, gates = train_independent(composed, 0, tokens, TrainConfig(**task.blocks_train),
                                      TrainConfig(**task.gates_train))
    state = {k.replace("blocks.0.", f"blocks.{e}.", 1).replace("gates.0.", f"gates.{e}.", 1): v
             for k, v in new_parameters(composed).items()}
    return {"state": state, "blocks_loss": blocks.train_loss, "gates_loss": gates.train_loss}


def train_joint_task(task: CompositionTask) -> dict:
    composed = _composed(task, task.expert_dirs)
    result = train_joint(composed, np.load(task.train, mmap_mode="r"), TrainConfig(**task.joint_train),
                         task.balance_weight)
    return {"state": new_parameters(composed), "joint_loss": result.train_loss}


def evaluate_task(task: CompositionTask, state: dict) -> dict:
    """Validation bits per byte of the composed model and of the central model alone, on whole
    validation documents (the central's validation stream cut at its separators), routed as
    the composition routes (`router`: cBTM's weights for each document's prefix)."""
    use_granted_cpus(task.num_cpus, task.seed)
    composed = load_composed(task.central_dir, task.expert_dirs, task.settings, state)
    eos = ByteTokenizer().eos_id
    docs = validation_documents(np.load(task.val, mmap_mode="r"), eos, task.eval_tokens)
    seq = composed.config.block_size
    routes = router_weights(task, docs) if task.settings.routing == "router" else None
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


def router_weights(task: CompositionTask, docs: list[np.ndarray]) -> list[np.ndarray]:
    """cBTM weights of the composition's experts for each document's prefixes, top-1."""
    router = ClusterRouter.from_state(task.router["tensors"], task.router["meta"])
    return [document_weights(router, bytes(np.asarray(d, dtype=np.uint8)), task.clusters, 1) for d in docs]


# --- the stage --------------------------------------------------------------------------------


def run_compose(cfg: Config, pipeline_id: str, central_uri: str | None = None,
                expert_uris: list[str] | None = None) -> dict[str, str]:
    """Compose, train each configured mode, register each; return {mode: registry URI}."""
    catalog = Catalog(cfg)
    catalog.tracker.pipeline_run(pipeline_id)
    if central_uri is None or not expert_uris:
        default_central, default_experts = catalog.pipeline_models(pipeline_id)
        central_uri, expert_uris = central_uri or default_central, expert_uris or default_experts
    central, experts = catalog.resolve(central_uri), [catalog.resolve(u) for u in expert_uris]
    with catalog.tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        task = composition_task(cfg, catalog, central, experts, Path(tmp))
        centers = ray.get(ray.remote(centers_task).options(num_cpus=cfg.compose.num_cpus).remote(task))
        task = replace(task, centers=centers)
        return {mode: _compose_mode(catalog, cfg, pipeline_id, mode, task) for mode in cfg.compose.modes}


def run_add(cfg: Config, expert_uri: str, composition_uri: str, pipeline_id: str | None = None) -> str:
    """A new version of a composition with one more expert: only that expert's blocks and gates
    train (independent mode); every parameter of the composition is kept bit for bit."""
    catalog = Catalog(cfg)
    base = catalog.resolve(composition_uri)
    if base.name != COMPOSITION_MODEL:
        raise StageError(f"--to must name a {COMPOSITION_MODEL} version, got {composition_uri} ({base.name})")
    pipeline_id = pipeline_id or base.tags["moie.pipeline"]
    catalog.tracker.pipeline_run(pipeline_id)
    with catalog.tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        state, manifest = catalog.composition_parts(base, Path(tmp) / "base")
        if manifest["mode"] != "independent":
            raise StageError(f"{exact_uri(base)} is a {manifest['mode']} composition: its blocks and gates were "
                             "trained together, so an expert trained on its own would not fit; --add extends "
                             "independent compositions")
        new = catalog.resolve(expert_uri)
        if exact_uri(new) in manifest["experts"]:
            raise StageError(f"{exact_uri(new)} is already an expert of {exact_uri(base)}")
        central = catalog.resolve(manifest["central"])
        experts = [catalog.resolve(u) for u in manifest["experts"]] + [new]
        # the composition's own routing settings, not the config's: the old gates were trained with them
        task = composition_task(cfg, catalog, central, experts, Path(tmp), CompositionSettings.from_manifest(manifest))
        task = replace(task, centers={k: v for k, v in state.items() if k.startswith("centers.")})
        return _compose_mode(catalog, cfg, pipeline_id, "independent", task, base_state=state,
                             train_only=[len(experts) - 1], added={"moie.added_to": exact_uri(base),
                                                                   "moie.added": exact_uri(new)})


def composition_task(cfg: Config, catalog: Catalog, central, experts: list, tmp: Path,
                     settings: CompositionSettings | None = None) -> CompositionTask:
    """The task of composing these registered versions: their files downloaded and checked."""
    versions = {exact_uri(v): v for v in [central, *experts]}
    if len(versions) != len(experts) + 1:
        raise StageError("a composition names each model once; got " + ", ".join(exact_uri(v) for v in experts))
    tokenizer = check_tokenizers(versions)
    dirs = {uri: catalog.model_dir(v, tmp / f"m{i}") for i, (uri, v) in enumerate(versions.items())}
    c = cfg.compose
    settings = settings or CompositionSettings(n_points=c.n_points, routing=c.routing, k=c.k,
                                               threshold=c.threshold, pool=c.pool)
    task = CompositionTask(
        central=exact_uri(central), experts=[exact_uri(v) for v in experts], tokenizer=tokenizer,
        central_dir=dirs[exact_uri(central)], expert_dirs=[dirs[exact_uri(v)] for v in experts],
        expert_data=[catalog.data_path(v, "train") for v in experts],
        # joint training and evaluation read the whole corpus the central model was trained on
        train=catalog.data_path(central, "train", DENSE), val=catalog.data_path(central, "val", DENSE),
        settings=settings, center_tokens=c.center_tokens,
        blocks_train={**c.blocks_train, "seed": cfg.seed}, gates_train={**c.gates_train, "seed": cfg.seed},
        joint_train={**c.joint_train, "seed": cfg.seed}, balance_weight=c.balance_weight,
        num_cpus=c.num_cpus, eval_tokens=c.eval_tokens, seed=cfg.seed)
    task = shared_router(catalog, task, experts, tmp)
    connect_ray(cfg.ray)
    check_resources(c.num_cpus, what="composition task (compose.num_cpus)")
    return task


def shared_router(catalog: Catalog, task: CompositionTask, experts: list, tmp: Path) -> CompositionTask:
    """The task with the cBTM router of the experts' clustering, when they all come from one."""
    runs = {v.tags.get("moie.cluster_run") for v in experts}
    if len(runs) != 1 or None in runs or any("moie.cluster" not in v.tags for v in experts):
        return task
    (run_id,) = runs
    tensors, meta = catalog.router_state(run_id, tmp / "router")
    return replace(task, router={"tensors": tensors, "meta": meta}, router_run=run_id,
                   clusters=[int(v.tags["moie.cluster"]) for v in experts])


def mode_routing(task: CompositionTask, mode: str) -> str:
    """Inference routing of a mode: joint routes as it trained (top-k in the loop); independent
    routes as configured, by the experts' cBTM router only when they share one."""
    if mode == "joint":
        return "topk"
    if task.settings.routing == "router" and task.router is None:
        print("compose: the experts come from different clusterings (no shared router): routing top-k by "
              "their gates instead", flush=True)
        return "topk"
    return task.settings.routing


def _train_mode(catalog: Catalog, run_id: str, mode: str, task: CompositionTask, opts: dict,
                base_state: dict | None, train_only: list[int] | None) -> dict:
    """The new parameters of one mode (independent: one Ray task per expert in `train_only`, default all)."""
    state = dict(base_state or {})
    if mode == "independent":
        # one task per expert; each could start as soon as its expert exists
        todo = range(len(task.experts)) if train_only is None else train_only
        refs = {e: ray.remote(train_independent_task).options(**opts).remote(task, e) for e in todo}
        for e, r in zip(refs, ray.get(list(refs.values()))):
            state |= {k: v for k, v in r["state"].items() if k.startswith((f"blocks.{e}.", f"gates.{e}."))
                      or (k.startswith("centers.") and k not in state)}
            catalog.tracker.log_metrics(run_id, {f"expert{e}_blocks_loss": r["blocks_loss"],
                                                 f"expert{e}_gates_loss": r["gates_loss"]})
        return state
    result = ray.get(ray.remote(train_joint_task).options(**opts).remote(task))
    catalog.tracker.log_metrics(run_id, {"joint_loss": result["joint_loss"]})
    return result["state"]


def _compose_mode(catalog: Catalog, cfg: Config, pipeline_id: str, mode: str, task: CompositionTask,
                  base_state: dict | None = None, train_only: list[int] | None = None,
                  added: dict | None = None) -> str:
    """Train one mode, score it against the central model, save the new parameters with a
    manifest, register a version; its registry URI."""
    tracker = catalog.tracker
    opts = {"num_cpus": cfg.compose.num_cpus, "max_retries": 1}
    task = replace(task, settings=replace(task.settings, routing=mode_routing(task, mode)))
    s = task.settings
    with tracker.stage_run(pipeline_id, "compose", name=f"compose-{mode}", tags={"moie.mode": mode}) as run_id:
        tracker.log_params(run_id, {"mode": mode, "central": task.central, "experts": ",".join(task.experts),
                                    "n_points": s.n_points, "routing": s.routing, "k": s.k, "pool": s.pool,
                                    "center_tokens": task.center_tokens,
                                    **({"added": added["moie.added"]} if added else {})})
        state = _train_mode(catalog, run_id, mode, task, opts, base_state, train_only)
        scores = ray.get(ray.remote(evaluate_task).options(**opts).remote(task, state))
        tracker.log_metrics(run_id, scores)
        tracker.log_metrics(run_id, {f"gate_norm_{k.replace('.', '_')}": float(v.norm()) for k, v in state.items()
                                     if k.startswith("gates.")})
        with tempfile.TemporaryDirectory() as tmp:
            manifest = {"format": MANIFEST_FORMAT, "central": task.central, "experts": task.experts, "mode": mode,
                        "tokenizer": task.tokenizer, **s.to_dict(), **scores,
                        **({"router_run": task.router_run, "clusters": task.clusters} if task.router else {}),
                        **({"added_to": added["moie.added_to"]} if added else {})}
            save_state(Path(tmp), "composition", state, manifest)
            write_json(Path(tmp) / "composition_manifest.json", manifest)
            files = tracker.log_artifact_dir(run_id, tmp, "composition")
        run = tracker.client.get_run(run_id)
        uri = catalog.register(COMPOSITION_MODEL, f"{run.info.artifact_uri}/composition", run_id,
                               {"moie.pipeline": pipeline_id, "moie.mode": mode, "moie.tokenizer": task.tokenizer,
                                "moie.central": task.central, "moie.experts": json.dumps(task.experts),
                                "moie.sha256": files["composition.safetensors"], **(added or {})})
        tracker.set_tags(run_id, {"moie.model_version": uri})
        print(f"compose {mode}: val_bpb {scores['val_bpb']:.4f} vs central {scores['central_val_bpb']:.4f}; "
              f"registered as {uri}", flush=True)
    return uri
