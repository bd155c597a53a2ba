"""Does the default expert train the same on a GPU as on the CPU? Trains it for a few hundred
steps on CUDA and on the CPU from the same seed and the same batches, and compares their
loss curves and speed, side by side in one run. Runs only where torch sees a CUDA device;
elsewhere it says so and exits 0.

    python bench/gpu_check.py               # 300 steps each
    python bench/gpu_check.py --steps 600 --tolerance 0.05
    python bench/gpu_check.py --batch-sizes 4 16 64 256   # then CUDA tokens/s by batch size (the README's guide)

Each device trains with the trainer's own precision rule (bf16 autocast where the device has
bf16 units), so the two curves differ by bf16 rounding at most: the check passes (exit 0)
when the mean absolute difference of the logged training losses is below --tolerance, and
fails (exit 1) otherwise.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_on(device: str, tokens, model_cfg: dict, train_cfg: dict) -> tuple[dict[int, float], float]:
    """({step: training loss}, steady tokens/s) of the default expert trained on `device`."""
    import torch

    from experts.checkpoint import build_model
    from experts.trainer import TrainConfig, train

    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    losses, rates = {}, []

    def record(step: int, metrics: dict) -> None:
        if "train_loss" in metrics:
            losses[step] = metrics["train_loss"]
            rates.append(metrics["tokens_per_s"])

    train(model, tokens, None, TrainConfig(**train_cfg), on_metrics=record)
    return losses, sum(rates[len(rates) // 2:]) / max(1, len(rates[len(rates) // 2:]))  # the second half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tolerance", type=float, default=0.05, help="mean |CPU loss - CUDA loss| allowed")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                        help="after the check: CUDA tokens/s of the default expert at each of these batch sizes "
                             "(100 steps each)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"bench/gpu_check.py: no CUDA device here (torch {torch.__version__}, CUDA build: "
              f"{torch.version.cuda or 'none'}): nothing to check")
        return
    import pipeline  # noqa: F401
    from experts.tokenizer import EOS_ID, VOCAB_SIZE, encode_texts
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus

    cfg = load_config(REPO / "configs" / "default.yaml")
    model_cfg = {"arch": cfg.experts.arch, **cfg.experts.model, "vocab_size": VOCAB_SIZE}
    seq = cfg.experts.model["block_size"]
    train_cfg = {**cfg.experts.train, "max_tokens": args.steps * cfg.experts.train["batch_size"] * seq,
                 "eval_every": 0, "ckpt_every": 0, "log_every": 10, "compile": False, "seed": 0}
    tokens = encode_texts([d.text for d in load_corpus(cfg.corpus) if d.split == "train"], EOS_ID)
    print(f"# bench/gpu_check.py — {torch.cuda.get_device_name(0)} beside {platform.processor() or 'the CPU'}, "
          f"{args.steps} steps of batch {cfg.experts.train['batch_size']} x {seq}\n")
    cpu, cpu_rate = train_on("cpu", tokens, model_cfg, train_cfg)
    gpu, gpu_rate = train_on("cuda", tokens, model_cfg, train_cfg)
    print("| step | CPU loss | CUDA loss | difference |\n|---|---|---|---|")
    for step in dict.fromkeys(sorted(cpu)[:: max(1, len(cpu) // 10)] + [max(cpu)]):  # every tenth, and the last
        print(f"| {step} | {cpu[step]:.4f} | {gpu[step]:.4f} | {gpu[step] - cpu[step]:+.4f} |")
    mean_gap = sum(abs(gpu[s] - cpu[s]) for s in cpu) / len(cpu)
    print(f"\ntokens/s: CPU {cpu_rate:,.0f}, CUDA {gpu_rate:,.0f} ({gpu_rate / cpu_rate:.1f}x)")
    print(f"mean |difference| of the training loss: {mean_gap:.4f} (tolerance {args.tolerance})")
    if args.batch_sizes:
        print(f"\n| batch (windows of {seq}) | tokens a step | CUDA tokens/s | vs batch {args.batch_sizes[0]} |\n"
              "|---|---|---|---|")
        first = None
        for batch in args.batch_sizes:
            _, rate = train_on("cuda", tokens, model_cfg, {**train_cfg, "batch_size": batch,
                                                           "max_tokens": 100 * batch * seq})
            first = first or rate
            print(f"| {batch} | {batch * seq:,} | {rate:,.0f} | {rate / first:.1f}x |")
    if mean_gap >= args.tolerance:
        print("FAIL: the CPU and CUDA loss curves differ by more than bf16 rounding explains")
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
