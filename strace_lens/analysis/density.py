"""Density: how much of the model an input needs, as the area under its TV-versus-size curve.

Integration rule. For each prompt, TV (or any ``[P, S]`` metric) is a function of
x = log10(relative size) known at the traced sizes. Its area is the trapezoidal rule over
those points, from the smallest to the largest traced size, with TV linear in x between
them (no extrapolation past either end):

    auc = sum_j (x_{j+1} - x_j) * (tv_j + tv_{j+1}) / 2        [TV x decades]

Normalisation. ``density = auc / (x_max - x_min)``: the mean TV per decade of size, in [0, 1].
It does not depend on how many decades the grid spans, so grids of different models (whose
smallest relative size is 1/N) give comparable numbers. A higher density means the input
needs more of the model before its output distribution is reproduced.

Curves are averaged after linear interpolation in x onto a common grid (``log_grid``);
points of a grid outside a curve's traced range are left out of that grid point's average
(``n`` says how many curves each point averages).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from strace_lens.analysis._common import to_numpy
from strace_lens.result import TraceResult


def log_sizes(result: TraceResult) -> tuple[np.ndarray, torch.Tensor]:
    """log10(relative size) of the grid in increasing order, and the sorting permutation."""
    order = result.size_order()
    rel = to_numpy(result.relative_sizes[order])
    if (rel <= 0).any():
        raise ValueError(
            "The size grid holds a size of 0, whose log10 is undefined: density needs sizes >= 1."
        )
    return np.log10(rel), order


def _metric(result: TraceResult, metric: str) -> np.ndarray:
    if metric not in result.metrics:
        raise KeyError(
            f"This TraceResult has no {metric!r} metric (it has {sorted(result.metrics)}); "
            "inverse metrics need trace(..., inverse=True)."
        )
    return to_numpy(result.metrics[metric])


def interpolate_curves(
    result: TraceResult, metric: str = "tv", log_grid: Sequence[float] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt's curve, linear in log10(relative size), on ``log_grid``.

    Returns ``(log_grid [G], values [P, G])``; NaN where the grid leaves a curve's range.
    Default grid: 50 points evenly spaced between the smallest and largest traced size.
    """
    x, order = log_sizes(result)
    y = _metric(result, metric)[:, order.numpy()]
    grid = np.linspace(x[0], x[-1], 50) if log_grid is None else np.asarray(log_grid, dtype=float)
    return grid, interpolate_rows(x, y, grid)


def interpolate_rows(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Rows ``y [R, S]`` known at increasing ``x [S]``, linear in x, on ``grid [G]``.

    NaN where the grid leaves ``[x[0], x[-1]]`` (never extrapolated); with one point, only
    a grid point at that x gets its value. Shared by the node and edge analyses.
    """
    y = np.atleast_2d(y)
    if len(x) == 1:
        return np.where(np.isclose(grid, x[0])[None, :], y[:, :1], np.nan)
    values = np.stack([np.interp(grid, x, row) for row in y])
    outside = (grid < x[0] - 1e-12) | (grid > x[-1] + 1e-12)
    values[:, outside] = np.nan
    return values


def density(
    result: TraceResult,
    metric: str = "tv",
    log_grid: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Per prompt: AUC of ``metric`` versus log10(relative size), and the density.

    With ``log_grid`` given, each curve is first interpolated onto it (use the same grid for
    results traced on different size grids); by default the traced points are integrated as
    they are. Columns: ``prompt``, ``text``, ``auc`` (metric x decades), ``span`` (decades
    integrated), ``density`` (auc / span), ``entropy`` (full model, nats) and ``loss``
    (-log p of the true next token; NaN when the trace had no targets).
    """
    if log_grid is None:
        x, order = log_sizes(result)
        y = _metric(result, metric)[:, order.numpy()]
    else:
        x, y = interpolate_curves(result, metric, log_grid)
        if np.isnan(y).any():
            traced = log_sizes(result)[0]
            raise ValueError(
                f"log_grid spans [{x.min():.3g}, {x.max():.3g}] in log10(relative size) but the "
                f"traced sizes span [{traced[0]:.3g}, {traced[-1]:.3g}]: keep the grid inside "
                "the traced range (density never extrapolates)."
            )
    if len(x) < 2:
        raise ValueError("Density needs at least two sizes to integrate over.")
    auc = np.trapezoid(y, x, axis=1)
    span = float(x[-1] - x[0])
    loss = (
        -to_numpy(result.target_logprob)
        if result.target_logprob is not None
        else np.full(result.n_prompts, np.nan)
    )
    return pd.DataFrame(
        {
            "prompt": np.arange(result.n_prompts),
            "text": result.prompts,
            "auc": auc,
            "span": span,
            "density": auc / span,
            "entropy": to_numpy(result.entropy),
            "loss": loss,
        }
    )


def density_curve(
    result: TraceResult,
    metric: str = "tv",
    log_grid: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """The mean curve over prompts on a common log grid (what the paper's figure 1 draws).

    Columns: ``log10_relative_size``, ``relative_size``, ``mean``, ``median``, ``q25``,
    ``q75``, ``std``, ``sem``, ``n`` (curves averaged at that point), ``metric``, ``method``.
    """
    grid, values = interpolate_curves(result, metric, log_grid)
    n = np.isfinite(values).sum(0)
    with warnings.catch_warnings():
        # grid points that no curve covers are NaN columns: numpy warns, we report n = 0
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(values, 0)
        std = np.nanstd(values, 0, ddof=1) if values.shape[0] > 1 else np.zeros(len(grid))
        q25, median, q75 = np.nanquantile(values, [0.25, 0.5, 0.75], axis=0)
    return pd.DataFrame(
        {
            "log10_relative_size": grid,
            "relative_size": 10.0**grid,
            "mean": mean,
            "median": median,
            "q25": q25,
            "q75": q75,
            "std": std,
            "sem": std / np.sqrt(np.maximum(n, 1)),
            "n": n,
            "metric": metric,
            "method": result.method,
        }
    )
