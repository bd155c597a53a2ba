"""Each hourglass research option against the default expert at equal CPU time: validation bits per byte.

    python bench/hourglass_options.py                      # all 9 variants, seed 0, 90 CPU-s of training each
    python bench/hourglass_options.py --seed 1 --out bench/hourglass_options.seed1.jsonl   # a replicate
    python bench/hourglass_options.py --summarize bench/hourglass_options.jsonl bench/hourglass_options.seed*.jsonl
    python bench/hourglass_options.py --budget 30 --only "mlp=swiglu,denseformer"

Multi-channel latent layers (channels 2 and 4, with a shared MLP part, with shared k, v) were measured
here too (rows in bench/hourglass_options*.jsonl): worse in every seed, channels=2 by +0.026 bpb
[+0.025, +0.027] over seeds 0-2, so the option was removed; its variants are gone from this list.

The baseline is `experts.model` of configs/default.yaml (3.4 M parameters, context 256) with every
option off; each variant turns one option of experts/hourglass.py on. All train in one process on
one thread (`torch.set_num_threads(1)`), interleaved: the next step always goes to the variant that
has spent the least CPU time so far, so other jobs on the machine slow all of them alike. Each
variant's compute is the CPU time of its own training steps (`time.thread_time()` around each step:
batch, forward, backward, clipping, AdamW; measured equal to the process's CPU time, so no step
work runs on other threads); it stops once that reaches `--budget` seconds. Same recipe for all:
the default config's batch, lr, AdamW and seed, one data order, the trainer's warm-up + cosine
(`experts.trainer.lr_at`) on the CPU-time clock (warm-up over the share of the budget the
default expert run spends warming up), bf16 autocast where the CPU has bf16 units.
`interleave` alters nothing at the default's one local and one global layer a level, so it runs
there as an A/A control (an identical model whose run differs from the baseline's only through
timing) and is measured again, against a baseline of its own, with two local and two global
layers a level.

Data: the default config's embedded corpus, training split. Score: bits per byte of validation
documents, the same number of bytes of every domain (evaluate.max_bytes_per_domain, or what the
smallest domain holds once near-duplicates of training text are dropped as the evaluate stage
drops them: 46,440 bytes), whole documents in doc-id order with the last one cut, scored byte by
byte in overlapping windows (composition.evaluation.score_documents). Each run's difference to
its baseline carries a paired bootstrap 95 % interval over documents (composition.intervals).
The test split is never read. Seeds are fixed: the same command gives the same figures up to the
step counts, which follow the timing. Rows go to `--out` (JSON lines: a header, then one row per
variant with per-domain and per-document bits per byte). The default run takes ~25 minutes on 2
idle cores (one used); seeds can run side by side, one process each.

Decide over seeds, not on one run's interval: the document interval leaves out training-run noise,
and at this budget that noise is large. The A/A control, a model identical to the baseline, came
out -0.076, -0.040 and -0.019 bpb at seeds 0, 1, 2, each interval excluding zero, and most options
changed sign between seeds. `--summarize` gives each option's per-seed differences, their mean
and the 95 % t interval over seeds. (The baseline, scheduled first, did 4 to 7 fewer steps than its
identical copy in all three runs: 0.5 to 0.9 % of its compute, small beside that noise.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (offline defaults)
from composition.evaluation import bits_per_byte, score_documents  # noqa: E402
from composition.intervals import paired_bootstrap  # noqa: E402
from experts.hourglass import HourglassConfig, HourglassLM  # noqa: E402
from experts.tokenizer import EOS_ID, VOCAB_SIZE, encode_texts  # noqa: E402
from experts.trainer import (TrainConfig, autocast_context, configure_optimizer,  # noqa: E402
                             lr_at, sample_batch)
from pipeline.config import load_config  # noqa: E402
from pipeline.text.corpus import load_corpus  # noqa: E402
from pipeline.text.overlap import ShingleIndex  # noqa: E402

TWO_BY_TWO = {"n_local": 2, "n_global": 2}
# name -> (options over the default expert, the variant it is compared with)
VARIANTS = {
    "baseline": ({}, None),
    "denseformer": ({"denseformer": True}, "baseline"),
    "latent_loss=0.1": ({"latent_loss": 0.1}, "baseline"),  # HOURGLASS.md: a small weight with warm-up
    "upsample=attn": ({"upsample": "attn"}, "baseline"),
    "compressor=transformer": ({"compressor": "transformer"}, "baseline"),
    "mlp=swiglu": ({"mlp": "swiglu"}, "baseline"),
    "interleave (A/A)": ({"interleave": True}, "baseline"),
    "baseline 2+2": (TWO_BY_TWO, None),
    "interleave 2+2": ({**TWO_BY_TWO, "interleave": True}, "baseline 2+2"),
}
CLOCK_TICKS = 10_000  # the CPU-time clock's resolution for lr_at


@dataclass
class Run:
    """One variant in training: its model, optimizer, data order and CPU time spent."""

    name: str
    model: HourglassLM
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    steps: int = 0
    cpu_s: float = 0.0


def cpu_description() -> str:
    """The CPU's model name and whether it has bf16 units (AMX, AVX-512 BF16)."""
    text = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return f"{name} (amx_bf16: {'yes' if 'amx_bf16' in flags else 'no'}, " \
           f"avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'})"


