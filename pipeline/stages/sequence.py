"""`moie run`: every stage in order under one parent run: cluster -> experts -> compose -> evaluate.

The independent composition does not wait for the compose stage: each expert's blocks and
gates start training as soon as the central model and that expert are registered, while the
other experts still train (`compose.early`).

A resumed pipeline skips what it has completed: a finished cluster run, registered experts
(the experts stage itself skips them and resumes the others from their checkpoints),
compositions registered for a mode, a finished evaluation (its table is printed again).
"""
from __future__ import annotations

from dataclasses import replace

from pipeline.store.catalog import Catalog
from pipeline.config import Config
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import EarlyIndependent, run_compose
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.experts import run_experts


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
