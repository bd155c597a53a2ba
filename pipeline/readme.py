"""Generated parts of the docs, so that they are regenerated, never typed: the configuration
reference in docs/configuration.md (from pipeline/config.py) and the README's results table of a
real run (from its evaluate run in MLflow).

    python -m pipeline.readme                        # config reference only
    python -m pipeline.readme --pipeline RUN_ID      # and that pipeline's results (default config store)

Each part replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

from artifacts import atomic_path
from pipeline import config as config_module
from pipeline.config import load_config

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG_PAGE = README.parent / "docs" / "configuration.md"
FIELD = re.compile(r"^\s+(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$")


def config_reference() -> str:
    """A markdown table of every config key: default and the comment beside it in config.py."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    top = {f.name: f for f in dataclasses.fields(config_module.Config)}
    for name, f in top.items():
        cls = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if cls is None or not dataclasses.is_dataclass(cls):
            lines.append(f"| `{name}` | `{f.default}` | {_comment(config_module.Config, name)} |")
            continue
        for sub in dataclasses.fields(cls):
            default = (sub.default if sub.default is not dataclasses.MISSING
                       else sub.default_factory() if sub.default_factory is not dataclasses.MISSING else "")
            lines.append(f"| `{name}.{sub.name}` | `{default}` | {_comment(cls, sub.name)} |")
    return "\n".join(lines)


def _comment(cls: type, name: str) -> str:
    """The field's trailing comment, or the comment lines right above it."""
    lines = inspect.getsource(cls).splitlines()
    for i, line in enumerate(lines):
        m = FIELD.match(line)
        if m and m.group(1) == name:
            above = []
            for prev in reversed(lines[:i]):
                if not prev.strip().startswith("#"):
                    break
                above.insert(0, prev.strip().lstrip("# "))
            return (m.group(3) or " ".join(above)).replace("|", "\\|")
    return ""


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def results_block(cfg, pipeline_id: str) -> str:
    from pipeline.store.catalog import Catalog

    catalog = Catalog(cfg)
    runs = catalog.tracker.stage_runs(pipeline_id, "evaluate")
    if not runs:
        raise SystemExit(f"pipeline {pipeline_id} has no finished evaluate run")
    run = runs[0]
    table = catalog.results_table(run.info.run_id).strip()
    params = catalog.client.get_run(pipeline_id).data.params
    return (f"From `moie run` (config `{params.get('name', '?')}`, pipeline `{pipeline_id}`, evaluate run "
            f"`{run.info.run_id}`; {run.data.params.get('documents')} held-out documents, "
            f"{run.data.params.get('bytes')} bytes):\n\n{table}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.readme", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="write this pipeline's results table too")
    parser.add_argument("--config", default="configs/default.yaml", help="the config whose tracking store to read")
    args = parser.parse_args(argv)
    write_block(CONFIG_PAGE, "config", config_reference())
    if args.pipeline:

        write_block(README, "results", results_block(load_config(args.config), args.pipeline))
    return 0


def write_block(path: Path, name: str, body: str) -> None:
    text = replace_block(path.read_text(encoding="utf-8"), name, body)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"updated {path}")


if __name__ == "__main__":
    raise SystemExit(main())
