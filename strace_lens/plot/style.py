"""One look for every strace-lens figure: a plotly template and a colour-blind-safe palette.

The palette is Okabe & Ito's (2008), distinguishable under the common colour-vision
deficiencies and in greyscale by lightness. The two phases of s-Trace always wear the same two
colours across figures: the early core in vermillion, the late refinement in blue.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

TEMPLATE = "strace_lens"

OKABE_ITO = {
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "black": "#000000",
}
# Line colours in the order series are drawn. Vermillion and blue come last: they are the
# phase colours, shaded behind the curves; yellow is weak on white.
COLORWAY = [
    OKABE_ITO[k]
    for k in ("black", "orange", "green", "purple", "sky", "blue", "vermillion", "yellow")
]
CORE_COLOR = OKABE_ITO["vermillion"]
REFINEMENT_COLOR = OKABE_ITO["blue"]
UNUSED_COLOR = "#D9D9D9"
# Phase bands behind curves: the phase colours, very light.
CORE_BAND = "rgba(213, 94, 0, 0.10)"
REFINEMENT_BAND = "rgba(0, 114, 178, 0.07)"
# Layer quartiles, early to late, and attention versus MLP, in stacked areas.
QUARTILE_COLORS = [OKABE_ITO[k] for k in ("yellow", "orange", "vermillion", "purple")]
ATTN_COLOR = OKABE_ITO["blue"]
MLP_COLOR = OKABE_ITO["green"]
# Residual (skip) edges of the edge graph: no component, a neutral grey.
RESID_COLOR = "#9A9A9A"

FONT_FAMILY = "Arial, Helvetica, sans-serif"
RELATIVE_SIZE_TITLE = "relative size s/N (fraction of nodes kept)"


def _build_template() -> go.layout.Template:
    axis: dict[str, Any] = dict(
        showline=True,
        linecolor="#444444",
        linewidth=1,
        ticks="outside",
        tickcolor="#444444",
        showgrid=True,
        gridcolor="#EBEBEB",
        zeroline=False,
        automargin=True,
        title=dict(standoff=8),
    )
    return go.layout.Template(
        layout=go.Layout(
            font=dict(family=FONT_FAMILY, size=13, color="#222222"),
            colorway=COLORWAY,
            paper_bgcolor="white",
            plot_bgcolor="white",
            xaxis=axis,
            yaxis=axis,
            legend=dict(bgcolor="rgba(255,255,255,0.85)", borderwidth=0),
            hoverlabel=dict(font=dict(family=FONT_FAMILY)),
            margin=dict(l=70, r=30, t=80, b=60),
            # Title and subtitle at the top of the margin, left-aligned (a subtitle carries
            # the rule or the statistic a figure states).
            title=dict(
                x=0.02,
                xanchor="left",
                yref="container",
                y=1,
                yanchor="top",
                pad=dict(t=8),
                font=dict(size=15),
                subtitle=dict(font=dict(size=12)),
            ),
        )
    )


def register() -> str:
    """Register the template with plotly (idempotent) and return its name.

    The template is not made plotly's default: a user's other figures keep their own look.
    """
    if TEMPLATE not in pio.templates:
        pio.templates[TEMPLATE] = _build_template()
    return TEMPLATE


register()


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Readable ticks for a log axis from ``lo`` to ``hi``: 1-2-5 per decade over short
    ranges, 1-3 over medium ones, powers of ten over long ones; labels in plain numbers."""
    import math

    lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = math.log10(hi) - math.log10(lo)
    mantissas = (1, 2, 5) if decades <= 2 else (1, 3) if decades <= 4 else (1,)
    values = [
        m * 10.0**e
        for e in range(lo_e, hi_e + 1)
        for m in mantissas
        if lo * (1 - 1e-9) <= m * 10.0**e <= hi * (1 + 1e-9)
    ]
    return values, [f"{v:g}" for v in values]
