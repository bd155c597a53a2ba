"""Where one training step of the expert goes: torch.profiler's operators by self CPU time,
for the hourglass expert of a config and (side by side) the matched plain GPT.

    python bench/profile_expert_step.py [--config configs/default.yaml] [--threads 2] [--steps 5]
    python bench/profile_expert_step.py --compile --threads 1 --steps 30   # eager vs compiled, hourglass vs GPT
    python bench/profile_expert_step.py --precision    # fp32 vs bf16 autocast, side by side

Prints each model's step time, tokens/s and its top operators (share of self CPU time).
With --compile: the training step of the default expert and of the GPT of its size, eager and
under torch.compile (the CPU inductor backend; it needs a C++ compiler), as the trainer runs it
(bf16 autocast where the CPU has bf16 units): tokens/s, the first compiled steps' time (a cold
compile, or one from the inductor cache) and the ratios, side by side in one process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def profile(model, batch: int, steps: int, top: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from experts.trainer import TrainConfig, configure_optimizer

    seq = model.config.block_size
    x = torch.randint(0, 256, (batch, seq))
    opt = configure_optimizer(model, TrainConfig())

    def step():
        _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, batch "
             f"{batch} x {seq}: {1e3 * per_step:.1f} ms/step, {batch * seq / per_step:,.0f} tokens/s",
             "| operator | calls/step | self CPU share |", "|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| `{e.key}` | {e.count / steps:.0f} | {100 * e.self_cpu_time_total / total:.1f} % |")
    return "\n".join(lines)


def compiled_step_rates(model, batch: int, steps: int) -> dict:
    """One model's training step as the trainer runs it (precision auto: bf16 autocast where the
    CPU has bf16 units), eager and compiled side by side: {mode: (tokens/s, first two steps' s)}."""
    import torch

    from experts.trainer import TrainConfig, autocast_context, configure_optimizer

    seq = model.config.block_size
    x = torch.randint(0, 256, (batch, seq))
    opt = configure_optimizer(model, TrainConfig())
    cpu = torch.device("cpu")
    rates = {}
    for name, fn in (("eager", model), ("compiled", torch.compile(model))):
        t0 = time.perf_counter()
        for i in range(steps + 2):
            if i == 2:  # the first calls compile (from the inductor cache when it holds this graph) and warm up
                warm, t0 = time.perf_counter() - t0, time.perf_counter()
            with autocast_context(cpu, "auto"):
                _, loss = fn(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rates[name] = (batch * seq * steps / (time.perf_counter() - t0), warm)
    return rates


def compare_compile(hourglass, gpt, batch: int, steps: int) -> str:
    """Eager vs compiled, hourglass vs the GPT of its size: tokens/s of each, and the ratios."""
    import torch

    from experts.trainer import bf16_supported

    precision = "bf16 autocast" if bf16_supported(torch.device("cpu")) else "fp32"
    rates = {type(m).__name__: compiled_step_rates(m, batch, steps) for m in (hourglass, gpt)}
    lines = [f"training step, batch {batch} x {hourglass.config.block_size}, {precision}, "
             f"{torch.get_num_threads()} threads ({steps} steps timed after 2)",
             "| model | eager tokens/s | compiled tokens/s | compiled / eager | first two compiled steps |",
             "|---|---|---|---|---|"]
    for name, r in rates.items():
        lines.append(f"| {name} | {r['eager'][0]:,.0f} | {r['compiled'][0]:,.0f} | "
                     f"{r['compiled'][0] / r['eager'][0]:.2f}x | {r['compiled'][1]:.1f} s |")
    hg, g = rates["HourglassLM"], rates["GPT"]
    lines.append(f"hourglass / GPT tokens/s: eager {hg['eager'][0] / g['eager'][0]:.2f}x, "
                 f"compiled {hg['compiled'][0] / g['compiled'][0]:.2f}x")
    return "\n".join(lines)


def compare_precision(model, batch: int, steps: int) -> str:
    """fp32 vs bf16 autocast of the same training step; refuses where bf16 would be emulated."""
    import torch

    from experts.trainer import TrainConfig, bf16_supported, configure_optimizer

    if not bf16_supported(torch.device("cpu")):
        return f"{type(model).__name__}: this CPU has no bf16 units (AMX / AVX-512 BF16): bf16 not timed"
    seq = model.config.block_size
    x = torch.randint(0, 256, (batch, seq))
    opt = configure_optimizer(model, TrainConfig())
    rates = {}
    for precision in ("fp32", "bf16"):
        for i in range(steps + 2):
            if i == 2:
                t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rates[precision] = batch * seq * steps / (time.perf_counter() - t0)
    return (f"{type(model).__name__} batch {batch} x {seq}: fp32 {rates['fp32']:,.0f} tokens/s, bf16 "
            f"{rates['bf16']:,.0f} tokens/s ({rates['bf16'] / rates['fp32']:.2f}x)")


def matched_gpt(hourglass):
    """The plain 4-layer GPT at the hourglass's context whose parameter count is nearest to it."""
    from experts.checkpoint import build_model

    def gpt(width: int):
        return build_model({"arch": "gpt", "block_size": hourglass.config.block_size, "n_layer": 4, "n_head": 4,
                            "n_embd": width, "vocab_size": 259})

    def size(model) -> int:
        return sum(p.numel() for p in model.parameters())

    target, width = size(hourglass), 64
    while size(gpt(width + 32)) < target:
        width += 32
    return min(gpt(width), gpt(width + 32), key=lambda m: abs(size(m) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile of the expert's step")
    parser.add_argument("--precision", action="store_true", help="fp32 vs bf16 autocast, expert and GPT")
    args = parser.parse_args()
    import torch

    import pipeline  # noqa: F401
    from experts.checkpoint import build_model
    from pipeline.config import load_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config)
    e = cfg.experts
    hourglass = build_model({"arch": e.arch, **e.model, "vocab_size": 259})
    batch = e.train.get("batch_size", 16)
    gpt = matched_gpt(hourglass)
    if args.compile:
        print(compare_compile(hourglass, gpt, batch, args.steps))
        return
    if args.precision:
        print(compare_precision(hourglass, batch, args.steps))
        print(compare_precision(gpt, batch, args.steps))
        return
    print(profile(hourglass, batch, args.steps, args.top))
    print()
    print(profile(gpt, batch, args.steps, args.top))


if __name__ == "__main__":
    main()
