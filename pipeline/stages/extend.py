"""`moie extend`: a new domain added to a finished pipeline without retraining it.

The new text (files, or a `datasets` source) is chunked and split by work as the corpus is.
A new expert trains on its training split, branched from the pipeline's central model (or
its seed, or from scratch); the cBTM router learns its cluster (one more centroid, the mean
embedding of the new text); the expert is composed into the pipeline's frozen independent
composition (only its blocks, gates and output gate train). Every old model stays bit for bit.

Against it, at the same added training compute: the central model fine-tuned on the new text
(`finetune`) and with a replay share of the old domains' training text (`finetune_replay`).
All are scored on the new domain's held-out text, the old domains' held-out text and mixed
documents (new and old text in alternating chunks); the extend run logs `bpb/<system>/new`,
`bpb/<system>/old_macro`, `forgetting/<system>` and `delta/<system>_vs_<baseline>/...`.

It orchestrates the stages' pieces (as `moie run` does): the experts stage's training task,
the compose stage's expert addition and continued training, the evaluate stage's scoring.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from artifacts import save_state, write_json
from composition.evaluation import bits_per_byte, mixture
from composition.intervals import paired_bootstrap, stratified_bootstrap
from composition.loader import CompositionSettings
from composition.training import planned_added_expert_flops, planned_kway_flops_per_token, windows_per_set
from experts.checkpoint import build_model, load_model
from experts.flops import forward_flops_per_token
from experts.tokenizer import EOS_ID, TOKENIZER, VOCAB_SIZE
from experts.trainer import TrainConfig
from pipeline.config import KWAY_TRAIN, Config, CorpusConfig
from pipeline.errors import StageError
from pipeline.ray_runtime import Grant, connect_cluster, get_or_fail, task_gpus
from pipeline.results.report import markdown_table
from pipeline.stages.compose import AddedCluster, add_expert, check_extensible
from pipeline.stages.evaluate import ComposedSystem, held_out, score_composition_task, score_model_task
from pipeline.stages.experts import ExpertTask, train_expert, write_tokens
from pipeline.stages.matched import MatchedTask, abandon_continued, finish_continued, launch_matched
from pipeline.store import storage
from pipeline.store.catalog import ROUTER_NAME, Catalog, check_token_files, exact_uri, token_tags
from pipeline.store.names import (EXPERT_MODEL, SEED, Tag, carried_tags, expert_name, extend_tag, model_tags,
                                  sha_tag)
from pipeline.store.tokens import load_tokens, save_tokens, token_pins
from pipeline.store.tracking import param_strings
from pipeline.text.corpus import Document, load_corpus
from routing.ensemble import document_weights, keep_top_k
from routing.router import ClusterRouter

DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a metric-key-safe domain name
FINETUNE, REPLAY = "finetune", "finetune_replay"
BASELINES = (FINETUNE, REPLAY)
# the systems scored after the extension -> the system before it that their forgetting is measured from
BEFORE = {"central": "central", FINETUNE: "central", REPLAY: "central",
          "composed_independent": "before/composed_independent",
          "composed_independent_topk": "before/composed_independent_topk",
          "composed_independent_kway": "before/composed_independent_kway",
          "cbtm_top1": "before/cbtm_top1", "cbtm_top2": "before/cbtm_top2", "expert_new": "central"}


# --- the new text ------------------------------------------------------------------------------


@dataclass
class NewText:
    """The new domain's documents, split by work: training and validation texts, held-out bytes."""

    domain: str
    described: str
    train: list[str]
    val: list[str]
    test: list[np.ndarray]  # whole held-out documents (near-duplicates of the new training text dropped)

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.train)


def new_corpus(cfg: Config, files: list[str] | None, dataset: str | None) -> CorpusConfig:
    """The corpus config of the new text: files or a hub data set, chunked and split as the pipeline's."""
    if bool(files) == bool(dataset):
        raise StageError("give the new domain's text as --files PATH... (.txt, .jsonl, .parquet) or as --dataset "
                         "NAME (a `datasets` name, read offline from the local cache), one of the two")
    c = cfg.corpus
    source = {"source": "files", "files": list(files)} if files else {"source": "hub", "name": dataset}
    return CorpusConfig(**source, max_chunk_bytes=c.max_chunk_bytes, val_fraction=c.val_fraction,
                        test_fraction=c.test_fraction, encoding_errors=c.encoding_errors,
                        text_column=c.text_column, work_column=c.work_column, source_column=None)


