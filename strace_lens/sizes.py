"""Size lists and the default size grid, shared by the node granularity (``strace_lens.trace``:
a size counts candidate nodes) and the token granularity (``strace_lens.token_trace.sizes``: a
size counts (component, position) pairs of each prompt).

Both take the same size list: all ints (counts) or all floats in (0, 1] (relative sizes),
checked here. What a relative size then becomes differs, so each granularity resolves the list
itself: a node float is one node count for every prompt at once, a token float stays relative
(each prompt is sized by its own length, and repeats are checked on the values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

#: about this many log-spaced sizes in the default grid
DEFAULT_GRID_POINTS = 12


def default_sizes(n_units: int, points: int = DEFAULT_GRID_POINTS) -> Int[Tensor, " size"]:
    """About ``points`` log-spaced counts from 1 to ``n_units`` (both included)."""
    if n_units <= points:
        return torch.arange(1, n_units + 1)
    grid = torch.logspace(0, torch.log10(torch.tensor(float(n_units))), points)
    return torch.unique(grid.round().long().clamp(1, n_units))


def checked_sizes(
    sizes: Sequence[int | float] | Tensor, n_max: int, units: str, whole: str, range_note: str
) -> tuple[list[int] | list[float], bool]:
    """A size list as given, and whether it holds counts (ints in [1, ``n_max``]) rather than
    relative sizes (floats in (0, 1]); anything else is refused, naming the bad values.

    ``units`` names the counts ("node counts"), ``whole`` what a relative size is a fraction
    of ("the candidate nodes"), ``range_note`` says what bounds a count (after "[1, n_max]").
    """
    values = sizes.tolist() if isinstance(sizes, Tensor) else list(sizes)
    if not values:
        raise ValueError(f"`sizes` is empty: give {units} like [1, 4, 16] or None for the grid.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = [v for v in values if not 1 <= v <= n_max]
        if bad:
            raise ValueError(f"Sizes {bad} are outside [1, {n_max}]{range_note}")
        return [int(v) for v in values], True
    if all(isinstance(v, float) for v in values):
        bad_f = [v for v in values if not 0.0 < v <= 1.0]
        if bad_f:
            raise ValueError(
                f"Relative sizes {bad_f} are outside (0, 1]; use floats for fractions of "
                f"{whole}, or ints for {units}."
            )
        return [float(v) for v in values], False
    raise TypeError(f"`sizes` must be all ints ({units}) or all floats (relative sizes).")


__all__ = ["DEFAULT_GRID_POINTS", "checked_sizes", "default_sizes"]
