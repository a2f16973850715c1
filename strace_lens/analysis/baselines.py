"""Baselines drawn next to a trace: the inverse subgraph and random subgraphs of equal size.

The inverse curve comes from the same trace (``inv_*`` metrics: the subgraph's nodes ablated,
every other candidate kept). The random curve comes from ``trace(..., method="random")`` on
the same prompts and sizes (its metrics are already averaged over its draws). A good trace
lies far below random at every size, and its inverse far above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from strace_lens.analysis._stats import DEFAULT_BOOT, mean_ci
from strace_lens.analysis.density import density, density_curve, log_sizes
from strace_lens.result import TraceResult


def baselines(
    result: TraceResult,
    random: TraceResult | None = None,
    metric: str = "tv",
    log_grid: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Long table of curves on one log grid: ``curve`` in ``trace``, ``inverse`` (when the
    trace has ``inv_<metric>``), ``random`` and ``random_inverse`` (when ``random`` is given),
    each with the columns of :func:`density_curve`."""
    if log_grid is None:
        x, _ = log_sizes(result)
        log_grid = np.linspace(x[0], x[-1], 50)
    frames = [density_curve(result, metric, log_grid).assign(curve="trace")]
    if f"inv_{metric}" in result.metrics:
        frames.append(density_curve(result, f"inv_{metric}", log_grid).assign(curve="inverse"))
    if random is not None:
        _check_same_prompts(result, random)
        frames.append(density_curve(random, metric, log_grid).assign(curve="random"))
        if f"inv_{metric}" in random.metrics:
            frames.append(
                density_curve(random, f"inv_{metric}", log_grid).assign(curve="random_inverse")
            )
    return pd.concat(frames, ignore_index=True)


def baseline_gap(
    result: TraceResult,
    random: TraceResult,
    metric: str = "tv",
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """How much denser random subgraphs make each prompt look than the trace does.

    One line: mean over prompts of density(random) - density(trace) (positive: the trace
    reproduces the output with fewer nodes), its bootstrap interval and p-value, the mean
    densities, and the fraction of prompts where the trace wins.
    """
    _check_same_prompts(result, random)
    d_trace = density(result, metric)["density"].to_numpy()
    d_random = density(random, metric)["density"].to_numpy()
    gap = d_random - d_trace
    stats = mean_ci(gap, n_boot, ci, seed)
    return pd.DataFrame(
        [
            {
                "trace_density": float(d_trace.mean()),
                "random_density": float(d_random.mean()),
                "gap": stats["mean"],
                "ci_low": stats["ci_low"],
                "ci_high": stats["ci_high"],
                "p_value": stats["p_value"],
                "frac_trace_better": float((gap > 0).mean()),
                "n": int(stats["n"]),
                "ci": ci,
            }
        ]
    )


def _check_same_prompts(a: TraceResult, b: TraceResult) -> None:
    if a.prompts != b.prompts or not np.array_equal(a.sizes.numpy(), b.sizes.numpy()):
        raise ValueError(
            "The baseline was traced on other prompts or sizes than the result: trace both "
            "with the same prompts and sizes (e.g. trace(model, prompts, sizes, "
            "method='random'))."
        )