def validation_documents(cfg, docs) -> tuple[list[str], list[str], list[np.ndarray]]:
    """The same number of validation bytes from every domain (evaluate.max_bytes_per_domain, or what
    the smallest domain holds): whole documents in doc-id order, the last one cut; documents that
    near-duplicate training text dropped as the evaluate stage does. (ids, domains, bytes)"""
    ev = cfg.evaluate
    index = ShingleIndex((d.text.encode("utf-8") for d in docs if d.split == "train"), ev.shingle_words)
    kept: dict[str, list[tuple[str, bytes]]] = {}
    for doc in sorted((d for d in docs if d.split == "validation"), key=lambda d: d.doc_id):
        data = doc.text.encode("utf-8")
        if data and index.covered(data).sum() <= ev.max_overlap * len(data):
            kept.setdefault(doc.source or "unlabelled", []).append((doc.doc_id, data))
    share = min(ev.max_bytes_per_domain, *(sum(len(data) for _, data in held) for held in kept.values()))
    ids, domains, tokens = [], [], []
    for domain, held in sorted(kept.items()):
        left = share
        for doc_id, data in held:
            if left == 0:
                break
            ids.append(doc_id)
            domains.append(domain)
            tokens.append(np.frombuffer(data[:left], dtype=np.uint8))
            left -= len(tokens[-1])
    return ids, domains, tokens


