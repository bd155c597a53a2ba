"""Connecting to Ray: the cluster named by RAY_ADDRESS (or ray.address), else a local one.

A local instance binds to 127.0.0.1, runs no dashboard and reports no usage stats (the
defaults set when `pipeline` is imported).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from pipeline.config import Config, RayConfig
from pipeline.errors import MoieError, StageError, one_line

if TYPE_CHECKING:
    from pipeline.store.tracking import Tracker


class ResourceError(MoieError, RuntimeError):
    """A task asks for more than the Ray cluster has."""


class TaskFailedError(StageError):
    """A Ray task that failed: its cause in full, and whether running the stage again can help."""


def task_cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised in its own code (Ray wraps it), else the error itself."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
        return err.cause
    return err


def lost_to_ray(err: BaseException) -> bool:
    """A failure of the cluster rather than of the task's code (a worker or node lost, memory
    pressure, a cancelled task, an unreachable owner): running the stage again can succeed.
    Anything the task's own code raised fails the same way on every attempt."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayTaskError):
        return not isinstance(err.cause, Exception)
    return isinstance(err, ray.exceptions.RayError)


def describe_failure(name: str, err: BaseException) -> str:
    """'<name>: <Cause>: <its whole message, one line>', with the advice that fits the cause."""
    from mlflow.exceptions import MlflowException

    cause = task_cause(err)
    text = f"{name}: {type(cause).__name__}: {one_line(cause)}"
    if lost_to_ray(err):
        return text + " (Ray lost the task: run the stage again; it goes on from what was saved)"
    if isinstance(cause, (OSError, MlflowException)):  # the store or the disk, not the task's logic
        return text + " (a store or file-system error: once it is resolved, run the stage again)"
    return text + " (this fails the same way on every attempt: fix the cause first)"


