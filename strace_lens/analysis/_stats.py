"""Rank correlation and paired differences with percentile-bootstrap confidence intervals.

Every interval here is a percentile bootstrap over prompts (resampled with replacement,
``n_boot`` times, from a seeded generator so a report is reproducible). Resamples whose
statistic is undefined (e.g. a constant resample for a correlation) are left out of the
percentiles. P-values: for Spearman, SciPy's t-distribution approximation (``spearmanr``);
for a paired mean difference, the two-sided one-sample t-test against 0 (``ttest_1samp``),
alongside the bootstrap interval, which does not assume normality.

Partial Spearman correlation (:func:`partial_spearman_ci`): the Pearson correlation of the
ranks of x and y after each is regressed (least squares, with an intercept) on the ranks of
the control variables; with one control this equals the textbook formula
(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2) (1 - r_yz^2)) on Spearman rhos. Its p-value is the
two-sided t-test with n - 2 - k degrees of freedom (k controls); its interval, the
percentile bootstrap over prompts (ranks recomputed in every resample). Multiplicity:
:func:`holm` (Holm-Bonferroni step-down adjusted p-values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

DEFAULT_BOOT = 2000


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of ``x``, ``y`` ``[B, n]`` (NaN for constant rows)."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx = rx - rx.mean(1, keepdims=True)
    ry = ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman_ci(
    x: Any, y: Any, n_boot: int = DEFAULT_BOOT, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Spearman rho of paired samples, its bootstrap interval and p-value.

    Pairs where either value is NaN or infinite are dropped first; ``n`` is what is left.
    Returns ``{"rho", "ci_low", "ci_high", "p_value", "n"}`` (NaN when n < 3 or a side is
    constant).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    out = {"rho": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": float(n)}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    res = stats.spearmanr(x, y)
    out["rho"] = float(res.statistic)
    out["p_value"] = float(res.pvalue)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    rhos = _spearman_rows(x[idx], y[idx])
    rhos = rhos[np.isfinite(rhos)]
    if len(rhos):
        alpha = (1.0 - ci) / 2
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(rhos, [alpha, 1 - alpha]))
    return out


def _partial_rank_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Partial Spearman rho of each resample: ``x``, ``y`` ``[B, n]``, controls ``[B, n, k]``.

    NaN where x or y is (up to rounding) a linear function of the controls' ranks.
    """
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rz = stats.rankdata(z, axis=1)
    design = np.concatenate([np.ones((*x.shape, 1)), rz], axis=2)  # [B, n, k + 1]
    pinv = np.linalg.pinv(design)  # [B, k + 1, n]; least squares even for collinear controls
    ex = rx - np.einsum("bik,bk->bi", design, np.einsum("bki,bi->bk", pinv, rx))
    ey = ry - np.einsum("bik,bk->bi", design, np.einsum("bki,bi->bk", pinv, ry))
    sx, sy = (ex**2).sum(1), (ey**2).sum(1)
    # residual variance lost to rounding: relative to the ranks' own spread
    spread = ((rx - rx.mean(1, keepdims=True)) ** 2).sum(1)
    spread_y = ((ry - ry.mean(1, keepdims=True)) ** 2).sum(1)
    ok = (sx > 1e-10 * np.maximum(spread, 1.0)) & (sy > 1e-10 * np.maximum(spread_y, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ex * ey).sum(1) / np.sqrt(np.where(ok, sx * sy, 1.0))
    return np.where(ok, np.clip(rho, -1.0, 1.0), np.nan)


def partial_spearman_ci(
    x: Any, y: Any, controls: Any, n_boot: int = DEFAULT_BOOT, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Spearman correlation of ``x`` and ``y`` with the ``controls`` partialled out.

    ``controls``: one array ``[n]`` or several ``[n, k]``. Rows where any value is NaN or
    infinite are dropped first; ``n`` is what is left. Method (module docstring): ranks, the
    residuals of x's and y's ranks after least squares on the controls' ranks (with an
    intercept), their Pearson correlation; p-value from t = r sqrt(df / (1 - r^2)) with
    df = n - 2 - k, two-sided; interval: percentile bootstrap over rows, ranks recomputed per
    resample. Returns ``{"rho", "ci_low", "ci_high", "p_value", "n"}`` (NaN when undefined).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    z = np.asarray(controls, dtype=float)
    z = z[:, None] if z.ndim == 1 else z
    if z.shape[0] != len(x) or len(x) != len(y):
        raise ValueError(
            f"x, y and controls need one value per row: got {len(x)}, {len(y)} and "
            f"{z.shape[0]} rows."
        )
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(z).all(1)
    x, y, z = x[keep], y[keep], z[keep]
    n, k = len(x), z.shape[1]
    out = {"rho": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": float(n)}
    df = n - 2 - k
    if df < 1:
        return out
    rho = float(_partial_rank_rows(x[None], y[None], z[None])[0])
    if not np.isfinite(rho):
        return out
    out["rho"] = rho
    if abs(rho) >= 1.0:
        out["p_value"] = 0.0
    else:
        t = rho * np.sqrt(df / (1.0 - rho**2))
        out["p_value"] = float(2.0 * stats.t.sf(abs(t), df))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    rhos = _partial_rank_rows(x[idx], y[idx], z[idx])
    rhos = rhos[np.isfinite(rhos)]
    if len(rhos):
        alpha = (1.0 - ci) / 2
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(rhos, [alpha, 1 - alpha]))
    return out


def holm(p_values: Any) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and are not counted).

    With the m finite p-values sorted p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where it is below alpha controls
    the family-wise error rate at alpha.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def mean_ci(
    values: Any, n_boot: int = DEFAULT_BOOT, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of ``values`` (NaNs dropped), its bootstrap interval, and the t-test p-value vs 0.

    Used for paired per-prompt differences (e.g. refinement minus core attention share).
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    out = {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": float(n)}
    if n == 0:
        return out
    out["mean"] = float(v.mean())
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(1)
    alpha = (1.0 - ci) / 2
    out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(means, [alpha, 1 - alpha]))
    if np.ptp(v) > 0:
        out["p_value"] = float(stats.ttest_1samp(v, 0.0).pvalue)
    else:
        out["p_value"] = 0.0 if v[0] != 0 else 1.0
    return out


def gini(values: Any) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n-1)/n when one holds all.

    With values sorted ascending x_1 <= ... <= x_n: G = 2 sum_i i x_i / (n sum x) - (n+1)/n.
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    total = x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(2.0 * (i * x).sum() / (n * total) - (n + 1.0) / n)


def lorenz_points(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve: cumulative share of items (x) vs cumulative share of the total (y).

    Items sorted by increasing value; both arrays start at 0 and end at 1 (n + 1 points).
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    total = x.sum()
    share_items = np.arange(n + 1) / max(n, 1)
    cum = np.concatenate([[0.0], np.cumsum(x)])
    share_total = cum / total if total > 0 else np.full(n + 1, np.nan)
    return share_items, share_total


def median_ci(
    values: Any, n_boot: int = DEFAULT_BOOT, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Median and its bootstrap interval, with +inf allowed (a censored value, e.g. a prompt
    that never reaches a target within the grid): every median is an order statistic
    (inverted CDF), so it is +inf exactly when at least half the sample is. NaNs are dropped.
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    out = {"median": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": float(n)}
    if n == 0:
        return out
    out["median"] = float(np.quantile(v, 0.5, method="inverted_cdf"))
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    boots = np.quantile(v[rng.integers(0, n, size=(n_boot, n))], 0.5, axis=1, method="inverted_cdf")
    alpha = (1.0 - ci) / 2
    out["ci_low"], out["ci_high"] = (
        float(q) for q in np.quantile(boots, [alpha, 1 - alpha], method="inverted_cdf")
    )
    return out
