"""`moie library`: the MLflow Model Registry seen as experts, central models and compositions.

A model URI is `models:/<name>/<version>` or `models:/<name>@<alias>` (aliases are set with
`moie library alias`); whatever names a model, what gets recorded (composition manifests,
lineage) is the exact version. Where models live and how they are checked is the
catalog's (`pipeline.store.catalog`); this is the command's face: list, show, alias.
"""
from __future__ import annotations

import re

from pipeline.errors import StageError
from pipeline.store.catalog import Catalog, exact_uri, uses
from pipeline.store.names import COMPOSITION_MODEL, LIBRARY, Tag, is_moie_tag, tag_key

TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


def parse_filters(items: list[str]) -> dict[str, str]:
    """['domain=code', 'moie.pipeline=abc'] -> tag filters (keys without a dot get 'moie.')."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StageError(f"filter {item!r} must look like TAG=VALUE, e.g. domain=code or pipeline=<run id>")
        if not TAG_KEY.fullmatch(key):
            raise StageError(f"filter tag {key!r} may hold only letters, digits, '_', '-' and '.', e.g. domain=code")
        out[tag_key(key)] = value
    return out


def list_models(catalog: Catalog, filters: dict[str, str] | None = None, model: str | None = None) -> list[dict]:
    """One row per registered version of the library's models (or of `model`), newest first within each name."""
    rows = []
    for name in [model] if model else LIBRARY:
        versions = catalog.versions(name, filters)[::-1]
        aliases = catalog.aliases(name) if versions else {}
        for v in versions:
            metrics = catalog.client.get_run(v.run_id).data.metrics
            rows.append({"uri": exact_uri(v), "name": name, "version": int(v.version),
                         "aliases": aliases.get(str(v.version), []),
                         "pipeline": v.tags.get(Tag.PIPELINE), "role": v.tags.get(Tag.ROLE) or
                         v.tags.get(Tag.MODE) or "expert", "domain": v.tags.get(Tag.DOMAIN),
                         "purity": float(v.tags[Tag.PURITY]) if Tag.PURITY in v.tags else None,
                         "tokenizer": v.tags.get(Tag.TOKENIZER),
                         "params": int(metrics["params"]) if "params" in metrics else None,
                         "val_bpb": metrics.get("final_val_bpb", metrics.get("val_bpb"))})
    return rows


def show_model(catalog: Catalog, uri: str) -> dict:
    """A model's lineage: corpus, clustering, pipeline run, metrics, and the compositions using it."""
    v = catalog.resolve(uri)
    run = catalog.client.get_run(v.run_id)
    pipeline_id = v.tags.get(Tag.PIPELINE)
    pipeline = catalog.client.get_run(pipeline_id) if pipeline_id else None
    corpus = {k.removeprefix("corpus."): val for k, val in (pipeline.data.params.items() if pipeline else [])
              if k.startswith("corpus.") and val not in ("None", "[]")}
    info = {"uri": exact_uri(v), "aliases": catalog.aliases(v.name).get(str(v.version), []),
            "tags": {k: val for k, val in v.tags.items() if is_moie_tag(k)},
            "run": {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status},
            "pipeline": {"id": pipeline_id, "name": pipeline.info.run_name if pipeline else None,
                         "config": pipeline.data.params.get("name") if pipeline else None},
            "corpus": corpus, "cluster_run": v.tags.get(Tag.CLUSTER_RUN), "metrics": dict(run.data.metrics)}
    if v.name == COMPOSITION_MODEL:  # its parts; one deleted from the registry is marked so
        info["uses"] = [uri if catalog.exists(uri) else f"{uri} (deleted: the composition cannot load)"
                        for uri in uses(v)]
    info["used_by"] = catalog.users_of(info["uri"])
    return info


def set_alias(catalog: Catalog, uri: str, alias: str) -> str:
    """Point `alias` of the URI's registered model at its version; return models:/name@alias."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", alias.lstrip("@")) or alias.lstrip("@").isdigit():
        raise StageError(f"alias {alias!r} must start with a letter and use letters, digits, - and _ (e.g. code)")
    v = catalog.resolve(uri)
    alias = alias.lstrip("@")
    catalog.client.set_registered_model_alias(v.name, alias, v.version)
    return f"models:/{v.name}@{alias}"


def format_table(rows: list[dict]) -> str:
    columns = ["uri", "aliases", "role", "domain", "purity", "params", "val_bpb", "pipeline", "tokenizer"]

    def cell(row, key):
        value = row[key]
        if value is None or value == []:
            return "-"
        if key == "aliases":
            return ",".join("@" + a for a in value)
        if isinstance(value, float):
            return f"{value:.3f}"
        if key == "pipeline":
            return value[:8]
        return str(value)

    table = [columns] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)
