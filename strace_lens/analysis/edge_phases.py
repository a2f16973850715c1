"""The phase claims' quantities of edge subgraphs, per prompt, in edges and in components.

For each prompt and traced size, from the subgraph's kept edges (:data:`PHASE_QUANTITIES`):

- in edges: ``edge_q1_share`` (share of edges whose target block lies in the first quartile,
  split as :func:`strace_lens.analysis.edge_composition.block_quartiles` splits them),
  ``edge_attn_share`` (attention edges over all kept edges) and ``edge_mean_depth`` (mean
  relative depth l / (L - 1) of the edges' target blocks);
- in components (the node projection, :func:`strace_lens.edges.project`: a head or MLP is
  touched when one of its edges is kept): ``component_share`` (touched over the model's
  L (H + 1)), ``component_head_share`` (heads over touched components) and
  ``component_mean_depth`` (mean relative depth of the touched components);
- per kind (1b's control: a kind against its own layer spread): ``attn_edge_q1_share`` and
  ``mlp_edge_q1_share`` (first-quartile share among the attention / MLP edges kept),
  ``head_mean_depth`` and ``mlp_mean_depth`` (mean depth of the touched heads / MLPs); NaN
  where the subgraph holds none of that kind.

Each prompt's curves go on the common log grid (:mod:`strace_lens.analysis._edge_grid`) and
are read in the paper's bands and at its minimal core (:mod:`strace_lens.analysis.edge_bands`).
Two reference values per prompt, computed exactly (no grid):

- ``full``: the whole graph (every edge; every component), the base rate a band is read
  against (e.g. the first quartile's share of all edges);
- ``outside_core``: what the minimal core leaves for the refinement to draw from: the edges
  outside the prompt's *core subgraph* (its traced subgraph at the largest grid size up to
  the core size, 1e-3) and the components that subgraph does not touch.

:func:`edge_core_sizes` gives claim 1a's per-prompt core: the smallest traced subgraph whose
top-1 token is the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.analysis._edge_grid import Along, check_log_grid, on_common_grid
from strace_lens.analysis._stats import mean_ci
from strace_lens.analysis.edge_bands import (
    CONSTRUCTION_BAND,
    MINIMAL_CORE_SIZE,
    REFINEMENT_BAND,
    band_average,
    band_summary,
    point_value,
)
from strace_lens.analysis.edge_composition import block_quartiles
from strace_lens.edges.components import project
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.result import EdgeTraceResult

PHASE_QUANTITIES = (
    "edge_q1_share",
    "edge_attn_share",
    "edge_mean_depth",
    "component_share",
    "component_head_share",
    "component_mean_depth",
    "attn_edge_q1_share",
    "mlp_edge_q1_share",
    "head_mean_depth",
    "mlp_mean_depth",
)


def _depths(n_layers: int) -> Tensor:
    """Relative depth of each block: 0 for the first, 1 for the last."""
    return torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)


def subgraph_quantities(
    graph: EdgeGraph,
    edges: Int[Tensor, " k"],
    heads: Bool[Tensor, "layer head"],
    mlps: Bool[Tensor, " layer"],
) -> Float[np.ndarray, " quantity"]:
    """:data:`PHASE_QUANTITIES` of a set of edges (compact ids) and of a set of components
    (heads ``[L, H]``, MLPs ``[L]``); NaN for what an empty set leaves undefined."""
    f = graph.edge_fields
    depth = _depths(graph.n_layers)
    out = np.full(len(PHASE_QUANTITIES), np.nan)
    if len(edges):
        layer, kind = f["layer"][edges], f["kind"][edges]
        first = torch.from_numpy(block_quartiles(graph.n_layers))[layer] == 0
        out[0] = float(first.double().mean())
        out[1] = float((kind == 0).double().mean())
        out[2] = float(depth[layer].mean())
        for column, code in ((6, 0), (7, 2)):  # attention, MLP edges
            of_kind = kind == code
            if of_kind.any():
                out[column] = float(first[of_kind].double().mean())
    n_heads, n_mlps = heads.sum(1).double(), mlps.double()  # touched per block
    n_touched = float(n_heads.sum() + n_mlps.sum())
    out[3] = n_touched / (graph.n_layers * (graph.n_heads + 1))
    if n_touched > 0:
        out[4] = float(n_heads.sum()) / n_touched
        out[5] = float(((n_heads + n_mlps) * depth).sum()) / n_touched
    for column, count in ((8, n_heads), (9, n_mlps)):
        if count.sum() > 0:
            out[column] = float((count * depth).sum() / count.sum())
    return out


def core_index(result: EdgeTraceResult, prompt: int, core_size: float = MINIMAL_CORE_SIZE) -> int:
    """Grid index of the prompt's core subgraph: the largest grid size up to ``core_size``
    (-1 when every grid size is larger)."""
    below = [i for i, s in enumerate(result.grid) if s <= core_size * (1 + 1e-9)]
    return below[-1] if below else -1


def phase_values(
    result: EdgeTraceResult, core_size: float = MINIMAL_CORE_SIZE
) -> tuple[
    Float[np.ndarray, "prompt size quantity"],
    Float[np.ndarray, "prompt quantity"],
    Float[np.ndarray, "prompt quantity"],
]:
    """Per prompt: the quantities of each traced subgraph ``[P, S, K]``, of the whole graph
    ``[P, K]`` and of what the core leaves ``[P, K]`` (module docstring)."""
    n_p, n_s, k = result.n_prompts, len(result.grid), len(PHASE_QUANTITIES)
    values = np.full((n_p, n_s, k), np.nan)
    full = np.full((n_p, k), np.nan)
    outside = np.full((n_p, k), np.nan)
    for p in range(n_p):
        graph = result.graph(p)
        for i in range(n_s):
            ids = result.subgraph(p, i)
            comp = project(graph, ids)
            values[p, i] = subgraph_quantities(graph, ids, comp.heads.any(-1), comp.mlps.any(-1))
        every = torch.arange(graph.n_edges)
        all_heads = torch.ones(graph.n_layers, graph.n_heads, dtype=torch.bool)
        all_mlps = torch.ones(graph.n_layers, dtype=torch.bool)
        full[p] = subgraph_quantities(graph, every, all_heads, all_mlps)
        c = core_index(result, p, core_size)
        core = result.subgraph(p, c) if c >= 0 else every[:0]
        rest = torch.ones(graph.n_edges, dtype=torch.bool)
        rest[core] = False
        comp = project(graph, core)
        outside[p] = subgraph_quantities(
            graph, torch.nonzero(rest).flatten(), ~comp.heads.any(-1), ~comp.mlps.any(-1)
        )
    return values, full, outside


@dataclass
class EdgePhases:
    """:data:`PHASE_QUANTITIES` of each prompt on a common log grid, and its references."""

    log_grid: Float[np.ndarray, " grid"]
    #: each prompt's curves, NaN outside its traced range
    curves: Float[np.ndarray, "prompt grid quantity"]
    #: the whole graph's value per prompt
    full: Float[np.ndarray, "prompt quantity"]
    #: the value of what the core subgraph leaves, per prompt
    outside_core: Float[np.ndarray, "prompt quantity"]
    core_size: float

    def bands(self) -> pd.DataFrame:
        """Per band (construction, refinement, minimal_core; then ``full`` and
        ``outside_core``) and quantity: mean over prompts, 95 % interval, n (columns of
        :func:`strace_lens.analysis.band_summary`)."""
        frame = band_summary(self.log_grid, self.curves, PHASE_QUANTITIES, core_size=self.core_size)
        rows = []
        for band, values in (("full", self.full), ("outside_core", self.outside_core)):
            for q, name in enumerate(PHASE_QUANTITIES):
                stats = mean_ci(values[:, q])
                rows.append(
                    {"band": band, "lo": np.nan, "hi": np.nan, "quantity": name,
                     "mean": stats["mean"], "ci_low": stats["ci_low"],
                     "ci_high": stats["ci_high"], "n": int(stats["n"])}
                )  # fmt: skip
        return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)

    def per_prompt(self) -> pd.DataFrame:
        """One row per (prompt, quantity): ``construction``, ``refinement``,
        ``minimal_core``, ``full`` and ``outside_core`` (NaN where a prompt's curve does not
        cover a band)."""
        construction = band_average(self.log_grid, self.curves, CONSTRUCTION_BAND)
        refinement = band_average(self.log_grid, self.curves, REFINEMENT_BAND)
        core = point_value(self.log_grid, self.curves, self.core_size)
        n_p = self.curves.shape[0]
        frames = [
            pd.DataFrame(
                {
                    "prompt": np.arange(n_p),
                    "quantity": name,
                    "construction": construction[:, q],
                    "refinement": refinement[:, q],
                    "minimal_core": core[:, q],
                    "full": self.full[:, q],
                    "outside_core": self.outside_core[:, q],
                }
            )
            for q, name in enumerate(PHASE_QUANTITIES)
        ]
        return pd.concat(frames, ignore_index=True)


def edge_phases(
    result: EdgeTraceResult,
    log_grid: Float[np.ndarray, " grid"] | None = None,
    core_size: float = MINIMAL_CORE_SIZE,
    along: Along = "log10",
) -> EdgePhases:
    """The phase quantities of a nested edge family (module docstring), on ``log_grid``
    (default: 1e-5 .. 1, 30 points per decade)."""
    grid = check_log_grid(log_grid)
    values, full, outside = phase_values(result, core_size)
    relative = result.relative_sizes().numpy()
    return EdgePhases(grid, on_common_grid(relative, values, grid, along), full, outside, core_size)


def edge_core_sizes(result: EdgeTraceResult) -> pd.DataFrame:
    """Per prompt: the smallest traced non-empty subgraph whose top-1 token is the full
    model's (claim 1a's core).

    Columns: ``prompt``, ``reached``, ``size`` (grid s; NaN if never), ``n_edges``,
    ``relative_size`` (int(s E) / E; +inf when never reached), ``lower_relative_size`` (the
    grid brackets the core: one edge above the largest smaller traced subgraph, (k + 1) / E;
    for an unreached core, one edge above the largest traced one), ``components`` and
    ``component_share`` (heads and MLPs the core touches, over L (H + 1); +inf if none).
    """
    relative = result.relative_sizes().numpy()
    n_components = result.n_layers * (result.n_heads + 1)
    rows = []
    for p in range(result.n_prompts):
        counts = result.counts[p].tolist()
        total = result.n_edges(p)
        agree = [
            i for i in range(len(result.grid))
            if counts[i] > 0 and float(result.metrics["top1"][p, i]) > 0.5
        ]  # fmt: skip
        if agree:
            i = agree[0]
            smaller = [c for c in counts if c < counts[i]]
            comps = project(result.graph(p), result.subgraph(p, i)).counts()["components"]
            rows.append(
                {"prompt": p, "reached": True, "size": result.grid[i], "n_edges": counts[i],
                 "relative_size": float(relative[p, i]),
                 "lower_relative_size": (max(smaller, default=0) + 1) / total,
                 "components": comps, "component_share": comps / n_components}
            )  # fmt: skip
        else:
            rows.append(
                {"prompt": p, "reached": False, "size": np.nan, "n_edges": 0,
                 "relative_size": np.inf, "lower_relative_size": (max(counts) + 1) / total,
                 "components": -1, "component_share": np.inf}
            )  # fmt: skip
    return pd.DataFrame(rows)


__all__ = [
    "PHASE_QUANTITIES",
    "EdgePhases",
    "core_index",
    "edge_core_sizes",
    "edge_phases",
    "phase_values",
    "subgraph_quantities",
]
