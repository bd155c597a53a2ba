"""All stages in order under one parent run: cluster -> experts -> compose -> evaluate.

A resumed pipeline skips what it has completed: a finished cluster run, registered experts
(the experts stage itself skips them and resumes the others from their checkpoints),
compositions registered for a mode, a finished evaluation (its table is printed again).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline.config import Config
from pipeline.tracking import Tracker


def run_pipeline(cfg: Config, resume: str | None = None) -> str:
    from pipeline.compose_stage import run_compose
    from pipeline.evaluate_stage import pipeline_compositions, run_evaluate
    from pipeline.expert_stage import run_experts
    from pipeline.stages import run_cluster

    tracker = Tracker(cfg)
    if resume and tracker.stage_runs(resume, "cluster"):
        tracker.pipeline_run(resume)
        print(f"cluster: done before, skipped (pipeline {resume})", flush=True)
        pipeline_id = resume
    else:
        pipeline_id = run_cluster(cfg, resume)
    print(f"pipeline {pipeline_id}", flush=True)
    run_experts(cfg, pipeline_id)
    done = pipeline_compositions(tracker, pipeline_id)
    modes = [m for m in cfg.compose.modes if m not in done]
    for mode in cfg.compose.modes:
        if mode in done:
            print(f"compose {mode}: done before, models:/{done[mode].name}/{done[mode].version}", flush=True)
    if modes:
        run_compose(replace(cfg, compose=replace(cfg.compose, modes=modes)), pipeline_id)
    evaluated = tracker.stage_runs(pipeline_id, "evaluate")
    if evaluated and not modes:
        with tempfile.TemporaryDirectory() as tmp:
            table = tracker.download_artifacts(evaluated[0].info.run_id, "results.md", Path(tmp))
            print(f"evaluate: done before (run {evaluated[0].info.run_id})\n{table.read_text()}", flush=True)
    else:
        run_evaluate(cfg, pipeline_id)
    return pipeline_id
