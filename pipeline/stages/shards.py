"""Ray tasks on one shard of the corpus — the cluster stage's scan, sample and assignment, the
experts stage's token writing — and the router's fitting task: in a module of their own,
which imports neither torch nor MLflow, so that each of these workers stays small (~200 MB:
scikit-learn, `datasets`, pyarrow)."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from artifacts import sha256_file, write_json
from pipeline.config import Config, CorpusConfig, from_dict
from pipeline.errors import StageError
from pipeline.store import storage
from pipeline.store.tokens import put_token_file
from pipeline.text.corpus import CorpusError, Shard, check_unchanged, shard_documents, text_sha256
from pipeline.text.overlap import ShingleFilter
from routing.router import ClusterRouter

ASSIGN_BATCH = 2_000  # documents embedded and assigned at a time
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
COPY_BLOCK = 8 << 20


@dataclass
class ShardScan:
    """A shard's chunks, in order: what the driver needs to de-duplicate and sample them."""

    keys: np.ndarray  # (n_chunks,) V16 dedup keys
    splits: np.ndarray  # (n_chunks,) uint8 SPLIT_CODES
    labels: set  # domain labels of the shard's rows (excluded ones too)


def scan_shard(shard: Shard, corpus: CorpusConfig) -> ShardScan:
    keys, splits, labels = bytearray(), bytearray(), set()
    for key, doc in shard_documents(shard, corpus, labels):
        keys += key
        splits.append(SPLIT_CODES[doc.split])
    return ShardScan(np.frombuffer(bytes(keys), dtype="V16"), np.frombuffer(bytes(splits), dtype=np.uint8), labels)


def sample_texts(shard: Shard, corpus: CorpusConfig, positions: np.ndarray) -> list[str]:
    """The texts of the shard's chunks at `positions` (sorted chunk indices)."""
    wanted = set(positions.tolist())
    return [doc.text for i, (_, doc) in enumerate(shard_documents(shard, corpus)) if i in wanted]


def assign_shard(shard: Shard, index: int, corpus: CorpusConfig, keep: np.ndarray, router_state, location: str,
                 crash: bool = False) -> int:
    """Assign the shard's kept chunks (keep: (n_chunks,) bool) to clusters, a batch at a time, and
    write their rows as one parquet part to `location` in the storage, then its JSON (sha256,
    rows); the number of rows."""
    if crash:  # tests only (cluster.crash_shard): the worker dies as a killed one does
        os._exit(1)
    router = ClusterRouter.from_state(*router_state)
    with tempfile.TemporaryDirectory(prefix="moie-assign-") as tmp:
        path = Path(tmp) / "part.parquet"
        rows = 0
        with pq.ParquetWriter(path, schema()) as writer:
            batch = []
            for i, (_, doc) in enumerate(shard_documents(shard, corpus, index=index)):
                if keep[i]:
                    batch.append(doc)
                if len(batch) == ASSIGN_BATCH:
                    writer.write_table(assignment_rows(batch, router.assign([d.text for d in batch])))
                    rows += len(batch)
                    batch = []
            if batch:
                writer.write_table(assignment_rows(batch, router.assign([d.text for d in batch])))
                rows += len(batch)
        storage.upload(path, location)
        write_json(Path(tmp) / "part.json", {"sha256": sha256_file(path), "rows": rows, "shard": shard.describe()})
        storage.upload(Path(tmp) / "part.json", part_json(location))  # last: it marks the part whole
    return rows


def schema() -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("work", pa.string()), ("source", pa.string()),
                      ("split", pa.string()), ("n_bytes", pa.int64()), ("text_sha256", pa.string()),
                      ("cluster", pa.int32()), ("shard", pa.int32())])


def part_json(location: str) -> str:
    return location.removesuffix(".parquet") + ".json"


def fit_task(cfg_dict: dict, *samples: list[str]):
    """Ray task body: the router fitted on the sampled texts (one list per shard, in corpus order)."""
    cfg = from_dict(Config, cfg_dict)
    return fit_router([text for texts in samples for text in texts], cfg).to_state()


def fit_router(texts: list[str], cfg: Config) -> ClusterRouter:
    c = cfg.cluster
    try:
        return ClusterRouter.fit(texts, c.k, max_features=c.max_features, min_df=c.min_df, svd_dim=c.svd_dim,
                                 iterations=c.iterations, temperature=c.temperature, top_k=c.top_k, seed=cfg.seed)
    except ValueError as err:  # the corpus and the cluster.* settings do not fit together
        raise StageError(f"cannot fit the cBTM router on {len(texts)} training documents with these cluster.* "
                         f"settings: {err}") from None


