"""Hourglass vs GPT at equal training FLOPs on the embedded corpus: validation bits per byte.

    python bench/expert_quality.py [--flops 3e13] [--threads 2] [--save DIR]

With --save, both trained models are exported to DIR/hourglass and DIR/gpt
(model.safetensors + model.json) for `moie generate --model DIR/hourglass`.

Both models (bench/matched.py, ~5 M parameters, block 512) are trained with the same
recipe for the same FLOP budget: the cheaper model per token sees more tokens. The
validation split is whole works never trained on. Target: hourglass bpb <= GPT bpb.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def corpus_tokens(config: str):
    import pipeline  # noqa: F401
    from experts.tokenizer import EOS_ID, encode_texts
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus

    docs = load_corpus(load_config(REPO / "configs" / config).corpus)
    eos = EOS_ID
    train = encode_texts([d.text for d in docs if d.split == "train"], eos)
    val = encode_texts([d.text for d in docs if d.split == "validation"], eos)
    return train, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=3e13, help="training FLOP budget of each model")
    parser.add_argument("--config", default="default.yaml", help="corpus config in configs/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save", default=None, help="export the trained models under this directory")
    args = parser.parse_args()
    import torch
    from matched import GPT_BASELINE, HOURGLASS

    from experts.flops import train_flops_per_token
    from experts.gpt import GPT
    from experts.hourglass import HourglassLM
    from experts.trainer import TrainConfig, bits_per_byte, train

    torch.set_num_threads(args.threads)
    train_tokens, val_tokens = corpus_tokens(args.config)
    print(f"corpus: {len(train_tokens) / 1e6:.1f} M training bytes, {len(val_tokens) / 1e6:.2f} M validation bytes; "
          f"budget {args.flops:.2g} FLOPs per model")
    recipe = TrainConfig(batch_size=args.batch, lr=args.lr, warmup_steps=30, eval_every=0, log_every=50,
                         eval_tokens=len(val_tokens), seed=0)
    rows = []
    for name, make in (("hourglass", lambda: HourglassLM(HOURGLASS)), ("gpt", lambda: GPT(GPT_BASELINE))):
        torch.manual_seed(0)
        model = make()
        per_token = train_flops_per_token(model)
        cfg = replace(recipe, max_tokens=int(args.flops / per_token))
        t0 = time.perf_counter()
        result = train(model, train_tokens, None, cfg,
                       on_metrics=lambda s, m, n=name: print(f"  {n} step {s}: loss {m['train_loss']:.3f}, "
                                                            f"{m['tokens_per_s']:.0f} tok/s", flush=True))
        wall = time.perf_counter() - t0
        bpb = bits_per_byte(model, val_tokens, model.config.block_size)
        if args.save:
            from experts.checkpoint import save_model
            from experts.tokenizer import TOKENIZER

            save_model(Path(args.save) / name, model, {"tokenizer": TOKENIZER.fingerprint, "val_bpb": bpb})
        rows.append((name, model.num_params() / 1e6, per_token / 1e6, result.tokens, result.steps, wall, bpb))
    print("\n| model | params (M) | train MFLOP/token | tokens | steps | wall s | validation bpb |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]:,} | {r[4]} | {r[5]:.0f} | {r[6]:.3f} |")
    hg, gpt = rows[0][-1], rows[1][-1]
    print(f"\ntarget: hourglass no worse than GPT at equal FLOPs: {hg:.3f} vs {gpt:.3f} bpb ({hg <= gpt})")


if __name__ == "__main__":
    main()
