"""The paper's fixed phase bands of relative size, and per-prompt summaries over them.

At edge granularity the paper does not measure where a phase ends: it shades fixed bands of
s (its figures; method reference, section 2b) and reads the composition inside them:

- construction: 1e-4 <= s <= 1e-2;
- refinement: 1e-2 <= s <= 1;
- the minimal core: s = 1e-3 (a point, ``MINIMAL_CORE_SIZE`` in the released plotting code).

A band's value for one prompt is the mean of its curve over log10(s) across the band: the
trapezoidal area over the band (the curve linear between grid points, the band's edges added
as points when they fall between two) divided by the band's width in decades. A prompt whose
curve does not cover the whole band (a short prompt has no subgraph at s = 1e-4) has none.
The summary gives the mean over prompts with a bootstrap 95 % interval
(:func:`strace_lens.analysis.mean_ci`) and the number of prompts it averages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

from strace_lens.analysis._stats import mean_ci

#: the construction phase's band of relative sizes (the paper's figures)
CONSTRUCTION_BAND: tuple[float, float] = (1e-4, 1e-2)
#: the refinement phase's band
REFINEMENT_BAND: tuple[float, float] = (1e-2, 1.0)
#: the size of the paper's "minimal core"
MINIMAL_CORE_SIZE: float = 1e-3
PHASE_BANDS: dict[str, tuple[float, float]] = {
    "construction": CONSTRUCTION_BAND,
    "refinement": REFINEMENT_BAND,
}


def band_average(
    log_grid: Float[np.ndarray, " grid"],
    curves: Float[np.ndarray, "prompt grid k"],
    band: tuple[float, float],
) -> Float[np.ndarray, "prompt k"]:
    """Each prompt's mean of each curve over log10(s) in ``band`` (NaN if not covered)."""
    lo, hi = np.log10(band[0]), np.log10(band[1])
    if not lo < hi:
        raise ValueError(f"A band needs its lower size below its upper one, got {band}.")
    if lo < log_grid[0] - 1e-12 or hi > log_grid[-1] + 1e-12:
        raise ValueError(
            f"The band {band} leaves the grid [{10 ** log_grid[0]:.3g}, {10 ** log_grid[-1]:.3g}]."
        )
    inner = log_grid[(log_grid > lo + 1e-12) & (log_grid < hi - 1e-12)]
    x = np.concatenate([[lo], inner, [hi]])
    n_prompts, _, k = curves.shape
    out = np.full((n_prompts, k), np.nan)
    for p in range(n_prompts):
        for c in range(k):
            y = np.interp(x, log_grid, curves[p, :, c])
            # np.interp reads a NaN neighbour as NaN: any gap in the band leaves the prompt out
            if np.isfinite(y).all():
                out[p, c] = np.trapezoid(y, x) / (hi - lo)
    return out


def point_value(
    log_grid: Float[np.ndarray, " grid"], curves: Float[np.ndarray, "prompt grid k"], size: float
) -> Float[np.ndarray, "prompt k"]:
    """Each prompt's curves at relative size ``size`` (linear in log10 s between grid points)."""
    x = np.log10(size)
    if x < log_grid[0] - 1e-12 or x > log_grid[-1] + 1e-12:
        raise ValueError(f"Size {size:g} is outside the grid.")
    return np.stack(
        [[np.interp(x, log_grid, curves[p, :, c]) for c in range(curves.shape[2])]
         for p in range(curves.shape[0])]
    )  # fmt: skip


def band_summary(
    log_grid: Float[np.ndarray, " grid"],
    curves: Float[np.ndarray, "prompt grid k"],
    names: Sequence[str],
    bands: dict[str, tuple[float, float]] | None = None,
    core_size: float = MINIMAL_CORE_SIZE,
) -> pd.DataFrame:
    """Per band (and the minimal core) and curve: mean over prompts, 95 % interval, n.

    Columns: ``band`` (``construction``, ``refinement``, ``minimal_core``), ``lo``, ``hi``
    (the band's sizes; equal for the core point), ``quantity`` (a name from ``names``),
    ``mean``, ``ci_low``, ``ci_high``, ``n`` (prompts covering the band; 0, with NaN
    values, for a band outside ``log_grid``).
    """
    if len(names) != curves.shape[2]:
        raise ValueError(f"{len(names)} names for {curves.shape[2]} curves.")
    rows = []
    n_prompts, _, k = curves.shape

    def on_grid(lo: float, hi: float) -> bool:
        return bool(np.log10(lo) >= log_grid[0] - 1e-12 and np.log10(hi) <= log_grid[-1] + 1e-12)

    # a band the grid does not reach has no value (n = 0) rather than an error
    missing = np.full((n_prompts, k), np.nan)
    pieces = [
        (band, lo, hi, band_average(log_grid, curves, (lo, hi)) if on_grid(lo, hi) else missing)
        for band, (lo, hi) in (bands or PHASE_BANDS).items()
    ]
    core = point_value(log_grid, curves, core_size) if on_grid(core_size, core_size) else missing
    pieces.append(("minimal_core", core_size, core_size, core))
    for band, lo, hi, per_prompt in pieces:
        for c, name in enumerate(names):
            ci = mean_ci(per_prompt[:, c])
            rows.append(
                {"band": band, "lo": lo, "hi": hi, "quantity": name, "mean": ci["mean"],
                 "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "n": int(ci["n"])}
            )  # fmt: skip
    return pd.DataFrame(rows)
