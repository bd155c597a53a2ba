"""The compose stage: registered central + experts -> trained blocks and gates -> moie-composition.

By default it composes the pipeline's central model with all its experts; any registered
versions (`models:/moie-expert/3`, from any pipeline) can be named instead, provided they
share one tokenizer. Each mode (independent, joint) is a child run and a registered
version; only the new parameters are saved, with a manifest naming the exact versions.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import ray

from artifacts import save_state, write_json
from composition.evaluation import Scoring, bits_per_byte, stream_documents
from composition.loader import CompositionSettings, new_parameters
from composition.model import ComposedLM
from composition.training import (fit_centers, kway_flops_per_token, mix_flops_per_token, phase_tokens,
                                  train_flops_per_token, train_independent, train_joint, train_kway, windows_per_set)
from experts.flops import forward_flops_per_token
from experts.trainer import TrainConfig
from pipeline.config import KWAY_TRAIN, Config
from pipeline.errors import StageError, one_line
from pipeline.ray_runtime import (Grant, TaskFailedError, check_resources, connect_cluster, get_or_fail, granted_device,
                                  task_gpus, use_granted_cpus)
from pipeline.stages.matched import abandon_continued, finish_continued, start_continued
from pipeline.store.catalog import (COMPOSITION_MANIFEST, MANIFEST_FORMAT, PARTS_SHA, ROUTER_SHA, Catalog,
                                    assemble_registered, check_tokenizers, exact_uri)
from pipeline.store.leftovers import scratch_dir
from pipeline.store.names import (COMPOSITION_MODEL, DENSE, DENSE_MATCHED, ROLE_DENSE_CENTRAL, SEED, Tag, expert_name,
                                  pin_tags)
from pipeline.store.tokens import load_tokens
from routing.ensemble import document_weights
from routing.router import ClusterRouter


class Scheduler(Protocol):
    """What the compose stage asks of work started before it (`moie run`'s EarlyIndependent, in
    pipeline.stages.sequence): results computed for exactly the task it would start, else None."""

    def centres(self, task: "CompositionTask") -> dict | None: ...

    def training(self, task: "CompositionTask", e: int): ...


@dataclass
class CompositionTask:
    """Everything a composition task needs: checked model directories, data, settings."""

    central: str  # exact registry URIs (each task fetches and checks its models from the registry)
    experts: list[str]
    tokenizer: str
    tracking_uri: str  # the registry
    expert_data: list[str]  # each expert's own training tokens (independent mode): locations in the storage
    expert_val: list[str]  # each expert's own validation tokens: scoring takes an equal share of each
    train: str  # the central model's training and validation tokens (joint mode, centres, scoring)
    val: str
    settings: CompositionSettings
    center_tokens: int
    blocks_train: dict  # TrainConfig fields of each training phase
    gates_train: dict
    joint_train: dict
    mix_train: dict
    kway_train: dict
    balance_weight: float
    num_cpus: float
    eval_tokens: int
    seed: int
    scoring: Scoring  # how validation documents are scored (evaluate's settings)
    parts_sha256: dict[str, str]  # {exact URI: sha256 of its weights}: what the manifest pins
    router: dict | None = None  # {"tensors", "meta"} of the experts' shared cBTM router, if they share one
    router_run: str | None = None
    clusters: list[int] | None = None  # each expert's cluster in that clustering
    centers: dict | None = None  # the routing centres every expert's training shares
    flops: dict | None = None  # forward / training FLOPs per token of the models and of each phase (prepare_task)
    hub: str | None = None  # "seed": the central model is the pipeline's seed, not its full dense run
    missing_experts: dict[str, str] = field(default_factory=dict)  # clusters composed without: {name: why}
    num_gpus: float = 0.0  # of each of its Ray tasks (task_gpus)
    pins: dict[str, str] = field(default_factory=dict)  # token file -> sha256 of its block index (the registry's)

    def options(self, max_retries: int = 1) -> dict:
        """The Ray options of each of its tasks."""
        return Grant(self.num_cpus, self.num_gpus).options(max_retries=max_retries)


# --- Ray task bodies -------------------------------------------------------------------------


def _composed(task: CompositionTask, experts: list[int], scratch: Path, state: dict | None = None,
              complete: bool = False, record_routing: bool = False) -> ComposedLM:
    """The composition of the task's central model and these of its experts (fetched from the
    registry into this node's scratch, checked), with `state` or else the shared centres."""
    use_granted_cpus(task.num_cpus, task.seed)
    composed = assemble_registered(task.tracking_uri, task.central, [task.experts[e] for e in experts], task.settings,
                                   task.centers if state is None else state, scratch, parts_sha256=task.parts_sha256,
                                   complete=complete, record_routing=record_routing)
    return composed.to(granted_device(task.num_gpus))


