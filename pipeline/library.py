"""The expert library: the MLflow Model Registry seen as experts, central models and compositions.

A model URI is `models:/<name>/<version>` or `models:/<name>@<alias>` (aliases are set with
`moie library alias`); whatever names a model, what gets recorded (composition manifests,
lineage) is the exact version. Every download is checked against the sha256 recorded on
the version (`moie.sha256`) before anything is loaded, and a composition manifest written
by a newer moie is refused rather than misread.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.artifacts import ChecksumError, verify_sha256
from pipeline.expert_stage import CENTRAL_MODEL, EXPERT_MODEL
from pipeline.stages import StageError
from pipeline.tracking import Tracker

COMPOSITION_MODEL = "moie-composition"
LIBRARY = (EXPERT_MODEL, CENTRAL_MODEL, COMPOSITION_MODEL)
MANIFEST_FORMAT = 1  # composition manifests this moie writes and reads
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/name/3' -> (name, '3', None); 'models:/name@code' -> (name, None, 'code')."""
    m = URI.match(uri.strip())
    if not m:
        raise StageError(f"model URI {uri!r} must look like models:/<registered model>/<version> or "
                         "models:/<registered model>@<alias>, e.g. models:/moie-expert/3 or models:/moie-expert@code")
    return m.group("name"), m.group("version"), m.group("alias")


def resolve_version(tracker: Tracker, uri: str):
    """The registry's model version a URI names; a clear error if there is none."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        if alias:
            return tracker.client.get_model_version_by_alias(name, alias)
        return tracker.client.get_model_version(name, version)
    except MlflowException:
        what = f"alias @{alias} of {name}" if alias else f"model version {uri}"
        raise StageError(f"{what} does not exist in the registry at {tracker.uri}; see what does with "
                         "`moie library list`") from None


def exact_uri(version) -> str:
    return f"models:/{version.name}/{version.version}"


def model_dir(tracker: Tracker, version, dst: Path) -> str:
    """Download a registered model's safetensors + JSON into dst, refusing a checksum mismatch."""
    path = Path(tracker.client.download_artifacts(version.run_id, "model", str(dst)))
    _verify(version, path / "model.safetensors")
    return str(path)


def _verify(version, path: Path) -> None:
    if "moie.sha256" not in version.tags:
        raise ChecksumError(f"{exact_uri(version)} has no moie.sha256 tag (not registered by moie, or the tag was "
                            "removed): refusing to load an unverifiable artifact")
    try:
        verify_sha256(path, version.tags.get("moie.sha256"))
    except ChecksumError as err:
        raise ChecksumError(f"{exact_uri(version)}: refusing to load it. {err}") from None


def composition_parts(tracker: Tracker, version, dst: Path) -> tuple[dict, dict]:
    """(new parameters as tensors, manifest) of a registered composition, checked."""
    from safetensors.torch import load_file

    path = Path(tracker.client.download_artifacts(version.run_id, "composition", str(dst)))
    _verify(version, path / "composition.safetensors")
    manifest = json.loads((path / "composition_manifest.json").read_text(encoding="utf-8"))
    check_manifest(manifest, exact_uri(version))
    return load_file(str(path / "composition.safetensors")), manifest


def router_state(tracker: Tracker, cluster_run_id: str, dst: Path) -> tuple[dict, dict]:
    """(tensors, meta) of a cluster run's cBTM router, checked against the sha256 the run recorded."""
    from pipeline.artifacts import load_state
    from pipeline.stages import ROUTER_NAME

    expected = tracker.client.get_run(cluster_run_id).data.tags.get(f"moie.sha256.{ROUTER_NAME}.safetensors")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (f"{ROUTER_NAME}.safetensors", f"{ROUTER_NAME}.json"):  # not the run's other artifacts
        tracker.download_artifacts(cluster_run_id, name, dst)
    return load_state(dst, ROUTER_NAME, expected)


def load_router(tracker: Tracker, cluster_run_id: str, dst: Path):
    from routing.router import ClusterRouter

    return ClusterRouter.from_state(*router_state(tracker, cluster_run_id, dst))


def check_manifest(manifest: dict, where: str) -> None:
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or fmt > MANIFEST_FORMAT:
        raise StageError(f"{where} has a composition manifest of format {fmt!r}, newer than this moie reads "
                         f"(format {MANIFEST_FORMAT}); upgrade moie to use it")


def check_tokenizers(versions: dict[str, object]) -> str:
    fingerprints = {uri: v.tags.get("moie.tokenizer") for uri, v in versions.items()}
    if len(set(fingerprints.values())) != 1 or None in fingerprints.values():
        raise StageError("the central model and experts must share one tokenizer, got "
                         + ", ".join(f"{uri}: {fp}" for uri, fp in fingerprints.items()))
    return next(iter(fingerprints.values()))


# --- the command line's face -----------------------------------------------------------------


