"""How the data stages scale with the corpus — the cluster stage, the experts stage's token
writing and the evaluate stage's held-out documents — in wall time, MB/s per core and peak memory of the whole process tree (driver, Ray's
own processes, workers), at several corpus sizes.

    python bench/scale.py                           # 0.1, 0.5 and 2 GB (~15 minutes on 2 cores)
    python bench/scale.py --sizes 0.1 0.3           # other sizes, in GB
    python bench/scale.py --baseline /tmp/old-tree  # also a checkout of another commit, side by side

The corpus is grown from the embedded default one (`grow`): every work copied as often as
the size needs, each copy's paragraphs perturbed (words rotated, one dropped), so
de-duplication keeps them all and the domains stay what they were. It is written as
jsonl shards of `--shard-mb` and kept under ~/.cache/moie/bench-scale for later runs.

Each run is `moie cluster` (the default config on those files), then the experts stage's
`expert_data` for that clustering (token files of every expert and the dense model, before
any training), then the evaluate stage's `held_out` (the held-out documents, near-duplicates of
the training split dropped; it prints how many it kept and dropped, to compare the checkouts'
choices), each in a process of its own, with its own Ray and MLflow store; a sampler sums the proportional set size (PSS: shared
pages split between the processes that map them) of the process and all its descendants
every 0.2 s: of every page, and of the pages the kernel cannot drop ("held": anonymous and
shared memory, Ray's object store included; not the page cache of files read or
memory-mapped, which PSS counts while they are mapped). "Beyond start-up" subtracts a 1 MB run of the same code (in as many shards as
cores, so that it starts as many workers): its wall time (Ray's and MLflow's start, each
worker's imports) and its peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = Path.home() / ".cache" / "moie" / "bench-scale"
MB = 1 << 20


# --- the corpus --------------------------------------------------------------------------------


def perturbed(text: str, copy: int) -> str:
    """The text with each paragraph's words rotated by a copy-dependent offset and one word dropped:
    a different text for every copy (so de-duplication keeps it), the same words otherwise."""
    paragraphs = []
    for i, para in enumerate(text.split("\n\n")):
        words = para.split(" ")
        if len(words) > 2:
            k = (copy * 7 + i) % len(words)
            words = words[k:] + words[:k]
            del words[copy % len(words)]
        paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs) + f"\n\n[copy {copy}]"  # a paragraph of one word or two differs too


def grow(size_bytes: int, shard_bytes: int) -> Path:
    """A corpus of about `size_bytes` (jsonl shards), grown from the embedded one; cached."""
    import pipeline  # noqa: F401
    from pipeline.config import CorpusConfig
    from pipeline.text.embedded import embedded_corpus_file

    folder = CACHE / f"{size_bytes}-{shard_bytes}"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = CorpusConfig()
    rows = [json.loads(line) for line in embedded_corpus_file(cfg.domain_bytes, cfg.max_chunk_bytes).open()]
    random.Random(0).shuffle(rows)  # every shard holds every domain
    written, shard, copy = 0, 0, 0
    out = None
    while written < size_bytes:
        for row in rows:
            if out is None or out.tell() >= shard_bytes:
                if out:
                    out.close()
                out = open(folder / f"shard-{shard:05d}.jsonl", "w", encoding="utf-8")
                shard += 1
            text = perturbed(row["text"], copy) if copy else row["text"]
            line = json.dumps({"text": text, "source": row["source"], "work": f"{row['work']}~{copy}"}) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            if written >= size_bytes:
                break
        copy += 1
    out.close()
    (folder / "done").write_text(str(written))
    return folder


def text_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.jsonl"))


# --- one run -------------------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) * 1024
    return fields


def process_tree_memory(root) -> dict[str, int]:
    """{role: bytes} of a process and its descendants, by role — driver, ray (Ray's own processes),
    workers — and by kind: PSS of every page, and `held`, PSS of anonymous and shared memory only
    (what the kernel cannot drop: not the page cache of files read or memory-mapped)."""
    import psutil

    memory = {f"{kind}{role}": 0 for kind in ("", "held_") for role in ("driver", "ray", "workers")}
    for proc in [root, *root.children(recursive=True)]:
        try:
            fields = smaps_rollup(proc.pid)
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        role = "driver" if proc.pid == root.pid else "workers" if cmd.startswith("ray::") or "default_worker" in cmd \
            else "ray"
        memory[role] += fields["Pss"]
        memory[f"held_{role}"] += fields["Pss_Anon"] + fields["Pss_Shmem"]
    return memory


TOKENS = """
import sys
import pipeline, ray
from pipeline.config import load_config
from pipeline.stages.experts import expert_data
from pipeline.store.catalog import Catalog
cfg = load_config(sys.argv[1], sys.argv[3:])
catalog = Catalog(cfg)
try:  # the columns the checkout's experts stage reads, as it reads them
    from pipeline.stages.experts import TOKEN_COLUMNS
    run, table, _ = catalog.assignments(sys.argv[2], arrow=True, columns=TOKEN_COLUMNS)
except ImportError:
    try:
        run, table, _ = catalog.assignments(sys.argv[2], arrow=True)
    except TypeError:  # a checkout from before the arrow table (its expert_data takes columns as lists)
        run, table, _ = catalog.assignments(sys.argv[2])
ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
expert_data(cfg, catalog.checkpoint_root(sys.argv[2], run.info.run_id), table, cfg.cluster.k)
"""


HELD = """
import inspect, json, sys
import pipeline, ray
from pipeline.config import load_config
from pipeline.stages import evaluate
from pipeline.stages.evaluate import held_out
from pipeline.store.catalog import Catalog
cfg = load_config(sys.argv[1], sys.argv[3:])
arrow = "arrow=True" in inspect.getsource(evaluate.run_evaluate)  # the table as the checkout's stage reads it
_, table, _ = Catalog(cfg).assignments(sys.argv[2], arrow=arrow)
ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
held = held_out(cfg, None, table)
print(json.dumps({"kept": len(held.tokens), "dropped": sum(held.dropped.values())}))
"""


def overrides(folder: Path) -> list[str]:
    return ["corpus.source=files", f"corpus.files=[{folder}/*.jsonl]", "tracking.experiment=scale"]


def run_stages(tree: Path, folder: Path, home: Path, tokens: bool, held: bool = True) -> dict[str, dict]:
    """`moie cluster` of the default config on the jsonl files of `folder`, from the checkout
    `tree`, then (`tokens`) the experts stage's token writing and (`held`) the evaluate stage's
    held-out documents for that clustering:
    {stage: {wall_s, peak (the tree's PSS), peak_<role>, the stage's timing metrics}}."""
    env = dict(os.environ, MOIE_HOME=str(home), PYTHONPATH=str(tree))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    config = str(tree / "configs" / "default.yaml")
    out, cluster = measured([sys.executable, "-m", "pipeline.cli", "cluster", "--config", config, "--set",
                             *overrides(folder)], tree, env)
    pipeline_id = out.strip().splitlines()[-1]
    results = {"cluster": cluster | stage_metrics(home, pipeline_id)}
    if tokens:
        results["tokens"] = measured([sys.executable, "-c", TOKENS, config, pipeline_id, *overrides(folder)],
                                     tree, env)[1]
    if held:
        out, results["held-out"] = measured([sys.executable, "-c", HELD, config, pipeline_id, *overrides(folder)],
                                            tree, env)
        results["held-out"] |= json.loads(out.strip().splitlines()[-1])
    return results


def measured(cmd: list[str], tree: Path, env: dict) -> tuple[str, dict]:
    """(stdout, {wall_s, peak_tree, peak_<role>}) of a command, its process tree sampled every 0.2 s."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            roles = process_tree_memory(root)
            roles["tree"] = sum(v for k, v in roles.items() if not k.startswith("held_"))
            roles["held_tree"] = sum(v for k, v in roles.items() if k.startswith("held_"))
            for role, value in roles.items():
                peaks[role] = max(peaks.get(role, 0), value)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{err[-3000:]}")
    return out, {"wall_s": wall, **{f"peak_{k}": v for k, v in peaks.items()}}


def stage_metrics(home: Path, pipeline_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("scale").experiment_id,
                                f"tags.`moie.pipeline` = '{pipeline_id}' and tags.`moie.stage` = 'cluster'")
    return {k: v for k, v in run.data.metrics.items() if k.startswith("time_") or k in ("n_documents", "shards")}


# --- the table ------------------------------------------------------------------------------------------


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5, 2.0], help="corpus sizes in GB")
    parser.add_argument("--shard-mb", type=int, default=64, help="size of one jsonl shard")
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit, run beside this one")
    parser.add_argument("--baseline-max-gb", type=float, default=0.5, help="the baseline only up to this size")
    parser.add_argument("--no-tokens", dest="tokens", action="store_false",
                        help="not the experts stage's token writing")
    parser.add_argument("--no-held-out", dest="held", action="store_false",
                        help="not the evaluate stage's held-out documents")
    args = parser.parse_args()

    cores = os.cpu_count()
    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    print(f"# bench/scale.py — {cpu_name()}, {cores} cores, {platform.python_version()}\n", flush=True)
    small = grow(1 * MB, MB // cores)  # as many shards as cores: the workers' own memory is start-up too
    corpora = [(size, grow(int(size * 1024 * MB), args.shard_mb * MB)) for size in args.sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moie-scale-") as tmp:
        for name, tree in trees.items():
            start = run_stages(tree, small, Path(tmp) / f"{name}-start", args.tokens, args.held)
            rows += [(name, stage, small, r, r) for stage, r in start.items()]
            print(f"{name}: 1 MB run " + ", ".join(f"{stage} {r['wall_s']:.1f} s" for stage, r in start.items()),
                  flush=True)
            for size, folder in corpora:
                if name == "baseline" and size > args.baseline_max_gb:
                    continue
                result = run_stages(tree, folder, Path(tmp) / f"{name}-{size}", args.tokens, args.held)
                rows += [(name, stage, folder, r, start[stage]) for stage, r in result.items()]
                print(f"{name}: {size} GB done in " + ", ".join(f"{stage} {r['wall_s']:.0f} s"
                                                              for stage, r in result.items()), flush=True)
    print("\n| code | stage | corpus MB | shards | documents | wall s | beyond start-up s | MB/s per core | "
          "peak tree MB (PSS) | beyond 1 MB run | × corpus | peak held MB | beyond 1 MB run | × corpus | "
          "held: driver / Ray / workers MB | stage timing s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, stage, folder, r, start in rows:
        size = text_bytes(folder)
        beyond_s = r["wall_s"] - start["wall_s"]
        beyond_mem = r["peak_tree"] - start["peak_tree"]
        beyond_held = r["peak_held_tree"] - start["peak_held_tree"]
        rate = f"{size / MB / beyond_s / cores:.1f}" if r is not start and beyond_s > 0 else "—"
        ratio = f"{beyond_mem / size:.2f}" if r is not start else "—"
        held_ratio = f"{beyond_held / size:.2f}" if r is not start else "—"
        timing = ", ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v:.0f}" for k, v in sorted(r.items())
                           if k.startswith("time_") and k.endswith("_s"))
        if "kept" in r:
            timing = f"kept {r['kept']:,}, dropped {r['dropped']:,}"
        print(f"| {name} | {stage} | {size / MB:,.0f} | {r.get('shards', 1):.0f} | {r.get('n_documents', 0):,.0f} | "
              f"{r['wall_s']:.0f} | {beyond_s:.0f} | {rate} | {r['peak_tree'] / MB:,.0f} | {beyond_mem / MB:,.0f} | "
              f"{ratio} | {r['peak_held_tree'] / MB:,.0f} | {beyond_held / MB:,.0f} | {held_ratio} | "
              f"{r['peak_held_driver'] / MB:,.0f} / {r['peak_held_ray'] / MB:,.0f} / {r['peak_held_workers'] / MB:,.0f} | "
              f"{timing or '—'} |")


if __name__ == "__main__":
    main()
