"""State kept between the steps of incremental decoding (`model.extend`).

A row of any stage is final once every input it may see is known (its `visible` position
is < the tokens fed so far). Final rows are computed once and kept: their attention keys
and values (KVCache), and, where a composition reads them, the rows themselves
(StageRows). Rows of an incomplete hourglass group are recomputed each step and kept
provisionally, in the same buffers, until the group is complete (commit()).
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, n_head, N, head_dim) of one attention layer: `n` final rows, then the
    provisional rows of the last extend() (overwritten by the next one until commit())."""

    def __init__(self):
        self.k = self.v = None
        self.n = 0  # final rows
        self.pending = 0  # provisional rows after them

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, m, hs) after the final rows; return all rows (B, nh, n + m, hs)."""
        m = k.shape[2]
        self.k, self.v = _room(self.k, k, self.n + m, dim=2), _room(self.v, v, self.n + m, dim=2)
        self.k[:, :, self.n:self.n + m] = k
        self.v[:, :, self.n:self.n + m] = v
        self.pending = m
        return self.k[:, :, :self.n + m], self.v[:, :, :self.n + m]

    def commit(self, rows: int | None = None) -> None:
        """Keep the provisional rows as final (or only the first `rows` of them)."""
        self.n, self.pending = self.n + (self.pending if rows is None else rows), 0


class RunningSum:
    """The sum (B, d) of a stage's final rows and their count, for running means over rows."""

    def __init__(self):
        self.total, self.count = None, 0
        self.pending = None  # (sum, rows) of the last means() call

    def means(self, h: torch.Tensor) -> torch.Tensor:
        """(B, R, d) the mean of all rows so far up to each row of h (B, R, d), which follow the final ones."""
        sums = h.float().cumsum(dim=1)  # (B, R, d)
        if self.total is not None:
            sums = sums + self.total[:, None]
        n = torch.arange(self.count + 1, self.count + h.shape[1] + 1, device=h.device, dtype=torch.float32)
        self.pending = (sums[:, -1], h.shape[1])
        return (sums / n.view(1, -1, 1)).to(h.dtype)

    def commit(self) -> None:
        if self.pending is not None:
            (self.total, rows), self.pending = self.pending, None
            self.count += rows


class StageRows:
    """The rows (B, R, d) of one stage and their visible positions (R,): `final` ones and, after
    them, the provisional rows of an incomplete group (`current`)."""

    def __init__(self):
        self.h = self.visible = None
        self.n = 0
        self.pending = 0

    def extend(self, h: torch.Tensor, visible: torch.Tensor) -> None:
        m = h.shape[1]
        self.h = _room(self.h, h, self.n + m, dim=1)
        self.visible = _room(self.visible, visible, self.n + m, dim=0)
        self.h[:, self.n:self.n + m] = h
        self.visible[self.n:self.n + m] = visible
        self.pending = m

    def commit(self) -> None:
        self.n, self.pending = self.n + self.pending, 0

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, d), (R,): the final rows and the current provisional ones."""
        if self.h is None:
            raise ValueError("no rows recorded yet for this stage")
        end = self.n + self.pending
        return self.h[:, :end], self.visible[:end]


class DecodeCache:
    """A model's decoding state for a batch: tokens fed, every attention layer's KVCache (by
    name), and, with keep_states, every stage's StageRows (a composition reads its experts')."""

    def __init__(self, keep_states: bool = False):
        self.length = 0  # tokens fed
        self.final = True  # whether the rows being computed now are final (a composition's inject reads it)
        self.layers: dict[str, KVCache] = {}
        self.keep_states = keep_states
        self.states: dict[str, StageRows] = {}
        self.extra: dict = {}  # what a model kind keeps besides (the hourglass: its open group)

    def layer(self, name: str) -> KVCache:
        if name not in self.layers:
            self.layers[name] = KVCache()
        return self.layers[name]

    def part(self, name: str, kind=StageRows):
        """A StageRows (or other `kind` with commit()) kept beside the states and committed with them."""
        if name not in self.states:
            self.states[name] = kind()
        return self.states[name]

    def record(self, name: str, h: torch.Tensor, visible: torch.Tensor) -> None:
        """Keep a stage's rows of this step (keep_states only)."""
        if self.keep_states:
            self.states.setdefault(name, StageRows()).extend(h, visible)

    def commit(self) -> None:
        """The rows of this step are final: keep them."""
        for part in (*self.layers.values(), *self.states.values()):
            part.commit()


def _room(buffer: torch.Tensor | None, like: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`buffer`, grown (doubling) along `dim` to hold at least `size` entries."""
    if buffer is not None and buffer.shape[dim] >= size:
        return buffer
    have = 0 if buffer is None else buffer.shape[dim]
    shape = list(like.shape)
    shape[dim] = max(size, 2 * have, 64)
    grown = like.new_zeros(shape)
    if have:
        grown.narrow(dim, 0, have).copy_(buffer)
    return grown
