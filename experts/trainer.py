"""The training loop shared by experts, the dense baseline and the central model.

Knows nothing of Ray or MLflow: metrics go to a callback, checkpoints to a directory.
AdamW (decay on 2-D weights only), warm-up + cosine, gradient clipping and accumulation,
bf16 autocast where the processor has bf16 units, validation in bits per byte, resumable
checkpoints, and a token budget so runs compare at equal compute.

Data parallel when torch.distributed is initialised (by whoever starts the workers, e.g. Ray
Train): every worker draws the same global batch and trains on its share of the rows, the
gradients are averaged, and worker 0 alone validates, reports and checkpoints — so N workers
take the steps one worker takes with the same batch_size, up to the order of float sums.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from experts.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# compile: auto compiles a schedule of at least this many steps. Measured on the default expert
# (bench/profile_expert_step.py --compile, 2-core AMD EPYC, bf16, one thread): a compiled step
# saves ~30 ms of ~105, a cold compile costs ~2 min (once per model shape and thread count) and
# one from the inductor cache ~5 s: a few hundred steps repay a warm compile, ~4,000 a cold one.
COMPILE_MIN_STEPS = 2_000


@dataclass
class TrainConfig:
    max_tokens: int = 1_000_000  # token budget: steps = max_tokens // tokens per step
    batch_size: int = 16
    seq_len: int | None = None  # default: the model's block_size
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # steps; 0 = only at the end
    eval_tokens: int = 65_536  # validation tokens scored each time
    ckpt_every: int = 0  # steps; 0 = only at the end (when a checkpoint directory is given)
    keep_checkpoints: int = 2
    precision: str = "auto"  # auto | bf16 | fp32
    latent_loss_warmup: int = 100
    log_every: int = 10
    seed: int = 0
    # torch.compile the training forward (CPU: inductor + a C++ compiler; eager if it fails):
    # true | false | auto (schedules of COMPILE_MIN_STEPS steps or more: the dense model, its continuation)
    compile: bool | Literal["auto"] = "auto"

    def __post_init__(self):
        """Refuse values no run can use, naming the field and what is valid."""
        at_least = {"max_tokens": 1, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "eval_every": 0,
                    "eval_tokens": 1, "ckpt_every": 0, "keep_checkpoints": 1, "latent_loss_warmup": 0, "log_every": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ValueError(f"seq_len must be null (the model's block size) or an integer >= 1, got {self.seq_len!r}")
        checks = {"lr": 0 <= self.lr < math.inf, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
                  "weight_decay": 0 <= self.weight_decay < math.inf, "beta1": 0 <= self.beta1 < 1,
                  "beta2": 0 <= self.beta2 < 1, "grad_clip": 0 < self.grad_clip <= math.inf}
        valid = {"lr": ">= 0 and finite", "min_lr_ratio": "in [0, 1]", "weight_decay": ">= 0 and finite",
                 "beta1": "in [0, 1)", "beta2": "in [0, 1)", "grad_clip": "> 0 (inf: no clipping)"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {valid[name]}, got {getattr(self, name)!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be one of auto, bf16, fp32; got {self.precision!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or auto; got {self.compile!r}")

    def tokens_per_step(self, seq_len: int) -> int:
        return self.batch_size * seq_len * self.grad_accum

    def steps(self, seq_len: int) -> int:
        return max(1, self.max_tokens // self.tokens_per_step(seq_len))

    def compiles(self, seq_len: int) -> bool:
        """Whether training compiles: decided by the whole schedule, so that a run resumed near its
        end (or its seed phase) trains as the uninterrupted run does."""
        return self.compile is True or (self.compile == "auto" and self.steps(seq_len) >= COMPILE_MIN_STEPS)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_bpb: float | None
    tokens_per_s: float
    resumed_from: int | None


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 and on CPUs with AMX / AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_context(device: torch.device, precision: str):
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be one of auto, bf16, fp32; got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_supported(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; on CUDA
    its update is one fused kernel over all parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: on CUDA through pinned memory, the copy overlapping the GPU's work."""
    batch = torch.from_numpy(rows)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    coeff = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator,
                 device: torch.device, share: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens: inputs and next-token targets (B, T). All batch_size
    windows are drawn (the generator moves the same on every worker); `share` keeps this
    worker's rows of them."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"training data has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                         f"{seq_len + 1}; give more text or a shorter seq_len")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)[share]
    if hasattr(tokens, "prefetch"):  # a token file read by ranged reads: fetch the batch's blocks at once
        tokens.prefetch(starts.tolist(), seq_len + 1)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int64)
    batch = to_device(rows, device)
    return batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None,
                  batch_size: int = 8, precision: str = "auto") -> float:
    """Bits per byte over consecutive windows of tokens: nats / ln 2 / bytes predicted.
    Only byte targets (< 256) count; special tokens such as document separators do not."""
    device = next(model.parameters()).device
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    windows = [tokens[s:s + seq_len + 1] for s in range(0, n - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError(f"validation data has {len(tokens)} tokens; need at least 2 to score")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk)
        rows = np.full((len(chunk), width), -1, dtype=np.int64)
        for i, w in enumerate(chunk):
            rows[i, :len(w)] = w
        batch = to_device(rows, device)
        x, y = batch[:, :-1].clamp(min=0), batch[:, 1:]
        with autocast_context(device, precision):
            logits, _ = model(x)
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y.clamp(min=0), reduction="none")
        counted = (y >= 0) & (y < 256)
        nll += float(losses[counted].sum())
        count += int(counted.sum())
    model.train(was_training)
    return nll / math.log(2) / max(count, 1)


