"""The experts stage: one hourglass expert per cluster, plus the dense baseline, each a
Ray task that trains independently, checkpoints to the storage every node reaches (a local
directory or an object store), resumes after a crash or on another node after its node is
lost, logs to its own MLflow child run, and is registered in the model registry.

With `experts.seed_fraction` (BTM / cBTM) the dense model trains alone for that share of
its budget first; every expert then branches from that seed, with the seed's tokens
counted once for all of them, so seed + experts cost what the dense model costs.
Re-running the stage for a pipeline skips every expert that is already registered and
resumes the others from their newest checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import ray
import torch

from experts.checkpoint import build_model, latest_checkpoint, load_model, model_config, save_model
from experts.tokenizer import TOKENIZER, VOCAB_SIZE, encode_texts
from experts.trainer import TrainConfig, TrainResult, train
from pipeline.config import Config
from pipeline.errors import MoieError, StageError, one_line
from pipeline.progress import BoardPrinter, open_board
from pipeline.ray_runtime import (cancel, check_resources, check_workers, connect_cluster, current_node,
                                  describe_failure, device_name, every_result, granted_device, largest_node_cpus,
                                  task_gpus, use_granted_cpus)
from pipeline.store import storage
from pipeline.store.catalog import Catalog, check_token_files, exact_uri, token_tags
from pipeline.store.leftovers import scratch_dir
from pipeline.store.names import (CENTRAL, CENTRAL_MODEL, DENSE, EXPERT_MODEL, ROLE_CENTRAL, ROLE_DENSE,
                                  ROLE_DENSE_CENTRAL, SEED, Tag, carried_tags, expert_cluster, expert_name, is_expert,
                                  model_tags)
from pipeline.store.tokens import load_tokens, save_tokens
from pipeline.store.tracking import changed_params, metrics_logger, param_strings, record_attempt, stop_unless_running
from pipeline.stages.parallel import parallel_task
from pipeline.stages.shards import check_found, join_tokens, shard_tables, shard_tokens
from pipeline.text.corpus import CorpusError, corpus_shards
from pipeline.text.embedded import EmbeddedCorpusError

log = logging.getLogger(__name__)


# training settings that change how a run is watched, not what it trains: changing them goes on in the same run
BOOKKEEPING = {f"train.{k}" for k in ("log_every", "eval_every", "eval_tokens", "ckpt_every", "keep_checkpoints",
                                      "compile")}


class ExpertsWatcher(Protocol):
    """Told what the experts stage will register, then of each model as soon as it is registered."""

    def expect(self, names: list[str], root: str, pins: dict[str, str]) -> None: ...

    def registered(self, name: str, uri: str) -> None: ...


@dataclass
class ExpertTask:
    """Everything one training task needs (a Ray task argument: plain fields, no handles)."""

    name: str  # expert-<cluster>, dense or central
    run_id: str  # its MLflow child run
    tracking_uri: str
    model: dict  # {"arch": ..., model config, "vocab_size": ...}
    train_config: dict  # TrainConfig fields, the budget (max_tokens) and seed included
    train: str  # token files (.npy, read by blocks), locations in the storage
    val: str
    ckpt_dir: str  # a location in the storage
    num_cpus: float
    tokenizer: str  # fingerprint
    seed: int
    num_gpus: float = 0
    has_central: bool = False  # a central model of its own is configured (the dense model is then only the baseline)
    init_from: str | None = None  # an expert branches from the seed exported here (a location in the storage)
    stop_at: int | None = None  # the seed phase: the dense model stops at this step ...
    seed_dir: str | None = None  # ... and is exported here, and logged to this run of its own:
    log_run: str | None = None
    description: dict | None = None  # of the MLflow model the task logs to its run (None: the seed, not logged)
    hold: str | None = None  # tests only (experts.hold): wait after the first checkpoint until <hold>/release exists
    workers: int = 1  # data-parallel workers (experts.dense_workers for the dense and central models)
    pins: dict = field(default_factory=dict)  # token file -> sha256 of its block index, as its run recorded


@dataclass
class TrainedModel:
    """What a training task returns: its model is logged to its run's `model/` (files: {name: sha256})."""

    result: TrainResult
    params: int
    files: dict | None = None


@dataclass
class SeedPlan:
    """The dense model's first `steps` (`tokens`), exported to `dir` for the experts to branch from."""

    steps: int
    tokens: int
    dir: str


# --- data -------------------------------------------------------------------------------


