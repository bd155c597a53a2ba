"""`moie run` composes early: an independent composition's per-expert blocks and gates start
as soon as the central model and that expert are registered, while other experts still
train, and the result is the composition that waiting for every expert would have made."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

import textgen
from stores import module_home

from pipeline.config import load_config
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import run_compose
from pipeline.stages.experts import run_experts
from pipeline.stages.sequence import EarlyIndependent
from pipeline.store.catalog import Catalog
from pipeline.store.names import DENSE

REPO = Path(__file__).resolve().parents[2]


class Recorder(EarlyIndependent):
    """EarlyIndependent that notes, for each expert whose work it starts, how many experts were
    still unregistered then, and which of its results the compose stage took."""

    def __init__(self, *args):
        super().__init__(*args)
        self.waiting_at_start: dict[str, int] = {}
        self.taken: list[str] = []

    def centres(self, task):
        fitted = super().centres(task)
        self.taken += ["centres"] if fitted is not None else []
        return fitted

    def training(self, task, e):
        ref = super().training(task, e)
        self.taken += [task.experts[e]] if ref is not None else []
        return ref

    def _start(self) -> None:
        before = set(self.started)
        super()._start()
        waiting = len([n for n in self.planned or [] if n not in self.versions])
        self.waiting_at_start |= {name: waiting for name in set(self.started) - before}


def test_an_independent_composition_started_per_expert_during_training_equals_one_composed_after_it(
        tmp_path_factory, ray_local):
    with module_home(tmp_path_factory, "early-home") as home:
        path = home / "docs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n"
                                for r in textgen.corpus(30, ["cooking", "sailing", "finance"], seed=0)))
        # three experts and a small central model of its own: on 2 CPUs two experts train first, then
        # the third beside the central model, which is registered while the third still trains
        cfg = load_config(REPO / "configs" / "tiny.yaml", [
            "corpus.source=files", f"corpus.files=[{path}]", "cluster.k=3", "cluster.svd_dim=8", "cluster.min_df=1",
            "tracking.experiment=early", "experts.dense=false", "experts.seed_fraction=0",
            "experts.train.max_tokens=40000", "experts.train.ckpt_every=0",
            "central.arch=gpt", "central.model={block_size: 64, n_layer: 2, n_head: 2, n_embd: 32}",
            "central.train={max_tokens: 8000, batch_size: 8, lr: 0.003, warmup_steps: 2}",
            "compose.modes=[independent]", "compose.dense_matched=false",
            "compose.blocks_train={max_tokens: 8000, batch_size: 8, lr: 0.003, warmup_steps: 2}",
            "compose.gates_train={max_tokens: 4000, batch_size: 8, lr: 0.005, warmup_steps: 1}"])
        pipeline_id = run_cluster(cfg)
        catalog = Catalog(cfg)
        early = Recorder(cfg, catalog, pipeline_id)
        try:
            run_experts(cfg, pipeline_id, watcher=early)
            taken = run_compose(cfg, pipeline_id, early=early)["independent"]
        finally:
            early.cancel()
        assert sorted(early.started) == ["expert-0", "expert-1", "expert-2"]
        assert max(early.waiting_at_start.values()) >= 1, early.waiting_at_start  # began while one still trained
        assert early.taken[0] == "centres" and len(early.taken) == 4  # the stage used every early result
        # every token file an early task reads is pinned, with what the registry recorded of it (the
        # centres read experts still training: their pins come from their runs)
        central, experts = catalog.pipeline_models(pipeline_id)
        for split in ("train", "val"):  # each checked against the registry, and its pin noted in catalog.pins
            catalog.data_path(catalog.resolve(central), split, DENSE)
            for uri in experts:
                catalog.data_path(catalog.resolve(uri), split)
        registry = catalog.pins
        spec = early.centres_spec
        assert len(spec.expert_data) == 3 and {p: spec.pins[p] for p in spec.expert_data} == \
            {p: registry[p] for p in spec.expert_data}
        for _, task, _ in early.started.values():
            read = [*task.expert_data, *task.expert_val, task.train, task.val]
            assert {p: task.pins.get(p) for p in read} == {p: registry[p] for p in read}
        waited = run_compose(cfg, pipeline_id)["independent"]  # the same, started after every expert
        assert taken != waited
        (early_state, early_manifest), (state, manifest) = (
            catalog.composition_parts(catalog.resolve(uri), home / name) for uri, name in ((taken, "a"), (waited, "b")))
        assert early_manifest["experts"] == manifest["experts"] and early_manifest["central"] == manifest["central"]
        assert sorted(early_state) == sorted(state)
        assert any(k.startswith("blocks.2.") for k in state) and any(k.startswith("centers.") for k in state)
        for key, value in state.items():
            assert early_state[key].equal(value), key
        assert early_manifest["val_bpb"] == pytest.approx(manifest["val_bpb"], abs=1e-9)

        # an early task that failed (here: expert-1's, raising in Ray) is trained again by the compose stage
        redone = run_compose(cfg, pipeline_id, early=FailedEarly(failed=1))["independent"]
        redone_state, _ = catalog.composition_parts(catalog.resolve(redone), home / "c")
        assert sorted(redone_state) == sorted(state)
        for key, value in state.items():
            assert redone_state[key].equal(value), key

        # an early task, or centres, from a token file whose pin is not the compose stage's are not taken
        slot, task, ref = early.started["expert-0"]  # (slot 0: its task reads as the stage's first expert)
        assert early.training(task, 0) is ref
        assert early.training(replace(task, pins={**task.pins, task.expert_data[0]: "0" * 64}), 0) is None
        assert early.centres(spec) is not None
        assert early.centres(replace(spec, pins={**spec.pins, spec.expert_data[1]: "0" * 64})) is None


def failing_task():
    raise RuntimeError("the node running this early task was lost")


class FailedEarly:
    """The compose stage's Scheduler whose early work for one expert failed in Ray."""

    def __init__(self, failed: int):
        self.failed = failed

    def centres(self, task):
        return None

    def training(self, task, e):
        import ray

        return ray.remote(failing_task).options(max_retries=0).remote() if e == self.failed else None


def test_a_failure_to_start_early_turns_early_composition_off_without_raising(moie_home, capsys):
    class Broken(EarlyIndependent):
        def _launch(self):
            raise OSError("the registry is unreachable")

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    early = Broken(cfg, Catalog(cfg), "no-pipeline")
    early.planned, early.versions = ["expert-0"], {DENSE: object(), "expert-0": object()}
    early._start()  # inside the experts stage's loop: must not raise
    assert early.off and early.centres_ref is None and early.started == {}
    assert "not starting early (OSError: the registry is unreachable)" in capsys.readouterr().out
    early._start()  # and stays off
    assert early.off
