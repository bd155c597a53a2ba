"""The README and the pages under docs/ hold together: every relative link and anchor
resolves, the README stays short, and every docs page is reachable from it.

Each check is a function of the repository root, so the tests below run it on this
repository and on a small tree built in `tmp_path` with the fault put in on purpose.
The root is the nearest parent directory holding `pyproject.toml`, so this file works
from `tests/` and from `tests/unit/` alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

MAX_README_LINES = 300


def repo_root(start: Path | None = None) -> Path:
    here = (start or Path(__file__)).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError(f"no pyproject.toml above {here}")


ROOT = repo_root()

_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of [...]
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_pages(root: Path) -> list[Path]:
    """README.md and docs/*.md under `root` (those that exist)."""
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    return pages + sorted((root / "docs").glob("*.md"))


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if fence:
            if fenced is None:
                fenced = fence.group(1)
            elif fence.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lowercase, every character but
    letters, digits, `_`, `-` and spaces dropped, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    # code spans keep their text, `<id>` included; HTML tags outside them are dropped
    parts = re.split(r"(`+[^`]*`+)", text)
    text = "".join(part.strip("`") if part.startswith("`") else re.sub(r"<[^>]+>", "", part) for part in parts)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page offers: its headings' slugs (a repeated one gets -1, -2, ...
    as on GitHub) and explicit <a name|id="..."> anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose(path.read_text(encoding="utf-8")):
        found.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    out = []
    for number, line in _prose(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            out.append((number, match.group(1)))
    return out


def _where(root: Path, page: Path, number: int) -> str:
    return f"{page.relative_to(root).as_posix()}:{number}"


def broken_file_links(root: Path) -> list[str]:
    """Relative links to files or folders that do not exist (or lie outside the
    repository), and links to a .md file whose #anchor that file does not have."""
    root = root.resolve()
    problems = []
    for page in markdown_pages(root):
        for number, target in links(page):
            if target.startswith("#") or _SCHEME.match(target):
                continue  # in-page anchors: broken_anchor_links; URLs are not checked
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part)
            base = root if path_part.startswith("/") else page.parent
            resolved = (base / path_part.lstrip("/")).resolve()
            where = _where(root, page, number)
            if resolved != root and root not in resolved.parents:
                problems.append(f"{where}: {target} lies outside the repository")
            elif not resolved.exists():
                problems.append(f"{where}: {target} does not exist")
            elif anchor and resolved.is_file() and resolved.suffix == ".md":
                if unquote(anchor) not in anchors(resolved):
                    problems.append(f"{where}: {target}: no heading with anchor #{anchor}")
    return problems


def broken_anchor_links(root: Path) -> list[str]:
    """In-page links (#anchor) whose anchor is not a heading of the same page."""
    problems = []
    for page in markdown_pages(root.resolve()):
        own = anchors(page)
        for number, target in links(page):
            if target.startswith("#") and unquote(target[1:]) not in own:
                problems.append(f"{_where(root.resolve(), page, number)}: {target}: no such heading here")
    return problems


def readme_lines(root: Path) -> int:
    return len((root / "README.md").read_text(encoding="utf-8").splitlines())


def docs_pages_not_linked_from_readme(root: Path) -> list[str]:
    root = root.resolve()
    readme = root / "README.md"
    linked = set()
    for _, target in links(readme):
        if target.startswith("#") or _SCHEME.match(target):
            continue
        linked.add((root / unquote(target.partition("#")[0])).resolve())
    return [page.relative_to(root).as_posix() for page in sorted((root / "docs").glob("*.md"))
            if page.resolve() not in linked]


# --- this repository -------------------------------------------------------------------


def test_every_relative_link_resolves_to_an_existing_path_and_anchor():
    assert broken_file_links(ROOT) == []


def test_every_in_page_anchor_link_resolves_to_a_heading_of_the_same_page():
    assert broken_anchor_links(ROOT) == []


def test_readme_has_at_most_300_lines():
    assert readme_lines(ROOT) <= MAX_README_LINES


def test_every_docs_page_is_linked_from_the_readme():
    assert docs_pages_not_linked_from_readme(ROOT) == []


# --- the checks themselves, on a small tree with the faults put in on purpose ----------


def _tree(tmp_path: Path, readme: str, docs: dict[str, str]) -> Path:
    """A repository at tmp_path/repo: pyproject.toml, README.md, docs/<name>, bench/seeds.py."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "README.md").write_text(readme, encoding="utf-8")
    (root / "docs").mkdir()
    (root / "bench").mkdir()
    (root / "bench" / "seeds.py").write_text("")
    for name, text in docs.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    return root


GOOD_PAGE = "# Results\n\n## Across seeds (`bench/seeds.jsonl`)\n\nSee [the script](../bench/seeds.py).\n"


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Across seeds (`bench/seeds.jsonl`)", "across-seeds-benchseedsjsonl"),
        ("The 5 + 1 setting (`bench/new_domain.py`)", "the-5--1-setting-benchnew_domainpy"),
        ("What the central model's states carry", "what-the-central-models-states-carry"),
        ("Ceiling (`run.py --pipeline <id> ...`)", "ceiling-runpy---pipeline-id-"),
        ("Faults <em>now</em>", "faults-now"),
        ('Targets of the "experts worth composing" issue, on this run',
         "targets-of-the-experts-worth-composing-issue-on-this-run"),
    ],
)
def test_slug_follows_githubs_heading_rule(heading, anchor):
    assert slug(heading) == anchor


def test_a_good_tree_has_no_problems(tmp_path):
    root = _tree(
        tmp_path,
        "# x\n\n## Quick start\n\n[start](#quick-start), [seeds](docs/results.md#across-seeds-benchseedsjsonl),"
        " [bench](bench/), [web](https://example.org/missing), [mail](mailto:a@b.c)\n",
        {"results.md": GOOD_PAGE},
    )
    assert broken_file_links(root) == []
    assert broken_anchor_links(root) == []
    assert docs_pages_not_linked_from_readme(root) == []


def test_a_link_to_a_missing_file_is_reported(tmp_path):
    root = _tree(tmp_path, "# x\n\n[r](docs/results.md)\n", {"results.md": GOOD_PAGE + "[gone](../bench/gone.py)\n"})
    assert broken_file_links(root) == ["docs/results.md:6: ../bench/gone.py does not exist"]


def test_a_link_to_a_missing_anchor_of_another_page_is_reported(tmp_path):
    root = _tree(tmp_path, "# x\n\n[r](docs/results.md#across-seeds)\n", {"results.md": GOOD_PAGE})
    assert broken_file_links(root) == ["README.md:3: docs/results.md#across-seeds: no heading with anchor #across-seeds"]


def test_a_link_outside_the_repository_is_reported(tmp_path):
    root = _tree(tmp_path, "# x\n\n[r](docs/results.md) [up](../elsewhere.md)\n", {"results.md": GOOD_PAGE})
    (tmp_path / "elsewhere.md").write_text("# there\n")
    assert broken_file_links(root) == ["README.md:3: ../elsewhere.md lies outside the repository"]


def test_a_broken_in_page_anchor_is_reported(tmp_path):
    root = _tree(tmp_path, "# x\n\n## Quick start\n\n[start](#quick-stat)\n", {})
    assert broken_anchor_links(root) == ["README.md:5: #quick-stat: no such heading here"]


def test_links_and_headings_inside_code_do_not_count(tmp_path):
    readme = "# x\n\n```bash\n# Not a heading\n[x](missing.md)\n```\n\n`[y](missing.md)` [z](#not-a-heading)\n"
    root = _tree(tmp_path, readme, {})
    assert broken_file_links(root) == []
    assert broken_anchor_links(root) == ["README.md:8: #not-a-heading: no such heading here"]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    root = _tree(tmp_path, "# x\n\n## Seed 0\n\n## Seed 0\n\n[a](#seed-0) [b](#seed-0-1) [c](#seed-0-2)\n", {})
    assert broken_anchor_links(root) == ["README.md:7: #seed-0-2: no such heading here"]


def test_a_readme_over_300_lines_is_counted(tmp_path):
    root = _tree(tmp_path, "line\n" * (MAX_README_LINES + 1), {})
    assert readme_lines(root) == MAX_README_LINES + 1 > MAX_README_LINES


def test_a_docs_page_the_readme_does_not_link_is_reported(tmp_path):
    root = _tree(tmp_path, "# x\n\n[r](docs/results.md#results)\n", {"results.md": GOOD_PAGE, "extend.md": "# Extend\n"})
    assert docs_pages_not_linked_from_readme(root) == ["docs/extend.md"]


def test_the_root_is_the_nearest_folder_with_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    assert repo_root(tmp_path / "tests" / "unit" / "test_docs_links.py") == tmp_path
