"""What a served moie model costs: MLflow pyfunc load time, generation and scoring speed of
a composition beside its own central model, measured side by side in one process.

    MOIE_HOME=~/.moie python bench/serving.py [--model models:/moie-composition@champion]
                                              [--bytes 100] [--repeats 3] [--threads 2]

Needs a finished pipeline in the store (the default `moie run`). Both models are loaded
with `mlflow.pyfunc.load_model`, as `moie serve` loads them; generation is one row of
`--bytes` new bytes (greedy: the same work every repeat), scoring is score mode on a text
of the same corpus. Prints the CPU, each figure and the composition / central ratios.

    python bench/serving.py --decode [--bytes 200] [--threads 2]

The decode test needs no pipeline either: the default config's central model and a
composition of six experts in the default compose settings (router routing by a cBTM router
fitted on the embedded corpus, glue "both", output "mix"; untrained weights), greedy
generation from a validation text's first 64 bytes, with the cache (`model.extend`) and
without (the whole window at every step), side by side; the cached and uncached outputs
are compared token for token.

    python bench/serving.py --concurrency [--bytes 100]

Serves the same expert with `moie serve --stream`, batched (the default) and one row at a
time (`--batch-rows 1`), and streams 1, then 4, then 16 requests of `--bytes` bytes at once
from POST /stream, with prompts of one length (rows batch together) and of 16 lengths (they
cannot): total bytes/s beside one client's, time to first byte and latency, p50 / p95.

    python bench/serving.py --forward-thread

Decoding bytes/s of a default-sized expert at batch 1, 4 and 16, run on the main thread or
on another thread (after the main one built the model and ran a forward, as a server loads
it), with 1 and 2 OpenMP threads: why the server runs its forwards on one thread of its own
with 1 OpenMP thread.

    python bench/serving.py --load [--clients 16] [--long-bytes 1024] [--short-bytes 32]

The load test needs no pipeline: it registers one expert of the default config's size
(untrained weights: speed does not depend on them) in a private store, serves it with
`moie serve` at its default limits, and sends mixed requests from `--clients` threads at
once: a quarter send one long request each, the rest send short ones back to back. It prints
p50 / p95 latency of short and long requests, the short ones' latency beside one short
request's on the idle server (the ratio is what taking turns step by step costs them), and
every answer that was not HTTP 200 (a 504 for a short request is a failure of the limits).
"""
from __future__ import annotations

import argparse
import contextlib
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


