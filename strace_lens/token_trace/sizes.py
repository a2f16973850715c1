"""Sizes at token granularity: counts of (component, position) pairs, per prompt.

A prompt of ``n_pos`` tokens has ``n_layers * (n_heads + 1) * n_pos`` units, so the same
size list can mean different counts for prompts of different lengths:

- **ints** are unit counts, the same for every prompt; each must fit the shortest prompt.
- **floats** in (0, 1] are relative sizes: prompt p keeps ``max(1, round(s * n_p))`` units
  (what the node granularity does with relative sizes). Relative sizes are the natural
  choice for prompts of different lengths: size j is the same fraction of every prompt.
  On a short prompt two relative sizes may round to the same count; the grid stays aligned
  across prompts (one column per size asked for) and the count is recorded per prompt.
- **None** (the default): the relative grid ``c / n_min`` for the about 12 log-spaced node
  counts c from 1 to ``n_min`` that the node granularity uses, ``n_min`` being the shortest
  prompt's unit count; for prompts of one length these are exactly those counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from strace_lens.sizes import checked_sizes, default_sizes


def size_grid(
    sizes: Sequence[int | float] | Tensor | None, unit_counts: Sequence[int]
) -> tuple[int | float, ...]:
    """The size grid as asked (ints: counts; floats: relative sizes), checked against every
    prompt's unit count, ascending; None gives the default relative grid."""
    n_min = min(unit_counts)
    if sizes is None:
        return tuple(c / n_min for c in default_sizes(n_min).tolist())
    values, _ = checked_sizes(
        sizes,
        n_min,
        units="unit counts",
        whole="a prompt's (component, position) pairs",
        range_note=": at granularity='token' an int size counts (component, position) pairs "
        f"and must fit the shortest prompt ({n_min} pairs). Give relative sizes (floats in "
        "(0, 1]) to size each prompt by its own length.",
    )
    if len(set(values)) != len(values):
        raise ValueError(f"Sizes repeat ({sorted(values)}); give each size once.")
    return tuple(sorted(values))


def unit_counts_of(grid: Sequence[int | float], n_units: int) -> Int[Tensor, " size"]:
    """The count of each size of the grid for a prompt of ``n_units`` units."""
    counts = [
        int(s) if isinstance(s, int) else min(n_units, max(1, round(s * n_units))) for s in grid
    ]
    return torch.tensor(counts, dtype=torch.long)


__all__ = ["size_grid", "unit_counts_of"]