def load_new_text(cfg: Config, domain: str, corpus: CorpusConfig) -> NewText:
    """The new text, split by work; a StageError naming what is missing when a split is empty."""
    docs = load_corpus(corpus)
    by_split: dict[str, list[Document]] = {split: [d for d in docs if d.split == split]
                                           for split in ("train", "validation", "test")}
    works = len({d.work for d in docs})
    empty = [split for split, part in by_split.items() if not part]
    if empty:
        raise StageError(f"the new text ({describe(corpus)}: {len(docs)} documents of {works} works) puts no work in "
                         f"its {' and '.join(empty)} split: it is split by work (a .txt file is one work; a .jsonl "
                         f"or .parquet row is one, or its `{corpus.work_column}` column names it) with "
                         f"corpus.val_fraction={corpus.val_fraction} and corpus.test_fraction={corpus.test_fraction}; "
                         "give more works (files, rows) or raise those fractions")
    try:  # the test split, near-duplicates of its own training split dropped
        held = held_out(replace(cfg, corpus=corpus), None)
    except StageError:
        raise StageError(f"every held-out document of the new text ({describe(corpus)}) near-duplicates its training "
                         f"text (more than evaluate.max_overlap={cfg.evaluate.max_overlap} of its bytes in 8-word "
                         "shingles of it): nothing is left to measure the new domain on; give works that differ, or "
                         "raise evaluate.max_overlap (1 keeps every document)") from None
    return NewText(domain=domain, described=describe(corpus), train=[d.text for d in by_split["train"]],
                   val=[d.text for d in by_split["validation"]], test=held.tokens)


def describe(corpus: CorpusConfig) -> str:
    return f"files {', '.join(corpus.files)}" if corpus.source == "files" else f"data set {corpus.name}"


def mixed_documents(new: list[np.ndarray], old: list[np.ndarray], chunk: int, max_bytes: int) -> list[np.ndarray]:
    """Documents that switch domain every `chunk` bytes: the i-th new document's chunks in turn
    with those of the i-th old one (old documents taken in their order, round the list), while
    both have bytes left, until about max_bytes in all. A router that reads the whole prefix
    lags behind each switch; a gate that decides per byte need not."""
    out, total = [], 0
    for i, a in enumerate(new):
        b = old[i % len(old)]
        n = min(len(a), len(b)) // chunk  # whole chunks of each
        if n == 0:
            continue
        pieces = [part for j in range(n) for part in (a[j * chunk:(j + 1) * chunk], b[j * chunk:(j + 1) * chunk])]
        out.append(np.concatenate(pieces))
        total += len(out[-1])
        if total >= max_bytes:
            break
    return out


def replay_tokens(new: np.ndarray, old_sets: list[np.ndarray], share: float, seed: int, eos: int) -> np.ndarray:
    """The new training tokens with `share` of the result drawn from the old domains' training
    tokens, an equal run of each (one random offset per set), so that share of the windows a
    uniform sampler draws is replay of the old domains, each in the same measure."""
    if share == 0:
        return np.asarray(new)
    rng = np.random.default_rng(seed)
    per_set = int(round(len(new) * share / (1 - share) / len(old_sets)))
    pieces = [np.asarray(new)]
    for tokens in old_sets:
        take = min(per_set, len(tokens))
        start = int(rng.integers(0, len(tokens) - take + 1))
        pieces += [np.array([eos], dtype=np.uint16), np.asarray(tokens[start:start + take], dtype=np.uint16)]
    return np.concatenate(pieces)


# --- the stage ---------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the extension trains, decided (and checked) before anything is written."""

    central: object  # registered versions
    experts: list
    base: object  # the pipeline's independent composition
    base_settings: CompositionSettings  # its routing settings (from its checked manifest)
    branch: object | None  # the version the new expert branches from (None: from scratch)
    model: dict  # the new expert's model config
    expert_train: dict  # its TrainConfig fields
    name: str  # expert-<its cluster>
    cluster: int