def prepare_task(task: CompositionTask, fitted: dict | None = None) -> dict:
    """What every mode's training shares, computed once: the routing centres (the central
    model's mean state at each composition point, averaged over the experts' clusters, so
    independent gates agree on it; `fitted`: fitted already by `centres_task`) and the training
    FLOPs per token of each phase."""
    with scratch_dir("task") as scratch:
        n = len(task.experts)
        composed = _composed(replace(task, centers=None), list(range(n)), Path(scratch))
        fitted = fitted or _fit_centres(composed, task, Path(scratch))
    flops = {"seq": composed.config.block_size, "center_tokens": fitted["center_tokens"],
             "central": forward_flops_per_token(composed.central),
             "experts": [forward_flops_per_token(expert) for expert in composed.experts],
             "independent": [train_flops_per_token(composed, [e], "gate") for e in range(n)],
             "mix": [mix_flops_per_token(composed, [e], "gate") if len(composed.mixers) else 0.0 for e in range(n)],
             "kway": kway_flops_per_token(composed) if len(composed.kway) else 0.0,
             "joint": train_flops_per_token(composed, list(range(n)), "topk")}
    return {"centers": fitted["centers"], "flops": flops}


def centres_task(task: CompositionTask) -> dict:
    """The routing centres alone, from the central model and every expert's data (the task's
    first expert only completes the model: centres are states of the central model). `moie run`
    fits them as soon as the central model and one expert are registered."""
    with scratch_dir("task") as scratch:
        return _fit_centres(_composed(replace(task, centers=None), [0], Path(scratch)), task, Path(scratch))


def _fit_centres(composed: ComposedLM, task: CompositionTask, scratch: Path) -> dict:
    """{"centers": the centres' parameters, "center_tokens": tokens the central model read for them}."""
    center_tokens = 0
    if task.center_tokens:
        token_sets = [load_tokens(path, scratch, task.pins) for path in task.expert_data]
        center_tokens = fit_centers(composed, token_sets, task.center_tokens, seed=task.seed)
    return {"centers": {k: v for k, v in new_parameters(composed).items() if k.startswith("centers.")},
            "center_tokens": center_tokens}


def train_independent_task(task: CompositionTask, e: int, fitted: dict | None = None, slot: int | None = None,
                           after: dict | None = None) -> dict:
    """Blocks then gates of expert e alone, on its own data; returns its new parameters, named
    for position `slot` of the composition (default e). fitted: the shared routing centres as
    `centres_task` returns them (`moie run` starts this task early), else the task's own.
    after: the result of the task this one waits for (Ray starts it only once that one is
    done); unused."""
    task = task if fitted is None else replace(task, centers=fitted["centers"])
    slot = e if slot is None else slot
    with scratch_dir("task") as scratch:  # (the k-way gate needs every expert)
        composed = _composed(replace(task, settings=replace(task.settings, kway=False)), [e], Path(scratch))
        tokens = load_tokens(task.expert_data[e], Path(scratch), task.pins)
        blocks, gates, *mix = train_independent(composed, 0, tokens,
                                                TrainConfig(**task.blocks_train), TrainConfig(**task.gates_train),
                                                TrainConfig(**task.mix_train))
    state = {_slot(k, slot): v for k, v in new_parameters(composed).items()}
    return {"state": state, "blocks_loss": blocks.train_loss, "gates_loss": gates.train_loss,
            **({"mix_loss": mix[0].train_loss} if mix else {}),
            "tokens": blocks.tokens + gates.tokens, "mix_tokens": mix[0].tokens if mix else 0}


def _slot(key: str, slot: int) -> str:
    """A new parameter of a one-expert composition's expert 0, renamed for position `slot`."""
    for part in ("blocks", "gates", "mixers"):
        if key.startswith(f"{part}.0."):
            return key.replace(f"{part}.0.", f"{part}.{slot}.", 1)
    return key


def train_kway_task(task: CompositionTask, state: dict) -> dict:
    """The k-way gate over all the task's experts, on an equal share of every expert's training
    text; its parameters, loss and tokens. Only the central model runs (state: its centres)."""
    with scratch_dir("task") as scratch:
        composed = _composed(task, list(range(len(task.experts))), Path(scratch), state=state)
        token_sets = [load_tokens(path, Path(scratch), task.pins) for path in task.expert_data]
        out = train_kway(composed, token_sets,
                         task.kway_train["max_tokens"], task.kway_train["batch_size"], task.kway_train["lr"],
                         seed=task.seed)
    return {"state": {k: v for k, v in new_parameters(composed).items() if k.startswith("kway.")}, **out}


