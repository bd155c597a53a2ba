"""Where every stage's outputs live, and the one place that knows it.

Stages never import each other: each reads what an earlier stage wrote, and writes its
own outputs, through this catalog (Kedro's data catalog is the model):

| output | written by | where |
|---|---|---|
| router, assignments, cluster report | cluster | artifacts of the pipeline's cluster run |
| token files, checkpoints, the seed | experts | `checkpoint_root(pipeline, cluster run)` in the storage (`storage`) |
| experts, central / dense model | experts | registry: `moie-expert`, `moie-central` (+ the run's `model/`) |
| compositions | compose | registry: `moie-composition` (+ the run's `composition/`) |
| results | evaluate | artifacts of the pipeline's evaluate run |

Every registry query is built here (values quoted), every download is checked against
the sha256 recorded when it was written, and a manifest written by a newer moie is refused.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from artifacts import ChecksumError, load_state, read_tensors, verify_sha256
from pipeline.config import Config, check_storage
from pipeline.errors import StageError, one_line
from pipeline.store import storage
from pipeline.store.names import (CENTRAL, CENTRAL_MODEL, CENTRAL_ROLES, COMPOSITION_MODEL, DENSE, DENSE_MATCHED,
                                  DENSE_ROLES, EXPERT_MODEL, ROLE_CENTRAL, SEED, Tag, expert_name, sha_tag,
                                  tokens_index_tag, tokens_sha_tag)
from pipeline.store.pins import MLFLOW_OWN, check_pinned, pinned_files
from pipeline.store.tokens import REWRITE, checked_index, token_pins
from pipeline.store.tracking import Tracker, quote, workdir

MANIFEST_FORMAT = 1  # composition manifests this moie writes and reads
COMPOSITION_MANIFEST = "composition_manifest.json"
PARTS_SHA = "parts_sha256"  # a composition manifest's {exact URI: sha256 of its weights} of central + experts
MANIFEST_KEYS = ("central", "experts", "mode", "tokenizer", PARTS_SHA)  # (+ the CompositionSettings fields)
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))$")

# the cluster run's artifacts
ROUTER_NAME = "router"  # router.safetensors + router.json
ROUTER_FILES = (f"{ROUTER_NAME}.safetensors", f"{ROUTER_NAME}.json")
ROUTER_SHA = "router_sha256"  # a router-routed composition's manifest: {file: sha256} of its router
ASSIGNMENTS = "assignments.parquet"
CLUSTER_REPORT = "cluster_report.json"
RESULTS_TABLE = "results.md"  # the evaluate run's table


# the experts stage's models (tag moie.expert): expert-<cluster>, the dense baseline, an optional central



class MissingVersionError(StageError):
    """The registry answered: it holds no such version or alias."""


def token_tags(files: dict[str, str]) -> dict[str, str]:
    """The tags that pin token files ({split: location}) to what they hold now: the sha256 of each
    file and, where it has one, of its block index (read from the index: no file is hashed whole)."""
    tags = {}
    for split, path in files.items():
        pins = token_pins(path)
        tags[tokens_sha_tag(split)] = pins["file"]
        if "index" in pins:
            tags[tokens_index_tag(split)] = pins["index"]
    return tags


def check_token_files(owner: str, tags: dict[str, str], files: dict[str, str]) -> dict[str, str]:
    """Each token file ({split: location in the storage}) against what `tags` recorded of it: its
    block index's sha256 and its size (its blocks are checked by the tasks that read them), or, for
    a file recorded before block indexes, the sha256 of the whole file. Returns {location: block
    index sha256} of the files pinned by their index, for the tasks that read them."""
    pins = {}
    for split, path in files.items():
        index, whole = tags.get(tokens_index_tag(split)), tags.get(tokens_sha_tag(split))
        changed = f"the {split} tokens of {owner} at {path} changed since they were recorded"
        if index is not None:
            try:
                recorded = checked_index(path, index)["file_bytes"]
            except ChecksumError as err:
                raise ChecksumError(f"{changed}: {one_line(err)}") from None
            if (size := storage.stamp(path)[0]) != recorded:
                raise ChecksumError(f"{changed}: it has {size} bytes, not the {recorded} of its block index; {REWRITE}")
            pins[path] = index
        elif whole is not None and storage.sha256(path) != whole:
            raise ChecksumError(f"{changed} (sha256 {whole}); delete the file and run `moie experts` for the pipeline "
                                "again to write it anew from the corpus")
    return pins


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/name/3' -> (name, '3', None); 'models:/name@code' -> (name, None, 'code')."""
    m = URI.match(uri.strip())
    if not m:
        raise StageError(f"model URI {uri!r} must look like models:/<registered model>/<version> or "
                         "models:/<registered model>@<alias>, e.g. models:/moie-expert/3 or models:/moie-expert@code")
    return m.group("name"), m.group("version"), m.group("alias")