def write_tokens(location: str, texts: list[str], eos_id: int) -> str:
    """Byte tokens of texts held in memory (eos after each) as a token file in the storage (a new
    domain's, in `moie extend`); written once."""
    if storage.kind(location) != "file":
        save_tokens(encode_texts(texts, eos_id), location)  # whole or not at all
    return location


SHARD_TASK_COLUMNS = ("doc_id", "cluster", "split", "text_sha256")  # what a token-writing task reads of its shard's
TOKEN_COLUMNS = (*SHARD_TASK_COLUMNS, "shard")  # what token writing reads of the assignments


def expert_data(cfg: Config, root: str, table: pa.Table, k: int) -> dict[str, dict[str, str]]:
    """Each cluster's training and validation documents as byte tokens in shared .npy files, which
    tasks memory-map, and every document in the dense model's: {name: {train, val}} (locations in
    the storage under `root`). Files written by an earlier run are kept. Written by Ray tasks, one
    per corpus shard (each writes its part of every file), then one per file joining the parts in
    corpus order: no process holds more than a shard's tokens."""
    names = [expert_name(j) for j in range(k)] + [DENSE]
    files = {name: {split: Catalog.token_file(root, name, split) for split in ("train", "val")} for name in names}
    todo = {(name, split) for name in names for split in ("train", "val") if not storage.exists(files[name][split])}
    if not todo:
        return files
    shards = corpus_shards(cfg.corpus)
    staging = storage.join(root, "data", f"parts-{uuid.uuid4().hex[:8]}")
    own = (CorpusError, StageError, EmbeddedCorpusError)
    try:
        corpus = ray.put(cfg.corpus)
        write = ray.remote(shard_tokens).options(num_cpus=1, max_retries=1)
        expected, pending = 0, []
        try:  # each shard's table is submitted as it is cut (Ray holds its copy): one at a time here
            for i, docs in enumerate(shard_tables(table, len(shards), SHARD_TASK_COLUMNS, ("train", "validation"))):
                expected += len(docs)
                if len(docs):
                    pending.append(write.remote(shards[i], i, corpus, docs, storage.join(staging, f"{i:05d}")))
        except BaseException:
            cancel(pending)  # (before the staging folder they write to is removed)
            raise
        written = every_result(pending, "token-writing tasks", own)
        check_found(expected, written)
        join = ray.remote(join_tokens).options(num_cpus=1, max_retries=1)
        every_result([join.remote([w["parts"][name][split] for w in written if split in w["parts"].get(name, {})],
                                  files[name][split]) for name, split in sorted(todo)], "token-joining tasks", own)
    finally:
        storage.remove(staging)
    return files


def registered_model(name: str) -> str:
    """The registered model a trained model becomes a version of."""
    return EXPERT_MODEL if is_expert(name) else CENTRAL_MODEL


def set_aside(location: str, tag: str) -> None:
    """Rename a directory of another config's training out of the way (kept, never reused)."""
    storage.move(location, f"{location.rstrip('/')}.superseded-{tag}-{os.getpid()}")


# --- the task ----------------------------------------------------------------------------


def train_expert(task: ExpertTask, board=None) -> TrainedModel:
    """Ray task body: train one model from its shared data, resuming from its newest checkpoint
    in the storage (written by an earlier attempt, on this node or another); log it to its run."""
    use_granted_cpus(task.num_cpus, task.seed)
    with tempfile.TemporaryDirectory(prefix="moie-task-") as scratch:  # this node's copies, gone after the task
        return _train_expert(task, board, Path(scratch))


def train_expert_parallel(task: ExpertTask, board=None) -> TrainedModel:
    """Ray task body taking no resources of its own: train_expert's work on task.workers
    data-parallel Ray Train workers, each with the task's CPUs and GPUs; worker 0 checkpoints,
    logs and exports as train_expert does. A lost worker restarts them all from the newest
    checkpoint (Ray Train); a lost driver of theirs (this task) is retried and resumes so too."""
    saved = parallel_task(_expert_work, (task, board), workers=task.workers, num_cpus=task.num_cpus,
                          num_gpus=task.num_gpus, seed=task.seed, name=f"{task.name}-{task.run_id[:12]}",
                          run_dir=storage.join(storage.parent(task.ckpt_dir), f"{task.name}-parallel"))
    return TrainedModel(TrainResult(**saved["result"]), saved["params"], saved["files"])


