"""What a served moie model costs: MLflow pyfunc load time, generation and scoring speed of
a composition beside its own central model, measured side by side in one process.

    MOIE_HOME=~/.moie python bench/serving.py [--model models:/moie-composition@champion]
                                              [--bytes 100] [--repeats 3] [--threads 2]

Needs a finished pipeline in the store (the default `moie run`). Both models are loaded
with `mlflow.pyfunc.load_model`, as `moie serve` loads them; generation is one row of
`--bytes` new bytes (greedy: the same work every repeat), scoring is score mode on a text
of the same corpus. Prints the CPU, each figure and the composition / central ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_per_second import cpu_name  # noqa: E402  (bench/ is on the path: this script's folder)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters.\n") * 4


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(uri: str, n_bytes: int, repeats: int) -> dict:
    import mlflow
    import pandas as pd

    began = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    load = time.perf_counter() - began
    ask = pd.DataFrame({"prompt": ["The ship"], "max_new_tokens": [n_bytes], "temperature": [0.0]})
    generate = timed(lambda: model.predict(ask), repeats)
    score_in = pd.DataFrame({"prompt": [TEXT]})
    score = timed(lambda: model.predict(score_in, params={"score": True}), repeats)
    bpb = float(model.predict(score_in, params={"score": True})["bits_per_byte"][0])
    return {"uri": uri, "load_s": load, "generate_bytes_per_s": n_bytes / generate,
            "score_bytes_per_s": len(TEXT.encode()) / score, "score_bpb": bpb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/moie-composition@champion")
    parser.add_argument("--bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import mlflow
    import torch

    import pipeline  # noqa: F401  (loopback / offline defaults)
    from pipeline.config import load_config
    from pipeline.store.names import Tag
    from pipeline.store.tracking import tracking_uri

    torch.set_num_threads(args.threads)
    store = tracking_uri(load_config(REPO / "configs" / "default.yaml"))
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    client = mlflow.MlflowClient()
    name, _, alias = args.model.removeprefix("models:/").partition("@")
    version = client.get_model_version_by_alias(name, alias) if alias else None
    tags = version.tags if version else client.get_model_version(*args.model.removeprefix("models:/").split("/")).tags
    central = tags[Tag.CENTRAL]
    print(f"CPU: {cpu_name()}, {args.threads} threads; store {store}", flush=True)
    rows = [measure(uri, args.bytes, args.repeats) for uri in (central, args.model)]
    for r in rows:
        print(json.dumps(r), flush=True)
    c, m = rows
    print(f"composition / central: load {m['load_s'] / c['load_s']:.2f}x the time, generation "
          f"{m['generate_bytes_per_s'] / c['generate_bytes_per_s']:.2f}x the speed, scoring "
          f"{m['score_bytes_per_s'] / c['score_bytes_per_s']:.2f}x the speed", flush=True)


if __name__ == "__main__":
    main()
