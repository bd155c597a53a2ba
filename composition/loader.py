"""Building a composed model from its parts: the one place a `ComposedLM` is assembled from
a central model, experts, the routing settings a manifest records and the new parameters
(cross-attention blocks, gates, output gates, routing centres) a composition adds.

Used by composition training and scoring, evaluation, the expert library and generation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from artifacts import MoieError
from composition.model import ComposedLM
from experts.checkpoint import load_model

TRAINED = ("blocks.", "gates.", "mixers.", "kway.")  # what training a composition learns
NEW_PARAMETERS = (*TRAINED, "centers.")  # what a composition adds to its registered models


class CompositionError(MoieError, ValueError):
    """Composition parameters that do not fit the models they are loaded into."""


@dataclass(frozen=True)
class CompositionSettings:
    """How a composition is wired and routed; recorded in its manifest."""

    n_points: int
    routing: str
    k: int
    threshold: float
    pool: str = "token"
    glue: str = "attention"
    output: str = "none"  # "mix": a composition point in output space
    kway: bool = False  # a k-way gate trained with every cluster's text (routing "kway")

    @classmethod
    def from_manifest(cls, manifest: dict) -> "CompositionSettings":
        """The settings a manifest records; every key is required (a manifest without one is not
        one this moie wrote: CompositionError naming the key)."""
        try:
            return cls(**{f: manifest[f] for f in cls.__dataclass_fields__})
        except KeyError as err:
            raise CompositionError(f"the composition manifest records no {err.args[0]!r}: it was not written by "
                                   "this moie; compose the composition again") from None

    def to_dict(self) -> dict:
        return asdict(self)


def assemble(central: torch.nn.Module, experts: list[torch.nn.Module], settings: CompositionSettings,
             state: dict[str, torch.Tensor] | None = None, complete: bool = True, **construction) -> ComposedLM:
    """ComposedLM of loaded models with `state` (new parameters) loaded into it. complete: the
    state must hold every block and gate (a finished composition); else only what it holds
    is loaded (e.g. the shared routing centres before training). construction: ComposedLM's
    own arguments (prefix_router, document_router, record_routing)."""
    composed = ComposedLM(central, experts, n_points=settings.n_points, routing=settings.routing, k=settings.k,
                          threshold=settings.threshold, pool=settings.pool, glue=settings.glue,
                          output=settings.output, kway=settings.kway, **construction)
    if state:
        loaded = composed.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
        missing = [k for k in loaded.missing_keys if k.startswith(TRAINED)] if complete else []
        if loaded.unexpected_keys or missing:
            raise CompositionError(f"the composition's parameters do not fit its models (unexpected "
                                   f"{loaded.unexpected_keys[:2]}, missing {missing[:2]}): the manifest names other "
                                   "models than the parameters were trained with")
    return composed


def load_composed(central_dir: str | Path, expert_dirs: list[str | Path], settings: CompositionSettings,
                  state: dict[str, torch.Tensor] | None = None, complete: bool = True, **construction) -> ComposedLM:
    """assemble() from exported model directories (model.safetensors + model.json each)."""
    central, _ = load_model(central_dir)
    return assemble(central, [load_model(d)[0] for d in expert_dirs], settings, state, complete, **construction)


def new_parameters(composed: ComposedLM) -> dict[str, torch.Tensor]:
    """Blocks, gates, output gates, the k-way gate and routing centres: what a composition adds
    to the registered models."""
    return {k: v.detach().cpu().contiguous() for k, v in composed.state_dict().items()
            if k.startswith(NEW_PARAMETERS)}
