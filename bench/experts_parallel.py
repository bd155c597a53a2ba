"""Parallel efficiency of expert training on Ray, and Ray's overhead over a plain loop.

    python bench/experts_parallel.py [--tokens 300000] [--n 2]

efficiency = wall time of one expert trained alone on one CPU (a Ray task) / wall time of
N equal experts trained concurrently, one CPU each (N Ray tasks). 1.0 is perfect; the
target on this 2-core machine is >= 0.85 with N = 2. Ray overhead = one expert as a Ray
task vs the same training in a plain loop in this process (1 thread).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_one(model_cfg: dict, train_cfg: dict, tokens_path: str) -> float:
    """Train one expert on one thread; return its wall time."""
    import numpy as np
    import torch

    from experts.checkpoint import build_model
    from experts.trainer import TrainConfig, train

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    t0 = time.perf_counter()
    train(model, np.load(tokens_path, mmap_mode="r"), None, TrainConfig(**train_cfg))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens of each expert")
    parser.add_argument("--n", type=int, default=2, help="experts trained concurrently")
    args = parser.parse_args()
    import ray

    import pipeline  # noqa: F401
    import numpy as np

    from experts.tokenizer import EOS_ID, VOCAB_SIZE, encode_texts
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    model_cfg = {"arch": cfg.experts.arch, **cfg.experts.model, "vocab_size": VOCAB_SIZE}
    train_cfg = {**cfg.experts.train, "max_tokens": args.tokens, "eval_every": 0, "ckpt_every": 0}
    with tempfile.TemporaryDirectory() as tmp:
        docs = load_corpus(cfg.corpus)
        path = str(Path(tmp) / "tokens.npy")
        np.save(path, encode_texts([d.text for d in docs], EOS_ID))
        plain = train_one(model_cfg, train_cfg, path)
        ray.init(address="local", num_cpus=args.n, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        task = ray.remote(num_cpus=1)(train_one)
        ray.get(task.remote(model_cfg, {**train_cfg, "max_tokens": 2000}, path))  # start a worker, import torch
        t0 = time.perf_counter()
        ray.get(task.remote(model_cfg, train_cfg, path))
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get([task.remote(model_cfg, train_cfg, path) for _ in range(args.n)])
        together = time.perf_counter() - t0
        ray.shutdown()
    print(f"one expert ({args.tokens:,} tokens, tiny hourglass, 1 thread): plain loop {plain:.1f} s, "
          f"as a Ray task {alone:.1f} s -> Ray overhead {100 * (alone / plain - 1):+.1f}%")
    efficiency = alone / together
    print(f"{args.n} experts concurrently, 1 CPU each: {together:.1f} s -> parallel efficiency "
          f"{efficiency:.2f} (target >= 0.85: {efficiency >= 0.85})")


if __name__ == "__main__":
    main()
