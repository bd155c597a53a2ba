"""Experts: the hourglass language model, the GPT baseline, training, checkpoints."""
from experts.checkpoint import CheckpointError, build_model, load_any, load_model, model_config, save_model
from experts.gpt import GPT, GPTConfig
from experts.hourglass import HourglassConfig, HourglassLM
from experts.trainer import TrainConfig, TrainResult, train

__all__ = ["GPT", "CheckpointError", "GPTConfig", "HourglassConfig", "HourglassLM", "TrainConfig", "TrainResult",
           "build_model", "load_any", "load_model", "model_config", "save_model", "train"]
