"""The node view of edge subgraphs: which components each one touches, per size.

The same subgraphs as :func:`strace_lens.analysis.edge_composition`, counted in components
(:func:`strace_lens.edges.project`): a head (l, h) is touched when one of its attention edges
is kept (at any query position), an MLP l when one of its MLP edges is; residual edges touch
none. Beside the counts, the share of kept edges whose target is the last position (the one
whose next token is predicted), which says how much of a subgraph is spent on moving
information between positions before the prediction.

:func:`projection_bands` reads the counts in the paper's phase bands, so a phase claim can be
stated in edges (:meth:`EdgeComposition.bands`) and in components side by side.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float

from strace_lens.analysis._edge_grid import Along, check_log_grid, on_common_grid
from strace_lens.analysis.edge_bands import MINIMAL_CORE_SIZE, band_summary
from strace_lens.edges.components import project
from strace_lens.edges.result import EdgeTraceResult

#: the per-size quantities :func:`projection_bands` summarises
BAND_QUANTITIES = ("components", "heads", "mlps", "component_share", "last_position_share")


def edge_projection(result: EdgeTraceResult) -> pd.DataFrame:
    """Per prompt and grid size: the subgraph's edges and the components they touch.

    Columns: ``prompt``, ``size`` (the grid's s), ``relative_size`` (int(s E) / E),
    ``n_edges``, ``heads``, ``mlps``, ``components`` (heads + MLPs used at any position),
    ``component_share`` (components over the model's L (H + 1)), ``head_positions``,
    ``mlp_positions`` (token level), ``last_position_share`` (kept edges whose target is the
    last position, over kept edges; NaN for an empty subgraph).
    """
    rows = []
    relative = result.relative_sizes()
    n_components = result.n_layers * (result.n_heads + 1)
    for p in range(result.n_prompts):
        graph = result.graph(p)
        target = graph.edge_fields["target"]
        for i, s in enumerate(result.grid):
            ids = result.subgraph(p, i)
            counts = project(graph, ids).counts()
            last = int((target[ids] == graph.n_pos - 1).sum())
            rows.append(
                {"prompt": p, "size": s, "relative_size": float(relative[p, i]),
                 "n_edges": len(ids), **counts,
                 "component_share": counts["components"] / n_components,
                 "last_position_share": last / len(ids) if len(ids) else np.nan}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    return frame[
        ["prompt", "size", "relative_size", "n_edges", "heads", "mlps", "components",
         "component_share", "head_positions", "mlp_positions", "last_position_share"]
    ]  # fmt: skip


def projection_curves(
    result: EdgeTraceResult,
    log_grid: Float[np.ndarray, " grid"] | None = None,
    along: Along = "log10",
    table: pd.DataFrame | None = None,
) -> tuple[np.ndarray, Float[np.ndarray, "prompt grid quantity"]]:
    """:data:`BAND_QUANTITIES` of each prompt on a common log grid: ``(log_grid, curves)``."""
    grid = check_log_grid(log_grid)
    table = edge_projection(result) if table is None else table
    n_sizes = len(result.grid)
    flat = table[list(BAND_QUANTITIES)].to_numpy(dtype=float)
    values = flat.reshape(result.n_prompts, n_sizes, len(BAND_QUANTITIES))
    relative = table["relative_size"].to_numpy(dtype=float).reshape(result.n_prompts, n_sizes)
    return grid, on_common_grid(relative, values, grid, along)


def projection_bands(
    result: EdgeTraceResult,
    log_grid: Float[np.ndarray, " grid"] | None = None,
    core_size: float = MINIMAL_CORE_SIZE,
    table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """:data:`BAND_QUANTITIES` averaged over the paper's phase bands and at its minimal
    core (columns of :func:`strace_lens.analysis.edge_bands.band_summary`)."""
    grid, curves = projection_curves(result, log_grid, table=table)
    return band_summary(grid, curves, BAND_QUANTITIES, core_size=core_size)