def train_joint_task(task: CompositionTask) -> dict:
    with scratch_dir("task") as scratch:
        composed = _composed(task, list(range(len(task.experts))), Path(scratch))
        result = train_joint(composed, load_tokens(task.train, Path(scratch), task.pins),
                             TrainConfig(**task.joint_train), task.balance_weight)
    return {"state": new_parameters(composed), "joint_loss": result.train_loss, "tokens": result.tokens}


def evaluate_task(task: CompositionTask, state: dict) -> dict:
    """Validation bits per byte of the composed model and of the central model alone, on whole
    validation documents, an equal share (eval_tokens / experts) from each expert's own cluster
    (a prefix of the corpus-ordered stream would be one domain), routed as the composition
    routes (`router`: cBTM's weights for each document's prefix). Also each cluster's figures
    (`val_bpb/<expert>`) and their macro average (each cluster weighing the same); with an output
    point, the same without it (`no_mix_val_bpb...`): what validation says the mixing adds; for
    a router-routed composition, its gates routing alone (`topk_...`, `kway_...` with a k-way
    gate) and the share of bytes they route to their own cluster's expert
    (`val_routing_accuracy/<routing>`), which validation compares to choose the gate."""
    with scratch_dir("task") as scratch:
        composed = _composed(task, list(range(len(task.experts))), Path(scratch), state=state, complete=True,
                             record_routing=True)
        share = max(1, task.eval_tokens // len(task.experts))
        groups = [validation_documents(load_tokens(path, Path(scratch), task.pins), task.scoring.eos_id, share,
                                       required=False) for path in task.expert_val]  # read only as far as needed
    if not any(groups):
        raise StageError("no validation documents to score in any expert's cluster; raise corpus.val_fraction")
    n = len(task.experts)
    # an independent composition's gates, routing alone (top-k affinity; the k-way gate if it has one)
    gate_only = ([] if task.settings.routing != "router" else ["topk", "kway"] if task.settings.kway else ["topk"])
    hits = {r: [0, 0] for r in gate_only}  # bytes routed to their own cluster's expert, bytes
    figures, lp, rows = {}, {"": [], "central_": [], "no_mix_": [], **{f"{r}_": [] for r in gate_only}}, []
    for j, docs in enumerate(groups):
        if not docs:
            continue
        routes = router_weights(task, docs) if task.settings.routing == "router" else None
        scored = {"": task.scoring.score(composed, docs, route_weights=routes),
                  "central_": task.scoring.score(composed.central, docs)}
        if composed.output == "mix":  # the same composition without its output point: what the mixing adds
            with composed.configured(output="none"):
                scored["no_mix_"] = task.scoring.score(composed, docs, route_weights=routes)
        for routing in gate_only:  # the gates routing on their own: which expert each byte went to
            with composed.configured(routing=routing):
                scored[f"{routing}_"] = task.scoring.score(composed, docs, n_experts=n)
            hits[routing][0] += sum(int((c == j).sum()) for c in scored[f"{routing}_"].choices)
            hits[routing][1] += sum(len(c) for c in scored[f"{routing}_"].choices)
        for prefix, result in scored.items():
            figures[f"{prefix}val_bpb/{expert_label(task, j)}"] = bits_per_byte(result.log_probs)
            lp[prefix] += result.log_probs
        if scored[""].experts_per_row is not None:
            rows.append(scored[""].experts_per_row)
    scored_names = [k.removeprefix("val_bpb/") for k in figures if k.startswith("val_bpb/")]
    totals = {f"{prefix}val_bpb": bits_per_byte(lps) for prefix, lps in lp.items() if lps}
    macros = {f"{prefix}val_bpb_macro": float(np.mean([figures[f"{prefix}val_bpb/{n}"] for n in scored_names]))
              for prefix, lps in lp.items() if lps}
    accuracy = {f"val_routing_accuracy/{r}": h / max(total, 1) for r, (h, total) in hits.items()}
    return {**totals, **macros, **accuracy, **({"experts_per_token": float(np.mean(rows))} if rows else {}),
            **figures}


def expert_label(task: CompositionTask, j: int) -> str:
    """expert-<cluster> of the experts' shared clustering, else the j-th expert's position."""
    return expert_name(task.clusters[j]) if task.clusters else f"expert{j}"


def validation_documents(tokens: np.ndarray, eos: int, max_tokens: int, required: bool = True) -> list[np.ndarray]:
    """Whole documents of a token stream (documents end at `eos`), up to about max_tokens."""
    docs = stream_documents(tokens, eos, max_tokens)
    if not docs and required:
        raise StageError(f"no validation documents to score ({len(tokens)} validation tokens); "
                         "raise corpus.val_fraction")
    return docs


def router_weights(task: CompositionTask, docs: list[np.ndarray]) -> list[np.ndarray]:
    """cBTM weights of the composition's experts for each document's prefixes, top-1."""
    router = ClusterRouter.from_state(task.router["tensors"], task.router["meta"])
    return [document_weights(router, bytes(np.asarray(d, dtype=np.uint8)), task.clusters, 1) for d in docs]


# --- the stage --------------------------------------------------------------------------------


def run_compose(cfg: Config, pipeline_id: str, central_uri: str | None = None,
                expert_uris: list[str] | None = None, early: "Scheduler | None" = None) -> dict[str, str]:
    """Compose, train each configured mode, register each; return {mode: registry URI}. For the
    pipeline's own models, the dense model also trains on for the compute the composed systems
    spend beyond it (`dense_matched`), alongside the compositions. early: the independent
    composition's work that `moie run` started while the experts trained (taken where it fits)."""
    catalog = Catalog(cfg)
    connect_cluster(cfg, catalog.tracker)  # before any work: a multi-node cluster needs shared stores
    catalog.tracker.pipeline_run(pipeline_id)
    if central_uri == SEED:  # the shared seed the experts branched from, as the hub
        seed = catalog.seed_model(pipeline_id)
        if seed is None:
            raise StageError(f"pipeline {pipeline_id} has no registered seed: its experts did not branch from one "
                             "(experts.seed_fraction: 0) or were trained before moie registered seeds; give "
                             "--central a registered moie-central version instead")
        central_uri = exact_uri(seed)
    own = central_uri is None and not expert_uris
    pipelines_experts = not expert_uris  # all of its clustering's, or a gap on purpose
    if central_uri is None or not expert_uris:
        default_central, default_experts = catalog.pipeline_models(pipeline_id)
        central_uri, expert_uris = central_uri or default_central, expert_uris or default_experts
    central, experts = catalog.resolve(central_uri), [catalog.resolve(u) for u in expert_uris]
    missing = {}
    if pipelines_experts:
        missing = check_missing(cfg, catalog.missing_experts(pipeline_id, experts), pipeline_id)
    with catalog.tracker.pipeline_active(pipeline_id), tempfile.TemporaryDirectory() as tmp:
        task = replace(composition_task(cfg, catalog, central, experts, Path(tmp)), missing_experts=missing)
        if central.tags.get(Tag.ROLE) == SEED and central.tags.get(Tag.PIPELINE) == pipeline_id:
            task = replace(task, hub=SEED)  # on this pipeline's own seed: a system of its own, costed as such
        fitted = _early_result(lambda: early.centres(task), "routing centres") if early is not None else None
        prepared = get_or_fail(ray.remote(prepare_task).options(**task.options(max_retries=3)).remote(task, fitted),
                               "composition's preparation task")
        task = replace(task, centers=prepared["centers"], flops=prepared["flops"])
        matched = _start_matched(catalog, cfg, pipeline_id, task, central, experts) if own else None
        try:
            uris = {mode: _compose_mode(catalog, cfg, pipeline_id, mode, task, early=early)
                    for mode in cfg.compose.modes}
            if matched is not None:
                finish_continued(catalog, pipeline_id, *matched)
        except BaseException as err:
            if matched is not None:  # never leave its run RUNNING or its task training on
                abandon_continued(catalog, matched[0], matched[1], killed=isinstance(err, (KeyboardInterrupt,
                                                                                          SystemExit)))
            raise
        return uris


# --- the matched-compute dense baseline: its budget (the training is pipeline/stages/matched.py) ----


def compose_flops(task: CompositionTask, mode: str, tokens: list[int] | int, mix_tokens: list[int] | None = None,
                  kway_tokens: int = 0) -> float:
    """Training FLOPs the compose stage spends on one mode: the routing centres' forward passes
    plus the mode's training (tokens: per expert for independent, in all for joint; mix_tokens:
    per expert, of the output gates' phase; kway_tokens: of the k-way gate's)."""
    f = task.flops
    centres = f["center_tokens"] * f["central"]  # forward passes only
    if mode == "independent":
        return centres + sum(n * f["independent"][e] for e, n in enumerate(tokens)) + sum(
            n * f["mix"][e] for e, n in enumerate(mix_tokens or [])) + kway_tokens * f.get("kway", 0.0)
    return centres + tokens * f["joint"]


def matched_budget(catalog: Catalog, task: CompositionTask, experts: list, modes: set[str]) -> float:
    """Training FLOPs a composed system spends beyond the dense model it is built on: the
    experts' own training after the shared seed (the seed is the dense model's first steps)
    plus the compose stage's, for the costliest of `modes`."""
    f, seq = task.flops, task.flops["seq"]
    own = sum(3 * f["experts"][e] * catalog.tracker.client.get_run(v.run_id).data.metrics.get("tokens", 0.0)
              for e, v in enumerate(experts))
    glue = phase_tokens(task.blocks_train, seq) + phase_tokens(task.gates_train, seq)
    mix = phase_tokens(task.mix_train, seq) if task.settings.output == "mix" else 0
    kway = kway_tokens(task, seq) if task.settings.kway else 0
    spend = {"independent": compose_flops(task, "independent", [glue] * len(experts), [mix] * len(experts), kway),
             "joint": compose_flops(task, "joint", phase_tokens(task.joint_train, seq))}
    return own + max(spend[m] for m in modes)


def kway_tokens(task: CompositionTask, seq: int) -> int:
    """Tokens the k-way gate trains on: whole windows, an equal share from each expert's text."""
    return windows_per_set(task.kway_train["max_tokens"], len(task.experts), seq) * seq * len(task.experts)


def _start_matched(catalog: Catalog, cfg: Config, pipeline_id: str, task: CompositionTask, central,
                   experts: list):
    """Launch the dense model's continuation for the composed systems' extra compute, unless it
    is not wanted, not comparable (a configured central model is not the dense one) or done for
    at least that compute (a costlier composition config trains a new one)."""
    if not cfg.compose.dense_matched:
        return None
    if central.tags.get(Tag.ROLE) != ROLE_DENSE_CENTRAL:
        print("compose: no dense_matched baseline (the central model is not the pipeline's dense model)", flush=True)
        return None
    modes = set(cfg.compose.modes) | (set(catalog.pipeline_compositions(pipeline_id)) & {"independent", "joint"})
    extra = matched_budget(catalog, task, experts, modes)
    done = catalog.matched_model(pipeline_id)
    if done is not None:
        had = catalog.tracker.client.get_run(done.run_id).data.metrics.get("matched_pflops", 0.0) * 1e15
        if had >= extra * (1 - 1e-9):
            print(f"{DENSE_MATCHED}: already trained and registered as {exact_uri(done)}", flush=True)
            return None
        print(f"{DENSE_MATCHED}: {exact_uri(done)} was trained for {had / 1e15:.4f} PFLOPs, less than the "
              f"compositions now spend ({extra / 1e15:.4f}): a new one trains for that", flush=True)
    ref, continued = start_continued(catalog, cfg, pipeline_id, task.central, central, extra, modes,
                                     seq=task.flops["seq"], flops_per_token=task.flops["central"], train=task.train,
                                     val=task.val, tokenizer=task.tokenizer)
    return ref, continued, central


def run_add(cfg: Config, expert_uri: str, composition_uri: str, pipeline_id: str | None = None) -> str:
    """A new version of a composition with one more expert: only that expert's blocks and gates
    train (independent mode); every parameter of the composition is kept bit for bit."""
    catalog = Catalog(cfg)
    base = catalog.resolve(composition_uri)
    if base.name != COMPOSITION_MODEL:
        raise StageError(f"--to must name a {COMPOSITION_MODEL} version, got {composition_uri} ({base.name})")
    pipeline_id = pipeline_id or base.tags[Tag.PIPELINE]
    catalog.tracker.pipeline_run(pipeline_id)
    with catalog.tracker.pipeline_active(pipeline_id):
        return add_expert(catalog, cfg, pipeline_id, base, catalog.resolve(expert_uri))


@dataclass
class AddedCluster:
    """The cBTM router of a clustering grown by one cluster (`moie extend`), and where it is logged."""

    tensors: dict
    meta: dict
    run_id: str  # the run whose artifacts hold it (router.safetensors + router.json, sha256 tags)


def check_extensible(manifest: dict, base_uri: str) -> None:
    """An expert can be added only to an independent composition: a joint one's blocks and gates
    were trained together, so an expert trained on its own would not fit."""
    if manifest["mode"] != "independent":
        raise StageError(f"{base_uri} is a {manifest['mode']} composition: its blocks and gates were trained "
                         "together, so an expert trained on its own would not fit; only independent compositions "
                         "take an added expert")


def add_expert(catalog: Catalog, cfg: Config, pipeline_id: str, base, new, cluster: AddedCluster | None = None,
               tags: dict | None = None, kway: bool = False) -> str:
    """Register a new version of composition `base` with expert `new` added: only its blocks,
    gates and output gate train, on its own data; every other parameter is kept bit for bit. The
    base's k-way gate tells its own experts apart, not the added one: it is dropped, or with
    `kway` (and a base that has one) trained anew over every expert's text, the new one's
    included (logged as `kway_pflops`). cluster: the base's router grown by the new expert's
    cluster (router routing then reaches the new expert; without it an expert from another
    clustering makes the composition route top-k). The composition run logs `train_pflops`: the
    compute of the added expert's phases."""
    with tempfile.TemporaryDirectory() as tmp:
        state, manifest = catalog.composition_parts(base, Path(tmp) / "base")
        check_extensible(manifest, exact_uri(base))
        if exact_uri(new) in manifest["experts"]:
            raise StageError(f"{exact_uri(new)} is already an expert of {exact_uri(base)}")
        central = catalog.resolve(manifest["central"])
        experts = [catalog.resolve(u) for u in manifest["experts"]] + [new]
        # the composition's own routing settings, not the config's: the old gates were trained with them
        settings = CompositionSettings.from_manifest(manifest)
        settings = replace(settings, kway=kway and settings.kway)
        state = {k: v for k, v in state.items() if not k.startswith("kway.")}  # (retrained when kept)
        task = composition_task(cfg, catalog, central, experts, Path(tmp), settings)
        if cluster is not None:
            task = replace(task, router={"tensors": cluster.tensors, "meta": cluster.meta}, router_run=cluster.run_id,
                                      clusters=manifest["clusters"] + [cluster.meta["k"] - 1])
        fitted = {"centers": {k: v for k, v in state.items() if k.startswith("centers.")}, "center_tokens": 0}
        prepared = get_or_fail(ray.remote(prepare_task).options(**task.options(max_retries=3)).remote(task, fitted),
                               "composition's preparation task")
        task = replace(task, centers=fitted["centers"], flops=prepared["flops"])  # the base's centres, not refitted
        return _compose_mode(catalog, cfg, pipeline_id, "independent", task, base_state=state,
                             train_only=[len(experts) - 1], added={Tag.ADDED_TO: exact_uri(base),
                                                                   Tag.ADDED: exact_uri(new), **(tags or {})})


def composition_task(cfg: Config, catalog: Catalog, central, experts: list, tmp: Path,
                     settings: CompositionSettings | None = None) -> CompositionTask:
    """The task of composing these registered versions: their files downloaded and checked."""
    versions = {exact_uri(v): v for v in [central, *experts]}
    if len(versions) != len(experts) + 1:
        raise StageError("a composition names each model once; got " + ", ".join(exact_uri(v) for v in experts))
    tokenizer = check_tokenizers(versions)
    c = cfg.compose
    settings = settings or CompositionSettings(n_points=c.n_points, routing=c.routing, k=c.k,
                                               threshold=c.threshold, pool=c.pool, glue=c.glue,
                                               output=c.output, kway=c.kway)
    task = CompositionTask(
        central=exact_uri(central), experts=[exact_uri(v) for v in experts], tokenizer=tokenizer,
        tracking_uri=catalog.tracker.uri, expert_data=[catalog.data_path(v, "train") for v in experts],
        expert_val=[catalog.data_path(v, "val") for v in experts],
        # joint training and evaluation read the whole corpus the central model was trained on
        train=catalog.data_path(central, "train", DENSE), val=catalog.data_path(central, "val", DENSE),
        settings=settings, center_tokens=c.center_tokens,
        blocks_train={**c.blocks_train, "seed": cfg.seed}, gates_train={**c.gates_train, "seed": cfg.seed},
        joint_train={**c.joint_train, "seed": cfg.seed}, mix_train={**c.mix_train, "seed": cfg.seed},
        kway_train={**KWAY_TRAIN, **c.kway_train},
        balance_weight=c.balance_weight,
        num_cpus=c.num_cpus, eval_tokens=c.eval_tokens, seed=cfg.seed, scoring=cfg.evaluate.scoring(),
        parts_sha256={uri: v.tags[Tag.SHA] for uri, v in versions.items()})
    task.pins = {path: catalog.pins[path] for path in {*task.expert_data, *task.expert_val, task.train, task.val}
                 if path in catalog.pins}
    task = shared_router(catalog, task, experts, tmp)
    connect_cluster(cfg, catalog.tracker)
    task = replace(task, num_gpus=task_gpus(cfg, "compose"))
    check_resources(c.num_cpus, task.num_gpus, what="composition task (compose.num_cpus / compose.num_gpus)")
    return task


def shared_router(catalog: Catalog, task: CompositionTask, experts: list, tmp: Path) -> CompositionTask:
    """The task with the cBTM router of the experts' clustering, when they all come from one."""
    runs = {v.tags.get(Tag.CLUSTER_RUN) for v in experts}
    if len(runs) != 1 or None in runs or any(Tag.CLUSTER not in v.tags for v in experts):
        return task
    (run_id,) = runs
    tensors, meta = catalog.router_state(run_id, tmp / "router")
    return replace(task, router={"tensors": tensors, "meta": meta}, router_run=run_id,
                   clusters=[int(v.tags[Tag.CLUSTER]) for v in experts])


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
                base_state: dict | None, train_only: list[int] | None,
                early: "Scheduler | None" = None) -> tuple[dict, list[int] | int, dict]:
    """The new parameters of one mode (independent: one Ray task per expert in `train_only`,
    default all, or the one `early` started while the experts trained; then the k-way gate over
    all of them), the tokens its blocks and gates trained on (independent: per expert) and those
    of its other phases ({"mix_tokens": per expert, "kway_tokens"}: compose_flops' arguments)."""
    state = dict(base_state or {})
    if mode == "independent":
        todo = range(len(task.experts)) if train_only is None else train_only
        def fresh(e: int):
            return ray.remote(train_independent_task).options(**opts).remote(task, e)

        taken = {e: early.training(task, e) if early is not None else None for e in todo}
        refs = {e: ref or fresh(e) for e, ref in taken.items()}  # what was not started early starts now
        for e, ref in taken.items():  # a result started early that failed is trained again here
            if ref is not None and _early_result(lambda: get_or_fail(ref, "early task"), task.experts[e]) is None:
                refs[e] = fresh(e)
        tokens, mix_tokens = [0] * len(task.experts), [0] * len(task.experts)
        for e, r in zip(refs, get_or_fail(list(refs.values()), "independent composition's training task")):
            state |= {k: v for k, v in r["state"].items()
                      if k.startswith((f"blocks.{e}.", f"gates.{e}.", f"mixers.{e}."))
                      or (k.startswith("centers.") and k not in state)}
            tokens[e], mix_tokens[e] = r["tokens"], r.get("mix_tokens", 0)
            catalog.tracker.log_metrics(run_id, {f"expert{e}_{phase}_loss": r[f"{phase}_loss"]
                                                 for phase in ("blocks", "gates", "mix") if f"{phase}_loss" in r})
        kway = 0
        if task.settings.kway:  # needs every expert: after all of them, one task
            r = get_or_fail(ray.remote(train_kway_task).options(**opts).remote(task, state), "k-way gate's training task")
            state |= r["state"]
            kway = r["tokens"]
            catalog.tracker.log_metrics(run_id, {"kway_loss": r["loss"]})
        return state, tokens, {"mix_tokens": mix_tokens, "kway_tokens": kway}
    result = get_or_fail(ray.remote(train_joint_task).options(**opts).remote(task), "joint composition's training task")
    catalog.tracker.log_metrics(run_id, {"joint_loss": result["joint_loss"]})
    return result["state"], result["tokens"], {}