def exact_uri(version) -> str:
    return f"models:/{version.name}/{version.version}"


def check_manifest(manifest: dict, where: str) -> None:
    fmt = manifest.get("format")
    if fmt is None:
        raise StageError(f"{where} has a composition manifest that records no format: it was not written by "
                         "this moie; compose it again")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise StageError(f"{where} has a composition manifest without {', '.join(missing)}: it was not written "
                         "by this moie; compose it again")
    if not isinstance(fmt, int) or fmt > MANIFEST_FORMAT:
        raise StageError(f"{where} has a composition manifest of format {fmt!r}, newer than this moie reads "
                         f"(format {MANIFEST_FORMAT}); upgrade moie to use it")


def check_tokenizers(versions: dict[str, object]) -> str:
    """The one tokenizer fingerprint that every version shares; StageError otherwise."""
    fingerprints = {uri: v.tags.get(Tag.TOKENIZER) for uri, v in versions.items()}
    if len(set(fingerprints.values())) != 1 or None in fingerprints.values():
        raise StageError("the central model and experts must share one tokenizer, got "
                         + ", ".join(f"{uri}: {fp}" for uri, fp in fingerprints.items()))
    return next(iter(fingerprints.values()))


def uses(version) -> list[str]:
    """The exact URIs a registered composition is built from: central first, then its experts."""
    return [version.tags.get(Tag.CENTRAL), *json.loads(version.tags.get(Tag.EXPERTS, "[]"))]


