"""Corpus loading through `datasets`: a hub data set, local files, or the embedded corpus.

Every source ends as `Document`s (text, optional `source` domain label, optional `work`
id), chunked at paragraph boundaries, de-duplicated, and assigned to a train / validation
/ test split by a hash of the work id — whole works, never lines.

The corpus is read as shards (`corpus_shards`): one table file (.jsonl / .parquet, streamed
in batches), a group of text files (one work each) of at most `SHARD_TEXT_BYTES`, or the hub
data set. A shard is read alone, in bounded memory, and gives the same documents wherever it
is read, so the cluster stage reads shards in parallel tasks; `load_corpus` reads them one
after the other into one list (for the stages that still hold the corpus whole).
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from artifacts.errors import MoieError
from pipeline.config import CorpusConfig
from pipeline.text.chunking import chunk_text
from pipeline.text.embedded import embedded_corpus_file

log = logging.getLogger(__name__)


SPLITS = ("train", "validation", "test")
# plain text (one work per file; markdown, reStructuredText and source code are text too), JSON lines, parquet
FILE_BUILDERS = {".txt": "text", ".md": "text", ".rst": "text", ".py": "text",
                 ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHARD_TEXT_BYTES = 64 << 20  # text files (one work each) are read in groups of at most this size
BATCH_ROWS = 1_000  # rows of a table file read at a time


class CorpusError(MoieError, ValueError):
    """A corpus that cannot be loaded as configured."""


@dataclass
class Document:
    doc_id: str
    text: str
    source: str | None = None  # domain label, used only to evaluate clustering
    work: str | None = None  # chunks of one work share it, and therefore a split
    split: str = "train"
    shard: int = 0  # index of the corpus shard it was read from


@dataclass(frozen=True)
class Shard:
    """A part of the corpus that one task reads alone: one table file, a group of text files
    (each one work, its doc id its path), or the hub data set."""

    builder: str  # text | json | parquet (files read by `datasets`' builders) | hub
    files: tuple[str, ...] = ()
    origin: str = ""  # a table row's doc id is "<origin>:<row>": the file's name (its path where names repeat)

    def describe(self) -> str:
        if self.builder == "hub":
            return f"hub data set {self.origin!r}"
        return self.files[0] if len(self.files) == 1 else f"{len(self.files)} text files from {self.files[0]}"


def corpus_shards(cfg: CorpusConfig) -> list[Shard]:
    """The shards of the configured corpus, in corpus order: text files first, then table files."""
    if cfg.source == "embedded":
        path = embedded_corpus_file(cfg.domain_bytes, cfg.max_chunk_bytes)
        return [Shard("json", (str(path),), path.name)]
    if cfg.source == "hub":
        return [Shard("hub", (), cfg.name)]
    if cfg.source != "files":  # validated in config; kept for callers that build configs by hand
        raise CorpusError(f"corpus.source must be one of embedded, files, hub; got {cfg.source!r}")
    files = _expand_files(cfg.files)
    text = [f for f in files if FILE_BUILDERS[f.suffix.lower()] == "text"]
    shards = [Shard("text", tuple(str(f) for f in group)) for group in _groups_of_bytes(text, SHARD_TEXT_BYTES)]
    tables = [f for f in files if FILE_BUILDERS[f.suffix.lower()] != "text"]
    repeated = {name for name, n in Counter(f.name for f in tables).items() if n > 1}
    for builder in sorted({FILE_BUILDERS[f.suffix.lower()] for f in tables}):
        shards += [Shard(builder, (str(f),), str(f) if f.name in repeated else f.name)
                   for f in tables if FILE_BUILDERS[f.suffix.lower()] == builder]
    return shards


def _groups_of_bytes(files: list[Path], limit: int) -> list[list[Path]]:
    """Consecutive files in groups of at most `limit` bytes (a larger file alone)."""
    groups: list[list[Path]] = []
    size = limit
    for f in files:
        n = f.stat().st_size
        if size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += n
    return groups


def shard_documents(shard: Shard, cfg: CorpusConfig, labels: set | None = None,
                    index: int = 0) -> Iterator[tuple[bytes, Document]]:
    """Every non-empty chunk of a shard's rows, in order, as (dedup key, document with its split).
    A chunk whose key an earlier chunk of the corpus had is a duplicate; the caller drops it.
    The domain labels of the rows read (excluded ones too) are added to `labels`; `index` is the
    shard's place among the corpus's shards."""
    excluded = set(cfg.exclude_sources)
    for row in _shard_rows(shard, cfg):
        if labels is not None:
            labels.add(row["source"])
        if row["source"] in excluded:
            continue
        chunks = chunk_text(row["text"], cfg.max_chunk_bytes)
        work = row["work"] or row["doc_id"]  # a row without a work id is its own work: its chunks share one split
        split = split_of(work, cfg.val_fraction, cfg.test_fraction)
        for i, chunk in enumerate(chunks):
            if not chunk.strip():
                continue
            doc_id = row["doc_id"] if len(chunks) == 1 else f"{row['doc_id']}#{i}"
            yield dedup_key(chunk), Document(doc_id, chunk, row["source"], work, split, index)


def dedup_key(text: str) -> bytes:
    """16 bytes of sha1 of the text with its whitespace runs made single spaces: equal for copies."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()[:16]


