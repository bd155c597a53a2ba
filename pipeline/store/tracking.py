"""MLflow tracking: one parent run per pipeline, a nested child run per stage.

Default backend: `sqlite:///<workdir>/mlflow.db` with artifacts under `<workdir>/artifacts`
(absolute, so a Ray job's temporary working directory never swallows them);
`MLFLOW_TRACKING_URI` points everything at a server instead.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from artifacts import sha256_tree, write_json
from pipeline.config import Config, flatten, to_dict
from pipeline.errors import MoieError, StageError, one_line
from pipeline.store.names import Tag

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"


class PipelineNotFoundError(MoieError, LookupError):
    """A --pipeline id that names no pipeline run in the tracking store."""


class StoreError(StageError):
    """A tracking store that cannot be reached or written."""


def quote(value: object) -> str:
    """A value as a quoted MLflow filter literal (a quote inside cannot end the string)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def param_strings(params: dict[str, Any]) -> dict[str, str]:
    """Param values as MLflow stores them (lists and dicts as JSON)."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}


def changed_params(recorded: dict[str, str], wanted: dict[str, str],
                   ignore: set[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """key -> (recorded, wanted) for every wanted param a run recorded with another value (a key
    it did not record, from an older moie, or one in `ignore` is not a change)."""
    return {k: (recorded[k], v) for k, v in wanted.items() if k in recorded and k not in ignore and recorded[k] != v}


def metrics_logger(tracking_uri: str, run_id: str):
    """on_metrics(step, metrics) for a training loop in a Ray task: each call is one batch of
    metrics logged to the run (its own client: a task holds no Tracker)."""

    client = MlflowClient(tracking_uri=tracking_uri)

    def on_metrics(step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    return on_metrics


class StageStopped(RuntimeError):
    """A task's run was ended by its stage (an interrupt, an error): the task stops."""


def stop_unless_running(tracking_uri: str, run_id: str) -> None:
    """In a training task, at each checkpoint: StageStopped if the stage that started it has
    ended its run (KILLED, FAILED). Ray's cancel can miss a task that was being handed to a
    worker at that moment; this stops such a task at its next checkpoint instead of letting it
    train on unwatched."""
    status = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.status
    if status != "RUNNING":
        raise StageStopped(f"run {run_id} is {status}: the stage that started this task stopped; not training on")


def record_attempt(tracking_uri: str, run_id: str, node_id: str, resume_step: int | None,
                   threads: int | None = None, device: str | None = None, workers: int = 1) -> None:
    """Tag a training run with the Ray node an attempt of its task runs on (moie.node_id; every
    attempt's node, in order, in moie.nodes), the checkpoint step it resumes from, the threads
    it trains on (every attempt's, in order, in moie.threads: the dense run's seed phase first),
    the device (moie.device: cpu, or cuda and the GPU's name) and its data-parallel workers
    (moie.workers)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    before = client.get_run(run_id).data.tags

    def appended(tag: str, value: str) -> str:
        return ",".join([v for v in before.get(tag, "").split(",") if v] + [value])

    tags = {Tag.NODE_ID: node_id, Tag.NODES: appended(Tag.NODES, node_id)}
    if threads is not None:
        tags[Tag.THREADS] = appended(Tag.THREADS, str(threads))
    if resume_step is not None:
        tags[Tag.RESUMED_FROM] = str(resume_step)
    if device is not None:
        tags[Tag.DEVICE] = device
    tags[Tag.WORKERS] = str(workers)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def workdir(cfg: Config) -> Path:
    """Where the default MLflow database and artifacts live: config, $MOIE_HOME, or ~/.moie."""
    raw = cfg.workdir or os.environ.get("MOIE_HOME") or "~/.moie"
    return Path(raw).expanduser().resolve()


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else sqlite under the workdir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        return uri
    return f"sqlite:///{workdir(cfg) / 'mlflow.db'}"


def check_reachable(uri: str, tries: int = 3, timeout_s: float = 3.0) -> None:
    """StoreError, within about tries x timeout_s seconds, unless the tracking server at `uri`
    answers (any HTTP status will do: it is up). MLflow's own client retries an unreachable
    server for minutes and then reports the first query's answer (e.g. "does not exist")."""
    import urllib.error
    import urllib.request

    reason = ""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:  # it answered (authentication, an old server without /health)
            return
        except (urllib.error.URLError, OSError) as err:
            reason = one_line(getattr(err, "reason", err))
        if attempt + 1 < tries:
            time.sleep(1.0)  # a server starting up
    raise StoreError(f"cannot reach the MLflow tracking server at {uri} ({reason}; {tries} tries): start it, "
                     "or point MLFLOW_TRACKING_URI (or tracking.uri) at one that runs")


