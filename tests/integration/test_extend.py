"""`moie extend` for real: a finished tiny pipeline (local Ray, MLflow registry) grown by a new
domain; and the pieces it is made of (the grown router, mixed documents, replay, intervals)."""
import contextlib
import hashlib
import io
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import textgen
from randomise import assert_causal, randomise_
from stores import module_home

from composition.intervals import paired_bootstrap, stratified_bootstrap
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import run_compose
from pipeline.stages.experts import run_experts
from pipeline.stages.extend import mixed_documents, replay_tokens
from pipeline.store import storage
from pipeline.store.catalog import Catalog, exact_uri
from pipeline.store.names import COMPOSITION_MODEL, EXPERT_MODEL, Tag
from routing.router import ClusterRouter

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["cluster.k=3", "cluster.svd_dim=8", "cluster.min_df=1", "tracking.experiment=test",
             "experts.train.max_tokens=30000", "experts.train.ckpt_every=0", "compose.modes=[independent]",
             "compose.dense_matched=false",
             "compose.blocks_train={max_tokens: 12000, batch_size: 8, lr: 0.003, warmup_steps: 2}",
             "compose.gates_train={max_tokens: 4000, batch_size: 8, lr: 0.005, warmup_steps: 1}",
             "compose.mix_train={max_tokens: 4000, batch_size: 8, lr: 0.01, warmup_steps: 1}",
             "extend.train={max_tokens: 12000, ckpt_every: 0}", "extend.old_bytes_per_domain=3000",
             "evaluate.max_bytes_per_domain=6000", "evaluate.bootstrap=200"]


def new_domain_rows(n: int, seed: int = 1) -> list[dict]:
    """A domain the pipeline never trained on: astronomy documents."""
    rng = random.Random(seed)
    return [{"text": textgen.document(rng, "astronomy"), "work": f"astronomy-{i}"} for i in range(n)]


def old_domain_rows() -> list[dict]:
    """The pipeline's corpus: cooking, sailing, finance, each document ending in one sentence of
    astronomy words, as a corpus mentions in passing what it is not about: the router's vocabulary
    (fitted on this corpus) knows the words the new domain is written in."""
    rng = random.Random(2)
    return [dict(r, text=r["text"] + " " + textgen.sentence(rng, textgen.VOCABULARIES["astronomy"]))
            for r in textgen.corpus(30, ["cooking", "sailing", "finance"], seed=0)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory, ray_local):
    with module_home(tmp_path_factory, "extend-home") as home:
        path = write_jsonl(home / "docs.jsonl", old_domain_rows())
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["corpus.source=files", f"corpus.files=[{path}]", *OVERRIDES])
        pipeline_id = run_cluster(cfg)
        run_experts(cfg, pipeline_id)
        run_compose(cfg, pipeline_id)
        yield cfg, pipeline_id, home


def store_state(cfg, home: Path) -> dict:
    """Every run, registered version and stored file: what a refused command must leave as it was."""
    catalog = Catalog(cfg)
    runs = catalog.client.search_runs([catalog.tracker.experiment_id], max_results=1000)
    versions = [exact_uri(v) for name in (EXPERT_MODEL, "moie-central", COMPOSITION_MODEL)
                for v in catalog.versions(name)]
    files = sorted(str(p.relative_to(home)) for p in (home / "checkpoints").rglob("*"))
    return {"runs": sorted((r.info.run_id, r.info.status) for r in runs), "versions": versions, "files": files}


