"""Wall-clock saved by composing early: `moie run`'s independent composition starting each
expert's blocks and gates as soon as that expert (and the central model) is registered,
against the same pipeline composing only after the experts stage (`compose.early=false`).

    python bench/early_composition.py [--config configs/default.yaml] [--home /tmp/moie-early]
                                      [--set KEY=VALUE ...]

Both variants run one after the other in this one invocation, each in its own process, its
own MLflow store and its own local Ray: cluster -> experts -> compose (evaluate is the same
for both and is left out). Prints, from the runs' MLflow timestamps, seconds from the
pipeline's start to: the last expert registered, the independent composition registered,
the end of the compose stage; and what early composition saves on each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_per_second import cpu_name  # noqa: E402  (bench/ is on the path: this script's folder)


def variant(config: str, overrides: list[str]) -> dict:
    """In a child process: cluster, experts (watched), compose; the timeline from MLflow."""
    from pipeline.config import load_config
    from pipeline.stages.cluster import run_cluster
    from pipeline.stages.compose import run_compose
    from pipeline.stages.experts import run_experts
    from pipeline.stages.sequence import EarlyIndependent
    from pipeline.store.catalog import Catalog
    from pipeline.store.names import Tag

    cfg = load_config(REPO / config, overrides)
    pipeline_id = run_cluster(cfg)
    catalog = Catalog(cfg)
    early = EarlyIndependent(cfg, catalog, pipeline_id) if cfg.compose.early else None
    try:
        run_experts(cfg, pipeline_id, watcher=early)
        run_compose(cfg, pipeline_id, early=early)
    finally:
        if early is not None:
            early.cancel()
    tracker = catalog.tracker
    start = tracker.pipeline_run(pipeline_id).info.start_time
    experts = tracker.stage_runs(pipeline_id, "experts")
    compose = tracker.stage_runs(pipeline_id, "compose")
    by_mode = {r.data.tags.get(Tag.MODE): r for r in compose}
    return {"pipeline": pipeline_id, "early": cfg.compose.early,
            "experts_done_s": (max(r.info.end_time for r in experts) - start) / 1e3,
            "independent_done_s": (by_mode["independent"].info.end_time - start) / 1e3,
            "compose_done_s": (max(r.info.end_time for r in compose) - start) / 1e3,
            "independent_val_bpb": by_mode["independent"].data.metrics["val_bpb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--home", default="/tmp/moie-early")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--variants", default="early,after", help="early, after, or both (default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(variant(args.config, args.overrides)))
        return
    results = {}
    for early in [v == "early" for v in args.variants.split(",")]:
        home = Path(args.home) / ("early" if early else "after")
        env = {**os.environ, "MOIE_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", "--config", args.config, "--set",
                               *args.overrides, f"compose.early={str(early).lower()}"],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"early={early} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[early] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - began}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; config {args.config} {' '.join(args.overrides)}")
    if len(results) == 1:
        print(json.dumps(next(iter(results.values())), indent=1))
        return
    print(f"{'seconds from the pipeline start to':40} {'early':>9} {'after':>9} {'saved':>9}")
    for key, label in (("experts_done_s", "the last expert registered"),
                       ("independent_done_s", "the independent composition registered"),
                       ("compose_done_s", "the end of the compose stage")):
        a, b = results[True][key], results[False][key]
        print(f"{label:40} {a:9.1f} {b:9.1f} {b - a:9.1f}")
    print(f"independent composition's validation bits per byte: early {results[True]['independent_val_bpb']:.4f}, "
          f"after {results[False]['independent_val_bpb']:.4f}")


if __name__ == "__main__":
    main()
