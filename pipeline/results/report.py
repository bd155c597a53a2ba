"""What a person reads: the results table (markdown, CSV) and the plots stages log as artifacts
(domain x cluster table, bits per byte by domain, routing heat map, training curves)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

RESULT_COLUMNS = ("routing_accuracy", "experts_per_token", "params", "train_pflops", "infer_mflops_per_token",
                  "ms_per_token")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    head = ["system", *[c.replace("_", " ") for c in columns[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


DELTA_COLUMNS = ["system", "baseline", "mean", "ci_low", "ci_high", "holds"]


def write_results(out: Path, rows: list[dict], domains: list[str], heat: dict[str, np.ndarray],
                  deltas: list[dict] | None = None) -> str:
    """results.md, results.csv, deltas.csv, bpb_by_domain.png, routing_heatmap.png; returns the
    markdown of both tables (bits per byte; differences from the baselines with intervals)."""
    columns = ["system", *domains, "all", "macro", *RESULT_COLUMNS]
    _write_csv(out / "results.csv", rows, columns)
    markdown = markdown_table(rows, columns)
    if deltas:
        _write_csv(out / "deltas.csv", deltas, DELTA_COLUMNS)
        markdown += ("\n\ndifference in bits per byte from each baseline (negative = better), with its paired "
                     "bootstrap 95% interval over documents; holds: the interval lies below zero\n\n"
                     + markdown_table([{**d, "holds": "yes" if d["holds"] else "no"} for d in deltas], DELTA_COLUMNS))
    (out / "results.md").write_text("bits per byte on held-out text (lower is better)\n\n" + markdown + "\n")
    plot_bpb(rows, domains, out / "bpb_by_domain.png")
    plot_heatmap(heat, domains, out / "routing_heatmap.png")
    return markdown


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_domain_cluster_table(domains: list[str], table: np.ndarray, path: Path) -> None:
    """Documents per domain (rows) x cluster (columns), shaded by each cluster's share."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * table.shape[1], 1 + 0.5 * len(domains)))
    share = table / np.maximum(table.sum(axis=0, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), n in np.ndenumerate(table):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(table.shape[1]), [f"c{j}" for j in range(table.shape[1])])
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("cluster")
    ax.set_title("documents per domain x cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bpb(rows: list[dict], names: list[str], path: Path) -> None:
    plt = _plt()
    shown = [r for r in rows if not r["system"].startswith("expert")]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * (len(names) + 1), 4))
    width = 0.8 / max(len(shown), 1)
    for i, r in enumerate(shown):
        ax.bar(np.arange(len(names) + 1) + i * width, [r[n] for n in [*names, "all"]], width, label=r["system"])
    ax.set_xticks(np.arange(len(names) + 1) + 0.4 - width / 2, [*names, "all"], rotation=20)
    ax.set_ylabel("bits per byte")
    low = min(r[n] for r in shown for n in [*names, "all"])
    ax.set_ylim(bottom=max(0.0, low - 0.5))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmap(heat: dict[str, np.ndarray], names: list[str], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(heat), 1), figsize=(1 + 3.2 * max(len(heat), 1), 1 + 0.45 * len(names)),
                             squeeze=False)
    for ax, (system, counts) in zip(axes[0], heat.items()):
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
        ax.set_xticks(range(share.shape[1]), [f"e{j}" for j in range(share.shape[1])])
        ax.set_yticks(range(len(names)), names)
        ax.set_title(system, fontsize=9)
        ax.set_xlabel("top-1 expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    """One PNG per model: {model: {metric: [(step, value), ...]}} (training loss, validation bpb)."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    for name, curves in histories.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key, points in curves.items():
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=key)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=90)
        plt.close(fig)
