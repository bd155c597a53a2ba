import json
import logging
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import textgen

from pipeline.config import CorpusConfig
from pipeline.text.chunking import chunk_text
from pipeline.text.corpus import CorpusError, load_corpus, split_of


def files_cfg(paths, **kw) -> CorpusConfig:
    return CorpusConfig(source="files", files=[str(p) for p in paths], **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_txt_files_load_one_document_per_file_with_the_file_as_work(tmp_path):
    texts = {"a.txt": "Alpha paragraph one.\n\nAlpha two.\n", "b.txt": "Beta text, ünïcode.\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    docs = load_corpus(files_cfg([tmp_path / "*.txt"]))
    assert [d.text for d in docs] == list(texts.values())
    assert [d.work for d in docs] == [str(tmp_path / n) for n in texts]
    assert all(d.source is None for d in docs)


def test_jsonl_files_keep_text_source_and_work_columns(tmp_path):
    rows = textgen.corpus(3, ["cooking", "sailing"])
    docs = load_corpus(files_cfg([write_jsonl(tmp_path / "c.jsonl", rows)]))
    assert [(d.text, d.source, d.work) for d in docs] == [(r["text"], r["source"], r["work"]) for r in rows]


def test_parquet_files_load_like_jsonl(tmp_path):
    rows = textgen.corpus(3, ["finance"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    docs = load_corpus(files_cfg([tmp_path / "c.parquet"]))
    assert [(d.text, d.source, d.work) for d in docs] == [(r["text"], r["source"], r["work"]) for r in rows]


def test_missing_text_column_names_the_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "some words here"}])
    with pytest.raises(CorpusError, match=r"no text column 'text'.*\['body'\]"):
        load_corpus(files_cfg([path]))


def test_unsupported_file_type_is_an_error_listing_valid_types(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=r"unsupported type '\.csv'.*\.jsonl"):
        load_corpus(files_cfg([tmp_path / "c.csv"]))


def test_pattern_matching_no_file_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="matches no file"):
        load_corpus(files_cfg([tmp_path / "*.jsonl"]))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n  ")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        load_corpus(files_cfg([tmp_path / "a.txt"]))


def test_non_utf8_file_is_refused_by_default_naming_file_and_byte(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt.*not valid UTF-8 \(byte 3.*encoding_errors=replace"):
        load_corpus(files_cfg([path]))


def test_non_utf8_file_is_decoded_with_replacement_and_a_warning_when_asked(tmp_path, caplog):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        docs = load_corpus(files_cfg([path], encoding_errors="replace"))
    assert docs[0].text == "caf\ufffd au lait"
    assert "not valid UTF-8" in caplog.text


def test_hub_name_while_offline_is_a_clear_error():
    with pytest.raises(CorpusError, match=r"could not load hub data set 'someone/corpus'.*offline.*HF_HUB_OFFLINE=0"):
        load_corpus(CorpusConfig(source="hub", name="someone/corpus"))


def test_chunks_respect_the_byte_limit_and_rejoin_to_the_text():
    text = "\n\n".join(f"Paragraph {i} " + "wörd " * (i * 7 % 50) for i in range(80)) + "x" * 9000
    chunks = chunk_text(text, 512)
    assert all(len(c.encode("utf-8")) <= 512 for c in chunks)
    assert "".join(chunks) == text


def test_chunks_break_at_paragraph_boundaries_when_paragraphs_fit():
    paras = [f"para {i} " + "a" * 100 for i in range(20)]
    chunks = chunk_text("\n\n".join(paras), 300)
    assert all(c.endswith("\n\n") for c in chunks[:-1])


def test_split_is_by_whole_work_and_deterministic(tmp_path):
    # 40 works of 6 chunks each: every chunk of a work must land in the same split.
    rows = [{"text": "\n\n".join(f"work {w} part {p} " + "z" * 300 for p in range(6)), "work": f"w{w}"}
            for w in range(40)]
    cfg = files_cfg([write_jsonl(tmp_path / "c.jsonl", rows)], max_chunk_bytes=400,
                    val_fraction=0.25, test_fraction=0.25)
    docs = load_corpus(cfg)
    splits = defaultdict(set)
    for d in docs:
        splits[d.work].add(d.split)
    assert len(docs) == 240
    assert all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "validation", "test"}
    assert [d.split for d in load_corpus(cfg)] == [d.split for d in docs]


def test_chunks_of_a_row_without_work_id_share_one_split(tmp_path):
    rows = [{"text": "\n\n".join(f"doc {d} part {p} " + "z" * 300 for p in range(8))} for d in range(30)]
    cfg = files_cfg([write_jsonl(tmp_path / "c.jsonl", rows)], max_chunk_bytes=400,
                    val_fraction=0.3, test_fraction=0.3)
    splits = defaultdict(set)
    for d in load_corpus(cfg):
        splits[d.doc_id.split("#")[0]].add(d.split)
    assert len(splits) == 30 and all(len(s) == 1 for s in splits.values())


def test_a_character_longer_than_the_chunk_limit_is_kept_whole():
    assert chunk_text("ab \U0001F680 cd", 3) == ["ab ", "\U0001F680", " cd"]


def test_split_fractions_are_respected_on_many_works():
    counts = Counter(split_of(f"work-{i}", 0.1, 0.2) for i in range(20000))
    assert abs(counts["test"] / 20000 - 0.2) < 0.02
    assert abs(counts["validation"] / 20000 - 0.1) < 0.02


def test_duplicate_documents_are_dropped(tmp_path):
    rows = [{"text": "same words here"}, {"text": "same   words here"}, {"text": "other words"}]
    docs = load_corpus(files_cfg([write_jsonl(tmp_path / "c.jsonl", rows)]))
    assert [d.text for d in docs] == ["same words here", "other words"]


@pytest.mark.slow
def test_embedded_corpus_has_six_domains_capped_with_training_works_in_each():
    cfg = CorpusConfig(source="embedded", domain_bytes=150_000)
    docs = load_corpus(cfg)
    by_domain = Counter(d.source for d in docs)
    assert set(by_domain) == {"plays", "scripture", "speeches", "legal", "code", "docs"}
    for domain in by_domain:
        size = sum(len(d.text.encode()) for d in docs if d.source == domain)
        assert 150_000 <= size < 150_000 + 250_000  # whole works until the cap is reached
        assert any(d.split == "train" for d in docs if d.source == domain)
    assert all(len(d.text.encode()) <= cfg.max_chunk_bytes for d in docs)
    plays = [d for d in docs if d.source == "plays"]
    assert len({d.work for d in plays}) < len(plays)  # scenes of one play share its work id


def test_markdown_and_source_files_are_text_works_and_same_named_files_stay_apart(tmp_path):
    from pipeline.config import CorpusConfig
    from pipeline.text.corpus import load_corpus

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(f'"""package {folder}"""\nVALUE = "{folder}"\n')
    (tmp_path / "README.md").write_text("# Title\n\nSome words.\n")
    docs = load_corpus(CorpusConfig(source="files", files=[str(tmp_path / "**" / "*.py"), str(tmp_path / "*.md")]))
    assert len(docs) == 3 and len({d.doc_id for d in docs}) == 3
    assert any("package a" in d.text for d in docs) and any("Some words." in d.text for d in docs)
