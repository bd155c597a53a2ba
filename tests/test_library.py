"""The expert library: two pipelines on different corpora, one registry; experts reused across them."""
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

import textgen
from stores import module_home
from pipeline.artifacts import ChecksumError
from pipeline.cli import main
from pipeline.compose_stage import pipeline_models, run_add, run_compose
from pipeline.config import load_config
from pipeline.expert_stage import run_experts
from pipeline.library import (composition_parts, list_models, load_registered, parse_filters, resolve_version,
                              set_alias, show_model)
from pipeline.stages import StageError, run_cluster
from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
SMALL = ["cluster.k=2", "cluster.svd_dim=8", "cluster.min_df=1", "tracking.experiment=library",
         "experts.train.max_tokens=6000", "experts.train.ckpt_every=0", "compose.modes=[independent]",
         "compose.blocks_train={max_tokens: 4000, batch_size: 8, lr: 0.003, warmup_steps: 1}",
         "compose.gates_train={max_tokens: 2000, batch_size: 8, lr: 0.005, warmup_steps: 1}",
         "compose.eval_tokens=2048", "compose.center_tokens=2048"]


def pipeline_on(home: Path, domains: list[str], seed: int):
    path = home / f"{'-'.join(domains)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(25, domains, seed=seed)))
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["corpus.source=files", f"corpus.files=[{path}]", *SMALL])
    pipeline_id = run_cluster(cfg)
    run_experts(cfg, pipeline_id)
    return cfg, pipeline_id


@pytest.fixture(scope="module")
def library(tmp_path_factory, ray_local):
    with module_home(tmp_path_factory, "library-home") as home:
        cfg_a, a = pipeline_on(home, ["cooking", "sailing"], seed=0)
        cfg_b, b = pipeline_on(home, ["finance", "astronomy"], seed=1)
        yield {"home": home, "cfg": cfg_a, "a": a, "b": b, "tracker": Tracker(cfg_a)}


def artifact_file(tracker, version, relative: str) -> Path:
    """The local file behind a version's artifact (sqlite backend: a file:// artifact store)."""
    run = tracker.client.get_run(version.run_id)
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / relative


def test_experts_of_two_pipelines_on_different_corpora_compose_together(library):
    cfg, tracker = library["cfg"], library["tracker"]
    central, experts_a = pipeline_models(tracker, library["a"])
    _, experts_b = pipeline_models(tracker, library["b"])
    (uri,) = run_compose(cfg, library["a"], central, experts_a + experts_b).values()
    state, manifest = composition_parts(tracker, resolve_version(tracker, uri), library["home"] / "check")
    assert manifest["experts"] == experts_a + experts_b and manifest["central"] == central
    assert {k.split(".")[1] for k in state if k.startswith("blocks.")} == {"0", "1", "2", "3"}
    pipelines = {resolve_version(tracker, u).tags["moie.pipeline"] for u in manifest["experts"]}
    assert pipelines == {library["a"], library["b"]}


def test_adding_an_expert_trains_only_its_parameters_and_keeps_the_rest_bit_identical(library):
    cfg, tracker = library["cfg"], library["tracker"]
    (base,) = run_compose(cfg, library["a"]).values()
    _, experts_b = pipeline_models(tracker, library["b"])
    added = run_add(cfg, experts_b[0], base)
    old, old_manifest = composition_parts(tracker, resolve_version(tracker, base), library["home"] / "old")
    new, new_manifest = composition_parts(tracker, resolve_version(tracker, added), library["home"] / "new")
    for key, value in old.items():
        assert (new[key] == value).all() and new[key].dtype == value.dtype, key
    extra = set(new) - set(old)
    n = len(old_manifest["experts"])
    assert extra and all(k.startswith((f"blocks.{n}.", f"gates.{n}.")) for k in extra)
    assert new_manifest["experts"] == old_manifest["experts"] + [experts_b[0]]
    assert resolve_version(tracker, added).tags["moie.added_to"] == base
    from pipeline.evaluate_stage import pipeline_compositions

    # the pipeline's own independent composition is still the base, not the one with a foreign expert
    assert pipeline_compositions(tracker, library["a"])["independent"].version == resolve_version(tracker, base).version
    with pytest.raises(StageError, match="already an expert of"):
        run_add(cfg, experts_b[0], added)


def test_an_alias_names_a_version_wherever_a_uri_is_and_the_exact_version_is_recorded(library):
    cfg, tracker = library["cfg"], library["tracker"]
    central, experts_a = pipeline_models(tracker, library["a"])
    _, experts_b = pipeline_models(tracker, library["b"])
    alias_uri = set_alias(tracker, experts_b[1], "@second")
    assert alias_uri == "models:/moie-expert@second"
    assert resolve_version(tracker, alias_uri).version == resolve_version(tracker, experts_b[1]).version
    (uri,) = run_compose(cfg, library["a"], central, [experts_a[0], alias_uri]).values()
    _, manifest = composition_parts(tracker, resolve_version(tracker, uri), library["home"] / "alias")
    assert manifest["experts"] == [experts_a[0], experts_b[1]]  # the version, not the alias
    with pytest.raises(StageError, match="alias @nope of moie-expert does not exist"):
        resolve_version(tracker, "models:/moie-expert@nope")
    with pytest.raises(StageError, match="must start with a letter"):
        set_alias(tracker, experts_b[1], "7")