def file_digests(catalog: Catalog, uris: list[str]) -> dict[str, str]:
    """sha256 of every registered model's weights as stored now, read back from the artifact store."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, uri in enumerate(uris):
            folder = Path(catalog.model_dir(catalog.resolve(uri), Path(tmp) / str(i)))
            out[uri] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def extended(finished_pipeline, tmp_path_factory):
    cfg, pipeline_id, home = finished_pipeline
    catalog = Catalog(cfg)
    central, experts = catalog.pipeline_models(pipeline_id)
    before = {"digests": file_digests(catalog, [central, *experts]),
              "base": exact_uri(catalog.pipeline_compositions(pipeline_id)["independent"])}
    files = write_jsonl(tmp_path_factory.mktemp("new") / "astronomy.jsonl", new_domain_rows(40))
    args = ["extend", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "corpus.source=files",
            f"corpus.files=[{home / 'docs.jsonl'}]", *OVERRIDES, "--pipeline", pipeline_id, "--files", str(files)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(args)
    return cfg, pipeline_id, home, before, args, rc, printed.getvalue()


def test_extend_registers_the_expert_the_composition_and_the_baselines_and_logs_every_system(extended):
    cfg, pipeline_id, home, before, args, rc, printed = extended
    assert rc == 0
    catalog = Catalog(cfg)
    runs = catalog.tracker.stage_runs(pipeline_id, "extend", status=None)
    parent = [r for r in runs if r.data.tags.get("mlflow.runName") == "extend-astronomy"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    run = parent[0]
    tags, m = run.data.tags, run.data.metrics
    assert tags["moie.extends"] == pipeline_id and tags["moie.base"] == before["base"]
    composed = catalog.resolve(tags["moie.extend.composed"])
    assert composed.tags["moie.added_to"] == before["base"] and composed.tags[Tag.EXTENSION] == run.info.run_id
    expert = catalog.resolve(tags["moie.extend.expert_new"])
    assert expert.tags["moie.domain"] == "astronomy" and expert.tags["moie.cluster"] == "3"
    assert expert.tags["moie.branched_from"] == catalog.pipeline_models(pipeline_id)[0]
    for name in ("finetune", "finetune_replay"):
        version = catalog.resolve(tags[f"moie.extend.{name}"])
        assert version.tags["moie.role"] == name and version.tags[Tag.EXTENSION] == run.info.run_id
    # the pipeline's own systems are untouched: its experts and compositions are what they were
    central, experts = catalog.pipeline_models(pipeline_id)
    assert len(experts) == 3 and exact_uri(catalog.pipeline_compositions(pipeline_id)["independent"]) == before["base"]
    systems = ["central", "finetune", "finetune_replay", "composed_independent", "composed_independent_topk",
               "composed_independent_kway", "cbtm_top1", "cbtm_top2", "expert_new"]
    for s in systems:
        for part in ("new", "old_macro", "mixed", "mean"):
            assert math_finite(m[f"bpb/{s}/{part}"]), (s, part)
        assert f"train_pflops/{s}" in m
    for s in systems[1:]:
        assert f"forgetting/{s}" in m
    for s in ("composed_independent", "cbtm_top1", "finetune_replay"):
        for k in ("mean", "ci_low", "ci_high"):
            assert f"delta/{s}_vs_finetune/{k}" in m
    for k in ("mean", "ci_low", "ci_high"):
        assert f"delta/composed_independent_vs_finetune_replay/{k}" in m
        assert f"delta/composed_independent_topk_vs_cbtm_top1/mixed/{k}" in m
    # only the new expert's phases trained in the composition: what its run spent is what was planned
    spent = catalog.client.get_run(composed.run_id).data.metrics["train_pflops"]
    assert spent == pytest.approx(m["planned_pflops/composed"] - m["planned_pflops/expert_new"], rel=1e-9)
    # the k-way gate was trained anew, over the four experts, and only the system routing by it pays for it
    kway = catalog.client.get_run(composed.run_id).data.metrics["kway_pflops"]
    assert m["train_pflops/composed_independent_kway"] == pytest.approx(m["train_pflops/composed_independent"] + kway)
    # the fine-tuned baselines spent at least the costliest composed system's added compute, not a step more
    composition = m["train_pflops/composed_independent_kway"]
    assert composition > m["train_pflops/composed_independent"] >= m["train_pflops/cbtm_top1"] > 0
    for name in ("finetune", "finetune_replay"):
        assert composition <= m[f"train_pflops/{name}"] < composition * 1.1
    # the grown router sends the new domain's text to the new expert, and the old domains' elsewhere
    assert m["routed_to_new/cbtm_top1/new"] > 0.8 > 0.2 > m["routed_to_new/cbtm_top1/old"]
    # the central model has not changed, so it forgets nothing; fine-tuning moved it
    assert m["bpb/central/new"] > m["bpb/finetune/new"]
    # the new expert is where the router sends the new domain's text, so composing it helps there
    assert m["bpb/composed_independent/new"] < m["bpb/before/composed_independent/new"]
    # the table of every system is printed, and logged; the extended composition's URI is the last line
    assert "| composed_independent |" in printed and "| finetune_replay |" in printed
    assert printed.strip().splitlines()[-1] == tags["moie.extend.composed"]
    logged = {a.path for a in catalog.client.list_artifacts(run.info.run_id)}
    assert {"router.safetensors", "router.json"} <= logged
    logged = {a.path for a in catalog.client.list_artifacts(run.info.run_id, "results")}
    assert {"results/extend_results.md", "results/extend_metrics.json"} <= logged


def math_finite(x: float) -> bool:
    return bool(np.isfinite(x))


def test_extend_leaves_the_central_model_and_old_experts_bit_identical(extended):
    cfg, pipeline_id, home, before, args, rc, printed = extended
    catalog = Catalog(cfg)
    central, experts = catalog.pipeline_models(pipeline_id)
    assert file_digests(catalog, [central, *experts]) == before["digests"]
    # and the extended composition keeps every parameter of the base bit for bit
    base_state, _ = catalog.composition_parts(catalog.resolve(before["base"]), Path(tempfile.mkdtemp()) / "b")
    run = [r for r in catalog.tracker.stage_runs(pipeline_id, "extend")
           if r.data.tags.get("mlflow.runName") == "extend-astronomy"][0]
    state, manifest = catalog.composition_parts(catalog.resolve(run.data.tags["moie.extend.composed"]),
                                                Path(tempfile.mkdtemp()) / "a")
    assert manifest["experts"][:3] == experts and len(manifest["experts"]) == 4
    for key, value in base_state.items():
        if not key.startswith("kway."):
            assert torch.equal(state[key], value), key
    assert any(k.startswith("blocks.3.") for k in state) and any(k.startswith("mixers.3.") for k in state)
    # the k-way gate is the one part retrained: it scores four experts now, the base's three
    (kway,) = [k for k in state if k.startswith("kway.") and k.endswith("weight") and state[k].dim() == 2]
    assert state[kway].shape[0] == 4 and base_state[kway].shape[0] == 3


def test_the_extended_composition_is_causal_under_randomised_weights(extended):
    cfg, pipeline_id, home, before, args, rc, printed = extended
    catalog = Catalog(cfg)
    run = [r for r in catalog.tracker.stage_runs(pipeline_id, "extend")
           if r.data.tags.get("mlflow.runName") == "extend-astronomy"][0]
    with tempfile.TemporaryDirectory() as tmp:
        composed, _ = catalog.load_registered(run.data.tags["moie.extend.composed"], tmp)
    randomise_(composed, seed=3)
    idx = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(1))
    for routing in ("router", "topk", "kway"):  # the grown router's routes, the gates alone, the k-way gate
        with composed.configured(routing=routing):
            base, _ = composed(idx)
            assert_causal(composed, idx, base, {})


def refused(capsys, args: list[str]) -> str:
    """The one line a refused extend prints (exit code 2)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moie: error: "), err
    return err[0]