def assignment_rows(docs, clusters: np.ndarray) -> pa.Table:
    return pa.table({"doc_id": [d.doc_id for d in docs], "work": [d.work for d in docs],
                     "source": pa.array([d.source for d in docs], pa.string()),
                     "split": [d.split for d in docs], "n_bytes": [len(d.text.encode("utf-8")) for d in docs],
                     "text_sha256": [text_sha256(d.text) for d in docs],
                     "cluster": np.asarray(clusters, dtype=np.int32),
                     "shard": np.asarray([d.shard for d in docs], dtype=np.int32)}, schema=schema())


# --- the experts stage's token files ------------------------------------------------------------------


class TokenFile:
    """A .npy file of uint16 tokens written a document at a time: the tokens go to a raw file,
    and `close` writes the .npy header and copies them after it, so that neither holds more
    than one document in memory."""

    def __init__(self, path: Path):
        self.path, self.raw = path, open(path.with_suffix(".raw"), "wb")
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        self.raw.write(tokens.astype("<u2", copy=False).tobytes())
        self.tokens += len(tokens)

    def close(self) -> None:
        self.raw.close()
        raw = self.path.with_suffix(".raw")
        with open(self.path, "wb") as out, open(raw, "rb") as src:
            np.lib.format.write_array_header_1_0(out, {"descr": "<u2", "fortran_order": False,
                                                       "shape": (self.tokens,)})
            shutil.copyfileobj(src, out, COPY_BLOCK)
        raw.unlink()


def npy_payload(path: Path):
    """An open .npy file of a 1-D array, positioned at its first element."""
    f = open(path, "rb")
    version = np.lib.format.read_magic(f)
    (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    return f


def shard_tokens(shard: Shard, index: int, corpus: CorpusConfig, table: pa.Table, dst: str) -> dict:
    """Byte tokens (eos after each document) of the shard's clustered documents, one .npy per
    (model, split) under `dst` in the storage, each document in its cluster's expert's file and
    in the dense model's. `table`: the shard's documents to write (doc_id, cluster, split: train |
    validation, text_sha256 recorded at clustering). Returns {"parts": {name: {split: [location,
    tokens, sha256]}}, "found": documents written, "missing": a document of `docs` not in the shard};
    a document whose text changed since it was clustered is an error, before anything is written."""
    from experts.tokenizer import EOS_ID, encode_bytes
    from pipeline.store.names import DENSE, expert_name

    docs = {doc_id: (expert_name(cluster), "train" if split == "train" else "val", sha)
            for doc_id, cluster, split, sha in zip(*(table[c].to_pylist() for c in
                                                     ("doc_id", "cluster", "split", "text_sha256")))}
    eos = np.array([EOS_ID], dtype=np.uint16)
    found: set[str] = set()
    parts: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="moie-tokens-") as tmp:
        files: dict[tuple[str, str], TokenFile] = {}
        for _, doc in shard_documents(shard, corpus, index=index):
            if doc.doc_id not in docs:
                continue
            name, split, recorded = docs[doc.doc_id]
            check_unchanged(doc, recorded)
            tokens = encode_bytes(doc.text)
            for model in (name, DENSE):
                if (model, split) not in files:
                    files[model, split] = TokenFile(Path(tmp) / f"{model}.{split}.npy")
                files[model, split].write(tokens)
                files[model, split].write(eos)
            found.add(doc.doc_id)
        for (model, split), file in sorted(files.items()):  # written only now: a changed document stops all
            file.close()
            location = storage.join(dst, file.path.name)
            storage.upload(file.path, location)
            parts.setdefault(model, {})[split] = [location, file.tokens, sha256_file(file.path)]
    missing = next((d for d in docs if d not in found), None)
    return {"parts": parts, "found": len(found), "missing": missing}


def join_tokens(parts: list[list], location: str) -> str:
    """One .npy token file at `location` in the storage, with its block index: the parts ([location,
    tokens, sha256], in order) one after the other, each checked against its sha256 once, copied a
    block at a time (no memory map: its pages would count as the process's). Returns the file's sha256."""
    total = sum(n for _, n, _ in parts)
    with tempfile.TemporaryDirectory(prefix="moie-join-") as tmp:
        path = Path(tmp) / "tokens.npy"
        with open(path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, {"descr": "<u2", "fortran_order": False, "shape": (total,)})
            for part, n, recorded in parts:
                local = storage.local_copy(part, Path(tmp) / "parts")
                if sha256_file(local) != recorded:
                    raise StageError(f"token part {part} does not match the sha256 recorded when it was written "
                                     "(damaged or replaced while the stage ran); run the experts stage again")
                with npy_payload(local) as src:
                    shutil.copyfileobj(src, out, COPY_BLOCK)
                if storage.is_remote(part):
                    local.unlink()
        return put_token_file(path, location)["file_sha256"]


def documents_by_shard(table: pa.Table, n_shards: int, columns: tuple[str, ...],
                       splits: tuple[str, ...] | None = None) -> list[pa.Table]:
    """Per corpus shard, its documents of the pipeline's assignments (of `splits`; default all),
    these columns, checked to fit this corpus's shards."""
    return list(shard_tables(table, n_shards, columns, splits))


