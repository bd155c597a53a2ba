"""Are the experts specialists? Each expert against the dense model on its own cluster's
validation text (the premise of cBTM and of composition), for a finished pipeline.

    python bench/specialists.py --pipeline RUN_ID [--config configs/default.yaml] [--tokens 65536]

Reads the registered experts and dense model through the catalog and each cluster's
validation tokens from the experts stage's data directory; scores both in windows of the
model's context. Prints one row per expert and how many beat the dense model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--tokens", type=int, default=65536, help="validation tokens scored per cluster (at most)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch

    import pipeline  # noqa: F401
    from experts.checkpoint import load_model
    from experts.trainer import bits_per_byte
    from pipeline.config import load_config
    from pipeline.store.catalog import Catalog
    from pipeline.store.names import Tag

    torch.set_num_threads(args.threads)
    catalog = Catalog(load_config(args.config))
    _, expert_uris = catalog.pipeline_models(args.pipeline)
    dense = catalog.dense_model(args.pipeline)
    rows, wins = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        dense_model, _ = load_model(catalog.model_dir(dense, Path(tmp) / "dense"))
        for i, uri in enumerate(expert_uris):
            version = catalog.resolve(uri)
            val = np.load(catalog.data_path(version, "val"), mmap_mode="r")
            if len(val) < 2:
                rows.append(f"| {version.tags[Tag.EXPERT]} | {version.tags.get(Tag.DOMAIN)} | 0 | – | – | – |")
                continue
            expert, _ = load_model(catalog.model_dir(version, Path(tmp) / f"e{i}"))
            seq = expert.config.block_size
            e_bpb = bits_per_byte(expert, val, seq, args.tokens)
            d_bpb = bits_per_byte(dense_model, val, dense_model.config.block_size, args.tokens)
            wins += e_bpb < d_bpb
            rows.append(f"| {version.tags[Tag.EXPERT]} | {version.tags.get(Tag.DOMAIN)} | "
                        f"{min(len(val), args.tokens):,} | {e_bpb:.3f} | {d_bpb:.3f} | {e_bpb - d_bpb:+.3f} |")
    print("| expert | dominant domain | val tokens | expert bpb | dense bpb | expert - dense |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{wins} of {len(expert_uris)} experts below the dense model on their own cluster's validation text")


if __name__ == "__main__":
    main()
