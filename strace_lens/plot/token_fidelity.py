"""Fidelity of token-granularity subgraphs against their size: TV to the full model (median
and interquartile range over prompts, top panel; the inverse subgraphs' median dashed) and the
share of prompts whose subgraph keeps the full model's top-1 token (bottom panel).

x is each grid size's mean relative size over prompts, units kept over the prompt's
``n_layers * (n_heads + 1) * n_pos`` (component, position) pairs: a relative size asked for
is met up to rounding in every prompt, a unit count is a different fraction of each prompt.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from strace_lens.plot.edge_fidelity import add_fidelity_lines, fidelity_layout, fidelity_panels
from strace_lens.plot.style import COLORWAY
from strace_lens.token_trace.result import TokenTraceResult


def token_fidelity(result: TokenTraceResult) -> go.Figure:
    """Median TV with its interquartile band, the inverse's median TV (top) and top-1
    agreement (bottom) per grid size, against the mean relative size."""
    fig = fidelity_panels()
    colour = COLORWAY[0]
    x = result.relative_sizes().mean(0).numpy()
    tv = result.metrics["tv"].double().numpy()
    top1 = result.metrics["top1"].double().numpy()
    add_fidelity_lines(fig, x, tv, top1, f"{result.method} subgraph", colour)
    if "inv_tv" in result.metrics:
        inverse = np.median(result.metrics["inv_tv"].double().numpy(), axis=0)
        fig.add_trace(go.Scatter(
            x=x, y=inverse, mode="lines+markers", name="inverse (the subgraph ablated)",
            line=dict(color=colour, dash="dash"), marker=dict(size=4),
            hovertemplate="inverse<br>relative size = %{x:.3g}<br>median TV %{y:.3f}"
            "<extra></extra>",
        ), row=1, col=1)  # fmt: skip
    fidelity_layout(
        fig,
        float(x.min()),
        "relative size (fraction of (component, position) pairs kept, log)",
        "Token-level subgraph fidelity versus size",
        f"median TV and interquartile range over {result.n_prompts} prompt(s); x: the mean "
        f"relative size of each of the {len(result.grid)} grid sizes",
    )
    return fig


__all__ = ["token_fidelity"]
