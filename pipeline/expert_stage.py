"""The experts stage: one hourglass expert per cluster, plus the dense baseline, each a
Ray task that trains independently, checkpoints where every node can read, resumes after
a crash, logs to its own MLflow child run, and is registered in the model registry.

Re-running the stage for a pipeline skips every expert that is already registered and
resumes the others from their newest checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_path
from pipeline.config import Config
from pipeline.corpus import load_corpus
from pipeline.ray_runtime import check_resources, connect_ray
from pipeline.stages import StageError
from pipeline.tokenizer import ByteTokenizer
from pipeline.tracking import Tracker, workdir

log = logging.getLogger(__name__)

EXPERT_MODEL = "moie-expert"
CENTRAL_MODEL = "moie-central"
DENSE = "dense"
CENTRAL = "central"  # only when the config names a central architecture of its own


# --- data -------------------------------------------------------------------------------


def checkpoint_root(cfg: Config, pipeline_id: str, cluster_run_id: str) -> Path:
    """Shared data and checkpoints of the experts trained on one clustering of one pipeline
    (a new clustering of the same pipeline never reuses another's data or checkpoints)."""
    root = Path(cfg.experts.checkpoint_dir).expanduser() if cfg.experts.checkpoint_dir else workdir(cfg) / "checkpoints"
    return root.resolve() / pipeline_id / cluster_run_id


def write_tokens(path: Path, texts: list[str], eos_id: int) -> Path:
    """Byte tokens of texts (eos after each) as a .npy file that tasks memory-map."""
    from experts.trainer import encode_texts

    if not path.is_file():
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, encode_texts(texts, eos_id))
    return path


def cluster_assignments(tracker: Tracker, pipeline_id: str) -> tuple[object, dict, dict]:
    """The pipeline's newest finished cluster run, its assignments table and its report."""
    runs = tracker.stage_runs(pipeline_id, "cluster")
    if not runs:
        raise StageError(f"pipeline {pipeline_id} has no finished cluster run; run "
                         f"`moie cluster --pipeline {pipeline_id} --config ...` first")
    run = runs[0]
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        table = pq.read_table(tracker.download_artifacts(run.info.run_id, "assignments.parquet", tmp)).to_pydict()
        report = json.loads(Path(tracker.download_artifacts(run.info.run_id, "cluster_report.json", tmp)).read_text())
    return run, table, report


def expert_data(cfg: Config, root: Path, table: dict, k: int) -> dict[str, dict]:
    """Tokenise each cluster's documents once into shared .npy files: {name: {train, val, bytes}}."""
    docs = {d.doc_id: d for d in load_corpus(cfg.corpus)}
    missing = [i for i in table["doc_id"] if i not in docs]
    if missing:
        raise StageError(f"{len(missing)} clustered documents (e.g. {missing[0]!r}) are not in the corpus of this "
                         "config; give the config the pipeline was clustered with")
    eos = ByteTokenizer().eos_id
    data_dir = root / "data"
    groups: dict[str, dict[str, list[str]]] = {f"expert-{j}": {"train": [], "validation": []} for j in range(k)}
    groups[DENSE] = {"train": [], "validation": []}
    for doc_id, cluster, split in zip(table["doc_id"], table["cluster"], table["split"]):
        if split in ("train", "validation"):
            groups[f"expert-{cluster}"][split].append(docs[doc_id].text)
            groups[DENSE][split].append(docs[doc_id].text)
    out = {}
    for name, texts in groups.items():
        out[name] = {"train": str(write_tokens(data_dir / f"{name}.train.npy", texts["train"], eos)),
                     "val": str(write_tokens(data_dir / f"{name}.val.npy", texts["validation"], eos)),
                     "train_bytes": sum(len(t.encode("utf-8")) for t in texts["train"])}
    return out


# --- the task ----------------------------------------------------------------------------