def get_or_fail(refs, what: str, own_errors: tuple[type, ...] = ()):
    """ray.get(refs) (one ref or a list). If a task fails, the others of `refs` are given a few
    seconds to end, then cancelled (see `settle`), and the failure is raised as one
    TaskFailedError naming `what` — or, an error of `own_errors` (a task's own error about its
    input), as itself. An interrupted wait cancels every task of `refs` still running."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as err:
        settle(refs, what)
        if isinstance(task_cause(err), own_errors):
            raise task_cause(err) from None
        raise TaskFailedError(describe_failure(what, err)) from None
    except BaseException:
        cancel(refs)
        raise


def every_result(refs: list, what: str, own_errors: tuple[type, ...] = ()) -> list:
    """The results of the tasks of `refs`, in order. On a failure every other task is waited for
    first (what they write is whole, and kept), then the first failure is raised: an error of
    `own_errors` (a task's own error about its input) as itself, any other as one
    TaskFailedError naming `what`. An interrupted wait cancels them all."""
    import ray

    try:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    except BaseException:
        cancel(refs)
        raise
    results, errors = [], []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as err:
            errors.append(err)
    if errors:
        if isinstance(task_cause(errors[0]), own_errors):
            raise task_cause(errors[0]) from None
        raise TaskFailedError(describe_failure(f"{len(errors)} of {len(refs)} {what}; the first", errors[0])) from None
    return results


def results_as_done(refs: list, what: str, own_errors: tuple[type, ...] = ()):
    """Each task's result as it finishes (in no fixed order). A failure is raised as get_or_fail
    raises it, once the others have ended or been cancelled (see `settle`); an interrupt cancels
    them at once."""
    import ray

    pending = list(refs)
    try:
        while pending:
            (done,), pending = ray.wait(pending, num_returns=1)
            yield get_or_fail(done, what, own_errors)
    except Exception:
        settle(pending, what)
        raise
    except BaseException:  # an interrupt, or the caller stopped early
        cancel(pending)
        raise


SETTLE_S = 10.0  # how long a failed task's siblings get to end before they are cancelled (see settle)


def settle(refs, what: str, grace_s: float | None = None) -> None:
    """After a failure: give the tasks of `refs` (one ref or a list) still running `grace_s`
    seconds (SETTLE_S) to end, then cancel the rest; an interrupt cancels them at once.

    Ray 2.60 aborts the driver when `ray.cancel` meets a task that is ending ("Check failed: ...
    Tried to complete task that was not pending": the process exits without a word, its runs left
    RUNNING; docs/faults.md, case 23). The tasks that fail with the first one (the same bad
    input, the same store down) end within milliseconds of it: cancelled at once, one of them
    would meet that bug. A task still running after the grace ends at a moment of its own."""
    import ray

    refs = refs if isinstance(refs, list) else [refs]
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    if not running:
        return
    grace_s = SETTLE_S if grace_s is None else grace_s
    print(f"{what}: waiting up to {grace_s:g} s for the {len(running)} other task(s) still running, then cancelling "
          "them", file=sys.stderr, flush=True)
    try:
        _, running = ray.wait(running, num_returns=len(running), timeout=grace_s, fetch_local=False)
    finally:
        cancel(running)


def cancel(refs) -> None:
    """Stop tasks that no one will wait for (finished ones are left alone). Only where they end at
    a moment of their own: a task ending as it is cancelled aborts the driver (see `settle`)."""
    import ray

    for ref in refs if isinstance(refs, list) else [refs]:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or lost: nothing to stop
            pass


def connect_ray(cfg: RayConfig) -> str:
    """Initialise Ray once per process; return the address used ('local' for a new instance)."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    with keep_signal_handler(signal.SIGTERM):
        if address:
            # Inside `ray job submit` RAY_ADDRESS is set: a plain init joins the job's cluster.
            ray.init(address=address, log_to_driver=True)
            return address
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    return "local"


def connect_cluster(cfg: Config, tracker: Tracker) -> str:
    """connect_ray, then check_device and check_cluster_storage: what every stage does before its first task."""
    address = connect_ray(cfg.ray)
    check_device(cfg.device)
    check_cluster_storage(cfg, tracker)
    return address


def largest_node_gpus() -> float:
    """The GPUs of the alive Ray node that has most (0 on a cluster without GPUs)."""
    import ray

    return max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def check_device(device: str) -> None:
    """`device: cuda` on a Ray cluster without a GPU fails before any work, in one line."""
    if device == "cuda" and not largest_node_gpus():
        raise ResourceError("device is 'cuda' but no node of the Ray cluster has a GPU (Ray found none: no CUDA "
                            "device, or its driver is missing); set device=auto (a GPU where there is one) or "
                            "device=cpu, or run on nodes with GPUs")


def gpus_per_task(device: str, num_gpus: float | None, node_gpus: float) -> float:
    """The GPUs one training or scoring task asks Ray for: none on device cpu; else the
    section's num_gpus if set, else one (device auto: one where a node has a GPU, else none)."""
    if device == "cpu":
        return 0.0
    if num_gpus is not None:
        return float(num_gpus)
    return 1.0 if node_gpus or device == "cuda" else 0.0


def task_gpus(cfg: Config, section: str) -> float:
    """gpus_per_task for the tasks of config section `section` (experts, compose, evaluate, extend)."""
    return gpus_per_task(cfg.device, getattr(cfg, section).num_gpus, largest_node_gpus())


@dataclass(frozen=True)
class Grant:
    """What one training or scoring task of a config section asks Ray for, and takes inside it."""
    num_cpus: float
    num_gpus: float = 0.0

    @classmethod
    def of(cls, cfg: Config, section: str) -> "Grant":
        """The grant of section `section`'s tasks (after connect_cluster: GPUs depend on the cluster)."""
        return cls(getattr(cfg, section).num_cpus, task_gpus(cfg, section))

    def options(self, **more) -> dict:
        """Ray options of such a task (`more`: e.g. max_retries)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **more}

    def check(self, what: str) -> None:
        """check_resources: fail now if no node could run such a task."""
        check_resources(self.num_cpus, self.num_gpus, what=what)

    def take(self, seed: int | None = None):
        """Inside the task: use_granted_cpus; the torch device to train or score on."""
        use_granted_cpus(self.num_cpus, seed)
        return granted_device(self.num_gpus)


def check_cluster_storage(cfg: Config, tracker: Tracker) -> None:
    """Refuse, before any work, a Ray cluster of several nodes whose MLflow store, artifact
    store or storage lies on one machine's disk: the other nodes could not read (or would
    silently write beside) it. `shared_filesystem: true` declares such paths mounted on every node."""
    import ray

    from pipeline.store.catalog import storage_location

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or cfg.shared_filesystem:
        return
    artifacts = (tracker.client.get_experiment(tracker.experiment_id).artifact_location
                 if tracker.experiment_id is not None else None)
    local = single_machine_stores(tracker.uri, artifacts, storage_location(cfg))
    if local:
        raise StageError(
            f"this Ray cluster has {len(nodes)} alive nodes, but {'; '.join(local)} lie on one machine's disk, "
            "which the other nodes cannot read. Run an MLflow server with artifact serving (`mlflow server "
            "--backend-store-uri <database> --serve-artifacts --artifacts-destination s3://<bucket>/mlflow`) and "
            "set MLFLOW_TRACKING_URI=http://<its host>:<port>; set MOIE_STORAGE (or `storage:` in the config) to an "
            "object store such as s3://<bucket>/moie. If these paths lie on a file system that every node mounts "
            "at the same path, set `shared_filesystem: true` instead")


def single_machine_stores(tracking_uri: str, artifact_location: str | None, storage_location: str) -> list[str]:
    """Which of the stores a stage uses live on one machine's disk (a database server, an
    MLflow server, mlflow-artifacts:/ and object-store URIs do not)."""

    from pipeline.store import storage

    local = []
    if urlparse(tracking_uri).scheme in ("", "file", "sqlite"):
        local.append(f"the MLflow tracking store {tracking_uri}")
    if artifact_location is not None and urlparse(artifact_location).scheme in ("", "file"):
        local.append(f"its artifact store {artifact_location}")
    if not storage.is_remote(storage_location):
        local.append(f"the storage of token files and checkpoints {storage_location}")
    return local


@contextlib.contextmanager
def keep_signal_handler(signum: int = signal.SIGTERM):
    """The process's handler of `signum` as it was before the block, put back after it. Ray's
    core worker installs a SIGTERM handler that aborts the process (exit -6), where the
    driver's own ends its runs KILLED (`moie`, `ray job stop`); Ray Train's `fit` installs a
    SIGINT handler that aborts its run and leaves it behind, so that a later Ctrl-C would
    abort a finished run instead of stopping the stage (the stage then waited on, as if hung)."""

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signum) if main else None
    try:
        yield
    finally:
        if main and before is not None:  # (None: a handler not installed from Python, left alone)
            signal.signal(signum, before)


def check_resources(num_cpus: float, num_gpus: float = 0, what: str = "task", resources: dict | None = None) -> None:
    """Fail at once, instead of waiting forever, when no node could ever run the task."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes)
    custom = resources or {}
    if fits and custom and not any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus
                                   and all(r.get(k, 0) >= v for k, v in custom.items()) for r in nodes):
        raise ResourceError(f"the {what} asks for num_cpus={num_cpus}, num_gpus={num_gpus} and the custom resources "
                            f"{custom}, which no alive Ray node has together; start nodes with `ray start --resources "
                            "'{...}'` or drop them from experts.resources")
    if not fits:
        biggest = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
        raise ResourceError(f"the {what} asks for num_cpus={num_cpus}, num_gpus={num_gpus} but the largest Ray node "
                            f"has {biggest[0]:g} CPUs and {biggest[1]:g} GPUs; lower the request in the config "
                            "or add a node that has them")


