"""What do the central model's states say about the domain? Gate-only routing on validation text.

    python bench/gate_routing.py --pipeline RUN_ID [--config configs/default.yaml] [--windows 32]

For a finished pipeline, on windows of each cluster's validation tokens (the truth: the
window's own cluster), at each composition point of its independent composition:

- PHATGOOSE routing as trained: the share of rows whose top-1 affinity LN(h - mu) . LN(v_e)
  picks their cluster's expert (the gates as the compose stage trained them);
- a linear probe: softmax regression from the central state to the cluster, fitted on
  windows of the clusters' *training* tokens, scored on the validation windows, reading
  each row's own state (token) or the running mean of the rows so far (prefix). It is the
  best a gate of this linear form could do given discriminative training (every cluster's
  text as negatives), so it separates "the states carry no domain signal" from "the gates
  were not trained to find it".

Chance is 1 / k. Validation only: this is for choosing how to route, not a final figure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def windows(tokens, n: int, seq: int, rng):
    import numpy as np
    import torch

    starts = rng.integers(0, len(tokens) - seq, size=n)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq]) for s in starts]).astype(np.int64))  # (n, seq)


def central_states(composed, idx) -> dict:
    """{point: (B, R, d) central states} of one forward of the central model alone."""
    import torch

    seen = {}

    def record(name, h, visible):
        if name in composed.points:
            seen[name] = h.float()
        return h

    with torch.no_grad():
        composed.central(idx, inject=record)
    return seen


def pooled(composed, point: str, h, pool: str):
    saved, composed.pool = composed.pool, pool
    try:
        return composed.routing_state(point, h)  # (B, R, d): minus the routing centre
    finally:
        composed.pool = saved


def probe_accuracy(train_x, train_y, val_x, val_y, k: int, steps: int = 300) -> float:
    """Softmax regression fitted on (train_x, train_y), accuracy on (val_x, val_y)."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    w = torch.zeros(train_x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    x = (train_x - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, train_y) + 1e-4 * (w ** 2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((((val_x - mean) / std @ w + b).argmax(-1) == val_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--windows", type=int, default=32, help="windows per cluster and split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import numpy as np
    import torch

    import pipeline  # noqa: F401
    from composition.loader import CompositionSettings, load_composed
    from pipeline.config import load_config
    from pipeline.store.catalog import Catalog

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    catalog = Catalog(load_config(args.config))
    version = catalog.pipeline_compositions(args.pipeline)["independent"]
    with tempfile.TemporaryDirectory() as tmp:
        state, manifest = catalog.composition_parts(version, Path(tmp) / "composition")
        experts = [catalog.resolve(u) for u in manifest["experts"]]
        dirs = [catalog.model_dir(v, Path(tmp) / f"e{i}") for i, v in enumerate(experts)]
        central_dir = catalog.model_dir(catalog.resolve(manifest["central"]), Path(tmp) / "central")
        settings = CompositionSettings.from_manifest({**manifest, "routing": "topk"})
        composed = load_composed(central_dir, dirs, settings, state).eval()
    k, seq = len(experts), composed.config.block_size
    feats = {split: {p: {"token": [], "prefix": []} for p in composed.points} for split in ("train", "val")}
    labels = {"train": [], "val": []}
    hits = {p: [0, 0] for p in composed.points}
    for j, v in enumerate(experts):
        for split in ("train", "val"):
            idx = windows(np.load(catalog.data_path(v, split), mmap_mode="r"), args.windows, seq, rng)
            states = central_states(composed, idx)
            for p, h in states.items():
                for pool in ("token", "prefix"):
                    feats[split][p][pool].append(pooled(composed, p, h, pool).reshape(-1, h.shape[-1]))
                if split == "val":  # PHATGOOSE's own routing: the trained gates' top-1 affinity
                    with torch.no_grad():
                        top = composed.scores(p, h).argmax(-1)  # (B, R)
                    hits[p][0] += int((top == j).sum())
                    hits[p][1] += top.numel()
            labels[split].append((j, next(iter(states.values())).shape))
    print(f"pipeline {args.pipeline}, {k} clusters, {args.windows} windows of {seq} tokens per cluster and split; "
          f"chance {1 / k:.3f}")
    print("| point | rows per window | PHATGOOSE gates top-1 (val) | linear probe, token (val) | linear probe, prefix (val) |")
    print("|---|---|---|---|---|")
    for p in composed.points:
        row = [p]
        y = {}
        for split in ("train", "val"):
            y[split] = torch.cat([torch.full((x.shape[0],), j) for (j, _), x in zip(labels[split],
                                                                                   feats[split][p]["token"])])
        row.append(str(feats["val"][p]["token"][0].shape[0] // args.windows))
        row.append(f"{hits[p][0] / hits[p][1]:.3f}")
        for pool in ("token", "prefix"):
            x_train, x_val = torch.cat(feats["train"][p][pool]), torch.cat(feats["val"][p][pool])
            row.append(f"{probe_accuracy(x_train, y['train'], x_val, y['val'], k):.3f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