def parse_filters(items: list[str]) -> dict[str, str]:
    """['domain=code', 'moie.pipeline=abc'] -> tag filters (keys without a dot get 'moie.')."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StageError(f"filter {item!r} must look like TAG=VALUE, e.g. domain=code or pipeline=<run id>")
        out[key if "." in key else f"moie.{key}"] = value
    return out


def list_models(tracker: Tracker, filters: dict[str, str] | None = None, model: str | None = None) -> list[dict]:
    """One row per registered version of the library's models (or of `model`), newest first within each name."""
    rows = []
    for name in [model] if model else LIBRARY:
        query = f"name = '{name}'" + "".join(f" and tags.`{k}` = '{v}'" for k, v in (filters or {}).items())
        versions = sorted(tracker.client.search_model_versions(query), key=lambda v: -int(v.version))
        aliases = _aliases(tracker, name) if versions else {}
        for v in versions:
            run = tracker.client.get_run(v.run_id)
            metrics = run.data.metrics
            rows.append({"uri": exact_uri(v), "name": name, "version": int(v.version),
                         "aliases": aliases.get(str(v.version), []),
                         "pipeline": v.tags.get("moie.pipeline"), "role": v.tags.get("moie.role") or
                         v.tags.get("moie.mode") or "expert", "domain": v.tags.get("moie.domain"),
                         "purity": float(v.tags["moie.purity"]) if "moie.purity" in v.tags else None,
                         "tokenizer": v.tags.get("moie.tokenizer"),
                         "params": int(metrics["params"]) if "params" in metrics else None,
                         "val_bpb": metrics.get("final_val_bpb", metrics.get("val_bpb"))})
    return rows


def _aliases(tracker: Tracker, name: str) -> dict[str, list[str]]:
    """version -> its aliases, for one registered model (one registry call)."""
    out: dict[str, list[str]] = {}
    for alias, version in sorted((tracker.client.get_registered_model(name).aliases or {}).items()):
        out.setdefault(str(version), []).append(alias)
    return out


def show_model(tracker: Tracker, uri: str) -> dict:
    """A model's lineage: corpus, clustering, pipeline run, metrics, and the compositions using it."""
    v = resolve_version(tracker, uri)
    run = tracker.client.get_run(v.run_id)
    pipeline_id = v.tags.get("moie.pipeline")
    pipeline = tracker.client.get_run(pipeline_id) if pipeline_id else None
    corpus = {k.removeprefix("corpus."): val for k, val in (pipeline.data.params.items() if pipeline else [])
              if k.startswith("corpus.") and val not in ("None", "[]")}
    info = {"uri": exact_uri(v), "aliases": _aliases(tracker, v.name).get(str(v.version), []),
            "tags": {k: val for k, val in v.tags.items() if k.startswith("moie.")},
            "run": {"id": run.info.run_id, "name": run.info.run_name, "status": run.info.status},
            "pipeline": {"id": pipeline_id, "name": pipeline.info.run_name if pipeline else None,
                         "config": pipeline.data.params.get("name") if pipeline else None},
            "corpus": corpus, "cluster_run": v.tags.get("moie.cluster_run"), "metrics": dict(run.data.metrics)}
    if v.name == COMPOSITION_MODEL:
        info["uses"] = [v.tags.get("moie.central"), *json.loads(v.tags.get("moie.experts", "[]"))]
    info["used_by"] = [exact_uri(c) for c in tracker.client.search_model_versions(f"name = '{COMPOSITION_MODEL}'")
                       if info["uri"] in [c.tags.get("moie.central"), *json.loads(c.tags.get("moie.experts", "[]"))]]
    return info


def set_alias(tracker: Tracker, uri: str, alias: str) -> str:
    """Point `alias` of the URI's registered model at its version; return models:/name@alias."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", alias.lstrip("@")) or alias.lstrip("@").isdigit():
        raise StageError(f"alias {alias!r} must start with a letter and use letters, digits, - and _ (e.g. code)")
    v = resolve_version(tracker, uri)
    alias = alias.lstrip("@")
    tracker.client.set_registered_model_alias(v.name, alias, v.version)
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


def load_registered(cfg, uri: str, tmp: str | Path):
    """(model, meta) for any registered version: an expert, a central model or a composition
    (built from its manifest's exact versions, with its routing settings)."""

    from composition.model import ComposedLM
    from experts.checkpoint import load_model

    tracker, tmp = Tracker(cfg), Path(tmp)
    version = resolve_version(tracker, uri)
    if version.name != COMPOSITION_MODEL:
        return load_model(model_dir(tracker, version, tmp / "model"))
    state, manifest = composition_parts(tracker, version, tmp / "composition")
    parts = [resolve_version(tracker, u) for u in [manifest["central"], *manifest["experts"]]]
    check_tokenizers({exact_uri(v): v for v in parts})
    central, *experts = [load_model(model_dir(tracker, v, tmp / f"m{i}"))[0] for i, v in enumerate(parts)]
    composed = ComposedLM(central, experts, n_points=manifest["n_points"], routing=manifest["routing"],
                          k=manifest["k"], threshold=manifest["threshold"], pool=manifest.get("pool", "token"))
    loaded = composed.load_state_dict(state, strict=False)
    if loaded.unexpected_keys or any(k.startswith(("blocks.", "gates.")) for k in loaded.missing_keys):
        raise StageError(f"{exact_uri(version)}: its parameters do not fit its manifest's models "
                         f"(unexpected {loaded.unexpected_keys[:2]}, missing {loaded.missing_keys[:2]})")
    if manifest["routing"] == "router":  # the experts' cBTM router, on the text of each window
        composed.prefix_router = _prefix_router(tracker, manifest, tmp)
    experts_meta = [{"uri": exact_uri(v), "domain": v.tags.get("moie.domain")} for v in parts[1:]]
    return composed.eval(), {"tokenizer": manifest["tokenizer"], "experts": experts_meta}


def _prefix_router(tracker: Tracker, manifest: dict, tmp: Path):
    import numpy as np
    import torch

    from routing.ensemble import window_weights

    router = load_router(tracker, manifest["router_run"], tmp / "router")

    def route(idx: torch.Tensor) -> torch.Tensor:
        rows = [window_weights(router, row, manifest["clusters"], 1) for row in idx.cpu().numpy()]
        return torch.from_numpy(np.stack(rows)).to(idx.device)  # (B, T, E)

    return route