def train_interleaved(runs: list[Run], train_tokens: np.ndarray, recipe: TrainConfig, budget: float,
                      seq: int, precision: str) -> None:
    """Step the run with the least CPU time spent until every run has spent `budget` CPU-seconds."""
    device = torch.device("cpu")
    active, reported = list(runs), 0
    while active:
        run = min(active, key=lambda r: r.cpu_s)  # ties: the earlier variant
        t0 = time.thread_time()
        lr = lr_at(int(CLOCK_TICKS * run.cpu_s / budget), CLOCK_TICKS, recipe)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.model.latent_loss_scale = min(1.0, (run.steps + 1) / max(1, recipe.latent_loss_warmup))
        x, y = sample_batch(train_tokens, recipe.batch_size, seq, run.generator, device)
        with autocast_context(device, precision):
            _, loss = run.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), recipe.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.cpu_s += time.thread_time() - t0
        run.steps += 1
        if run.cpu_s >= budget:
            active.remove(run)
            print(f"  {run.name}: {run.steps} steps in {run.cpu_s:.1f} CPU-s, last loss {loss.item():.3f}", flush=True)
        elif active and (tenth := int(10 * min(r.cpu_s for r in active) / budget)) > reported:
            reported = tenth
            print(f"  {10 * tenth} % of the budget: steps " + ", ".join(f"{r.name} {r.steps}" for r in runs), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=90.0, help="CPU-seconds of training steps per variant")
    parser.add_argument("--only", default=None, help="comma-separated variant names (their baselines are added)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 autocast where the CPU has AMX / AVX-512 BF16 (experts.trainer)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    parser.add_argument("--out", default=str(REPO / "bench" / "hourglass_options.jsonl"), help="JSON lines written here")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="no training: the differences over the runs "
                        "in these files (one seed each) with their interval over seeds")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    names = chosen_variants(args.only)
    began = time.perf_counter()
    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "default.yaml")
    seed = cfg.seed if args.seed is None else args.seed
    docs = load_corpus(cfg.corpus)
    train_tokens = encode_texts([d.text for d in docs if d.split == "train"], EOS_ID)
    ids, domains, val_docs = validation_documents(cfg, docs)
    per_domain = sum(map(len, val_docs)) // len(set(domains))
    base = {**cfg.experts.model, "vocab_size": VOCAB_SIZE}
    seq = base["block_size"]
    expert_recipe = TrainConfig(**{**cfg.experts.train, "seed": seed})
    # the default expert run's warm-up share of its steps, spent here as the same share of the CPU budget
    warmup_share = expert_recipe.warmup_steps / expert_recipe.steps(seq)
    recipe = replace(expert_recipe, warmup_steps=round(warmup_share * CLOCK_TICKS))
    cpu = cpu_description()
    print(f"{cpu}; 1 thread, precision {args.precision}; budget {args.budget:g} CPU-s of training per variant; "
          f"seed {seed}", flush=True)
    print(f"corpus: {len(train_tokens) / 1e6:.1f} M training bytes; validation: {len(val_docs)} documents, "
          f"{per_domain:,} bytes of each of {len(set(domains))} domains", flush=True)

    runs = []
    for name in names:
        torch.manual_seed(seed)  # the same initial weights wherever the shapes agree
        model = HourglassLM(HourglassConfig(**{**base, **VARIANTS[name][0]}))
        runs.append(Run(name, model, configure_optimizer(model, recipe), torch.Generator().manual_seed(seed)))
    train_interleaved(runs, train_tokens, recipe, args.budget, seq, args.precision)
    stride = cfg.evaluate.stride or seq // 2
    scores = {run.name: score_documents(run.model, val_docs, EOS_ID, seq, stride, cfg.evaluate.batch_size,
                                        precision=args.precision).log_probs for run in runs}
    rows = [variant_row(run, scores, domains, seq, recipe.batch_size, cfg.evaluate.bootstrap, seed) for run in runs]
    wall = time.perf_counter() - began
    print(table(rows))
    print(f"\nwall time {wall / 60:.1f} min")
    header = {"kind": "header", "cpu": cpu, "threads": 1, "precision": args.precision, "budget_cpu_s": args.budget,
              "seed": seed, "date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_s": round(wall, 1),
              "baseline": base, "lr": recipe.lr, "batch_size": recipe.batch_size, "warmup_share": warmup_share,
              "validation_bytes_per_domain": per_domain, "validation_doc_ids": ids, "validation_domains": domains,
              "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        for row in [header, *rows]:
            f.write(json.dumps(row) + "\n")


def chosen_variants(only: str | None) -> list[str]:
    """Every variant, or those named in `only` (comma-separated) with the baselines they compare to."""
    if not only:
        return list(VARIANTS)
    wanted = only.split(",")
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {', '.join(VARIANTS)}")
    wanted += [VARIANTS[n][1] for n in wanted if VARIANTS[n][1]]
    return [n for n in VARIANTS if n in wanted]


def variant_row(run: Run, scores: dict, domains: list[str], seq: int, batch: int, resamples: int, seed: int) -> dict:
    """A variant's figures: cost, validation bpb (overall, per domain, per document), the difference to its reference."""
    options, reference = VARIANTS[run.name]
    lp = scores[run.name]
    row = {"kind": "variant", "option": run.name, "options": options, "reference": reference,
           "params": run.model.num_params(), "steps": run.steps, "tokens": run.steps * batch * seq,
           "cpu_s": round(run.cpu_s, 2), "val_bpb": bits_per_byte(lp),
           "val_bpb_per_domain": {d: bits_per_byte([p for p, dd in zip(lp, domains) if dd == d])
                                  for d in sorted(set(domains))},
           "val_bpb_per_document": [round(bits_per_byte([p]), 4) for p in lp]}
    if reference is not None and reference in scores:
        interval = paired_bootstrap(lp, scores[reference], resamples=resamples, seed=seed)
        row.update(delta=interval.mean, ci_low=interval.ci_low, ci_high=interval.ci_high,
                   excludes_zero=interval.excludes_zero(), better=interval.ci_high < 0)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| option | params | steps | tokens | CPU s | val bpb | Δ vs baseline [95 % CI] | excludes 0 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "delta" in r:
            delta = f"{r['delta']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            verdict = ("yes, better" if r["better"] else "yes, worse") if r["excludes_zero"] else "no"
        else:
            delta, verdict = "(reference)", ""
        lines.append(f"| {r['option']} | {r['params'] / 1e6:.2f} M | {r['steps']} | {r['tokens']:,} | {r['cpu_s']:.1f} | "
                     f"{r['val_bpb']:.4f} | {delta} | {verdict} |")
    return "\n".join(lines)


def summarize(paths: list[str]) -> str:
    """Each option's difference to its baseline in runs of several seeds, their mean and the 95 % t interval
    over seeds: training-run noise included, which the document bootstrap of one run leaves out."""
    runs = [[json.loads(line) for line in Path(p).read_text().splitlines()] for p in paths]
    seeds = [rows[0]["seed"] for rows in runs]
    if len(set(seeds)) < 2 or len(set(seeds)) < len(seeds):
        raise SystemExit(f"need runs of at least two distinct seeds, got seeds {seeds} from {paths}")
    budgets = {rows[0]["budget_cpu_s"] for rows in runs}
    deltas: dict[str, list[float]] = {}
    for rows in runs:
        for r in rows[1:]:
            if "delta" in r:
                deltas.setdefault(r["option"], []).append(r["delta"])
    lines = [f"seeds {', '.join(map(str, seeds))}; budget {', '.join(f'{b:g}' for b in budgets)} CPU-s per variant",
             "| option | Δ per seed | mean Δ [95 % CI over seeds] | excludes 0 |", "|---|---|---|---|"]
    for option, ds in deltas.items():
        if len(ds) < 2:
            continue
        mean, half = float(np.mean(ds)), float(stats.t.ppf(0.975, len(ds) - 1) * np.std(ds, ddof=1) / np.sqrt(len(ds)))
        low, high = mean - half, mean + half
        verdict = ("yes, better" if high < 0 else "yes, worse") if high < 0 or low > 0 else "no"
        lines.append(f"| {option} | {' '.join(f'{d:+.4f}' for d in ds)} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] | "
                     f"{verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