def check_workers(workers: int, num_cpus: float, use_gpu: bool, what: str, fix: str) -> None:
    """Fail at once when the alive Ray nodes cannot hold `workers` data-parallel workers of
    num_cpus CPUs (and one GPU, `use_gpu`) each: Ray Train would wait for them for days."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    room = sum(min(int(r.get("CPU", 0) // num_cpus), int(r.get("GPU", 0)) if use_gpu else workers) for r in nodes)
    if room < workers:
        raise ResourceError(f"the {what} asks for {workers} data-parallel workers of num_cpus={num_cpus:g}"
                            f"{' and one GPU' if use_gpu else ''} each, but the alive Ray nodes hold {room}; {fix}")


def largest_node_cpus() -> float:
    """The CPUs of the alive Ray node that has most: the most one task can be granted."""
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def current_node() -> str:
    """The id of the Ray node this code runs on ('local' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def use_granted_cpus(num_cpus: float, seed: int | None = None) -> None:
    """Inside a task: torch runs on exactly the CPUs Ray granted (and from `seed`, when given),
    and compiles into the node's shared inductor cache."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    if seed is not None:
        torch.manual_seed(seed)
    share_compile_cache()


def granted_device(num_gpus: float):
    """Inside a task: the torch device to train or score on. A task granted GPUs (Ray set
    CUDA_VISIBLE_DEVICES to them) runs on CUDA, and fails in one line if torch cannot see one
    (a CPU build of torch, or no driver); a task granted none runs on the CPU."""
    import torch

    if not num_gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ResourceError(f"this task was granted num_gpus={num_gpus:g} but torch {torch.__version__} sees no CUDA "
                            f"device (torch built for CUDA: {torch.version.cuda or 'no, a CPU build'}; "
                            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA "
                            "build of torch on the GPU nodes, or set device=cpu")
    return torch.device("cuda")


def device_name(device) -> str:
    """'cpu', or 'cuda (<the GPU's name>)': what a run records it trained on."""
    import torch

    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def share_compile_cache() -> None:
    """Every task of a node compiles into one inductor cache, kept between runs: $MOIE_CACHE_DIR/inductor
    (~/.cache/moie/inductor) unless TORCHINDUCTOR_CACHE_DIR is set. A model compiled once (the dense
    model's seed phase) then compiles in seconds for the tasks that follow (its continuation,
    dense_matched) and the next run. The cache holds compiled code that torch loads: it lives in
    the user's own cache directory, not in /tmp (torch's default), where another user could plant it."""
    from pipeline.text.embedded import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


