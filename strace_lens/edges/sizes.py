"""Subgraph sizes at edge granularity: relative sizes s and their edge counts int(s * E).

``"paper"`` is the grid of the paper's released code; 1.0 stands for the full graph (all E
edges; ``int(1.0 * E) == E``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

PAPER_GRID: tuple[float, ...] = (
    1e-5, 2e-5, 4e-5, 8e-5,
    1e-4, 2e-4, 4e-4, 8e-4,
    1e-3, 1.2e-3, 1.4e-3, 2e-3, 3e-3, 4e-3, 6e-3, 8e-3,
    1e-2, 2e-2, 4e-2, 6e-2, 8e-2,
    0.1, 0.2, 0.4, 0.6, 0.8,
    1.0,
)  # fmt: skip


def relative_sizes(sizes: str | Sequence[float]) -> tuple[float, ...]:
    """Resolve ``"paper"`` or a list of relative sizes in (0, 1], checked and ascending."""
    if isinstance(sizes, str):
        if sizes != "paper":
            raise ValueError(f"Unknown size grid {sizes!r}: use 'paper' or a list of floats.")
        return PAPER_GRID
    grid = tuple(float(s) for s in sizes)
    if not grid or any(not 0 < s <= 1 for s in grid):
        raise ValueError(f"Relative sizes must lie in (0, 1], got {list(grid)}.")
    if list(grid) != sorted(grid):
        raise ValueError(f"Relative sizes must be ascending, got {list(grid)}.")
    return grid


def edge_counts(grid: Sequence[float], n_edges: int) -> Int[Tensor, " size"]:
    """``int(s * E)`` for each s: the number of edges of each subgraph, as the paper counts."""
    return torch.tensor([int(s * n_edges) for s in grid], dtype=torch.long)
