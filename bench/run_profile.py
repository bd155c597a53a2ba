"""Where a pipeline's wall-clock went, stage by stage, from its MLflow runs.

    python bench/run_profile.py --pipeline RUN_ID [--config configs/default.yaml]

Prints each stage's wall time (first child run's start to last child run's end), each
trained model's run time and tokens/s, and the share of the whole spent training models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    args = parser.parse_args()
    import pipeline  # noqa: F401
    from pipeline.config import load_config
    from pipeline.store.catalog import Catalog

    tracker = Catalog(load_config(args.config)).tracker
    parent = tracker.pipeline_run(args.pipeline)
    start, end = parent.info.start_time, parent.info.end_time
    print("| stage | wall s | share |\n|---|---|---|")
    stages = {}
    for stage in ("cluster", "experts", "compose", "evaluate"):
        runs = tracker.stage_runs(args.pipeline, stage, None)
        if runs:
            first, last = min(r.info.start_time for r in runs), max(r.info.end_time or 0 for r in runs)
            stages[stage] = (first, last)
            print(f"| {stage} | {(last - first) / 1e3:.0f} | {(last - first) / (end - start):.0%} |")
    print(f"| whole pipeline (parent run) | {(end - start) / 1e3:.0f} | 100% |")
    print("\n| model | run s | steps | tokens | tokens/s (last) |\n|---|---|---|---|---|")
    for run in sorted(tracker.stage_runs(args.pipeline, "experts", None), key=lambda r: r.info.start_time):
        m = run.data.metrics
        print(f"| {run.info.run_name} | {((run.info.end_time or 0) - run.info.start_time) / 1e3:.0f} | "
              f"{m.get('steps', 0):.0f} | {m.get('tokens', 0):,.0f} | {m.get('tokens_per_s', 0):,.0f} |")


if __name__ == "__main__":
    main()
