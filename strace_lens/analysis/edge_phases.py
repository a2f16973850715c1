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
An edge share is averaged over a band as it is (the paper's composition); a component
quantity is a ratio of band averages of counts and depth sums (:data:`RAW_QUANTITIES`, e.g.
the head share of a band is its mean head count over its mean component count), so that it is
defined wherever the band touches any component: the smallest subgraphs often hold residual
edges only, which touch none.
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
    PHASE_BANDS,
    REFINEMENT_BAND,
    band_average,
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
#: what is interpolated and averaged over a band: edge shares as they are, components as
#: counts and depth sums (a ratio of band means, defined wherever the band touches any)
RAW_QUANTITIES = (
    "edge_q1_share",
    "edge_attn_share",
    "edge_mean_depth",
    "attn_edge_q1_share",
    "mlp_edge_q1_share",
    "heads",
    "mlps",
    "head_depth_sum",
    "mlp_depth_sum",
)


def _depths(n_layers: int) -> Tensor:
    """Relative depth of each block: 0 for the first, 1 for the last."""
    return torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)


def subgraph_quantities(
    graph: EdgeGraph,
    edges: Int[Tensor, " k"],
    heads: Bool[Tensor, "layer head"],
    mlps: Bool[Tensor, " layer"],
) -> Float[np.ndarray, " raw"]:
    """:data:`RAW_QUANTITIES` of a set of edges (compact ids) and of a set of components
    (heads ``[L, H]``, MLPs ``[L]``); an edge share is NaN when no edge defines it."""
    f = graph.edge_fields
    depth = _depths(graph.n_layers)
    out = np.full(len(RAW_QUANTITIES), np.nan)
    if len(edges):
        layer, kind = f["layer"][edges], f["kind"][edges]
        first = torch.from_numpy(block_quartiles(graph.n_layers))[layer] == 0
        out[0] = float(first.double().mean())
        out[1] = float((kind == 0).double().mean())
        out[2] = float(depth[layer].mean())
        for column, code in ((3, 0), (4, 2)):  # attention, MLP edges
            of_kind = kind == code
            if of_kind.any():
                out[column] = float(first[of_kind].double().mean())
    n_heads, n_mlps = heads.sum(1).double(), mlps.double()  # touched per block
    out[5], out[6] = float(n_heads.sum()), float(n_mlps.sum())
    out[7], out[8] = float((n_heads * depth).sum()), float((n_mlps * depth).sum())
    return out


def derive(
    raw: Float[np.ndarray, "*batch raw"], n_components: int
) -> Float[np.ndarray, "*batch quantity"]:
    """:data:`PHASE_QUANTITIES` from :data:`RAW_QUANTITIES` (read in a band, or of one set):
    the edge shares as they are, the component ones as ratios of counts and depth sums (NaN
    where no component of the kind is touched)."""
    e_q1, e_attn, e_depth, a_q1, m_q1, heads, mlps, h_depth, m_depth = np.moveaxis(raw, -1, 0)
    touched = heads + mlps

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    return np.stack(
        [e_q1, e_attn, e_depth, touched / n_components, ratio(heads, touched),
         ratio(h_depth + m_depth, touched), a_q1, m_q1, ratio(h_depth, heads),
         ratio(m_depth, mlps)],
        axis=-1,
    )  # fmt: skip


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
    """Per prompt: the :data:`RAW_QUANTITIES` of each traced subgraph ``[P, S, R]``, of the
    whole graph ``[P, R]`` and of what the core leaves ``[P, R]`` (module docstring)."""
    n_p, n_s, k = result.n_prompts, len(result.grid), len(RAW_QUANTITIES)
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
    """:data:`RAW_QUANTITIES` of each prompt on a common log grid, and its references; read
    as :data:`PHASE_QUANTITIES` by :meth:`per_prompt` and :meth:`bands`."""

    log_grid: Float[np.ndarray, " grid"]
    #: each prompt's raw curves, NaN outside its traced range
    curves: Float[np.ndarray, "prompt grid raw"]
    #: the whole graph's raw values per prompt
    full: Float[np.ndarray, "prompt raw"]
    #: the raw values of what the core subgraph leaves, per prompt
    outside_core: Float[np.ndarray, "prompt raw"]
    core_size: float
    #: heads and MLPs of the model, L (H + 1)
    n_components: int

    def per_band(self) -> dict[str, np.ndarray]:
        """Each prompt's :data:`PHASE_QUANTITIES` ``[P, K]`` per band name."""
        raw = {
            "construction": band_average(self.log_grid, self.curves, CONSTRUCTION_BAND),
            "refinement": band_average(self.log_grid, self.curves, REFINEMENT_BAND),
            "minimal_core": point_value(self.log_grid, self.curves, self.core_size),
            "full": self.full,
            "outside_core": self.outside_core,
        }
        return {band: derive(values, self.n_components) for band, values in raw.items()}

    def per_prompt(self) -> pd.DataFrame:
        """One row per (prompt, quantity): ``construction``, ``refinement``,
        ``minimal_core``, ``full`` and ``outside_core`` (NaN where a prompt's curve does not
        cover a band, or the band touches no component the quantity needs)."""
        bands = self.per_band()
        n_p = self.curves.shape[0]
        frames = [
            pd.DataFrame(
                {"prompt": np.arange(n_p), "quantity": name,
                 **{band: values[:, q] for band, values in bands.items()}}
            )
            for q, name in enumerate(PHASE_QUANTITIES)
        ]  # fmt: skip
        return pd.concat(frames, ignore_index=True)

    def bands(self) -> pd.DataFrame:
        """Per band (construction, refinement, minimal_core, full, outside_core) and quantity:
        mean over prompts, bootstrap 95 % interval, n (prompts with a value). Columns:
        ``band``, ``lo``, ``hi`` (the band's sizes; NaN for the references), ``quantity``,
        ``mean``, ``ci_low``, ``ci_high``, ``n``."""
        edges = {**PHASE_BANDS, "minimal_core": (self.core_size, self.core_size)}
        rows = []
        for band, values in self.per_band().items():
            lo, hi = edges.get(band, (np.nan, np.nan))
            for q, name in enumerate(PHASE_QUANTITIES):
                stats = mean_ci(values[:, q])
                rows.append(
                    {"band": band, "lo": lo, "hi": hi, "quantity": name, "mean": stats["mean"],
                     "ci_low": stats["ci_low"], "ci_high": stats["ci_high"],
                     "n": int(stats["n"])}
                )  # fmt: skip
        return pd.DataFrame(rows)


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
    curves = on_common_grid(relative, values, grid, along)
    n_components = result.n_layers * (result.n_heads + 1)
    return EdgePhases(grid, curves, full, outside, core_size, n_components)


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
    "RAW_QUANTITIES",
    "EdgePhases",
    "core_index",
    "derive",
    "edge_core_sizes",
    "edge_phases",
    "phase_values",
    "subgraph_quantities",
]
