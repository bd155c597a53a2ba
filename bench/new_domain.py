"""The 5 + 1 setting: a pipeline trained on five domains, then extended with the sixth.

1. The default pipeline without one domain (`corpus.exclude_sources`, default: code; cluster.k 5),
   trained with `moie run` (or --pipeline: one trained before).
2. Unseen: every system of that pipeline scored on the left-out domain's held-out text before it
   is added (`moie evaluate --eval-data`): what each does on text none of it saw.
3. `moie extend` with the left-out domain at several sizes of new training text (default about
   100 KB, 500 KB and all of it, ~2.3 MB: the embedded corpus holds 2.5 MB a domain, a tenth of it
   held out). Every size shares one held-out set: the split is by work, so the same works are
   held out whatever the training text.

Prints the tables and appends one JSON line per measurement to bench/new_domain.jsonl (the CPU
named beside every figure).

    python bench/new_domain.py                      # ~25 min pipeline + ~6 min an extension (2 cores)
    python bench/new_domain.py --pipeline RUN_ID    # reuse a five-domain pipeline
    python bench/new_domain.py --pipeline RUN_ID --skip-unseen --sizes 500000 --set seed=1  # the extension's seed
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (loopback / offline / no-telemetry defaults)
from pipeline.config import load_config  # noqa: E402
from pipeline.text.corpus import split_of  # noqa: E402
from pipeline.text.embedded import embedded_corpus_file  # noqa: E402

UNSEEN = ["dense", "dense_matched", "central", "oracle", "cbtm_top1", "cbtm_top2", "cbtm_all", "composed_independent",
          "composed_independent_topk", "composed_independent_kway", "composed_joint", "mixture_central"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def domain_rows(cfg, domain: str) -> list[dict]:
    """The left-out domain's rows of the embedded corpus (chunks with their work ids)."""
    path = embedded_corpus_file(cfg.corpus.domain_bytes, cfg.corpus.max_chunk_bytes)
    with path.open(encoding="utf-8") as f:  # lines end at "\n" only (texts hold U+2028, which splitlines splits at)
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("source") == domain]


def split(cfg, row: dict) -> str:
    return split_of(row["work"], cfg.corpus.val_fraction, cfg.corpus.test_fraction)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sized_text(cfg, rows: list[dict], train_bytes: int, folder: Path, name: str) -> tuple[Path, int]:
    """A .jsonl of every held-out row of the domain and its training rows, in corpus order, up to
    about `train_bytes` of training text (whole chunks); the path and the training bytes it holds."""
    out, total = [], 0
    for r in rows:
        if split(cfg, r) != "train":
            out.append(r)
        elif total < train_bytes:
            out.append(r)
            total += len(r["text"].encode("utf-8"))
    return write_rows(folder / f"{name}.jsonl", out), total


def record(out: Path, entry: dict) -> None:
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--leave-out", default="code", help="the domain the pipeline never sees, then gets")
    parser.add_argument("--pipeline", default=None, help="a pipeline trained without that domain already")
    parser.add_argument("--sizes", nargs="+", type=int, default=[100_000, 500_000, 2_500_000],
                        help="bytes of new training text of each extension")
    parser.add_argument("--skip-unseen", action="store_true")
    parser.add_argument("--suffix", default="", help="appended to each new domain's name (a repeated measurement)")
    parser.add_argument("--out", default=str(REPO / "bench" / "new_domain.jsonl"))
    args = parser.parse_args()

    from pipeline.stages.evaluate import run_evaluate
    from pipeline.stages.extend import run_extend
    from pipeline.stages.sequence import run_pipeline

    five = [f"corpus.exclude_sources=[{args.leave_out}]", "cluster.k=5", f"name=without-{args.leave_out}",
            *args.overrides]
    cfg = load_config(args.config, five)
    out, cpu = Path(args.out), cpu_name()
    base = {"cpu": cpu, "left_out": args.leave_out, "config": Path(args.config).name, "overrides": args.overrides,
            "seed": cfg.seed}
    pipeline_id = args.pipeline
    if pipeline_id is None:
        start = time.perf_counter()
        pipeline_id = run_pipeline(cfg)
        record(out, {**base, "what": "pipeline", "pipeline": pipeline_id, "seconds": time.perf_counter() - start})
    rows = domain_rows(cfg, args.leave_out)
    with tempfile.TemporaryDirectory(prefix="moie-new-domain-") as tmp:
        tmp = Path(tmp)
        if not args.skip_unseen:  # every system of the five-domain pipeline on the left-out domain's test text
            test = write_rows(tmp / f"{args.leave_out}-test.jsonl", [r for r in rows if split(cfg, r) == "test"])
            m = run_evaluate(cfg, pipeline_id, str(test))["metrics"]
            unseen = {s: m[f"bpb/{s}/all"] for s in UNSEEN if f"bpb/{s}/all" in m}
            equal = {k: v for k, v in m.items() if k.startswith(("equal_compute/", "delta/")) and "/" + args.leave_out
                     not in k}
            record(out, {**base, "what": "unseen", "pipeline": pipeline_id, "bpb": unseen, "intervals": equal,
                         "train_pflops": {s: m.get(f"train_pflops/{s}") for s in UNSEEN}})
            print(unseen_table(unseen, equal), flush=True)
        for size in args.sizes:
            path, train_bytes = sized_text(cfg, rows, size, tmp, f"{args.leave_out}-{size}")
            start = time.perf_counter()
            # a domain name is used once per pipeline
            name = f"{args.leave_out}-{size // 1000}k" + (f"-s{cfg.seed}" if cfg.seed else "") + args.suffix
            outcome = run_extend(cfg, pipeline_id, name, files=[str(path)])
            seconds = time.perf_counter() - start
            record(out, {**base, "what": "extend", "pipeline": pipeline_id, "size": size, "train_bytes": train_bytes,
                         "seconds": seconds, "run": outcome["run_id"], "uris": outcome["uris"],
                         "metrics": outcome["metrics"]})
            print(f"extend with {train_bytes} bytes of {args.leave_out}: {seconds:.0f} s on {cpu}", flush=True)
            print(outcome["markdown"], flush=True)
    return 0


def unseen_table(bpb: dict, intervals: dict) -> str:
    lines = ["| system | bpb on the unseen domain | vs dense at equal compute [95 % CI] |", "|---|---|---|"]
    for s, v in bpb.items():
        key = f"equal_compute/{s}"
        ci = (f"{intervals[key + '/mean']:+.4f} [{intervals[key + '/ci_low']:+.4f}, {intervals[key + '/ci_high']:+.4f}]"
              if key + "/mean" in intervals else "")
        lines.append(f"| {s} | {v:.4f} | {ci} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
