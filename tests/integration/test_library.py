"""The expert library: two pipelines on different corpora, one registry; experts reused across them."""
import json
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

import textgen
from stores import module_home

from artifacts import ChecksumError, sha256_file
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.serve.library import list_models, parse_filters, set_alias, show_model
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import run_add, run_compose
from pipeline.stages.experts import run_experts
from pipeline.store.catalog import Catalog
from pipeline.store.names import Tag

REPO = Path(__file__).resolve().parents[2]
SMALL = ["cluster.k=2", "cluster.svd_dim=8", "cluster.min_df=1", "tracking.experiment=library",
         "experts.train.max_tokens=6000", "experts.train.ckpt_every=0", "compose.modes=[independent]",
         "compose.blocks_train={max_tokens: 4000, batch_size: 8, lr: 0.003, warmup_steps: 1}",
         "compose.gates_train={max_tokens: 2000, batch_size: 8, lr: 0.005, warmup_steps: 1}",
         "compose.eval_tokens=2048", "compose.center_tokens=2048",
         "compose.dense_matched=false"]


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
        yield {"home": home, "cfg": cfg_a, "a": a, "b": b, "catalog": Catalog(cfg_a)}


def artifact_file(catalog, version, relative: str) -> Path:
    """The local file behind a version's artifact (sqlite backend: a file:// artifact store)."""
    run = catalog.client.get_run(version.run_id)
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / relative


def test_experts_of_two_pipelines_on_different_corpora_compose_together(library):
    cfg, catalog = library["cfg"], library["catalog"]
    central, experts_a = catalog.pipeline_models(library["a"])
    _, experts_b = catalog.pipeline_models(library["b"])
    (uri,) = run_compose(cfg, library["a"], central, experts_a + experts_b).values()
    state, manifest = catalog.composition_parts(catalog.resolve(uri), library["home"] / "check")
    assert manifest["experts"] == experts_a + experts_b and manifest["central"] == central
    assert {k.split(".")[1] for k in state if k.startswith("blocks.")} == {"0", "1", "2", "3"}
    pipelines = {catalog.resolve(u).tags["moie.pipeline"] for u in manifest["experts"]}
    assert pipelines == {library["a"], library["b"]}


def test_adding_an_expert_trains_only_its_parameters_and_keeps_the_rest_bit_identical(library):
    cfg, catalog = library["cfg"], library["catalog"]
    (base,) = run_compose(cfg, library["a"]).values()
    _, experts_b = catalog.pipeline_models(library["b"])
    added = run_add(cfg, experts_b[0], base)
    old, old_manifest = catalog.composition_parts(catalog.resolve(base), library["home"] / "old")
    new, new_manifest = catalog.composition_parts(catalog.resolve(added), library["home"] / "new")
    for key, value in old.items():
        if not key.startswith("kway."):
            assert (new[key] == value).all() and new[key].dtype == value.dtype, key
    # the k-way gate tells the base's experts apart, not the added one: the new version has none
    assert any(k.startswith("kway.") for k in old) and old_manifest["kway"]
    assert not any(k.startswith("kway.") for k in new) and not new_manifest["kway"]
    extra = set(new) - set(old)
    n = len(old_manifest["experts"])
    assert extra and all(k.startswith((f"blocks.{n}.", f"gates.{n}.", f"mixers.{n}.")) for k in extra)
    assert any(k.startswith(f"mixers.{n}.") for k in extra)  # its output gate too (compose.output: mix)
    assert new_manifest["experts"] == old_manifest["experts"] + [experts_b[0]]
    assert catalog.resolve(added).tags["moie.added_to"] == base

    # the pipeline's own independent composition is still the base, not the one with a foreign expert
    assert catalog.pipeline_compositions(library["a"])["independent"].version == catalog.resolve(base).version
    with pytest.raises(StageError, match="already an expert of"):
        run_add(cfg, experts_b[0], added)


def test_an_alias_names_a_version_wherever_a_uri_is_and_the_exact_version_is_recorded(library):
    cfg, catalog = library["cfg"], library["catalog"]
    central, experts_a = catalog.pipeline_models(library["a"])
    _, experts_b = catalog.pipeline_models(library["b"])
    alias_uri = set_alias(catalog, experts_b[1], "@second")
    assert alias_uri == "models:/moie-expert@second"
    assert catalog.resolve(alias_uri).version == catalog.resolve(experts_b[1]).version
    (uri,) = run_compose(cfg, library["a"], central, [experts_a[0], alias_uri]).values()
    _, manifest = catalog.composition_parts(catalog.resolve(uri), library["home"] / "alias")
    assert manifest["experts"] == [experts_a[0], experts_b[1]]  # the version, not the alias
    with pytest.raises(StageError, match="alias @nope of moie-expert does not exist"):
        catalog.resolve("models:/moie-expert@nope")
    with pytest.raises(StageError, match="must start with a letter"):
        set_alias(catalog, experts_b[1], "7")


