"""The terminal progress board of a stage's Ray tasks: each task reports its step, loss and
speed to a tiny actor; the driver prints a line for every task that moved."""
from __future__ import annotations

from dataclasses import dataclass, field


class ProgressBoard:
    """A Ray actor (num_cpus=0) the tasks report to; the driver reads snapshots."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def update(self, name: str, row: dict) -> None:
        self.rows[name] = row

    def snapshot(self) -> dict[str, dict]:
        return dict(self.rows)


def progress_lines(rows: dict[str, dict]) -> list[str]:
    """One line per task: a bar of its steps, its loss and tokens per second."""
    lines = []
    for name in sorted(rows):
        r = rows[name]
        bar = "#" * int(20 * r["step"] / max(r["total"], 1))
        lines.append(f"  {name:>10} [{bar:<20}] step {r['step']}/{r['total']} loss {r['loss']:.3f} "
                     f"{r['tokens_per_s']:.0f} tok/s{' done' if r.get('done') else ''}")
    return lines


def open_board(key: str):
    """The stage's one board (a named actor, so that a second caller gets the same one), on the
    driver's node where it can be (a lost worker node does not take the progress lines with it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(ProgressBoard).options(name=f"moie-progress-{key}", get_if_exists=True,
                                                         scheduling_strategy=here).remote()


@dataclass
class BoardPrinter:
    """Prints the lines of the tasks whose rows changed since the last print."""

    board: object
    shown: dict = field(default_factory=dict)

    def print_changes(self) -> None:
        import ray

        try:
            rows = ray.get(self.board.snapshot.remote())
        except ray.exceptions.RayError:  # the board actor was lost: progress lines are cosmetic, training goes on
            return
        changed = {name: row for name, row in rows.items() if self.shown.get(name) != row}
        for line in progress_lines(changed):
            print(line, flush=True)
        self.shown = rows