class Catalog:
    """A pipeline's outputs in one tracking store: runs, artifacts, registered versions, files."""

    def __init__(self, cfg: Config, tracker: Tracker | None = None):
        self.cfg = cfg
        self.tracker = tracker or Tracker(cfg)
        self.client = self.tracker.client
        self._routers: dict[str, tuple[dict, dict]] = {}  # cluster run -> its router's (tensors, meta)
        self._checked: set[tuple] = set()  # (token file, its size and mtime, recorded sha256) read and found equal
        self.pins: dict[str, str] = {}  # token file -> the sha256 of its block index, checked here, for its readers

    @classmethod
    def of_registry(cls, uri: str) -> "Catalog":
        """A catalog that only reads registered models from the store at `uri` (no pipeline config)."""
        cfg = Config()
        return cls(cfg, Tracker(cfg, uri=uri, experiment=False))

    # --- cluster ----------------------------------------------------------------------------

    def cluster_run(self, pipeline_id: str):
        """The pipeline's newest finished cluster run."""
        runs = self.tracker.stage_runs(pipeline_id, "cluster")
        if not runs:
            raise StageError(f"pipeline {pipeline_id} has no finished cluster run; run "
                             f"`moie cluster --pipeline {pipeline_id} --config ...` first")
        return runs[0]

    def assignments(self, pipeline_id: str, arrow: bool = False,
                    columns: Sequence[str] | None = None) -> tuple[object, dict, dict]:
        """(cluster run, its assignments table as columns — or, `arrow`, as a pyarrow Table, a few
        bytes a document instead of Python objects; `columns`: these only — and its report) of the
        pipeline's clustering, each file checked against the sha256 the cluster run recorded."""
        import pyarrow.parquet as pq

        run = self.cluster_run(pipeline_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = self.run_file(run, ASSIGNMENTS, Path(tmp))
            present = pq.read_schema(path).names  # (an older clustering may lack some: its stage says so)
            table = pq.read_table(path, columns=columns and [c for c in columns if c in present])
            table = table if arrow else table.to_pydict()
            report = json.loads(self.run_file(run, CLUSTER_REPORT, Path(tmp)).read_text(encoding="utf-8"))
        return run, table, report

    def run_file(self, run, name: str, dst: Path) -> Path:
        """One artifact of a run (which recorded its sha256 as tag moie.sha256.<name>), downloaded and checked."""
        expected = run.data.tags.get(sha_tag(name))
        where = f"{run.info.artifact_uri}/{name}"
        if expected is None:
            raise ChecksumError(f"run {run.info.run_id} recorded no sha256 for {name} (tag {sha_tag(name)}): "
                                "refusing to use it unverified; run the stage that made it again")
        path = self.download(run.info.run_id, name, dst, where)
        verify_sha256(path, expected, shown=where, fix=f"run the stage that made it (run {run.info.run_id}) again")
        return path

    def download(self, run_id: str, path: str, dst: Path, where: str) -> Path:
        """A run's artifact, or a StageError saying that the store has lost it."""
        from mlflow.exceptions import MlflowException

        try:
            return self.tracker.download_artifacts(run_id, path, dst)
        except (MlflowException, OSError) as err:
            raise StageError(f"{where} cannot be read from the artifact store ({one_line(err)}): it was deleted "
                             "or the store moved; run the stage that made it again") from None

    def router_pin(self, cluster_run_id: str) -> dict[str, str]:
        """{file: sha256} of a cluster run's router as the run recorded it: what a composition's
        manifest pins (the manifest is pinned in the registry; run tags are not)."""
        return _router_pin(self.client.get_run(cluster_run_id))

    def router_state(self, cluster_run_id: str, dst: Path, pinned: dict[str, str] | None = None) -> tuple[dict, dict]:
        """(tensors, meta) of a cluster run's cBTM router, checked against the sha256 the run
        recorded and, for a composition, the sha256 its manifest pinned (`pinned`); downloaded
        once per catalog (`moie run` asks again for each early task)."""
        if pinned is None and cluster_run_id in self._routers:
            return self._routers[cluster_run_id]
        run = self.client.get_run(cluster_run_id)
        if pinned is not None and _router_pin(run) != pinned:
            raise ChecksumError(f"the router of cluster run {cluster_run_id} is not the one the composition was "
                                f"trained with (its manifest pins {pinned}); refusing to route by it")
        if cluster_run_id not in self._routers:
            dst.mkdir(parents=True, exist_ok=True)
            for name in ROUTER_FILES:  # not the run's other artifacts
                self.run_file(run, name, dst)
            self._routers[cluster_run_id] = load_state(dst, ROUTER_NAME)
        return self._routers[cluster_run_id]

    def router(self, cluster_run_id: str, dst: Path, pinned: dict[str, str] | None = None):
        from routing.router import ClusterRouter

        return ClusterRouter.from_state(*self.router_state(cluster_run_id, dst, pinned))

    def composition_router(self, manifest: dict, dst: Path):
        """The cBTM router a router-routed composition routes by, checked against its manifest's pin."""
        if ROUTER_SHA not in manifest:
            raise StageError("this composition's manifest pins no router (router_sha256): it was composed by an "
                             "older moie; compose it again")
        return self.router(manifest["router_run"], dst, manifest[ROUTER_SHA])

    # --- the experts stage's files ----------------------------------------------------------------

    def checkpoint_root(self, pipeline_id: str, cluster_run_id: str) -> str:
        """Shared data and checkpoints of the experts trained on one clustering of one pipeline
        (a new clustering of the same pipeline never reuses another's data or checkpoints): a
        location in the storage."""
        return storage.join(storage_location(self.cfg), pipeline_id, cluster_run_id)

    @staticmethod
    def token_file(root: str, name: str, split: str) -> str:
        """The byte tokens of one model's split ('train' or 'val') under a checkpoint root."""
        return storage.join(root, "data", f"{name}.{split}.npy")

    @staticmethod
    def checkpoint_dir(root: str, name: str) -> str:
        return storage.join(root, name)

    @staticmethod
    def seed_dir(root: str) -> str:
        """The dense model paused at the seed step, which every expert branches from."""
        return storage.join(root, "seed", "model")

    def data_path(self, version, split: str, name: str | None = None) -> str:
        """A token file of the clustering a model was trained on: the model's own data by
        default, or another model's (`name`, e.g. 'dense') of the same clustering."""
        tags = version.tags
        if Tag.CLUSTER_RUN not in tags:
            raise StageError(f"{version.name}/{version.version} has no {Tag.CLUSTER_RUN} tag (registered by an older "
                             "moie); retrain it with `moie experts`")
        # where its stage wrote it (recorded), else where this config's storage puts it
        root = tags.get(Tag.STORAGE_ROOT) or self.checkpoint_root(tags[Tag.PIPELINE], tags[Tag.CLUSTER_RUN])
        path = self.token_file(root, name or tags[Tag.EXPERT], split)
        if storage.kind(path) != "file":
            raise StageError(f"training data of {version.name}/{version.version} not found at {path}; compose "
                             "with the storage the experts stage wrote to (MOIE_STORAGE or `storage` in the config)")
        own = tags[Tag.EXPERT]
        recorded = (path, storage.stamp(path), tags.get(tokens_sha_tag(split), ""))
        if (name in (None, own) or (own in (CENTRAL, SEED) and name == DENSE)) and recorded not in self._checked:
            self.pins |= check_token_files(exact_uri(version), tags, {split: path})  # the files its run recorded
            self._checked.add(recorded)  # once per catalog: `moie run` asks again for each early task
        return path

    # --- the registry ---------------------------------------------------------------------------

    def versions(self, name: str, tags: dict[str, str] | None = None) -> list:
        """Registered versions of `name` whose tags have the given values, oldest first."""
        query = f"name = {quote(name)}" + "".join(f" and tags.`{k}` = {quote(v)}" for k, v in (tags or {}).items())
        return sorted(self.client.search_model_versions(query), key=lambda v: int(v.version))

    def version_of_run(self, name: str, run_id: str):
        """The version of registered model `name` made from run `run_id`, or None."""
        found = self.client.search_model_versions(f"name = {quote(name)} and run_id = {quote(run_id)}")
        return found[0] if found else None

    def resolve(self, uri: str):
        """The registry's model version a URI names; a clear error if there is none."""
        from mlflow.exceptions import MlflowException

        name, version, alias = parse_model_uri(uri)
        try:
            if alias:
                return self.client.get_model_version_by_alias(name, alias)
            return self.client.get_model_version(name, version)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise StageError(f"the registry at {self.tracker.uri} could not answer for {uri} "
                                 f"({one_line(err)}); check that it is up and reachable") from None
            what = f"alias @{alias} of {name}" if alias else f"model version {uri}"
            raise MissingVersionError(f"{what} does not exist in the registry at {self.tracker.uri}; see what does "
                                      "with `moie library list`") from None

    def exists(self, uri: str) -> bool:
        """Whether the registry holds the version `uri` names (errors other than its absence are raised)."""
        try:
            self.resolve(uri)
        except MissingVersionError:
            return False
        return True

    def register(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` for the run's safetensors artifacts; its exact URI."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # exists already
        return f"models:/{name}/{self.client.create_model_version(name, source, run_id=run_id, tags=tags).version}"

    def aliases(self, name: str) -> dict[str, list[str]]:
        """version -> its aliases, for one registered model (one registry call)."""
        out: dict[str, list[str]] = {}
        for alias, version in sorted((self.client.get_registered_model(name).aliases or {}).items()):
            out.setdefault(str(version), []).append(alias)
        return out

    def version_folder(self, version, dst: Path) -> Path:
        """The MLflow model folder of a registered version (its run's `model/` or `composition/`),
        downloaded into dst and checked against the registry's pin of every file, MLmodel
        included (`pins.check_pinned`): nothing reads a file of it, MLflow included, before this
        returns. MLflow's own registered_model_meta is removed from the copy."""
        kind = "composition" if version.name == COMPOSITION_MODEL else "model"
        shown = f"{exact_uri(version)} ({version.source})"
        files = pinned_files(version, exact_uri(version))  # no pin, no download
        path = self.download(version.run_id, kind, dst, shown)
        check_pinned(path, files, kind, shown)
        (path / MLFLOW_OWN).unlink(missing_ok=True)
        return path

    def model_dir(self, version, dst: Path) -> str:
        """A registered model's safetensors + JSON, downloaded into dst and checked (version_folder)."""
        return str(self.version_folder(version, dst) / "data" / "model")

    def composition_parts(self, version, dst: Path) -> tuple[dict, dict]:
        """(new parameters as tensors, manifest) of a registered composition, checked (version_folder)."""
        return read_composition(self.version_folder(version, dst) / "data" / "composition", exact_uri(version))

    # --- a pipeline's registered models ------------------------------------------------------------

    def pipeline_models(self, pipeline_id: str) -> tuple[str, list[str]]:
        """The pipeline's central model URI and its experts' URIs, ordered by cluster."""
        newest_first = self.versions(CENTRAL_MODEL, {Tag.PIPELINE: pipeline_id})[::-1]
        central = sorted(newest_first, key=lambda v: v.tags.get(Tag.ROLE) != ROLE_CENTRAL)
        central = [v for v in central if v.tags.get(Tag.ROLE) in CENTRAL_ROLES]
        experts = sorted((v for v in self.versions(EXPERT_MODEL, {Tag.PIPELINE: pipeline_id})
                          if Tag.EXTENSION not in v.tags), key=lambda v: int(v.tags.get(Tag.CLUSTER, 0)))
        if not central or not experts:
            raise StageError(f"pipeline {pipeline_id} has no registered central model and experts; run "
                             f"`moie experts --pipeline {pipeline_id}` first, or name models with --central/--experts")
        return exact_uri(central[0]), [exact_uri(v) for v in experts]

    def missing_experts(self, pipeline_id: str, versions: list) -> dict[str, str]:
        """The clusters of the experts' clustering that have no expert among `versions` (registered
        expert versions): {expert-<k>: why} (its training was skipped, or no version of it is
        registered: deleted)."""
        cluster_runs = {v.tags.get(Tag.CLUSTER_RUN) for v in versions} - {None}
        if len(cluster_runs) != 1:
            return {}  # experts of several clusterings (named by hand): no one set of clusters to cover
        run = self.client.get_run(cluster_runs.pop())
        k = int(run.data.params.get("cluster.k", 0))
        present = {v.tags.get(Tag.EXPERT) for v in versions}
        skipped = {r.data.tags[Tag.EXPERT]: r.data.tags[Tag.SKIPPED]
                   for r in self.tracker.stage_runs(pipeline_id, "experts", status=None)
                   if Tag.SKIPPED in r.data.tags and Tag.EXPERT in r.data.tags}
        return {name: (f"its training was skipped: {skipped[name]}" if name in skipped
                       else "no version of it is registered (deleted, or never trained)")
                for name in map(expert_name, range(k)) if name not in present}

    def dense_model(self, pipeline_id: str):
        """The pipeline's dense baseline version (the central model too, unless one was configured), or None."""
        dense = [v for v in self.versions(CENTRAL_MODEL, {Tag.PIPELINE: pipeline_id})
                 if v.tags.get(Tag.ROLE) in DENSE_ROLES]
        return dense[-1] if dense else None

    def seed_model(self, pipeline_id: str):
        """The pipeline's registered seed (the dense model where the experts branched), or None."""
        seeds = self.versions(CENTRAL_MODEL, {Tag.PIPELINE: pipeline_id, Tag.ROLE: SEED})
        return seeds[-1] if seeds else None

    def matched_model(self, pipeline_id: str):
        """The pipeline's matched-compute dense baseline version, or None."""
        matched = self.versions(CENTRAL_MODEL, {Tag.PIPELINE: pipeline_id, Tag.ROLE: DENSE_MATCHED})
        return matched[-1] if matched else None

    def pipeline_compositions(self, pipeline_id: str) -> dict[str, object]:
        """The newest registered composition of the pipeline for each mode (not those --add made);
        those composed on the pipeline's seed under `<mode>_seed`."""
        found = {}
        for v in self.versions(COMPOSITION_MODEL, {Tag.PIPELINE: pipeline_id}):
            if Tag.ADDED_TO not in v.tags:  # an expert added later makes a different system
                mode = v.tags.get(Tag.MODE)
                found[f"{mode}_seed" if v.tags.get(Tag.HUB) == SEED else mode] = v  # on the seed: another system
        return found

    def extensions(self, pipeline_id: str) -> list:
        """The experts `moie extend` added to the pipeline, oldest first (each tagged with its domain)."""
        return [v for v in self.versions(EXPERT_MODEL, {Tag.PIPELINE: pipeline_id}) if Tag.EXTENSION in v.tags]

    def users_of(self, uri: str) -> list[str]:
        """Exact URIs of the compositions that use the model `uri`."""
        return [exact_uri(c) for c in self.versions(COMPOSITION_MODEL) if uri in uses(c)]

    def results_table(self, evaluate_run_id: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return self.tracker.download_artifacts(evaluate_run_id, RESULTS_TABLE, Path(tmp)).read_text()

    # --- loading any registered model ------------------------------------------------------------

    def load_registered(self, uri: str, tmp: str | Path):
        """(model, meta) for any registered version: an expert, a central model or a composition
        (built from its manifest's exact versions, with its routing settings)."""
        from experts.checkpoint import load_model

        tmp = Path(tmp)
        version = self.resolve(uri)
        if version.name != COMPOSITION_MODEL:
            return load_model(self.model_dir(version, tmp / "model"))
        state, manifest = self.composition_parts(version, tmp / "composition")
        return self.load_composition(state, manifest, tmp)

    def load_composition(self, state: dict, manifest: dict, tmp: str | Path):
        """(model, meta) of a composition's parameters and manifest, its central model and experts
        taken from this registry (exact versions, checked), with its routing settings; a
        router-routed one routes by the experts' cBTM router on the text before each byte."""
        from composition.loader import CompositionSettings

        tmp = Path(tmp)
        router = None
        if manifest["routing"] == "router":
            router = self.composition_router(manifest, tmp / "router"), manifest["clusters"]
        parts = [self.resolve(u) for u in [manifest["central"], *manifest["experts"]]]
        composed = self._assemble(parts, CompositionSettings.from_manifest(manifest), state, tmp,
                                  manifest[PARTS_SHA], router=router)
        experts_meta = [{"uri": exact_uri(v), "domain": v.tags.get(Tag.DOMAIN)} for v in parts[1:]]
        return composed.eval(), {"tokenizer": manifest["tokenizer"], "experts": experts_meta}

    def assemble(self, central: str, experts: list[str], settings, state: dict | None, dst: Path,
                 parts_sha256: dict[str, str], complete: bool = True, router=None, record_routing: bool = False):
        """The one assembly of a composed model from the registry: the central model and experts (exact
        URIs) resolved, each the version the composition was trained with (`parts_sha256`, the
        manifest's record), sharing one tokenizer, downloaded into `dst` and checked against its
        sha256, then composed with `state` (the composition's new parameters). router:
        (ClusterRouter, its clusters in the experts' order) for routing "router" (generation routes
        by each window's text, scoring by each byte's whole prefix)."""
        parts = [self.resolve(u) for u in [central, *experts]]
        return self._assemble(parts, settings, state, dst, parts_sha256, complete, router, record_routing)

    def _assemble(self, parts: list, settings, state: dict | None, dst: Path, parts_sha256: dict[str, str],
                  complete: bool = True, router=None, record_routing: bool = False):
        """assemble() of resolved versions, central first."""
        from composition.loader import load_composed

        for v in parts:  # the versions it was trained with, not others of the same number in another store
            recorded = parts_sha256.get(exact_uri(v))
            if recorded is None or v.tags.get(Tag.SHA) != recorded:
                raise ChecksumError(f"{exact_uri(v)} in the registry at {self.tracker.uri} is not the model the "
                                    f"composition was trained with (its weights had sha256 {recorded}): load the "
                                    "composition from the registry it was registered in (MLFLOW_TRACKING_URI)")
        check_tokenizers({exact_uri(v): v for v in parts})
        central_dir, *expert_dirs = [self.model_dir(v, Path(dst) / f"m{i}") for i, v in enumerate(parts)]
        routers = {}
        if router is not None:
            from routing.ensemble import document_weights, prefix_router

            cbtm, clusters = router
            routers = {"prefix_router": prefix_router(cbtm, clusters),
                       "document_router": lambda text: document_weights(cbtm, text, clusters, 1)}
        return load_composed(central_dir, expert_dirs, settings, state, complete=complete,
                             record_routing=record_routing, **routers)


def assemble_registered(tracking_uri: str, central: str, experts: list[str], settings, state: dict | None,
                        dst: Path, parts_sha256: dict[str, str], **kwargs):
    """In a Ray task: Catalog.assemble from the registry at `tracking_uri` (the task's own download)."""
    return Catalog.of_registry(tracking_uri).assemble(central, experts, settings, state, dst, parts_sha256, **kwargs)


def fetch_models(tracking_uri: str, uris: list[str], dst: Path) -> list[str]:
    """In a Ray task: the model directories of exact registered versions, downloaded from the
    registry at `tracking_uri` into `dst` (this node's scratch) and checked against their sha256.
    Tasks fetch their own models, so nothing passes through the driver's disk."""
    catalog = Catalog.of_registry(tracking_uri)
    return [catalog.model_dir(catalog.resolve(uri), Path(dst) / f"m{i}") for i, uri in enumerate(uris)]


def storage_location(cfg: Config) -> str:
    """Where token files, checkpoints and the seed live: MOIE_STORAGE, else the config's
    `storage`, else <workdir>/checkpoints."""

    configured = os.environ.get("MOIE_STORAGE") or cfg.storage
    if not configured:
        return str(workdir(cfg) / "checkpoints")
    check_storage(configured, "MOIE_STORAGE" if os.environ.get("MOIE_STORAGE") else "config key 'storage'")
    if storage.is_remote(configured):
        return configured
    return str(Path(configured.removeprefix("file://")).expanduser().resolve())


def _router_pin(run) -> dict[str, str]:
    """{file: sha256} of a cluster run's router files, from the run's tags."""
    return {name: run.data.tags.get(sha_tag(name)) for name in ROUTER_FILES}


def read_composition(folder: Path, where: str) -> tuple[dict, dict]:
    """(new parameters as tensors, manifest) of a composition's files in a local folder (checked
    by the caller); a manifest of a newer format is refused."""

    manifest = json.loads((folder / COMPOSITION_MANIFEST).read_text(encoding="utf-8"))
    check_manifest(manifest, where)
    return read_tensors(folder / "composition.safetensors", framework="pt"), manifest