def shard_tables(table: pa.Table, n_shards: int, columns: tuple[str, ...],
                 splits: tuple[str, ...] | None = None) -> Iterator[pa.Table]:
    """documents_by_shard one shard at a time: a driver that hands each to its task as it comes
    holds one shard's copy, not every shard's (the checks come before the first)."""
    import pyarrow.compute as pc

    if "text_sha256" not in table.column_names:
        raise CorpusError("the pipeline's assignments.parquet records no content hashes, so the corpus cannot be "
                          "checked against its clustering; cluster it again (`moie cluster`)")
    if "shard" not in table.column_names:
        raise CorpusError("the pipeline's assignments.parquet records no corpus shard per document (it was clustered "
                          "before corpora were read as shards); cluster it again (`moie cluster`)")
    if table["shard"].null_count:
        raise CorpusError(f"{table['shard'].null_count} documents of the pipeline's assignments.parquet have no "
                          "corpus shard; cluster it again (`moie cluster`)")
    if len(table) and pc.max(table["shard"]).as_py() >= n_shards:
        most = pc.max(table["shard"]).as_py() + 1
        raise CorpusError(f"the pipeline was clustered on a corpus of more shards ({most}) than this config's "
                          f"({n_shards}); give the config the pipeline was clustered with")
    table = table.select(list(dict.fromkeys([*columns, "shard", "split"])))
    shard = table["shard"].to_numpy()
    if len(shard) and (np.diff(shard) < 0).any():  # (the cluster stage writes them in corpus order, shard by shard)
        table = table.sort_by("shard")
        shard = table["shard"].to_numpy()
    bounds = np.searchsorted(shard, np.arange(n_shards + 1))
    wanted = pa.array(list(splits)) if splits is not None else None
    for i in range(n_shards):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        # filter copies the shard's rows out: a slice would take the whole table's buffers with it to its task
        keep = pc.is_in(part["split"], wanted) if wanted is not None else pc.is_valid(part["shard"])
        yield part.filter(keep).select(list(columns))


def check_found(expected: int, results: list[dict]) -> None:
    """Every one of the `expected` clustered documents was found by its shard's task (results:
    {"found": how many, "missing": one it did not find or None})."""
    found = sum(r["found"] for r in results)
    if found < expected:
        missing = [r["missing"] for r in results if r.get("missing")]
        raise CorpusError(f"{expected - found} clustered documents (e.g. {missing[0]!r}) are not in the corpus of "
                          "this config; give the config the pipeline was clustered with")


# --- the evaluate stage's held-out documents, shard by shard ------------------------------------------


def shard_shingles(shard: Shard, index: int, corpus: CorpusConfig, table: pa.Table, words: int,
                   bits: int) -> dict:
    """The shingles of the shard's clustered training documents in a filter of `bits` (a filter of
    each shard, or-ed together, is the filter of the whole training split), every clustered
    document of the shard checked against the content hash its clustering recorded. `table`: the
    shard's clustered documents (doc_id, split, text_sha256). {"shingles": the filter, "found":
    documents found, "missing": a clustered document not in the shard, or None}."""
    recorded = dict(zip(table["doc_id"].to_pylist(), zip(table["split"].to_pylist(),
                                                         table["text_sha256"].to_pylist())))
    found: set[str] = set()

    def training_texts():
        for _, doc in shard_documents(shard, corpus, index=index):
            if doc.doc_id in recorded:
                split, sha = recorded[doc.doc_id]
                check_unchanged(doc, sha)
                found.add(doc.doc_id)
                if split == "train":
                    yield doc.text.encode("utf-8")

    shingles = ShingleFilter(training_texts(), words, bits=bits)
    return {"shingles": shingles, "found": len(found), "missing": next((d for d in recorded if d not in found), None)}


def shard_coverage(shard: Shard, index: int, corpus: CorpusConfig, doc_ids: list[str],
                   shingles: ShingleFilter) -> list[tuple[str, int, int]]:
    """(doc_id, bytes, bytes covered by training shingles) of each of the shard's documents named."""
    wanted = set(doc_ids)
    out = []
    for _, doc in shard_documents(shard, corpus, index=index):
        if doc.doc_id in wanted:
            data = doc.text.encode("utf-8")
            out.append((doc.doc_id, len(data), int(shingles.covered(data).sum())))
    return out


def shard_texts(shard: Shard, index: int, corpus: CorpusConfig, doc_ids: list[str]) -> dict[str, bytes]:
    """doc_id -> UTF-8 text of each of the shard's documents named."""
    wanted = set(doc_ids)
    return {doc.doc_id: doc.text.encode("utf-8") for _, doc in shard_documents(shard, corpus, index=index)
            if doc.doc_id in wanted}
