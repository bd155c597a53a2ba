"""The default pipeline with several seeds: how much of a difference is the seed's alone?

    python bench/seeds.py [--seeds 0,1,2] [--config configs/default.yaml] [--home /tmp/moie-seeds]
                          [--out bench/seeds.jsonl] [--set KEY=VALUE ...]

Each seed is one `moie run` (seed: the data order, every initialisation, the batches); all
of them land in one MLflow store (--home), so `mlflow ui` shows them side by side. A seed
already in --out is not run again (delete its line to rerun it). Prints, per seed, the
held-out bits per byte of the main systems, gate-only routing accuracy, each claimed
difference with its paired bootstrap interval, and the wall time; then the spread over
seeds (mean, sample standard deviation, min, max) of every figure. Test-split figures:
they are reported, never used to choose anything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_per_second import cpu_name  # noqa: E402  (bench/ is on the path: this script's folder)

SYSTEMS = ("dense", "dense_matched", "seed", "cbtm_top1", "oracle", "composed_independent", "composed_independent_topk",
           "composed_independent_kway",
           "composed_joint", "composed_adaptive", "composed_seed_independent", "mixture_central", "mixture_seed")
ROUTED = ("cbtm_top1", "composed_independent", "composed_independent_topk", "composed_independent_kway",
          "composed_adaptive", "composed_joint")
CLAIMS = [(s, b) for s in ("cbtm_top1", "composed_independent", "composed_joint") for b in ("dense", "dense_matched")]


def run_seed(seed: int, config: str, home: Path, overrides: list[str]) -> dict:
    """One `moie run`; the evaluate run's figures of the pipeline it made."""
    env = {**os.environ, "MOIE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", config, "--set", f"seed={seed}",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"seed {seed}: moie run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    pipeline_id = proc.stdout.strip().splitlines()[-1].strip()
    return {"seed": seed, "pipeline": pipeline_id, "seconds": seconds, **evaluate_metrics(home, config, pipeline_id)}


def evaluate_metrics(home: Path, config: str, pipeline_id: str) -> dict:
    os.environ["MOIE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pipeline.config import load_config
    from pipeline.store.tracking import Tracker

    run = Tracker(load_config(REPO / config)).stage_runs(pipeline_id, "evaluate")[0]  # the newest
    m = run.data.metrics
    out = {f"bpb/{s}": m[f"bpb/{s}/all"] for s in SYSTEMS if f"bpb/{s}/all" in m}
    out |= {f"routing_accuracy/{s}": m[f"routing_accuracy/{s}"] for s in ROUTED if f"routing_accuracy/{s}" in m}
    for s, b in CLAIMS:
        key = f"delta/{s}_vs_{b}"
        if f"{key}/mean" in m:
            out |= {f"{key}/{k}": m[f"{key}/{k}"] for k in ("mean", "ci_low", "ci_high")}
    out |= {f"macro/{s}": m[f"bpb/{s}/macro"] for s in SYSTEMS if f"bpb/{s}/macro" in m}
    out |= {k: v for k, v in m.items() if k.startswith(("equal_compute/", "capture/", "mixture_lambda/"))
            and not k.endswith("dense_pflops")}
    out |= {k: v for k, v in m.items() if k.startswith(("train_pflops/", "heldout_overlap/"))}
    return out


def spread(rows: list[dict]) -> dict[str, dict[str, float]]:
    keys = [k for k in rows[0] if k not in ("seed", "pipeline", "cpu") and all(k in r for r in rows)]
    return {k: {"mean": statistics.fmean(r[k] for r in rows),
                "sd": statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0,
                "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)} for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--home", default="/tmp/moie-seeds", help="MOIE_HOME of the runs (one MLflow store)")
    parser.add_argument("--out", default=str(REPO / "bench" / "seeds.jsonl"))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reread", action="store_true",
                        help="read each seed's figures again from its pipeline's newest evaluate run (after "
                             "`moie compose` / `moie evaluate` ran again on it), keeping its wall time")
    args = parser.parse_args()
    out = Path(args.out)
    done = {r["seed"]: r for r in map(json.loads, out.read_text().splitlines())} if out.is_file() else {}
    if args.reread:
        done = {seed: {"seed": seed, "pipeline": r["pipeline"], **({"seconds": r["seconds"]} if "seconds" in r else {}),
                       "cpu": r.get("cpu"),
                       **evaluate_metrics(Path(args.home), args.config, r["pipeline"])} for seed, r in done.items()}
        out.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; config {args.config}", flush=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        if seed not in done:
            print(f"seed {seed}: moie run ...", flush=True)
            done[seed] = {**run_seed(seed, args.config, Path(args.home), args.overrides), "cpu": cpu}
            with open(out, "a") as f:
                f.write(json.dumps(done[seed]) + "\n")
        row = done[seed]
        rows.append(row)
        took = f"{row['seconds']:.0f} s" if "seconds" in row else "composed again, no run time"
        print(f"seed {seed} ({took}, pipeline {row['pipeline']}): "
              + ", ".join(f"{s} {row[f'bpb/{s}']:.4f}" for s in SYSTEMS if f"bpb/{s}" in row), flush=True)
    print("\nspread over seeds " + ",".join(str(r["seed"]) for r in rows) + f" ({rows[0].get('cpu', cpu)})")
    print("| figure | mean | sd | min | max |\n|---|---|---|---|---|")
    for key, s in spread(rows).items():
        if not key.startswith(("train_pflops/", "heldout_overlap/", "capture/")):
            print(f"| {key} | {s['mean']:.4f} | {s['sd']:.4f} | {s['min']:.4f} | {s['max']:.4f} |")
    print("\nclaims per seed (difference in bpb, paired bootstrap 95% interval over documents; holds: below zero)")
    for s, b in CLAIMS:
        cells = []
        for r in rows:
            key = f"delta/{s}_vs_{b}"
            if f"{key}/mean" in r:
                holds = "holds" if r[f"{key}/ci_high"] < 0 else "no"
                cells.append(f"{r[f'{key}/mean']:+.4f} [{r[f'{key}/ci_low']:+.4f}, {r[f'{key}/ci_high']:+.4f}] {holds}")
        print(f"{s} vs {b}: " + "; ".join(cells))
    print("\nagainst the dense model at the system's own training compute (equal_compute; holds: below zero)")
    for s in SYSTEMS:
        cells = [f"{r[f'equal_compute/{s}/mean']:+.4f} [{r[f'equal_compute/{s}/ci_low']:+.4f}, "
                 f"{r[f'equal_compute/{s}/ci_high']:+.4f}]" for r in rows if f"equal_compute/{s}/mean" in r]
        if cells:
            print(f"{s}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