def run_extend(cfg: Config, pipeline_id: str, domain: str, files: list[str] | None = None,
               dataset: str | None = None) -> dict:
    """Add `domain` to the pipeline; register its expert, the extended composition and (with
    extend.baselines) the fine-tuned baselines; score them all; {"metrics", "markdown", "uris"}.
    Bad input (no such pipeline, no central model or composition, a domain name in use, text
    that gives an empty split) is refused before anything is written."""
    catalog = Catalog(cfg)
    tracker = catalog.tracker
    tracker.pipeline_run(pipeline_id)
    cluster_run, table, _ = catalog.assignments(pipeline_id, arrow=True)  # a few bytes a document, not objects
    plan = make_plan(cfg, catalog, pipeline_id, domain, table, int(cluster_run.data.params["cluster.k"]))
    new = load_new_text(cfg, domain, new_corpus(cfg, files, dataset))
    old_scoring = replace(cfg.evaluate, max_bytes_per_domain=cfg.extend.old_bytes_per_domain)
    connect_cluster(cfg, tracker)  # the old domains' held-out documents are read shard by shard, on Ray
    old_held = held_out(replace(cfg, evaluate=old_scoring), None, table)
    Grant.of(cfg, "extend").check("extension task (extend.num_cpus / extend.num_gpus)")
    print(f"extend: {domain} from {new.described}: {len(new.train)} training documents ({new.train_bytes} bytes), "
          f"{len(new.val)} validation, {len(new.test)} held-out", flush=True)
    with tracker.pipeline_active(pipeline_id), tracker.stage_run(pipeline_id, "extend", name=f"extend-{domain}", tags={
            Tag.DOMAIN: domain, Tag.EXTENDS: pipeline_id, Tag.BASE: exact_uri(plan.base)}) as run_id, \
            tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = catalog.checkpoint_root(pipeline_id, run_id)
        eos = EOS_ID
        data = {split: write_tokens(Catalog.token_file(root, plan.name, split), texts, eos)
                for split, texts in (("train", new.train), ("val", new.val))}
        router = catalog.router(cluster_run.info.run_id, tmp / "router").with_cluster(new.train)
        added = AddedCluster(*router.to_state(), run_id=run_id)
        log_router(tracker, run_id, added, tmp / "router-out")
        central, _ = load_model(catalog.model_dir(plan.central, tmp / "central"))
        budgets = compute_budgets(cfg, plan, central)
        tracker.log_params(run_id, {"domain": domain, "text": new.described, "branch": cfg.extend.branch,
                                    "branched_from": exact_uri(plan.branch) if plan.branch else "scratch",
                                    "train_bytes": new.train_bytes,
                                    "expert_max_tokens": plan.expert_train["max_tokens"],
                                    "replay": cfg.extend.replay, "base": exact_uri(plan.base),
                                    "baselines": cfg.extend.baselines})
        tracker.log_metrics(run_id, {"train_bytes": new.train_bytes, "train_documents": len(new.train),
                                     **{f"planned_pflops/{k}": v / 1e15 for k, v in budgets.items()}})
        uris = train_systems(cfg, catalog, pipeline_id, run_id, plan, new, data, added, budgets, central, root, tmp)
        docs = {"new": new.test, "old": old_held.tokens,
                "mixed": mixed_documents(new.test, old_held.tokens, cfg.extend.mixed_chunk,
                                         cfg.evaluate.max_bytes_per_domain)}
        outcome = score_extension(cfg, catalog, plan, uris, added, router, cluster_run.info.run_id, docs,
                                  old_held.domains, budgets, tmp)
        tracker.log_metrics(run_id, outcome["metrics"])
        out = tmp / "results"
        out.mkdir()
        (out / "extend_results.md").write_text(outcome["markdown"], encoding="utf-8")
        write_json(out / "extend_metrics.json", outcome["metrics"])
        tracker.log_artifact_dir(run_id, out, "results")
        tracker.set_tags(run_id, {extend_tag(k): v for k, v in uris.items()})
        print(outcome["markdown"], flush=True)
    return {**outcome, "uris": uris, "run_id": run_id}