class Tracker:
    """The pipeline's view of MLflow: runs, params, metrics, checksummed artifacts.

    The one rule for run statuses lives here: a run this tracker opens is FINISHED only by
    the code that logged all of its artifacts and registered versions (`end_run`); when a
    stage stops early, `pipeline_active` ends every run it left open KILLED (interrupt) or
    FAILED (error), so nothing stays RUNNING."""

    def __init__(self, cfg: Config, uri: str | None = None, experiment: bool = True):
        """uri: the store (default: tracking_uri(cfg)); experiment: find or create the config's
        experiment (a reader that only loads registered models needs none)."""
        self.uri = uri or tracking_uri(cfg)
        self._open: set[str] = set()  # runs this tracker created or reopened and has not ended
        if self.uri.startswith(("http://", "https://")):
            check_reachable(self.uri)
        try:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.experiment_id = self._experiment(cfg) if experiment else None
        except (OSError, MlflowException) as err:
            raise StoreError(f"the MLflow tracking store {self.uri} cannot be opened or written "
                             f"({one_line(err)}); point MLFLOW_TRACKING_URI (or MOIE_HOME) at a store "
                             "this user can write") from None

    def _experiment(self, cfg: Config) -> str:
        name = cfg.tracking.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # A local backend pins artifacts to an absolute directory; a server decides itself.
        location = (workdir(cfg) / "artifacts").as_uri() if self.uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return self.client.get_experiment_by_name(name).experiment_id

    # --- runs ---------------------------------------------------------------------------

    def start_pipeline(self, cfg: Config, pipeline_id: str | None = None) -> str:
        """Create the pipeline's parent run, or check and reopen the one named by pipeline_id."""
        if pipeline_id:
            run = self.pipeline_run(pipeline_id)
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"pipeline-{cfg.name}",
                                     tags={Tag.STAGE: "pipeline"})
        run_id = run.info.run_id
        try:
            self.client.set_tag(run_id, Tag.PIPELINE, run_id)
            self.log_params(run_id, flatten(to_dict(cfg)))
            with tempfile.TemporaryDirectory() as tmp:
                write_json(Path(tmp) / "config.json", to_dict(cfg))
                self.client.log_artifact(run_id, str(Path(tmp) / "config.json"))
        except BaseException as err:  # a param MLflow refuses, an unwritable store: no run is left RUNNING
            self._best_effort(self.end_run, run_id, "FAILED")
            if isinstance(err, MlflowException):
                raise StoreError(f"MLflow refused the pipeline's config ({one_line(err)}); change the config value "
                                 "it names") from None
            raise
        return run_id

    def pipeline_run(self, pipeline_id: str):
        """The pipeline's parent run; PipelineNotFoundError if there is none."""
        try:
            run = self.client.get_run(pipeline_id)
        except MlflowException:
            run = None
        if run is None or run.data.tags.get(Tag.STAGE) != "pipeline":
            raise PipelineNotFoundError(
                f"no pipeline run with id {pipeline_id!r} in the tracking store {self.uri}; "
                "give the id a previous stage printed (see `mlflow ui`), or omit --pipeline to start a new pipeline")
        return run

    def finish_pipeline(self, pipeline_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(pipeline_id, status=status)

    @contextlib.contextmanager
    def pipeline_active(self, pipeline_id: str) -> Iterator[None]:
        """The parent run is RUNNING while a stage works on it, then FINISHED, KILLED or FAILED;
        every child run the stage left open ends KILLED or FAILED with it.
        A command that fails on a complete pipeline (evaluated, FINISHED) leaves it FINISHED: what
        it holds is still complete and true, and the failed stage's own run records the failure."""
        complete = self.client.get_run(pipeline_id).info.status == "FINISHED" and bool(
            self.stage_runs(pipeline_id, "evaluate"))  # every stage done: what it holds stays true
        self.client.update_run(pipeline_id, status="RUNNING")
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            # a run still open after a successful stage lacks something it should hold: FAILED
            self.end_open_runs("FAILED" if status == "FINISHED" else status)
            self._best_effort(self.finish_pipeline, pipeline_id, "FINISHED" if complete else status)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED only once it holds all of its artifacts and registered versions."""
        self.client.set_terminated(run_id, status=status)
        self._open.discard(run_id)

    def reopen_run(self, run_id: str) -> None:
        """Mark an unfinished run RUNNING again (a resumed stage goes on with it)."""
        self.client.update_run(run_id, status="RUNNING")
        self._open.add(run_id)

    def end_open_runs(self, status: str) -> None:
        """End every run this tracker left open (best effort: the store itself may be failing)."""
        for run_id in sorted(self._open):
            self._best_effort(self.end_run, run_id, status)
        self._open.clear()

    def _best_effort(self, fn, *args) -> None:
        """Cleanup that must neither hide the error that stopped the stage nor stop half-way
        (a second Ctrl-C while runs are being ended is ignored: the first one is on its way)."""
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001
            log.warning("could not record the end of run %s in %s: %s", args[0], self.uri, one_line(err))

    @contextlib.contextmanager
    def stage_run(self, pipeline_id: str, stage: str, name: str | None = None,
                  tags: dict[str, str] | None = None) -> Iterator[str]:
        """A child run of the pipeline, FINISHED on success, KILLED on interrupt, FAILED on error."""
        run_id = self.create_stage_run(pipeline_id, stage, name, tags)
        try:
            yield run_id
        except (KeyboardInterrupt, SystemExit):
            self._best_effort(self.end_run, run_id, "KILLED")
            raise
        except BaseException:
            self._best_effort(self.end_run, run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")

    def create_stage_run(self, pipeline_id: str, stage: str, name: str | None = None,
                         tags: dict[str, str] | None = None) -> str:
        """A RUNNING child run of the pipeline, tagged with pipeline and stage; the caller ends it."""
        all_tags = {PARENT_TAG: pipeline_id, Tag.PIPELINE: pipeline_id, Tag.STAGE: stage, **(tags or {})}
        run_id = self.client.create_run(self.experiment_id, run_name=name or stage, tags=all_tags).info.run_id
        self._open.add(run_id)
        return run_id

    def stage_runs(self, pipeline_id: str, stage: str, status: str | None = "FINISHED") -> list:
        """Child runs of a pipeline for one stage, newest first."""
        query = f"tags.`{Tag.PIPELINE}` = {quote(pipeline_id)} and tags.`{Tag.STAGE}` = {quote(stage)}"
        if status:
            query += f" and attributes.status = {quote(status)}"
        return self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time DESC"])

    # --- logging ------------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, v) for k, v in param_strings(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact_dir(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> dict[str, str]:
        """Log every file of a directory plus a manifest.json of their sha256; return the manifest."""
        directory = Path(directory)
        manifest = sha256_tree(directory, skip=("manifest.json",))
        write_json(directory / "manifest.json", manifest)
        try:
            self.client.log_artifacts(run_id, str(directory), artifact_path)
        except OSError as err:  # a full disk, a read-only artifact directory
            raise StoreError(f"the artifacts of run {run_id} cannot be written to the artifact store "
                             f"({one_line(err)}); free space or point MOIE_HOME / MLFLOW_TRACKING_URI at a "
                             "writable store, then run the stage again") from None
        return manifest

    def download_artifacts(self, run_id: str, path: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(dst)))
