"""Do two stores hold the same run, metric for metric? The check behind a behaviour-preserving change.

    python bench/same_metrics.py STORE_BEFORE STORE_AFTER

Each STORE is a MOIE_HOME (its mlflow.db is read through MLflow). Runs are matched by name within the
experiment the runs share; every metric's full history (step, value) is compared, except timings
(`time_*`, `*tokens_per_s`), and every parameter. Prints the differences and exits 1 if there are any.
"""
import math
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

TIMING = ("time_",)
TIMING_SUFFIX = ("tokens_per_s",)


def is_timing(key: str) -> bool:
    leaf = key.rsplit("/", 1)[-1]
    return leaf.startswith(TIMING) or key.startswith(TIMING) or key.endswith(TIMING_SUFFIX)


def snapshot(home: Path) -> dict[str, dict]:
    """{run name: {"metrics": {key: [(step, value)]}, "params": {...}}} for every run in the store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=10_000):
            name = f"{exp.name}/{run.info.run_name}"
            if name in runs:
                raise SystemExit(f"{home}: two runs named {name}; compare stores holding one pipeline each")
            metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                       for key in run.data.metrics if not is_timing(key)}
            runs[name] = {"metrics": metrics, "params": dict(run.data.params)}
    return runs


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def differences(before: dict, after: dict) -> list[str]:
    out = [f"run only in {side}: {name}" for side, one, other in (("before", before, after), ("after", after, before))
           for name in sorted(set(one) - set(other))]
    for name in sorted(set(before) & set(after)):
        b, a = before[name], after[name]
        for key in sorted(set(b["metrics"]) | set(a["metrics"])):
            hb, ha = b["metrics"].get(key), a["metrics"].get(key)
            if hb is None or ha is None:
                out.append(f"{name}: metric {key} only {'after' if hb is None else 'before'}")
            elif len(hb) != len(ha) or any(sb != sa or not same(vb, va) for (sb, vb), (sa, va) in zip(hb, ha)):
                out.append(f"{name}: {key} before {hb[-3:]} after {ha[-3:]}")
        for key in sorted(set(b["params"]) | set(a["params"])):
            if b["params"].get(key) != a["params"].get(key):
                out.append(f"{name}: param {key} before {b['params'].get(key)!r} after {a['params'].get(key)!r}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    before, after = (snapshot(Path(p)) for p in argv)
    diff = differences(before, after)
    n_values = sum(len(h) for run in before.values() for h in run["metrics"].values())
    for line in diff:
        print(line)
    print(f"{len(before)} runs, {n_values} metric values compared (timings left out): "
          f"{'identical' if not diff else f'{len(diff)} differences'}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
