"""Putting per-prompt edge-subgraph curves on one log grid of relative size.

Each prompt has its own edge count E_p, so the same grid size s lands at a different relative
size ``int(s * E_p) / E_p`` in each prompt: curves are compared only after interpolation onto
a common grid of log10(relative size).

Default grid: 151 points from 1e-5 to 1, 30 per decade. The paper's released code uses 150
log-spaced points over the same range; one more point makes 1e-4, 1e-3 and 1e-2 (the edges of
its phase bands and its minimal core) grid points, so band averages need no extra point.

Between a prompt's traced sizes a curve is linear in log10(s) (``along="log10"``, as the
node-level :func:`strace_lens.analysis.density_curve`) or linear in s (``along="s"``, as the
released code's ``np.interp(COMMON_SIZE, sizes, values)``); it is never extrapolated: grid
points outside a prompt's smallest and largest non-empty subgraph are NaN for that prompt.
Subgraphs with no edge (``int(s * E_p) == 0`` on a short prompt) are left out: their shares
are undefined and log10(0) is too.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from jaxtyping import Float

from strace_lens.analysis.density import interpolate_rows

Along = Literal["log10", "s"]

#: log10 of the default common grid: 1e-5 .. 1, 30 points per decade
COMMON_LOG_GRID: np.ndarray = np.linspace(-5.0, 0.0, 151)


def check_log_grid(log_grid: Float[np.ndarray, " grid"] | None) -> np.ndarray:
    """The default grid, or ``log_grid`` checked: increasing log10 sizes, all <= 0."""
    if log_grid is None:
        return COMMON_LOG_GRID.copy()
    grid = np.asarray(log_grid, dtype=float)
    if grid.ndim != 1 or len(grid) < 2 or not np.all(np.diff(grid) > 0):
        raise ValueError(
            "log_grid must be at least two strictly increasing log10 relative sizes, e.g. "
            "numpy.linspace(-5, 0, 151)."
        )
    if grid[-1] > 1e-12:
        raise ValueError(
            f"log_grid reaches log10(s) = {grid[-1]:.3g} > 0: relative sizes cannot exceed 1."
        )
    return grid


def traced_points(
    relative: Float[np.ndarray, " size"], values: Float[np.ndarray, " size *k"]
) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's non-empty subgraphs as ``(log10 s [n], values [n, ...])``, increasing in s.

    Sizes that share an edge count (two grid sizes rounding to the same ``int(s * E)``) are
    one point; their values are averaged (equal for a nested family, whose subgraphs of equal
    count are the same subgraph).
    """
    keep = relative > 0
    if not keep.any():
        return np.zeros(0), values[:0]
    rel, vals = relative[keep], values[keep]
    unique, inverse = np.unique(rel, return_inverse=True)
    summed = np.zeros((len(unique), *vals.shape[1:]))
    np.add.at(summed, inverse, vals)
    counts = np.bincount(inverse, minlength=len(unique)).reshape(-1, *([1] * (vals.ndim - 1)))
    return np.log10(unique), summed / counts


def on_common_grid(
    relative: Float[np.ndarray, "prompt size"],
    values: Float[np.ndarray, "prompt size k"],
    log_grid: Float[np.ndarray, " grid"],
    along: Along = "log10",
) -> Float[np.ndarray, "prompt grid k"]:
    """Each prompt's ``k`` curves interpolated onto ``log_grid`` (see module docstring)."""
    if along not in ("log10", "s"):
        raise ValueError(f"Unknown interpolation along={along!r}: 'log10' or 's'.")
    n_prompts, _, k = values.shape
    out = np.full((n_prompts, len(log_grid), k), np.nan)
    for p in range(n_prompts):
        x, y = traced_points(relative[p], values[p])
        if len(x) == 0:
            continue
        if along == "s":
            # linear in s between traced sizes; the range check is the same in either unit
            inside = (log_grid >= x[0] - 1e-12) & (log_grid <= x[-1] + 1e-12)
            rows = interpolate_rows(10.0**x, y.T, 10.0**log_grid)
            rows[:, ~inside] = np.nan
        else:
            rows = interpolate_rows(x, y.T, log_grid)
        out[p] = rows.T
    return out
