"""The compose stage for real: experts from the experts stage, local Ray, MLflow registry."""
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

import textgen
from stores import module_home

from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import run_compose
from pipeline.stages.experts import run_experts
from pipeline.store.catalog import Catalog
from pipeline.store.names import COMPOSITION_MODEL
from pipeline.store.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_pipeline(tmp_path_factory, ray_local):
    with module_home(tmp_path_factory, "compose-home") as home:
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
    assert sorted(r.data.tags["moie.mode"] for r in runs) == ["dense_matched", "independent", "joint"]
    runs = [r for r in runs if r.data.tags["moie.mode"] != "dense_matched"]
    for run in runs:
        m = run.data.metrics
        assert m["val_bpb"] < m["central_val_bpb"]
        # validation covers every cluster, each scored on its own documents (not a corpus-ordered prefix)
        clusters = [f"expert-{c}" for c in range(3)]
        assert sorted(k.removeprefix("val_bpb/") for k in m if k.startswith("val_bpb/")) == clusters
        assert len({m[f"central_val_bpb/{c}"] for c in clusters}) == 3  # three different sets of documents
        assert m["val_bpb_macro"] == pytest.approx(sum(m[f"val_bpb/{c}"] for c in clusters) / 3)
        # independent compositions end in an output point (validation scores them with and without it);
        # a joint one has none: its blocks and gates trained without one
        mixing = run.data.tags["moie.mode"] == "independent"
        assert ("no_mix_val_bpb_macro" in m) == mixing and ("expert0_mix_loss" in m) == mixing
        assert run.data.params["output"] == ("mix" if mixing else "none")
        # the gates routing alone, scored on validation: PHATGOOSE's top-k and (independent) the k-way gate
        assert ("val_routing_accuracy/kway" in m) == mixing and ("kway_loss" in m) == mixing
        assert ("val_routing_accuracy/topk" in m) == mixing
        files = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "composition")}
        assert {"composition/MLmodel", "composition/data"} <= files  # an MLflow pyfunc model
        files = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "composition/data/composition")}
        assert {f"composition/data/composition/{f}" for f in
                ("composition.safetensors", "composition.json", "composition_manifest.json")} == files
    versions = tracker.client.search_model_versions(f"name = '{COMPOSITION_MODEL}'")
    assert len(versions) == 2
    manifest = json.loads(Path(tracker.client.download_artifacts(
        runs[0].info.run_id, "composition/data/composition/composition_manifest.json")).read_text())
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