def make_plan(cfg: Config, catalog: Catalog, pipeline_id: str, domain: str, table, k: int) -> Plan:
    """The models the extension builds on and the new expert's settings; a StageError for input
    that cannot be extended (checked before anything is written)."""
    if not DOMAIN_NAME.match(domain or ""):
        raise StageError(f"domain name {domain!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit (it names metrics and the expert's tag)")
    sources = table["source"].unique().to_pylist() if "source" in table.column_names else []
    used = ({s for s in sources if s}
            | {v.tags.get(Tag.DOMAIN) for v in catalog.extensions(pipeline_id)}) - {None}
    if domain in used:
        raise StageError(f"domain {domain!r} is already a domain of pipeline {pipeline_id} (its corpus or an earlier "
                         f"extension); name the new one differently (in use: {', '.join(sorted(used))})")
    try:
        central_uri, expert_uris = catalog.pipeline_models(pipeline_id)
    except StageError:
        raise StageError(f"pipeline {pipeline_id} has no registered central model and experts to extend; run "
                         f"`moie experts --pipeline {pipeline_id}` and `moie compose --pipeline {pipeline_id}` "
                         "first") from None
    base = catalog.pipeline_compositions(pipeline_id).get("independent")
    if base is None:
        raise StageError(f"pipeline {pipeline_id} has no independent composition to add the new expert to; run "
                         f"`moie compose --pipeline {pipeline_id} --set compose.modes=[independent]` first")
    central, experts = catalog.resolve(central_uri), [catalog.resolve(u) for u in expert_uris]
    with tempfile.TemporaryDirectory() as tmp:
        _, manifest = catalog.composition_parts(base, Path(tmp))
    check_extensible(manifest, exact_uri(base))
    if manifest.get("routing") == "router" and not manifest.get("clusters"):
        raise StageError(f"{exact_uri(base)} routes by a router it does not name; compose the pipeline again")
    x = cfg.extend
    if x.branch == SEED:
        branch = catalog.seed_model(pipeline_id)
        if branch is None:
            raise StageError(f"pipeline {pipeline_id} has no registered seed to branch from (experts.seed_fraction "
                             "was 0); set extend.branch: central or scratch")
    else:
        branch = central if x.branch == "central" else None
    if branch is not None:
        model = json.loads(branch.tags[Tag.ARCH])
    else:
        model = {"arch": cfg.experts.arch, **cfg.experts.model, **x.model, "vocab_size": VOCAB_SIZE}
    cluster = k  # the index of the grown router's new centroid (the clustering's are 0..k-1)
    return Plan(central=central, experts=experts, base=base,
                base_settings=CompositionSettings.from_manifest(manifest), branch=branch, model=model,
                expert_train={**cfg.experts.train, **x.train, "seed": cfg.seed}, name=expert_name(cluster),
                cluster=cluster)


def log_router(tracker, run_id: str, cluster: AddedCluster, folder: Path) -> None:
    """The grown router as the extend run's artifacts, each file's sha256 a tag of the run (as the
    cluster run records its router), so compositions routed by it load it checked."""
    folder.mkdir(parents=True)
    save_state(folder, ROUTER_NAME, cluster.tensors, cluster.meta)
    manifest = tracker.log_artifact_dir(run_id, folder)
    tracker.set_tags(run_id, {sha_tag(name): sha for name, sha in manifest.items()})


def compute_budgets(cfg: Config, plan: Plan, central) -> dict[str, float]:
    """Training FLOPs each system adds, known before training (FLOPs follow shapes and budgets):
    the new expert's (3 x forward x its tokens), the composition's (+ its phases in the
    composition) and the fine-tuned baselines', who get the composition's."""
    expert = build_model(plan.model)
    train = TrainConfig(**plan.expert_train)
    seq = train.seq_len or expert.config.block_size
    expert_flops = 3 * forward_flops_per_token(expert) * train.steps(seq) * train.tokens_per_step(seq)
    settings = plan.base_settings
    c = cfg.compose
    slot = planned_added_expert_flops(central, expert, settings, c.blocks_train, c.gates_train, c.mix_train)
    budgets = {"expert_new": expert_flops, "composed": expert_flops + slot, "cbtm": expert_flops}
    if settings.kway:  # the k-way gate trained anew over every expert (shapes: the central model and E experts)
        n = len(plan.experts) + 1
        kway = {**KWAY_TRAIN, **c.kway_train}
        seq = central.config.block_size
        tokens = windows_per_set(kway["max_tokens"], n, seq) * seq * n
        per_token = planned_kway_flops_per_token(central, [build_model(plan.model) for _ in range(n)], settings)
        budgets["composed_kway"] = budgets["composed"] + tokens * per_token
    return budgets


def continued_config(cfg: Config, plan: Plan, central, pflops: float) -> dict:
    """The central model's fine-tuning schedule (the new expert's, from the same rates) for at
    least `pflops` of training compute: whole steps, never less."""
    train = {**plan.expert_train, "seed": cfg.seed + 2}
    tc = TrainConfig(**train)
    step_tokens = tc.tokens_per_step(tc.seq_len or central.config.block_size)
    steps = math.ceil(pflops / (3 * forward_flops_per_token(central)) / step_tokens)
    return {**train, "max_tokens": steps * step_tokens}


