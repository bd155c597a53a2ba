"""Checkpoints and exported models as safetensors + JSON (never pickle).

A training checkpoint holds model, optimizer state, step and RNG states, so a resumed run
continues exactly as the uninterrupted one would. Tied weights (lm_head = wte) are stored
once and re-linked on load. The files are the ground floor's safetensors + JSON pairs
(`artifacts`): the JSON, written last, records the sha256 of the tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from artifacts import ArtifactError, load_state, save_state
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM


class CheckpointError(ArtifactError):
    """A checkpoint that is missing, incomplete or does not match its recorded sha256."""


def model_config(config: dict) -> HourglassConfig | GPTConfig:
    """The validated config dataclass of a config dict ({'arch': 'hourglass' | 'gpt', ...})."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch == "hourglass":
        return HourglassConfig(**config)
    if arch == "gpt":
        return GPTConfig(**config)
    raise CheckpointError(f"unknown model arch {arch!r}; expected 'hourglass' or 'gpt'")


def build_model(config: dict) -> torch.nn.Module:
    """Model from its config dict ({'arch': 'hourglass' | 'gpt', ...})."""
    cfg = model_config(config)
    return HourglassLM(cfg) if isinstance(cfg, HourglassConfig) else GPT(cfg)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one; return {dropped: kept}."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = t.detach().contiguous().cpu()
    return out, aliases


def _load_checked(directory: Path, name: str, fix: str = "re-create it") -> tuple[dict[str, torch.Tensor], dict]:
    """`name`.safetensors + .json as torch tensors, checked; CheckpointError if missing, incomplete or changed."""
    try:
        return load_state(directory, name, framework="pt", fix=fix)
    except ArtifactError as err:
        raise CheckpointError(str(err)) from None


# --- exported models ------------------------------------------------------------------


def save_model(directory: str | Path, model: torch.nn.Module, extra: dict | None = None) -> Path:
    """model.safetensors + model.json (config, extra metadata such as the tokenizer fingerprint)."""
    tensors, aliases = _dedupe(model.state_dict())
    save_state(directory, "model", tensors, {"config": model.config_dict(), "aliases": aliases, **(extra or {})})
    return Path(directory) / "model.json"


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    tensors, meta = _load_checked(Path(directory), "model")
    model = build_model(meta["config"])
    _load_model_state(model, tensors, meta["aliases"], str(Path(directory) / "model.safetensors"))
    return model, meta


def _load_model_state(model: torch.nn.Module, tensors: dict, aliases: dict, where: str = "the file") -> None:
    state = dict(tensors)
    for dropped, kept in aliases.items():
        state[dropped] = state.get(kept)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise CheckpointError(f"the tensors of {where} do not fit the model its JSON describes "
                              f"({str(err).splitlines()[0]}); re-create it with moie") from None


# --- training checkpoints -------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(filename: str) -> int | None:
    """step-<n>.json -> n: the step of a complete checkpoint (its JSON is written last); None
    for any other file (its .safetensors, a file of another kind)."""
    stem, dot, suffix = filename.rpartition(".")
    number = stem.removeprefix("step-")
    return int(number) if dot and suffix == "json" and stem.startswith("step-") and number.isdigit() else None


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, meta: dict, keep: int = 2) -> Path:
    """Write the checkpoint of `step`, then delete all but the newest `keep`."""
    directory = Path(directory)
    model_tensors, aliases = _dedupe(model.state_dict())
    tensors = {f"model.{k}": v for k, v in model_tensors.items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_state(directory, checkpoint_name(step), tensors,
               {**meta, "step": step, "aliases": aliases, "config": model.config_dict(),
                "param_groups": opt["param_groups"]})
    path = directory / f"{checkpoint_name(step)}.json"
    for old in sorted(directory.glob("step-*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | Path) -> int | None:
    """Step of the newest complete checkpoint in directory (its JSON is written last)."""
    steps = [s for p in Path(directory).glob("step-*.json") if (s := checkpoint_step(p.name)) is not None]
    return max(steps) if steps else None


def load_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict:
    """Restore model, optimizer and RNG states in place; return the checkpoint's metadata."""
    try:
        tensors, meta = _load_checked(Path(directory), checkpoint_name(step), fix="")
    except CheckpointError as err:
        earlier = sorted(p.stem for p in Path(directory).glob("step-*.json") if p.stem < checkpoint_name(step))
        fallback = f"resume from {earlier[-1]}" if earlier else "train from the start"
        raise CheckpointError(f"{err}. To {fallback}, delete {Path(directory) / checkpoint_name(step)}.json and "
                              ".safetensors, then run the stage again") from None
    if meta["config"] != model.config_dict():
        raise CheckpointError(f"checkpoint {directory}/{checkpoint_name(step)} is of another model config; "
                              "use a fresh checkpoint directory for a new config")
    _load_model_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, meta["aliases"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def load_any(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    """An exported model (model.json) or the newest training checkpoint (step-*.json) in directory."""
    directory = Path(directory)
    if (directory / "model.json").is_file():
        return load_model(directory)
    step = latest_checkpoint(directory) if directory.is_dir() else None
    if step is None:
        raise CheckpointError(f"{directory} holds neither model.safetensors + model.json nor a training "
                              "checkpoint step-*.safetensors + step-*.json")
    tensors, meta = _load_checked(directory, checkpoint_name(step))
    model = build_model(meta["config"])
    _load_model_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, meta["aliases"])
    return model, meta
