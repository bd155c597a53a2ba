"""Quality per CPU-second: validation bits per byte after a fixed wall-clock training budget,
the hourglass expert against a plain nanoGPT-shaped GPT, side by side in one run.

    python bench/quality_per_second.py                       # the final table: 150 s and 600 s
    python bench/quality_per_second.py --set sweep --budgets 150
    python bench/quality_per_second.py --only gpt-d192,hg-default --budgets 60
    python bench/quality_per_second.py --budgets 600 --precision bf16 --compile   # as the pipeline trains its dense model

Every candidate trains in its own process on `--threads` threads (2: the default machine)
for `budget` seconds of training (evaluation not counted), with the learning rate on a
clock: linear warm-up over the first 3 % of the budget, then cosine to 0.1x by its end.
Data: the default config's embedded corpus, training split; score: bits per byte of 256 K
tokens of the validation split (whole works never trained on), an equal share from each of
the six domains (before this round: the split's first 256 K tokens, plays and scripture
only), each model in windows of its own context. The test split is never read. The GPT is the usual shape
(pre-norm, GELU MLP, learned positions, AdamW, weight decay on matrices), swept over size,
context, batch and rate so that it is not tuned to lose. Results (one JSON line each)
are appended to `--out`; the table at the end prints each arch's best per budget and the ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HG = {"arch": "hourglass", "n_head": 4, "n_local": 1, "n_global": 1}
GPT = {"arch": "gpt", "n_head": 4}
# name -> (model config, batch size, learning rate)
CANDIDATES = {
    # plain GPTs: the recipe (d 192, 4 layers, context 128, batch 8, lr 3e-3) and neighbours
    "gpt-d128": ({**GPT, "block_size": 128, "n_layer": 4, "n_embd": 128}, 8, 3e-3),
    "gpt-d192": ({**GPT, "block_size": 128, "n_layer": 4, "n_embd": 192}, 8, 3e-3),
    "gpt-d256": ({**GPT, "block_size": 128, "n_layer": 4, "n_embd": 256}, 8, 2e-3),
    "gpt-d192-ctx256": ({**GPT, "block_size": 256, "n_layer": 4, "n_embd": 192}, 4, 3e-3),
    # hourglass experts: the previous default (5.4 M, context 512) and smaller, faster shapes
    "hg-default": ({**HG, "block_size": 512, "group_len": 32, "latents": [16, 4], "widths": [64, 128, 224],
                    "n_latent_layers": 4}, 4, 3e-3),
    "hg-512-small": ({**HG, "block_size": 512, "group_len": 32, "latents": [16, 4], "widths": [64, 128, 192],
                      "n_latent_layers": 2}, 4, 3e-3),
    "hg-512-b8": ({**HG, "block_size": 512, "group_len": 32, "latents": [16, 4], "widths": [64, 128, 192],
                   "n_latent_layers": 2}, 8, 3e-3),
    "hg-256": ({**HG, "block_size": 256, "group_len": 32, "latents": [16, 4], "widths": [64, 128, 192],
                "n_latent_layers": 2}, 8, 3e-3),
    "hg-1024": ({**HG, "block_size": 1024, "group_len": 32, "latents": [16, 4], "widths": [64, 128, 192],
                 "n_latent_layers": 2}, 2, 3e-3),
}
SETS = {"sweep": list(CANDIDATES), "final": ["gpt-d192", "hg-256"]}
WARMUP = 0.03
MIN_LR = 0.1
EVAL_TOKENS = 262_144


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def lr_on_clock(elapsed: float, budget: float, lr: float) -> float:
    """Warm-up over the first WARMUP of the budget, then cosine to MIN_LR x lr at its end."""
    progress = elapsed / budget
    if progress < WARMUP:
        return lr * max(progress / WARMUP, 0.01)
    decay = min(1.0, (progress - WARMUP) / (1 - WARMUP))
    return lr * (MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * decay)))


def corpus_tokens():
    import numpy as np

    import pipeline  # noqa: F401  (offline defaults)
    from experts.tokenizer import EOS_ID, encode_texts
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus

    docs = load_corpus(load_config(REPO / "configs" / "default.yaml").corpus)
    train = encode_texts([d.text for d in docs if d.split == "train"], EOS_ID)
    return np.asarray(train), validation_tokens(docs, EOS_ID)


def validation_tokens(docs, eos: int):
    """EVAL_TOKENS + 1 validation tokens, an equal share from each domain (its documents in
    corpus order): the corpus-ordered prefix of the split would be one or two domains."""
    import numpy as np

    from experts.tokenizer import encode_texts

    domains = sorted({d.source or "unlabelled" for d in docs if d.split == "validation"})
    share = -(-(EVAL_TOKENS + 1) // len(domains))
    parts = []
    for domain in domains:
        tokens = encode_texts([d.text for d in docs if d.split == "validation" and (d.source or "unlabelled") == domain],
                              eos)
        if len(tokens) < share:
            raise SystemExit(f"domain {domain} has {len(tokens)} validation tokens, fewer than its share {share} "
                             f"of EVAL_TOKENS = {EVAL_TOKENS}; lower EVAL_TOKENS")
        parts.append(np.asarray(tokens[:share]))
    return np.concatenate(parts)[:EVAL_TOKENS + 1]


def train_for(name: str, budget: float, threads: int, precision: str, compiled: bool = False) -> dict:
    """Train one candidate for `budget` seconds; its validation bits per byte and throughput.
    compiled: the training forward under torch.compile, its compile time spent from the budget."""
    import torch

    from experts.checkpoint import build_model
    from experts.trainer import TrainConfig, autocast_context, bits_per_byte, configure_optimizer, sample_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg, batch, lr = CANDIDATES[name]
    model = build_model({**model_cfg, "vocab_size": 259})
    seq = model.config.block_size
    train_tokens, val_tokens = corpus_tokens()
    optimizer = configure_optimizer(model, TrainConfig(lr=lr))
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    steps, elapsed = 0, 0.0
    model.train()
    forward = torch.compile(model) if compiled else model
    while elapsed < budget:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_on_clock(elapsed, budget, lr)
        if hasattr(model, "latent_loss_scale"):
            model.latent_loss_scale = 1.0
        x, y = sample_batch(train_tokens, batch, seq, generator, device)
        with autocast_context(device, precision):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        elapsed += time.perf_counter() - t0
    val = bits_per_byte(model, val_tokens, seq, EVAL_TOKENS, precision=precision)
    return {"name": name, "arch": model_cfg["arch"], "budget_s": budget, "threads": threads, "precision": precision,
            "compiled": compiled,
            "params": sum(p.numel() for p in model.parameters()), "context": seq, "batch": batch, "lr": lr,
            "steps": steps, "tokens": steps * batch * seq, "tokens_per_s": steps * batch * seq / elapsed,
            "val_bpb": val, "final_loss": float(loss), "cpu": cpu_name()}


def table(results: list[dict]) -> str:
    lines = ["| candidate | arch | params | context | batch | lr | budget s | steps | tokens/s | val bpb |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["budget_s"], r["arch"], r["val_bpb"])):
        lines.append(f"| {r['name']} | {r['arch']} | {r['params'] / 1e6:.2f} M | {r['context']} | {r['batch']} | "
                     f"{r['lr']:g} | {r['budget_s']:g} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['val_bpb']:.3f} |")
    for budget in sorted({r["budget_s"] for r in results}):
        best = {arch: min((r for r in results if r["budget_s"] == budget and r["arch"] == arch),
                          key=lambda r: r["val_bpb"], default=None) for arch in ("gpt", "hourglass")}
        if all(best.values()):
            h, g = best["hourglass"], best["gpt"]
            lines.append(f"\nbudget {budget:g} s: best hourglass {h['name']} {h['val_bpb']:.3f} vs best GPT "
                         f"{g['name']} {g['val_bpb']:.3f}: ratio {h['val_bpb'] / g['val_bpb']:.3f} (target <= 0.95)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="150,600", help="training seconds per candidate, comma-separated")
    parser.add_argument("--set", default="final", choices=sorted(SETS), help="which candidates")
    parser.add_argument("--only", default=None, help="comma-separated candidate names instead of --set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 only where the CPU has bf16 units (AMX / AVX-512 BF16); emulated bf16 is ~30x slower")
    parser.add_argument("--compile", action="store_true",
                        help="train under torch.compile (its compile time counts against the budget)")
    parser.add_argument("--out", default="bench/quality_per_second.jsonl", help="append each result here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: NAME:BUDGET in this process
    args = parser.parse_args()
    if args.one:
        name, budget = args.one.rsplit(":", 1)
        print(json.dumps(train_for(name, float(budget), args.threads, args.precision, args.compile)), flush=True)
        return
    names = args.only.split(",") if args.only else SETS[args.set]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; expected some of {', '.join(CANDIDATES)}")
    results = []
    print(f"{cpu_name()}, {args.threads} threads, {args.precision}{', compiled' if args.compile else ''}", flush=True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", f"{name}:{budget}", "--threads", str(args.threads),
                                  "--precision", args.precision, *(["--compile"] if args.compile else [])],
                                 capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                raise SystemExit(f"{name} at {budget:g} s failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{name:>16} {budget:>5g} s: {result['steps']:>5} steps, {result['tokens_per_s']:>8,.0f} tok/s, "
                  f"val bpb {result['val_bpb']:.3f}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
