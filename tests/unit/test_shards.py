"""The assignments split by corpus shard, as the drivers hand them to their per-shard tasks."""
import pickle

import numpy as np
import pyarrow as pa
import pytest

from pipeline.stages.shards import documents_by_shard
from pipeline.text.corpus import CorpusError

SHARDS = 16


def assignments(n: int, seed: int, ordered: bool = True) -> pa.Table:
    """n documents over SHARDS shards (in corpus order, or shuffled), random splits and clusters."""
    rng = np.random.default_rng(seed)
    shard = np.sort(rng.integers(0, SHARDS, n)) if ordered else rng.integers(0, SHARDS, n)
    return pa.table({"doc_id": [f"work-{i}/{rng.integers(1 << 30)}" for i in range(n)],
                     "split": rng.choice(["train", "validation", "test"], n).tolist(),
                     "cluster": rng.integers(0, 4, n).astype(np.int32),
                     "text_sha256": [f"{rng.integers(1 << 62):064x}" for _ in range(n)],
                     "shard": shard.astype(np.int32)},
                    schema=pa.schema([("doc_id", pa.string()), ("split", pa.string()), ("cluster", pa.int32()),
                                      ("text_sha256", pa.string()), ("shard", pa.int32())]))


@pytest.mark.parametrize("layout", ["ordered", "shuffled", "row groups", "empty"])
@pytest.mark.parametrize("splits", [None, ("train", "validation")])
def test_each_shard_gets_its_documents_of_the_splits_in_corpus_order(layout, splits):
    table = assignments(0 if layout == "empty" else 3000, seed=1, ordered=layout != "shuffled")
    if layout == "row groups":  # as a parquet file of several row groups reads: chunked columns
        table = pa.concat_tables([table.slice(0, 1000), table.slice(1000, 1500), table.slice(2500)])
        assert table["shard"].num_chunks == 3
    rows = table.to_pylist()
    parts = documents_by_shard(table, SHARDS, ("doc_id", "cluster", "text_sha256"), splits=splits)
    assert len(parts) == SHARDS
    for i, part in enumerate(parts):
        expected = [{k: r[k] for k in ("doc_id", "cluster", "text_sha256")} for r in rows
                    if r["shard"] == i and (splits is None or r["split"] in splits)]
        assert part.column_names == ["doc_id", "cluster", "text_sha256"]
        assert part.to_pylist() == expected, i


def test_a_shards_table_carries_only_its_own_rows_to_its_task():
    """Ray pickles a task's arguments; a pyarrow slice pickles the buffers of the whole table
    it is a view of, so each task would receive every shard's documents."""
    table = assignments(20_000, seed=2)
    whole = len(pickle.dumps(table, protocol=5))
    for splits in (None, ("train",)):
        parts = documents_by_shard(table, SHARDS, ("doc_id", "split", "text_sha256"), splits=splits)
        largest = max(len(pickle.dumps(part, protocol=5)) for part in parts)
        assert largest < 3 * whole / SHARDS, (splits, largest, whole)


def test_documents_without_a_shard_are_refused_not_handed_to_a_wrong_shard():
    table = assignments(500, seed=4)
    shard = pa.array([None if i == 250 else s for i, s in enumerate(table["shard"].to_pylist())], pa.int32())
    with pytest.raises(CorpusError, match="1 documents .* have no corpus shard"):
        documents_by_shard(table.set_column(4, "shard", shard), SHARDS, ("doc_id",))


def test_a_corpus_of_fewer_shards_than_the_clustering_is_refused_naming_both():
    with pytest.raises(CorpusError, match=r"more shards \(16\) than this config's \(4\)"):
        documents_by_shard(assignments(500, seed=3), 4, ("doc_id",))
