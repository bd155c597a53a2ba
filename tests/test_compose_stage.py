"""The compose stage for real: experts from the experts stage, local Ray, MLflow registry."""
import json
from pathlib import Path

import pytest

import textgen
from pipeline.compose_stage import COMPOSITION_MODEL, run_compose
from pipeline.config import load_config
from pipeline.expert_stage import run_experts
from pipeline.stages import StageError, run_cluster
from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_pipeline(tmp_path_factory, ray_local):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("compose-home")
        mp.setenv("MOIE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield from _trained_pipeline(home)


def _trained_pipeline(home):
    path = home / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(30, ["cooking", "sailing", "finance"], seed=0)))
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "corpus.source=files", f"corpus.files=[{path}]", "cluster.k=3", "cluster.svd_dim=8", "cluster.min_df=1",
        "tracking.experiment=test", "experts.train.max_tokens=30000", "experts.train.ckpt_every=0",
        "compose.blocks_train={max_tokens: 30000, batch_size: 8, lr: 0.003, warmup_steps: 2}",
        "compose.gates_train={max_tokens: 8000, batch_size: 8, lr: 0.005, warmup_steps: 1}",
        "compose.joint_train={max_tokens: 24000, batch_size: 8, lr: 0.003, warmup_steps: 2}"])
    pipeline_id = run_cluster(cfg)
    run_experts(cfg, pipeline_id)
    yield cfg, pipeline_id


def test_compose_stage_runs_both_modes_and_registers_compositions_better_than_central(trained_pipeline):
    cfg, pipeline_id = trained_pipeline
    registered = run_compose(cfg, pipeline_id)
    assert sorted(registered) == ["independent", "joint"]
    tracker = Tracker(cfg)
    runs = tracker.stage_runs(pipeline_id, "compose")
    assert sorted(r.data.tags["moie.mode"] for r in runs) == ["independent", "joint"]
    for run in runs:
        assert run.data.metrics["val_bpb"] < run.data.metrics["central_val_bpb"]
        files = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "composition")}
        assert {"composition/composition.safetensors", "composition/composition_manifest.json"} <= files
    versions = tracker.client.search_model_versions(f"name = '{COMPOSITION_MODEL}'")
    assert len(versions) == 2
    manifest = json.loads(Path(tracker.client.download_artifacts(
        runs[0].info.run_id, "composition/composition_manifest.json")).read_text())
    assert manifest["central"].startswith("models:/moie-central/") and len(manifest["experts"]) == 3


def test_a_manifest_naming_a_missing_model_version_is_a_clear_error(trained_pipeline):
    cfg, pipeline_id = trained_pipeline
    with pytest.raises(StageError, match="model version models:/moie-expert/999 does not exist"):
        run_compose(cfg, pipeline_id, "models:/moie-central/1", ["models:/moie-expert/999"])
    with pytest.raises(StageError, match="must look like models:/"):
        run_compose(cfg, pipeline_id, "models:/moie-central/1", ["runs:/abc/model"])


def test_experts_with_different_tokenizers_are_refused(trained_pipeline):
    cfg, pipeline_id = trained_pipeline
    tracker = Tracker(cfg)
    tracker.client.set_model_version_tag("moie-expert", "2", "moie.tokenizer", "0000000000000000")
    try:
        with pytest.raises(StageError, match="must share one tokenizer"):
            run_compose(cfg, pipeline_id, "models:/moie-central/1", ["models:/moie-expert/1", "models:/moie-expert/2"])
    finally:
        fp = tracker.client.get_model_version("moie-expert", "1").tags["moie.tokenizer"]
        tracker.client.set_model_version_tag("moie-expert", "2", "moie.tokenizer", fp)