WORKERS_START_TIMEOUT_S = 7 * 24 * 3600  # how long data-parallel workers may wait for their CPUs and GPUs


def run_data_parallel(loop: Callable[[dict], None], config: dict, *, workers: int, cpus_per_worker: float,
                      storage_path: str, name: str, max_failures: int = 3, use_gpu: bool = False) -> None:
    """`loop(config)` on `workers` Ray Train workers (TorchTrainer), torch.distributed initialised
    among them: gloo on CPU, NCCL on GPU. After a worker or its node is lost, Ray Train restarts
    every worker (up to max_failures times); the loop resumes from its own checkpoints. Ray
    Train's run state goes under `storage_path` (a directory every node reaches, or an object
    store URI). A loop that fails raises TaskFailedError naming `name`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Train fails a run whose workers do not all start within 60 s; a stage's other tasks
    # (the experts) may hold the CPUs far longer: its workers wait for them instead
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKERS_START_TIMEOUT_S))
    trainer = TorchTrainer(
        loop, train_loop_config=config, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures)))
    try:
        with keep_signal_handler(signal.SIGINT):  # (during fit, Ctrl-C aborts the run, as Ray Train has it)
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray Train wraps the workers' errors in its own types
        raise TaskFailedError(f"{name}: data-parallel training failed: {type(err).__name__}: {one_line(err)}") from None
    if getattr(result, "error", None) is not None:
        raise TaskFailedError(f"{name}: data-parallel training failed: {one_line(result.error)}")
