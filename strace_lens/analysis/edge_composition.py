"""What edge subgraphs are made of, in the paper's units: shares of edges by layer quartile
and by kind, against relative size.

Every kept edge counts once in a kind and once in a layer quartile (read from the released
code's aggregation, ``extract_topology``):

- kind: ``attn`` (``a{l}.h{h}:{j}->{t}``), ``mlp`` (``m{l}:{t}``) or ``resid``, the residual
  skip edges ``r{l}.attn:{t}`` and ``r{l}.mlp:{t}`` as one category of their own;
- quartile of the *target's* block: an edge into graph layer 1 + 2l or 2 + 2l belongs to
  block l, and the L blocks are split as ``numpy.array_split(range(L), 4)`` splits them (the
  first L mod 4 groups one block longer: SmolLM2's 30 blocks give 0-7, 8-15, 16-22, 23-29;
  Gemma-3-270M's 18 give 0-4, 5-9, 10-13, 14-17). The node-level analyses use floor(4 l / L)
  instead (0-7, 8-14, 15-22, 23-29 for 30 blocks), so the two are not mixed.

Shares are counts over the subgraph's edge count, per prompt and grid size; each prompt's
curves are put on a common log grid of relative size (:mod:`strace_lens.analysis._edge_grid`:
151 points from 1e-5 to 1 by default) and averaged over the prompts that cover each point.
The per-prompt array stays available for intervals and for the phase bands
(:func:`EdgeComposition.bands`, :mod:`strace_lens.analysis.edge_bands`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from strace_lens.analysis._edge_grid import Along, check_log_grid, on_common_grid
from strace_lens.analysis.edge_bands import MINIMAL_CORE_SIZE, band_summary
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.result import EdgeTraceResult

QUARTILES = ("q1", "q2", "q3", "q4")
KINDS = ("attn", "mlp", "resid")
#: the share columns, quartiles early to late, then kinds
CATEGORIES = (*QUARTILES, *KINDS)


def block_quartiles(n_layers: int) -> Int[np.ndarray, " layer"]:
    """Quartile (0..3) of each block as the released code splits them (array_split)."""
    quart = np.zeros(n_layers, dtype=np.int64)
    for q, blocks in enumerate(np.array_split(np.arange(n_layers), 4)):
        quart[blocks] = q
    return quart


def quartile_blocks(n_layers: int) -> list[tuple[int, int] | None]:
    """First and last block of each quartile (None for an empty one, when L < 4)."""
    return [
        (int(b[0]), int(b[-1])) if len(b) else None for b in np.array_split(np.arange(n_layers), 4)
    ]


def edge_categories(graph: EdgeGraph) -> Int[torch.Tensor, "edge two"]:
    """Per compact edge: its quartile column (0..3) and its kind column (4 attn, 5 mlp,
    6 resid) in :data:`CATEGORIES`."""
    f = graph.edge_fields
    quart = torch.from_numpy(block_quartiles(graph.n_layers))[f["layer"]]
    kind = torch.tensor([4, 6, 5, 6])[f["kind"]]  # attn, resid_attn, mlp, resid_mlp
    return torch.stack([quart, kind], dim=1)


def edge_shares(
    result: EdgeTraceResult,
) -> tuple[Float[np.ndarray, "prompt size"], Float[np.ndarray, "prompt size category"]]:
    """Each subgraph's relative size and its share of edges in each of :data:`CATEGORIES`.

    Shares are NaN (and the relative size 0) for a subgraph with no edge.
    """
    n_sizes = len(result.grid)
    shares = np.full((result.n_prompts, n_sizes, len(CATEGORIES)), np.nan)
    for p in range(result.n_prompts):
        cats = edge_categories(result.graph(p))
        for i in range(n_sizes):
            ids = result.subgraph(p, i)
            if len(ids) == 0:
                continue
            chosen = cats[ids]
            counts = torch.bincount(chosen.flatten(), minlength=len(CATEGORIES)).double()
            shares[p, i] = (counts / len(ids)).numpy()
    return result.relative_sizes().numpy(), shares


@dataclass
class EdgeComposition:
    """Edge shares of each prompt on a common log grid, and their mean over prompts."""

    #: log10(relative size) of the common grid
    log_grid: Float[np.ndarray, " grid"]
    #: each prompt's shares, NaN outside its traced range
    per_prompt: Float[np.ndarray, "prompt grid category"]
    #: first and last block of each quartile
    quartiles: list[tuple[int, int] | None]
    options: dict[str, Any]

    @property
    def categories(self) -> tuple[str, ...]:
        return CATEGORIES

    @property
    def n(self) -> Int[np.ndarray, " grid"]:
        """How many prompts each grid point averages."""
        return np.isfinite(self.per_prompt[:, :, 0]).sum(0)

    @property
    def mean(self) -> Float[np.ndarray, "grid category"]:
        """Mean over the prompts covering each grid point (NaN where none does)."""
        total = np.nansum(self.per_prompt, axis=0)
        n = self.n[:, None]
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    def quartile_names(self) -> list[str]:
        """``Q1 (blocks 0-7)`` ... for legends."""
        names = []
        for q, span in enumerate(self.quartiles):
            if span is None:
                names.append(f"Q{q + 1} (no block)")
            elif span[0] == span[1]:
                names.append(f"Q{q + 1} (block {span[0]})")
            else:
                names.append(f"Q{q + 1} (blocks {span[0]}–{span[1]})")
        return names

    def table(self) -> pd.DataFrame:
        """Per grid point: ``log10_relative_size``, ``relative_size``, ``n`` and the mean
        ``{category}_share`` of each category (q1..q4 sum to 1, and so do attn/mlp/resid)."""
        frame = pd.DataFrame(
            {
                "log10_relative_size": self.log_grid,
                "relative_size": 10.0**self.log_grid,
                "n": self.n,
            }
        )
        for c, name in enumerate(CATEGORIES):
            frame[f"{name}_share"] = self.mean[:, c]
        return frame

    def bands(self, core_size: float = MINIMAL_CORE_SIZE) -> pd.DataFrame:
        """Each category's share in the paper's phase bands and at its minimal core
        (:func:`strace_lens.analysis.edge_bands.band_summary`; ``quantity`` is
        ``{category}_share``)."""
        names = [f"{c}_share" for c in CATEGORIES]
        return band_summary(self.log_grid, self.per_prompt, names, core_size=core_size)


def edge_composition(
    result: EdgeTraceResult,
    log_grid: Float[np.ndarray, " grid"] | None = None,
    along: Along = "log10",
) -> EdgeComposition:
    """Shares by target-block quartile and by kind, per prompt on a common log grid.

    Args:
        result: an :class:`EdgeTraceResult` (``strace_lens.edges.edge_trace``).
        log_grid: increasing log10 relative sizes (default: 1e-5 .. 1, 30 per decade).
        along: ``"log10"`` (linear in log10 s between traced sizes) or ``"s"`` (linear in
            s, as the released code interpolates).
    """
    grid = check_log_grid(log_grid)
    relative, shares = edge_shares(result)
    return EdgeComposition(
        log_grid=grid,
        per_prompt=on_common_grid(relative, shares, grid, along),
        quartiles=quartile_blocks(result.n_layers),
        options={"along": along, "method": result.options.get("method"),
                 "ablate_attention_edges": result.options.get("ablate_attention_edges")},
    )  # fmt: skip