def train_systems(cfg: Config, catalog: Catalog, pipeline_id: str, run_id: str, plan: Plan, new: NewText,
                  data: dict, added: AddedCluster, budgets: dict, central, root: str, tmp: Path) -> dict[str, str]:
    """Train the new expert (then compose it) beside the fine-tuned baselines, as Ray tasks;
    register each; {system: registry URI}."""
    tracker = catalog.tracker
    x = cfg.extend
    opts = Grant.of(cfg, "extend").options(max_retries=1)
    # the baselines get what the costliest composed system adds (errs in their favour for the others)
    continued = start_baselines(cfg, catalog, pipeline_id, run_id, plan, data, max(budgets.values()), central, root,
                                tmp) \
        if x.baselines else {}
    uris: dict[str, str] = {}
    try:
        expert_task = new_expert_task(cfg, catalog, pipeline_id, run_id, plan, new, data, root, tmp)
        trained = get_or_fail(ray.remote(train_expert).options(**opts).remote(expert_task),
                              f"{plan.name} training task")
        uris["expert_new"] = register_expert(catalog, pipeline_id, run_id, plan, new, expert_task, trained)
        version = catalog.resolve(uris["expert_new"])
        uris["composed"] = add_expert(catalog, cfg, pipeline_id, plan.base, version, added,
                                      tags={Tag.EXTENSION: run_id, Tag.DOMAIN: new.domain}, kway=True)
        for name, (ref, matched) in continued.items():
            uris[name] = finish_continued(catalog, pipeline_id, ref, matched, plan.central, role=name,
                                          tags={Tag.EXTENSION: run_id, Tag.DOMAIN: new.domain})
    except BaseException as err:
        for ref, matched in continued.values():
            abandon_continued(catalog, ref, matched, killed=isinstance(err, (KeyboardInterrupt, SystemExit)))
        raise
    spent = tracker.client.get_run(catalog.resolve(uris["composed"]).run_id).data.metrics.get("train_pflops", 0.0)
    if abs(spent * 1e15 - (budgets["composed"] - budgets["expert_new"])) > 1e-6 * budgets["composed"]:
        print(f"extend: warning: the composition's phases spent {spent:.5f} PFLOPs, not the "
              f"{(budgets['composed'] - budgets['expert_new']) / 1e15:.5f} planned: the baselines' budget differs",
              flush=True)
    return uris


def start_baselines(cfg: Config, catalog: Catalog, pipeline_id: str, run_id: str, plan: Plan, data: dict,
                    pflops: float, central, root: str, tmp: Path) -> dict[str, tuple]:
    """Start fine-tuning the central model on the new text, and on it with replay, for `pflops`
    each; {name: (Ray ref, MatchedTask)}."""
    tracker = catalog.tracker
    train_cfg = continued_config(cfg, plan, central, pflops)
    eos = EOS_ID
    pins = {path: token_pins(path)["index"] for path in data.values()}  # as this stage wrote them
    new_train = load_tokens(data["train"], tmp / "new-train", pins)
    old = [load_tokens(catalog.data_path(v, "train"), tmp / f"old-{i}", catalog.pins)
           for i, v in enumerate(plan.experts)]
    mixed = replay_tokens(new_train, old, cfg.extend.replay, cfg.seed, eos)
    replay_file = storage.join(root, "data", f"{REPLAY}.train.npy")
    save_tokens(mixed, replay_file)
    pins[replay_file] = token_pins(replay_file)["index"]
    started = {}
    for name, train in ((FINETUNE, data["train"]), (REPLAY, replay_file)):
        if name == REPLAY and cfg.extend.replay == 0:
            continue
        child = tracker.create_stage_run(pipeline_id, "extend", name=name, tags={
            Tag.MODE: name, Tag.EXPERT: name, Tag.CONTINUED_FROM: exact_uri(plan.central), Tag.EXTENSION: run_id})
        tracker.log_params(child, {"continued_from": exact_uri(plan.central),
                                   "replay": cfg.extend.replay if name == REPLAY else 0.0,
                                   **{f"train.{k}": v for k, v in train_cfg.items()}})
        tracker.log_metrics(child, {"matched_pflops": pflops / 1e15})
        matched = MatchedTask(name=name, run_id=child, tracking_uri=tracker.uri, dense=exact_uri(plan.central),
                              train=train, val=data["val"], pins={p: pins[p] for p in (train, data["val"])},
                              ckpt_dir=Catalog.checkpoint_dir(root, name),
                              train_config=train_cfg, tokenizer=plan.central.tags[Tag.TOKENIZER],
                              grant=Grant.of(cfg, "extend"), seed=cfg.seed, pipeline=pipeline_id)
        ref = launch_matched(matched)
        started[name] = (ref, matched)
    print(f"extend: {', '.join(started)} fine-tune the central model for {train_cfg['max_tokens']} tokens each "
          f"({pflops / 1e15:.4f} PFLOPs, what the composition adds), beside the new expert", flush=True)
    return started


