"""Where is the experts' knowledge, and how much of it does a composition capture? Validation only.

    python bench/composition_ceiling.py --pipeline RUN_ID [--config configs/default.yaml]
                                        [--bytes 16384] [--composition models:/moie-composition/N ...]

For a finished pipeline, on whole validation documents of each cluster (the first --bytes of
each cluster's own validation stream: every cluster in an equal share), bits per byte of:

- central: the pipeline's central model (by default the full dense run);
- seed: the shared seed the experts branched from (the dense model at seed_fraction), the
  hub a composition could sit on instead of the full dense run;
- routed expert: the expert cBTM's router picks for each byte from the text before it (top-1);
- oracle: the cluster's own expert on every byte: the ceiling of any composition of these
  experts that routes by cluster;
- mixture λ/domain: log(λ p_routed + (1 - λ) p_central), λ chosen per cluster on a grid;
- mixture λ: one λ for every cluster (chosen on the macro average);
- seed mixture λ: the same with the seed in place of the central model;
- every composition of the pipeline (newest per mode) and each --composition, routed as it
  routes, and, for its cross-attention blocks, the attention mass on the aligned expert row
  (the newest expert row the central row may see; averaged over heads, rows and points).

Then the share of the oracle's gain over the central each captures, per cluster where the
oracle gains: (central - system) / (central - oracle). λ is chosen on the very documents it
is scored on: those rows are ceilings, not results. Validation only: this chooses designs;
the test split is for the final table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_per_second import cpu_name  # noqa: E402  (bench/ is on the path: this script's folder)

GRID = [i / 20 for i in range(21)]


def bpb(log_probs) -> float:
    from composition.evaluation import bits_per_byte

    return bits_per_byte(log_probs)


def mix(a, b, lam: float):
    """Per document log(lam e^a + (1 - lam) e^b) of two models' per-byte log-probabilities."""
    import numpy as np

    return [np.logaddexp(np.log(lam) + x, np.log1p(-lam) + y) if 0 < lam < 1 else (x if lam == 1 else y)
            for x, y in zip(a, b)]


