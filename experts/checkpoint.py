"""Checkpoints and exported models as safetensors + JSON (never pickle).

A training checkpoint holds model, optimizer state, step and RNG states, so a resumed run
continues exactly as the uninterrupted one would. Tied weights (lm_head = wte) are stored
once and re-linked on load. The JSON, written last, records the sha256 of the tensors.
File I/O (atomic writes, sha256) is pipeline.artifacts', which imports neither Ray nor MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from experts.gpt import GPT, GPTConfig
from pipeline.artifacts import atomic_path, sha256_file, write_json
from experts.hourglass import HourglassConfig, HourglassLM


class CheckpointError(ValueError):
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


def save_tensors_json(directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """`name`.safetensors, then `name`.json (meta + tensors' sha256), each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    st_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp))
    write_json(json_path, {**meta, "tensors_sha256": sha256_file(st_path)})
    return json_path


def load_tensors_json(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    st_path, json_path = Path(directory) / f"{name}.safetensors", Path(directory) / f"{name}.json"
    if not json_path.is_file() or not st_path.is_file():
        raise CheckpointError(f"{directory} has no complete {name}.safetensors + {name}.json")
    meta = json.loads(json_path.read_text())
    actual = sha256_file(st_path)
    if actual != meta.get("tensors_sha256"):
        raise CheckpointError(f"{st_path} has sha256 {actual}, but {meta.get('tensors_sha256')} was recorded; "
                              "the file is corrupt or was changed")
    return load_file(str(st_path)), meta


# --- exported models ------------------------------------------------------------------


def save_model(directory: str | Path, model: torch.nn.Module, extra: dict | None = None) -> Path:
    """model.safetensors + model.json (config, extra metadata such as the tokenizer fingerprint)."""
    tensors, aliases = _dedupe(model.state_dict())
    return save_tensors_json(Path(directory), "model", tensors,
                             {"config": model.config_dict(), "aliases": aliases, **(extra or {})})


def load_model(directory: str | Path) -> tuple[torch.nn.Module, dict]:
    tensors, meta = load_tensors_json(Path(directory), "model")
    model = build_model(meta["config"])
    _load_model_state(model, tensors, meta["aliases"])
    return model, meta


def _load_model_state(model: torch.nn.Module, tensors: dict, aliases: dict) -> None:
    state = dict(tensors)
    for dropped, kept in aliases.items():
        state[dropped] = state[kept]
    model.load_state_dict(state)


# --- training checkpoints -------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


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
    path = save_tensors_json(directory, checkpoint_name(step), tensors,
                             {**meta, "step": step, "aliases": aliases, "config": model.config_dict(),
                              "param_groups": opt["param_groups"]})
    for old in sorted(directory.glob("step-*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | Path) -> int | None:
    """Step of the newest complete checkpoint in directory (its JSON is written last)."""
    steps = [int(p.stem.removeprefix("step-")) for p in Path(directory).glob("step-*.json")]
    return max(steps) if steps else None


def load_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict:
    """Restore model, optimizer and RNG states in place; return the checkpoint's metadata."""
    tensors, meta = load_tensors_json(Path(directory), checkpoint_name(step))
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
    tensors, meta = load_tensors_json(directory, checkpoint_name(step))
    model = build_model(meta["config"])
    _load_model_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, meta["aliases"])
    return model, meta