def new_expert_task(cfg: Config, catalog: Catalog, pipeline_id: str, run_id: str, plan: Plan, new: NewText,
                    data: dict, root: str, tmp: Path) -> ExpertTask:
    """The new expert's training task, in a child run of its own (branched from the exported
    central model or seed, copied to the storage, when it is not trained from scratch)."""
    tracker = catalog.tracker
    init_from = None
    if plan.branch is not None:
        init_from = storage.join(root, "branch", "model")
        storage.upload(catalog.model_dir(plan.branch, tmp / "branch"), init_from)
    tags = {Tag.EXPERT: plan.name, Tag.CLUSTER: str(plan.cluster), Tag.CLUSTER_RUN: run_id,
            Tag.STORAGE_ROOT: root, Tag.DOMAIN: new.domain, Tag.EXTENSION: run_id,
            **token_tags(data)}
    child = tracker.create_stage_run(pipeline_id, "extend", name=plan.name, tags=tags)
    tracker.log_params(child, param_strings({f"model.{k}": v for k, v in plan.model.items()}
                                            | {f"train.{k}": v for k, v in plan.expert_train.items()}
                                            | {"branched_from": exact_uri(plan.branch) if plan.branch else "scratch"}))
    return ExpertTask(name=plan.name, run_id=child, tracking_uri=tracker.uri, model=plan.model,
                      train_config=plan.expert_train, train=data["train"], val=data["val"],
                      pins=check_token_files(plan.name, tags, data),
                      ckpt_dir=Catalog.checkpoint_dir(root, plan.name), num_cpus=cfg.extend.num_cpus,
                      num_gpus=task_gpus(cfg, "extend"),
                      tokenizer=TOKENIZER.fingerprint, seed=cfg.seed, init_from=init_from,
                      description={"registered_model": EXPERT_MODEL, "model": plan.name, "pipeline": pipeline_id,
                                   "domain": new.domain})


def register_expert(catalog: Catalog, pipeline_id: str, run_id: str, plan: Plan, new: NewText, task: ExpertTask,
                    trained) -> str:
    """Register the new expert its task logged (tagged with its cluster, domain and extension)."""
    tracker = catalog.tracker
    result = trained.result
    tracker.log_metrics(task.run_id, {"final_train_loss": result.train_loss, "steps": result.steps,
                                      "tokens": result.tokens, "params": trained.params,
                                      **({"final_val_bpb": result.val_bpb} if result.val_bpb is not None else {})})
    run = tracker.client.get_run(task.run_id)
    uri = catalog.register(EXPERT_MODEL, f"{run.info.artifact_uri}/model", task.run_id, {
        **carried_tags(run.data.tags, (Tag.EXPERT, Tag.CLUSTER, Tag.CLUSTER_RUN, Tag.DOMAIN, Tag.STORAGE_ROOT,
                                       Tag.EXTENSION)),
        **model_tags(pipeline_id, run.data.tags[Tag.EXPERT], task.tokenizer, task.model, trained.files),
        Tag.BRANCHED_FROM: exact_uri(plan.branch) if plan.branch else "scratch"})
    tracker.set_tags(task.run_id, {Tag.MODEL_VERSION: uri})
    tracker.end_run(task.run_id, "FINISHED")
    print(f"{plan.name} ({new.domain}): registered as {uri} (val_bpb {result.val_bpb})", flush=True)
    return uri


# --- scoring -----------------------------------------------------------------------------------