def test_a_resumed_pipeline_composes_what_is_missing_evaluates_and_then_skips_every_stage(trained_pipeline, capsys):
    from pipeline.results.compressors import SYSTEMS as COMPRESSORS
    from pipeline.results.metrics import COMPOSED
    from pipeline.stages.sequence import run_pipeline

    cfg, pipeline_id = trained_pipeline
    assert run_pipeline(cfg, pipeline_id) == pipeline_id
    tracker = Tracker(cfg)
    (evaluation,) = tracker.stage_runs(pipeline_id, "evaluate")
    metrics = evaluation.data.metrics
    domains = ["cooking", "finance", "sailing"]
    systems = ["dense", "central", "oracle", "cbtm_top1", "cbtm_top2", "cbtm_all", COMPOSED["independent"],
               COMPOSED["joint"], "composed_adaptive", "composed_independent_kway", *COMPRESSORS]
    for system in systems:
        for part in [*domains, "all"]:
            assert math.isfinite(metrics[f"bpb/{system}/{part}"]), (system, part)
    # disjoint vocabularies: the cBTM router sends (almost) every byte to its domain's expert; the
    # k-way gate, trained with every cluster's text as the others' negatives, is well above chance (1/3)
    assert metrics["routing_accuracy/cbtm_top1"] > 0.9
    assert metrics["routing_accuracy/composed_independent_kway"] > 0.5
    assert metrics["experts_per_token/composed_joint"] == pytest.approx(cfg.compose.k)
    for system in ["cbtm_top1", "composed_independent"]:
        loads = [metrics[f"load/{system}/expert{e}"] for e in range(3)]
        assert sum(loads) == pytest.approx(1.0)
    # the oracle is each domain's own expert
    for domain in domains:
        assert min(metrics[f"bpb/expert{e}/{domain}"] for e in range(3)) <= metrics[f"bpb/oracle/{domain}"] + 1e-9
        assert metrics[f"bpb/oracle/{domain}"] in {metrics[f"bpb/expert{e}/{domain}"] for e in range(3)}
    # the matched-compute baseline: the dense model trained on for what composition spent beyond
    # it (experts' own steps and the compose stage's, counted in every composed system's cost)
    assert metrics["bpb/dense_matched/all"] < metrics["bpb/dense/all"]
    composed = max(metrics[f"train_pflops/{s}"] for s in (COMPOSED["independent"], COMPOSED["joint"],
                                                           "composed_independent_kway"))  # + the k-way gate
    assert metrics["train_pflops/composed_independent_kway"] > metrics[f"train_pflops/{COMPOSED['independent']}"]
    assert composed > metrics["train_pflops/dense"]
    assert 0 <= metrics["train_pflops/dense_matched"] - composed <= 0.01 * composed  # whole steps: at most one more
    for system in ["composed_independent", "composed_joint", "cbtm_top1"]:
        for baseline in ["dense", "dense_matched"]:
            key = f"delta/{system}_vs_{baseline}"
            assert metrics[f"{key}/ci_low"] <= metrics[f"{key}/mean"] <= metrics[f"{key}/ci_high"]
            assert metrics[f"{key}/mean"] == pytest.approx(metrics[f"bpb/{system}/all"] - metrics[f"bpb/{baseline}/all"])
    for domain in domains:
        assert 0 <= metrics[f"heldout_overlap/{domain}"] <= cfg.evaluate.max_overlap
    files = {a.path for a in tracker.client.list_artifacts(evaluation.info.run_id)}
    assert {"results.md", "results.csv", "deltas.csv", "bpb_by_domain.png", "routing_heatmap.png", "curves", "manifest.json"} <= files
    curves = {a.path for a in tracker.client.list_artifacts(evaluation.info.run_id, "curves")}
    assert {"curves/expert-0.png", "curves/dense.png"} <= curves
    parent = tracker.client.get_run(pipeline_id).data.metrics
    assert parent["bpb/dense/all"] == metrics["bpb/dense/all"] and "bpb/dense/cooking" not in parent
    table = capsys.readouterr().out
    assert "| composed_joint |" in table

    # again: every stage is complete, so nothing new runs and the table is printed again
    runs_before = {r.info.run_id for stage in ("cluster", "experts", "compose", "evaluate")
                   for r in tracker.stage_runs(pipeline_id, stage, None)}
    run_pipeline(cfg, pipeline_id)
    runs_after = {r.info.run_id for stage in ("cluster", "experts", "compose", "evaluate")
                  for r in tracker.stage_runs(pipeline_id, stage, None)}
    assert runs_after == runs_before
    assert "evaluate: done before" in capsys.readouterr().out


def test_evaluate_scores_other_text_given_as_eval_data(trained_pipeline, tmp_path):
    from pipeline.stages.evaluate import run_evaluate

    cfg, pipeline_id = trained_pipeline
    path = tmp_path / "ood.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(3, ["astronomy"], seed=5)))
    outcome = run_evaluate(cfg, pipeline_id, str(path))
    assert outcome["domains"] == ["astronomy"]
    assert math.isfinite(outcome["metrics"]["bpb/cbtm_top1/astronomy"])
    assert "routing_accuracy/cbtm_top1" not in outcome["metrics"]  # no expert's domain: nothing to be accurate about


