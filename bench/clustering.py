"""Clustering benchmark: fit and assignment throughput, peak memory, quality and balance,
on the embedded corpus and on a 10x synthetic corpus grown from it; plus the wall time of
the whole cluster stage (local Ray + MLflow) on the default config.

    python bench/clustering.py            # all of it (~2-3 minutes on 2 cores)
    python bench/clustering.py --no-stage # skip the end-to-end stage timing

Each scenario runs in its own process so that its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def grow(docs, factor: int, seed: int = 0):
    """factor noisy copies of every document: words shuffled within windows of 20, 10% dropped."""
    from pipeline.text.corpus import Document

    rng = random.Random(seed)
    out = []
    for copy in range(factor):
        for d in docs:
            words = d.text.split()
            kept = []
            for start in range(0, len(words), 20):
                window = [w for w in words[start:start + 20] if rng.random() > 0.1]
                rng.shuffle(window)
                kept.extend(window)
            out.append(Document(f"{d.doc_id}~{copy}", " ".join(kept), d.source, d.work, d.split))
    return out


def scenario(name: str, factor: int) -> dict:
    import numpy as np

    import pipeline  # noqa: F401
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus
    from routing.metrics import clustering_scores
    from routing.router import ClusterRouter

    cfg = load_config(REPO / "configs" / "default.yaml")
    c = cfg.cluster
    docs = load_corpus(cfg.corpus)
    if factor > 1:
        docs = grow(docs, factor)
    train = [d for d in docs if d.split == "train"]
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(train), size=min(c.fit_sample, len(train)), replace=False))
    texts = [train[i].text for i in sample]
    t0 = time.perf_counter()
    router = ClusterRouter.fit(texts, c.k, max_features=c.max_features, min_df=c.min_df, svd_dim=c.svd_dim,
                               iterations=c.iterations, temperature=c.temperature, seed=cfg.seed)
    t1 = time.perf_counter()
    clusters = router.assign([d.text for d in docs])
    t2 = time.perf_counter()
    sizes = np.bincount(clusters, minlength=c.k)
    scores = clustering_scores([d.source for d in docs], clusters, c.k)
    return {"corpus": name, "documents": len(docs), "megabytes": sum(len(d.text) for d in docs) / 1e6,
            "fit_documents": len(texts), "fit_s": t1 - t0, "fit_docs_per_s": len(texts) / (t1 - t0),
            "assign_s": t2 - t1, "assign_docs_per_s": len(docs) / (t2 - t1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "max_cluster_ratio": float(sizes.max() / sizes.mean()), **scores}


def stage_wall_time() -> dict:
    """The whole cluster stage as `moie cluster` runs it: MLflow, a local Ray, artifacts."""
    with tempfile.TemporaryDirectory(prefix="moie-bench-") as home:
        env = dict(os.environ, MOIE_HOME=home)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("RAY_ADDRESS", None)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "jobs.cluster", "--config", "configs/default.yaml"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"cluster stage failed:\n{proc.stderr[-3000:]}")
    return {"stage_wall_s": wall}


def run_child(name: str, factor: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", name, str(factor)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("NAME", "FACTOR"), help=argparse.SUPPRESS)
    parser.add_argument("--no-stage", action="store_true", help="skip the end-to-end stage timing")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scenario(args.child[0], int(args.child[1]))))
        return
    rows = [run_child("embedded", 1), run_child("synthetic-10x", 10)]
    cols = ["corpus", "documents", "megabytes", "fit_documents", "fit_s", "fit_docs_per_s", "assign_s",
            "assign_docs_per_s", "peak_rss_mb", "purity", "nmi", "ari", "max_cluster_ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    base, big = rows
    print(f"\nscaling 1x -> 10x: documents x{big['documents'] / base['documents']:.1f}, "
          f"fit time x{big['fit_s'] / base['fit_s']:.1f}, assign time x{big['assign_s'] / base['assign_s']:.1f}, "
          f"peak RSS x{big['peak_rss_mb'] / base['peak_rss_mb']:.2f}")
    ok_purity = base["purity"] >= 0.85
    ok_balance = base["max_cluster_ratio"] <= 1.5
    print(f"targets on the embedded corpus (k=6): purity {base['purity']:.3f} >= 0.85: {ok_purity}; "
          f"largest cluster {base['max_cluster_ratio']:.2f} x mean <= 1.5: {ok_balance}")
    if not args.no_stage:
        t = stage_wall_time()["stage_wall_s"]
        print(f"whole cluster stage (python -m jobs.cluster --config configs/default.yaml, local Ray + MLflow, "
              f"corpus cached): {t:.1f} s; under 60 s: {t < 60}")


if __name__ == "__main__":
    main()