class CompileOnce:
    """torch.compile(model), checked at its first call: if compiling fails there (no C++
    compiler, an unsupported operator) the eager model is used from then on, with a warning.
    Errors of later calls are the model's own and propagate."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.forward, self.checked = model, torch.compile(model), False

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.checked:
            return self.forward(x, y)
        try:
            out = self.forward(x, y)
        except Exception as err:  # inductor raises many types: a compiler missing, a lowering failing
            log.warning("torch.compile failed (%s: %s); training eagerly", type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")
            self.forward = self.model
            out = self.model(x, y)
        self.checked = True
        return out


@contextlib.contextmanager
def deterministic_if(compiled: bool):
    """Compiled training is reproducible only with deterministic algorithms: on more than one
    thread inductor's CPU kernels otherwise accumulate scatters (the embedding's gradient) with
    atomic adds, in an order that changes from run to run. Set for the whole loop (the backward
    graph compiles at the first backward), restored after."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if compiled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) of this process among data-parallel workers: (0, 1) alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Every worker's gradients replaced by their mean over the workers: one all-reduce of all of
    them flattened (a parameter without a gradient counts as zeros, so every worker sends the same)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for p, mean in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        p.grad = mean.view_as(p)


def mean_over_workers(value: float, world: int, device: torch.device = torch.device("cpu")) -> float:
    """The mean of `value` over the workers (on `device`: NCCL reduces only GPU tensors)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world


def train(model: torch.nn.Module, train_tokens: np.ndarray, val_tokens: np.ndarray | None, cfg: TrainConfig,
          ckpt_dir: str | Path | None = None, on_metrics: Callable[[int, dict], None] | None = None,
          meta: dict | None = None, stop_at: int | None = None,
          on_checkpoint: Callable[[Path], None] | None = None) -> TrainResult:
    """Train `model` in place for cfg.max_tokens tokens, resuming from ckpt_dir's newest checkpoint.
    stop_at: pause after that step (checkpointed there) on the full run's schedule; train again to go on.
    on_checkpoint: called with each checkpoint's JSON path once it is written (e.g. to upload it)."""
    seq_len = cfg.seq_len or model.config.block_size
    with deterministic_if(cfg.compiles(seq_len)):
        return _train(model, train_tokens, val_tokens, cfg, ckpt_dir, on_metrics, meta, stop_at, on_checkpoint)


def _train(model, train_tokens, val_tokens, cfg: TrainConfig, ckpt_dir, on_metrics, meta, stop_at,
           on_checkpoint) -> TrainResult:
    device = next(model.parameters()).device
    seq_len = cfg.seq_len or model.config.block_size
    total = cfg.steps(seq_len)
    rank, world = data_parallel_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {world} data-parallel workers "
                         "(every worker trains on an equal share of each batch)")
    share = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    lead = rank == 0  # validates, reports and checkpoints
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = configure_optimizer(model, cfg)
    step, resumed_from = 0, None
    loss_value, val_bpb, tokens_per_s = float("nan"), None, 0.0
    if ckpt_dir is not None and (latest := latest_checkpoint(ckpt_dir)) is not None:
        saved = load_checkpoint(ckpt_dir, latest, model, optimizer, generator)
        step = resumed_from = latest
        # the figures of the step it was saved at: a run resumed at its end reports them, not NaN and 0
        loss_value = saved.get("train_loss", loss_value)
        val_bpb, tokens_per_s = saved.get("val_bpb"), saved.get("tokens_per_s", tokens_per_s)
    if world > 1:  # every worker starts from worker 0's weights (the same when seeded alike; now certainly)
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    emit = on_metrics if on_metrics is not None and lead else (lambda step, metrics: None)
    model.train()
    window_t0, window_tokens = time.perf_counter(), 0
    tokens_per_step = cfg.tokens_per_step(seq_len)
    end = total if stop_at is None else min(stop_at, total)
    forward = CompileOnce(model) if cfg.compiles(seq_len) else model  # compiled lazily, at its first call
    first_step = step
    while step < end:
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(model, "latent_loss_scale"):
            model.latent_loss_scale = min(1.0, (step + 1) / max(1, cfg.latent_loss_warmup))
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = sample_batch(train_tokens, cfg.batch_size, seq_len, generator, device, share)
            with autocast_context(device, cfg.precision):
                _, loss = forward(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if world > 1:
            average_gradients(model, world)
            loss_sum = mean_over_workers(loss_sum, world, device)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        window_tokens += tokens_per_step
        if step == first_step + 1 and forward is not model:  # what compiling cost: the first step, backward's too
            emit(step, {"compile_s": time.perf_counter() - window_t0})
        if step % cfg.log_every == 0 or step == total:
            tokens_per_s = window_tokens / (time.perf_counter() - window_t0)
            emit(step, {"train_loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s,
                        "tokens": step * tokens_per_step})
            window_t0, window_tokens = time.perf_counter(), 0
        if lead and val_tokens is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            val_bpb = bits_per_byte(model, val_tokens, seq_len, cfg.eval_tokens, precision=cfg.precision)
            emit(step, {"val_bpb": val_bpb})
        if lead and ckpt_dir is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end):
            saved_path = save_checkpoint(ckpt_dir, step, model, optimizer, generator,
                                         {**(meta or {}), "train_config": asdict(cfg), "tokens": step * tokens_per_step,
                                          "train_loss": loss_value, "val_bpb": val_bpb, "tokens_per_s": tokens_per_s},
                                         keep=cfg.keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(saved_path)
    if lead and step == total and val_tokens is not None and val_bpb is None:  # resumed at the end of an older run
        val_bpb = bits_per_byte(model, val_tokens, seq_len, cfg.eval_tokens, precision=cfg.precision)
    return TrainResult(step, step * tokens_per_step, loss_value, val_bpb, tokens_per_s, resumed_from)
