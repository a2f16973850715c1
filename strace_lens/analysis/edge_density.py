"""Density of edge subgraphs: the area under each prompt's TV curve against log10(s).

Two numbers per prompt, from the same trapezoidal area (the rule of
:mod:`strace_lens.analysis.density`, TV linear in log10 s between points, never
extrapolated):

- ``auc``, in the paper's units: TV x decades over the span integrated, as the released code
  computes it (``np.trapz(tv, log10(sizes))`` over a prompt's traced sizes, the full graph at
  s = 1 included). Its value grows with the span, so prompts or models traced over different
  spans are not comparable by it.
- ``density = auc / span``: the mean TV per decade, in [0, 1], the project's normalised
  density (the node-level :func:`strace_lens.analysis.density`).

Sizes are each prompt's relative sizes ``int(s * E_p) / E_p``. Subgraphs with no edge are
left out (log10 0 is undefined; the released code clips them to 1e-8, which adds at least 3 decades
of TV near 1 to short prompts). With ``log_grid`` every prompt is first interpolated onto
that common grid, and all prompts then share one span (it must lie inside each prompt's
traced range).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float

from strace_lens.analysis._edge_grid import check_log_grid, on_common_grid, traced_points
from strace_lens.edges.result import EdgeTraceResult


def edge_density(
    result: EdgeTraceResult,
    metric: str = "tv",
    log_grid: Float[np.ndarray, " grid"] | None = None,
) -> pd.DataFrame:
    """Per prompt: AUC of ``metric`` against log10(relative size), span and density.

    Columns: ``prompt``, ``text``, ``n_edges`` (E of the prompt's graph), ``smallest_size``
    (the smallest relative size integrated), ``auc`` (metric x decades), ``span``
    (decades), ``density`` (auc / span) and ``entropy`` (the full model's, nats).
    """
    if metric not in result.metrics:
        raise KeyError(
            f"This EdgeTraceResult has no {metric!r} metric (it has {sorted(result.metrics)})."
        )
    relative = result.relative_sizes().numpy()
    values = result.metrics[metric].double().numpy()
    n = result.n_prompts
    auc, span, smallest = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    if log_grid is not None:
        grid = check_log_grid(log_grid)
        on_grid = on_common_grid(relative, values[:, :, None], grid)[:, :, 0]
        if np.isnan(on_grid).any():
            bad = sorted({int(p) for p in np.nonzero(np.isnan(on_grid))[0]})
            raise ValueError(
                f"log_grid spans [{10 ** grid[0]:.3g}, {10 ** grid[-1]:.3g}] in relative size "
                f"but prompts {bad} were not traced over all of it (density never "
                "extrapolates): start the grid at a larger size."
            )
        auc = np.trapezoid(on_grid, grid, axis=1)
        span[:] = grid[-1] - grid[0]
        smallest[:] = 10.0 ** grid[0]
    else:
        for p in range(n):
            x, y = traced_points(relative[p], values[p])
            if len(x) < 2:
                raise ValueError(
                    f"Prompt {p} has {len(x)} non-empty subgraph size(s); density needs two."
                )
            auc[p], span[p], smallest[p] = np.trapezoid(y, x), x[-1] - x[0], 10.0 ** x[0]
    return pd.DataFrame(
        {
            "prompt": np.arange(n),
            "text": result.prompts,
            "n_edges": [result.n_edges(p) for p in range(n)],
            "smallest_size": smallest,
            "auc": auc,
            "span": span,
            "density": auc / span,
            "entropy": result.entropy.double().numpy(),
        }
    )
