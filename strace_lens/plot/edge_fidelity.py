"""Fidelity of edge subgraphs against relative size: TV (median and interquartile range over
prompts, top panel) and the share of prompts whose subgraph keeps the full model's top-1 token
(bottom panel), with the paper's phase bands shaded.

x is the paper's relative size s (its grid); each prompt's subgraph holds ``int(s * E_p)``
edges, so a prompt's true relative size lies just below s. Grid sizes at which some prompt's
subgraph is empty are drawn too (their TV is the empty graph's). Several results (a dict) are
drawn side by side in one panel pair, e.g. ``{"ablated": r1, "kept": r2}`` or the greedy beside
the random baseline (dashed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from strace_lens.analysis import edge_bands as bands
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.plot.style import (
    COLORWAY,
    CORE_BAND,
    REFINEMENT_BAND,
    TEMPLATE,
    log_ticks,
)

EdgeResultSet = EdgeTraceResult | Mapping[str, EdgeTraceResult]


def edge_label(result: EdgeTraceResult) -> str:
    """``greedy, attention edges ablated`` and the like, from the result's options."""
    method = result.options.get("method", "?")
    kept = result.options.get("ablate_attention_edges") is False
    return f"{method}, attention edges {'kept' if kept else 'ablated'}"


def as_edge_pairs(results: EdgeResultSet) -> list[tuple[str, EdgeTraceResult]]:
    """``(label, result)`` pairs from one result or a ``{label: result}`` dict."""
    if isinstance(results, EdgeTraceResult):
        return [(edge_label(results), results)]
    pairs = list(results.items())
    if not pairs:
        raise ValueError("No results to plot: pass an EdgeTraceResult or a dict of them.")
    for name, r in pairs:
        if not isinstance(r, EdgeTraceResult):
            raise TypeError(f"{name!r} is a {type(r).__name__}, not an EdgeTraceResult.")
    return [(str(name), r) for name, r in pairs]


def _fill(colour: str, alpha: float) -> str:
    h = colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def edge_fidelity(results: EdgeResultSet) -> go.Figure:
    """Median TV with its interquartile band (top) and top-1 agreement (bottom) per grid size."""
    pairs = as_edge_pairs(results)
    fig = fidelity_panels()
    x_lo = 1.0
    for i, (name, r) in enumerate(pairs):
        x = np.asarray(r.grid, dtype=float)
        x_lo = min(x_lo, float(x.min()))
        add_fidelity_lines(
            fig,
            x,
            r.metrics["tv"].double().numpy(),
            r.metrics["top1"].double().numpy(),
            name,
            COLORWAY[i % len(COLORWAY)],
            dash="dash" if r.options.get("method") == "random" else "solid",
            x_name="s",
        )
    for (x0, x1), fill in ((bands.CONSTRUCTION_BAND, CORE_BAND),
                           (bands.REFINEMENT_BAND, REFINEMENT_BAND)):  # fmt: skip
        fig.add_vrect(x0=x0, x1=x1, fillcolor=fill, line_width=0, layer="below",
                      row="all", col=1)  # fmt: skip
    n = max(r.n_prompts for _, r in pairs)
    fidelity_layout(
        fig,
        x_lo,
        "relative size s (fraction of edges kept, log)",
        "Edge subgraph fidelity versus size",
        f"median TV and interquartile range over {n} prompt(s); bands: "
        "construction 1e-4–1e-2, refinement 1e-2–1",
    )
    return fig


def fidelity_panels() -> go.Figure:
    """The two panels of a fidelity figure: TV (top) over top-1 agreement (bottom)."""
    return make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                         row_heights=[0.62, 0.38])  # fmt: skip


def add_fidelity_lines(
    fig: go.Figure,
    x: np.ndarray,
    tv: np.ndarray,
    top1: np.ndarray,
    name: str,
    colour: str,
    dash: str = "solid",
    x_name: str = "relative size",
) -> None:
    """One result on the panels: the median over prompts of ``tv`` ([prompt, size]) with its
    interquartile band (top), and the percentage of prompts whose ``top1`` is 1 (bottom)."""
    q1, median, q3 = np.percentile(tv, [25, 50, 75], axis=0)
    kept = 100 * top1.mean(0)
    fig.add_trace(go.Scatter(
        x=np.concatenate([x, x[::-1]]), y=np.concatenate([q3, q1[::-1]]), mode="lines",
        fill="toself", fillcolor=_fill(colour, 0.15), line=dict(width=0), hoverinfo="skip",
        legendgroup=name, showlegend=False,
    ), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(
        x=x, y=median, mode="lines+markers", name=name, legendgroup=name,
        line=dict(color=colour, dash=dash), marker=dict(size=4),
        customdata=np.stack([q1, q3], axis=1),
        hovertemplate=f"{name}<br>{x_name} = %{{x:.3g}}<br>median TV %{{y:.3f}}"
        "<br>IQR %{customdata[0]:.3f}–%{customdata[1]:.3f}<extra></extra>",
    ), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(
        x=x, y=kept, mode="lines+markers", name=name, legendgroup=name, showlegend=False,
        line=dict(color=colour, dash=dash), marker=dict(size=4),
        hovertemplate=f"{name}<br>{x_name} = %{{x:.3g}}<br>top-1 kept %{{y:.0f}} %"
        "<extra></extra>",
    ), row=2, col=1)  # fmt: skip


def fidelity_layout(fig: go.Figure, x_lo: float, x_title: str, title: str, subtitle: str) -> None:
    """The axes (log x from ``x_lo`` to 1), titles and legend of a fidelity figure."""
    ticks = log_ticks(x_lo, 1.0)
    fig.update_xaxes(type="log", tickvals=ticks[0], ticktext=ticks[1],
                     range=[math.log10(x_lo), 0])  # fmt: skip
    fig.update_xaxes(title_text=x_title, row=2, col=1)
    fig.update_yaxes(title_text="TV to full model", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="top-1 kept (% of prompts)", range=[0, 100], row=2, col=1)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, subtitle=dict(text=subtitle)),
        legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom"),
        margin=dict(t=100, b=110),
    )