def test_bad_input_gets_one_clear_line_and_leaves_the_store_unchanged(extended, tmp_path, capsys):
    cfg, pipeline_id, home, before, args, rc, printed = extended
    base = args[:args.index("--files")]
    state = store_state(cfg, home)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty.jsonl" in refused(capsys, base + ["--files", str(empty), "--domain", "empty"])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "   ", "work": "a"}])
    assert "no non-empty documents" in refused(capsys, base + ["--files", str(blank), "--domain", "blank"])
    one_work = write_jsonl(tmp_path / "one.jsonl", [dict(r, work="w") for r in new_domain_rows(5)])
    line = refused(capsys, base + ["--files", str(one_work), "--domain", "one"])
    assert "split" in line and "works" in line
    template = [{"text": f"Letter {i}. " + "The star of the comet and the orbit of the moon. " * 30, "work": f"w{i}"}
                for i in range(48)]  # every held-out letter a near-duplicate of the training ones
    line = refused(capsys, base + ["--files", str(write_jsonl(tmp_path / "same.jsonl", template)), "--domain", "same"])
    assert "near-duplicates its training text" in line and "evaluate.max_overlap" in line
    rows = write_jsonl(tmp_path / "more.jsonl", new_domain_rows(40, seed=5))
    for used in ("cooking", "astronomy"):  # a domain of the corpus, and one an extension added
        line = refused(capsys, base + ["--files", str(rows), "--domain", used])
        assert f"domain {used!r} is already a domain" in line
    assert "must be 1-64 letters" in refused(capsys, base + ["--files", str(rows), "--domain", "a b"])
    assert "matches no file" in refused(capsys, base + ["--files", str(tmp_path / "none.jsonl"), "--domain", "x"])
    assert store_state(cfg, home) == state


def test_a_pipeline_without_a_central_model_is_refused_with_one_line(finished_pipeline, tmp_path, capsys):
    cfg, pipeline_id, home = finished_pipeline
    clustered = run_cluster(cfg)  # clustered only: no central model, no experts, no composition
    state = store_state(cfg, home)
    rows = write_jsonl(tmp_path / "astro.jsonl", new_domain_rows(40))
    line = refused(capsys, ["extend", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "corpus.source=files",
                            f"corpus.files=[{home / 'docs.jsonl'}]", *OVERRIDES, "--pipeline", clustered,
                            "--files", str(rows)])
    assert "no registered central model" in line and f"moie experts --pipeline {clustered}" in line
    assert store_state(cfg, home) == state


