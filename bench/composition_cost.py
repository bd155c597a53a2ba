"""Inference cost of composition as the number of experts N grows: ms per token (measured)
and FLOPs per token (counted from the shapes a forward uses), side by side.

    python bench/composition_cost.py [--n 2,4,8] [--batch 4] [--threads 2]

Systems: central alone, one expert, composed token-level top-1 / top-2 / all, composed with
router routing (top-1: only the experts some position is routed to run), cBTM top-1 / top-2 / all
(probability mixtures of k expert forwards).
Weights are random: cost does not depend on training. Models: bench/matched.py's hourglass
for the central model and every expert.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def ms_per_token(fn, tokens: int, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="2,4,8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    from matched import HOURGLASS

    from composition.model import ComposedLM
    from experts.flops import forward_flops_per_token
    from experts.hourglass import HourglassLM
    from routing.ensemble import mixture_log_probs

    torch.set_num_threads(args.threads)
    T = HOURGLASS.block_size
    idx = torch.randint(0, 256, (args.batch, T))
    tokens = args.batch * T
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        torch.manual_seed(0)
        central = HourglassLM(HOURGLASS).eval()
        experts = [HourglassLM(HOURGLASS).eval() for _ in range(n)]
        one = forward_flops_per_token(experts[0])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            systems = {"central alone": (lambda: central(idx), forward_flops_per_token(central)),
                       "one expert": (lambda: experts[0](idx), one)}
            for label, routing, k in (("composed token top-1", "topk", 1), ("composed token top-2", "topk", 2),
                                      (f"composed token all ({n})", "topk", n)):
                composed = ComposedLM(central, experts, n_points=2, routing=routing, k=k).eval()
                systems[label] = (lambda c=composed: c(idx), forward_flops_per_token(composed))
            # router routing (cBTM's router picks, the gate scales): only routed experts run. Here the
            # batch is one document's windows, all routed to one expert; a batch that mixes documents
            # of j experts runs j expert forwards over the whole batch.
            route = torch.nn.functional.one_hot(torch.zeros(args.batch, T, dtype=torch.long), n).float()
            routed = ComposedLM(central, experts, n_points=2, routing="router",
                                prefix_router=lambda x, route=route: route[: x.shape[0], : x.shape[1]]).eval()
            systems["composed router top-1"] = (lambda r=routed: r(idx), forward_flops_per_token(routed))
            for label, k in (("cBTM top-1", 1), ("cBTM top-2", 2), (f"cBTM all ({n})", n)):
                chosen = experts[:k]  # routed once per window: k expert forwards, then the mixture

                def cbtm(chosen=chosen, k=k):
                    logits = [e(idx)[0] for e in chosen]
                    return mixture_log_probs(logits, torch.full((args.batch, T, k), 1.0 / k))

                systems[label] = (cbtm, k * one)
            for label, (fn, flops) in systems.items():
                rows.append((n, label, ms_per_token(fn, tokens), flops / 1e6))
    print(f"batch {args.batch} x {T} tokens, {args.threads} threads, bf16 autocast; expert = central = "
          f"{HourglassLM(HOURGLASS).num_params() / 1e6:.1f} M-parameter hourglass, 2 composition points\n")
    print("| N experts | system | ms / token | forward MFLOP / token |\n|---|---|---|---|")
    for n, label, ms, mflop in rows:
        print(f"| {n} | {label} | {ms:.4f} | {mflop:.2f} |")


if __name__ == "__main__":
    main()
