"""Hourglass vs GPT at matched parameters (byte-level, block 512): training tokens/s in
fp32 and bf16, inference tokens/s, peak memory, FLOPs/token and MFU, side by side.

    python bench/expert_throughput.py [--batch 8,16] [--steps 6] [--threads 2]

Each model is measured in its own process (so peak RSS is its own); the MFU peak is a
large matmul measured in this run. Target: hourglass >= 2x the GPT's training tokens/s.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(arch: str, batch: int, steps: int, threads: int) -> dict:
    import torch

    from experts.flops import forward_flops_per_token
    from experts.gpt import GPT
    from experts.hourglass import HourglassLM
    from matched import GPT_BASELINE, HOURGLASS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HourglassLM(HOURGLASS) if arch == "hourglass" else GPT(GPT_BASELINE)
    T = model.config.block_size
    x = torch.randint(0, 256, (batch, T))
    out = {"arch": arch, "params_m": model.num_params() / 1e6, "fwd_mflop_per_token": forward_flops_per_token(model) / 1e6}
    base_rss = rss_mb()
    for precision in ("fp32", "bf16"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            step()
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t0)
        out[f"train_tok_s_{precision}"] = batch * T / statistics.median(times)
    out["train_peak_rss_mb"] = rss_mb()
    out["train_extra_rss_mb"] = rss_mb() - base_rss
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    out["infer_tok_s_bf16"] = batch * T / statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="8,16", help="comma-separated batch sizes, each measured")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, int(args.batch), args.steps, args.threads)))
        return
    import torch

    from experts.flops import measure_peak_flops

    torch.set_num_threads(args.threads)
    peak = {"bf16": measure_peak_flops(torch.bfloat16), "fp32": measure_peak_flops(torch.float32)}
    print(f"{args.threads} threads; peak matmul: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s")
    for batch in [int(b) for b in args.batch.split(",")]:
        report(batch, args, peak)


def report(batch: int, args: argparse.Namespace, peak: dict) -> None:
    rows = {}
    for arch in ("hourglass", "gpt"):
        cmd = [sys.executable, __file__, "--child", arch, "--batch", str(batch), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows[arch] = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in rows.values():
        train_flops = 3 * r["fwd_mflop_per_token"] * 1e6
        r["mfu_bf16"] = train_flops * r["train_tok_s_bf16"] / peak["bf16"]
        r["mfu_fp32"] = train_flops * r["train_tok_s_fp32"] / peak["fp32"]
    keys = [("params_m", "parameters (M)"), ("fwd_mflop_per_token", "forward MFLOP / token"),
            ("train_tok_s_fp32", "train tokens/s fp32"), ("train_tok_s_bf16", "train tokens/s bf16"),
            ("infer_tok_s_bf16", "inference tokens/s bf16"), ("train_peak_rss_mb", "peak RSS MB"),
            ("train_extra_rss_mb", "RSS added by training MB"), ("mfu_fp32", "MFU fp32"), ("mfu_bf16", "MFU bf16")]
    hg, gpt = rows["hourglass"], rows["gpt"]
    print(f"\nbatch {batch} x block 512\n")
    print("| metric | hourglass | GPT | hourglass / GPT |\n|---|---|---|---|")
    for key, label in keys:
        print(f"| {label} | {hg[key]:.4g} | {gpt[key]:.4g} | {hg[key] / gpt[key]:.2f} |")
    ratio = hg["train_tok_s_bf16"] / gpt["train_tok_s_bf16"]
    ratio32 = hg["train_tok_s_fp32"] / gpt["train_tok_s_fp32"]
    print(f"\ntarget: hourglass >= 2x GPT training tokens/s: bf16 {ratio:.2f}x ({ratio >= 2}), "
          f"fp32 {ratio32:.2f}x ({ratio32 >= 2})")


if __name__ == "__main__":
    main()