def test_library_list_shows_every_model_with_its_lineage_fields_and_filters_by_tag(library, capsys):
    catalog = library["catalog"]
    rows = list_models(catalog)
    experts = [r for r in rows if r["name"] == "moie-expert"]
    assert len(experts) == 4 and all(r["params"] > 0 and r["val_bpb"] and r["tokenizer"] for r in experts)
    assert {r["domain"] for r in experts} == {"cooking", "sailing", "finance", "astronomy"}
    assert {r["role"] for r in rows if r["name"] == "moie-central"} == {"dense+central", "seed"}
    cooking = list_models(catalog, parse_filters(["domain=cooking"]))
    assert [r["domain"] for r in cooking] == ["cooking"]
    assert main(["library", "list", "--json", "--filter", f"pipeline={library['b']}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["pipeline"] for r in printed} == {library["b"]} and len(printed) == 4  # 2 experts, central, seed


def test_library_show_gives_corpus_pipeline_metrics_and_the_compositions_using_a_model(library):
    cfg, catalog = library["cfg"], library["catalog"]
    central, experts = catalog.pipeline_models(library["a"])
    (uri,) = run_compose(cfg, library["a"], central, experts[:1]).values()
    info = show_model(catalog, experts[0])
    assert info["pipeline"]["id"] == library["a"] and info["corpus"]["source"] == "files"
    assert info["cluster_run"] and "final_val_bpb" in info["metrics"]
    assert uri in info["used_by"]
    assert show_model(catalog, uri)["uses"] == [central, experts[0]]


def test_generate_samples_from_a_registered_composition_and_reports_the_routers_choice(library, capsys):
    cfg, catalog = library["cfg"], library["catalog"]
    (uri,) = run_compose(cfg, library["a"]).values()
    model, meta = catalog.load_registered(uri, library["home"] / "gen")
    assert [e["uri"] for e in meta["experts"]] == catalog.pipeline_models(library["a"])[1]
    capsys.readouterr()
    assert main(["generate", "--model", uri, "--prompt", "Flour butter", "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Flour butter")
    assert "router (top-1 share of routed rows): models:/moie-expert/" in out.err
    # an expert by URI too
    assert main(["generate", "--model", meta["experts"][0]["uri"], "--max-new-tokens", "5"]) == 0


def test_a_tokenizer_mismatch_is_refused(library):
    cfg, catalog = library["cfg"], library["catalog"]
    central, experts = catalog.pipeline_models(library["a"])
    v = catalog.resolve(experts[1])
    catalog.client.set_model_version_tag(v.name, v.version, "moie.tokenizer", "0123456789abcdef")
    try:
        with pytest.raises(StageError, match="must share one tokenizer"):
            run_compose(cfg, library["a"], central, experts)
    finally:
        catalog.client.set_model_version_tag(v.name, v.version, "moie.tokenizer",
                                             catalog.resolve(experts[0]).tags["moie.tokenizer"])


def test_a_model_version_that_no_longer_exists_is_a_clear_error(library):
    cfg, catalog = library["cfg"], library["catalog"]
    central, experts = catalog.pipeline_models(library["a"])
    with pytest.raises(StageError, match="model version models:/moie-expert/999 does not exist"):
        run_compose(cfg, library["a"], central, [experts[0], "models:/moie-expert/999"])
    with pytest.raises(StageError, match="must look like models:/"):
        catalog.resolve("runs:/abc/model")


def test_an_artifact_whose_checksum_does_not_match_is_refused(library):
    catalog = library["catalog"]
    _, experts = catalog.pipeline_models(library["a"])
    path = artifact_file(catalog, catalog.resolve(experts[0]), "model/data/model/model.safetensors")
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-4] + bytes(4))  # same size, last bytes changed
        with pytest.raises(ChecksumError, match="refusing to load it"):
            catalog.load_registered(experts[0], library["home"] / "tampered")
    finally:
        path.write_bytes(original)
    model, _ = catalog.load_registered(experts[0], library["home"] / "restored")
    assert isinstance(model, torch.nn.Module)


def test_a_composition_manifest_from_a_newer_format_is_refused(library):
    cfg, catalog = library["cfg"], library["catalog"]
    (uri,) = run_compose(cfg, library["a"]).values()
    version = catalog.resolve(uri)
    path = artifact_file(catalog, version, "composition/data/composition/composition_manifest.json")
    original = path.read_text()
    pin = json.loads(version.tags[Tag.FILES])
    try:  # as a newer moie would write and register it: its checksum pinned
        path.write_text(json.dumps({**json.loads(original), "format": 99}))
        newer = {**pin, "data/composition/composition_manifest.json": sha256_file(path)}
        catalog.client.set_model_version_tag(version.name, version.version, Tag.FILES, json.dumps(newer))
        with pytest.raises(StageError, match="format 99, newer than this moie reads"):
            catalog.load_registered(uri, library["home"] / "newer")
    finally:
        path.write_text(original)
        catalog.client.set_model_version_tag(version.name, version.version, Tag.FILES, version.tags[Tag.FILES])


def test_a_composition_manifest_changed_in_the_store_is_refused(library):
    cfg, catalog = library["cfg"], library["catalog"]
    (uri,) = run_compose(cfg, library["a"]).values()
    path = artifact_file(catalog, catalog.resolve(uri), "composition/data/composition/composition_manifest.json")
    original = path.read_text()
    try:  # the routing it would be built with, changed behind the registry's back
        path.write_text(json.dumps({**json.loads(original), "k": 1}))
        with pytest.raises(ChecksumError, match=r"models:/moie-composition/\d+ .*: data/composition/composition_manifest.json has sha256"):
            catalog.load_registered(uri, library["home"] / "changed")
    finally:
        path.write_text(original)


def test_an_expert_cannot_be_added_to_a_joint_composition(library):
    from dataclasses import replace

    cfg, catalog = library["cfg"], library["catalog"]
    joint_cfg = replace(cfg, compose=replace(cfg.compose, modes=["joint"],
                                             joint_train={"max_tokens": 2000, "batch_size": 8}))
    (joint,) = run_compose(joint_cfg, library["a"]).values()
    _, experts_b = catalog.pipeline_models(library["b"])
    with pytest.raises(StageError, match="is a joint composition"):
        run_add(cfg, experts_b[0], joint)


def test_a_version_without_its_pin_in_the_registry_is_refused(library):
    catalog = library["catalog"]
    _, experts = catalog.pipeline_models(library["a"])
    v = catalog.resolve(experts[0])
    catalog.client.delete_model_version_tag(v.name, v.version, Tag.FILES)
    try:
        with pytest.raises(ChecksumError, match="has no moie.sha256.files tag"):
            catalog.load_registered(experts[0], library["home"] / "untagged")
    finally:
        catalog.client.set_model_version_tag(v.name, v.version, Tag.FILES, v.tags[Tag.FILES])


def test_a_composition_missing_a_deleted_expert_is_refused_unless_allowed_and_then_records_the_gap(library):
    cfg, catalog, pipeline_id = library["cfg"], library["catalog"], library["b"]
    (whole,) = run_compose(cfg, pipeline_id).values()
    _, experts = catalog.pipeline_models(pipeline_id)
    deleted = catalog.resolve(experts[1])
    catalog.client.delete_model_version(deleted.name, deleted.version)
    try:
        with pytest.raises(StageError, match=r"no expert for 1 of its clusters \(expert-1: no version of it is "
                                             r"registered.*--allow-missing-experts"):
            run_compose(cfg, pipeline_id)
        assert show_model(catalog, whole)["uses"][2] == f"{experts[1]} (deleted: the composition cannot load)"
        allowed = replace(cfg, compose=replace(cfg.compose, allow_missing_experts=True))
        (partial,) = run_compose(allowed, pipeline_id).values()
        version = catalog.resolve(partial)
        _, manifest = catalog.composition_parts(version, library["home"] / "partial")
        assert manifest["experts"] == experts[:1] and list(manifest["missing_experts"]) == ["expert-1"]
        assert json.loads(version.tags[Tag.MISSING_EXPERTS]) == manifest["missing_experts"]
        assert Tag.MISSING_EXPERTS in catalog.client.get_run(version.run_id).data.tags
    finally:  # registered again (a new version of the same run's files), for the module's other tests
        catalog.client.create_model_version(deleted.name, deleted.source, run_id=deleted.run_id, tags=deleted.tags)