def _expert_work(args: tuple, scratch: Path, rank: int, world: int, device: torch.device) -> dict | None:
    task, board = args
    trained = _train_expert(task, board, scratch, rank, device, world)
    return asdict(trained) if trained is not None else None


def _train_expert(task: ExpertTask, board, scratch: Path, rank: int = 0, device: torch.device | None = None,
                  world: int = 1) -> TrainedModel | None:
    """The training itself, on one process or on worker `rank` of `world` data-parallel ones:
    only worker 0 records, checkpoints, exports and logs; the others return None."""
    from pipeline.serve.serving import log_model  # (MLflow's model code, imported where it is used)

    cfg = TrainConfig(**task.train_config)
    checkpoints = storage.CheckpointMirror(task.ckpt_dir, scratch, keep=cfg.keep_checkpoints)
    resume_step = latest_checkpoint(checkpoints.dir)
    device = granted_device(task.num_gpus) if device is None else device  # Ray set CUDA_VISIBLE_DEVICES to the GPUs it granted
    if rank == 0:
        record_attempt(task.tracking_uri, task.run_id, current_node(), resume_step, torch.get_num_threads(),
                       device_name(device), world)
    model = build_model(task.model)
    if task.init_from and resume_step is None:  # branch from the shared seed
        model.load_state_dict(load_model(storage.local_copy(task.init_from, scratch))[0].state_dict())
    model.to(device)
    train_tokens = load_tokens(task.train, scratch, task.pins)
    val_tokens = load_tokens(task.val, scratch, task.pins)
    val_tokens = val_tokens if len(val_tokens) > 1 else None
    total = cfg.steps(cfg.seq_len or model.config.block_size)
    log_metrics = metrics_logger(task.tracking_uri, task.run_id)

    def on_metrics(step: int, metrics: dict) -> None:
        log_metrics(step, metrics)
        if board is not None and "train_loss" in metrics:
            board.update.remote(task.name, {"step": step, "total": total, "loss": metrics["train_loss"],
                                            "tokens_per_s": metrics["tokens_per_s"], "pid": os.getpid()})

    def push(json_path: Path) -> None:  # mirror the checkpoint; stop if the stage has ended this run
        checkpoints.push(json_path)
        stop_unless_running(task.tracking_uri, task.run_id)

    on_checkpoint = push if task.hold is None else held_after_first(push, task)
    result = train(model, train_tokens, val_tokens, cfg, ckpt_dir=checkpoints.dir, on_metrics=on_metrics,
                   meta={"tokenizer": task.tokenizer}, stop_at=task.stop_at, on_checkpoint=on_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    if rank:
        return None
    if task.stop_at:  # the seed phase: export the paused model for the experts to branch from
        save_model(scratch / "seed", model, {"tokenizer": task.tokenizer, "name": SEED, "step": result.steps})
        storage.upload(scratch / "seed", task.seed_dir)
        # and log it to its own run, to be registered: a hub to compose on
        files = log_model(task.tracking_uri, task.log_run, scratch / "seed", {
            "registered_model": CENTRAL_MODEL, "model": SEED, "pipeline": (task.description or {}).get("pipeline")
        }) if task.log_run else None
        return TrainedModel(result, params, files)
    save_model(scratch / "model", model, {"tokenizer": task.tokenizer, "name": task.name})
    files = log_model(task.tracking_uri, task.run_id, scratch / "model", task.description or {})
    if board is not None:
        board.update.remote(task.name, {"step": result.steps, "total": total, "loss": result.train_loss,
                                        "tokens_per_s": result.tokens_per_s, "pid": os.getpid(), "done": True})
    return TrainedModel(result, params, files)


HOLD_LIMIT_S = 900  # experts.hold: longest wait for the test to act (it acts within seconds)


def held_after_first(push, task: ExpertTask):
    """on_checkpoint for tests (experts.hold): push each checkpoint; after the first one, write
    <hold>/<name>.held ({"pid", "step"}, atomically) and wait there until <hold>/release exists."""
    hold = Path(task.hold)
    held = []

    def on_checkpoint(json_path: Path) -> None:
        push(json_path)
        if held:
            return
        held.append(True)
        marker = hold / f"{task.name}.held"
        part = marker.with_name(marker.name + ".part")
        part.write_text(json.dumps({"pid": os.getpid(), "step": int(Path(json_path).stem.removeprefix("step-"))}))
        part.rename(marker)
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not (hold / "release").exists():  # a cancel (force) or the driver's exit ends the wait
            if time.monotonic() > deadline:  # the test that set the hold is gone: do not hold the CPUs forever
                raise RuntimeError(f"experts.hold: {hold / 'release'} did not appear in {HOLD_LIMIT_S} s")
            time.sleep(0.05)

    return on_checkpoint


# --- the stage ---------------------------------------------------------------------------


def run_experts(cfg: Config, pipeline_id: str, watcher: ExpertsWatcher | None = None) -> dict[str, str]:
    """Train (or resume, or skip) every expert and the dense model; return {name: registry URI}.
    watcher: told which models the stage will register (`expect(names, storage root, the pins of
    the token files of those still to train)`), then of each registered one as soon as it is
    (`registered(name, uri)`): `moie run` composes early."""
    catalog = Catalog(cfg)
    connect_cluster(cfg, catalog.tracker)  # before any work: a multi-node cluster needs shared stores
    catalog.tracker.pipeline_run(pipeline_id)
    cluster_run, table, report = catalog.assignments(pipeline_id, arrow=True, columns=TOKEN_COLUMNS)
    k = int(cluster_run.data.params["cluster.k"])
    with catalog.tracker.pipeline_active(pipeline_id):
        stage = _ExpertsStage(catalog, cfg, pipeline_id, cluster_run.info.run_id, k, report, watcher)
        data = expert_data(cfg, stage.root, table, k)
        del table  # a few hundred bytes a document: not held while the models train
        return stage.run(data)


class _ExpertsStage:
    """One run of the stage: which models still need training, the seed, the Ray tasks."""

    def __init__(self, catalog: Catalog, cfg: Config, pipeline_id: str, cluster_run_id: str, k: int, report: dict,
                 watcher: ExpertsWatcher | None = None):
        self.catalog, self.tracker, self.cfg, self.watcher = catalog, catalog.tracker, cfg, watcher
        self.pipeline_id, self.cluster_run_id, self.k, self.report = pipeline_id, cluster_run_id, k, report
        self.root = catalog.checkpoint_root(pipeline_id, cluster_run_id)
        self.cannot_train: dict[str, str] = {}  # model -> why its data cannot make one batch
        self.num_gpus = task_gpus(cfg, "experts")  # of each training task (the seed's too)

    def run(self, data: dict[str, dict[str, str]]) -> dict[str, str]:
        """Train what is missing of every model (data: expert_data's token files)."""
        e = self.cfg.experts
        data[CENTRAL] = data[DENSE]  # the central model reads the whole corpus too
        names = [expert_name(j) for j in range(self.k)] + ([DENSE] if e.dense else [])
        names += [CENTRAL] if self.cfg.central.arch else []
        runs = self.tracker.stage_runs(self.pipeline_id, "experts", None)
        existing = {r.data.tags.get(Tag.EXPERT): r for r in reversed(runs)  # the newest run of each model
                    if r.data.tags.get(Tag.CLUSTER_RUN) == self.cluster_run_id}  # experts of this clustering
        seed = self.seed_plan()
        registered, tasks = {}, []
        for name in names:
            run = existing.get(name)
            recorded = run is not None and run.data.tags.get(Tag.MODEL_VERSION)
            if recorded and not self.catalog.exists(recorded):  # deleted from the registry: trained again, anew
                print(f"{name}: its version {recorded} was deleted from the registry; training it again", flush=True)
                run = None
            if run is not None and Tag.MODEL_VERSION not in run.data.tags:
                self.mark_registered(name, run)  # registered just before a stop, not yet marked
                run = self.tracker.client.get_run(run.info.run_id)
            if run is not None and Tag.MODEL_VERSION in run.data.tags:
                registered[name] = run.data.tags[Tag.MODEL_VERSION]
                print(f"{name}: already trained and registered as {registered[name]}", flush=True)
                continue
            task = self.task(name, run, data[name], seed)
            if task is not None:
                tasks.append(task)
        self.check_trainable(names)
        if self.watcher is not None:
            self.watcher.expect([n for n in names if n not in self.cannot_train], self.root,
                                {path: pin for t in tasks for path, pin in t.pins.items()})
            for name, uri in registered.items():
                self.watcher.registered(name, uri)
        if tasks:
            check_resources(e.num_cpus, self.num_gpus, what="expert task (experts.num_cpus / experts.num_gpus)",
                            resources=e.resources)
            if any(t.workers > 1 for t in tasks):
                check_workers(e.dense_workers, e.num_cpus, bool(self.num_gpus), "dense model",
                              "lower experts.dense_workers or experts.num_cpus, or add nodes")
            board = open_board(self.pipeline_id)  # one board for seed and branches (it dies with its last handle)
            self.train_seed(seed, tasks, board)
            registered |= self.train_all(tasks, board)
        if seed is not None and self.catalog.seed_model(self.pipeline_id) is None:
            self.register_exported_seed(seed)  # exported, but a stop came before it was registered
        return registered

    def mark_registered(self, name: str, run) -> None:
        """A run whose model version exists although the stage stopped before tagging it: marked
        and FINISHED now, so the model is not trained and registered a second time."""
        version = self.catalog.version_of_run(registered_model(name), run.info.run_id)
        if version is not None:
            self.tracker.set_tags(run.info.run_id, {Tag.MODEL_VERSION: exact_uri(version)})
            self.tracker.end_run(run.info.run_id, "FINISHED")

    def check_trainable(self, names: list[str]) -> None:
        """Go on without a cluster too small to train (its run FAILED, tagged moie.skipped, and
        tried again on the next run of the stage), but not without the dense model or every expert."""
        if not self.cannot_train:
            return
        why = "; ".join(f"{name}: {reason}" for name, reason in self.cannot_train.items())
        fix = ("lower experts.train.batch_size or experts.train.seq_len, or cluster into fewer, larger clusters "
               "(cluster.k), then run the stage again")
        experts = [n for n in names if is_expert(n)]
        if DENSE in self.cannot_train or CENTRAL in self.cannot_train or set(experts) <= set(self.cannot_train):
            raise StageError(f"cannot train {', '.join(self.cannot_train)} ({why}); {fix}")
        log.warning("going on without %s (%s); to train them, %s", ", ".join(self.cannot_train), why, fix)

    def seed_plan(self) -> SeedPlan | None:
        """The experts branch from the dense model after seed_fraction of its steps (None: from scratch)."""
        e = self.cfg.experts
        if not e.seed_fraction:
            return None
        seq_len = e.train.get("seq_len") or model_config({"arch": e.arch, **e.model}).block_size
        dense_cfg = TrainConfig(**{**e.train, "max_tokens": e.train.get("max_tokens", 1_000_000) * self.k})
        steps = max(1, round(e.seed_fraction * dense_cfg.steps(seq_len)))
        return SeedPlan(steps=steps, tokens=steps * dense_cfg.tokens_per_step(seq_len),
                        dir=Catalog.seed_dir(self.root))

    def task(self, name: str, run, data: dict, seed: SeedPlan | None) -> ExpertTask | None:
        """The training task of one model (its run created, or reopened when the config that made
        it is unchanged), or None if its data is too small to train on."""
        e = self.cfg.experts
        arch, model, train_cfg = ((self.cfg.central.arch, self.cfg.central.model, self.cfg.central.train)
                                  if name == CENTRAL else (e.arch, e.model, e.train))
        model_cfg = {"arch": arch, **model, "vocab_size": VOCAB_SIZE}
        seq_len = train_cfg.get("seq_len") or model_config(model_cfg).block_size  # no model built for this
        batch = train_cfg.get("batch_size", 16)
        budget = train_cfg.get("max_tokens", 1_000_000) * (self.k if name == DENSE else 1)
        branch = seed is not None and is_expert(name)
        if branch:  # the seed is shared: k experts + seed = the dense budget
            # (each branch warms up to the peak learning rate again: measured on the default config,
            # going on from the seed's decayed rate instead left every expert ~0.03 bits per byte worse)
            budget -= seed.tokens // self.k
        params = param_strings({f"model.{k}": v for k, v in model.items()}
                               | {f"train.{k}": v for k, v in train_cfg.items() if k != "max_tokens"}
                               | {"arch": arch, "max_tokens": budget, "seed": self.cfg.seed}
                               | ({"seed_fraction": e.seed_fraction} if branch else {}))
        ckpt_dir = Catalog.checkpoint_dir(self.root, name)
        if run is not None and (changed := changed_params(run.data.params, params, ignore=BOOKKEEPING)):
            self.supersede(name, run, changed, ckpt_dir)
            run = None
        files = {split: data[split] for split in ("train", "val")}
        if run is None:
            run_id = self.create_run(name, params, files)
        else:
            run_id = run.info.run_id
            self.tracker.reopen_run(run_id)
        run_tags = self.tracker.client.get_run(run_id).data.tags
        pins = check_token_files(name, run_tags, files)  # (just recorded, for a new run: its index read again)
        n_train = storage.npy_length(data["train"])
        if n_train < batch * (seq_len + 1):
            why = (f"its data has {n_train} training tokens, fewer than one batch of {batch} windows of "
                   f"{seq_len + 1} tokens")
            self.tracker.set_tags(run_id, {Tag.SKIPPED: why})
            self.tracker.end_run(run_id, "FAILED")  # not FINISHED: it holds no model; tried again next time
            self.cannot_train[name] = why
            return None
        if branch:  # the shared seed's tokens count once for all experts
            self.tracker.set_tags(run_id, {Tag.SEED_TOKENS: str(seed.tokens)})
        workers = e.dense_workers if name in (DENSE, CENTRAL) else 1
        domain = run_tags.get(Tag.DOMAIN)
        return ExpertTask(name=name, run_id=run_id, tracking_uri=self.tracker.uri, model=model_cfg,
                          train_config={**train_cfg, "max_tokens": budget, "seed": self.cfg.seed},
                          train=data["train"], val=data["val"], pins=pins, ckpt_dir=ckpt_dir, num_cpus=e.num_cpus,
                          num_gpus=self.num_gpus, tokenizer=TOKENIZER.fingerprint, seed=self.cfg.seed,
                          has_central=bool(self.cfg.central.arch), init_from=seed.dir if branch else None,
                          description={"registered_model": registered_model(name), "model": name,
                                       "pipeline": self.pipeline_id, "domain": domain}, hold=e.hold,
                          workers=workers)

    def create_run(self, name: str, params: dict[str, str], files: dict[str, str]) -> str:
        tags = {Tag.EXPERT: name, Tag.CLUSTER_RUN: self.cluster_run_id, Tag.STORAGE_ROOT: self.root,
                Tag.NUM_CPUS: str(self.cfg.experts.num_cpus)}
        tags |= token_tags(files)
        cluster = expert_cluster(name)
        if cluster is not None:
            tags[Tag.CLUSTER] = str(cluster)
            dominant = (self.report.get("dominant") or [None] * (cluster + 1))[cluster]
            if dominant:
                tags |= {Tag.DOMAIN: str(dominant["domain"]), Tag.PURITY: f"{dominant['share']:.4f}"}
        run_id = self.tracker.create_stage_run(self.pipeline_id, "experts", name=name, tags=tags)
        self.tracker.log_params(run_id, params)
        return run_id

    def supersede(self, name: str, run, changed: dict[str, tuple], ckpt_dir: str) -> None:
        """A model whose config changed since its unfinished run trains afresh, in a new run (a
        run's params are what made its model); the old run's checkpoints, of the old config, are
        set aside (renamed, not deleted: putting the config back does not bring them into use)."""
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in sorted(changed.items()))
        print(f"{name}: the config changed since run {run.info.run_id} ({what}): it trains afresh in a new run",
              flush=True)
        self.tracker.set_tags(run.info.run_id, {Tag.SUPERSEDED: what})
        if run.info.status == "RUNNING":  # left so by a driver that was killed
            self.tracker.end_run(run.info.run_id, "FAILED")
        set_aside(ckpt_dir, run.info.run_id)
        if name == DENSE:  # the seed is the dense model's early state: of the old config too
            set_aside(storage.parent(Catalog.seed_dir(self.root)), run.info.run_id)

    def train_seed(self, seed: SeedPlan | None, tasks: list[ExpertTask], board) -> None:
        """Train the dense model to the seed step and export it, if an expert still has to branch from it."""
        branching = [t for t in tasks if t.init_from and not storage.checkpoint_steps(t.ckpt_dir)]
        if not seed or not branching:
            return
        exported = storage.join(seed.dir, "model.json")
        if storage.kind(exported) == "file":
            if json.loads(storage.read_text(exported)).get("step") == seed.steps:
                return
            set_aside(storage.parent(seed.dir), "step")  # exported at another step (seed_fraction changed)
        if self.restore_seed(seed):
            return
        dense = [t for t in tasks if t.name == DENSE]
        if dense and max(storage.checkpoint_steps(dense[0].ckpt_dir), default=0) > seed.steps:
            raise StageError(f"the seed (the dense model at step {seed.steps}) is missing from {seed.dir} "
                             "and the dense model has trained past it; set experts.seed_fraction: 0 or start "
                             "a new pipeline")
        if not dense:
            raise StageError(f"the experts branch from the dense model's seed at {seed.dir}, which is missing "
                             "while the dense model is registered; set experts.seed_fraction: 0 or retrain")
        print(f"seed: the dense model to step {seed.steps} ({seed.tokens} tokens), then every expert "
              "branches from it", flush=True)
        seed_run = self.seed_run(seed, dense[0].run_id)
        e = self.cfg.experts
        # alone on the cluster: the seed may take more CPUs than a task of the stage, as many as one node has
        cpus = min(e.seed_num_cpus or e.num_cpus, largest_node_cpus()) if dense[0].workers == 1 else e.num_cpus
        self.train_all([replace(dense[0], stop_at=seed.steps, seed_dir=seed.dir, log_run=seed_run, num_cpus=cpus)],
                       board, register=self.register_seed)

    def restore_seed(self, seed: SeedPlan) -> bool:
        """The seed, gone from the storage (a storage lost or moved), restored from its registered
        version (the same files the seed phase exported, checked against the registry's pin);
        False where none of this seed step is registered."""
        registered = self.catalog.seed_model(self.pipeline_id)
        if registered is None or registered.tags.get(Tag.SEED_TOKENS) != str(seed.tokens):
            return False
        with scratch_dir("seed") as tmp:
            try:
                local = self.catalog.model_dir(registered, Path(tmp))
            except MoieError as err:  # unpinned (an older moie), changed or gone: not a seed to restore
                print(f"seed: its registered version {exact_uri(registered)} cannot be restored ({one_line(err)})",
                      flush=True)
                return False
            if json.loads((Path(local) / "model.json").read_text(encoding="utf-8")).get("step") != seed.steps:
                return False
            storage.upload(local, seed.dir)
        print(f"seed: missing from {seed.dir}; restored from its registered version {exact_uri(registered)}",
              flush=True)
        return True

    def train_all(self, tasks: list[ExpertTask], board, register=None) -> dict[str, str]:
        """Run the tasks on Ray, print progress, register each model as it finishes (`register`:
        self.register by default; the seed phase registers the seed). If the stage stops early
        (an interrupt, an error) every task still pending is cancelled."""
        models = register is None  # the stage's own models: the watcher hears of them
        register = register or self.register
        e = self.cfg.experts
        # a task whose worker or node dies is retried (on any node) and resumes from the storage
        options = dict(resources=e.resources or None, max_retries=e.max_retries)

        def start(task: ExpertTask):
            if task.workers > 1:  # its workers take the CPUs and GPUs; this task only drives them
                return ray.remote(train_expert_parallel).options(num_cpus=0, max_retries=e.max_retries).remote(
                    task, board)
            return ray.remote(train_expert).options(num_cpus=task.num_cpus, num_gpus=task.num_gpus,
                                                    **options).remote(task, board)

        # longest first: the dense model (k x an expert's budget) must not start last, alone on one CPU
        ordered = sorted(tasks, key=lambda t: -t.train_config["max_tokens"])
        pending = {start(task): task for task in ordered}
        printer = BoardPrinter(board)
        registered, failures = {}, []
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=e.progress_every)
                printer.print_changes()  # one line per model that moved since the last print
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        trained = ray.get(ref)
                    except ray.exceptions.RayError as err:  # failed after its retries: go on with the others
                        failures.append(describe_failure(task.name, err))
                        self.tracker.end_run(task.run_id, "FAILED")
                        continue
                    uri = register(task, trained)
                    if models:
                        registered[task.name] = uri
                        if self.watcher is not None:
                            self.watcher.registered(task.name, uri)
                    print(f"{task.name if models else SEED}: registered as {uri} (val_bpb {trained.result.val_bpb}, "
                          f"resumed from step {trained.result.resumed_from})", flush=True)
        finally:
            cancel(list(pending))  # the stage stopped early: no task trains on unwatched
        if failures:
            raise StageError("training failed: " + "; ".join(failures))
        return registered

    def seed_run(self, seed: SeedPlan, dense_run_id: str) -> str:
        """The seed's own run (its model is logged there): the dense run's params and data, and the seed step."""
        params = {**self.tracker.client.get_run(dense_run_id).data.params, "seed_steps": str(seed.steps),
                  "seed_tokens": str(seed.tokens)}
        return self.create_run(SEED, params, {split: Catalog.token_file(self.root, DENSE, split)
                                              for split in ("train", "val")})

    def register_exported_seed(self, seed: SeedPlan) -> str | None:
        """Register the seed exported at seed.steps (from the storage, in a seed run of its own),
        when the stage stopped between exporting and registering it; None if there is no export."""
        from pipeline.serve.serving import log_model

        exported = storage.join(seed.dir, "model.json")
        if storage.kind(exported) != "file" or json.loads(storage.read_text(exported)).get("step") != seed.steps:
            return None
        dense = next(r for r in reversed(self.tracker.stage_runs(self.pipeline_id, "experts", None))
                     if r.data.tags.get(Tag.EXPERT) == DENSE and r.data.tags.get(Tag.CLUSTER_RUN) == self.cluster_run_id)
        seed_run = self.seed_run(seed, dense.info.run_id)
        files = {split: Catalog.token_file(self.root, DENSE, split) for split in ("train", "val")}
        with scratch_dir("seed") as tmp:
            local = storage.local_copy(seed.dir, tmp)
            model, _ = load_model(local)
            logged = log_model(self.tracker.uri, seed_run, Path(local), {
                "registered_model": CENTRAL_MODEL, "model": SEED, "pipeline": self.pipeline_id})
        task = ExpertTask(name=DENSE, run_id=dense.info.run_id, tracking_uri=self.tracker.uri,
                          model={"arch": self.cfg.experts.arch, **self.cfg.experts.model,
                                 "vocab_size": VOCAB_SIZE},  # the dense model's, as task() builds it
                          train_config={}, train=files["train"], val=files["val"], ckpt_dir="", num_cpus=0,
                          tokenizer=TOKENIZER.fingerprint, seed=self.cfg.seed, log_run=seed_run)
        result = TrainResult(seed.steps, seed.tokens, float("nan"), None, 0.0, None)
        uri = self.register_seed(task, TrainedModel(result, sum(p.numel() for p in model.parameters()), logged))
        print(f"{SEED}: exported earlier, registered now as {uri}", flush=True)
        return uri

    def register_seed(self, task: ExpertTask, trained: TrainedModel) -> str:
        """Register the seed its task logged to the seed's own run as a moie-central version with
        moie.role=seed: the dense model where every expert branched, a hub to compose on."""
        run = self.tracker.client.get_run(task.log_run)
        tags = {**model_tags(self.pipeline_id, SEED, task.tokenizer, task.model, trained.files),
                Tag.ROLE: SEED, Tag.SEED_TOKENS: str(trained.result.tokens),
                **carried_tags(run.data.tags, (Tag.CLUSTER_RUN, Tag.STORAGE_ROOT))}
        uri = self.catalog.register(CENTRAL_MODEL, f"{run.info.artifact_uri}/model", task.log_run, tags)
        self.tracker.log_metrics(task.log_run, {"steps": trained.result.steps, "tokens": trained.result.tokens,
                                                "params": trained.params, "final_train_loss": trained.result.train_loss})
        self.tracker.set_tags(task.log_run, {Tag.MODEL_VERSION: uri})
        self.tracker.end_run(task.log_run, "FINISHED")
        return uri

    def register(self, task: ExpertTask, trained: TrainedModel) -> str:
        """Log the model's final metrics, register the model its task logged, finish its run; its registry URI."""
        result, run_id = trained.result, task.run_id
        self.tracker.log_metrics(run_id, {"final_train_loss": result.train_loss, "steps": result.steps,
                                          "tokens": result.tokens, "params": trained.params,
                                          "resumed_from_step": result.resumed_from or 0,
                                          **({"final_val_bpb": result.val_bpb} if result.val_bpb is not None else {})})
        run = self.tracker.client.get_run(run_id)
        name = registered_model(task.name)
        manifest = trained.files
        # role: which central-model version composition takes by default (a configured central
        # model wins over the dense baseline, which is then registered as the baseline only)
        role = {CENTRAL: ROLE_CENTRAL, DENSE: ROLE_DENSE if task.has_central else ROLE_DENSE_CENTRAL}.get(task.name)
        tags = {**model_tags(self.pipeline_id, task.name, task.tokenizer, task.model, manifest),
                **carried_tags(run.data.tags, (Tag.CLUSTER, Tag.DOMAIN, Tag.PURITY, Tag.CLUSTER_RUN,
                                               Tag.SEED_TOKENS, Tag.STORAGE_ROOT))}
        if role:
            tags[Tag.ROLE] = role
        uri = self.catalog.register(name, f"{run.info.artifact_uri}/model", run_id, tags)
        self.tracker.set_tags(run_id, {Tag.MODEL_VERSION: uri})
        self.tracker.end_run(run_id, "FINISHED")
        return uri
