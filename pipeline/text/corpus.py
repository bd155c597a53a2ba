"""Corpus loading through `datasets`: a hub data set, local files, or the embedded corpus.

Every source ends as a list of `Document`s (text, optional `source` domain label,
optional `work` id), chunked at paragraph boundaries, de-duplicated, and assigned to a
train / validation / test split by a hash of the work id — whole works, never lines.
"""
from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from artifacts.errors import MoieError
from pipeline.config import CorpusConfig
from pipeline.text.chunking import chunk_text
from pipeline.text.embedded import embedded_corpus_file

log = logging.getLogger(__name__)


SPLITS = ("train", "validation", "test")
# plain text (one work per file; markdown, reStructuredText and source code are text too), JSON lines, parquet
FILE_BUILDERS = {".txt": "text", ".md": "text", ".rst": "text", ".py": "text",
                 ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(MoieError, ValueError):
    """A corpus that cannot be loaded as configured."""


@dataclass
class Document:
    doc_id: str
    text: str
    source: str | None = None  # domain label, used only to evaluate clustering
    work: str | None = None  # chunks of one work share it, and therefore a split
    split: str = "train"


def load_corpus(cfg: CorpusConfig) -> list[Document]:
    """Load, chunk, de-duplicate and split the configured corpus."""
    if cfg.source == "embedded":
        rows = _rows_from_table_files([embedded_corpus_file(cfg.domain_bytes, cfg.max_chunk_bytes)], cfg)
    elif cfg.source == "files":
        rows = _rows_from_files(cfg)
    elif cfg.source == "hub":
        rows = _rows_from_hub(cfg)
    else:  # validated in config; kept for callers that build configs by hand
        raise CorpusError(f"corpus.source must be one of embedded, files, hub; got {cfg.source!r}")
    if cfg.exclude_sources:
        rows = _without_sources(rows, cfg.exclude_sources)
    docs = _chunk_and_dedupe(rows, cfg.max_chunk_bytes)
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise CorpusError(f"the corpus ({_describe(cfg)}) holds no non-empty documents; "
                          "give text files with content, or another corpus.source")
    for doc in docs:
        doc.split = split_of(doc.work or doc.doc_id, cfg.val_fraction, cfg.test_fraction)
    return docs


def _without_sources(rows: list[dict], excluded: list[str]) -> list[dict]:
    """The rows whose domain label is not among `excluded`; a label no row has is an error (a typo
    would otherwise leave the domain in)."""
    present = {row.get("source") for row in rows}
    unknown = sorted(set(excluded) - present)
    if unknown:
        known = sorted(s for s in present if s is not None)
        raise CorpusError(f"corpus.exclude_sources names {unknown}, which no document of the corpus is labelled "
                          f"with; its domains are {known or 'none (no source column)'}")
    return [row for row in rows if row.get("source") not in excluded]


def text_sha256(text: str) -> str:
    """The content hash of a document, as the cluster stage records it beside its cluster."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        if text_sha256(by_id[doc_id].text) != expected:
            raise CorpusError(f"document {doc_id!r} changed since the pipeline was clustered (its text no longer "
                              "has the sha256 recorded in assignments.parquet); restore the corpus as it was, or "
                              "cluster it again (`moie cluster --pipeline <id>`) to train on the new text")
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


def _chunk_and_dedupe(rows: list[dict], max_bytes: int) -> list[Document]:
    docs: list[Document] = []
    seen: set[bytes] = set()
    for row in rows:
        chunks = chunk_text(row["text"], max_bytes)
        for i, chunk in enumerate(chunks):
            key = hashlib.sha1(" ".join(chunk.split()).encode("utf-8")).digest()
            if not chunk.strip() or key in seen:
                continue
            seen.add(key)
            doc_id = row["doc_id"] if len(chunks) == 1 else f"{row['doc_id']}#{i}"
            # a row without a work id is its own work: its chunks must share one split
            docs.append(Document(doc_id=doc_id, text=chunk, source=row.get("source"),
                                 work=row.get("work") or row["doc_id"]))
    return docs


# --- loaders --------------------------------------------------------------------------


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


def _rows_from_files(cfg: CorpusConfig) -> list[dict]:
    files = _expand_files(cfg.files)
    for f in files:
        if f.suffix.lower() != ".parquet":
            _check_utf8(f, cfg.encoding_errors)
    text_files = [f for f in files if FILE_BUILDERS[f.suffix.lower()] == "text"]
    table_files = [f for f in files if FILE_BUILDERS[f.suffix.lower()] != "text"]
    rows = _rows_from_text_files(text_files, cfg) if text_files else []
    return rows + (_rows_from_table_files(table_files, cfg) if table_files else [])


def _check_utf8(path: Path, errors: str) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise CorpusError(
                f"corpus file {str(path)!r} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                "convert it (e.g. iconv -f latin1 -t utf-8) or set corpus.encoding_errors=replace "
                "to decode it with U+FFFD replacement characters") from None
        log.warning("corpus file %s is not valid UTF-8 (first bad byte at %d); decoding with replacement "
                    "characters because corpus.encoding_errors=replace", path, e.start)


def _rows_from_text_files(files: list[Path], cfg: CorpusConfig) -> list[dict]:
    """One document per text file (a work), via the `datasets` text builder."""
    import datasets

    # One split per file keeps the file <-> row mapping explicit.
    data_files = {f"file{i}": str(f) for i, f in enumerate(files)}
    dsd = datasets.load_dataset("text", data_files=data_files, sample_by="document", keep_linebreaks=True,
                                encoding_errors=cfg.encoding_errors)
    rows = []
    for i, f in enumerate(files):
        texts = dsd[f"file{i}"]["text"]
        text = "\n".join(texts)
        rows.append({"doc_id": str(f), "text": text, "source": None, "work": str(f)})  # names repeat across folders
    return rows


def _rows_from_table_files(files: list[Path], cfg: CorpusConfig) -> list[dict]:
    import datasets

    builders = {FILE_BUILDERS[Path(f).suffix.lower()] for f in files}
    rows: list[dict] = []
    for builder in sorted(builders):
        group = [str(f) for f in files if FILE_BUILDERS[Path(f).suffix.lower()] == builder]
        kwargs = {"encoding_errors": cfg.encoding_errors} if builder == "json" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", **kwargs)
        except Exception as e:  # datasets raises a dozen exception types for a malformed file
            raise CorpusError(f"could not read corpus files {group} as {builder}: {e}") from e
        rows.extend(_rows_from_dataset(ds, cfg, origin=",".join(Path(g).name for g in group)))
    return rows


def _rows_from_hub(cfg: CorpusConfig) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=cfg.hub_split)
    except Exception as e:
        offline = datasets.config.HF_HUB_OFFLINE
        hint = ("this process is offline (HF_HUB_OFFLINE=1, moie's default: nothing is downloaded from the hub); "
                "on a machine with hub access export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0, or save the data set "
                "as .jsonl/.parquet and use corpus.source=files") if offline else "check the name and corpus.hub_split"
        raise CorpusError(f"could not load hub data set {cfg.name!r} (split {cfg.hub_split!r}): "
                          f"{type(e).__name__}: {e}. {hint}") from e
    return _rows_from_dataset(ds, cfg, origin=cfg.name)


def _rows_from_dataset(ds, cfg: CorpusConfig, origin: str) -> list[dict]:
    columns = set(ds.column_names)
    if cfg.text_column not in columns:
        raise CorpusError(f"corpus {origin!r} has no text column {cfg.text_column!r}; its columns are "
                          f"{sorted(columns)}: set corpus.text_column to one of them")
    texts = list(ds[cfg.text_column])
    sources = list(ds[cfg.source_column]) if cfg.source_column in columns else [None] * len(texts)
    works = list(ds[cfg.work_column]) if cfg.work_column in columns else [None] * len(texts)
    rows = []
    for i, (text, source, work) in enumerate(zip(texts, sources, works)):
        if not isinstance(text, str):
            continue
        rows.append({"doc_id": f"{origin}:{i}", "text": text,
                     "source": None if source is None else str(source),
                     "work": None if work is None else str(work)})
    return rows


def _describe(cfg: CorpusConfig) -> str:
    if cfg.source == "files":
        return f"files {cfg.files}"
    if cfg.source == "hub":
        return f"hub data set {cfg.name!r}"
    return "embedded default corpus"
