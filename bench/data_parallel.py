"""Data-parallel training of the default expert on Ray Train: 2 workers of one CPU each against
1 worker of one CPU, with the same global batch, side by side in one run.

    python bench/data_parallel.py                 # 200 steps each (~4 minutes on 2 cores)
    python bench/data_parallel.py --steps 100 --compile

Each run trains the default config's hourglass (batch 4 x 256 byte tokens, bf16 autocast where
the CPU has bf16 units) on the embedded corpus's dense token stream through
`pipeline.stages.parallel.train_model_parallel`, the loop the dense model uses. Prints each
run's steady tokens/s (worker 0's, over the last 100 steps), its wall time (Ray Train's start
included), the final training loss, and the speed-up of 2 workers over 1. For reference it also
trains one worker with two CPU threads.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    args = parser.parse_args()
    import numpy as np
    import ray

    import pipeline  # noqa: F401
    from experts.tokenizer import EOS_ID, TOKENIZER, VOCAB_SIZE, encode_texts
    from pipeline.config import load_config
    from pipeline.stages.parallel import train_model_parallel
    from pipeline.text.corpus import load_corpus

    cfg = load_config(REPO / "configs" / "default.yaml")
    model = {"arch": cfg.experts.arch, **cfg.experts.model, "vocab_size": VOCAB_SIZE}
    seq = cfg.experts.model["block_size"]
    batch = cfg.experts.train["batch_size"]
    train = {**cfg.experts.train, "max_tokens": args.steps * batch * seq, "eval_every": 0, "ckpt_every": 0,
             "log_every": 100, "compile": args.compile, "seed": 0}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"# bench/data_parallel.py — {cpu_name()}, {args.steps} steps of batch {batch} x {seq}, "
          f"{'compiled' if args.compile else 'eager'}\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="moie-dp-bench-") as tmp:
        tokens = Path(tmp) / "dense.npy"
        docs = load_corpus(cfg.corpus)
        np.save(tokens, encode_texts([d.text for d in docs if d.split == "train"], EOS_ID))
        for label, workers, cpus in (("1 worker, 1 CPU", 1, 1), ("2 workers, 1 CPU each", 2, 1),
                                     ("1 worker, 2 CPUs", 1, 2)):
            out = Path(tmp) / label.replace(" ", "").replace(",", "-")
            config = {"model": model, "train_config": train, "train": str(tokens), "val": None, "seed": 0,
                      "ckpt_dir": str(out / "ckpt"), "out": str(out), "num_cpus": cpus,
                      "tokenizer": TOKENIZER.fingerprint}
            t0 = time.perf_counter()
            result = train_model_parallel(config, workers=workers, cpus_per_worker=cpus, name=label)
            rows.append((label, result["tokens_per_s"], time.perf_counter() - t0, result["train_loss"]))
            print(f"{label}: {result['tokens_per_s']:,.0f} tokens/s", flush=True)
    base = rows[0][1]
    print("\n| run | tokens/s (steady) | × 1 worker | wall s (Ray Train's start included) | final train loss |")
    print("|---|---|---|---|---|")
    for label, rate, wall, loss in rows:
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f} | {wall:.0f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
