"""Nucleus recovery: how large a subgraph must be before it shares the full model's top-k % nucleus.

For each prompt and level k, the recovery size is the smallest traced relative size whose
shared nucleus is at least k (the first one on the grid, even if a larger subgraph later
loses it again). A prompt that never reaches k on the grid has no recovery size: it is kept,
as +inf ("beyond the largest traced size"), so the median and quartiles are order statistics
of all prompts, and ``n_unreached`` says how many were censored. A quantile that lands on an
unreached prompt is +inf, i.e. "larger than the grid", never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from strace_lens.analysis._common import to_numpy
from strace_lens.result import TraceResult

#: The recovery levels of the paper, in percent.
RECOVERY_LEVELS: tuple[int, ...] = (1, 5, 10, 20, 40, 60, 80, 90)


def recovery_sizes(result: TraceResult, levels: Sequence[float] = RECOVERY_LEVELS) -> pd.DataFrame:
    """Per (prompt, level): the smallest size reaching that shared nucleus (inf if none)."""
    order = result.size_order()
    rel = to_numpy(result.relative_sizes[order])
    sizes = result.sizes[order].numpy()
    nucleus = to_numpy(result.metrics["nucleus"])[:, order.numpy()]
    rows = []
    for k in levels:
        hit = nucleus >= k
        reached = hit.any(1)
        first = hit.argmax(1)
        rows.append(
            pd.DataFrame(
                {
                    "prompt": np.arange(result.n_prompts),
                    "level": k,
                    "reached": reached,
                    "size": np.where(reached, sizes[first], np.inf),
                    "relative_size": np.where(reached, rel[first], np.inf),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def _order_stat(values: np.ndarray, q: float) -> float:
    """Quantile that is always one of the values (inverted CDF), so +inf stays +inf."""
    return float(np.quantile(values, q, method="inverted_cdf"))


def nucleus_recovery(
    result: TraceResult, levels: Sequence[float] = RECOVERY_LEVELS
) -> pd.DataFrame:
    """Per level k: median and inter-quartile range over prompts of the recovery size.

    Columns: ``level``, ``median``, ``q25``, ``q75`` (relative sizes; +inf = beyond the grid),
    ``median_size`` (node count), ``n_reached``, ``n_unreached``, ``frac_reached``,
    ``max_relative_size`` (the largest traced size, for reading the +inf entries).
    """
    per_prompt = recovery_sizes(result, levels)
    rel_max = float(result.relative_sizes.max())
    n_cand = max(result.n_candidates, 1)
    rows = []
    for k in levels:
        sel = per_prompt[per_prompt["level"] == k]
        values = sel["relative_size"].to_numpy()
        median = _order_stat(values, 0.5)
        rows.append(
            {
                "level": k,
                "median": median,
                "q25": _order_stat(values, 0.25),
                "q75": _order_stat(values, 0.75),
                "median_size": median * n_cand,
                "n_reached": int(sel["reached"].sum()),
                "n_unreached": int((~sel["reached"]).sum()),
                "frac_reached": float(sel["reached"].mean()),
                "max_relative_size": rel_max,
                "method": result.method,
            }
        )
    return pd.DataFrame(rows)
