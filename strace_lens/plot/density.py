"""Density follows uncertainty: per-prompt density against the full model's entropy (figure 7).

Density is :func:`strace_lens.analysis.density` (area under TV versus log10 relative size,
per decade); the correlation and its interval are :func:`strace_lens.analysis.uncertainty`'s.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from strace_lens.analysis import density as _density
from strace_lens.analysis import uncertainty as _uncertainty
from strace_lens.plot._common import Results, as_labelled, short
from strace_lens.plot.curves import _colours
from strace_lens.plot.style import TEMPLATE

AXIS = {
    "entropy": "full model's next-token entropy (nats)",
    "loss": "full model's loss on the true next token (nats)",
}


def _rho_text(row: dict) -> str:
    if not np.isfinite(row["rho"]):
        return f"Spearman ρ undefined (n = {int(row['n'])})"
    p = row["p_value"]
    p_text = f"p = {p:.2g}" if p >= 1e-4 else "p < 1e-4"
    return (
        f"Spearman ρ = {row['rho']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}], "
        f"{p_text}, n = {int(row['n'])}"
    )


def density_vs_entropy(
    results: Results,
    against: Literal["entropy", "loss"] = "entropy",
    metric: str = "tv",
    n_boot: int = 1000,
) -> go.Figure:
    """One point per prompt: density (mean TV per decade of size) against uncertainty.

    The title states the Spearman correlation with its 95 % bootstrap interval, p-value and
    number of prompts (one line per result when several are drawn). ``against="loss"`` uses
    the full model's loss on the true next token (traces made with targets).
    """
    pairs = as_labelled(results)
    colours = _colours(pairs)
    fig = go.Figure()
    stats = []
    for (name, result), colour in zip(pairs, colours):
        table = _density(result, metric)
        if table[against].isna().all():
            raise ValueError(
                f"{name!r} has no {against} per prompt"
                + (" (trace with targets to record the loss)." if against == "loss" else ".")
            )
        corr = _uncertainty(result, metric, n_boot=n_boot)
        row = corr[corr["against"] == against].iloc[0].to_dict()
        stats.append((name, row))
        fig.add_trace(
            go.Scatter(
                x=table[against].to_numpy(),
                y=table["density"].to_numpy(),
                mode="markers",
                name=f"{name} (ρ = {row['rho']:.2f})" if len(pairs) > 1 else name,
                marker=dict(
                    color=colour, size=8, opacity=0.75, line=dict(width=0.5, color="white")
                ),
                text=[short(t, 60) for t in table["text"]],
                hovertemplate=(
                    f"<b>{name}</b><br>%{{text}}<br>{against} %{{x:.3g}} nats"
                    "<br>density %{y:.3g}<extra></extra>"
                ),
            )
        )
    if len(stats) == 1:
        title = _rho_text(stats[0][1])
        subtitle = f"{stats[0][0]}: density vs {against}, one point per prompt; 95% bootstrap CI"
    else:
        title = f"Density versus {against}"
        subtitle = "<br>".join(f"{n}: {_rho_text(r)}" for n, r in stats)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, subtitle=dict(text=subtitle)),
        xaxis=dict(title=AXIS[against]),
        yaxis=dict(title=f"density: mean {metric.upper()} per decade of size"),
        showlegend=len(pairs) > 1,
        legend=dict(x=0.01, xanchor="left", y=0.99, yanchor="top"),
        margin=dict(t=75 + 17 * len(stats)),
        width=680,
        height=480 + 17 * len(stats),
        meta=dict(
            strace_lens="density_vs_entropy",
            against=against,
            rho=[float(r["rho"]) for _, r in stats],
        ),
    )
    return fig