def train_expert(spec: dict, board=None) -> dict:
    """Ray task body: train one model from its shared data, resuming from its checkpoints."""
    import torch
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from experts.checkpoint import build_model, save_model
    from experts.trainer import TrainConfig, train

    from experts.checkpoint import latest_checkpoint, load_model

    torch.set_num_threads(max(1, int(spec["num_cpus"])))  # exactly the CPUs Ray granted
    torch.manual_seed(spec["seed"])
    model = build_model(spec["model"])
    if spec.get("init_from") and latest_checkpoint(spec["ckpt_dir"]) is None:
        model.load_state_dict(load_model(spec["init_from"])[0].state_dict())  # branch from the shared seed
    if spec.get("num_gpus") and torch.cuda.is_available():
        model.to("cuda")  # Ray set CUDA_VISIBLE_DEVICES to the GPUs it granted
    train_tokens = np.load(spec["train"], mmap_mode="r")
    val_tokens = np.load(spec["val"], mmap_mode="r")
    val_tokens = val_tokens if len(val_tokens) > 1 else None
    client = MlflowClient(tracking_uri=spec["tracking_uri"])
    cfg = TrainConfig(**spec["train_config"])
    total = cfg.steps(cfg.seq_len or model.config.block_size)

    def on_metrics(step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(spec["run_id"], metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if board is not None and "train_loss" in metrics:
            board.update.remote(spec["name"], {"step": step, "total": total, "loss": metrics["train_loss"],
                                               "tokens_per_s": metrics["tokens_per_s"], "pid": os.getpid()})

    result = train(model, train_tokens, val_tokens, cfg, ckpt_dir=spec["ckpt_dir"], on_metrics=on_metrics,
                   meta={"tokenizer": spec["tokenizer"]}, stop_at=spec.get("stop_at"))
    if spec.get("stop_at"):  # the seed phase: export the paused model for the experts to branch from
        save_model(spec["seed_dir"], model, {"tokenizer": spec["tokenizer"], "name": "seed", "step": result.steps})
        return {**asdict(result), "model_dir": spec["seed_dir"], "params": sum(p.numel() for p in model.parameters())}
    model_dir = Path(spec["ckpt_dir"]) / "model"
    save_model(model_dir, model, {"tokenizer": spec["tokenizer"], "name": spec["name"]})
    if board is not None:
        board.update.remote(spec["name"], {"step": result.steps, "total": total, "loss": result.train_loss,
                                           "tokens_per_s": result.tokens_per_s, "pid": os.getpid(), "done": True})
    return {**asdict(result), "model_dir": str(model_dir), "params": sum(p.numel() for p in model.parameters())}


class ProgressBoard:
    """A tiny Ray actor the tasks report to; the driver prints it."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def update(self, name: str, row: dict) -> None:
        self.rows[name] = row

    def snapshot(self) -> dict[str, dict]:
        return dict(self.rows)


def progress_lines(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name in sorted(rows):
        r = rows[name]
        bar = "#" * int(20 * r["step"] / max(r["total"], 1))
        lines.append(f"  {name:>10} [{bar:<20}] step {r['step']}/{r['total']} loss {r['loss']:.3f} "
                     f"{r['tokens_per_s']:.0f} tok/s{' done' if r.get('done') else ''}")
    return lines


# --- the stage ---------------------------------------------------------------------------


def run_experts(cfg: Config, pipeline_id: str) -> dict[str, str]:
    """Train (or resume, or skip) every expert and the dense model; return {name: registry URI}."""
    tracker = Tracker(cfg)
    tracker.pipeline_run(pipeline_id)
    cluster_run, table, report = cluster_assignments(tracker, pipeline_id)
    k = int(cluster_run.data.params["cluster.k"])
    with tracker.pipeline_active(pipeline_id):
        return _run_experts(tracker, cfg, pipeline_id, cluster_run.info.run_id, k, table, report)


def _run_experts(tracker: Tracker, cfg: Config, pipeline_id: str, cluster_run_id: str, k: int, table: dict,
                 report: dict) -> dict:
    e = cfg.experts
    root = checkpoint_root(cfg, pipeline_id, cluster_run_id)
    data = expert_data(cfg, root, table, k)
    names = [f"expert-{j}" for j in range(k)] + ([DENSE] if e.dense else [])
    names += [CENTRAL] if cfg.central.arch else []
    data[CENTRAL] = data[DENSE]  # the central model reads the whole corpus too
    existing = {r.data.tags.get("moie.expert"): r for r in reversed(tracker.stage_runs(pipeline_id, "experts", None))
                if r.data.tags.get("moie.cluster_run") == cluster_run_id}  # experts of this clustering only
    registered, specs = {}, []
    from experts.checkpoint import model_config
    from experts.trainer import TrainConfig

    seed = None
    if e.seed_fraction:  # the experts branch from the dense model after seed_steps of its budget
        seq_len = e.train.get("seq_len") or model_config({"arch": e.arch, **e.model}).block_size
        dense_cfg = TrainConfig(**{**e.train, "max_tokens": e.train.get("max_tokens", 1_000_000) * k})
        steps = max(1, round(e.seed_fraction * dense_cfg.steps(seq_len)))
        seed = {"steps": steps, "tokens": steps * dense_cfg.batch_size * seq_len * dense_cfg.grad_accum,
                "dir": str(root / "seed" / "model")}

    for name in names:
        arch, model, train_cfg = ((cfg.central.arch, cfg.central.model, cfg.central.train) if name == CENTRAL
                                  else (e.arch, e.model, e.train))
        model_cfg = {"arch": arch, **model, "vocab_size": ByteTokenizer().vocab_size}
        # the config dataclass alone gives block_size: no need to build the model here
        seq_len = train_cfg.get("seq_len") or model_config(model_cfg).block_size
        run = existing.get(name)
        if run is not None and "moie.model_version" in run.data.tags:
            registered[name] = run.data.tags["moie.model_version"]
            print(f"{name}: already trained and registered as {registered[name]}", flush=True)
            continue
        if run is not None and run.data.tags.get("moie.skipped"):
            print(f"{name}: skipped before ({run.data.tags['moie.skipped']})", flush=True)
            continue
        batch = train_cfg.get("batch_size", 16)
        n_train = len(np.load(data[name]["train"], mmap_mode="r"))
        budget = train_cfg.get("max_tokens", 1_000_000) * (k if name == DENSE else 1)
        branch = bool(seed) and name.startswith("expert-")
        if branch:  # the seed is shared: k experts + seed = the dense budget
            # (each branch warms up to the peak learning rate again: measured on the default config,
            # going on from the seed's decayed rate instead left every expert ~0.03 bits per byte worse)
            budget -= seed["tokens"] // k
        run_id = (run.info.run_id if run is not None
                  else _create_run(tracker, pipeline_id, cluster_run_id, name, report, arch, model, train_cfg,
                                   budget, e.num_cpus))
        if n_train < batch * (seq_len + 1):
            why = (f"cluster has {n_train} training tokens, fewer than one batch of {batch} windows of "
                   f"{seq_len + 1} tokens")
            log.warning("%s skipped: %s", name, why)
            tracker.set_tags(run_id, {"moie.skipped": why})
            tracker.client.set_terminated(run_id, "FINISHED")
            continue
        tracker.client.update_run(run_id, status="RUNNING")
        if branch:  # the shared seed's tokens count once for all experts
            tracker.set_tags(run_id, {"moie.seed_tokens": str(seed["tokens"])})
        specs.append({"name": name, "run_id": run_id, "tracking_uri": tracker.uri, "model": model_cfg,
                      "train_config": {**train_cfg, "max_tokens": budget, "seed": cfg.seed},
                      "train": data[name]["train"], "val": data[name]["val"],
                      "ckpt_dir": str(root / name), "num_cpus": e.num_cpus,
                      "num_gpus": e.num_gpus,
                      "tokenizer": ByteTokenizer().fingerprint, "seed": cfg.seed,
                      "has_central": bool(cfg.central.arch),
                      "init_from": seed["dir"] if branch else None})
    if specs:
        connect_ray(cfg.ray)
        check_resources(e.num_cpus, e.num_gpus, what="expert task (experts.num_cpus / experts.num_gpus)")
        import ray

        # one progress board for the whole stage (a named actor dies with its last handle)
        board = ray.remote(num_cpus=0)(ProgressBoard).options(name=f"moie-progress-{pipeline_id}",
                                                               get_if_exists=True).remote()
        from experts.checkpoint import latest_checkpoint

        branching = [s for s in specs if s["init_from"] and latest_checkpoint(s["ckpt_dir"]) is None]
        if seed and branching and not Path(seed["dir"], "model.json").is_file():
            dense = [s for s in specs if s["name"] == DENSE]
            if dense and (latest_checkpoint(dense[0]["ckpt_dir"]) or 0) > seed["steps"]:
                raise StageError(f"the seed (the dense model at step {seed['steps']}) is missing from {seed['dir']} "
                                 "and the dense model has trained past it; set experts.seed_fraction: 0 or start "
                                 "a new pipeline")
            if not dense:
                raise StageError(f"the experts branch from the dense model's seed at {seed['dir']}, which is missing "
                                 "while the dense model is registered; set experts.seed_fraction: 0 or retrain")
            print(f"seed: the dense model to step {seed['steps']} ({seed['tokens']} tokens), then every expert "
                  "branches from it", flush=True)
            _train_all(tracker, cfg, pipeline_id, [{**dense[0], "stop_at": seed["steps"], "seed_dir": seed["dir"]}],
                       report, board, register=False)
        registered |= _train_all(tracker, cfg, pipeline_id, specs, report, board)
    return registered


def _create_run(tracker: Tracker, pipeline_id: str, cluster_run_id: str, name: str, report: dict, arch: str,
                model: dict, train_cfg: dict, budget: int, num_cpus: float) -> str:
    tags = {"moie.expert": name, "moie.cluster_run": cluster_run_id}
    if name.startswith("expert-"):
        cluster = int(name.removeprefix("expert-"))
        tags["moie.cluster"] = str(cluster)
        dominant = (report.get("dominant") or [None] * (cluster + 1))[cluster]
        if dominant:
            tags |= {"moie.domain": str(dominant["domain"]), "moie.purity": f"{dominant['share']:.4f}"}
    run_id = tracker.create_stage_run(pipeline_id, "experts", name=name, tags=tags)
    tracker.log_params(run_id, {f"model.{k}": v for k, v in model.items()}
                       | {f"train.{k}": v for k, v in train_cfg.items() if k != "max_tokens"}
                       | {"arch": arch, "max_tokens": budget, "num_cpus": num_cpus})
    return run_id


def _train_all(tracker: Tracker, cfg: Config, pipeline_id: str, specs: list[dict], report: dict, board,
               register: bool = True) -> dict:
    import ray

    e = cfg.experts
    task = ray.remote(train_expert).options(num_cpus=e.num_cpus, num_gpus=e.num_gpus, max_retries=e.max_retries)
    # longest first: the dense model (k x an expert's budget) must not start last, alone on one CPU
    ordered = sorted(specs, key=lambda spec: -spec["train_config"]["max_tokens"])
    pending = {task.remote(spec, board): spec for spec in ordered}
    registered, failures, shown = {}, [], {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=e.progress_every)
        rows = ray.get(board.snapshot.remote())
        changed = {name: row for name, row in rows.items() if shown.get(name) != row}
        for line in progress_lines(changed):  # one line per expert that moved since the last print
            print(line, flush=True)
        shown = rows
        for ref in done:
            spec = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the task failed after its retries: record, go on with the others
                failures.append(f"{spec['name']}: {type(err).__name__}: {str(err).splitlines()[0]}")
                tracker.client.set_terminated(spec["run_id"], "FAILED")
                continue
            if not register:
                continue
            registered[spec["name"]] = _finish_expert(tracker, pipeline_id, spec, result, report)
            print(f"{spec['name']}: registered as {registered[spec['name']]} "
                  f"(val_bpb {result['val_bpb']}, resumed from step {result['resumed_from']})", flush=True)
    if failures:
        raise StageError("experts failed after retries (run the stage again to resume them): " + "; ".join(failures))
    return registered


def _finish_expert(tracker: Tracker, pipeline_id: str, spec: dict, result: dict, report: dict) -> str:
    run_id = spec["run_id"]
    tracker.log_metrics(run_id, {"final_train_loss": result["train_loss"], "steps": result["steps"],
                                 "tokens": result["tokens"], "params": result["params"],
                                 "resumed_from_step": result["resumed_from"] or 0,
                                 **({"final_val_bpb": result["val_bpb"]} if result["val_bpb"] is not None else {})})
    manifest = tracker.log_artifact_dir(run_id, result["model_dir"], "model")
    run = tracker.client.get_run(run_id)
    name = EXPERT_MODEL if spec["name"].startswith("expert-") else CENTRAL_MODEL
    # role: which central-model version composition takes by default (a configured central
    # model wins over the dense baseline, which is then registered as the baseline only)
    role = {CENTRAL: "central", DENSE: "dense" if spec.get("has_central") else "dense+central"}.get(spec["name"])
    tags = {"moie.pipeline": pipeline_id, "moie.expert": spec["name"], "moie.tokenizer": spec["tokenizer"],
            "moie.arch": json.dumps(spec["model"], sort_keys=True), "moie.sha256": manifest["model.safetensors"]}
    tags |= {k: v for k, v in run.data.tags.items()
             if k in ("moie.cluster", "moie.domain", "moie.purity", "moie.cluster_run", "moie.seed_tokens")}
    if role:
        tags["moie.role"] = role
    version = register_model(tracker, name, f"{run.info.artifact_uri}/model", run_id, tags)
    uri = f"models:/{name}/{version}"
    tracker.set_tags(run_id, {"moie.model_version": uri})
    tracker.client.set_terminated(run_id, "FINISHED")
    return uri


def register_model(tracker: Tracker, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name` for plain safetensors artifacts."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.create_registered_model(name)
    except MlflowException:
        pass  # exists already
    return tracker.client.create_model_version(name, source, run_id=run_id, tags=tags).version