# --- the pieces --------------------------------------------------------------------------------


def test_a_grown_router_keeps_every_old_route_and_sends_the_new_text_to_the_new_cluster():
    rows = old_domain_rows()
    router = ClusterRouter.fit([r["text"] for r in rows], 3, min_df=1, svd_dim=8, seed=0)
    new = [r["text"] for r in new_domain_rows(20)]
    grown = router.with_cluster(new)
    assert grown.k == 4 and np.array_equal(grown.centroids[:3], router.centroids)
    assert (grown.assign(new) == 3).mean() > 0.9
    old = [r["text"] for r in rows]
    assert np.array_equal(grown.assign(old), router.assign(old))  # the old text is not drawn to it
    with pytest.raises(ValueError, match="none of the 2 documents"):
        router.with_cluster(["zzz qqq", "xyzzy"])


def test_mixed_documents_alternate_whole_chunks_of_the_new_and_the_old_text():
    new = [np.full(1200, 1, np.uint8), np.full(300, 2, np.uint8)]
    old = [np.full(2000, 7, np.uint8)]
    docs = mixed_documents(new, old, chunk=512, max_bytes=10_000)
    assert len(docs) == 1  # the second new document has no whole chunk
    expected = np.concatenate([np.full(512, 1), np.full(512, 7), np.full(512, 1), np.full(512, 7)])
    assert np.array_equal(docs[0], expected)


def test_replay_draws_its_share_equally_from_every_old_domain():
    new = np.zeros(8000, np.uint16)
    old = [np.full(50_000, j + 1, np.uint16) for j in range(4)]
    mixed = replay_tokens(new, old, 0.2, seed=0, eos=258)
    body = mixed[mixed != 258]
    counts = np.bincount(body, minlength=5)
    assert counts[1:].sum() / len(body) == pytest.approx(0.2, abs=0.002)
    assert len(set(counts[1:])) == 1  # an equal run of each
    assert np.array_equal(replay_tokens(new, old, 0.0, 0, 258), new)


def test_one_stratum_of_weight_one_is_the_paired_bootstrap_and_weights_combine_linearly():
    rng = np.random.default_rng(0)
    a = [rng.normal(-1.0, 0.3, 50) for _ in range(12)]
    b = [x + rng.normal(0.05, 0.1, 50) for x in a]
    c = [rng.normal(-2.0, 0.3, 40) for _ in range(9)]
    d = [x + 0.1 for x in c]
    one = stratified_bootstrap([(1.0, a, b)], 500, seed=4)
    assert one == paired_bootstrap(a, b, 500, seed=4)
    both = stratified_bootstrap([(0.5, a, b), (0.5, c, d)], 500, seed=4)
    assert both.mean == pytest.approx(0.5 * paired_bootstrap(a, b).mean + 0.5 * paired_bootstrap(c, d).mean)
    assert both.ci_low <= both.mean <= both.ci_high


def test_a_corpus_can_leave_a_domain_out_and_a_label_no_document_has_is_refused(tmp_path):
    from pipeline.text.corpus import CorpusError, load_corpus

    path = write_jsonl(tmp_path / "docs.jsonl", textgen.corpus(5, ["cooking", "sailing"], seed=0))
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["corpus.source=files", f"corpus.files=[{path}]",
                                                       "corpus.exclude_sources=[sailing]"])
    assert {d.source for d in load_corpus(cfg.corpus)} == {"cooking"}
    cfg.corpus.exclude_sources = ["sailnig"]
    with pytest.raises(CorpusError, match="sailnig"):
        load_corpus(cfg.corpus)


def test_extend_writes_its_token_files_to_the_storage_with_their_checksums(extended):
    cfg, pipeline_id, home, before, args, rc, printed = extended
    catalog = Catalog(cfg)
    run = [r for r in catalog.tracker.stage_runs(pipeline_id, "extend")
           if r.data.tags.get("mlflow.runName") == "extend-astronomy"][0]
    expert = catalog.resolve(run.data.tags["moie.extend.expert_new"])
    for split in ("train", "val"):
        path = catalog.data_path(expert, split)
        assert storage.sha256(path) == expert.tags[f"moie.sha256.tokens.{split}"]