def test_evaluate_points_champion_at_the_composition_best_on_validation_and_says_so(trained_pipeline, capsys):
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.store.catalog import Catalog, exact_uri
    from pipeline.store.names import CHAMPION, COMPOSITION_MODEL

    cfg, pipeline_id = trained_pipeline
    catalog = Catalog(cfg)
    compositions = catalog.pipeline_compositions(pipeline_id)
    assert len(compositions) == 2
    val_bpb = {exact_uri(v): catalog.client.get_run(v.run_id).data.metrics["val_bpb"] for v in compositions.values()}
    best = min(val_bpb, key=val_bpb.get)
    worst = max(val_bpb, key=val_bpb.get)
    name, _, version = worst.removeprefix("models:/").partition("/")
    catalog.client.set_registered_model_alias(name, CHAMPION, version)  # wrong before evaluate runs
    run_evaluate(cfg, pipeline_id)
    assert exact_uri(catalog.client.get_model_version_by_alias(COMPOSITION_MODEL, CHAMPION)) == best
    assert f"models:/{COMPOSITION_MODEL}@{CHAMPION} -> {best}" in capsys.readouterr().out
    newest = Tracker(cfg).stage_runs(pipeline_id, "evaluate")[0]
    assert newest.data.tags["moie.champion"] == best


def _drop_matched(cfg, pipeline_id):
    """Delete the pipeline's registered dense_matched version (as if the stage stopped before it)."""
    catalog = Catalog(cfg)
    version = catalog.matched_model(pipeline_id)
    if version is not None:
        catalog.client.delete_model_version(version.name, version.version)
    assert catalog.matched_model(pipeline_id) is None
    return catalog


def test_a_failing_compose_stage_cancels_dense_matched_and_ends_its_run_failed(trained_pipeline, monkeypatch):
    import pipeline.stages.compose as compose

    cfg, pipeline_id = trained_pipeline
    catalog = _drop_matched(cfg, pipeline_id)

    def broken_mode(*args, **kwargs):
        raise RuntimeError("a composition failed")

    monkeypatch.setattr(compose, "_compose_mode", broken_mode)
    with pytest.raises(RuntimeError, match="a composition failed"):
        run_compose(cfg, pipeline_id)
    runs = [r for r in catalog.tracker.stage_runs(pipeline_id, "compose", None)
            if r.data.tags.get("moie.mode") == "dense_matched"]
    assert runs[0].info.status == "FAILED"  # the newest: not left RUNNING
    assert all(r.info.status != "RUNNING" for r in runs)
    assert catalog.matched_model(pipeline_id) is None


def test_a_resumed_pipeline_trains_a_missing_dense_matched_and_evaluates_again(trained_pipeline):
    from pipeline.stages.sequence import run_pipeline

    cfg, pipeline_id = trained_pipeline
    run_pipeline(cfg, pipeline_id)  # everything done (a no-op after the tests above) ...
    catalog = _drop_matched(cfg, pipeline_id)  # ... but the matched baseline
    compositions = {m: v.version for m, v in catalog.pipeline_compositions(pipeline_id).items()}
    evaluations = len(catalog.tracker.stage_runs(pipeline_id, "evaluate"))
    run_pipeline(cfg, pipeline_id)
    assert catalog.matched_model(pipeline_id) is not None
    assert {m: v.version for m, v in catalog.pipeline_compositions(pipeline_id).items()} == compositions
    newest = catalog.tracker.stage_runs(pipeline_id, "evaluate")
    assert len(newest) == evaluations + 1 and "bpb/dense_matched/all" in newest[0].data.metrics



