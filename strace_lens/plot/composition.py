"""What the subgraphs are made of: layer quartiles and attention versus MLP (paper figures 3
and 4), and how evenly the nodes are used across prompts (figure 5, Lorenz curves).

The shares come from :func:`strace_lens.analysis.composition`, the Lorenz points and Gini
coefficients from :func:`strace_lens.analysis.lorenz`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from strace_lens.analysis import composition as _composition
from strace_lens.analysis import lorenz as _lorenz
from strace_lens.plot._common import Results, as_labelled
from strace_lens.plot.style import ATTN_COLOR, MLP_COLOR, QUARTILE_COLORS, TEMPLATE, log_ticks
from strace_lens.result import TraceResult


def _quartile_names(result: TraceResult) -> list[str]:
    """``Q1 (layers 0-4)`` ...: layer l of L is in quartile floor(4 l / L) + 1."""
    layers = np.arange(result.graph.n_layers)
    quart = (4 * layers) // result.graph.n_layers
    names = []
    for q in range(4):
        members = layers[quart == q]
        if len(members) == 0:
            names.append(f"Q{q + 1} (no layer)")
        elif len(members) == 1:
            names.append(f"Q{q + 1} (layer {members[0]})")
        else:
            names.append(f"Q{q + 1} (layers {members[0]}–{members[-1]})")
    return names


def composition(results: Results, entering: bool = False) -> go.Figure:
    """Stacked shares versus relative size: layer quartiles (top), attention / MLP (bottom).

    One column of two panels per result (model or method), sharing the x axis, so one result
    fits a paper column. ``entering=True`` draws the shares among the nodes that *enter* at
    each size rather than the whole subgraph, which is where "later nodes are increasingly
    attention heads" shows. A dashed line marks the attention share among all candidates,
    what a random subgraph would hold on average.
    """
    pairs = as_labelled(results)
    cols = len(pairs)
    fig = make_subplots(
        rows=2,
        cols=cols,
        shared_xaxes=True,
        shared_yaxes=True,
        vertical_spacing=0.07,
        horizontal_spacing=0.04 if cols > 1 else 0.0,
        column_titles=[name for name, _ in pairs] if cols > 1 else None,
    )
    prefix = "new_" if entering else ""
    for col, (_name, result) in enumerate(pairs, start=1):
        table = _composition(result).sort_values("relative_size")
        x = table["relative_size"].to_numpy()
        for q, qname in enumerate(_quartile_names(result)):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=table[f"{prefix}q{q + 1}_share"].to_numpy(),
                    mode="lines",
                    stackgroup=f"quart{col}",
                    name=qname if cols == 1 else f"Q{q + 1}",
                    legendgroup=f"q{q}",
                    showlegend=col == 1,
                    line=dict(width=0.6, color=QUARTILE_COLORS[q]),
                    fillcolor=QUARTILE_COLORS[q],
                    hovertemplate=f"{qname}<br>s/N = %{{x:.3g}}<br>share %{{y:.2f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        for kind, column, colour in (
            ("attn", "attn_share", ATTN_COLOR),
            ("MLP", "mlp_share", MLP_COLOR),
        ):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=table[f"{prefix}{column}"].to_numpy(),
                    mode="lines",
                    stackgroup=f"kind{col}",
                    name="attention heads" if kind == "attn" else "MLPs",
                    legendgroup=kind,
                    showlegend=col == 1,
                    line=dict(width=0.6, color=colour),
                    fillcolor=colour,
                    hovertemplate=f"{kind}<br>s/N = %{{x:.3g}}<br>share %{{y:.2f}}<extra></extra>",
                ),
                row=2,
                col=col,
            )
        base = float(table["base_attn_share"].iloc[0])
        fig.add_trace(
            go.Scatter(
                x=[x.min(), x.max()],
                y=[base, base],
                mode="lines",
                name="attention share of all nodes",
                legendgroup="base",
                showlegend=col == 1,
                line=dict(color="#222222", width=1.4, dash="dash"),
                hoverinfo="skip",
            ),
            row=2,
            col=col,
        )
    what = "nodes entering at each size" if entering else "nodes in the subgraph"
    x_lo = min(float(r.relative_sizes.min()) for _, r in pairs)
    ticks = log_ticks(x_lo, 1.0)
    fig.update_xaxes(type="log", tickvals=ticks[0], ticktext=ticks[1])
    # Several panels side by side: a short x title each, so neighbours' titles never touch.
    fig.update_xaxes(title_text="relative size s/N (log)" if cols == 1 else "s/N (log)", row=2)
    fig.update_yaxes(range=[0, 1])
    fig.update_yaxes(title_text="share by layer", row=1, col=1)
    fig.update_yaxes(title_text="share by kind", row=2, col=1)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(
            text="Composition versus size",
            subtitle=dict(text=f"shares among the {what}, mean over prompts"),
        ),
        legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom"),
        margin=dict(t=100 if cols > 1 else 80, b=120),
        width=max(600, 120 + 360 * cols),
        height=720,
        meta=dict(strace_lens="composition", entering=entering),
    )
    return fig


def usage(
    result: TraceResult, sizes: Sequence[int] | None = None, max_curves: int = 6
) -> go.Figure:
    """Lorenz curves of node usage across prompts, one per size (paper figure 5).

    x: share of candidate nodes, least used first; y: share of all uses. The diagonal is
    perfectly even use; the further below it, the more a few nodes carry every prompt. The
    legend gives each size's Gini coefficient. ``sizes`` picks the sizes (default: up to
    ``max_curves`` spread over the grid, the full model left out since every node is used).
    """
    table = _lorenz(result)
    grid = sorted(int(s) for s in table["size"].unique())
    n_cand = max(result.n_candidates, 1)
    if sizes is None:
        usable = [s for s in grid if s < n_cand] or grid
        pick = np.unique(np.linspace(0, len(usable) - 1, min(max_curves, len(usable))).round())
        sizes = [usable[int(i)] for i in pick]
    missing = [s for s in sizes if s not in grid]
    if missing:
        raise KeyError(f"Sizes {missing} are not in this result's grid {grid}.")
    colours = sample_colorscale("Viridis", list(np.linspace(0.0, 0.85, max(len(sizes), 2))))
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="even use",
            line=dict(color="#888888", dash="dash", width=1.2),
        )
    )
    for s, colour in zip(sizes, colours):
        part = table[table["size"] == s]
        gini = float(part["gini"].iloc[0])
        fig.add_trace(
            go.Scatter(
                x=part["node_share"].to_numpy(),
                y=part["usage_share"].to_numpy(),
                mode="lines",
                name=f"s = {s} ({100 * s / n_cand:.2g}%), Gini {gini:.2f}",
                line=dict(color=colour, width=2.2),
                hovertemplate=(
                    f"s = {s}<br>%{{x:.2f}} of nodes make %{{y:.2f}} of uses<extra></extra>"
                ),
            )
        )
    note = (
        f"per-input masks over {result.n_prompts} prompts"
        if result.per != "dataset"
        else "a per-dataset mask: one subgraph, so use is all-or-nothing"
    )
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text="How evenly nodes are used (Lorenz)", subtitle=dict(text=note)),
        xaxis=dict(title="share of nodes, least used first", range=[0, 1]),
        yaxis=dict(title="share of all uses", range=[0, 1]),
        # Lorenz curves lie below the diagonal: the top-left corner is free for the legend.
        legend=dict(x=0.02, xanchor="left", y=0.98, yanchor="top"),
        # A square plotting area (480 px each way) without axis constraints.
        margin=dict(l=80, r=30, t=90, b=70),
        width=590,
        height=640,
        meta=dict(strace_lens="usage", sizes=list(sizes)),
    )
    return fig