def check_labels(cfg: CorpusConfig, labels: set) -> None:
    """corpus.exclude_sources may name only labels the corpus has (a typo would otherwise leave the domain in)."""
    unknown = sorted(set(cfg.exclude_sources) - labels)
    if unknown:
        known = sorted(s for s in labels if s is not None)
        raise CorpusError(f"corpus.exclude_sources names {unknown}, which no document of the corpus is labelled "
                          f"with; its domains are {known or 'none (no source column)'}")


def check_not_empty(cfg: CorpusConfig, n_documents: int) -> None:
    if not n_documents:
        raise CorpusError(f"the corpus ({_describe(cfg)}) holds no non-empty documents; "
                          "give text files with content, or another corpus.source")


def load_corpus(cfg: CorpusConfig) -> list[Document]:
    """Load, chunk, de-duplicate and split the configured corpus: its shards one after the other."""
    docs: list[Document] = []
    seen: set[bytes] = set()
    labels: set = set()
    for index, shard in enumerate(corpus_shards(cfg)):
        for key, doc in shard_documents(shard, cfg, labels, index):
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    check_labels(cfg, labels)
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    check_not_empty(cfg, len(docs))
    return docs


def text_sha256(text: str) -> str:
    """The content hash of a document, as the cluster stage records it beside its cluster."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_unchanged(doc: Document, recorded: str) -> None:
    """A clustered document's text must still have the sha256 its clustering recorded."""
    if text_sha256(doc.text) != recorded:
        raise CorpusError(f"document {doc.doc_id!r} changed since the pipeline was clustered (its text no longer "
                          "has the sha256 recorded in assignments.parquet); restore the corpus as it was, or "
                          "cluster it again (`moie cluster --pipeline <id>`) to train on the new text")


def clustered_documents(table: dict, docs: list[Document]) -> dict[str, Document]:
    """doc_id -> document for every document of a clustering's assignments table, each checked
    against the content hash recorded when it was clustered: a corpus edited since then would be
    trained or scored against a clustering it no longer matches."""
    by_id = {d.doc_id: d for d in docs}
    missing = [i for i in table["doc_id"] if i not in by_id]
    if missing:
        raise CorpusError(f"{len(missing)} clustered documents (e.g. {missing[0]!r}) are not in the corpus of this "
                          "config; give the config the pipeline was clustered with")
    if "text_sha256" not in table:
        raise CorpusError("the pipeline's assignments.parquet records no content hashes, so the corpus cannot be "
                          "checked against its clustering; cluster it again (`moie cluster`)")
    for doc_id, expected in zip(table["doc_id"], table["text_sha256"]):
        check_unchanged(by_id[doc_id], expected)
    extra = len(by_id) - len(table["doc_id"])
    if extra > 0:
        log.warning("%d documents of the corpus were not there when it was clustered: they are left out "
                    "(cluster again to use them)", extra)
    return by_id