def score_extension(cfg: Config, catalog: Catalog, plan: Plan, uris: dict, added: AddedCluster,
                    router: ClusterRouter, cluster_run_id: str, docs: dict[str, list[np.ndarray]],
                    old_domains: list[str], budgets: dict, tmp: Path) -> dict:
    """Score every system before and after the extension on the new, old and mixed documents
    (one Ray task per model or composition); the metrics and the results table."""
    store = catalog.tracker.uri
    every = docs["new"] + docs["old"] + docs["mixed"]
    parts = {"new": range(len(docs["new"])),
             "old": range(len(docs["new"]), len(docs["new"]) + len(docs["old"])),
             "mixed": range(len(every) - len(docs["mixed"]), len(every))}
    ev = cfg.evaluate
    scoring, grant = ev.scoring(), Grant.of(cfg, "extend")
    docs_ref = ray.put(every)
    model_task = ray.remote(score_model_task).options(**grant.options())
    comp_task = ray.remote(score_composition_task).options(**grant.options())
    old_uris = [exact_uri(v) for v in plan.experts]
    models = {"central": exact_uri(plan.central), **{f"expert{e}": u for e, u in enumerate(old_uris)},
              "expert_new": uris["expert_new"], **{b: uris[b] for b in BASELINES if b in uris}}
    refs = {name: model_task.remote(store, uri, docs_ref, scoring, grant) for name, uri in models.items()}
    old_router = catalog.router(cluster_run_id, tmp / "old-router")
    after = catalog.resolve(uris["composed"])
    for when, version, route_by in (("before/", plan.base, old_router), ("", after, router)):
        state, manifest = catalog.composition_parts(version, tmp / f"{when.strip('/') or 'after'}-composition")
        system = ComposedSystem.of(manifest, store, cfg.seed)
        routes = ray.put([document_weights(route_by, bytes(d), manifest["clusters"], 1) for d in every])
        refs[f"{when}composed_independent"] = comp_task.remote(system, state, docs_ref, scoring, grant, routes)
        gated = replace(system, settings=replace(system.settings, routing="topk"))  # the gates alone
        refs[f"{when}composed_independent_topk"] = comp_task.remote(gated, state, docs_ref, scoring, grant)
        if system.settings.kway:  # the k-way gate (the extended one's trained anew with the new domain's text)
            gated = replace(system, settings=replace(system.settings, routing="kway"))
            refs[f"{when}composed_independent_kway"] = comp_task.remote(gated, state, docs_ref, scoring, grant)
    results = dict(zip(refs, get_or_fail(list(refs.values()), "extension's scoring task")))
    log_probs = {name: r["log_probs"] for name, r in results.items()}
    old_clusters = [int(v.tags[Tag.CLUSTER]) for v in plan.experts]
    new_index = len(old_uris)  # the new expert's position in the extended systems
    choices = {s: r["choices"] for s, r in results.items() if s.startswith("composed")}  # per byte: expert or -1
    old_names = [f"expert{e}" for e in range(len(old_uris))]
    for when, route_by, clusters, names in (("before/", old_router, old_clusters, old_names),
                                            ("", router, old_clusters + [plan.cluster], old_names + ["expert_new"])):
        weights = [document_weights(route_by, bytes(d), clusters, len(clusters)) for d in every]
        for k in (1, 2):
            log_probs[f"{when}cbtm_top{k}"] = [mixture(np.stack([log_probs[n][d] for n in names]), keep_top_k(w, k))
                                               for d, w in enumerate(weights)]
        choices[f"{when}cbtm_top1"] = [w.argmax(axis=1) for w in weights]
    added_pflops = {"central": 0.0, "expert_new": budgets["expert_new"], "composed_independent": budgets["composed"],
                    "composed_independent_topk": budgets["composed"], "cbtm_top1": budgets["cbtm"],
                    "cbtm_top2": budgets["cbtm"]}
    if "composed_kway" in budgets:
        added_pflops["composed_independent_kway"] = budgets["composed_kway"]
    for b in BASELINES:
        if b in results:
            tokens = catalog.tracker.client.get_run(catalog.resolve(uris[b]).run_id).data.metrics["tokens"]
            added_pflops[b] = 3 * results[b]["flops"] * tokens
    routed = {f"routed_to_new/{s}/{part}": routed_share(c, ix, new_index)
              for s, c in choices.items() if not s.startswith("before/") for part, ix in parts.items() if len(ix)}
    return summarise_extension(log_probs, parts, old_domains, added_pflops, cfg.evaluate.bootstrap, cfg.seed, routed)


def routed_share(choices: list[np.ndarray], docs, expert: int) -> float:
    """The share of the documents' bytes whose top-1 expert (choices: per document, per byte) is `expert`."""
    picked = [np.asarray(choices[i]) for i in docs]
    return float(sum(int((c == expert).sum()) for c in picked) / max(sum(len(c) for c in picked), 1))


