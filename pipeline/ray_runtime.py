"""Connecting to Ray: the cluster named by RAY_ADDRESS (or ray.address), else a local one.

A local instance binds to 127.0.0.1, runs no dashboard and reports no usage stats (the
defaults set when `pipeline` is imported).
"""
from __future__ import annotations

import os

from pipeline.config import RayConfig


class ResourceError(RuntimeError):
    """A task asks for more than the Ray cluster has."""


def connect_ray(cfg: RayConfig) -> str:
    """Initialise Ray once per process; return the address used ('local' for a new instance)."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        # Inside `ray job submit` RAY_ADDRESS is set: a plain init joins the job's cluster.
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True)
    return "local"


def check_resources(num_cpus: float, num_gpus: float = 0, what: str = "task") -> None:
    """Fail at once, instead of waiting forever, when no node could ever run the task."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes)
    if not fits:
        biggest = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
        raise ResourceError(f"the {what} asks for num_cpus={num_cpus}, num_gpus={num_gpus} but the largest Ray node "
                            f"has {biggest[0]:g} CPUs and {biggest[1]:g} GPUs; lower the request in the config "
                            "or add a node that has them")


def use_granted_cpus(num_cpus: float, seed: int | None = None) -> None:
    """Inside a task: torch runs on exactly the CPUs Ray granted (and from `seed`, when given)."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    if seed is not None:
        torch.manual_seed(seed)
