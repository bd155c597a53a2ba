"""`moie run`: every stage in order under one parent run: cluster -> experts -> compose -> evaluate.

The independent composition does not wait for the compose stage: each expert's blocks and
gates start training as soon as the central model and that expert are registered, while the
other experts still train (`compose.early`).

A resumed pipeline skips what it has completed: a finished cluster run, registered experts
(the experts stage itself skips them and resumes the others from their checkpoints),
compositions registered for a mode, a finished evaluation (its table is printed again).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import ray

from pipeline.config import Config
from pipeline.errors import StageError, one_line
from pipeline.ray_runtime import cancel, get_or_fail
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import (CompositionTask, centres_task, composition_task, mode_routing, run_compose,
                                     train_independent_task)
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.experts import run_experts
from pipeline.store.catalog import Catalog
from pipeline.store.names import CENTRAL, DENSE, expert_cluster, is_expert


def run_pipeline(cfg: Config, resume: str | None = None) -> str:
    """Run (or resume) the whole pipeline; return its parent run id."""
    catalog = Catalog(cfg)
    tracker = catalog.tracker
    if resume and tracker.stage_runs(resume, "cluster"):
        tracker.pipeline_run(resume)
        print(f"cluster: done before, skipped (pipeline {resume})", flush=True)
        pipeline_id = resume
    else:
        pipeline_id = run_cluster(cfg, resume)
    print(f"pipeline {pipeline_id}", flush=True)
    done = catalog.pipeline_compositions(pipeline_id)
    modes = [m for m in cfg.compose.modes if m not in done]
    for mode in cfg.compose.modes:
        if mode in done:
            print(f"compose {mode}: done before, models:/{done[mode].name}/{done[mode].version}", flush=True)
    # the independent composition's per-expert work starts as each expert is registered
    early = EarlyIndependent(cfg, catalog, pipeline_id) if "independent" in modes and cfg.compose.early else None
    # the matched-compute baseline is part of the compose stage: a run that stopped after the
    # compositions but before it finishes it now (run_compose skips it where it does not apply)
    matched_missing = cfg.compose.dense_matched and catalog.matched_model(pipeline_id) is None
    try:
        run_experts(cfg, pipeline_id, watcher=early)
        if modes or matched_missing:
            run_compose(replace(cfg, compose=replace(cfg.compose, modes=modes)), pipeline_id, early=early)
    finally:
        if early is not None:
            early.cancel()  # whatever the compose stage did not take (everything, after an error)
    matched_added = matched_missing and catalog.matched_model(pipeline_id) is not None
    evaluated = tracker.stage_runs(pipeline_id, "evaluate")
    if evaluated and not modes and not matched_added:
        table = catalog.results_table(evaluated[0].info.run_id)
        print(f"evaluate: done before (run {evaluated[0].info.run_id})\n{table}", flush=True)
    else:
        run_evaluate(cfg, pipeline_id)
    return pipeline_id


class EarlyIndependent:
    """The independent composition's work that needs only the central model and one expert,
    started by `moie run` while the other experts still train: the routing centres as soon as
    the central model and a first expert are registered, then each expert's blocks and gates
    as soon as that expert is. The compose stage takes each result where its task is exactly
    the one it would have started itself (same central model, expert, position, data,
    settings and centres), so the composition is the same as one started after all experts."""

    def __init__(self, cfg: Config, catalog: Catalog, pipeline_id: str):
        self.cfg, self.catalog, self.pipeline_id = cfg, catalog, pipeline_id
        self.central_name = CENTRAL if cfg.central.arch else DENSE  # as Catalog.pipeline_models picks it
        self.planned: list[str] | None = None  # the experts the stage will register, in cluster order
        self.root: str | None = None
        self.pins: dict[str, str] = {}  # token file -> its block index's sha256, of the models still to train
        self.versions: dict[str, object] = {}  # model name -> registered version
        self.centres_ref = None
        self.centres_spec: CompositionTask | None = None
        self.started: dict[str, tuple] = {}  # expert name -> (its slot, its task, Ray ref)
        self.off = False  # set when starting early failed
        self.chains: list = [None] * cfg.compose.early_tasks  # the newest task of each chain of early tasks

    # the experts stage's events

    def expect(self, names: list[str], root: str, pins: dict[str, str]) -> None:
        """The models the experts stage will have registered when it ends (its storage root, and
        the pins its runs recorded of the token files of those still to train)."""
        self.planned = sorted((n for n in names if is_expert(n)), key=expert_cluster)
        self.root, self.pins = root, dict(pins)
        self._start()

    def registered(self, name: str, uri: str) -> None:
        self.versions[name] = self.catalog.resolve(uri)
        self._start()

    def cancel(self) -> None:
        cancel([ref for ref in [self.centres_ref, *(s[2] for s in self.started.values())] if ref is not None])

    def _task(self, experts: list) -> CompositionTask:
        with tempfile.TemporaryDirectory() as tmp:
            task = composition_task(self.cfg, self.catalog, self.versions[self.central_name], experts, Path(tmp))
        return replace(task, settings=replace(task.settings, routing=mode_routing(task, "independent")))

    def _start(self) -> None:
        """Start what can start now; a failure here only turns early composition off (the
        compose stage then does the work itself), it never stops the experts stage."""
        if self.planned is None or self.central_name not in self.versions or self.off:
            return
        try:
            self._launch()
        except Exception as err:  # noqa: BLE001 - an optimisation must not fail the experts stage
            print(f"compose independent: not starting early ({type(err).__name__}: {one_line(err)}); the compose "
                  "stage will train every expert's blocks and gates", flush=True)
            self.cancel()
            self.started.clear()
            self.centres_ref, self.off = None, True

    def _launch(self) -> None:
        ready = [n for n in self.planned if n in self.versions]
        if not ready:
            return
        if self.centres_ref is None:
            data = [Catalog.token_file(self.root, n, "train") for n in self.planned]
            task = self._task([self.versions[ready[0]]])
            self.centres_spec = replace(task, expert_data=data, pins={**task.pins, **self._data_pins(data)})
            self.centres_ref = ray.remote(centres_task).options(**self.centres_spec.options()).remote(self.centres_spec)
        for name in ready:
            if name not in self.started:
                slot, task = self.planned.index(name), self._task([self.versions[name]])
                # at most `early_tasks` at once: each waits for the one before it in its chain, so the
                # experts still training and the compose stage's first tasks keep the other CPUs
                chain = len(self.started) % len(self.chains)
                ref = ray.remote(train_independent_task).options(**task.options()).remote(
                    task, 0, self.centres_ref, slot, self.chains[chain])
                self.started[name] = (slot, task, ref)
                self.chains[chain] = ref
                print(f"compose independent: {name}'s blocks and gates start now, while "
                      f"{len(self.planned) - len(ready)} experts still train", flush=True)

    def _data_pins(self, data: list[str]) -> dict[str, str]:
        """The pin of each planned expert's training tokens: a registered one's from the registry
        (checked against its file), one still training from its run; none pinned: no early start."""
        for name in self.planned:
            if name in self.versions:
                self.catalog.data_path(self.versions[name], "train")  # checked, and pinned in catalog.pins
        pins = {path: self.catalog.pins.get(path) or self.pins.get(path) for path in data}
        if unpinned := [path for path, pin in pins.items() if pin is None]:
            raise StageError(f"no block index pin recorded for {', '.join(unpinned)}")
        return pins

    # the compose stage's questions

    def centres(self, task: CompositionTask) -> dict | None:
        """The centres fitted early, if they are what `task` would fit (else None: fitted anew)."""
        if self.centres_ref is None or not self._same(self.centres_spec, task) \
                or self.centres_spec.expert_data != task.expert_data \
                or any(self.centres_spec.pins.get(p) != task.pins.get(p) for p in task.expert_data):
            self.cancel()
            self.started.clear()
            return None
        return get_or_fail(self.centres_ref, "routing centres' task (started early)")

    def training(self, task: CompositionTask, e: int):
        """The Ray ref of expert e's blocks and gates, if started early for exactly this task."""
        for slot, early, ref in self.started.values():
            if slot == e and early.experts == [task.experts[e]] and early.expert_data == [task.expert_data[e]] \
                    and early.pins.get(early.expert_data[0]) == task.pins.get(task.expert_data[e]) \
                    and self._same(early, replace(task, settings=replace(task.settings,
                                                                         routing=mode_routing(task, "independent")))):
                return ref
        return None

    @staticmethod
    def _same(early: CompositionTask, task: CompositionTask) -> bool:
        """The settings every task of the mode shares are equal (not the experts or their data)."""
        keys = ("central", "tokenizer", "tracking_uri", "settings", "center_tokens", "blocks_train", "gates_train",
                "mix_train", "seed", "num_cpus")
        return all(getattr(early, k) == getattr(task, k) for k in keys) and early.router_run == task.router_run
