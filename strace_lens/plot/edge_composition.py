"""The paper's composition figure in edge units: shares of kept edges by the target's layer
quartile (top) and by kind, attention / MLP / residual (bottom), against relative size, with
the paper's fixed phase bands shaded (construction 1e-4 to 1e-2, refinement 1e-2 to 1) and
its minimal core (s = 1e-3) marked.

The shares are :func:`strace_lens.analysis.edge_composition`'s means over prompts on its
common log grid; grid points no prompt covers are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from strace_lens.analysis import edge_bands as bands
from strace_lens.analysis.edge_composition import EdgeComposition
from strace_lens.analysis.edge_composition import edge_composition as _edge_composition
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.plot.style import (
    ATTN_COLOR,
    CORE_BAND,
    CORE_COLOR,
    MLP_COLOR,
    QUARTILE_COLORS,
    REFINEMENT_BAND,
    REFINEMENT_COLOR,
    RESID_COLOR,
    TEMPLATE,
    log_ticks,
)

EdgeResults = EdgeTraceResult | EdgeComposition | Mapping[str, EdgeTraceResult | EdgeComposition]
KIND_STYLE = (("attn", "attention", ATTN_COLOR), ("mlp", "MLP", MLP_COLOR),
              ("resid", "residual", RESID_COLOR))  # fmt: skip


def _as_compositions(results: EdgeResults) -> list[tuple[str, EdgeComposition]]:
    pairs = list(results.items()) if isinstance(results, Mapping) else [("", results)]
    if not pairs:
        raise ValueError("No results to plot: pass an EdgeTraceResult or a dict of them.")
    out = []
    for name, r in pairs:
        if isinstance(r, EdgeTraceResult):
            r = _edge_composition(r)
        if not isinstance(r, EdgeComposition):
            raise TypeError(f"{name!r} is a {type(r).__name__}, not an EdgeTraceResult.")
        out.append((str(name), r))
    return out


def edge_composition(results: EdgeResults) -> go.Figure:
    """Stacked edge shares by quartile (top) and kind (bottom) against relative size, one
    column per result (an :class:`EdgeTraceResult`, an :class:`EdgeComposition`, or a
    ``{label: result}`` dict)."""
    pairs = _as_compositions(results)
    cols = len(pairs)
    fig = make_subplots(
        rows=2, cols=cols, shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.07,
        horizontal_spacing=0.04 if cols > 1 else 0.0,
        column_titles=[name for name, _ in pairs] if cols > 1 else None,
    )  # fmt: skip
    # the column titles sit where the band labels go (just above the top panels): lift them
    fig.for_each_annotation(lambda a: a.update(yshift=20))
    x_lo = 1.0
    for col, (_name, comp) in enumerate(pairs, start=1):
        table = comp.table()
        table = table[table["n"] > 0]
        x = table["relative_size"].to_numpy()
        x_lo = min(x_lo, float(x.min()))
        for q, qname in enumerate(comp.quartile_names()):
            fig.add_trace(go.Scatter(
                x=x, y=table[f"q{q + 1}_share"].to_numpy(), mode="lines",
                stackgroup=f"quart{col}", name=qname if cols == 1 else f"Q{q + 1}",
                legendgroup=f"q{q}", showlegend=col == 1,
                line=dict(width=0.6, color=QUARTILE_COLORS[q]), fillcolor=QUARTILE_COLORS[q],
                hovertemplate=f"{qname}<br>s = %{{x:.3g}}<br>share %{{y:.3f}}<extra></extra>",
            ), row=1, col=col)  # fmt: skip
        for key, kname, colour in KIND_STYLE:
            fig.add_trace(go.Scatter(
                x=x, y=table[f"{key}_share"].to_numpy(), mode="lines",
                stackgroup=f"kind{col}", name=f"{kname} edges", legendgroup=key,
                showlegend=col == 1, line=dict(width=0.6, color=colour), fillcolor=colour,
                hovertemplate=f"{kname}<br>s = %{{x:.3g}}<br>share %{{y:.3f}}<extra></extra>",
            ), row=2, col=col)  # fmt: skip
    x_lo = min(x_lo, bands.CONSTRUCTION_BAND[0])
    phases = (
        ("construction", bands.CONSTRUCTION_BAND, CORE_BAND, CORE_COLOR),
        ("refinement", bands.REFINEMENT_BAND, REFINEMENT_BAND, REFINEMENT_COLOR),
    )
    for text, (x0, x1), fill, colour in phases:
        # the stacked areas fill the panels: the bands tint them from above
        fig.add_vrect(
            x0=x0, x1=x1, fillcolor=fill, line_width=0, layer="above", row="all", col="all"
        )
        fig.add_annotation(
            x=(math.log10(x0) + math.log10(x1)) / 2,
            y=1,
            xref="x",
            yref="paper",
            yanchor="bottom",
            text=text,
            showarrow=False,
            font=dict(color=colour, size=11),
        )
    fig.add_vline(
        x=bands.MINIMAL_CORE_SIZE,
        line=dict(color="#222222", width=1.2, dash="dash"),
        row="all",
        col="all",
    )
    fig.add_annotation(x=math.log10(bands.MINIMAL_CORE_SIZE), y=0, xref="x", yref="paper",
                       yanchor="top", text="minimal core", showarrow=False,
                       font=dict(size=10, color="#222222"))  # fmt: skip
    ticks = log_ticks(x_lo, 1.0)
    fig.update_xaxes(type="log", tickvals=ticks[0], ticktext=ticks[1],
                     range=[math.log10(x_lo), 0])  # fmt: skip
    fig.update_xaxes(title_text="relative size s (fraction of edges kept, log)", row=2)
    fig.update_yaxes(range=[0, 1])
    fig.update_yaxes(title_text="share by target quartile", row=1, col=1)
    fig.update_yaxes(title_text="share by kind", row=2, col=1)
    n = max(int(c.per_prompt.shape[0]) for _, c in pairs)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text="Edge composition versus size",
                   subtitle=dict(text=f"shares of kept edges, mean over {n} prompt(s); "
                                 "bands: construction 1e-4–1e-2, refinement 1e-2–1")),
        legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0,
                    yanchor="bottom"),
        margin=dict(t=100, b=130),
        width=max(640, 120 + 420 * cols),
        height=740,
        meta=dict(strace_lens="edge_composition"),
    )  # fmt: skip
    return fig