def aligned_attention_mass(composed, docs, eos: int, seq: int, route) -> float | None:
    """Mean attention probability (over heads, central rows, points) that the cross-attention
    blocks of the active experts give the aligned expert row; None without cross-attention."""
    import numpy as np
    import torch

    from composition.blocks import CrossAttentionBlock, GlueBlock

    masses = []

    def hook(block, args, kwargs, out):
        h, visible_c, z, visible_e = args
        attn = block.attn
        B, T, C = h.shape
        q = attn.q(block.ln_q(h)).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        kv = torch.cat([block.null.expand(B, 1, -1).to(z.dtype), block.kv_proj(z.to(h.dtype))], dim=1)
        k = attn.kv(block.ln_kv(kv)).split(C, dim=2)[0]
        k = k.view(B, kv.shape[1], attn.n_head, attn.head_dim).transpose(1, 2)  # (B, nh, 1 + T_e, hs)
        scores = attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2) / attn.head_dim ** 0.5
        mask = torch.cat([torch.ones(T, 1, dtype=torch.bool), visible_e[None, :] <= visible_c[:, None]], dim=1)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, nh, T, 1 + T_e)
        row = torch.searchsorted(visible_e.contiguous(), visible_c.contiguous(), right=True) - 1  # (T,)
        seen = row >= 0
        if seen.any():
            aligned = probs[:, :, torch.arange(T)[seen], row[seen] + 1]  # +1: the null key comes first
            masses.append(float(aligned.mean()))

    blocks = [m.attention if isinstance(m, GlueBlock) else m for m in composed.blocks.modules()
              if isinstance(m, (CrossAttentionBlock, GlueBlock))]
    blocks = [b for b in blocks if isinstance(b, CrossAttentionBlock)]
    if not blocks:
        return None
    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            for d, doc in enumerate(docs[:4]):  # a few windows suffice for a mean
                x = torch.from_numpy(np.concatenate([[eos], np.asarray(doc[:seq - 1], dtype=np.int64)]))[None]
                kwargs = {"route": torch.from_numpy(route[d][:x.shape[1]])[None]} if route is not None else {}
                composed(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return float(np.mean(masses)) if masses else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--bytes", type=int, default=16384, help="validation bytes per cluster (whole documents)")
    parser.add_argument("--composition", action="append", default=[], help="also score this composition version")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch

    import pipeline  # noqa: F401  (loopback / offline defaults)
    from composition.evaluation import score_documents, stream_documents
    from composition.loader import CompositionSettings, load_composed
    from experts.checkpoint import load_model
    from experts.tokenizer import EOS_ID
    from pipeline.config import load_config
    from pipeline.store import storage
    from pipeline.store.catalog import Catalog, exact_uri
    from pipeline.store.names import Tag, expert_name
    from routing.ensemble import document_weights

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    catalog = Catalog(cfg)
    eos, stride = EOS_ID, cfg.evaluate.stride
    cluster_run, _, _ = catalog.assignments(args.pipeline)
    central_uri, expert_uris = catalog.pipeline_models(args.pipeline)
    experts = [catalog.resolve(u) for u in expert_uris]
    clusters = [int(v.tags[Tag.CLUSTER]) for v in experts]
    names = [v.tags.get(Tag.DOMAIN) or expert_name(c) for v, c in zip(experts, clusters)]
    compositions = {f"composed_{mode}": v for mode, v in catalog.pipeline_compositions(args.pipeline).items()}
    compositions |= {f"composition {u}": catalog.resolve(u) for u in args.composition}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        router = catalog.router(cluster_run.info.run_id, tmp / "router")
        docs = [stream_documents(np.load(catalog.data_path(v, "val"), mmap_mode="r"), eos, args.bytes)
                for v in experts]  # docs[j]: cluster j's documents
        weights = [[document_weights(router, bytes(np.asarray(d, dtype=np.uint8)), clusters, 1) for d in group]
                   for group in docs]

        def score(model, group, **kw):
            return score_documents(model, docs[group], eos, model.config.block_size, stride, 8, **kw).log_probs

        central_dir = catalog.model_dir(catalog.resolve(central_uri), tmp / "central")
        central = load_model(central_dir)[0].eval()
        expert_dirs = [catalog.model_dir(v, tmp / f"e{i}") for i, v in enumerate(experts)]
        models = [load_model(d)[0].eval() for d in expert_dirs]
        seed_at = Catalog.seed_dir(experts[0].tags[Tag.STORAGE_ROOT])  # absent when the experts did not branch
        seed = (load_model(storage.local_copy(seed_at, tmp / "seed"))[0].eval()
                if storage.kind(storage.join(seed_at, "model.json")) == "file" else None)
        lp = {"central": [score(central, j) for j in range(len(experts))]}
        if seed is not None:
            lp["seed"] = [score(seed, j) for j in range(len(experts))]
        by_expert = [[score(m, j) for j in range(len(experts))] for m in models]  # [expert][cluster][doc]
        lp["oracle"] = [by_expert[j][j] for j in range(len(experts))]
        lp["routed expert"] = [[np.choose(w.argmax(1), [by_expert[e][j][d] for e in range(len(experts))])
                                for d, w in enumerate(weights[j])] for j in range(len(experts))]
        attention = {}
        for label, version in compositions.items():
            state, manifest = catalog.composition_parts(version, tmp / f"c-{version.version}")
            dirs = [catalog.model_dir(catalog.resolve(u), tmp / f"c{version.version}-{i}")
                    for i, u in enumerate([manifest["central"], *manifest["experts"]])]
            composed = load_composed(dirs[0], dirs[1:], CompositionSettings.from_manifest(manifest), state).eval()
            order = [expert_uris.index(u) if u in expert_uris else None for u in manifest["experts"]]
            routed = composed.routing == "router"
            routes = [[w[:, [o for o in order]] for w in weights[j]] if routed and None not in order else None
                      for j in range(len(experts))]
            lp[label] = [score(composed, j, route_weights=routes[j]) for j in range(len(experts))]
            attention[label] = aligned_attention_mass(composed, docs[0] + docs[-1], eos, composed.config.block_size,
                                                      (routes[0] + routes[-1]) if routes[0] else None)
            label_glue = manifest.get("glue", "attention")
            lp[f"{label} [{label_glue}]"] = lp.pop(label)
            attention[f"{label} [{label_glue}]"] = attention.pop(label)
    k = len(experts)
    rows = {name: [bpb(lp[name][j]) for j in range(k)] for name in lp}
    for hub in ("central", "seed"):
        if hub not in lp:
            continue
        per_domain = [min(bpb(mix(lp["routed expert"][j], lp[hub][j], lam)) for lam in GRID) for j in range(k)]
        best = min(GRID, key=lambda lam: np.mean([bpb(mix(lp["routed expert"][j], lp[hub][j], lam)) for j in range(k)]))
        rows[f"{hub} mixture, λ per domain"] = per_domain
        rows[f"{hub} mixture, λ = {best:.2f}"] = [bpb(mix(lp["routed expert"][j], lp[hub][j], best)) for j in range(k)]
    print(f"pipeline {args.pipeline}; validation, {args.bytes} bytes of whole documents per cluster; "
          f"{cpu_name()}")
    print("\nbits per byte (lower is better)\n")
    print("| system | " + " | ".join(names) + " | macro | aligned attention |")
    print("|---|" + "---|" * (k + 2))
    for name, values in rows.items():
        mass = attention.get(name)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} | "
              + (f"{mass:.3f}" if mass is not None else "–") + " |")
    central_row, oracle_row = rows["central"], rows["oracle"]
    gains = [c - o for c, o in zip(central_row, oracle_row)]
    print("\nshare of the oracle's gain over the central captured, (central - system) / (central - oracle); "
          "– where the oracle does not gain\n")
    print("| system | " + " | ".join(f"{n} ({g:+.3f})" for n, g in zip(names, gains)) + " |")
    print("|---|" + "---|" * k)
    for name, values in rows.items():
        if name in ("central", "oracle"):
            continue
        print(f"| {name} | " + " | ".join(f"{(c - v) / g:.0%}" if g > 0 else "–"
                                          for c, v, g in zip(central_row, values, gains)) + " |")
    print(f"\nchance attention on one row: ~1 / (rows visible + 1); {k} clusters; "
          f"central {exact_uri(catalog.resolve(central_uri))}")


if __name__ == "__main__":
    main()
