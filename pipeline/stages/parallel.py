"""One model trained by several data-parallel workers on Ray Train (`run_data_parallel`):
`parallel_task` runs a piece of work on each worker and hands worker 0's result back (the
experts stage's dense and central models, dense_matched); `train_work` is such a piece, a
plain model trained from token files (tests and bench/data_parallel.py).

Every worker reads the same token files, builds the same model and resumes from the same
newest checkpoint; `experts.trainer.train` splits each batch among them and averages the
gradients (gloo on CPU, NCCL on GPU); worker 0 alone validates, checkpoints to the storage
and writes the trained model and its result. When a worker or its node is lost, Ray Train
restarts them all and they go on from the newest checkpoint. An error that every retry would
meet again (PERMANENT: a token block that does not match its index, a corrupt checkpoint, a
GPU torch cannot use) is recorded in the storage; the restarted workers find it and stop at
once, and the run ends with that error, as a single-process task's does. A storage or
tracking server that fails for a moment is retried by Ray Train, as a lost worker is.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from artifacts import ArtifactError, write_json
from pipeline.config import ConfigError
from pipeline.errors import StageError, one_line
from pipeline.ray_runtime import ResourceError, TaskFailedError, granted_device, run_data_parallel, use_granted_cpus
from pipeline.store import storage
from pipeline.store.tokens import load_tokens


# errors a worker's retry would meet again: damaged or foreign artifacts (token blocks, checkpoints,
# weights), settings the model cannot take, a grant torch cannot use (not the storage's OSErrors)
PERMANENT = (ArtifactError, ConfigError, ResourceError)


def parallel_task(work: Callable, args, *, workers: int, num_cpus: float, num_gpus: float, seed: int,
                  run_dir: str, name: str, max_failures: int = 3) -> dict:
    """`work(args, scratch, rank, world, device)` on `workers` Ray Train workers of num_cpus CPUs
    and num_gpus GPUs each (torch.distributed initialised among them; Ray Train's run state
    under run_dir, a location in the storage); what worker 0 returns (a JSON-able dict), handed
    back through the storage. A stage's model that trains on several workers runs this inside
    a Ray task of no resources of its own: its workers take them."""
    result_at = storage.join(run_dir, f"result-{uuid.uuid4().hex}.json")
    config = {"work": work, "args": args, "num_cpus": num_cpus, "use_gpu": bool(num_gpus), "seed": seed,
              "result": result_at, "error": f"{result_at}.error"}
    try:
        try:
            run_data_parallel(_parallel_worker, config, workers=workers, cpus_per_worker=num_cpus,
                              storage_path=run_dir, name=name, max_failures=max_failures, use_gpu=bool(num_gpus))
        except TaskFailedError:
            _raise_recorded(config["error"], name)  # (with no retry left, Ray Train ends the run with it)
            raise
        _raise_recorded(config["error"], name)
        if not storage.exists(result_at):  # Ray Train returns without an error when its run is aborted
            raise TaskFailedError(f"{name}: its data-parallel training ended without a result (aborted); run the "
                                  "stage again to go on from its newest checkpoint")
        return json.loads(storage.read_text(result_at))
    finally:
        for record in (result_at, config["error"]):
            with contextlib.suppress(StageError):  # (clutter at worst: the names are this call's own)
                storage.remove(record)


def _raise_recorded(error_at: str, name: str) -> None:
    """The error a worker recorded at `error_at`, raised here, if any."""
    if storage.exists(error_at):
        error = json.loads(storage.read_text(error_at))
        raise TaskFailedError(f"{name}: data-parallel training failed on worker {error['rank']}: {error['type']}: "
                              f"{error['message']}")


def _parallel_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if storage.exists(config["error"]):
        return  # an earlier attempt met an error that this one would meet again: the driver raises it
    with tempfile.TemporaryDirectory(prefix="moie-dp-") as scratch:
        try:
            use_granted_cpus(config["num_cpus"], config["seed"])
            device = torch.device("cpu")
            if config["use_gpu"]:
                granted_device(1)  # one line if torch cannot see the GPU Ray granted (a CPU build of torch)
                device = ray.train.torch.get_device()  # this worker's GPU (its local rank's)
            result = config["work"](config["args"], Path(scratch), rank, world, device)
        except PERMANENT as err:  # not a lost worker: recorded, so that no retry meets it again
            write_json(Path(scratch) / "error.json", {"rank": rank, "type": type(err).__name__,
                                                      "message": one_line(err)})
            storage.upload(Path(scratch) / "error.json", config["error"])
            raise
        if rank == 0:
            write_json(Path(scratch) / "result.json", result)
            storage.upload(Path(scratch) / "result.json", config["result"])


def train_model_parallel(config: dict, *, workers: int, cpus_per_worker: float, name: str,
                         max_failures: int = 3) -> dict:
    """Train config's model on `workers` workers (see `train_work`); worker 0's result."""
    return parallel_task(train_work, config, workers=workers, num_cpus=cpus_per_worker, seed=config["seed"],
                         num_gpus=1 if config.get("use_gpu") else 0, run_dir=storage.join(config["out"], "ray-train"),
                         name=name, max_failures=max_failures)


def train_work(config: dict, scratch: Path, rank: int, world: int, device) -> dict | None:
    """On every worker. config: model (model config dict), train_config (TrainConfig fields), train
    and val (token files in the storage; val may be None), ckpt_dir and out (locations in the
    storage: worker 0 writes the model to <out>/model); kill_after_checkpoint (tests only: a local
    directory; worker 0 kills worker 1 once, after the first checkpoint, as a lost node would);
    attempts (tests only: a local directory where each worker notes each time it starts)."""
    from experts.checkpoint import build_model, save_model
    from experts.trainer import TrainConfig, train

    cfg = TrainConfig(**config["train_config"])
    checkpoints = storage.CheckpointMirror(config["ckpt_dir"], scratch, keep=cfg.keep_checkpoints)
    if config.get("attempts"):  # tests only: a local directory where each worker notes each attempt
        Path(config["attempts"]).mkdir(parents=True, exist_ok=True)
        (Path(config["attempts"]) / f"{rank}-{uuid.uuid4().hex}").touch()
    model = build_model(config["model"]).to(device)
    tokens = load_tokens(config["train"], scratch)
    val = load_tokens(config["val"], scratch) if config.get("val") else None
    on_checkpoint = checkpoints.push
    if config.get("kill_after_checkpoint"):
        on_checkpoint = _killing_after_first(on_checkpoint, Path(config["kill_after_checkpoint"]), rank)
    result = train(model, tokens, val, cfg, ckpt_dir=checkpoints.dir, on_checkpoint=on_checkpoint,
                   meta={"tokenizer": config.get("tokenizer")})
    if rank:
        return None
    save_model(scratch / "model", model, {"tokenizer": config.get("tokenizer")})
    storage.upload(scratch / "model", storage.join(config["out"], "model"))
    return {**asdict(result), "workers": world}


def _killing_after_first(push, folder: Path, rank: int):
    """Tests only: every worker records its pid in `folder`; worker 0, after pushing its first
    checkpoint, kills worker 1 with SIGKILL (once: a marker file says it was done)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{rank}.pid").write_text(str(os.getpid()))

    def push_then_kill(json_path: Path) -> None:
        push(json_path)
        marker = folder / "killed"
        if rank == 0 and not marker.exists():
            marker.write_text(json_path.name)
            os.kill(int((folder / "1.pid").read_text()), signal.SIGKILL)

    return push_then_kill
