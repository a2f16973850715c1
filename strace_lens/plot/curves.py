"""Curves over subgraph size: fidelity (paper figures 1 and 6) and nucleus recovery (figure 2).

Every number drawn comes from :mod:`strace_lens.analysis` (``density_curve``, ``baselines``,
``nucleus_recovery``, ``split_core``); this module only draws.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import plotly.graph_objects as go

from strace_lens.analysis import baselines, split_core
from strace_lens.analysis import nucleus_recovery as _recovery
from strace_lens.plot._common import Results, as_labelled, model_name
from strace_lens.plot.style import (
    COLORWAY,
    CORE_BAND,
    CORE_COLOR,
    REFINEMENT_BAND,
    REFINEMENT_COLOR,
    RELATIVE_SIZE_TITLE,
    TEMPLATE,
    log_ticks,
)
from strace_lens.result import TraceResult

METRIC_TITLES = {
    "tv": "TV to full model (0–1)",
    "kl": "KL(full ‖ sub) (nats)",
    "nucleus": "shared nucleus (% of probability mass)",
}
METHOD_DASH = {
    "mask": "solid",
    "random": "dash",
    "greedy": "dot",
    "attribution": "dashdot",
    "forward": "longdash",
    "exhaustive": "longdashdot",
}
# The paper's bands (relative sizes over its edge graphs of 7B-14B models).
PAPER_CONSTRUCTION = (1e-4, 1e-2)
Bands = Literal["core", "paper"] | None


def _colours(pairs: list[tuple[str, TraceResult]]) -> list[str]:
    """One colour per model when several models are drawn, else one per method and mask kind."""
    models = [model_name(r) for _, r in pairs]
    keys = models if len(set(models)) > 1 else [f"{r.method}/{r.per}" for _, r in pairs]
    order: list[str] = []
    for k in keys:
        if k not in order:
            order.append(k)
    return [COLORWAY[order.index(k) % len(COLORWAY)] for k in keys]


def _fill(colour: str, alpha: float) -> str:
    h = colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


def core_boundary(result: TraceResult, core_nucleus: float = 1.0) -> float:
    """Median relative size of the early core over mask rows (NaN when no row has one)."""
    core_size, _ = split_core(result, core_nucleus)
    sizes = core_size.double().numpy() / max(result.n_candidates, 1)
    sizes = sizes[np.isfinite(sizes)]
    return float(np.median(sizes)) if len(sizes) else math.nan


def fidelity(
    results: Results,
    metric: str = "tv",
    inverse: bool = True,
    bands: Bands = "core",
    spread: bool | None = None,
    core_nucleus: float = 1.0,
) -> go.Figure:
    """Mean ``metric`` (TV by default) versus relative size, log x: paper figures 1 and 6.

    One line per result (colour per model when several models are drawn, else per method;
    line style per method, the random baseline dashed). ``inverse`` adds each traced
    subgraph's inverse (its nodes ablated, every other kept) as a thin dotted line of the
    same colour. ``spread`` shades the inter-quartile range over prompts (default: when at
    most two lines are drawn).

    ``bands``: ``"core"`` shades the construction phase up to the median early-core size of
    the first non-random result (:func:`strace_lens.analysis.split_core`, the smallest
    subgraph whose shared nucleus reaches ``core_nucleus`` %) and the refinement phase above
    it. The paper shades fixed relative sizes, 1e-4 to 1e-2, over edge graphs of 7B+ models;
    a node graph has N of tens to hundreds of nodes, so its smallest subgraph is already
    1/N >= 1e-3 and a fixed band would say nothing: ``"core"`` is the default. ``"paper"``
    shades the paper's bands anyway; ``None`` shades nothing.
    """
    pairs = as_labelled(results)
    colours = _colours(pairs)
    if spread is None:
        spread = len(pairs) <= 2
    fig = go.Figure()
    x_min = 1.0
    for (name, result), colour in zip(pairs, colours):
        if metric not in result.metrics:
            raise KeyError(f"{name!r} has no {metric!r} metric; it has {sorted(result.metrics)}.")
        table = baselines(result, None, metric)
        x_min = min(x_min, float(table["relative_size"].min()))
        dash = METHOD_DASH.get(result.method, "solid")
        for curve, suffix, width in (("trace", "", 2.4), ("inverse", " · inverse", 1.4)):
            part = table[table["curve"] == curve]
            if part.empty or (curve == "inverse" and (not inverse or result.method == "random")):
                continue
            x = part["relative_size"].to_numpy()
            group = f"{name}{suffix}"
            if spread and curve == "trace":
                fig.add_trace(
                    go.Scatter(
                        x=np.concatenate([x, x[::-1]]),
                        y=np.concatenate([part["q75"].to_numpy(), part["q25"].to_numpy()[::-1]]),
                        fill="toself",
                        fillcolor=_fill(colour, 0.13),
                        line=dict(width=0),
                        hoverinfo="skip",
                        showlegend=False,
                        legendgroup=group,
                        name=f"{group} IQR",
                    )
                )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=part["mean"].to_numpy(),
                    mode="lines",
                    name=group,
                    legendgroup=group,
                    line=dict(
                        color=colour, width=width, dash="dot" if curve == "inverse" else dash
                    ),
                    customdata=np.stack([part["median"], part["n"]], axis=1),
                    hovertemplate=(
                        f"<b>{group}</b><br>s/N = %{{x:.3g}}<br>mean {metric} = %{{y:.3g}}"
                        "<br>median %{customdata[0]:.3g} over %{customdata[1]} prompts"
                        "<extra></extra>"
                    ),
                )
            )

    ticks = log_ticks(min(x_min, PAPER_CONSTRUCTION[0]) if bands == "paper" else x_min, 1.0)
    subtitle = f"mean over prompts{', IQR shaded' if spread else ''}"
    if bands is not None:
        x_lo = min(x_min, PAPER_CONSTRUCTION[0]) if bands == "paper" else x_min
        if bands == "paper":
            edge = PAPER_CONSTRUCTION[1]
            rule = "bands: the paper's fixed construction range 1e-4–1e-2"
        else:
            primary = next((r for _, r in pairs if r.method != "random"), pairs[0][1])
            edge = core_boundary(primary, core_nucleus)
            rule = (
                f"construction: up to the median core size (≥{core_nucleus:g}% shared nucleus)"
                if math.isfinite(edge)
                else "no core reached: no bands"
            )
        if math.isfinite(edge):
            fig.add_vrect(x0=x_lo, x1=edge, fillcolor=CORE_BAND, line_width=0, layer="below")
            fig.add_vrect(x0=edge, x1=1.0, fillcolor=REFINEMENT_BAND, line_width=0, layer="below")
            for text, x0, x1, colour in (
                ("construction", x_lo, edge, CORE_COLOR),
                ("refinement", edge, 1.0, REFINEMENT_COLOR),
            ):
                fig.add_annotation(
                    x=(math.log10(x0) + math.log10(x1)) / 2,
                    y=1,
                    yref="paper",
                    yanchor="bottom",
                    text=text,
                    showarrow=False,
                    font=dict(color=colour, size=11),
                )
        subtitle += f"; {rule}"
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=f"Fidelity versus size ({metric.upper()})", subtitle=dict(text=subtitle)),
        xaxis=dict(type="log", title=RELATIVE_SIZE_TITLE, tickvals=ticks[0], ticktext=ticks[1]),
        yaxis=dict(title=METRIC_TITLES.get(metric, metric), rangemode="tozero"),
        legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0, yanchor="bottom"),
        margin=dict(t=90, b=120),
        width=760,
        height=540,
        meta=dict(
            strace_lens="fidelity",
            metric=metric,
            bands=None if bands is None else [x_lo if bands == "paper" else x_min, edge],
        ),
    )
    if metric in ("tv",):
        fig.update_yaxes(range=[0, 1.02])
    return fig


def nucleus_recovery(results: Results) -> go.Figure:
    """Relative size needed to share the full model's top-k % nucleus, versus k (figure 2).

    Median over prompts with inter-quartile bars, log y, the levels k evenly spaced on x;
    one series per result. A median or
    quartile beyond the largest traced size (the prompt never reached k) is drawn at that
    largest size as an upward triangle: "more than the grid", never a made-up value.
    """
    pairs = as_labelled(results)
    colours = _colours(pairs)
    fig = go.Figure()
    n = len(pairs)
    for i, ((name, result), colour) in enumerate(zip(pairs, colours)):
        table = _recovery(result)
        top = float(table["max_relative_size"].iloc[0])
        level = table["level"].to_numpy(dtype=float)
        # Levels evenly spaced (1 to 90 % would crowd 80 and 90 on any numeric axis); a small
        # offset keeps the bars of several series apart.
        x = np.arange(len(level)) + 0.12 * (i - (n - 1) / 2)
        med = table["median"].to_numpy(dtype=float)
        q25 = table["q25"].to_numpy(dtype=float)
        q75 = table["q75"].to_numpy(dtype=float)
        beyond = ~np.isfinite(med)
        med_d, q25_d, q75_d = (np.where(np.isfinite(v), v, top) for v in (med, q25, q75))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=med_d,
                mode="lines+markers",
                name=name,
                line=dict(color=colour, width=1.6, dash=METHOD_DASH.get(result.method, "solid")),
                marker=dict(
                    size=9, color=colour, symbol=["triangle-up" if b else "circle" for b in beyond]
                ),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=q75_d - med_d,
                    arrayminus=med_d - q25_d,
                    color=colour,
                    thickness=1.4,
                    width=4,
                ),
                customdata=np.stack([level, table["n_reached"], table["n_unreached"]], axis=1),
                hovertemplate=(
                    f"<b>{name}</b><br>k = %{{customdata[0]:g}}%<br>median s/N = %{{y:.3g}}"
                    "<br>reached by %{customdata[1]} prompts, not by %{customdata[2]}"
                    "<extra></extra>"
                ),
            )
        )
    levels = _recovery(pairs[0][1])["level"].tolist()
    y_lo = min(float(r.relative_sizes.min()) for _, r in pairs)
    yt = log_ticks(y_lo, 1.0)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(
            text="Size needed for the top-k % nucleus",
            subtitle=dict(
                text="subgraph's top-k % tokens = full model's, in order; "
                "median over prompts, bars: IQR; ▲ = beyond the grid"
            ),
        ),
        xaxis=dict(
            title="nucleus target k (% of probability mass)",
            tickvals=list(range(len(levels))),
            ticktext=[f"{v:g}%" for v in levels],
            range=[-0.5, len(levels) - 0.5],
        ),
        yaxis=dict(type="log", title="size needed s/N (log)", tickvals=yt[0], ticktext=yt[1]),
        legend=dict(x=0.01, xanchor="left", y=1, yanchor="top"),
        margin=dict(t=90),
        width=700,
        height=480,
        meta=dict(strace_lens="nucleus_recovery"),
    )
    return fig