def test_library_list_shows_every_model_with_its_lineage_fields_and_filters_by_tag(library, capsys):
    tracker = library["tracker"]
    rows = list_models(tracker)
    experts = [r for r in rows if r["name"] == "moie-expert"]
    assert len(experts) == 4 and all(r["params"] > 0 and r["val_bpb"] and r["tokenizer"] for r in experts)
    assert {r["domain"] for r in experts} == {"cooking", "sailing", "finance", "astronomy"}
    assert {r["role"] for r in rows if r["name"] == "moie-central"} == {"dense+central"}
    cooking = list_models(tracker, parse_filters(["domain=cooking"]))
    assert [r["domain"] for r in cooking] == ["cooking"]
    assert main(["library", "list", "--json", "--filter", f"pipeline={library['b']}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["pipeline"] for r in printed} == {library["b"]} and len(printed) == 3  # 2 experts + central


def test_library_show_gives_corpus_pipeline_metrics_and_the_compositions_using_a_model(library):
    cfg, tracker = library["cfg"], library["tracker"]
    central, experts = pipeline_models(tracker, library["a"])
    (uri,) = run_compose(cfg, library["a"], central, experts[:1]).values()
    info = show_model(tracker, experts[0])
    assert info["pipeline"]["id"] == library["a"] and info["corpus"]["source"] == "files"
    assert info["cluster_run"] and "final_val_bpb" in info["metrics"]
    assert uri in info["used_by"]
    assert show_model(tracker, uri)["uses"] == [central, experts[0]]


def test_generate_samples_from_a_registered_composition_and_reports_the_routers_choice(library, capsys):
    cfg, tracker = library["cfg"], library["tracker"]
    (uri,) = run_compose(cfg, library["a"]).values()
    model, meta = load_registered(cfg, uri, library["home"] / "gen")
    assert [e["uri"] for e in meta["experts"]] == pipeline_models(tracker, library["a"])[1]
    capsys.readouterr()
    assert main(["generate", "--model", uri, "--prompt", "Flour butter", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Flour butter")
    assert "router (top-1 share of routed rows): models:/moie-expert/" in out.err
    # an expert by URI too
    assert main(["generate", "--model", meta["experts"][0]["uri"], "--max-new-tokens", "5"]) == 0


def test_a_tokenizer_mismatch_is_refused(library):
    cfg, tracker = library["cfg"], library["tracker"]
    central, experts = pipeline_models(tracker, library["a"])
    v = resolve_version(tracker, experts[1])
    tracker.client.set_model_version_tag(v.name, v.version, "moie.tokenizer", "0123456789abcdef")
    try:
        with pytest.raises(StageError, match="must share one tokenizer"):
            run_compose(cfg, library["a"], central, experts)
    finally:
        tracker.client.set_model_version_tag(v.name, v.version, "moie.tokenizer",
                                             resolve_version(tracker, experts[0]).tags["moie.tokenizer"])


def test_a_model_version_that_no_longer_exists_is_a_clear_error(library):
    cfg, tracker = library["cfg"], library["tracker"]
    central, experts = pipeline_models(tracker, library["a"])
    with pytest.raises(StageError, match="model version models:/moie-expert/999 does not exist"):
        run_compose(cfg, library["a"], central, [experts[0], "models:/moie-expert/999"])
    with pytest.raises(StageError, match="must look like models:/"):
        resolve_version(tracker, "runs:/abc/model")


def test_an_artifact_whose_checksum_does_not_match_is_refused(library):
    cfg, tracker = library["cfg"], library["tracker"]
    _, experts = pipeline_models(tracker, library["a"])
    path = artifact_file(tracker, resolve_version(tracker, experts[0]), "model/model.safetensors")
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-4] + bytes(4))  # same size, last bytes changed
        with pytest.raises(ChecksumError, match="refusing to load it"):
            load_registered(cfg, experts[0], library["home"] / "tampered")
    finally:
        path.write_bytes(original)
    model, _ = load_registered(cfg, experts[0], library["home"] / "restored")
    assert isinstance(model, torch.nn.Module)


def test_a_composition_manifest_from_a_newer_format_is_refused(library):
    cfg, tracker = library["cfg"], library["tracker"]
    (uri,) = run_compose(cfg, library["a"]).values()
    path = artifact_file(tracker, resolve_version(tracker, uri), "composition/composition_manifest.json")
    original = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(original), "format": 99}))
        with pytest.raises(StageError, match="format 99, newer than this moie reads"):
            load_registered(cfg, uri, library["home"] / "newer")
    finally:
        path.write_text(original)


def test_an_expert_cannot_be_added_to_a_joint_composition(library):
    from dataclasses import replace

    cfg, tracker = library["cfg"], library["tracker"]
    joint_cfg = replace(cfg, compose=replace(cfg.compose, modes=["joint"],
                                             joint_train={"max_tokens": 2000, "batch_size": 8}))
    (joint,) = run_compose(joint_cfg, library["a"]).values()
    _, experts_b = pipeline_models(tracker, library["b"])
    with pytest.raises(StageError, match="is a joint composition"):
        run_add(cfg, experts_b[0], joint)


def test_a_version_without_a_recorded_checksum_is_refused(library):
    cfg, tracker = library["cfg"], library["tracker"]
    _, experts = pipeline_models(tracker, library["a"])
    v = resolve_version(tracker, experts[0])
    tracker.client.delete_model_version_tag(v.name, v.version, "moie.sha256")
    try:
        with pytest.raises(ChecksumError, match="has no moie.sha256 tag"):
            load_registered(cfg, experts[0], library["home"] / "untagged")
    finally:
        tracker.client.set_model_version_tag(v.name, v.version, "moie.sha256", v.tags["moie.sha256"])
