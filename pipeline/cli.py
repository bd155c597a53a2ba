"""The `moie` command line: one sub-command per stage, plus `run` and `ui`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.errors import MoieError, StageError, one_line
from pipeline.serve.sampling import LIMITS_ENV, SAMPLING, Limits

DEFAULT_CONFIG = "configs/default.yaml"
RESUMABLE = ": the runs it left unfinished are marked KILLED; the same command goes on from what was saved"


def default_config(relative: str) -> str:
    """A default config path as given where it exists from the current directory, else the clone's
    own (an editable install): `moie serve`, `moie ui` and the rest work from any directory."""

    beside_package = Path(__file__).resolve().parents[1] / relative
    return relative if Path(relative).is_file() or not beside_package.is_file() else str(beside_package)


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default_config(default) if default else None, required=default is None,
                        help="pipeline YAML file (configs/tiny.yaml, configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set cluster.k=4 corpus.domain_bytes=200000")


def add_pipeline_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default=None, metavar="RUN_ID",
                        help="join this pipeline's parent run instead of creating a new one")


def cluster_command(args: argparse.Namespace) -> int:
    """Run the cluster stage; print the pipeline's run id as the last line."""
    from pipeline.stages.cluster import run_cluster

    cfg = load_config(args.config, args.overrides)
    pipeline_id = run_cluster(cfg, args.pipeline)
    print(pipeline_id)
    return 0


def experts_command(args: argparse.Namespace) -> int:
    """Train, resume or report every expert of a pipeline; print the pipeline's run id."""
    from pipeline.stages.experts import run_experts

    cfg = load_config(args.config, args.overrides)
    if not args.pipeline:
        raise ConfigError("the experts stage needs --pipeline RUN_ID (printed by `moie cluster`)")
    registered = run_experts(cfg, args.pipeline)
    for name, uri in sorted(registered.items()):
        print(f"{name}: {uri}", file=sys.stderr)
    print(args.pipeline)
    return 0


def compose_command(args: argparse.Namespace) -> int:
    """Compose the pipeline's (or the named) central model and experts; print the pipeline id."""
    from pipeline.stages.compose import run_add, run_compose

    cfg = load_config(args.config, [*args.overrides, *(["compose.allow_missing_experts=true"]
                                                        if args.allow_missing_experts else [])])
    if args.add or args.to:
        if not (args.add and args.to):
            raise ConfigError("--add URI and --to COMPOSITION_URI go together")
        print(run_add(cfg, args.add, args.to, args.pipeline))
        return 0
    if not args.pipeline:
        raise ConfigError("the compose stage needs --pipeline RUN_ID (its runs are children of that pipeline)")
    experts = [u for u in (args.experts or "").split(",") if u]
    for mode, uri in run_compose(cfg, args.pipeline, args.central, experts or None).items():
        print(f"{mode}: {uri}", file=sys.stderr)
    print(args.pipeline)
    return 0


def add_compose_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--central", default=None, metavar="URI",
                        help="central model, e.g. models:/moie-central/1, or 'seed': the pipeline's seed, where its "
                             "experts branched (a hub that has not paid for the dense run's second half)")
    parser.add_argument("--experts", default=None, metavar="URI,URI", help="experts, e.g. models:/moie-expert/1,...")
    parser.add_argument("--allow-missing-experts", action="store_true",
                        help="compose without the clusters that have no registered expert, recording the gap "
                             "(compose.allow_missing_experts)")
    parser.add_argument("--add", default=None, metavar="URI", help="one more expert for the composition --to names")
    parser.add_argument("--to", default=None, metavar="COMPOSITION_URI",
                        help="the composition --add extends (e.g. models:/moie-composition/2): a new version in "
                             "which only the added expert's blocks and gates are trained")


def evaluate_command(args: argparse.Namespace) -> int:
    """Score every system of a pipeline on held-out text; print the results table and the pipeline id."""
    from pipeline.stages.evaluate import run_evaluate

    cfg = load_config(args.config, args.overrides)
    if not args.pipeline:
        raise ConfigError("the evaluate stage needs --pipeline RUN_ID (printed by `moie cluster` or `moie run`)")
    run_evaluate(cfg, args.pipeline, args.eval_data)
    print(args.pipeline)
    return 0


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-data", default=None, metavar="SOURCE",
                        help="score this text instead of the pipeline's held-out split: files or a glob "
                             "(.txt/.jsonl/.parquet), 'embedded', or a hub data set name (read offline)")


