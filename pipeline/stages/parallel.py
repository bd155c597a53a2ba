"""One model trained by several data-parallel workers on Ray Train (`run_data_parallel`):
the loop every worker runs, with its checkpoints in the storage, as an expert's task has.

Every worker reads the same token files, builds the same model and resumes from the same
newest checkpoint; `experts.trainer.train` splits each batch among them and averages the
gradients (gloo on CPU, NCCL on GPU); worker 0 alone validates, checkpoints to the storage
and writes the trained model and its result. When a worker or its node is lost, Ray Train
restarts them all and they go on from the newest checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from dataclasses import asdict
from pathlib import Path

from artifacts import write_json
from pipeline.ray_runtime import run_data_parallel, use_granted_cpus
from pipeline.store import storage


def train_model_parallel(config: dict, *, workers: int, cpus_per_worker: float, name: str,
                         max_failures: int = 3) -> dict:
    """Train config's model on `workers` workers (see `train_loop`); worker 0's result JSON."""
    run_data_parallel(train_loop, config, workers=workers, cpus_per_worker=cpus_per_worker, name=name,
                      storage_path=storage.join(config["out"], "ray-train"), max_failures=max_failures,
                      use_gpu=bool(config.get("use_gpu")))
    return json.loads(storage.read_text(storage.join(config["out"], "result.json")))


def train_loop(config: dict) -> None:
    """On every worker. config: model (model config dict), train_config (TrainConfig fields), train
    and val (token files in the storage; val may be None), ckpt_dir and out (locations in the
    storage), num_cpus (this worker's), seed; kill_after_checkpoint (tests only: a local directory;
    worker 0 kills worker 1 once, after the first checkpoint, as a lost node would)."""
    import ray.train
    import ray.train.torch

    from experts.checkpoint import build_model, save_model
    from experts.trainer import TrainConfig, train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    use_granted_cpus(config["num_cpus"], config["seed"])
    cfg = TrainConfig(**config["train_config"])
    with tempfile.TemporaryDirectory(prefix="moie-dp-") as scratch:
        checkpoints = storage.CheckpointMirror(config["ckpt_dir"], scratch, keep=cfg.keep_checkpoints)
        model = build_model(config["model"])
        if config.get("use_gpu"):  # this worker's GPU (its local rank's), which Ray Train picked
            model.to(ray.train.torch.get_device())
        tokens = storage.load_tokens(config["train"], scratch)
        val = storage.load_tokens(config["val"], scratch) if config.get("val") else None
        on_checkpoint = checkpoints.push
        if config.get("kill_after_checkpoint"):
            on_checkpoint = _killing_after_first(on_checkpoint, Path(config["kill_after_checkpoint"]), rank)
        result = train(model, tokens, val, cfg, ckpt_dir=checkpoints.dir, on_checkpoint=on_checkpoint,
                       meta={"tokenizer": config.get("tokenizer")})
        if rank == 0:
            save_model(Path(scratch) / "model", model, {"tokenizer": config.get("tokenizer")})
            storage.upload(Path(scratch) / "model", storage.join(config["out"], "model"))
            write_json(Path(scratch) / "result.json", {**asdict(result), "workers": world})
            storage.upload(Path(scratch) / "result.json", storage.join(config["out"], "result.json"))


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