def test_the_seed_is_registered_and_composing_on_it_is_a_system_that_pays_no_dense_second_half(trained_pipeline):
    """The seed hub: the dense model at seed_fraction, registered by the experts stage; `--central
    seed` composes on it; evaluate scores it as its own system, costing seed + experts + glue."""
    from dataclasses import replace

    from experts.checkpoint import load_model
    from pipeline.stages.evaluate import run_evaluate
    from pipeline.store import storage
    from pipeline.store.catalog import exact_uri
    from pipeline.store.names import Tag

    cfg, pipeline_id = trained_pipeline
    catalog = Catalog(cfg)
    seed = catalog.seed_model(pipeline_id)
    assert seed is not None and seed.tags["moie.role"] == "seed"
    dense = catalog.dense_model(pipeline_id)
    # the registered seed is the model every expert branched from (the export in the storage)
    expert = catalog.resolve(catalog.pipeline_models(pipeline_id)[1][0])
    with tempfile.TemporaryDirectory() as tmp:
        registered, _ = load_model(catalog.model_dir(seed, Path(tmp) / "seed"))
        exported, _ = load_model(storage.local_copy(Catalog.seed_dir(expert.tags[Tag.STORAGE_ROOT]), Path(tmp) / "x"))
    assert all(torch.equal(a, b) for a, b in zip(registered.state_dict().values(), exported.state_dict().values()))
    assert int(seed.tags["moie.seed_tokens"]) == int(expert.tags["moie.seed_tokens"])
    assert seed.tags["moie.sha256.tokens.train"] == dense.tags["moie.sha256.tokens.train"]

    only_independent = replace(cfg, compose=replace(cfg.compose, modes=["independent"]))
    uris = run_compose(only_independent, pipeline_id, "seed")
    on_seed = catalog.pipeline_compositions(pipeline_id)
    assert exact_uri(on_seed["independent_seed"]) == uris["independent"]
    assert on_seed["independent_seed"].tags["moie.central"] == exact_uri(seed)
    assert on_seed["independent"].tags["moie.central"] == exact_uri(dense)  # the full-dense one is still there

    metrics = run_evaluate(cfg, pipeline_id)["metrics"]
    compose_pflops = catalog.client.get_run(on_seed["independent_seed"].run_id).data.metrics["train_pflops"]
    experts_pflops = metrics["train_pflops/cbtm_top1"]  # the seed, counted once, plus every expert's own steps
    assert metrics["train_pflops/composed_seed_independent"] == pytest.approx(experts_pflops + compose_pflops)
    assert metrics["train_pflops/composed_seed_independent"] < metrics["train_pflops/composed_independent"]
    assert math.isfinite(metrics["bpb/composed_seed_independent/all"])
    # composition in output space: lambda from validation, the seed's mixture as costly as cBTM,
    # compared at equal compute with the dense model itself
    for system, hub in (("mixture_seed", "seed"), ("mixture_central", "central")):
        assert 0 <= metrics[f"mixture_lambda/{system}"] <= 1 and math.isfinite(metrics[f"bpb/{system}/all"])
        assert metrics[f"equal_compute/{system}/ci_low"] <= metrics[f"equal_compute/{system}/ci_high"]
    assert metrics["train_pflops/mixture_seed"] == pytest.approx(metrics["train_pflops/cbtm_top1"])
    assert metrics["equal_compute/mixture_seed/dense_pflops"] == pytest.approx(metrics["train_pflops/dense"])
    assert metrics["train_pflops/seed"] < metrics["train_pflops/dense"]


def test_a_costlier_composition_config_trains_a_new_dense_matched_for_its_compute(trained_pipeline):
    """Equal compute holds when the compositions grow: composing again with a config that spends
    more than the registered dense_matched was trained for trains a new one for the new budget."""
    from dataclasses import replace

    cfg, pipeline_id = trained_pipeline
    catalog = Catalog(cfg)
    old = catalog.matched_model(pipeline_id)
    had = catalog.client.get_run(old.run_id).data.metrics["matched_pflops"]
    mix = {**cfg.compose.mix_train, "max_tokens": 4 * cfg.compose.mix_train["max_tokens"]}
    run_compose(replace(cfg, compose=replace(cfg.compose, modes=["independent"], mix_train=mix)), pipeline_id)
    new = catalog.matched_model(pipeline_id)
    assert int(new.version) > int(old.version)
    run = catalog.client.get_run(new.run_id)
    assert run.data.metrics["matched_pflops"] > had
    assert int(run.data.params["max_tokens"]) > int(catalog.client.get_run(old.run_id).data.params["max_tokens"])