def check_missing(cfg: Config, missing: dict[str, str], pipeline_id: str) -> dict[str, str]:
    """A composition is whole or refused: the clusters without an expert are one error, unless
    compose.allow_missing_experts composes without them on purpose (recorded with it)."""
    if not missing:
        return {}
    gap = "; ".join(f"{name}: {why}" for name, why in missing.items())
    if not cfg.compose.allow_missing_experts:
        raise StageError(f"pipeline {pipeline_id} has no expert for {len(missing)} of its clusters ({gap}): a "
                         "composition without them is another system than the pipeline's. Train them with `moie "
                         f"experts --pipeline {pipeline_id}`, or compose without them on purpose with "
                         "--allow-missing-experts (compose.allow_missing_experts: true), which records the gap in "
                         "the composition's manifest and run")
    print(f"compose: composing without {', '.join(missing)} on purpose ({gap}); recorded as "
          f"{Tag.MISSING_EXPERTS}", flush=True)
    return missing


def _early_result(get, what: str):
    """What work started early returns, or None (the stage then does it itself) where it failed:
    one failed early task must not fail the composition."""
    try:
        return get()
    except TaskFailedError as err:
        print(f"compose independent: {what}'s work started early failed ({one_line(err)}); training it "
              "again here", flush=True)
        return None


