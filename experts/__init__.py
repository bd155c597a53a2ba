"""Experts: the hourglass language model, the GPT baseline, training, checkpoints.

The names below are imported when first used: a process that only needs the tokenizer
(`experts.tokenizer`, e.g. the experts stage's token-writing tasks) does not load torch."""
import importlib

_EXPORTS = {"CheckpointError": "checkpoint", "build_model": "checkpoint", "load_any": "checkpoint",
            "load_model": "checkpoint", "model_config": "checkpoint", "save_model": "checkpoint",
            "GPT": "gpt", "GPTConfig": "gpt", "HourglassConfig": "hourglass", "HourglassLM": "hourglass",
            "TrainConfig": "trainer", "TrainResult": "trainer", "train": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"experts.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'experts' has no attribute {name!r}")