def extend_command(args: argparse.Namespace) -> int:
    """Add a domain to a finished pipeline; print the table of every system and, last, the
    extended composition's URI."""
    from pipeline.stages.extend import run_extend

    cfg = load_config(args.config, args.overrides)
    if not args.pipeline:
        raise ConfigError("moie extend needs --pipeline RUN_ID: the finished pipeline to add the domain to")
    domain = args.domain or default_domain(args.files, args.dataset)
    out = run_extend(cfg, args.pipeline, domain, args.files, args.dataset)
    for name, uri in out["uris"].items():
        print(f"{name}: {uri}", file=sys.stderr)
    print(out["uris"]["composed"])
    return 0


def default_domain(files: list[str] | None, dataset: str | None) -> str:
    """The new domain's name when --domain is not given: the first file's stem, or the data set's name."""

    if files:
        return Path(files[0]).stem
    return (dataset or "").rsplit("/", 1)[-1]


def add_extend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", nargs="+", default=None, metavar="PATH",
                        help="the new domain's text: .txt (one work each), .jsonl or .parquet files or globs")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="or a `datasets` data set name (read offline from the local cache)")
    parser.add_argument("--domain", default=None, metavar="NAME",
                        help="the new domain's name (default: the first file's stem, or the data set's name)")


def run_command(args: argparse.Namespace) -> int:
    """Every stage in order under one parent run; with --resume, stages already complete are skipped."""
    from pipeline.stages.sequence import run_pipeline

    cfg = load_config(args.config, args.overrides)
    if args.resume and args.pipeline:
        raise ConfigError("give --resume RUN_ID (continue that pipeline) or --pipeline RUN_ID, not both")
    pipeline_id = run_pipeline(cfg, args.resume or args.pipeline)
    print(pipeline_id)
    return 0


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", default=None, metavar="RUN_ID",
                        help="continue this pipeline: skip the stages it completed, resume the rest")


def ui_command(args: argparse.Namespace) -> int:
    """Start the MLflow UI on the pipeline's tracking store, bound to 127.0.0.1; it stops with
    this command (Ctrl-C, SIGTERM), never outliving it."""
    from pipeline.store.tracking import tracking_uri

    cfg = load_config(args.config, args.overrides)
    uri = tracking_uri(cfg)
    check_port_free(args.port)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port}", file=sys.stderr)
    return run_server(cmd, env, "the MLflow UI server")


def run_server(cmd: list[str], env: dict, what: str) -> int:
    """Run a server in its own process group until it exits; on any exit of this command (Ctrl-C,
    SIGTERM, an error) its whole group is stopped, so it never outlives the command."""

    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = server.wait()
    finally:
        stop_process_group(server)
    if code != 0:
        raise StageError(f"{what} exited with code {code} (its own messages are above)")
    return 0