def split_of(work: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a whole work: the first 8 bytes of sha256 of the salted work id
    as a fraction. (The salt keeps it independent of other hash orders, e.g. the embedded
    corpus's per-domain cap, which would otherwise put every capped work in one split.)"""
    digest = hashlib.sha256(f"moie-split/{work}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


# --- reading a shard --------------------------------------------------------------------


def _expand_files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise CorpusError(f"corpus.files entry {pattern!r} matches no file")
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            raise CorpusError(f"corpus.files entry {pattern!r} names only directories; give the files in them, "
                              f"e.g. {str(Path(pattern) / '**' / '*.txt')!r}")
        files.extend(found)
    for f in files:
        if f.suffix.lower() not in FILE_BUILDERS:
            raise CorpusError(f"corpus file {str(f)!r} has an unsupported type {f.suffix!r}; "
                              f"expected one of {', '.join(sorted(FILE_BUILDERS))}")
    return files


def _shard_rows(shard: Shard, cfg: CorpusConfig) -> Iterator[dict]:
    """The rows of a shard, in order: {doc_id, text, source, work}."""
    if shard.builder == "text":
        yield from _text_file_rows(shard, cfg)
    elif shard.builder == "hub":
        yield from _table_rows(_hub_dataset(cfg), cfg, shard.origin)
    else:
        import datasets

        (path,) = shard.files
        if shard.builder == "json":
            _check_utf8(Path(path), cfg.encoding_errors)
        kwargs = {"encoding_errors": cfg.encoding_errors} if shard.builder == "json" else {}
        try:  # streamed: a batch of rows at a time, however large the file
            ds = datasets.load_dataset(shard.builder, data_files=[path], split="train", streaming=True, **kwargs)
            yield from _table_rows(ds, cfg, shard.origin)
        except CorpusError:
            raise
        except Exception as e:  # datasets raises a dozen exception types for a malformed file
            raise CorpusError(f"could not read corpus file {path} as {shard.builder}: {e}") from e


def _text_file_rows(shard: Shard, cfg: CorpusConfig) -> Iterator[dict]:
    """One row per text file (a work, its path the doc id), via the `datasets` text builder."""
    import datasets

    for f in shard.files:
        _check_utf8(Path(f), cfg.encoding_errors)
    ds = datasets.load_dataset("text", data_files=list(shard.files), split="train", streaming=True,
                               sample_by="document", keep_linebreaks=True, encoding_errors=cfg.encoding_errors)
    files = iter(shard.files)  # one row per file, an empty file included
    for batch in ds.iter(batch_size=BATCH_ROWS):
        for text in batch["text"]:
            f = next(files)  # names repeat across folders: the path is the id
            yield {"doc_id": f, "text": text, "source": None, "work": f}


def _table_rows(ds, cfg: CorpusConfig, origin: str) -> Iterator[dict]:
    """The rows of a `datasets` table (a batch at a time); row i's doc id is "<origin>:<i>"."""
    i = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        if cfg.text_column not in batch:
            raise CorpusError(f"corpus {origin!r} has no text column {cfg.text_column!r}; its columns are "
                              f"{sorted(batch)}: set corpus.text_column to one of them")
        texts = batch[cfg.text_column]
        sources = batch.get(cfg.source_column) or [None] * len(texts)
        works = batch.get(cfg.work_column) or [None] * len(texts)
        for text, source, work in zip(texts, sources, works):
            if isinstance(text, str):
                yield {"doc_id": f"{origin}:{i}", "text": text, "source": None if source is None else str(source),
                       "work": None if work is None else str(work)}
            i += 1


def _check_utf8(path: Path, errors: str) -> None:
    """Refuse (strict) or warn of (replace) a file that is not UTF-8, read a block at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(8 << 20)
            pending = len(decoder.getstate()[0])  # the start of a character cut at the last block's end
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                start = offset - pending + e.start
                if errors == "strict":
                    bad = _byte_at(path, start)
                    raise CorpusError(
                        f"corpus file {str(path)!r} is not valid UTF-8 (byte {start}: {bad!r}); convert it (e.g. "
                        "iconv -f latin1 -t utf-8) or set corpus.encoding_errors=replace to decode it with U+FFFD "
                        "replacement characters") from None
                log.warning("corpus file %s is not valid UTF-8 (first bad byte at %d); decoding with replacement "
                            "characters because corpus.encoding_errors=replace", path, start)
                return
            if not block:
                return
            offset += len(block)


def _byte_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1)


def _hub_dataset(cfg: CorpusConfig):
    import datasets

    try:
        return datasets.load_dataset(cfg.name, split=cfg.hub_split)  # memory-mapped from datasets' cache
    except Exception as e:
        offline = datasets.config.HF_HUB_OFFLINE
        hint = ("this process is offline (HF_HUB_OFFLINE=1, moie's default: nothing is downloaded from the hub); "
                "on a machine with hub access export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0, or save the data set "
                "as .jsonl/.parquet and use corpus.source=files") if offline else "check the name and corpus.hub_split"
        raise CorpusError(f"could not load hub data set {cfg.name!r} (split {cfg.hub_split!r}): "
                          f"{type(e).__name__}: {e}. {hint}") from e


def _describe(cfg: CorpusConfig) -> str:
    if cfg.source == "files":
        return f"files {cfg.files}"
    if cfg.source == "hub":
        return f"hub data set {cfg.name!r}"
    return "embedded default corpus"
