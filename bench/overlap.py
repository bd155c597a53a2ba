"""The near-duplicate control's error and memory: Bloom filters of several sizes against the
exact shingle set, on the default corpus's training split and its held-out documents.

    python bench/overlap.py                  # filters of 1, 4, 16, 64 and 256 MB (~1 minute)
    python bench/overlap.py --mb 8 64

For each: build time, peak memory of the build (tracemalloc: numpy's buffers included), the
false-positive rate the filter reports and the one measured on shingles absent from training,
the held-out bytes it covers against the exact set's, and the held-out documents whose fate
(dropped above evaluate.max_overlap) differs from the exact set's.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def built(make):
    """(object, seconds, peak bytes allocated while making it)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    made = make()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return made, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    args = parser.parse_args()
    import numpy as np

    import pipeline  # noqa: F401
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus
    from pipeline.text.overlap import ShingleFilter, ShingleIndex, shingle_hashes, words

    cfg = load_config(REPO / "configs" / "default.yaml")
    ev = cfg.evaluate
    docs = load_corpus(cfg.corpus)
    train = [d.text.encode("utf-8") for d in docs if d.split == "train"]
    held = [d.text.encode("utf-8") for d in docs if d.split != "train"]  # validation and test
    exact, exact_s, exact_peak = built(lambda: ShingleIndex(train, ev.shingle_words))
    exact_covered = [exact.covered(h) for h in held]
    exact_dropped = [c.sum() > ev.max_overlap * len(c) for c in exact_covered]
    held_bytes = sum(len(h) for h in held)
    absent = np.concatenate([shingle_hashes(words(h)[0], ev.shingle_words) for h in held])
    absent = absent[~exact.contains(absent)]
    train_mb = sum(len(t) for t in train) / 2**20
    print(f"# bench/overlap.py — {platform.processor() or platform.machine()}, the default corpus: "
          f"{train_mb:.1f} MB of training text, {len(exact.hashes):,} distinct {ev.shingle_words}-word shingles; "
          f"{len(held)} held-out documents ({held_bytes / 2**20:.2f} MB), {len(absent):,} of their shingles "
          f"absent from training\n")
    print("| shingles | bits per shingle | build s | build peak MB | false positives reported | measured | "
          "held-out bytes covered | documents dropped | decisions unlike the exact set's |")
    print("|---|---|---|---|---|---|---|---|---|")
    covered = sum(c.sum() for c in exact_covered)
    print(f"| exact set | {exact.hashes.nbytes * 8 / len(exact.hashes):.0f} | {exact_s:.1f} | {exact_peak / 2**20:.0f} | "
          f"0 | 0 | {covered / held_bytes:.5f} | {sum(exact_dropped)} | — |")
    for mb in args.mb:
        shingles, seconds, peak = built(lambda: ShingleFilter(train, ev.shingle_words, bits=mb * 8 << 20))
        cover = [shingles.covered(h) for h in held]
        dropped = [c.sum() > ev.max_overlap * len(c) for c in cover]
        print(f"| filter of {mb} MB | {mb * 8 * 2**20 / len(exact.hashes):.0f} | {seconds:.1f} | {peak / 2**20:.0f} | "
              f"{shingles.false_positive_rate:.2e} | {shingles.contains(absent).mean():.2e} | "
              f"{sum(c.sum() for c in cover) / held_bytes:.5f} | {sum(dropped)} | "
              f"{sum(a != b for a, b in zip(dropped, exact_dropped))} |")


if __name__ == "__main__":
    main()
