"""The `device` setting: one clear line where CUDA is asked for and absent; where a GPU is
present (torch.cuda.is_available()), the pipeline trains and scores on it.

The first two tests need a machine without CUDA (every CI machine here); the last two need
one and skip cleanly elsewhere."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def moie(home: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**env, "MOIE_HOME": str(home)})


def runs(home: Path) -> list:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@NO_CUDA
def test_device_cuda_without_a_gpu_is_one_error_line_before_any_work(tmp_path):
    proc = moie(tmp_path / "home", "run", "--config", "configs/tiny.yaml", "--set", "device=cuda")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moie: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "device is 'cuda' but no node of the Ray cluster has a GPU" in errors[0] and "device=auto" in errors[0]
    assert runs(tmp_path / "home") == []  # refused before any run was opened


@NO_CUDA
def test_on_a_ray_node_with_a_gpu_auto_asks_each_task_for_one_and_a_cpu_torch_says_it_cannot_use_it():
    """A Ray node that declares a GPU (as a GPU node with a CPU build of torch would): device
    auto asks each training and scoring task for one GPU, Ray grants it, and the task fails in
    one line naming the cause instead of training on the CPU unnoticed."""
    script = textwrap.dedent(f"""
        import json, os, ray, pipeline
        from pipeline.config import load_config
        from pipeline.ray_runtime import Grant, ResourceError, granted_device, task_gpus
        ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
        cfg = load_config({str(REPO / "configs" / "tiny.yaml")!r})
        asked = {{s: task_gpus(cfg, s) for s in ("experts", "compose", "evaluate", "extend")}}
        grant = Grant.of(cfg, "evaluate")

        def take(grant):
            try:
                grant.take()
            except ResourceError as err:
                return os.environ.get("CUDA_VISIBLE_DEVICES"), str(err)
            return os.environ.get("CUDA_VISIBLE_DEVICES"), None

        visible, error = ray.get(ray.remote(take).options(**grant.options()).remote(grant))
        print(json.dumps({{"asked": asked, "visible": visible, "error": error}}))
        ray.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["asked"] == {"experts": 1.0, "compose": 1.0, "evaluate": 1.0, "extend": 1.0}
    assert out["visible"] == "0"  # Ray granted the task the node's GPU
    assert out["error"] and "\n" not in out["error"] and "num_gpus=1" in out["error"] and "CPU build" in out["error"]


@CUDA
def test_training_on_cuda_follows_the_cpu_loss_curve_within_bf16_noise():
    from experts.checkpoint import build_model
    from experts.tokenizer import VOCAB_SIZE
    from experts.trainer import TrainConfig, train

    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(["the", "sea", "wind", "salt", "bread", "oven", "flour", "sail"], 20_000))
    tokens = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
    spec = {"arch": "hourglass", "block_size": 64, "group_len": 8, "latents": [4], "widths": [32, 64], "n_head": 2,
            "vocab_size": VOCAB_SIZE}
    curves = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model(spec).to(device)
        losses = []
        cfg = TrainConfig(max_tokens=60 * 8 * 64, batch_size=8, lr=3e-3, warmup_steps=5, log_every=10, eval_every=0,
                          precision="fp32" if device == "cpu" else "auto", compile=False)
        train(model, tokens, None, cfg, on_metrics=lambda s, m: losses.append(m["train_loss"]) if "train_loss" in m
              else None)
        curves[device] = np.array(losses)
    assert len(curves["cpu"]) == len(curves["cuda"]) == 6
    assert curves["cuda"][-1] < curves["cuda"][0] - 0.5  # it learned
    assert np.abs(curves["cpu"] - curves["cuda"]).max() < 0.05, curves  # same seed, same batches: bf16 noise only


@CUDA
def test_device_cuda_trains_the_tiny_pipeline_s_models_on_the_gpu_and_completes_it(tmp_path):
    small = ["experts.train.max_tokens=4000", "experts.train.ckpt_every=0",
             "compose.blocks_train={max_tokens: 3000, batch_size: 8}", "compose.gates_train={max_tokens: 1000, batch_size: 8}",
             "compose.joint_train={max_tokens: 3000, batch_size: 8}", "compose.eval_tokens=2048",
             "compose.center_tokens=2048", "evaluate.max_bytes_per_domain=2048"]
    proc = moie(tmp_path / "home", "run", "--config", "configs/tiny.yaml", "--set", "device=cuda", *small)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = [r for r in runs(tmp_path / "home") if "moie.device" in r.data.tags]  # experts, dense, dense_matched
    assert {r.data.tags["moie.expert"] for r in trained} >= {"dense", "dense_matched"}
    assert all(r.data.tags["moie.device"].startswith("cuda (") for r in trained)
    evaluation = [r for r in runs(tmp_path / "home") if r.data.tags.get("moie.stage") == "evaluate"]
    assert evaluation and evaluation[0].info.status == "FINISHED"