def post(port: int, max_new_tokens: int, seed: int) -> tuple[int, float]:
    """(HTTP status, seconds) of one generation request."""
    import urllib.error
    import urllib.request

    body = json.dumps({"dataframe_records": [{"prompt": "The ship", "max_new_tokens": max_new_tokens,
                                              "seed": seed}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    return status, time.perf_counter() - began


@contextlib.contextmanager
def served_expert(*flags: str):
    """(port, model config) of `moie serve [flags]` of a default-sized expert (untrained weights:
    speed does not depend on them) registered in a private store; the server stops on exit."""
    import os
    import socket
    import subprocess
    import tempfile
    import urllib.request

    home = Path(tempfile.mkdtemp(prefix="moie-bench-serving-"))
    os.environ["MOIE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from experts.checkpoint import build_model, save_model
    from experts.tokenizer import TOKENIZER
    from pipeline.config import load_config
    from pipeline.serve.serving import log_pyfunc
    from pipeline.store.catalog import Catalog
    from pipeline.store.names import EXPERT_MODEL, model_tags

    cfg = load_config(REPO / "configs" / "default.yaml")
    model_cfg = {"arch": cfg.experts.arch, **cfg.experts.model}
    catalog = Catalog(cfg)
    pipeline_id = catalog.tracker.start_pipeline(cfg)
    run_id = catalog.tracker.create_stage_run(pipeline_id, "experts", "expert-0")
    save_model(home / "exported", build_model(model_cfg))
    files = log_pyfunc(catalog.tracker, run_id, home / "exported", "model", {})
    uri = catalog.register(EXPERT_MODEL, f"{catalog.client.get_run(run_id).info.artifact_uri}/model", run_id,
                           model_tags(pipeline_id, "expert-0", TOKENIZER.fingerprint, model_cfg, files))
    catalog.tracker.end_run(run_id)
    catalog.tracker.finish_pipeline(pipeline_id)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", uri, "--port", str(port), *flags], cwd=REPO,
                              start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # the server's start: polled
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        post(port, 32, 0)  # warm-up
        yield port, model_cfg
    finally:
        server.terminate()
        server.wait(timeout=60)


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return times[len(times) // 2], times[min(len(times) - 1, int(0.95 * len(times)))]


def load_test(args) -> None:
    """16 clients against `moie serve` of a default-sized expert: p50 / p95 of short and long requests."""
    import concurrent.futures

    with served_expert() as (port, model_cfg):
        idle = statistics.median(post(port, args.short_bytes, i)[1] for i in range(5))
        n_long = max(1, args.clients // 4)

        def client(i: int) -> list[tuple[str, int, float]]:
            if i < n_long:
                return [("long", *post(port, args.long_bytes, i))]
            return [("short", *post(port, args.short_bytes, i * 100 + j)) for j in range(args.short_repeats)]

        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            answers = [a for batch in pool.map(client, range(args.clients)) for a in batch]
    print(f"CPU: {cpu_name()}; {args.clients} clients against moie serve of a {model_cfg['arch']} expert of the "
          f"default size: {n_long} send one request of {args.long_bytes} bytes, the others "
          f"{args.short_repeats} of {args.short_bytes} bytes each", flush=True)
    print(f"one short request on the idle server: {idle:.2f} s", flush=True)
    for kind in ("short", "long"):
        p50, p95 = percentiles([t for k, _, t in answers if k == kind])
        print(f"{kind}: {sum(k == kind for k, _, _ in answers)} requests, p50 {p50:.2f} s, p95 {p95:.2f} s"
              + (f" ({p50 / idle:.1f}x / {p95 / idle:.1f}x the idle server's)" if kind == "short" else ""),
              flush=True)
    refused = [(k, status) for k, status, _ in answers if status != 200]
    print(f"answers other than HTTP 200: {refused or 'none'}", flush=True)


def streamed(port: int, prompt: str, max_new_tokens: int, seed: int) -> tuple[int, float, float]:
    """(HTTP status, seconds to the first byte, seconds to the last) of one /stream request."""
    import urllib.error
    import urllib.request

    body = json.dumps({"dataframe_records": [{"prompt": prompt, "max_new_tokens": max_new_tokens, "seed": seed}]})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/stream", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for _ in response:  # a line a byte, read as it arrives
                first = first or time.perf_counter() - began
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    end = time.perf_counter() - began
    return status, first or end, end


PROMPT = "The ship sailed"  # 15 bytes: every client's prompt has this length ...
MIXED = [PROMPT[:n] for n in range(4, 20)]  # ... or one of 16 lengths (no two clients can share a batch)


def concurrency_test(args) -> None:
    """1, 4 and 16 clients at once, each streaming `--bytes` bytes: total bytes/s, time to first
    byte, p50 / p95 latency; batched vs one row at a time, prompts of one length vs of many."""
    import concurrent.futures

    print(f"CPU: {cpu_name()}; moie serve --stream of a default-sized expert; every client streams one request of "
          f"{args.bytes} bytes from POST /stream, all at once (one warm-up request first)", flush=True)
    print("| server | prompts | clients | total bytes/s | vs 1 client | first byte p50 / p95 | latency p50 / p95 | "
          "not HTTP 200 |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for server, flags in (("batched (default)", ()), ("one row at a time (--batch-rows 1)", ("--batch-rows", "1"))):
        with served_expert("--stream", *flags) as (port, _):
            for prompts, texts in (("one length", [PROMPT] * 16), ("16 lengths", MIXED)):
                single = None
                for clients in (1, 4, 16):
                    began = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                        answers = list(pool.map(lambda i: streamed(port, texts[i], args.bytes, i), range(clients)))
                    rate = clients * args.bytes / (time.perf_counter() - began)
                    single = single or rate
                    ttfb = percentiles([first for _, first, _ in answers])
                    latency = percentiles([end for _, _, end in answers])
                    print(f"| {server} | {prompts} | {clients} | {rate:.0f} | {rate / single:.2f}x | "
                          f"{ttfb[0] * 1000:.0f} / {ttfb[1] * 1000:.0f} ms | {latency[0]:.2f} / {latency[1]:.2f} s | "
                          f"{sum(status != 200 for status, _, _ in answers)} |", flush=True)


def step_rates(where: str, threads: int) -> list[float]:
    """Decoding bytes/s of a default-sized expert at batch 1, 4 and 16 (64 steps after 10), run
    on the main thread or on another one after the main thread built it and ran a step with
    torch's default threads (as a server loads a model), with `threads` OpenMP threads."""
    import threading

    import torch

    from experts.checkpoint import build_model
    from experts.generation import Decoder
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "default.yaml")
    model = build_model({"arch": cfg.experts.arch, **cfg.experts.model}).eval()
    Decoder(model, torch.zeros(1, 15, dtype=torch.long)).logits()  # the loading thread's own forward
    rates = []

    def run() -> None:
        torch.set_num_threads(threads)
        for batch in (1, 4, 16):
            decoder = Decoder(model, torch.randint(0, 256, (batch, 15), generator=torch.Generator().manual_seed(0)))
            for i in range(74):
                if i == 10:
                    began = time.perf_counter()
                decoder.logits()
                decoder.append(torch.zeros(batch, 1, dtype=torch.long))
            rates.append(batch * 64 / (time.perf_counter() - began))

    if where == "main":
        run()
    else:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    return rates


def thread_test(args) -> None:
    """The forward's thread and OpenMP threads, each case in a fresh process."""
    import subprocess

    print(f"CPU: {cpu_name()}; decoding steps of a default-sized expert, bytes/s at batch 1 / 4 / 16, each case "
          "in a fresh process whose main thread built the model and ran a forward first", flush=True)
    print("| where | OpenMP threads | batch 1 | batch 4 | batch 16 |\n|---|---|---|---|---|", flush=True)
    for where in ("main", "another"):
        for threads in (1, 2):
            out = subprocess.run([sys.executable, __file__, "--step-rates", where, str(threads)], check=True,
                                 capture_output=True, text=True).stdout
            rates = json.loads(out.strip().splitlines()[-1])
            print(f"| {'main thread' if where == 'main' else 'another thread'} | {threads} | "
                  + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


def decode_bench(args) -> None:
    """Greedy bytes/s of the default central model and a default-sized composition, cached vs uncached."""
    import random

    import torch

    from composition.model import ComposedLM
    from experts.checkpoint import build_model
    from experts.generation import generate
    from experts.tokenizer import TOKENIZER
    from pipeline.config import load_config
    from pipeline.text.corpus import load_corpus
    from routing.ensemble import prefix_router
    from routing.router import ClusterRouter

    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "configs" / "default.yaml")
    docs = load_corpus(cfg.corpus)
    train = [d.text for d in docs if d.split == "train"]
    sample = random.Random(0).sample(train, min(len(train), 2000))
    router = ClusterRouter.fit(sample, cfg.cluster.k, max_features=cfg.cluster.max_features, min_df=cfg.cluster.min_df,
                               svd_dim=cfg.cluster.svd_dim, temperature=cfg.cluster.temperature, seed=0)
    model_cfg = {"arch": cfg.experts.arch, **cfg.experts.model}
    torch.manual_seed(0)
    central = build_model(model_cfg).eval()
    experts = [build_model(model_cfg).eval() for _ in range(cfg.cluster.k)]
    c = cfg.compose
    composed = ComposedLM(central, experts, n_points=c.n_points, routing=c.routing, k=c.k, glue=c.glue,
                          output=c.output, prefix_router=prefix_router(router, list(range(cfg.cluster.k)))).eval()
    val = [d.text for d in docs if d.split == "validation"]
    prompt = torch.tensor([TOKENIZER.encode(val[0])[:64]])
    print(f"CPU: {cpu_name()}; {args.threads} threads; greedy, {args.bytes} bytes after a 64-byte prompt; "
          f"default config, untrained weights", flush=True)
    for name, model in (("central model (hourglass)", central), ("composition (router routing, 6 experts)", composed)):
        rates, outs = {}, {}
        for cached in (True, False):
            generate(model, prompt, 8, temperature=0, cached=cached)  # warm-up
            began = time.perf_counter()
            outs[cached] = generate(model, prompt, args.bytes, temperature=0, cached=cached)
            rates[cached] = args.bytes / (time.perf_counter() - began)
        same = torch.equal(outs[True], outs[False])
        print(f"{name}: cached {rates[True]:.0f} bytes/s, uncached {rates[False]:.0f} bytes/s, "
              f"ratio {rates[True] / rates[False]:.1f}x; same tokens: {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", action="store_true", help="the load test against moie serve (no pipeline needed)")
    parser.add_argument("--decode", action="store_true", help="cached vs uncached generation (no pipeline needed)")
    parser.add_argument("--concurrency", action="store_true",
                        help="1, 4 and 16 clients against moie serve, --bytes each (no pipeline needed)")
    parser.add_argument("--forward-thread", action="store_true",
                        help="decoding speed by the forward's thread and OpenMP threads (no pipeline needed)")
    parser.add_argument("--step-rates", nargs=2, metavar=("WHERE", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--long-bytes", type=int, default=1024)
    parser.add_argument("--short-bytes", type=int, default=32)
    parser.add_argument("--short-repeats", type=int, default=3)
    parser.add_argument("--model", default="models:/moie-composition@champion")
    parser.add_argument("--bytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.load:
        return load_test(args)
    if args.decode:
        return decode_bench(args)
    if args.concurrency:
        return concurrency_test(args)
    if args.forward_thread:
        return thread_test(args)
    if args.step_rates:
        return print(json.dumps(step_rates(args.step_rates[0], int(args.step_rates[1]))))

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