def check_port_free(port: int) -> None:
    """StageError unless a server could listen on 127.0.0.1:port."""


    if not 1 <= port <= 65535:
        raise StageError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise StageError(f"port {port} on 127.0.0.1 is in use ({err.strerror}): another `moie ui` or server "
                             "holds it; stop that one or choose another with --port") from None


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to a child's process group (it and its workers), SIGKILL to what lingers; also
    when the child itself has exited already but its workers live on."""

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # no member of the group is left
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the child: a zombie would keep its group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def generate_command(args: argparse.Namespace) -> int:
    """Sample text from a registered model (any URI, compositions included), an exported model
    or a training checkpoint directory; for a composition, show which experts the router picked."""

    from experts.checkpoint import load_any
    from experts.tokenizer import ByteTokenizer
    from pipeline.serve.sampling import check_sampling, sample

    check_sampling(args.prompt, args.max_new_tokens, args.temperature, args.top_k, cli=True)
    if args.model.startswith("models:/"):
        from pipeline.store.catalog import Catalog

        with tempfile.TemporaryDirectory() as tmp:  # the weights are in memory once loaded
            model, meta = Catalog(load_config(args.config, args.overrides)).load_registered(args.model, tmp)
    else:
        model, meta = load_any(args.model)
    tok = ByteTokenizer()
    if meta.get("tokenizer") not in (None, tok.fingerprint):
        print(f"moie: warning: model was trained with tokenizer {meta['tokenizer']}, this is {tok.fingerprint}",
              file=sys.stderr)
    out = sample(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + out.text)
    if hasattr(model, "routing_report"):
        import torch

        window = torch.tensor([out.ids[-model.config.block_size:]], dtype=torch.long)  # (1, T)
        print(model.routing_report(window, meta["experts"]), file=sys.stderr)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """`mlflow models serve` for a registered moie model on 127.0.0.1, in this Python environment:
    the version's files are downloaded to a scratch copy and checked against the registry's pin
    before MLflow reads any of them, the server loads that copy with pickle loading off, and
    requests are bounded by the limits given. It stops with this command (Ctrl-C, SIGTERM),
    never outliving it, and the scratch copy goes with it."""
    from pipeline.serve.serving import NO_PICKLES
    from pipeline.store.catalog import Catalog, exact_uri
    from pipeline.store.leftovers import scratch_path
    from pipeline.store.tracking import tracking_uri

    limits = Limits(rows=args.max_rows, new_bytes=args.max_new_bytes, prompt_bytes=args.max_prompt_bytes,
                    timeout_s=args.timeout, batch_rows=args.batch_rows, batch_wait_s=args.batch_wait_ms / 1000)
    catalog = Catalog.of_registry(tracking_uri(load_config(args.config, args.overrides)))  # reads only
    version = catalog.resolve(args.uri)  # a clear error for a URI the registry does not know
    check_port_free(args.port)
    uri = exact_uri(version)  # what was checked is what is served, wherever the alias moves meanwhile
    scratch = scratch_path("serve")
    try:
        folder = catalog.version_folder(version, scratch)
        env = dict(os.environ, MLFLOW_TRACKING_URI=catalog.tracker.uri, MLFLOW_REGISTRY_URI=catalog.tracker.uri,
                   MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=str(math.ceil(limits.timeout_s) + 10),  # ours answers first
                   **NO_PICKLES, **{LIMITS_ENV: json.dumps(dataclasses.asdict(limits))})
        if args.stream:  # MLflow's app plus /stream, in one process of this environment
            cmd = [sys.executable, "-m", "pipeline.serve.stream", "--model", str(folder), "--port", str(args.port)]
        else:
            cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager", "local",
                   "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
        print(f"serving {args.uri.strip()} ({uri}, every file checked against the registry's pin) at "
              f"http://127.0.0.1:{args.port}/invocations" + (" and /stream" if args.stream else ""), file=sys.stderr)
        return run_server(cmd, env, "moie's streaming server" if args.stream else "mlflow models serve")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gc_command(args: argparse.Namespace) -> int:
    """What killed processes left: scratch directories and unfinished uploads; listed, or deleted
    with --delete."""
    from pipeline.store import storage
    from pipeline.store.catalog import storage_location
    from pipeline.store.leftovers import leftovers

    found = leftovers(storage_location(load_config(args.config, args.overrides)))
    for path, why in found:
        print(f"{'deleting' if args.delete else 'would delete'} {path}  ({why})")
        if args.delete:
            storage.remove(path)
    if not found:
        print("nothing left over")
    elif not args.delete:
        print(f"{len(found)} left over; `moie gc --delete` deletes them", file=sys.stderr)
    return 0


def library_command(args: argparse.Namespace) -> int:
    """The registry as an expert library: list, show, alias."""

    from pipeline.serve.library import format_table, list_models, parse_filters, set_alias, show_model
    from pipeline.store.catalog import Catalog

    catalog = Catalog(load_config(args.config, args.overrides))
    if args.action == "list":
        rows = list_models(catalog, parse_filters(args.filter), args.model)
        if args.uris:
            print("\n".join(r["uri"] for r in rows))
        else:
            print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    elif args.action == "show":
        print(json.dumps(show_model(catalog, args.uri), indent=1))
    else:
        print(set_alias(catalog, args.uri, args.name))
    return 0


def add_library_parser(sub) -> None:
    lib = sub.add_parser("library", help="registered experts, central models and compositions: list, show, alias")
    actions = lib.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every registered model: version, aliases, pipeline, domain, bpb")
    listing.add_argument("--filter", action="extend", nargs="+", default=[], metavar="TAG=VALUE",
                         help="keep versions whose tag has this value, e.g. domain=code pipeline=<run id>")
    listing.add_argument("--model", choices=["moie-expert", "moie-central", "moie-composition"], default=None,
                         help="only this registered model")
    listing.add_argument("--json", action="store_true", help="JSON rows for scripts")
    listing.add_argument("--uris", action="store_true", help="only the URIs, one per line (for $(...) in a shell)")
    show = actions.add_parser("show", help="one model's lineage and the compositions that use it")
    show.add_argument("uri", help="models:/moie-expert/3 or models:/moie-expert@code")
    alias = actions.add_parser("alias", help="name a version, usable as models:/<model>@NAME wherever a URI is")
    alias.add_argument("uri")
    alias.add_argument("name", help="e.g. code")
    for parser in (listing, show, alias):
        add_config_args(parser, DEFAULT_CONFIG)
        parser.set_defaults(func=library_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stages = [("run", "the whole pipeline: cluster, experts, compose, evaluate", run_command, add_run_args),
              ("cluster", "cBTM clustering stage: tf-idf + SVD + balanced k-means", cluster_command, None),
              ("experts", "train one expert per cluster + the dense model on Ray", experts_command, None),
              ("compose", "compose registered experts into the central model (Ray, MLflow)", compose_command,
               add_compose_args),
              ("evaluate", "score dense, experts, cBTM and compositions on held-out text", evaluate_command,
               add_evaluate_args),
              ("extend", "add a new domain to a finished pipeline: an expert composed in, against fine-tuning",
               extend_command, add_extend_args)]
    for name, text, func, extra in stages:  # the same options as `python -m jobs.<stage>`
        stage = sub.add_parser(name, help=text)
        add_config_args(stage, DEFAULT_CONFIG)
        add_pipeline_arg(stage)
        if extra is not None:
            extra(stage)
        stage.set_defaults(func=func, stage=True)
    gen = sub.add_parser("generate", help="sample text from a model directory (model.json or step-*.json)")
    gen.add_argument("--model", required=True, help="a registry URI (models:/moie-composition/2, "
                     "models:/moie-expert@code), a directory with model.safetensors + model.json, "
                     "or a training checkpoint directory")
    add_config_args(gen, DEFAULT_CONFIG)
    gen.add_argument("--prompt", default="")
    for key, default in SAMPLING.items():
        gen.add_argument("--" + key.replace("_", "-"), type=type(default), default=default)
    gen.set_defaults(func=generate_command)
    add_library_parser(sub)
    ui = sub.add_parser("ui", help="MLflow UI on this pipeline's tracking store (127.0.0.1)")
    add_config_args(ui, DEFAULT_CONFIG)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=ui_command)
    gc = sub.add_parser("gc", help="list (or --delete) scratch directories and uploads that killed processes left")
    add_config_args(gc, DEFAULT_CONFIG)
    gc.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    gc.set_defaults(func=gc_command)
    serve = sub.add_parser("serve", help="mlflow models serve for a registered model (127.0.0.1, this environment)")
    serve.add_argument("uri", help="e.g. models:/moie-composition@champion or models:/moie-expert/3")
    add_config_args(serve, DEFAULT_CONFIG)
    serve.add_argument("--port", type=int, default=5001)
    limits = Limits()
    serve.add_argument("--max-rows", type=int, default=limits.rows, help="rows per request")
    serve.add_argument("--max-new-bytes", type=int, default=limits.new_bytes,
                       help="bytes generated per request, max_new_tokens summed over its rows")
    serve.add_argument("--max-prompt-bytes", type=int, default=limits.prompt_bytes,
                       help="UTF-8 bytes of prompt text per request, all rows together")
    serve.add_argument("--timeout", type=float, default=limits.timeout_s,
                       help="seconds a request may run, waiting included; past it, generation stops (HTTP 504)")
    serve.add_argument("--batch-rows", type=int, default=limits.batch_rows,
                       help="rows (of one request or concurrent ones) whose prompts have one length, generated "
                            "together; 1: each row alone, its answer bitwise independent of other requests")
    serve.add_argument("--batch-wait-ms", type=float, default=limits.batch_wait_s * 1000,
                       help="how long a row waits for others to join its batch")
    serve.add_argument("--stream", action="store_true",
                       help="serve MLflow's scoring app plus POST /stream, which sends a row's bytes as they are "
                            "generated (newline-delimited JSON); without it, `mlflow models serve`")
    serve.set_defaults(func=serve_command)
    return parser


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run, and turn the errors a user can fix into one clear line and exit code 2."""
    from mlflow.exceptions import MlflowException


    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise on stderr
    # SIGTERM (ray job stop) exits through the run context managers, so runs end KILLED.
    terminated = []

    def on_sigterm(*_):
        terminated.append(True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SystemExit:
        if not terminated:
            raise
        # (Ray, waiting on tasks when the signal came, re-raises it as SystemExit(1))
        print("moie: terminated" + RESUMABLE * getattr(args, "stage", False), file=sys.stderr)
        return 143
    except MoieError as e:  # every error the user can fix: config, corpus, stage inputs, checksums, resources
        print(f"moie: error: {one_line(e)}", file=sys.stderr)
        return 2
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"):
            print(f"moie: error: {one_line(e)}", file=sys.stderr)  # a name or value the store does not know
        else:  # the store itself failed a request (unreachable, read-only, locked, full)
            print(f"moie: error: the MLflow tracking store refused a request ({one_line(e)}); check that "
                  "MLFLOW_TRACKING_URI (or MOIE_HOME) names a store this user can reach and write",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moie: interrupted" + RESUMABLE * getattr(args, "stage", False), file=sys.stderr)
        return 130


def stage_main(prog: str, description: str, func, argv: list[str] | None = None, extra=None) -> int:
    """Entry point of one stage (`python -m jobs.<stage>`): --config, --set, --pipeline."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser)
    add_pipeline_arg(parser)
    if extra is not None:
        extra(parser)
    parser.set_defaults(func=func, stage=True)
    return run_main(parser, argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
