"""Where one prompt's token-level subgraphs sit: a map of its (component, position) units,
heads and MLPs down, token positions across, each unit coloured by the smallest subgraph of
the size grid that holds it (for a nested family: the size at which it enters; blank: in no
subgraph of the grid).

The colour scale runs from vermillion (in the smallest subgraph) to blue (only in the
largest), the project's core and refinement colours; its ticks are the prompt's relative
sizes. Hover on a unit: its name, token, and the first subgraph's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Int
from torch import Tensor

from strace_lens.plot._common import prompt_token_labels, short
from strace_lens.plot.style import CORE_COLOR, REFINEMENT_COLOR, TEMPLATE
from strace_lens.token_trace.result import TokenTraceResult

#: pixels a component's row takes, and the most rows named one by one (the page's height
#: stops growing there: SmolLM2-135M's 300 components share the height of 100)
ROW_PX = 14
MAX_NAMED_ROWS = 100


def first_sizes(result: TokenTraceResult, prompt: int) -> Int[Tensor, "node pos"]:
    """Grid index of the smallest subgraph of ``prompt`` that holds each unit, -1 for a unit
    that none holds."""
    masks = result.masks(prompt)  # [size, node, pos]
    held = masks.any(0)
    first = masks.int().argmax(0)  # torch returns the first maximal index: the smallest size
    return torch.where(held, first, torch.full_like(first, -1))


def unit_token_labels(
    result: TokenTraceResult, prompt: int, tokens: Sequence[str] | None = None, model: Any = None
) -> list[str]:
    """Axis labels of the prompt's tokens: ``tokens`` as given, else decoded with the model's
    tokenizer (the token granularity's tokenisation), else the positions."""

    def token_ids() -> list[int]:
        from strace_lens.inputs import tokenize

        return tokenize(model, [result.prompts[prompt]]).tokens[0].tolist()

    return prompt_token_labels(prompt, int(result.n_pos[prompt]), tokens, model, token_ids)


def token_units(
    result: TokenTraceResult,
    prompt: int = 0,
    *,
    tokens: Sequence[str] | None = None,
    model: Any = None,
) -> go.Figure:
    """The unit map of one prompt (module docstring).

    Args:
        result: a :class:`TokenTraceResult` (any method; nested or not).
        prompt: which prompt.
        tokens: the prompt's token strings, or ``model`` to decode them; by default the axis
            shows positions.
    """
    if not 0 <= prompt < result.n_prompts:
        raise IndexError(f"prompt must lie in [0, {result.n_prompts}), got {prompt}.")
    first = first_sizes(result, prompt)
    graph = result.graph(prompt)
    rows = graph.node_graph.names
    labels = unit_token_labels(result, prompt, tokens, model)
    columns = [f"{t}: {label}" for t, label in enumerate(labels)]
    rel = result.relative_sizes()[prompt].tolist()
    counts = result.counts[prompt].tolist()
    z = [[None if j < 0 else j for j in row] for row in first.tolist()]
    text = [
        [
            "in no subgraph of the grid"
            if j < 0
            else f"first in the subgraph of {counts[j]} units (relative size {rel[j]:.3g})"
            for j in row
        ]
        for row in first.tolist()
    ]
    n_sizes = len(result.grid)
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=rows, text=text, zmin=0, zmax=max(n_sizes - 1, 1),
        colorscale=[[0.0, CORE_COLOR], [1.0, REFINEMENT_COLOR]], xgap=1, ygap=1,
        colorbar=dict(title=dict(text="first in<br>relative size"),
                      tickvals=list(range(n_sizes)), ticktext=[f"{r:.3g}" for r in rel]),
        hovertemplate="%{y} at %{x}<br>%{text}<extra></extra>",
    ))  # fmt: skip
    held = int((first >= 0).sum())
    fig.update_xaxes(title_text="token position", tickangle=-45, showgrid=False)
    # every component named while the names fit (Gemma-3-270M's 90), else plotly's own ticks
    named = dict(tickmode="array", tickvals=rows) if len(rows) <= MAX_NAMED_ROWS else {}
    fig.update_yaxes(title_text="component", autorange="reversed", showgrid=False, **named)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(
            text=f"Token-level units of prompt {prompt}: “{short(result.prompts[prompt])}”",
            subtitle=dict(
                text=f"{held} of {len(graph)} units in some subgraph; colour: the smallest "
                f"of the {n_sizes} grid sizes that holds the unit"
            ),
        ),
        height=max(360, 160 + ROW_PX * min(len(rows), MAX_NAMED_ROWS)),
    )
    return fig


__all__ = ["first_sizes", "token_units", "unit_token_labels"]