def summarise_extension(log_probs: dict[str, list[np.ndarray]], parts: dict[str, range], old_domains: list[str],
                        added_pflops: dict[str, float], resamples: int, seed: int, routed: dict | None = None) -> dict:
    """bpb of every system on the new domain, each old domain (and their macro average), the mixed
    documents and the equal-weight mean of new and old; forgetting (old macro after - before);
    differences from the fine-tuned baselines with stratified paired bootstrap intervals; the table."""
    names = sorted(set(old_domains))
    old_ix = {dom: [i for i, d in zip(parts["old"], old_domains) if d == dom] for dom in names}

    def take(lp: list[np.ndarray], ix) -> list[np.ndarray]:
        return [lp[i] for i in ix]

    bpb: dict[str, dict[str, float]] = {}
    for s, lp in log_probs.items():
        row = {"new": bits_per_byte(take(lp, parts["new"])), "mixed": bits_per_byte(take(lp, parts["mixed"]))
               if len(parts["mixed"]) else float("nan")}
        row |= {f"old/{dom}": bits_per_byte(take(lp, ix)) for dom, ix in old_ix.items()}
        row["old_macro"] = float(np.mean([row[f"old/{dom}"] for dom in names]))
        row["mean"] = (row["new"] + row["old_macro"]) / 2
        bpb[s] = row
    metrics = {f"bpb/{s}/{part}": v for s, row in bpb.items() for part, v in row.items()}

    def strata(a: str, b: str, new_weight: float, old_weight: float) -> list:
        out = [(new_weight, take(log_probs[a], parts["new"]), take(log_probs[b], parts["new"]))] if new_weight else []
        return out + [(old_weight / len(names), take(log_probs[a], ix), take(log_probs[b], ix))
                      for ix in old_ix.values()] * bool(old_weight)

    for s, before in BEFORE.items():
        if s in log_probs and before in log_probs and s != before:
            i = stratified_bootstrap(strata(s, before, 0.0, 1.0), resamples, seed=seed)
            metrics |= {f"forgetting/{s}": i.mean, f"forgetting/{s}/ci_low": i.ci_low,
                        f"forgetting/{s}/ci_high": i.ci_high}
    after = [s for s in BEFORE if s in log_probs]
    for baseline in (b for b in BASELINES if b in log_probs):
        for s in (s for s in after if s != baseline):
            for part, (wn, wo) in {"": (0.5, 0.5), "new/": (1.0, 0.0), "old/": (0.0, 1.0)}.items():
                i = stratified_bootstrap(strata(s, baseline, wn, wo), resamples, seed=seed)
                metrics |= {f"delta/{s}_vs_{baseline}/{part}{k}": v for k, v in
                            (("mean", i.mean), ("ci_low", i.ci_low), ("ci_high", i.ci_high))}
    if len(parts["mixed"]):
        for s in (s for s in after if s != "cbtm_top1"):
            i = paired_bootstrap(take(log_probs[s], parts["mixed"]), take(log_probs["cbtm_top1"], parts["mixed"]),
                                 resamples, seed=seed)
            metrics |= {f"delta/{s}_vs_cbtm_top1/mixed/{k}": v for k, v in
                        (("mean", i.mean), ("ci_low", i.ci_low), ("ci_high", i.ci_high))}
    metrics |= {f"train_pflops/{s}": v / 1e15 for s, v in added_pflops.items()} | (routed or {})
    return {"metrics": metrics, "markdown": extension_table(bpb, metrics, after, added_pflops)}


def extension_table(bpb: dict, metrics: dict, systems: list[str], added_pflops: dict) -> str:
    """The results as markdown: one row per system after the extension (and the compositions and
    cBTM before it), each baseline's difference as mean [95 % interval]."""
    def interval(key: str) -> str:
        if f"{key}/mean" not in metrics:
            return ""
        return f"{metrics[f'{key}/mean']:+.4f} [{metrics[f'{key}/ci_low']:+.4f}, {metrics[f'{key}/ci_high']:+.4f}]"

    rows = []
    for s in systems + [b for b in bpb if b.startswith("before/")]:
        row = bpb[s]
        rows.append({"system": s, "added PFLOPs": f"{added_pflops[s] / 1e15:.4g}" if s in added_pflops else "",
                     "new": f"{row['new']:.4f}", "old (macro)": f"{row['old_macro']:.4f}",
                     "forgetting": f"{metrics[f'forgetting/{s}']:+.4f}" if f"forgetting/{s}" in metrics else "",
                     "mean": f"{row['mean']:.4f}", "mixed": f"{row['mixed']:.4f}",
                     "to new expert (new / old / mixed)": " / ".join(
                         f"{metrics[f'routed_to_new/{s}/{p}']:.2f}" for p in ("new", "old", "mixed")
                         if f"routed_to_new/{s}/{p}" in metrics),
                     "vs finetune (mean)": interval(f"delta/{s}_vs_{FINETUNE}"),
                     "vs finetune_replay (mean)": interval(f"delta/{s}_vs_{REPLAY}")})
    return markdown_table(rows, list(rows[0]))