def _compose_mode(catalog: Catalog, cfg: Config, pipeline_id: str, mode: str, task: CompositionTask,
                  base_state: dict | None = None, train_only: list[int] | None = None,
                  added: dict | None = None, early: "Scheduler | None" = None) -> str:
    """Train one mode, score it against the central model, save the new parameters with a
    manifest, register a version; its registry URI."""
    from pipeline.serve.serving import log_pyfunc

    tracker = catalog.tracker
    opts = task.options()
    joint = mode == "joint"  # no output point and no k-way gate: its own top-k routing trained in the loop
    task = replace(task, settings=replace(task.settings, routing=mode_routing(task, mode),
                                          output="none" if joint else task.settings.output,
                                          kway=task.settings.kway and not joint))
    s = task.settings
    hub = {Tag.HUB: task.hub} if task.hub else {}
    gap = {Tag.MISSING_EXPERTS: json.dumps(task.missing_experts)} if task.missing_experts else {}
    with tracker.stage_run(pipeline_id, "compose", name=f"compose-{mode}" + (f"-on-{task.hub}" if task.hub else ""),
                           tags={Tag.MODE: mode, **hub, **gap}) as run_id:
        tracker.log_params(run_id, {"mode": mode, "central": task.central, "experts": ",".join(task.experts),
                                    "n_points": s.n_points, "routing": s.routing, "k": s.k, "pool": s.pool,
                                    "glue": s.glue, "output": s.output, "kway": s.kway,
                                    "center_tokens": task.center_tokens,
                                    **({"added": added[Tag.ADDED]} if added else {})})
        state, tokens, phases = _train_mode(catalog, run_id, mode, task, opts, base_state, train_only, early)
        if task.flops is not None:  # what this stage spent training the mode (centres included); the k-way
            # gate's apart: only the system that routes by it pays for it
            kway_pflops = phases.pop("kway_tokens", 0) * task.flops.get("kway", 0.0) / 1e15
            tracker.log_metrics(run_id, {"train_pflops": compose_flops(task, mode, tokens, **phases) / 1e15,
                                         **({"kway_pflops": kway_pflops} if kway_pflops else {}),
                                         "train_tokens": sum(tokens) if isinstance(tokens, list) else tokens})
        scores = get_or_fail(ray.remote(evaluate_task).options(**opts).remote(task, state),
                             f"compose-{mode} scoring task")
        tracker.log_metrics(run_id, scores)
        tracker.log_metrics(run_id, {f"gate_norm_{k.replace('.', '_')}": float(v.norm()) for k, v in state.items()
                                     if k.startswith("gates.")})
        with tempfile.TemporaryDirectory() as tmp:
            manifest = {"format": MANIFEST_FORMAT, "central": task.central, "experts": task.experts, "mode": mode,
                        "tokenizer": task.tokenizer, PARTS_SHA: task.parts_sha256, **s.to_dict(), **scores,
                        **({"router_run": task.router_run, "clusters": task.clusters,
                            ROUTER_SHA: catalog.router_pin(task.router_run)} if task.router else {}),
                        **({"added_to": added[Tag.ADDED_TO]} if added else {}),
                        **({"missing_experts": task.missing_experts} if task.missing_experts else {})}
            save_state(Path(tmp), "composition", state, manifest)
            write_json(Path(tmp) / COMPOSITION_MANIFEST, manifest)
            files = log_pyfunc(tracker, run_id, Path(tmp), "composition", {
                "registered_model": COMPOSITION_MODEL, "mode": mode, "pipeline": pipeline_id,
                "central": task.central, "experts": task.experts,
                "predict": "column experts: per generated byte, the index into experts (-1: none)"})
        run = tracker.client.get_run(run_id)
        uri = catalog.register(COMPOSITION_MODEL, f"{run.info.artifact_uri}/composition", run_id,
                               {Tag.PIPELINE: pipeline_id, Tag.MODE: mode, Tag.TOKENIZER: task.tokenizer,
                                Tag.CENTRAL: task.central, Tag.EXPERTS: json.dumps(task.experts),
                                **pin_tags(files, "composition"), **hub, **gap, **(added or {})})
        tracker.set_tags(run_id, {Tag.MODEL_VERSION: uri})
        print(f"compose {mode}: val_bpb {scores['val_bpb']:.4f} vs central {scores['central_val_bpb']:.4f}; "
              f"registered as {uri}", flush=True)
    return uri
