"""The dense model trained on: the equal-compute baseline (`dense_matched`, trained beside the
compositions for the compute they spend beyond the dense model) and `moie extend`'s fine-tuned
baselines. A helper of the compose and extend stages, not a stage: it registers central-model
versions of a role, each continued from a registered dense model on its own data and schedule.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from experts.checkpoint import latest_checkpoint, load_model, save_model
from experts.trainer import TrainConfig, train
from pipeline.config import Config
from pipeline.ray_runtime import Grant, cancel, check_workers, current_node, device_name, get_or_fail, settle
from pipeline.store import storage
from pipeline.store.catalog import Catalog, exact_uri, fetch_models
from pipeline.store.leftovers import scratch_dir
from pipeline.store.names import CENTRAL_MODEL, DENSE_MATCHED, Tag, pin_tags
from pipeline.store.tokens import load_tokens
from pipeline.store.tracking import metrics_logger, record_attempt
from pipeline.stages.parallel import parallel_task


@dataclass
class MatchedTask:
    """The dense model trained on, from its final weights, for a given number of tokens."""

    name: str
    run_id: str
    tracking_uri: str
    dense: str  # exact registry URI of the dense model
    train: str  # the dense model's own training and validation tokens (locations in the storage)
    val: str
    ckpt_dir: str  # resumable, under the pipeline's checkpoint root in the storage
    train_config: dict  # the dense model's TrainConfig fields, with the matched budget
    tokenizer: str
    grant: Grant  # its CPUs and GPUs (each worker's)
    seed: int
    pipeline: str
    workers: int = 1  # data-parallel workers (experts.dense_workers for dense_matched)
    pins: dict[str, str] = field(default_factory=dict)  # token file -> sha256 of its block index (the registry's)


# --- Ray task body ---------------------------------------------------------------------------------


def train_matched_task(task: MatchedTask) -> dict:
    """The dense model continued on its own data with its schedule (warm-up + cosine over the
    extra tokens, as every expert's branch restarts it); logged to its run, exported."""
    device = task.grant.take(task.seed)
    with scratch_dir("task") as scratch:
        return _train_matched(task, Path(scratch), 0, 1, device)


def train_matched_parallel(task: MatchedTask) -> dict:
    """Ray task body taking no resources of its own: train_matched_task's work on task.workers
    data-parallel Ray Train workers, each with the task's grant."""
    return parallel_task(_train_matched, task, workers=task.workers, num_cpus=task.grant.num_cpus,
                         num_gpus=task.grant.num_gpus, seed=task.seed, name=f"{task.name}-{task.run_id[:12]}",
                         run_dir=storage.join(storage.parent(task.ckpt_dir), f"{task.name}-parallel"))


def _train_matched(task: MatchedTask, scratch: Path, rank: int, world: int, device) -> dict | None:
    """On one process or on worker `rank` of `world`: only worker 0 logs, exports and returns."""
    from pipeline.serve.serving import log_model  # (MLflow's model code, imported where it is used)

    cfg = TrainConfig(**task.train_config)
    checkpoints = storage.CheckpointMirror(task.ckpt_dir, scratch, keep=cfg.keep_checkpoints)
    if rank == 0:
        record_attempt(task.tracking_uri, task.run_id, current_node(), latest_checkpoint(checkpoints.dir),
                       torch.get_num_threads(), device_name(device), world)
    model, _ = load_model(fetch_models(task.tracking_uri, [task.dense], scratch)[0])
    model.to(device)
    val = load_tokens(task.val, scratch, task.pins)
    result = train(model, load_tokens(task.train, scratch, task.pins), val if len(val) > 1 else None, cfg,
                   ckpt_dir=checkpoints.dir, on_metrics=metrics_logger(task.tracking_uri, task.run_id),
                   meta={"tokenizer": task.tokenizer}, on_checkpoint=checkpoints.push)
    if rank:
        return None
    save_model(scratch / "model", model, {"tokenizer": task.tokenizer, "name": task.name})
    files = log_model(task.tracking_uri, task.run_id, scratch / "model", {
        "registered_model": CENTRAL_MODEL, "model": task.name, "pipeline": task.pipeline})
    return {"files": files, "tokens": result.tokens, "steps": result.steps, "workers": world,
            "train_loss": result.train_loss, "val_bpb": result.val_bpb,
            "params": sum(p.numel() for p in model.parameters())}


def launch_matched(task: MatchedTask):
    """Start the task (on its data-parallel workers, when it has several); its Ray ref."""
    if task.workers > 1:  # its workers take the CPUs and GPUs; this task only drives them
        return ray.remote(train_matched_parallel).options(num_cpus=0, max_retries=1).remote(task)
    return ray.remote(train_matched_task).options(**task.grant.options(max_retries=1)).remote(task)


def start_continued(catalog: Catalog, cfg: Config, pipeline_id: str, dense_uri: str, dense, extra: float,
                    modes: set[str], seq: int, flops_per_token: float, train: str, val: str, tokenizer: str):
    """Launch the dense model's continuation for `extra` training FLOPs (whole steps of its own
    schedule, never less): its run, its task; (Ray ref, MatchedTask)."""
    train_cfg = {**cfg.experts.train, "seed": cfg.seed + 1}  # the dense model's schedule; batches it has not drawn
    seq = seq
    step_tokens = TrainConfig(**train_cfg).tokens_per_step(train_cfg.get("seq_len") or seq)
    steps = math.ceil(extra / (3 * flops_per_token) / step_tokens)  # whole steps: never less compute
    train_cfg["max_tokens"] = steps * step_tokens
    root = catalog.checkpoint_root(pipeline_id, dense.tags[Tag.CLUSTER_RUN])
    run_id = catalog.tracker.create_stage_run(pipeline_id, "compose", name=DENSE_MATCHED, tags={
        Tag.MODE: DENSE_MATCHED, Tag.EXPERT: DENSE_MATCHED, Tag.CONTINUED_FROM: dense_uri,
        Tag.CLUSTER_RUN: dense.tags[Tag.CLUSTER_RUN]})
    catalog.tracker.log_params(run_id, {"continued_from": dense_uri, "matched_modes": ",".join(sorted(modes)),
                                        "max_tokens": train_cfg["max_tokens"],
                                        **{f"train.{k}": v for k, v in train_cfg.items() if k != "max_tokens"}})
    catalog.tracker.log_metrics(run_id, {"matched_pflops": extra / 1e15})
    matched = MatchedTask(name=DENSE_MATCHED, run_id=run_id, tracking_uri=catalog.tracker.uri,
                          dense=dense_uri, train=train, val=val,
                          # one checkpoint directory per schedule: a rerun resumes only the same one
                          ckpt_dir=Catalog.checkpoint_dir(root, f"{DENSE_MATCHED}-{schedule_id(train_cfg)}"),
                          train_config=train_cfg,
                          tokenizer=tokenizer, grant=Grant.of(cfg, "compose"), seed=cfg.seed,
                          pipeline=pipeline_id, workers=cfg.experts.dense_workers,
                          pins={path: catalog.pins[path] for path in (train, val) if path in catalog.pins})
    print(f"{DENSE_MATCHED}: the dense model trains on for {train_cfg['max_tokens']} tokens ({extra / 1e15:.3f} "
          "PFLOPs, what the composed systems spend beyond it), beside the compositions", flush=True)
    if matched.workers > 1:
        check_workers(matched.workers, matched.grant.num_cpus, bool(matched.grant.num_gpus), DENSE_MATCHED,
                      "lower experts.dense_workers or compose.num_cpus, set compose.num_gpus=0, or add nodes")
    return launch_matched(matched), matched


def schedule_id(train_cfg: dict) -> str:
    """A short name for a training schedule (budget, rates, seed...): equal for equal configs."""
    return hashlib.sha256(json.dumps(train_cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def abandon_continued(catalog: Catalog, ref, matched: MatchedTask, killed: bool) -> None:
    """Stop the continuation and end its run KILLED or FAILED (a re-run resumes it from its
    checkpoints). After an error it gets a few seconds to end first: it may be failing with it."""
    if killed:
        cancel(ref)
    else:
        settle(ref, f"{matched.name} training task")
    if catalog.tracker.client.get_run(matched.run_id).info.status == "RUNNING":
        catalog.tracker.end_run(matched.run_id, "KILLED" if killed else "FAILED")


def finish_continued(catalog: Catalog, pipeline_id: str, ref, matched: MatchedTask, dense, role: str = DENSE_MATCHED,
                     tags: dict | None = None) -> str:
    """Wait for the continuation (which logged its model) and register it as a central-model
    version of `role` (dense_matched; `moie extend`'s fine-tuned baselines), ending its run."""
    tracker = catalog.tracker
    out = get_or_fail(ref, f"{matched.name} training task")
    tracker.log_metrics(matched.run_id, {"tokens": out["tokens"], "steps": out["steps"], "params": out["params"],
                                         "final_train_loss": out["train_loss"],
                                         **({"final_val_bpb": out["val_bpb"]} if out["val_bpb"] is not None else {})})
    files = out["files"]
    run = tracker.client.get_run(matched.run_id)
    kept = {k: v for k, v in dense.tags.items() if k in (Tag.TOKENIZER, Tag.ARCH, Tag.CLUSTER_RUN)}
    uri = catalog.register(CENTRAL_MODEL, f"{run.info.artifact_uri}/model", matched.run_id, {
        **kept, Tag.PIPELINE: pipeline_id, Tag.EXPERT: matched.name, Tag.ROLE: role,
        Tag.CONTINUED_FROM: exact_uri(dense), **pin_tags(files, "model"), **(tags or {})})
    tracker.set_tags(matched.run_id, {Tag.MODEL_VERSION: uri})
    tracker.end_run(matched.run_id, "FINISHED")
    print(f"{matched.name}: registered as {uri} (val_bpb {out['val_bpb']})", flush=True)
    return uri
